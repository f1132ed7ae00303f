//! The JSON API and its live stream.
//!
//! Windowed figures come from what the engine last wrote to each windowed
//! sink (`JobStats::windows`, the same rows Redis holds), named by the
//! mission's sink tables (`sql/engagement.sql`): `top_content`, the
//! `kpi_*_latest` tables, `content_type_engagement` and `top_devices`. A job
//! without one of them answers 404 for the endpoint that needs it. Any job's
//! windowed sink is served as it is by `/api/windows/{sink}`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{error, AppState};
use crate::change::format_lsn;
use crate::engine::latency::unix_ms;
use crate::engine::recent::{RecentWindows, WindowRows};
use crate::engine::stats::{JobStats, OPS};

/// The windowed sink holding the most engaged content of the last 10 minutes.
pub const TOP_CONTENT_SINK: &str = "top_content";
/// Timeframes of `/api/kpi` and the sink holding each one's latest window.
pub const KPI_SINKS: [(&str, &str); 4] = [
    ("1m", "kpi_1m_latest"),
    ("15m", "kpi_15m_latest"),
    ("1h", "kpi_1h_latest"),
    ("24h", "kpi_24h_latest"),
];
/// Engagement seconds by content type, and events by device (10 minutes).
pub const CONTENT_TYPE_SINK: &str = "content_type_engagement";
pub const DEVICE_SINK: &str = "top_devices";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/top-content", get(top_content))
        .route("/api/kpi", get(kpi))
        .route("/api/breakdown", get(breakdown))
        .route("/api/pipeline", get(pipeline))
        .route("/api/dead-letters", get(dead_letters))
        .route("/api/events", get(events))
        .route("/api/generator", get(generator).post(control_generator))
        .route("/api/windows/{sink}", get(windows))
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

/// Query output as JSON objects (engage's JSON forms of each type).
fn rows_json(batches: &[RecordBatch]) -> Vec<Map<String, Value>> {
    let mut buffer = Vec::new();
    {
        let mut writer = arrow::json::ArrayWriter::new(&mut buffer);
        for batch in batches {
            if writer.write(batch).is_err() {
                return Vec::new();
            }
        }
        if writer.finish().is_err() {
            return Vec::new();
        }
    }
    if buffer.is_empty() {
        return Vec::new();
    }
    serde_json::from_slice(&buffer).unwrap_or_default()
}

fn rfc3339(micros: i64) -> Value {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

fn has_sink(stats: &JobStats, sink: &str) -> bool {
    stats.sink_names.iter().any(|name| name == sink)
}

/// Why an endpoint cannot answer: its status and message.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// The latest window of `sink`, if the job has the sink and it wrote one.
fn latest_window(stats: &JobStats, sink: &str, what: &str) -> Result<WindowRows, ApiError> {
    if !has_sink(stats, sink) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("this job has no `{sink}` table, which {what} comes from"),
        ));
    }
    match stats.windows.latest(sink) {
        Some(window) => Ok(window),
        None => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no window of `{sink}` has closed since the job started; try again shortly"),
        )),
    }
}

async fn top_content_json(state: &AppState, limit: usize) -> Result<Value, ApiError> {
    let window = latest_window(&state.stats, TOP_CONTENT_SINK, "the top content")?;
    let mut rows = rows_json(&window.batches);
    let score = |row: &Map<String, Value>| row.get("score").and_then(Value::as_f64).unwrap_or(0.0);
    rows.sort_by(|a, b| score(b).total_cmp(&score(a)));
    rows.truncate(limit);
    let ids: Vec<String> = rows
        .iter()
        .filter_map(|row| {
            row.get("content_id")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    let titles = state.titles.lookup(&ids).await;
    let items: Vec<Value> = rows
        .iter()
        .enumerate()
        .map(|(rank, row)| {
            let id = row
                .get("content_id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let info = titles.get(id).cloned().unwrap_or_default();
            json!({
                "rank": rank + 1,
                "content_id": id,
                "title": info.title,
                "content_type": info.content_type,
                "score": score(row),
            })
        })
        .collect();
    Ok(json!({
        "window_start": rfc3339(window.start_micros),
        "window_end": rfc3339(window.end_micros),
        "items": items,
    }))
}

async fn top_content(State(state): State<AppState>, Query(limit): Query<Limit>) -> Response {
    let limit = limit.limit.unwrap_or(10).clamp(1, 100);
    match top_content_json(&state, limit).await {
        Ok(body) => Json(body).into_response(),
        Err(error) => error.into_response(),
    }
}

#[derive(Deserialize)]
struct History {
    /// Closed windows per timeframe for charts.
    history: Option<usize>,
}

fn kpi_json(stats: &JobStats, history: usize) -> Result<Value, ApiError> {
    if !KPI_SINKS.iter().any(|(_, sink)| has_sink(stats, sink)) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this job has none of the kpi_*_latest tables the KPIs come from".into(),
        ));
    }
    let mut timeframes = Map::new();
    for (timeframe, sink) in KPI_SINKS {
        let windows = stats
            .windows
            .newest(sink, history.max(1))
            .unwrap_or_default();
        let mut rows: Vec<Value> = windows
            .iter()
            .filter_map(|w| rows_json(&w.batches).into_iter().next().map(Value::Object))
            .collect();
        rows.reverse(); // oldest first, for charts
        timeframes.insert(
            timeframe.to_string(),
            json!({ "latest": rows.last().cloned(), "history": rows }),
        );
    }
    Ok(json!({ "timeframes": timeframes }))
}

async fn kpi(State(state): State<AppState>, Query(history): Query<History>) -> Response {
    match kpi_json(&state.stats, history.history.unwrap_or(30).clamp(1, 120)) {
        Ok(body) => Json(body).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `{member: value}` of the latest window of `sink`, for two columns.
fn breakdown_of(stats: &JobStats, sink: &str, key: &str, value: &str) -> Value {
    let Some(window) = stats.windows.latest(sink) else {
        return Value::Null;
    };
    let mut out: Vec<(String, f64)> = rows_json(&window.batches)
        .iter()
        .filter_map(|row| {
            let key = row.get(key)?.as_str()?.to_string();
            let value = row.get(value)?.as_f64()?;
            Some((key, value))
        })
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    json!({
        "window_end": rfc3339(window.end_micros),
        "values": out.into_iter().map(|(k, v)| json!({ "key": k, "value": v })).collect::<Vec<_>>(),
    })
}

fn breakdown_json(stats: &JobStats) -> Value {
    json!({
        "by_content_type": breakdown_of(stats, CONTENT_TYPE_SINK, "content_type", "seconds"),
        "by_device": breakdown_of(stats, DEVICE_SINK, "device", "events"),
    })
}

async fn breakdown(State(state): State<AppState>) -> Response {
    Json(breakdown_json(&state.stats)).into_response()
}

fn pipeline_json(state: &AppState) -> Value {
    let stats = &state.stats;
    let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
    let tables: Vec<Value> = stats
        .source_names
        .iter()
        .zip(&stats.source_ops)
        .map(|(table, ops)| {
            let changes: Map<String, Value> = OPS
                .iter()
                .zip(ops)
                .map(|(op, count)| (op.to_string(), json!(load(count))))
                .collect();
            json!({ "table": table, "changes": changes })
        })
        .collect();
    let lags = stats.sink_lag_bytes();
    let sinks: Vec<Value> = stats
        .sink_names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let last_write = load(&stats.sink_last_write_ms[i]);
            let [p50, p99] = stats.recent_visible[i].quantiles([0.5, 0.99]);
            json!({
                "name": name,
                "state": if load(&stats.sink_detached[i]) == 1 { "detached" } else { "ok" },
                "rows": load(&stats.sink_rows[i]),
                "position_lsn": format_lsn(load(&stats.sink_lsn[i])),
                "lag_bytes": lags[i],
                "last_write": (last_write > 0).then(|| rfc3339(last_write as i64 * 1000)),
                "freshness_p50_seconds": p50,
                "freshness_p99_seconds": p99,
            })
        })
        .collect();
    let checkpoint_ms = load(&stats.checkpoint_unix_ms);
    json!({
        "job": state.job,
        "streaming": stats.streaming.load(Ordering::Relaxed),
        "started_at": rfc3339(load(&stats.started_unix_ms) as i64 * 1000),
        "now": rfc3339(unix_ms() * 1000),
        "restarts": load(&stats.restarts),
        "source": {
            "tables": tables,
            "changes": load(&stats.changes_in),
            "processed_lsn": format_lsn(load(&stats.processed_lsn)),
            "confirmed_lsn": format_lsn(load(&stats.confirmed_lsn)),
            "server_wal_end": format_lsn(load(&stats.server_wal_end)),
            "processing_lag_bytes": stats.processing_lag_bytes(),
            "wal_retained_bytes": stats.replication_lag_bytes(),
        },
        "sinks": sinks,
        "checkpoints": {
            "epoch": load(&stats.checkpoint_epoch),
            "last_at": (checkpoint_ms > 0).then(|| rfc3339(checkpoint_ms as i64 * 1000)),
            "taken": load(&stats.checkpoints),
            "last_size_bytes": load(&stats.checkpoint_bytes),
            "interval_seconds": load(&stats.checkpoint_interval_ms) as f64 / 1000.0,
        },
        "dead_lettered": load(&stats.dead_lettered),
        "late_events": load(&stats.late_events),
        "resent_suppressed": load(&stats.resent_suppressed),
        "window_state_rows": load(&stats.window_state_rows),
        "resident_memory_bytes": crate::engine::metrics::resident_bytes(),
    })
}

async fn pipeline(State(state): State<AppState>) -> Response {
    Json(pipeline_json(&state)).into_response()
}

fn dead_letters_json(stats: &JobStats, limit: usize) -> Value {
    let by_reason: Map<String, Value> = stats
        .dead_letters
        .by_reason()
        .into_iter()
        .map(|(reason, count)| (reason, json!(count)))
        .collect();
    json!({
        "total": stats.dead_lettered.load(Ordering::Relaxed),
        "by_reason": by_reason,
        "newest": stats.dead_letters.newest(limit),
    })
}

async fn dead_letters(State(state): State<AppState>, Query(limit): Query<Limit>) -> Response {
    let limit = limit.limit.unwrap_or(50).clamp(1, 100);
    Json(dead_letters_json(&state.stats, limit)).into_response()
}

/// Everything the dashboard shows, in one object.
async fn snapshot(state: &AppState) -> Value {
    let body = |result: Result<Value, ApiError>| result.unwrap_or(Value::Null);
    json!({
        "top_content": body(top_content_json(state, 10).await),
        "kpi": body(kpi_json(&state.stats, 30)),
        "breakdown": breakdown_json(&state.stats),
        "pipeline": pipeline_json(state),
        "dead_letters": dead_letters_json(&state.stats, 5),
    })
}

/// Server-Sent Events: an `update` event with [`snapshot`] once a second.
async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let ticks = tokio::time::interval(Duration::from_secs(1));
    let stream = futures::stream::unfold((state, ticks), |(state, mut ticks)| async move {
        ticks.tick().await;
        let data = snapshot(&state).await.to_string();
        let event = Event::default().event("update").data(data);
        Some((Ok(event), (state, ticks)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The demo generator's state, as `/api/generator` shows it.
#[derive(Serialize)]
struct GeneratorState {
    /// Whether there is a generator (only `engage demo` runs one).
    available: bool,
    running: bool,
    /// Events per second asked for.
    rate: u64,
    /// Events committed so far.
    events: u64,
}

/// A change to the demo generator: either field may be left out.
#[derive(Deserialize)]
struct GeneratorUpdate {
    running: Option<bool>,
    rate: Option<u64>,
}

/// Most events per second the dashboard may ask for.
const MAX_RATE: u64 = 1_000_000;

fn no_generator() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "this job has no load generator to control: only `engage demo` runs one",
    )
}

fn generator_state(state: &AppState) -> GeneratorState {
    match &state.generator {
        Some(progress) => GeneratorState {
            available: true,
            running: !progress.paused.load(Ordering::Relaxed),
            rate: progress.target_rate.load(Ordering::Relaxed),
            events: progress.events.load(Ordering::Relaxed),
        },
        None => GeneratorState {
            available: false,
            running: false,
            rate: 0,
            events: 0,
        },
    }
}

async fn generator(State(state): State<AppState>) -> Response {
    Json(generator_state(&state)).into_response()
}

async fn control_generator(
    State(state): State<AppState>,
    Json(update): Json<GeneratorUpdate>,
) -> Response {
    let Some(progress) = &state.generator else {
        return no_generator();
    };
    if let Some(rate) = update.rate {
        if rate == 0 || rate > MAX_RATE {
            return error(
                StatusCode::BAD_REQUEST,
                format!("rate must be between 1 and {MAX_RATE} events per second, not {rate}"),
            );
        }
        progress.target_rate.store(rate, Ordering::Relaxed);
    }
    if let Some(running) = update.running {
        progress.paused.store(!running, Ordering::Relaxed);
    }
    Json(generator_state(&state)).into_response()
}

/// The newest windows written to any windowed sink of the job, newest
/// first, each with its start, end and rows as the sink received them.
async fn windows(
    State(state): State<AppState>,
    Path(sink): Path<String>,
    Query(limit): Query<Limit>,
) -> Response {
    let stats = &state.stats;
    if !has_sink(stats, &sink) {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "this job has no sink table `{sink}`; its tables are: {}",
                stats.sink_names.join(", ")
            ),
        );
    }
    let limit = limit.limit.unwrap_or(1).clamp(1, RecentWindows::KEEP);
    let Some(windows) = stats.windows.newest(&sink, limit) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "`{sink}` has been written no window since the job started (it is not windowed, \
                 or none has closed yet)"
            ),
        );
    };
    let windows: Vec<Value> = windows
        .iter()
        .map(|w| {
            json!({
                "window_start": rfc3339(w.start_micros),
                "window_end": rfc3339(w.end_micros),
                "rows": rows_json(&w.batches),
            })
        })
        .collect();
    Json(json!({ "sink": sink, "windows": windows })).into_response()
}
