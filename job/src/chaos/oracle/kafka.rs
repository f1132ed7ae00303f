//! `enriched_events_topic`: the Kafka topic `engage.enriched_events`, read as
//! a downstream consumer reads it (`read_committed`), must hold every change
//! exactly once with every column equal, like the Parquet table, and each
//! content item's changes in commit order.

use std::collections::HashMap;

use super::model::{Enriched, Expected};
use super::{compare_changes, SinkCheck};
use crate::chaos::{context, ChaosError};
use crate::tail;

/// The mission SQL's topic (a contract).
pub const TOPIC: &str = "engage.enriched_events";

/// The position (`_lsn`, `_seq`) and offset of a key's last message.
type LastOfKey = ((i64, i64), i64);

pub(super) async fn enriched_topic(
    brokers: &str,
    expected: &Expected,
) -> Result<SinkCheck, ChaosError> {
    let brokers = brokers.to_string();
    let messages = tokio::task::spawn_blocking(move || tail::read_all(&brokers, TOPIC))
        .await
        .map_err(context("the topic reader failed"))?
        .map_err(ChaosError::Failed)?;

    let mut found: HashMap<i64, Vec<(i64, i64, Enriched)>> = HashMap::new();
    let mut out_of_order = 0;
    let mut first_disorder = String::new();
    // Per (partition, key): the position and offset of its last message, in
    // offset order.
    let mut last: HashMap<(i32, Option<String>), LastOfKey> = HashMap::new();
    for message in &messages {
        let value = message.value.as_deref().unwrap_or("null");
        let row: serde_json::Value = serde_json::from_str(value)
            .map_err(context(format!("a message is not JSON: {value}")))?;
        let change = parse(&row)
            .ok_or_else(|| ChaosError::Failed(format!("a message lacks columns: {value}")))?;
        let key = (message.partition, message.key.clone());
        let position = (change.0, change.1);
        if let Some((previous, at)) = last.insert(key, (position, message.offset)) {
            if previous >= position {
                out_of_order += 1;
                if first_disorder.is_empty() {
                    first_disorder = format!(
                        "key {:?}: a change at {position:?} (offset {}) follows one at {previous:?} (offset {at})",
                        message.key, message.offset
                    );
                }
            }
        }
        if message.key.as_deref() != change.2.content_id.as_deref() {
            out_of_order += 1;
            first_disorder = format!("event {} has key {:?}", change.2.id, message.key);
        }
        found.entry(change.2.id).or_default().push(change);
    }
    let mut check = compare_changes("enriched_events_topic", found, expected);
    if out_of_order > 0 {
        check.other += out_of_order;
        check.note = format!("{first_disorder}; {}", check.note);
    }
    Ok(check)
}

/// `(lsn, seq, change)` from one message's JSON row.
fn parse(row: &serde_json::Value) -> Option<(i64, i64, Enriched)> {
    let text = |name: &str| row.get(name)?.as_str().map(str::to_string);
    let int = |name: &str| row.get(name)?.as_i64();
    let float = |name: &str| row.get(name)?.as_f64();
    let op = match row.get("_op")?.as_str()? {
        "c" => "c",
        "u" => "u",
        "d" => "d",
        _ => "?",
    };
    let event_ts = match row.get("event_ts")?.as_str() {
        Some(time) => chrono::DateTime::parse_from_rfc3339(time)
            .ok()?
            .timestamp_micros(),
        None => 0,
    };
    Some((
        int("_lsn")?,
        int("_seq")?,
        Enriched {
            op,
            id: int("id")?,
            content_id: text("content_id"),
            user_id: text("user_id"),
            event_type: text("event_type"),
            event_ts,
            duration_ms: int("duration_ms"),
            device: text("device"),
            content_type: text("content_type"),
            length_seconds: int("length_seconds"),
            engagement_seconds: float("engagement_seconds"),
            engagement_pct: float("engagement_pct"),
        },
    ))
}
