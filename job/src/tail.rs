//! `engage tail TOPIC`: prints a Kafka topic's committed messages, so a user
//! can watch `engage.enriched_events` without a separate tool. It reads as a
//! downstream consumer would (`isolation.level = read_committed`), assigns
//! every partition itself (no consumer group, nothing committed to the
//! broker), and follows the topic until Ctrl-C, `--count` messages, or, with
//! `--until-end`, until it has read to the end of every partition.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::Offset;

use crate::change::Position;
use crate::sink::kafka::topic;

/// What to read and how to print it.
#[derive(Debug, Clone, clap::Args)]
pub struct TailOptions {
    /// The topic, e.g. engage.enriched_events.
    pub topic: String,
    /// Broker addresses, host:port[,host:port...].
    #[arg(long, env = "ENGAGE_KAFKA_BROKERS")]
    pub brokers: String,
    /// Start at each partition's first message (default: only new messages).
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop once every partition is read to its end.
    #[arg(long)]
    pub until_end: bool,
    /// Print `partition offset key position` before each value, tab-separated.
    #[arg(long)]
    pub metadata: bool,
}

/// One message read back.
#[derive(Debug, Clone, PartialEq)]
pub struct TailMessage {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The engage position header, if the message has one.
    pub position: Option<Position>,
    pub value: Option<String>,
}

/// Reads committed messages of `topic` per `options` (its `topic` and
/// `brokers` are the ones used), handing each to `each`; stops when the
/// options say so or `each` returns false. Returns how many were read.
pub fn read(
    options: &TailOptions,
    mut each: impl FnMut(TailMessage) -> bool,
) -> Result<u64, String> {
    let config = topic::client_config(&options.brokers, &BTreeMap::new(), true);
    let partitions =
        topic::partitions(&config, &options.brokers, &options.topic)?.ok_or_else(|| {
            format!(
                "topic `{}` does not exist on {} (a job's kafka sink creates it when it starts)",
                options.topic, options.brokers
            )
        })?;
    let consumer = topic::committed_reader(&config, &options.brokers, "engage-tail")?;
    let start = if options.from_beginning {
        Offset::Beginning
    } else {
        Offset::End
    };
    topic::assign(
        &consumer,
        &options.topic,
        (0..partitions).map(|p| (p, start)),
    )?;
    // Partitions whose end the reader has not reached yet (`--until-end`).
    // The end is where a fetch reports the partition's end (partition EOF),
    // never an offset from ListOffsets, which some brokers (Tansu 0.6)
    // under-report.
    let mut open: Vec<bool> = vec![true; partitions as usize];
    let mut read = 0;
    let mut last_progress = Instant::now();
    loop {
        if options.count.is_some_and(|n| read >= n) {
            break;
        }
        if options.until_end && !open.contains(&true) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                if options.until_end && last_progress.elapsed() > topic::REQUEST_TIMEOUT {
                    return Err(format!(
                        "no progress reading `{}` for {:?}: a transaction may be open on it",
                        options.topic,
                        topic::REQUEST_TIMEOUT
                    ));
                }
            }
            Some(Ok(message)) => {
                last_progress = Instant::now();
                let text =
                    |bytes: Option<&[u8]>| bytes.map(|b| String::from_utf8_lossy(b).into_owned());
                let tailed = TailMessage {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: text(message.key()),
                    position: topic::position_of(&message),
                    value: text(message.payload()),
                };
                read += 1;
                if !each(tailed) {
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                last_progress = Instant::now();
                if let Some(flag) = open.get_mut(p as usize) {
                    *flag = false;
                }
            }
            Some(Err(error)) => return Err(format!("reading `{}`: {error}", options.topic)),
        }
    }
    Ok(read)
}

/// Every committed message of `topic` on `brokers`, from the beginning to
/// the end of every partition (for checks and tests).
pub fn read_all(brokers: &str, topic: &str) -> Result<Vec<TailMessage>, String> {
    let options = TailOptions {
        topic: topic.to_string(),
        brokers: brokers.to_string(),
        from_beginning: true,
        count: None,
        until_end: true,
        metadata: false,
    };
    let mut messages = Vec::new();
    read(&options, |message| {
        messages.push(message);
        true
    })?;
    Ok(messages)
}

/// `engage tail`: prints each message's value (a tombstone prints `null`),
/// one per line, with `--metadata` its partition, offset, key and position first.
pub fn run(options: &TailOptions) -> Result<u64, String> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    read(options, |message| {
        let printed = if options.metadata {
            writeln!(
                out,
                "{}\t{}\t{}\t{}\t{}",
                message.partition,
                message.offset,
                message.key.as_deref().unwrap_or("-"),
                message.position.map_or("-".to_string(), |p| p.to_string()),
                message.value.as_deref().unwrap_or("null")
            )
        } else {
            writeln!(out, "{}", message.value.as_deref().unwrap_or("null"))
        };
        // A closed pipe (`| head`) ends the tail quietly.
        printed.is_ok()
    })
}
