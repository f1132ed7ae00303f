//! The operator surface: an HTTP server inside the job (axum).
//!
//! - `GET /health`: the process is alive (always 200, never needs a token);
//! - `GET /ready`: 200 while the job streams, its last checkpoint is younger
//!   than three intervals (or there is nothing to checkpoint) and no sink has
//!   been detached for more than 30 s; 503 with the reasons otherwise;
//! - `GET /metrics`: Prometheus text format (`engine/metrics.rs`);
//! - `GET /api/...`: the JSON API and its Server-Sent Events (`api.rs`); in
//!   `engage demo`, also the generator's controls (`/api/generator`);
//! - `GET /`: the dashboard, one page embedded in the binary.
//!
//! It listens on loopback by default (`--http 127.0.0.1:9464`). Any other
//! address needs a bearer token (`--http-token`), asked for on every path but
//! `/health`, as `Authorization: Bearer <token>` or, for a browser's page and
//! its event stream (which cannot set headers), `?access_token=<token>`.

mod api;
mod titles;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::engine::latency::unix_ms;
use crate::engine::metrics;
use crate::engine::stats::JobStats;
use crate::sql::JobSpec;

/// The default address: loopback, the port Prometheus exporters of this
/// kind commonly take.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";

/// How long a sink may stay detached before `/ready` fails.
const DETACHED_READY_LIMIT_MS: u64 = 30_000;

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// `None`: no server (`--http off`).
    pub addr: Option<SocketAddr>,
    /// The address was chosen by the user (not the default): if it is
    /// taken, fail rather than fall back to a free port.
    pub explicit: bool,
    pub token: Option<String>,
}

impl HttpOptions {
    /// Parses `--http`: `off`, or an address; `None` means the default.
    pub fn parse(addr: Option<&str>, token: Option<String>) -> Result<HttpOptions, HttpError> {
        let token = token.filter(|t| !t.is_empty());
        let (text, explicit) = match addr {
            Some(text) => (text.trim(), true),
            None => (DEFAULT_ADDR, false),
        };
        if text.eq_ignore_ascii_case("off") {
            return Ok(HttpOptions {
                addr: None,
                explicit,
                token,
            });
        }
        let addr: SocketAddr = text.parse().map_err(|_| {
            HttpError(format!(
                "--http `{text}` is not an address: give IP:PORT (e.g. 127.0.0.1:9464, 127.0.0.1:0 for a free port) or `off`"
            ))
        })?;
        if !addr.ip().is_loopback() && token.is_none() {
            return Err(HttpError(format!(
                "--http {addr} would expose the job beyond this machine without a token: pass --http-token \
                 (or ENGAGE_HTTP_TOKEN) with a secret, or bind 127.0.0.1"
            )));
        }
        Ok(HttpOptions {
            addr: Some(addr),
            explicit,
            token,
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(pub String);

/// What the handlers read.
#[derive(Clone)]
pub(crate) struct AppState {
    stats: Arc<JobStats>,
    job: String,
    titles: Arc<titles::Titles>,
    token: Option<Arc<str>>,
    /// The demo's load generator, which the dashboard may pause or pace.
    generator: Option<Arc<crate::generate::GenerateProgress>>,
}

/// A running server: its address; dropping it stops the server.
pub struct HttpServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the server for the job `spec` whose figures are `stats`; `None`
/// with `--http off`. `generator`: the demo's load generator, whose controls
/// the server then offers.
pub async fn serve(
    options: &HttpOptions,
    spec: &JobSpec,
    stats: Arc<JobStats>,
    generator: Option<Arc<crate::generate::GenerateProgress>>,
) -> Result<Option<HttpServer>, HttpError> {
    let Some(addr) = options.addr else {
        return Ok(None);
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) if !options.explicit && error.kind() == std::io::ErrorKind::AddrInUse => {
            let fallback = SocketAddr::new(addr.ip(), 0);
            let listener = tokio::net::TcpListener::bind(fallback)
                .await
                .map_err(|e| HttpError(format!("failed to bind {fallback}: {e}")))?;
            tracing::warn!(
                wanted = %addr,
                "the default HTTP address is taken (another engage job?); serving on a free port instead \
                 (pass --http to choose one)"
            );
            listener
        }
        Err(error) => {
            return Err(HttpError(format!(
                "failed to bind --http {addr}: {error}; choose another address, 127.0.0.1:0 for a free port, or `off`"
            )))
        }
    };
    let addr = listener
        .local_addr()
        .map_err(|e| HttpError(format!("failed to read the bound address: {e}")))?;
    let state = AppState {
        stats,
        job: spec.name.clone(),
        titles: Arc::new(titles::Titles::for_job(spec)),
        token: options.token.as_deref().map(Arc::from),
        generator,
    };
    let app = router(state);
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(error = %error, "the HTTP server stopped");
        }
    });
    tracing::info!(
        address = %addr,
        "HTTP server listening: dashboard http://{addr}/ , metrics http://{addr}/metrics"
    );
    Ok(Some(HttpServer { addr, task }))
}

fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/", get(dashboard))
        .route("/ready", get(ready))
        .route("/metrics", get(prometheus))
        .merge(api::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(guarded)
        .fallback(not_found)
        .with_state(state)
}

/// A JSON error: `{"error": message}` with `status`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; see the README's HTTP section: /health, /ready, /metrics, /api/top-content, \
         /api/kpi, /api/breakdown, /api/pipeline, /api/windows/{sink}, /api/dead-letters, /api/events, /",
    )
}

async fn require_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = request.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(key, _)| key == "access_token")
            .map(|(_, value)| value.into_owned())
    });
    let given = bearer.map(str::to_string).or(query);
    if given.is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "this endpoint needs the job's token: send `Authorization: Bearer <token>` (or ?access_token=<token>)",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        "Bearer".parse().expect("valid header"),
    );
    response
}

/// Compares without returning early, so timing does not tell how much of a
/// guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(state): State<AppState>) -> Response {
    Json(json!({ "status": "ok", "job": state.job })).into_response()
}

/// Why the job is not ready, if it is not.
fn not_ready_reasons(stats: &JobStats, now_ms: u64) -> Vec<String> {
    let mut reasons = Vec::new();
    if !stats.streaming.load(Ordering::Relaxed) {
        reasons
            .push("not streaming: starting, replaying captured changes, or restarting".to_string());
    }
    let interval = stats.checkpoint_interval_ms.load(Ordering::Relaxed).max(1);
    let last = stats.checkpoint_unix_ms.load(Ordering::Relaxed);
    let since = if last == 0 {
        stats.started_unix_ms.load(Ordering::Relaxed)
    } else {
        last
    };
    let unchecked = stats.processed_lsn.load(Ordering::Relaxed)
        > stats.checkpoint_resume_lsn.load(Ordering::Relaxed);
    let age = now_ms.saturating_sub(since);
    if unchecked && age > 3 * interval {
        reasons.push(format!(
            "the last checkpoint is {:.1} s old (more than 3 intervals of {:.1} s) while changes wait for one",
            age as f64 / 1000.0,
            interval as f64 / 1000.0
        ));
    }
    for (name, since) in stats.sink_names.iter().zip(&stats.sink_detached_since_ms) {
        let since = since.load(Ordering::Relaxed);
        if since > 0 && now_ms.saturating_sub(since) > DETACHED_READY_LIMIT_MS {
            reasons.push(format!(
                "sink `{name}` has been detached (its store unreachable) for {} s",
                now_ms.saturating_sub(since) / 1000
            ));
        }
    }
    reasons
}

async fn ready(State(state): State<AppState>) -> Response {
    let reasons = not_ready_reasons(&state.stats, unix_ms() as u64);
    if reasons.is_empty() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "error": reasons.join("; "), "reasons": reasons })),
        )
            .into_response()
    }
}

async fn prometheus(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(state.stats.clone()),
    )
        .into_response()
}

async fn dashboard() -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(include_str!("dashboard.html")),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_address_needs_a_token() {
        let error = HttpOptions::parse(Some("0.0.0.0:9464"), None).unwrap_err();
        assert!(error.0.contains("--http-token"), "{error}");
        let options = HttpOptions::parse(Some("0.0.0.0:9464"), Some("s3cret".into())).unwrap();
        assert!(options.addr.is_some());
        assert!(HttpOptions::parse(Some("off"), None)
            .unwrap()
            .addr
            .is_none());
        let default = HttpOptions::parse(None, None).unwrap();
        assert_eq!(default.addr.unwrap().to_string(), DEFAULT_ADDR);
        assert!(!default.explicit);
        let error = HttpOptions::parse(Some("localhost"), None).unwrap_err();
        assert!(error.0.contains("IP:PORT"), "{error}");
    }

    #[test]
    fn readiness_names_what_is_wrong() {
        let stats = JobStats::new(vec!["recent".into()]);
        let now = unix_ms() as u64;
        assert!(not_ready_reasons(&stats, now)[0].contains("not streaming"));
        stats.streaming.store(true, Ordering::Relaxed);
        assert!(not_ready_reasons(&stats, now).is_empty());
        // Changes processed, no checkpoint for 40 s with a 10 s interval.
        stats.processed_lsn.store(100, Ordering::Relaxed);
        stats
            .checkpoint_unix_ms
            .store(now - 40_000, Ordering::Relaxed);
        assert!(not_ready_reasons(&stats, now)[0].contains("checkpoint"));
        stats.checkpoint_resume_lsn.store(100, Ordering::Relaxed);
        assert!(not_ready_reasons(&stats, now).is_empty());
        stats.set_detached(0, true, now - 31_000);
        assert!(not_ready_reasons(&stats, now)[0].contains("`recent`"));
    }
}
