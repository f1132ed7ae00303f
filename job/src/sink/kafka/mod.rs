//! The Kafka sink: one message per change, exactly once to any consumer, on
//! any Kafka-protocol broker.
//!
//! # Why every change reaches the topic exactly once
//!
//! The argument does not rest on the broker hiding aborted transactions
//! (our test broker, Tansu 0.6, shows them to `read_committed` consumers).
//! It rests on five facts:
//!
//! 1. **One writer per topic**, and every message carries its change's source
//!    position (commit LSN, index in transaction) in the
//!    [`encode::POSITION_HEADER`] header. The sink chooses each message's
//!    partition itself ([`encode::partition`]), from its key.
//! 2. **The sink sends messages in position order.** Writes come in position
//!    order (the sink contract in `sink/mod.rs`), and the sink sorts each
//!    write's rows by position (a query's output need not keep its input's
//!    order: a hash join may permute a batch). The producer is idempotent
//!    (`enable.idempotence=true`): retries neither duplicate nor reorder, so
//!    each partition's log is, per producer session, a *prefix* of what was
//!    sent to it, in order.
//! 3. **A new session fences the old one.** The producer has a stable
//!    `transactional.id` (`engage.<job>.<sink>`); opening the sink calls
//!    `init_transactions`, which ends the previous session's open
//!    transaction and makes the broker refuse any request of it still on its
//!    way (a process killed with requests in its socket sends them anyway).
//!    After the fence, nothing of an earlier session can land in the topic.
//! 4. **A checkpoint records the sink's position only after every message
//!    sent before the barrier was committed** (`prepare_checkpoint` commits
//!    the open transaction, which flushes, and fails on any failed
//!    delivery). So everything at or below a checkpoint's position is in
//!    the topic.
//! 5. After a crash the job restores the last checkpoint and the source sends
//!    everything after it again. **After the fence, the sink reads the last
//!    messages of each partition as a `read_committed` consumer sees them**
//!    and drops, per partition, every change at or below the highest
//!    position there. By (2) and (3), the partition holds, as consumers see
//!    it, every change sent to it up to that position and none after it; by
//!    (4), everything before the restored checkpoint is there too. So each
//!    change is seen once: a change consumers see is dropped, one they do
//!    not see is sent. On a broker that hides aborted transactions, their
//!    messages are not seen by the probe either, and are sent again; on one
//!    that shows them (Tansu), the probe sees them too and they are not.
//!
//! Messages are sent in transactions committed every [`COMMIT_EVERY`] (at
//! the next write, or when no write comes for a moment) and at every
//! checkpoint, so a `read_committed` consumer sees a change within
//! about that long, and never a part of a transaction a crash cut short on a
//! broker that hides those.
//!
//! A consumer therefore sees every change once, in commit order per key
//! (one key, one partition). `sink.commit_mode = 'at_least_once'` uses no
//! transactions and skips steps 3 and 5: after a crash, changes after the
//! last checkpoint may be sent twice.
//!
//! **A broker that lost the topic's data** (a restart with memory storage, a
//! deleted topic) is detected at open: a partition ending below the offset
//! the checkpoint recorded for it (or gone) makes the sink *lost*, as a Redis
//! that lost its keys; the engine then rebuilds it from the captured changes
//! if retention reaches back far enough, and otherwise stops and says so.
//! While the job runs, each checkpoint compares the partitions' ends with
//! the previous ones: an end that went back fails the run with
//! [`SinkError::Lost`], and the restart finds the sink lost as above. It
//! never resumes silently onto an emptied topic.
//!
//! **Backpressure**: librdkafka's queue is bounded
//! (`queue.buffering.max.kbytes`, 64 MiB unless set); when it is full the
//! sink waits, its task's channel fills, and the job slows down.
//!
//! **A broker that does not answer** does not stall the other sinks: once a
//! transaction commit, a checkpoint's flush or a full queue has waited
//! [`MIN_RETRY_BUDGET`], the sink's task *detaches* the sink (`sink/task.rs`),
//! as it does a Redis sink. Its checkpoints then record what the topic holds
//! for sure, the last committed transaction's position ([`KafkaSink::held_state`]),
//! so (4) still holds; after each checkpoint the task asks a broker for the
//! topic's metadata, and once one answers the run restarts: the sink opens
//! as a new session (3), finds itself detached in the checkpoint, and is
//! caught up from the captured changes after that position, with (5)
//! dropping what did reach the topic. A delivery that fails outright
//! (`message.timeout.ms`) fails the run, which restarts from the last
//! checkpoint.

pub mod encode;
pub mod topic;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use self::encode::{Columns, EncodedBatch, SourceInfo, POSITION_HEADER};
use super::{SinkError, SinkState};
use crate::change::Position;
use crate::sql::options::{CommitMode, KafkaOptions};
use crate::sql::plan::QueryPlan;

/// Producer settings the sink uses unless the job's `kafka.<setting>`
/// options set one of their names (a setting, then its aliases): the queue
/// bound, and how long a message may wait to fill a batch. With
/// librdkafka's own 5 ms linger its broker thread cost a fifth of the job's
/// CPU in a drain, sending many small requests; a transaction commit (every
/// [`COMMIT_EVERY`]) sends what waits at once, so a longer linger adds no
/// latency with `exactly_once` (with `at_least_once`, up to 50 ms).
const PRODUCER_DEFAULTS: &[(&[&str], &str)] = &[
    (&["queue.buffering.max.kbytes"], "65536"),
    (&["linger.ms", "queue.buffering.max.ms"], "50"),
];
/// How long the sink waits between attempts to enqueue into a full queue.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(2);
/// How long one flush waits before the sink logs that it still waits.
const FLUSH_WAIT: Duration = Duration::from_secs(10);
/// Exactly-once: how long a transaction stays open before the next write
/// commits it, bounding how long a consumer waits for a change.
const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// How long a transaction commit may take.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// A commit that takes longer than this is retried, after checking that the
/// broker did not come back without the topic's data (a transaction
/// coordinator that restarted empty never answers the commit).
const COMMIT_ATTEMPT: Duration = Duration::from_secs(3);
/// The least time a detachable sink waits for the broker before it reports
/// it unreachable: a transaction commit under load takes a good part of a
/// second, so Redis' 1 s would detach a healthy sink.
pub const MIN_RETRY_BUDGET: Duration = Duration::from_secs(5);

/// The transactional id of sink `sink` of job `job`: stable across restarts,
/// so a new instance fences the previous one.
fn transactional_id(job: &str, sink: &str) -> String {
    format!("engage.{job}.{sink}")
}

/// What the producer's delivery reports tell the sink.
#[derive(Default)]
struct Deliveries {
    /// The first failed delivery, if any: the run must restart.
    failed: Mutex<Option<String>>,
}

/// The producer's context: records each delivery report.
struct Reports(Arc<Deliveries>);

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            let mut failed = self.0.failed.lock().unwrap_or_else(|e| e.into_inner());
            if failed.is_none() {
                *failed = Some(format!(
                    "delivery to partition {} failed: {error}",
                    message.partition()
                ));
            }
        }
    }
}

pub struct KafkaSink {
    name: String,
    options: KafkaOptions,
    producer: ThreadedProducer<Reports>,
    /// Asks the partitions' ends (`read_uncommitted`).
    reader: Arc<BaseConsumer<topic::ReaderContext>>,
    deliveries: Arc<Deliveries>,
    partitions: i32,
    columns: Columns,
    source: SourceInfo,
    /// Exactly-once: per partition, the position of the newest message the
    /// topic held when the sink opened; changes at or below it are dropped.
    held: Vec<Position>,
    /// The highest of `held`: above it, nothing is dropped.
    held_max: Position,
    /// Each partition's end at the last checkpoint (or at open): a later
    /// end below it means the broker lost data while the job ran.
    ends: Vec<i64>,
    position: Position,
    /// `read_committed` consumers see every change up to here.
    visible: Position,
    lost: bool,
    rows_written: u64,
    /// Changes dropped because the topic held them already.
    skipped: u64,
    /// Whether `skipped` was reported (once, at the first checkpoint).
    skip_reported: bool,
    /// Exactly-once: when the open transaction began (`None`: none open).
    transaction: Option<Instant>,
    /// How long a commit, a flush or a full queue may hold the sink before
    /// it reports the broker unreachable (`None`: wait; see
    /// [`KafkaSink::set_retry_budget`]).
    retry_budget: Option<Duration>,
    transactional_id: String,
    value: Vec<u8>,
}

impl KafkaSink {
    /// Opens the sink: finds (or creates) the topic, checks it still holds
    /// what the checkpoint `restored` recorded, and reads the newest position
    /// of each partition. `source` names the driving table for Debezium's
    /// `source` block.
    pub async fn open(
        job: &str,
        name: &str,
        options: &KafkaOptions,
        query: &QueryPlan,
        source: SourceInfo,
        restored: Option<&SinkState>,
    ) -> Result<KafkaSink, SinkError> {
        let permanent = |message: String| SinkError::Permanent {
            sink: name.to_string(),
            message,
        };
        let transient = |message: String| SinkError::Transient {
            sink: name.to_string(),
            message,
        };
        let columns = Columns::find(
            &query.output_schema,
            options.key_field.as_deref(),
            query.time_column,
        )
        .map_err(permanent)?;
        let bootstrap = options.bootstrap_servers.clone();
        let consumer_config = topic::client_config(&bootstrap, &options.client.0, true);

        let probe = {
            let (config, bootstrap, name) = (
                consumer_config.clone(),
                bootstrap.clone(),
                options.topic.clone(),
            );
            tokio::task::spawn_blocking(move || topic::partitions(&config, &bootstrap, &name))
        };
        let found = probe
            .await
            .map_err(|e| permanent(e.to_string()))?
            .map_err(transient)?;
        let recorded = restored.map(|s| s.offsets.as_slice()).unwrap_or_default();
        let partitions = match found {
            Some(count) => count,
            None => {
                if recorded.iter().any(|&end| end > 0) {
                    // The topic held our messages at the last checkpoint and
                    // is gone: lost (found below), like a Redis that lost its keys.
                    tracing::warn!(sink = %name, topic = %options.topic, "the kafka topic the sink wrote is gone");
                }
                tracing::info!(sink = %name, topic = %options.topic, partitions = options.partitions, "creating kafka topic");
                let created = topic::create(
                    &consumer_config,
                    &bootstrap,
                    &options.topic,
                    options.partitions,
                );
                created.await.map_err(permanent)?
            }
        };
        let reader =
            Arc::new(topic::offsets_reader(&consumer_config, &bootstrap).map_err(transient)?);
        let offsets = {
            let (reader, bootstrap, name) =
                (reader.clone(), bootstrap.clone(), options.topic.clone());
            tokio::task::spawn_blocking(move || {
                topic::watermarks(&reader, &bootstrap, &name, partitions)
            })
            .await
            .map_err(|e| permanent(e.to_string()))?
            .map_err(transient)?
        };
        let shrunk = recorded
            .iter()
            .enumerate()
            .find(|(p, &end)| offsets.get(*p).map_or(end > 0, |(_, high)| *high < end));
        // A sink detached while the broker was unreachable missed writes:
        // caught up from the checkpoints like a lost one, from its position.
        let behind = restored.is_some_and(|restored| restored.detached);
        let lost = shrunk.is_some() || behind;
        if behind && shrunk.is_none() {
            tracing::warn!(
                sink = %name,
                topic = %options.topic,
                "this sink was detached while the kafka broker was unreachable; the job catches it up from its checkpoints"
            );
        }
        if let Some((p, end)) = shrunk {
            tracing::warn!(
                sink = %name,
                topic = %options.topic,
                partition = p,
                recorded_end = end,
                end = offsets.get(p).map_or(0, |o| o.1),
                "the kafka topic holds less than the last checkpoint recorded: the broker lost its data"
            );
        }
        let deliveries = Arc::new(Deliveries::default());
        let mut config = topic::client_config(&bootstrap, &options.client.0, false);
        config
            .set("enable.idempotence", "true")
            .set("client.id", format!("engage-{job}-{name}"));
        let exactly_once = options.commit_mode == CommitMode::ExactlyOnce;
        if exactly_once {
            config.set("transactional.id", transactional_id(job, name));
        }
        for (names, value) in PRODUCER_DEFAULTS {
            if !names
                .iter()
                .any(|name| options.client.0.contains_key(*name))
            {
                config.set(names[0], *value);
            }
        }
        let producer: ThreadedProducer<Reports> = config
            .create_with_context(Reports(deliveries.clone()))
            .map_err(|e| permanent(format!("cannot create a kafka producer: {e}")))?;
        if exactly_once {
            // Fences every earlier instance of this sink: its open
            // transaction is aborted, and a request of it still on its way
            // (a process killed with requests in its socket) is refused.
            let fencing = producer.clone();
            tokio::task::spawn_blocking(move || fencing.init_transactions(topic::REQUEST_TIMEOUT))
                .await
                .map_err(|e| permanent(e.to_string()))?
                .map_err(|e| transient(format!("cannot initialise kafka transactions: {e}")))?;
        }
        // After the fencing: nothing the probe has not seen can land later.
        let held = match options.commit_mode {
            CommitMode::ExactlyOnce => {
                let (config, bootstrap, name, offsets) = (
                    consumer_config.clone(),
                    bootstrap.clone(),
                    options.topic.clone(),
                    offsets.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    topic::newest_positions(&config, &bootstrap, &name, &offsets)
                })
                .await
                .map_err(|e| permanent(e.to_string()))?
                .map_err(transient)?
            }
            CommitMode::AtLeastOnce => vec![Position::ZERO; partitions as usize],
        };
        let held_max = held.iter().copied().max().unwrap_or_default();

        let position = if shrunk.is_some() {
            Position::ZERO
        } else {
            restored.map(|s| s.position).unwrap_or_default()
        };
        tracing::info!(
            sink = %name,
            topic = %options.topic,
            partitions,
            newest_held = %held_max,
            "kafka sink open"
        );
        Ok(KafkaSink {
            name: name.to_string(),
            options: options.clone(),
            producer,
            reader,
            deliveries,
            partitions,
            columns,
            source,
            held,
            held_max,
            ends: offsets.iter().map(|(_, high)| *high).collect(),
            position,
            visible: position,
            lost,
            rows_written: 0,
            skipped: 0,
            skip_reported: false,
            transaction: None,
            retry_budget: None,
            transactional_id: transactional_id(job, name),
            value: Vec::with_capacity(1024),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn position(&self) -> Position {
        self.position
    }

    /// Whether the topic held less than the restored checkpoint recorded.
    pub fn lost(&self) -> bool {
        self.lost
    }

    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }

    /// Lets the sink give up on an unreachable broker after `budget` (at
    /// least [`MIN_RETRY_BUDGET`]) instead of waiting: a commit, a flush or a
    /// full queue then fails as transient, and the sink's task detaches the
    /// sink so the other sinks go on (`sink/task.rs`).
    pub fn set_retry_budget(&mut self, budget: Duration) {
        self.retry_budget = Some(budget.max(MIN_RETRY_BUDGET));
    }

    /// How long one commit may take.
    fn commit_timeout(&self) -> Duration {
        self.retry_budget.unwrap_or(COMMIT_TIMEOUT)
    }

    /// Whether a broker answers a metadata request for the topic within a
    /// second (asked after each checkpoint while the sink is detached).
    pub async fn reachable(&mut self) -> bool {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || topic::broker_answers(reader.as_ref()))
            .await
            .unwrap_or(false)
    }

    /// What the topic holds for sure, without asking the broker: up to the
    /// last committed transaction (the checkpoint of a detached sink).
    pub fn held_state(&self) -> SinkState {
        SinkState {
            position: self.visible,
            offsets: self.ends.clone(),
            ..SinkState::default()
        }
    }

    /// Consumers see every change up to here: with exactly-once, up to the
    /// last committed transaction; with at-least-once, everything sent.
    pub fn visible(&self) -> Position {
        self.visible
    }

    /// Sends one message per row, in order; returns once librdkafka has
    /// queued them all (acknowledgements are awaited at the checkpoint).
    pub async fn write(
        &mut self,
        batches: Vec<RecordBatch>,
        upto: Position,
    ) -> Result<(), SinkError> {
        self.check_deliveries()?;
        let transactional = self.options.commit_mode == CommitMode::ExactlyOnce;
        if transactional && self.transaction.is_none() && batches.iter().any(|b| b.num_rows() > 0) {
            self.producer
                .begin_transaction()
                .map_err(|e| self.transaction_error("beginning a transaction", e))?;
            self.transaction = Some(Instant::now());
        }
        let mut sent = 0;
        if let Some(batch) = self.in_position_order(batches)? {
            sent += self.send_batch(&batch)?;
        }
        if sent > 0 && crate::failpoint::reached("kafka_in_flight") {
            // Messages are queued or on the wire, none acknowledged for sure.
            crate::failpoint::die("kafka_in_flight");
        }
        self.position = upto;
        if self.transaction.is_none() {
            self.visible = upto;
        }
        if self
            .transaction
            .is_some_and(|began| began.elapsed() >= COMMIT_EVERY)
        {
            self.commit_transaction().await?;
        }
        Ok(())
    }

    /// The rows of `batches` as one batch in position order (`None`: no rows).
    /// A query's output is not always in its input's order (a hash join may
    /// permute a batch), and the dedupe at open needs each partition written
    /// in position order.
    fn in_position_order(
        &self,
        batches: Vec<RecordBatch>,
    ) -> Result<Option<RecordBatch>, SinkError> {
        let arrow_error = |e: arrow::error::ArrowError| SinkError::Permanent {
            sink: self.name.clone(),
            message: format!("cannot order the rows by position: {e}"),
        };
        let Some(first) = batches.iter().find(|b| b.num_rows() > 0) else {
            return Ok(None);
        };
        let batch = if batches.len() == 1 {
            first.clone()
        } else {
            arrow::compute::concat_batches(&first.schema(), &batches).map_err(arrow_error)?
        };
        crate::change::in_position_order(batch)
            .map(Some)
            .map_err(arrow_error)
    }

    /// Sends `batch`'s rows. Blocking while librdkafka's queue is full (the
    /// row encoder is not `Send`, so the wait cannot be an `.await`): the
    /// sink's own task stalls, which is the backpressure wanted.
    fn send_batch(&mut self, batch: &RecordBatch) -> Result<u64, SinkError> {
        let arrow_error = |e: arrow::error::ArrowError| SinkError::Permanent {
            sink: self.name.clone(),
            message: format!("cannot encode a message: {e}"),
        };
        let batch = encode::utc_timestamps(batch).map_err(arrow_error)?;
        let rows = encode::row_struct(&batch, self.options.format);
        let (field, options) = encode::row_encoder_parts(&rows);
        let encoder = encode::row_encoder(&rows, &field, &options).map_err(arrow_error)?;
        let mut encoded = EncodedBatch::new(
            &batch,
            encoder,
            self.columns,
            self.options.format,
            &self.source,
        )
        .map_err(arrow_error)?;
        // Cheap (shared buffers), and lets a key outlive `encoded`'s borrows.
        let keys = encoded.keys().cloned();
        let mut sent = 0;
        for row in 0..batch.num_rows() {
            let position = encoded.position(row);
            let key = encode::key_of(keys.as_ref(), row);
            let partition = encode::partition(key, position, self.partitions);
            if position <= self.held_max && position <= self.held[partition as usize] {
                self.skipped += 1;
                continue;
            }
            encoded.value(row, &mut self.value);
            let header = position.sortable_bytes();
            let mut record = BaseRecord::to(&self.options.topic)
                .partition(partition)
                .payload(&self.value[..])
                .headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                    key: POSITION_HEADER,
                    value: Some(&header[..]),
                }));
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(ms) = encoded.timestamp(row) {
                record = record.timestamp(ms);
            }
            let mut full_since: Option<Instant> = None;
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // Backpressure: the queue drains as the broker acknowledges.
                        record = back;
                        self.check_deliveries()?;
                        let since = *full_since.get_or_insert_with(Instant::now);
                        if self
                            .retry_budget
                            .is_some_and(|budget| since.elapsed() >= budget)
                        {
                            return Err(SinkError::Transient {
                                sink: self.name.clone(),
                                message: format!(
                                    "the kafka brokers take no messages for topic `{}` (queue full for {:.0} s)",
                                    self.options.topic,
                                    since.elapsed().as_secs_f64()
                                ),
                            });
                        }
                        std::thread::sleep(QUEUE_FULL_WAIT);
                    }
                    Err((error, _)) => {
                        return Err(SinkError::Transient {
                            sink: self.name.clone(),
                            message: format!(
                                "cannot send to topic `{}`: {error}",
                                self.options.topic
                            ),
                        })
                    }
                }
            }
            sent += 1;
        }
        self.rows_written += sent;
        Ok(sent)
    }

    /// Whether the sink holds messages back between writes (in a
    /// transaction), so its task should call [`KafkaSink::idle`] when idle.
    pub fn wants_idle(&self) -> bool {
        self.options.commit_mode == CommitMode::ExactlyOnce
    }

    /// Commits the open transaction if it is older than [`COMMIT_EVERY`]
    /// (the sink's task calls this when no write came for a while).
    pub async fn idle(&mut self) -> Result<(), SinkError> {
        if self
            .transaction
            .is_some_and(|began| began.elapsed() >= COMMIT_EVERY)
        {
            self.commit_transaction().await?;
        }
        Ok(())
    }

    /// Commits the open transaction (librdkafka flushes it first): its
    /// messages become visible to `read_committed` consumers.
    ///
    /// A detachable sink (one with a retry budget) makes one attempt within
    /// its budget: if the broker does not answer, its task detaches it.
    /// Otherwise the commit is attempted for [`COMMIT_ATTEMPT`] at a time
    /// (librdkafka lets a timed-out commit be called again), for
    /// [`COMMIT_TIMEOUT`] in all, and between attempts the partitions' ends
    /// are checked: a broker that restarted without the topic's data makes
    /// the sink lost at once (rebuilt by the restarted run) instead of after
    /// the whole timeout.
    async fn commit_transaction(&mut self) -> Result<(), SinkError> {
        let started = Instant::now();
        let (attempt, budget) = match self.retry_budget {
            Some(budget) => (budget, budget),
            None => (COMMIT_ATTEMPT, COMMIT_TIMEOUT),
        };
        let committed = loop {
            let producer = self.producer.clone();
            let result = tokio::task::spawn_blocking(move || producer.commit_transaction(attempt))
                .await
                .map_err(|e| SinkError::Permanent {
                    sink: self.name.clone(),
                    message: e.to_string(),
                })?;
            let retriable = matches!(&result, Err(KafkaError::Transaction(e)) if e.is_retriable());
            if !retriable || started.elapsed() + attempt > budget {
                break result;
            }
            // The broker may be slow, or hung, or back without our data.
            if let Ok(ends) = self.partition_ends().await {
                self.check_not_lost(&ends)?;
            }
        };
        self.transaction = None;
        self.check_deliveries()?;
        committed.map_err(|e| self.transaction_error("committing a transaction", e))?;
        self.visible = self.position;
        Ok(())
    }

    /// Each partition's end offset as the broker reports it now.
    async fn partition_ends(&self) -> Result<Vec<i64>, SinkError> {
        let (reader, topic, partitions) = (
            self.reader.clone(),
            self.options.topic.clone(),
            self.partitions,
        );
        tokio::task::spawn_blocking(move || {
            (0..partitions)
                .map(|p| {
                    reader
                        .fetch_watermarks(&topic, p, topic::REQUEST_TIMEOUT)
                        .map(|(_, high)| high)
                })
                .collect::<Result<Vec<i64>, KafkaError>>()
        })
        .await
        .map_err(|e| SinkError::Permanent {
            sink: self.name.clone(),
            message: e.to_string(),
        })?
        .map_err(|error| SinkError::Transient {
            sink: self.name.clone(),
            message: format!(
                "reading the offsets of topic `{}`: {error}",
                self.options.topic
            ),
        })
    }

    /// A partition that ends below the end it reached at the last
    /// checkpoint: the broker lost data, and the sink is lost.
    fn check_not_lost(&self, ends: &[i64]) -> Result<(), SinkError> {
        match (0..ends.len()).find(|&p| ends[p] < self.ends.get(p).copied().unwrap_or(0)) {
            None => Ok(()),
            Some(p) => Err(SinkError::Lost {
                sink: self.name.clone(),
                message: format!(
                    "topic `{}` partition {p} ends at offset {}, below the {} it reached before: the broker \
                     lost data; the job restarts and rebuilds the topic from its checkpoints",
                    self.options.topic, ends[p], self.ends[p]
                ),
            }),
        }
    }

    /// An error of librdkafka's transaction API, as the sink reports it. A
    /// transaction that must be aborted is, and the run restarts; a fenced
    /// producer means another process writes the topic as this sink.
    fn transaction_error(&self, doing: &str, error: KafkaError) -> SinkError {
        let code = error.rdkafka_error_code();
        if let KafkaError::Transaction(ref txn) = error {
            if txn.txn_requires_abort() {
                let _ = self.producer.abort_transaction(self.commit_timeout());
            }
        }
        if code == Some(RDKafkaErrorCode::ProducerFenced) {
            return SinkError::Permanent {
                sink: self.name.clone(),
                message: format!(
                    "{doing} on topic `{}`: another process writes this topic as this sink \
                     (transactional id `{}`) and fenced this one; run one job per name",
                    self.options.topic, self.transactional_id
                ),
            };
        }
        SinkError::Transient {
            sink: self.name.clone(),
            message: format!("{doing} on topic `{}`: {error}", self.options.topic),
        }
    }

    /// A failed delivery fails the run (it restarts from the last checkpoint).
    fn check_deliveries(&self) -> Result<(), SinkError> {
        let failed = self
            .deliveries
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match failed.as_ref() {
            None => Ok(()),
            Some(message) => Err(SinkError::Transient {
                sink: self.name.clone(),
                message: format!("topic `{}`: {message}", self.options.topic),
            }),
        }
    }

    /// Waits until the broker has acknowledged every message sent, then
    /// returns the position and each partition's end offset.
    pub async fn prepare_checkpoint(&mut self, _epoch: u64) -> Result<SinkState, SinkError> {
        if self.transaction.is_some() {
            self.commit_transaction().await?;
        }
        let waiting = Instant::now();
        loop {
            let producer = self.producer.clone();
            let wait = self.retry_budget.map_or(FLUSH_WAIT, |b| b.min(FLUSH_WAIT));
            let flushed = tokio::task::spawn_blocking(move || producer.flush(wait))
                .await
                .map_err(|e| SinkError::Permanent {
                    sink: self.name.clone(),
                    message: e.to_string(),
                })?;
            self.check_deliveries()?;
            match flushed {
                Ok(()) => break,
                Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
                    if self
                        .retry_budget
                        .is_some_and(|budget| waiting.elapsed() >= budget) =>
                {
                    return Err(SinkError::Transient {
                        sink: self.name.clone(),
                        message: format!(
                            "the kafka brokers have not acknowledged topic `{}`'s messages for {:.0} s",
                            self.options.topic,
                            waiting.elapsed().as_secs_f64()
                        ),
                    });
                }
                Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                    tracing::warn!(
                        sink = %self.name,
                        topic = %self.options.topic,
                        in_flight = self.producer.in_flight_count(),
                        "waiting for the kafka brokers to acknowledge messages; the checkpoint waits too"
                    );
                }
                Err(error) => {
                    return Err(SinkError::Transient {
                        sink: self.name.clone(),
                        message: format!("flushing topic `{}`: {error}", self.options.topic),
                    })
                }
            }
        }
        // Each partition's end as the broker reports it, once everything
        // sent is acknowledged: what a later open checks the topic against.
        // (Asked rather than taken from delivery reports, whose offsets some
        // brokers report differently.)
        let offsets = self.partition_ends().await?;
        if self.skipped > 0 && !self.skip_reported {
            self.skip_reported = true;
            tracing::info!(
                sink = %self.name,
                topic = %self.options.topic,
                skipped = self.skipped,
                "changes the topic already held were not sent again"
            );
        }
        self.check_not_lost(&offsets)?;
        self.ends = offsets.clone();
        crate::failpoint::hit("kafka_acked");
        Ok(SinkState {
            position: self.position,
            offsets,
            ..SinkState::default()
        })
    }
}
