//! Freshness markers: single events committed beside the load, and the
//! watchers that see their effects appear (the top-content window end and
//! the recent lists in Redis, the topic through `topic_watch.rs`). See the
//! method in `bench.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::process::JobProcess;
use super::{
    context, lock, topic_watch, BenchError, HOP_SLIDE_MICROS, MARKER_INTERVAL, MARKER_SQL,
    POLL_INTERVAL, RECENT_KEY_PREFIX, RECENT_LENGTH, SEED, TOP_CONTENT_SINK,
};

/// One marker event and when its effects were seen.
pub(super) struct Sample {
    pub(super) id: i64,
    /// `engage:recent:{content_id}`.
    pub(super) key: String,
    pub(super) committed: Instant,
    /// End (Unix µs) of the first hop window that holds the event.
    pub(super) window_end: i64,
    pub(super) top: Option<Duration>,
    pub(super) recent: Option<Duration>,
    /// To a `read_committed` consumer of `engage.enriched_events`.
    pub(super) kafka: Option<Duration>,
}

impl Sample {
    /// Whether every effect watched for was seen (`kafka`: whether the
    /// topic is watched).
    pub(super) fn resolved(&self, kafka: bool) -> bool {
        self.top.is_some() && self.recent.is_some() && (!kafka || self.kafka.is_some())
    }

    /// Whether an entry of `engage:recent:*` (a JSON row) is this event.
    fn is_in(&self, entry: &[u8]) -> bool {
        let needle = format!("\"id\":{},", self.id);
        entry.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

/// End of the first window of slide [`HOP_SLIDE_MICROS`] holding event time `t`.
fn first_window_end(t: i64) -> i64 {
    t.div_euclid(HOP_SLIDE_MICROS) * HOP_SLIDE_MICROS + HOP_SLIDE_MICROS
}

pub(super) async fn insert_marker(db: &Client, content_id: &str) -> Result<Sample, BenchError> {
    let row = db.query_one(MARKER_SQL, &[&content_id]).await;
    let row = row.map_err(context("failed to insert a marker event"))?;
    Ok(Sample {
        committed: Instant::now(),
        id: row.get(0),
        key: format!("{RECENT_KEY_PREFIX}{content_id}"),
        window_end: first_window_end(row.get(1)),
        top: None,
        recent: None,
        kafka: None,
    })
}

/// Commits a marker every [`MARKER_INTERVAL`] until `until`; returns how many.
pub(super) async fn mark(
    db: &Client,
    content: &[String],
    watch: &Watch,
    until: Instant,
) -> Result<u64, BenchError> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut tick = tokio::time::interval(MARKER_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut count = 0;
    loop {
        tick.tick().await;
        if Instant::now() >= until {
            return Ok(count);
        }
        let content_id = &content[rng.random_range(0..content.len())];
        watch.push(insert_marker(db, content_id).await?);
        count += 1;
    }
}

/// The markers of one phase, the task that polls Redis for their effects and
/// the one that consumes the Kafka topic.
pub(super) struct Watch {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<(), BenchError>>,
    /// The topic's consumer, if the job has the mission's Kafka sink.
    topic: Option<JoinHandle<Result<(), String>>>,
}

impl Watch {
    pub(super) async fn start(
        redis: &MultiplexedConnection,
        job: &str,
        kafka_brokers: &str,
    ) -> Result<Watch, BenchError> {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let window_end_key = format!("engage:job:{job}:window_end");
        let polling = poll(redis.clone(), window_end_key, samples.clone(), stop.clone());
        let topic = topic_watch::spawn(kafka_brokers.to_string(), samples.clone(), stop.clone())
            .await
            .map_err(BenchError::Failed)?;
        Ok(Watch {
            samples,
            stop,
            task: tokio::spawn(polling),
            topic,
        })
    }

    pub(super) fn push(&self, sample: Sample) {
        lock(&self.samples).push(sample);
    }

    /// Waits (at most `grace`) until every marker is resolved, stops polling
    /// and returns the markers; fails if the job exits meanwhile.
    pub(super) async fn settle(
        self,
        job: &mut JobProcess,
        grace: Duration,
    ) -> Result<Vec<Sample>, BenchError> {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.task.is_finished() {
            let kafka = self.topic.is_some();
            if lock(&self.samples).iter().all(|s| s.resolved(kafka)) {
                break;
            }
            job.check_running()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        let polled = self.task.await;
        polled.map_err(|e| BenchError::Failed(format!("the redis watcher failed: {e}")))??;
        if let Some(topic) = self.topic {
            topic
                .await
                .map_err(|e| BenchError::Failed(format!("the topic watcher failed: {e}")))?
                .map_err(|e| BenchError::Failed(format!("the topic watcher failed: {e}")))?;
        }
        Ok(std::mem::take(&mut *lock(&self.samples)))
    }
}

/// Polls Redis (one pipeline: the window end, then the list of every marker
/// not seen there yet) every [`POLL_INTERVAL`] until `stop`.
async fn poll(
    mut redis: MultiplexedConnection,
    window_end_key: String,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
) -> Result<(), BenchError> {
    while !stop.load(Ordering::Relaxed) {
        let (known, pending): (usize, Vec<(usize, String)>) = {
            let samples = lock(&samples);
            let pending = samples
                .iter()
                .enumerate()
                .filter(|(_, s)| s.recent.is_none());
            let pending = pending.map(|(i, s)| (i, s.key.clone())).collect();
            (samples.len(), pending)
        };
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(&window_end_key).arg(TOP_CONTENT_SINK);
        for (_, key) in &pending {
            pipe.cmd("LRANGE").arg(key).arg(0).arg(RECENT_LENGTH - 1);
        }
        let replies: Vec<redis::Value> = pipe
            .query_async(&mut redis)
            .await
            .map_err(context("failed to poll redis for marker events"))?;
        let seen = Instant::now();
        let mut replies = replies.into_iter();
        let window_end = replies
            .next()
            .and_then(|v| redis::from_redis_value::<Option<String>>(v).ok().flatten())
            .and_then(|text| text.parse::<i64>().ok());
        resolve(
            &mut lock(&samples)[..known],
            window_end,
            &pending,
            replies,
            seen,
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    Ok(())
}

/// Marks the markers whose effects one poll, answered at `seen`, showed.
fn resolve(
    samples: &mut [Sample],
    window_end: Option<i64>,
    pending: &[(usize, String)],
    lists: impl Iterator<Item = redis::Value>,
    seen: Instant,
) {
    for sample in samples.iter_mut() {
        if sample.top.is_none() && window_end.is_some_and(|end| end >= sample.window_end) {
            sample.top = Some(seen - sample.committed);
        }
    }
    for ((i, _), reply) in pending.iter().zip(lists) {
        let list: Vec<Vec<u8>> = redis::from_redis_value(reply).unwrap_or_default();
        let sample = &mut samples[*i];
        if list.iter().any(|entry| sample.is_in(entry)) {
            sample.recent = Some(seen - sample.committed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_window_end_is_the_next_slide_boundary() {
        assert_eq!(first_window_end(0), 500_000);
        assert_eq!(first_window_end(499_999), 500_000);
        assert_eq!(first_window_end(500_000), 1_000_000);
        let t = 1_700_000_000_123_456;
        assert_eq!(first_window_end(t), 1_700_000_000_500_000);
    }

    #[test]
    fn markers_match_whole_ids_in_json_rows() {
        let sample = Sample {
            id: 12,
            key: String::new(),
            committed: Instant::now(),
            window_end: 0,
            top: None,
            recent: None,
            kafka: None,
        };
        assert!(sample.is_in(br#"{"id":12,"content_id":"x"}"#));
        assert!(!sample.is_in(br#"{"id":123,"content_id":"x"}"#));
    }
}
