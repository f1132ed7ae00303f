//! Sinks, and the delivery contract they share.
//!
//! # Contract
//!
//! Sources deliver **at least once**: after a crash the job restores its last
//! checkpoint and the slot re-sends everything after it. Each sink turns that
//! into an exactly-once *effect* with its own notion of durability, expressed
//! as a [`Position`] (commit LSN, index in transaction) of the source stream:
//!
//! - [`Sink::position`] is the position up to which the sink already holds
//!   the effect of every change. The engine drops input rows at or below it
//!   before running the sink's query, so replays never apply twice.
//! - [`Sink::write`] takes the query output for input up to `upto`. Positions
//!   never move backward: a write whose `upto` is not above the current
//!   position is refused.
//! - [`Sink::prepare_checkpoint`] makes everything written so far durable or
//!   staged and returns the [`SinkState`] the checkpoint manifest records.
//! - [`Sink::commit`] runs after the manifest is durable: it publishes what
//!   was staged. It is idempotent, because after a crash between manifest and
//!   commit the restored job commits the same state again.
//!
//! Windowed queries emit, as event-time windows close, the full result of the
//! latest closed window. Those go through [`Sink::write_window`], guarded by
//! the window's end instead of the input position: a window ending at or
//! before [`Sink::window_end`] was already applied and is skipped (Redis), and
//! `upto` only moves the position forward, never refusing a write.
//!
//! What "durable" means per sink:
//!
//! - **Redis** ([`redis`]): each write is one Lua script that applies the rows
//!   and moves the sink's position key, atomically, only if the key still
//!   holds the position the sink last wrote (compare-and-set). Applied means
//!   durable as far as Redis' own persistence goes. A windowed write replaces
//!   every key of the sink with the window's rows in one script, guarded by
//!   the window end stored in Redis.
//! - **Parquet** ([`parquet`]): rows are encoded in memory per partition; at a
//!   checkpoint each partition becomes a staged file, the manifest lists it,
//!   and the commit renames it into place. Readers see whole files of whole
//!   epochs only; a crash before the manifest discards the staged files and
//!   the epoch is replayed. Windowed output is appended like any other rows.
//! - **Kafka** ([`kafka`]): one message per change, sent in position order by
//!   an idempotent producer, each carrying its position in a header; a
//!   checkpoint waits until the broker acknowledged everything sent before
//!   it. On open the sink reads the newest position of each partition and
//!   skips what the topic holds (the argument is in `kafka/mod.rs`).
//!
//! A sink whose store is unreachable does not stall the others. A Redis sink
//! whose write still fails after a short retry, or a Kafka sink whose
//! commit, flush or full queue has waited [`kafka::MIN_RETRY_BUDGET`] for
//! the broker, is *detached* ([`task::SinkTask`]): it is sent nothing more,
//! its checkpoint state records the position it holds for sure
//! ([`Sink::held_state`]: for Kafka, the last committed transaction) with
//! `detached = true`, and the engine goes on with the other sinks. Checkpoints covering its position are kept and
//! the replication slot is confirmed no further than it. Once its store
//! answers again, the run restarts, and the sink, found detached in the
//! checkpoint, is caught up from the captured changes like a lost one.
//!
//! - **Blackhole** ([`blackhole`]): discards rows; its position lives in the
//!   checkpoint alone.
//!
//! With a closed set of sinks, dispatch is an enum.
//!
//! The engine drives each sink through a [`task::SinkTask`]: the sink runs
//! on a task of its own behind a bounded channel, and checkpoint barriers
//! reach it in stream order through the same channel.

pub mod blackhole;
pub mod kafka;
pub mod parquet;
pub mod redis;
pub mod task;
pub mod webhook;

use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::change::Position;
use crate::sql::plan::{QueryPlan, SinkTable};
use crate::sql::{FilesystemOptions, SinkConnector, TableDef};

/// What a checkpoint records for one sink.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SinkState {
    /// Everything at or below this position is in the sink (or staged below).
    pub position: Position,
    /// Filesystem sinks: files staged for this checkpoint, published by `commit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub staged: Vec<StagedFile>,
    /// The sink was detached (its store unreachable): it holds everything up
    /// to `position` and nothing it was sent after. The next run catches it
    /// up from the captured changes before streaming.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detached: bool,
    /// Kafka sinks: per partition, one past the highest offset the broker
    /// acknowledged by this checkpoint. A topic found ending below it has
    /// lost data (see [`SinkError::Lost`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<i64>,
    /// Webhook sinks: batches cut and not yet acknowledged, sent again
    /// (under the same ids) by a restored sink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<webhook::WebhookBatch>,
    /// Webhook sinks: batches the endpoint refused, written to
    /// `dead_letter` when this checkpoint commits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<webhook::RefusedBatch>,
    /// Filesystem sinks with `bigquery.table`: which checkpoints' files are
    /// loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bigquery: Option<crate::bigquery::LoadProgress>,
}

/// A file written under a staging name, to be renamed to its final name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StagedFile {
    pub staging: String,
    pub target: String,
    pub rows: u64,
    pub bytes: u64,
}

/// Errors at the sink boundary, split by whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink `{sink}`: {message}")]
    Transient { sink: String, message: String },
    #[error("sink `{sink}`: {message}")]
    Permanent { sink: String, message: String },
    /// The sink's store lost what the job had applied (a Redis restarted
    /// without its data): the job must rebuild the sink from its checkpoints.
    #[error("sink `{sink}`: {message}")]
    Lost { sink: String, message: String },
}

impl SinkError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Transient { .. })
    }
}

/// Refuses a write up to `upto` that is not above the sink's `position`:
/// positions never move backward (the contract above).
pub(crate) fn forward_only(
    sink: &str,
    position: Position,
    upto: Position,
) -> Result<(), SinkError> {
    if upto <= position {
        return Err(SinkError::Permanent {
            sink: sink.to_string(),
            message: format!(
                "refusing a write up to {upto}, not above the sink's position {position}"
            ),
        });
    }
    Ok(())
}

/// One sink table of the job (boxed: sink states are a few hundred bytes each).
pub enum Sink {
    Parquet(Box<parquet::ParquetSink>),
    Redis(Box<redis::RedisSink>),
    Kafka(Box<kafka::KafkaSink>),
    Webhook(Box<webhook::WebhookSink>),
    Blackhole(blackhole::BlackholeSink),
}

impl Sink {
    /// Opens the sink for table `table` fed by `query`, whose driving table
    /// is `driving`. `job` names the job (Redis keeps the sink position under
    /// it); `restored` is the state of the checkpoint the job resumes from, if
    /// any. `dead_letter` is the job's `dead_letter` table, where a webhook
    /// sink writes the rows its endpoint refuses.
    pub async fn open(
        job: &str,
        table: &SinkTable,
        query: &QueryPlan,
        driving: &TableDef,
        dead_letter: Option<&FilesystemOptions>,
        restored: Option<&SinkState>,
    ) -> Result<Sink, SinkError> {
        let name = &table.def.name;
        match &table.connector {
            SinkConnector::Filesystem(options) => {
                let mut sink = parquet::ParquetSink::open(name, options, query, restored).await?;
                let progress = restored.and_then(|state| state.bigquery.as_ref());
                sink.bigquery = crate::bigquery::SinkLoads::start(job, name, options, progress)
                    .await
                    .map_err(|message| SinkError::Permanent {
                        sink: name.to_string(),
                        message,
                    })?;
                Ok(Sink::Parquet(Box::new(sink)))
            }
            SinkConnector::Redis(options) => Ok(Sink::Redis(Box::new(
                redis::RedisSink::open(job, name, options, query, restored).await?,
            ))),
            SinkConnector::Kafka(options) => {
                let source = match driving.connector.postgres_cdc() {
                    Some(cdc) => kafka::encode::SourceInfo {
                        name: job.to_string(),
                        schema: cdc.schema.clone(),
                        table: cdc.table.clone(),
                    },
                    None => kafka::encode::SourceInfo {
                        name: job.to_string(),
                        schema: String::new(),
                        table: driving.name.clone(),
                    },
                };
                Ok(Sink::Kafka(Box::new(
                    kafka::KafkaSink::open(job, name, options, query, source, restored).await?,
                )))
            }
            SinkConnector::Webhook(options) => Ok(Sink::Webhook(Box::new(
                webhook::WebhookSink::open(job, name, options, dead_letter, query, restored)
                    .await?,
            ))),
            SinkConnector::Blackhole => Ok(Sink::Blackhole(blackhole::BlackholeSink::open(
                name, restored,
            ))),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Sink::Parquet(sink) => sink.name(),
            Sink::Redis(sink) => sink.name(),
            Sink::Kafka(sink) => sink.name(),
            Sink::Webhook(sink) => sink.name(),
            Sink::Blackhole(sink) => sink.name(),
        }
    }

    /// Whether a window written to the sink replaces the previous one (Redis)
    /// rather than being appended (Parquet).
    pub fn is_redis(&self) -> bool {
        matches!(self, Sink::Redis(_))
    }

    /// Prepares a sink that can be caught up from the captured changes
    /// (Redis) to be detached when its store is unreachable: its writes then
    /// give up after `budget` rather than retry for a minute while every
    /// other sink waits. False for sinks that cannot be caught up that way.
    pub fn detach_after(&mut self, budget: std::time::Duration) -> bool {
        match self {
            // A webhook endpoint that is down slows the job: nothing could
            // catch it up later (the endpoint holds no position to resume from).
            Sink::Parquet(_) | Sink::Webhook(_) | Sink::Blackhole(_) => false,
            Sink::Redis(sink) => {
                sink.set_retry_budget(budget);
                true
            }
            Sink::Kafka(sink) => {
                sink.set_retry_budget(budget);
                true
            }
        }
    }

    /// Whether the sink's store answers (always true for local files).
    pub async fn reachable(&mut self) -> bool {
        match self {
            Sink::Parquet(_) | Sink::Webhook(_) | Sink::Blackhole(_) => true,
            Sink::Redis(sink) => sink.reachable().await,
            Sink::Kafka(sink) => sink.reachable().await,
        }
    }

    /// What a detached sink holds for sure, told without asking its store:
    /// its checkpoint state while detached.
    pub fn held_state(&self) -> SinkState {
        match self {
            Sink::Kafka(sink) => sink.held_state(),
            Sink::Redis(sink) => sink.state(),
            Sink::Parquet(_) | Sink::Webhook(_) | Sink::Blackhole(_) => SinkState {
                position: self.position(),
                ..SinkState::default()
            },
        }
    }

    /// Whether the sink's store held less than the restored checkpoint
    /// recorded when the sink opened (see [`SinkError::Lost`]), or the
    /// checkpoint says it was detached.
    pub fn lost(&self) -> bool {
        match self {
            Sink::Parquet(_) | Sink::Webhook(_) | Sink::Blackhole(_) => false,
            Sink::Redis(sink) => sink.lost(),
            Sink::Kafka(sink) => sink.lost(),
        }
    }

    /// Input at or below this position is already in the sink.
    pub fn position(&self) -> Position {
        match self {
            Sink::Parquet(sink) => sink.position(),
            Sink::Redis(sink) => sink.position(),
            Sink::Kafka(sink) => sink.position(),
            Sink::Webhook(sink) => sink.position(),
            Sink::Blackhole(sink) => sink.position(),
        }
    }

    /// Readers of the sink's store see the effect of every change up to here
    /// (Redis: applied; Kafka: committed; Parquet: published at a checkpoint).
    pub fn visible(&self) -> Position {
        match self {
            Sink::Parquet(sink) => sink.visible(),
            Sink::Redis(sink) => sink.position(),
            Sink::Kafka(sink) => sink.visible(),
            Sink::Webhook(sink) => sink.visible(),
            Sink::Blackhole(sink) => sink.position(),
        }
    }

    /// Writes the query output for input up to `upto` (which must be above
    /// [`Sink::position`]). `batches` may be empty: the position still moves.
    pub async fn write(
        &mut self,
        batches: Vec<RecordBatch>,
        upto: Position,
    ) -> Result<(), SinkError> {
        forward_only(self.name(), self.position(), upto)?;
        match self {
            Sink::Parquet(sink) => sink.write(batches, upto),
            Sink::Redis(sink) => sink.write(batches, upto).await,
            Sink::Kafka(sink) => sink.write(batches, upto).await,
            Sink::Webhook(sink) => sink.write(batches, upto).await,
            Sink::Blackhole(sink) => {
                sink.write(batches, upto);
                Ok(())
            }
        }
    }

    /// Writes the full result of the window ending at `window_end_micros`
    /// (Unix µs), computed from input up to `upto`. Redis replaces every key
    /// the sink writes with it, or skips it if a window ending at or after it
    /// was already applied; Parquet appends the rows. Not refused when `upto`
    /// is not above [`Sink::position`]: the position only moves forward.
    pub async fn write_window(
        &mut self,
        batches: Vec<RecordBatch>,
        window_end_micros: i64,
        upto: Position,
    ) -> Result<(), SinkError> {
        match self {
            Sink::Parquet(sink) => {
                let upto = upto.max(sink.position());
                sink.write(batches, upto)
            }
            Sink::Redis(sink) => sink.write_window(batches, window_end_micros, upto).await,
            // Refused when the job is planned (`KafkaOptions::check_columns`).
            Sink::Kafka(sink) => Err(SinkError::Permanent {
                sink: sink.name().to_string(),
                message: "a kafka sink cannot take a windowed query's output".into(),
            }),
            Sink::Webhook(sink) => Err(SinkError::Permanent {
                sink: sink.name().to_string(),
                message: "a webhook sink cannot take a windowed query's output".into(),
            }),
            Sink::Blackhole(sink) => {
                sink.write(batches, upto);
                Ok(())
            }
        }
    }

    /// End (Unix µs) of the last window the sink applied, when the sink keeps
    /// it (Redis, read at open); `None` otherwise or if it never wrote one.
    pub fn window_end(&self) -> Option<i64> {
        match self {
            Sink::Parquet(_) | Sink::Kafka(_) | Sink::Webhook(_) | Sink::Blackhole(_) => None,
            Sink::Redis(sink) => sink.window_end(),
        }
    }

    /// Whether the sink's task should call [`Sink::idle`] when no command
    /// comes for [`task::IDLE_TICK`] (the others wait for commands alone).
    pub fn wants_idle(&self) -> bool {
        match self {
            Sink::Kafka(sink) => sink.wants_idle(),
            Sink::Webhook(_) => true,
            Sink::Parquet(_) | Sink::Redis(_) | Sink::Blackhole(_) => false,
        }
    }

    /// Called when no write came for a while ([`task::IDLE_TICK`]): a Kafka
    /// sink commits a transaction older than its commit interval, so the
    /// last changes before a pause do not wait for the next checkpoint.
    pub async fn idle(&mut self) -> Result<(), SinkError> {
        match self {
            Sink::Kafka(sink) => sink.idle().await,
            Sink::Webhook(sink) => sink.idle().await,
            Sink::Parquet(_) | Sink::Redis(_) | Sink::Blackhole(_) => Ok(()),
        }
    }

    pub async fn prepare_checkpoint(&mut self, epoch: u64) -> Result<SinkState, SinkError> {
        match self {
            Sink::Parquet(sink) => sink.prepare_checkpoint(epoch).await,
            Sink::Redis(sink) => Ok(sink.state()),
            Sink::Kafka(sink) => sink.prepare_checkpoint(epoch).await,
            Sink::Webhook(sink) => sink.prepare_checkpoint(epoch).await,
            Sink::Blackhole(sink) => Ok(sink.state()),
        }
    }

    pub async fn commit(&mut self, state: &SinkState) -> Result<(), SinkError> {
        match self {
            Sink::Parquet(sink) => {
                sink.commit(state).await?;
                if let Some(loads) = &sink.bigquery {
                    loads.committed(state.staged.iter().map(|f| f.target.clone()).collect());
                }
                Ok(())
            }
            Sink::Webhook(sink) => sink.commit(state).await,
            Sink::Redis(_) | Sink::Kafka(_) | Sink::Blackhole(_) => Ok(()),
        }
    }

    /// Rows this sink has written since the job started.
    pub fn rows_written(&self) -> u64 {
        match self {
            Sink::Parquet(sink) => sink.rows_written(),
            Sink::Redis(sink) => sink.rows_written(),
            Sink::Kafka(sink) => sink.rows_written(),
            Sink::Webhook(sink) => sink.rows_written(),
            Sink::Blackhole(sink) => sink.rows_written(),
        }
    }
}
