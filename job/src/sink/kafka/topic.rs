//! What a Kafka sink asks its topic, outside the produce path: its partitions
//! (creating the topic if it does not exist), each partition's offsets, and
//! the position header of each partition's newest message. Also the reader
//! behind `engage tail`.
//!
//! librdkafka's calls here block (they wait on the broker); async callers run
//! them with `spawn_blocking`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::encode::POSITION_HEADER;
use crate::change::Position;

/// How long a metadata or offsets request may wait for the broker.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Producer settings librdkafka would take as consumer settings with a
/// warning in the log; left out of consumers built from a sink's settings.
const PRODUCER_ONLY: &[&str] = &[
    "compression.type",
    "compression.codec",
    "compression.level",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "batch.num.messages",
    "batch.size",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "retries",
    "message.send.max.retries",
    "retry.backoff.ms",
    "request.required.acks",
    "partitioner",
];

/// The context of engage's consumers: reaching the end of a partition is
/// what they wait for, not an error to log (librdkafka reports it as one).
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::trace!("librdkafka: {error}: {reason}");
        } else {
            tracing::warn!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// A consumer of engage's own, quiet about partition ends.
pub fn reader(
    config: &ClientConfig,
    bootstrap: &str,
) -> Result<BaseConsumer<ReaderContext>, String> {
    config
        .create_with_context(ReaderContext)
        .map_err(|e| unreachable(bootstrap, e))
}

/// A `read_committed` consumer of engage's own, reporting partition ends:
/// nothing is committed to the broker (`group` only names it there), and it
/// reads the partitions [`assign`] gives it.
pub fn committed_reader(
    config: &ClientConfig,
    bootstrap: &str,
    group: &str,
) -> Result<BaseConsumer<ReaderContext>, String> {
    let mut config = config.clone();
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("group.id", group);
    reader(&config, bootstrap)
}

/// Assigns `consumer` each `(partition, start)` of `topic`.
pub fn assign(
    consumer: &BaseConsumer<ReaderContext>,
    topic: &str,
    starts: impl IntoIterator<Item = (i32, Offset)>,
) -> Result<(), String> {
    let mut assignment = TopicPartitionList::new();
    for (partition, start) in starts {
        assignment
            .add_partition_offset(topic, partition, start)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())
}

/// A client configuration for the brokers at `bootstrap` with the user's
/// `kafka.*` settings; `consumer` drops the producer-only ones.
pub fn client_config(
    bootstrap: &str,
    settings: &BTreeMap<String, String>,
    consumer: bool,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    // librdkafka logs every failed connection attempt at error level; the
    // sink reports what matters itself.
    config.set("log_level", "3");
    for (key, value) in settings {
        if consumer && PRODUCER_ONLY.contains(&key.as_str()) {
            continue;
        }
        config.set(key, value);
    }
    config
}

/// Why the topic could not be examined, in words that say what to do.
fn unreachable(bootstrap: &str, error: KafkaError) -> String {
    format!(
        "cannot reach the kafka brokers at {bootstrap}: {error}; check `bootstrap_servers` \
         (ENGAGE_KAFKA_BROKERS in the mission SQL) and that a broker listens there"
    )
}

/// Whether a broker at `bootstrap` answers within a second (for a sink that
/// could not even open). `topic` is not asked for: a broker that came back
/// without it answers too, and the restarted run finds the sink lost.
pub fn answers(bootstrap: &str, settings: &BTreeMap<String, String>, _topic: &str) -> bool {
    let Ok(consumer) = client_config(bootstrap, settings, true).create::<BaseConsumer>() else {
        return false;
    };
    broker_answers(&consumer)
}

/// Whether a broker answers a metadata request (for no topic in particular)
/// within a second, naming at least one broker.
pub fn broker_answers<C: rdkafka::consumer::ConsumerContext>(client: &BaseConsumer<C>) -> bool {
    client
        .fetch_metadata(None, Duration::from_secs(1))
        .is_ok_and(|metadata| !metadata.brokers().is_empty())
}

/// The partition count of `topic`, or `None` if it does not exist.
pub fn partitions(
    config: &ClientConfig,
    bootstrap: &str,
    topic: &str,
) -> Result<Option<i32>, String> {
    let consumer: BaseConsumer = config.create().map_err(|e| unreachable(bootstrap, e))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| unreachable(bootstrap, e))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match found.error() {
        None if !found.partitions().is_empty() => Ok(Some(found.partitions().len() as i32)),
        None => Ok(None),
        Some(code) => match RDKafkaErrorCode::from(code) {
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => Ok(None),
            other => Err(format!(
                "kafka reports topic `{topic}` as unusable: {other}"
            )),
        },
    }
}

/// Creates `topic` with `count` partitions (the broker's default replication)
/// and waits until the brokers report it.
pub async fn create(
    config: &ClientConfig,
    bootstrap: &str,
    topic: &str,
    count: i32,
) -> Result<i32, String> {
    let admin: AdminClient<DefaultClientContext> =
        config.create().map_err(|e| unreachable(bootstrap, e))?;
    let new = NewTopic::new(topic, count, TopicReplication::Fixed(-1));
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    let results = admin
        .create_topics([&new], &options)
        .await
        .map_err(|e| unreachable(bootstrap, e))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(format!(
                    "topic `{topic}` does not exist and creating it failed: {code}; create it yourself \
                     (and give the job's principal permission to write it), or fix the broker's settings"
                ))
            }
        }
    }
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let (config, bootstrap, name) = (config.clone(), bootstrap.to_string(), topic.to_string());
        let found = tokio::task::spawn_blocking(move || partitions(&config, &bootstrap, &name))
            .await
            .map_err(|e| e.to_string())??;
        if let Some(count) = found {
            return Ok(count);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "created topic `{topic}`, but the brokers did not report it within {REQUEST_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A consumer that asks for partitions' physical ends: `read_uncommitted`,
/// since a `read_committed` ListOffsets answers the last stable offset, which
/// an open transaction holds back (and which Tansu 0.6 reports as 0 for a
/// topic written in transactions).
pub fn offsets_reader(
    config: &ClientConfig,
    bootstrap: &str,
) -> Result<BaseConsumer<ReaderContext>, String> {
    let mut config = config.clone();
    config
        .set("isolation.level", "read_uncommitted")
        .set("group.id", "engage-offsets");
    reader(&config, bootstrap)
}

/// Each partition's `(low, high)` offsets: the first offset it holds and the
/// next one it will write. `consumer` is an [`offsets_reader`].
pub fn watermarks(
    consumer: &BaseConsumer<ReaderContext>,
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> Result<Vec<(i64, i64)>, String> {
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
                .map_err(|e| unreachable(bootstrap, e))
        })
        .collect()
}

/// How many messages before a partition's end the position probe starts
/// reading: past any transaction markers another client may have left.
const PROBE_BACK: i64 = 16;

/// The position of the newest message engage wrote to each partition
/// (`Position::ZERO` for an empty partition), read from its
/// [`POSITION_HEADER`]. `offsets` are the partitions' [`watermarks`]. A
/// partition whose newest message has no such header was written by
/// something else: an error, since the sink could not tell what it holds.
///
/// Each partition is read from a little before its reported end *until the
/// fetch says it reached the end* (partition EOF), not until the reported
/// end: Tansu 0.6 reports, in ListOffsets, the base offset of the last batch
/// plus one rather than the end (seen here: 1 for a partition holding 3
/// messages written in one batch), while its fetches return every message.
pub fn newest_positions(
    config: &ClientConfig,
    bootstrap: &str,
    topic: &str,
    offsets: &[(i64, i64)],
) -> Result<Vec<Position>, String> {
    let mut newest = vec![Position::ZERO; offsets.len()];
    let mut pending: Vec<bool> = offsets.iter().map(|(low, high)| high > low).collect();
    if !pending.contains(&true) {
        return Ok(newest);
    }
    // What a downstream consumer sees: on a broker that hides aborted
    // transactions, their messages are not held and are sent again.
    // The probe ends at each partition's end (PartitionEOF), which a fetch
    // reports only after waiting `fetch.wait.max.ms` for more data (500 ms
    // by default): every job start paid that. The tail is there already.
    let mut config = config.clone();
    config.set("fetch.wait.max.ms", "10");
    let consumer = committed_reader(&config, bootstrap, "engage-position-probe")?;
    let starts = offsets
        .iter()
        .enumerate()
        .filter(|(p, _)| pending[*p])
        .map(|(p, (low, high))| (p as i32, Offset::Offset((*high - PROBE_BACK).max(*low))));
    assign(&consumer, topic, starts)?;
    let mut headerless: Vec<bool> = vec![false; offsets.len()];
    let mut last_offset: Vec<i64> = vec![-1; offsets.len()];
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    while pending.contains(&true) {
        if Instant::now() > deadline {
            return Err(format!(
                "could not read the newest messages of topic `{topic}` within {REQUEST_TIMEOUT:?}"
            ));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                let p = message.partition() as usize;
                last_offset[p] = message.offset();
                if p < newest.len() {
                    match position_of(&message) {
                        Some(position) => {
                            newest[p] = newest[p].max(position);
                            headerless[p] = false;
                        }
                        None => headerless[p] = true,
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(flag) = pending.get_mut(p as usize) {
                    *flag = false;
                }
            }
            Some(Err(error)) => return Err(unreachable(bootstrap, error)),
        }
    }
    tracing::debug!(
        topic,
        ?offsets,
        ?last_offset,
        ?newest,
        "newest positions read"
    );
    if let Some(p) = headerless.iter().position(|h| *h) {
        return Err(format!(
            "the newest message of topic `{topic}` partition {p} has no `{POSITION_HEADER}` header: \
             something other than engage writes to this topic. A kafka sink needs a topic of its own \
             (it reads back what it wrote to skip it after a restart)"
        ));
    }
    Ok(newest)
}

/// The position header of `message`, if it has a valid one.
pub fn position_of(message: &BorrowedMessage<'_>) -> Option<Position> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == POSITION_HEADER)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(Position::from_sortable)
}
