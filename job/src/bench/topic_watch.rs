//! Times marker events to a `read_committed` consumer of the mission's Kafka
//! topic, `engage.enriched_events`: the moment a consumer could act on them.
//!
//! A thread of its own runs one consumer (librdkafka's calls block), assigned
//! every partition at its end when the phase starts. For each message it reads
//! the id at the front of the row (`{"id":N,...`, the first column of
//! `enriched`) and resolves the marker with that id, if any.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use rdkafka::Offset;

use super::lock;
use super::markers::Sample;
use crate::sink::kafka::topic;

/// The mission's topic (a contract).
pub(super) const TOPIC: &str = "engage.enriched_events";

/// Consumes [`TOPIC`] until `stop`, setting each marker's `kafka` freshness.
/// Returns once the consumer is assigned at the partitions' ends; `None` if
/// the topic does not exist (a `--sql` without the mission's Kafka sink).
pub(super) async fn spawn(
    brokers: String,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
) -> Result<Option<tokio::task::JoinHandle<Result<(), String>>>, String> {
    let exists = {
        let brokers = brokers.clone();
        tokio::task::spawn_blocking(move || {
            let config = topic::client_config(&brokers, &Default::default(), true);
            topic::partitions(&config, &brokers, TOPIC)
        })
        .await
        .map_err(|e| e.to_string())??
    };
    let Some(partitions) = exists else {
        return Ok(None);
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::task::spawn_blocking(move || {
        let mut config = topic::client_config(&brokers, &Default::default(), true);
        config.set("fetch.wait.max.ms", "5");
        let consumer = topic::committed_reader(&config, &brokers, "engage-bench")?;
        topic::assign(&consumer, TOPIC, (0..partitions).map(|p| (p, Offset::End)))?;
        // The first poll resolves the end offsets.
        let _ = consumer.poll(Duration::from_millis(100));
        let _ = ready_tx.send(());
        while !stop.load(Ordering::Relaxed) {
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(20)) else {
                continue;
            };
            let seen = Instant::now();
            let Some(id) = message.payload().and_then(leading_id) else {
                continue;
            };
            let mut samples = lock(&samples);
            if let Some(sample) = samples.iter_mut().find(|s| s.id == id && s.kafka.is_none()) {
                sample.kafka = Some(seen - sample.committed);
            }
        }
        Ok(())
    });
    if ready_rx.await.is_err() {
        // The task ended before it was ready: its error says why.
        return match task.await {
            Ok(Err(error)) => Err(error),
            _ => Err("the topic watcher stopped before it started".into()),
        };
    }
    Ok(Some(task))
}

/// `N` of a row that starts `{"id":N,`.
fn leading_id(row: &[u8]) -> Option<i64> {
    let rest = row.strip_prefix(b"{\"id\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_leading_id_is_read_from_the_front_of_a_row() {
        assert_eq!(super::leading_id(b"{\"id\":42,\"x\":1}"), Some(42));
        assert_eq!(super::leading_id(b"{\"x\":1}"), None);
    }
}
