//! One batch's POST: the body, the Standard Webhooks headers and signature,
//! and the retries.
//!
//! - `webhook-id` is the batch's id (stable across retries and replays);
//!   `webhook-timestamp` the Unix seconds of the attempt; with a secret,
//!   `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
//! - 2xx: delivered. 429 (after `Retry-After` when it gives seconds), 408,
//!   5xx, a timeout or a connection error: retried with exponential backoff
//!   and jitter, without end (delivery is at least once; a receiver that is
//!   down slows the job, it loses nothing). Any other status (3xx included:
//!   redirects are not followed) means the endpoint refused the batch, which
//!   goes to `dead_letter` with the status and the first KiB of the
//!   response body.
//! - Errors and logs name the sink and the status, never the URL (it may
//!   hold credentials) or a header value.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::WebhookBatch;
use crate::sql::options::WebhookOptions;

/// The first retry waits about this long; each next one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Retries wait at most this long (and a `Retry-After` is capped to it).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How much of a refusing response's body the dead letter keeps.
const RESPONSE_KEPT: usize = 1024;

/// How a batch's delivery ended.
#[derive(Debug)]
pub enum Outcome {
    Delivered,
    /// The endpoint answered with a status that retrying cannot change.
    Refused {
        status: u16,
        response: String,
    },
}

/// The request body: one JSON object when the sink sends one row per
/// request, a JSON array otherwise.
pub fn body(batch: &WebhookBatch, one_per_request: bool) -> String {
    if one_per_request && batch.rows.len() == 1 {
        return batch.rows[0].json.clone();
    }
    let length = batch.rows.iter().map(|r| r.json.len() + 1).sum::<usize>() + 2;
    let mut body = String::with_capacity(length);
    body.push('[');
    for (i, row) in batch.rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&row.json);
    }
    body.push(']');
    body
}

/// The `webhook-signature` header's value for one attempt.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// Posts `batch` until the endpoint accepts or refuses it. `sink` names the
/// sink in logs.
pub async fn deliver(
    client: reqwest::Client,
    options: std::sync::Arc<WebhookOptions>,
    sink: String,
    batch: std::sync::Arc<WebhookBatch>,
) -> Outcome {
    let body = body(&batch, options.batch_size == 1);
    let mut attempt: u32 = 0;
    loop {
        let timestamp = chrono::Utc::now().timestamp();
        let mut request = client
            .post(options.endpoint.expose())
            .timeout(options.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &batch.id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(key) = &options.secret {
            request = request.header(
                "webhook-signature",
                signature(&key.0, &batch.id, timestamp, &body),
            );
        }
        for header in &options.headers {
            request = request.header(&header.name, &header.value);
        }
        let wait = match request.body(body.clone()).send().await {
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    return Outcome::Delivered;
                }
                let code = status.as_u16();
                if code == 429 || code == 408 || status.is_server_error() {
                    let after = retry_after(response.headers());
                    tracing::warn!(sink = %sink, id = %batch.id, status = code, attempt, "webhook endpoint answered {code}; retrying");
                    after.unwrap_or_else(|| backoff(attempt))
                } else {
                    let response = first_kib(response).await;
                    tracing::warn!(sink = %sink, id = %batch.id, status = code, "webhook endpoint refused a batch; its rows go to dead_letter");
                    return Outcome::Refused {
                        status: code,
                        response,
                    };
                }
            }
            Err(error) => {
                // `without_url`: the URL may hold credentials.
                let error = error.without_url();
                tracing::warn!(sink = %sink, id = %batch.id, attempt, error = %error, "webhook request failed; retrying");
                backoff(attempt)
            }
        };
        tokio::time::sleep(wait).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Exponential backoff with jitter: a random wait in [d/2, d], where d
/// doubles from [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`].
fn backoff(attempt: u32) -> Duration {
    let full = FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF);
    let half = full / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// `Retry-After` in seconds (the HTTP-date form falls back to backoff).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_BACKOFF))
}

/// The first KiB of a response's body, as text (cut at a character boundary).
async fn first_kib(response: reqwest::Response) -> String {
    let bytes = response.bytes().await.unwrap_or_default();
    let kept = &bytes[..bytes.len().min(RESPONSE_KEPT)];
    let text = String::from_utf8_lossy(kept);
    text.trim_end_matches('\u{fffd}').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // Standard Webhooks' own example; PyPI's `standardwebhooks` 1.3.0
        // signs it to the same value.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let signed = signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(signed, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        // The test vector of the specification's Rust library (`test_sign`).
        let key = base64::engine::general_purpose::STANDARD
            .decode("C2FVsBQIhrscChlQIMV+b5sSYspob7oD")
            .unwrap();
        let signed = signature(
            &key,
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            r#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(signed, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for attempt in 0..40 {
            let full = FIRST_BACKOFF
                .saturating_mul(1u32 << attempt.min(16))
                .min(MAX_BACKOFF);
            let wait = backoff(attempt);
            assert!(wait >= full / 2 && wait <= full, "{attempt}: {wait:?}");
        }
    }
}
