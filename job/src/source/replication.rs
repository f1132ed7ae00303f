//! The `postgres-cdc` connector's streaming loop (start-up checks, the
//! publication and the slot are in [`super::setup`]).
//!
//! # Batching and feedback
//!
//! The reader runs in its own task and decodes pgoutput straight into Arrow
//! builders. It cuts a batch when the table changes (so the engine applies a
//! dimension change exactly between the events around it), at
//! `max_batch_rows`, or at a commit once `linger` has passed since the batch's
//! first row. A batch that ends at a commit carries that commit's end LSN:
//! only there can the engine checkpoint. A keepalive outside a transaction
//! means the server has sent all it has: the reader flushes what is pending
//! and sends [`SourceEvent::Idle`], so the engine knows it has caught up (only
//! then may the wall clock drive its watermarks) and an idle job still
//! advances its slot, letting Postgres recycle WAL.
//!
//! Feedback to Postgres is only what the engine confirms through
//! [`SourceHandle::confirm`], after a checkpoint is durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::pgoutput::{self, DecodeError, Message, OldTuple, TableDecoder, PG_EPOCH_OFFSET_MICROS};
use super::setup::{cdc_options, NewSlot, PgTarget, SlotNames};
use super::RejectedChange;
use crate::change::{Op, Position};
use crate::sql::plan::SourceTable;

/// Errors of the postgres-cdc source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("postgres at {target}: {message}")]
    Check { target: String, message: String },
    #[error("failed to connect to postgres at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("replication stream from {target} failed: {message}")]
    Stream { target: String, message: String },
    #[error("table `{table}`: {message}")]
    Decode { table: String, message: String },
    /// The replication slot and the checkpoints disagree about where the job
    /// is; the message says how to recover.
    #[error("{0}")]
    Resume(String),
    #[error("the job reads no postgres-cdc table")]
    NoSource,
}

/// What the reader hands the engine, in stream order.
#[derive(Debug)]
pub enum SourceEvent {
    /// Changes of one source table (index into the plan's sources).
    /// `commit_end` is set when the batch ends exactly at a commit (the
    /// engine may checkpoint there), and never when a [`Self::Marker`] of
    /// that commit follows: the marker carries it.
    Changes {
        source: usize,
        batch: RecordBatch,
        /// Old images of the batch's updates (tables with `REPLICA IDENTITY
        /// FULL`), with the updates' positions: windows retract them.
        before: Option<RecordBatch>,
        /// Changes among the batch's that could not be decoded, in order.
        rejected: Vec<RejectedChange>,
        commit_end: Option<u64>,
    },
    /// No transaction is open and every commit before `lsn` has been delivered.
    Idle { lsn: u64 },
    /// The table was truncated at this point of the stream.
    Truncated { source: usize, commit_lsn: u64 },
    /// The stream reached the requested end LSN; nothing follows.
    End { lsn: u64 },
    /// A logical message of engage's backfill (prefix
    /// [`crate::backfill::MARKER_PREFIX`]), at its place in the stream; its
    /// transaction committed at `commit_end`, and every change before it
    /// was sent first.
    Marker {
        content: bytes::Bytes,
        position: Position,
        commit_end: u64,
    },
}

/// Batching knobs of the reader.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    pub max_batch_rows: usize,
    pub linger: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_batch_rows: 8192,
            linger: Duration::from_millis(20),
        }
    }
}

/// The running reader: its events, and the way to confirm positions.
pub struct SourceHandle {
    pub events: mpsc::Receiver<Result<SourceEvent, SourceError>>,
    confirmed: Arc<AtomicU64>,
    /// The server's WAL end as last reported (for lag figures).
    pub server_wal_end: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl SourceHandle {
    /// Lets the slot forget everything up to `lsn` (call after a durable checkpoint).
    pub fn confirm(&self, lsn: u64) {
        self.confirmed.fetch_max(lsn, Ordering::SeqCst);
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for SourceHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts streaming: on a freshly created slot, or resuming at `resume_lsn`.
pub async fn start(
    target: &PgTarget,
    names: &SlotNames,
    sources: &[SourceTable],
    new_slot: Option<NewSlot>,
    resume_lsn: u64,
    end_lsn: Option<u64>,
    batching: BatchOptions,
) -> Result<SourceHandle, SourceError> {
    let connect_error = |e: pgwire_replication::PgWireError| SourceError::Connect {
        target: target.to_string(),
        message: e.to_string(),
    };
    let client = match new_slot {
        Some(mut slot) => {
            slot.client.start().await.map_err(connect_error)?;
            slot.client
        }
        None => {
            let config = target
                .replication_config(&names.slot, &names.publication)
                .with_start_lsn(Lsn(resume_lsn))
                .with_ack_lsn(Lsn(resume_lsn));
            ReplicationClient::connect(config)
                .await
                .map_err(connect_error)?
        }
    };
    let mut client = client;
    client
        .wait_started()
        .await
        .map_err(|e| SourceError::Stream {
            target: target.to_string(),
            message: format!("START_REPLICATION on slot {} was refused: {e}", names.slot),
        })?;
    let mut decoders = Vec::new();
    let mut before_decoders = Vec::new();
    for source in sources {
        before_decoders.push(
            TableDecoder::new(&source.def.name, source.declared.clone()).map_err(|e| {
                SourceError::Decode {
                    table: source.def.name.clone(),
                    message: e.to_string(),
                }
            })?,
        );
        decoders.push(
            TableDecoder::new(&source.def.name, source.declared.clone()).map_err(|e| {
                SourceError::Decode {
                    table: source.def.name.clone(),
                    message: e.to_string(),
                }
            })?,
        );
    }
    let (sender, events) = mpsc::channel(8);
    let confirmed = Arc::new(AtomicU64::new(resume_lsn));
    let server_wal_end = Arc::new(AtomicU64::new(resume_lsn));
    let reader = Reader {
        target: target.to_string(),
        client,
        sender,
        tables: sources
            .iter()
            .map(|s| {
                let o = cdc_options(s).expect("cdc source");
                (o.schema.clone(), o.table.clone())
            })
            .collect(),
        rejected: vec![Vec::new(); decoders.len()],
        decoders,
        before_decoders,
        relations: HashMap::new(),
        batching,
        confirmed: confirmed.clone(),
        acknowledged: resume_lsn,
        server_wal_end: server_wal_end.clone(),
        pending: None,
        pending_since: None,
        pending_complete: false,
        cut_inside: false,
        in_transaction: false,
        commit_lsn: 0,
        commit_time: 0,
        seq: 0,
        last_commit_end: resume_lsn,
        last_idle: Instant::now(),
        idle_sent: resume_lsn,
        sent_since_idle: false,
        end_lsn,
        markers: Vec::new(),
    };
    let task = tokio::spawn(reader.run());
    Ok(SourceHandle {
        events,
        confirmed,
        server_wal_end,
        task,
    })
}

/// The reader task's state.
struct Reader {
    target: String,
    client: ReplicationClient,
    sender: mpsc::Sender<Result<SourceEvent, SourceError>>,
    /// (schema, table) of each source, by source index.
    tables: Vec<(String, String)>,
    decoders: Vec<TableDecoder>,
    /// Old images of updates, per source (see [`SourceEvent::Changes`]).
    before_decoders: Vec<TableDecoder>,
    /// Changes that could not be decoded, per source, not sent yet.
    rejected: Vec<Vec<RejectedChange>>,
    /// Relation id -> source index.
    relations: HashMap<u32, usize>,
    batching: BatchOptions,
    confirmed: Arc<AtomicU64>,
    acknowledged: u64,
    server_wal_end: Arc<AtomicU64>,
    /// Source index whose decoder holds unsent rows.
    pending: Option<usize>,
    pending_since: Option<Instant>,
    /// The pending rows all belong to committed transactions.
    pending_complete: bool,
    /// A batch went out inside a transaction since the last one that ended
    /// at a commit: the next commit is cut at, so that back-to-back large
    /// transactions still give the engine boundaries to checkpoint at.
    cut_inside: bool,
    in_transaction: bool,
    commit_lsn: u64,
    commit_time: i64,
    seq: u64,
    last_commit_end: u64,
    last_idle: Instant,
    idle_sent: u64,
    /// A batch went out since the last [`SourceEvent::Idle`].
    sent_since_idle: bool,
    /// Stop once the stream reaches this LSN (like pg_recvlogical's --endpos).
    end_lsn: Option<u64>,
    /// Backfill markers of the open transaction, sent at its commit.
    markers: Vec<(bytes::Bytes, Position)>,
}

enum Next {
    Continue,
    Stop,
}

impl Reader {
    async fn run(mut self) {
        loop {
            match self.step().await {
                Ok(Next::Continue) => {}
                Ok(Next::Stop) => return,
                Err(error) => {
                    let _ = self.sender.send(Err(error)).await;
                    return;
                }
            }
        }
    }

    async fn step(&mut self) -> Result<Next, SourceError> {
        let confirmed = self.confirmed.load(Ordering::SeqCst);
        if confirmed > self.acknowledged {
            self.client.update_applied_lsn(Lsn(confirmed));
            self.acknowledged = confirmed;
        }
        let wait = match self.pending_since {
            Some(since) if !self.in_transaction => {
                self.batching.linger.saturating_sub(since.elapsed())
            }
            _ => Duration::from_millis(500),
        };
        let event = match tokio::time::timeout(wait, self.client.recv()).await {
            Err(_) => {
                if !self.in_transaction && self.pending.is_some() {
                    return self.flush().await;
                }
                return Ok(Next::Continue);
            }
            Ok(Err(e)) => return Err(self.stream_error(e.to_string())),
            Ok(Ok(None)) => {
                return Err(self.stream_error("the server ended the replication stream".into()))
            }
            Ok(Ok(Some(event))) => event,
        };
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                if self.end_lsn.is_some_and(|end| final_lsn.0 >= end) {
                    return self.end(final_lsn.0).await;
                }
                self.in_transaction = true;
                self.commit_lsn = final_lsn.0;
                self.commit_time = commit_time_micros;
                self.seq = 0;
            }
            ReplicationEvent::XLogData { data, .. } => return self.change(&data).await,
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                self.last_commit_end = end_lsn.0;
                self.pending_complete = self.pending.is_some();
                let due = self
                    .pending_since
                    .is_some_and(|since| since.elapsed() >= self.batching.linger);
                // Cut at a commit once half a batch is pending, so batches end
                // on transaction boundaries (where checkpoints can happen) even
                // under a backlog; only one huge transaction is cut inside.
                let full = self.pending_rows() >= self.batching.max_batch_rows / 2;
                if self.end_lsn.is_some_and(|end| end_lsn.0 >= end) {
                    return self.end(end_lsn.0).await;
                }
                if !self.markers.is_empty() {
                    // The changes before a marker go first, then the marker.
                    // They must not end at this commit: the engine could
                    // checkpoint between them and the marker, at a resume
                    // LSN past a marker it never handled, which a restart
                    // then never sees (a backfill's low watermark lost so
                    // made the restart read its chunk again at new
                    // positions). The marker's event carries the commit.
                    self.pending_complete = false;
                    self.flush().await?;
                    for (content, position) in std::mem::take(&mut self.markers) {
                        self.sent_since_idle = true;
                        if let Next::Stop = self
                            .send(SourceEvent::Marker {
                                content,
                                position,
                                commit_end: end_lsn.0,
                            })
                            .await?
                        {
                            return Ok(Next::Stop);
                        }
                    }
                    return Ok(Next::Continue);
                }
                if self.pending.is_some() && (due || full || self.cut_inside) {
                    return self.flush().await;
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                self.server_wal_end.fetch_max(wal_end.0, Ordering::Relaxed);
                if !self.in_transaction && self.end_lsn.is_some_and(|end| wal_end.0 >= end) {
                    return self.end(wal_end.0).await;
                }
                let idle_lsn = wal_end.0.max(self.last_commit_end);
                if !self.in_transaction {
                    // The server has sent all it has: no reason to linger,
                    // and the engine learns at once that it has caught up.
                    if self.pending.is_some() {
                        self.flush().await?;
                    }
                    if self.sent_since_idle
                        || (idle_lsn > self.idle_sent
                            && self.last_idle.elapsed() >= Duration::from_millis(500))
                    {
                        self.idle_sent = self.idle_sent.max(idle_lsn);
                        self.last_idle = Instant::now();
                        self.sent_since_idle = false;
                        return self
                            .send(SourceEvent::Idle {
                                lsn: self.idle_sent,
                            })
                            .await;
                    }
                }
            }
            ReplicationEvent::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == crate::backfill::MARKER_PREFIX => {
                // A transactional message is a change of its transaction: it
                // takes the next position, and goes out at the commit.
                let position = Position::new(self.commit_lsn, self.seq);
                self.seq += 1;
                self.markers.push((content, position));
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => return Ok(Next::Stop),
        }
        Ok(Next::Continue)
    }

    fn pending_rows(&self) -> usize {
        self.pending
            .map(|i| self.decoders[i].len() + self.rejected[i].len())
            .unwrap_or(0)
    }

    fn decode_error(&self, source: usize, error: DecodeError) -> SourceError {
        SourceError::Decode {
            table: self.tables[source].1.clone(),
            message: error.to_string(),
        }
    }

    async fn change(&mut self, data: &[u8]) -> Result<Next, SourceError> {
        let message = pgoutput::decode(data)
            .map_err(|e| self.stream_error(format!("undecodable pgoutput message: {e}")))?;
        let (relation_id, op) = match &message {
            Message::Relation(relation) => {
                let index = self.tables.iter().position(|(schema, table)| {
                    *schema == relation.namespace && *table == relation.name
                });
                if let Some(index) = index {
                    if self.pending == Some(index) {
                        self.flush().await?;
                    }
                    for decoder in [&mut self.decoders[index], &mut self.before_decoders[index]] {
                        decoder
                            .set_relation(relation)
                            .map_err(|e| SourceError::Decode {
                                table: format!("{}.{}", relation.namespace, relation.name),
                                message: format!("schema change: {e}"),
                            })?;
                    }
                    self.relations.insert(relation.id, index);
                }
                return Ok(Next::Continue);
            }
            Message::Insert { relation_id, .. } => (*relation_id, Op::Insert),
            Message::Update { relation_id, .. } => (*relation_id, Op::Update),
            Message::Delete { relation_id, .. } => (*relation_id, Op::Delete),
            Message::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    if let Some(&source) = self.relations.get(id) {
                        if self.pending.is_some() {
                            self.flush().await?;
                        }
                        self.send(SourceEvent::Truncated {
                            source,
                            commit_lsn: self.commit_lsn,
                        })
                        .await?;
                    }
                }
                return Ok(Next::Continue);
            }
            Message::Other(_) => return Ok(Next::Continue),
        };
        let Some(&source) = self.relations.get(&relation_id) else {
            // A table of the publication that this job does not read.
            return Ok(Next::Continue);
        };
        if self.pending.is_some_and(|p| p != source) {
            self.flush().await?;
        }
        let position = Position::new(self.commit_lsn, self.seq);
        self.seq += 1;
        // The row a dead letter keeps: the new one, or a delete's old one.
        let (result, row) = match &message {
            Message::Insert { new, .. } => (
                self.decoders[source].append(op, new, None, position, self.commit_time),
                new,
            ),
            Message::Update { old, new, .. } => {
                // Both decoders take the update, or neither does.
                let full = match old {
                    Some(OldTuple::Full(before)) => Some(before),
                    _ => None,
                };
                let checked = match full {
                    Some(before) => self.before_decoders[source].check(before, None, position),
                    None => Ok(()),
                };
                let old = old.as_ref().map(|o| match o {
                    OldTuple::Key(t) | OldTuple::Full(t) => t,
                });
                let result = checked.and_then(|()| {
                    self.decoders[source].append(op, new, old, position, self.commit_time)
                });
                if let (Ok(()), Some(before)) = (&result, full) {
                    self.before_decoders[source]
                        .append(op, before, None, position, self.commit_time)
                        .map_err(|e| self.decode_error(source, e))?;
                }
                (result, new)
            }
            Message::Delete { old, .. } => {
                let (OldTuple::Key(tuple) | OldTuple::Full(tuple)) = old;
                (
                    self.decoders[source].append(op, tuple, None, position, self.commit_time),
                    tuple,
                )
            }
            _ => unreachable!("handled above"),
        };
        if let Err(error) = result {
            let commit_ts = self.commit_time.saturating_add(PG_EPOCH_OFFSET_MICROS);
            let rejected = self.decoders[source]
                .reject(error, row, position, commit_ts)
                .map_err(|error| self.decode_error(source, error))?;
            self.rejected[source].push(rejected);
        }
        self.pending_complete = false;
        if self.pending.is_none() {
            self.pending = Some(source);
            self.pending_since = Some(Instant::now());
        }
        if self.pending_rows() >= self.batching.max_batch_rows {
            return self.flush().await;
        }
        Ok(Next::Continue)
    }

    /// Sends what is pending, then [`SourceEvent::End`], and stops reading.
    async fn end(&mut self, lsn: u64) -> Result<Next, SourceError> {
        self.flush().await?;
        self.send(SourceEvent::End { lsn }).await?;
        Ok(Next::Stop)
    }

    /// Sends the pending batch; it carries the last commit's end LSN when no
    /// row of an unfinished transaction is in it.
    async fn flush(&mut self) -> Result<Next, SourceError> {
        let Some(source) = self.pending.take() else {
            return Ok(Next::Continue);
        };
        self.pending_since = None;
        let commit_end = self.pending_complete.then_some(self.last_commit_end);
        self.pending_complete = false;
        self.cut_inside = commit_end.is_none();
        let batch = self.decoders[source].finish();
        let before = (!self.before_decoders[source].is_empty())
            .then(|| self.before_decoders[source].finish());
        let rejected = std::mem::take(&mut self.rejected[source]);
        self.sent_since_idle = true;
        self.send(SourceEvent::Changes {
            source,
            batch,
            before,
            rejected,
            commit_end,
        })
        .await
    }

    async fn send(&mut self, event: SourceEvent) -> Result<Next, SourceError> {
        match self.sender.send(Ok(event)).await {
            Ok(()) => Ok(Next::Continue),
            Err(_) => Ok(Next::Stop), // the engine is gone
        }
    }

    fn stream_error(&self, message: String) -> SourceError {
        // The walsender converts text to the client's UTF-8 and fails on a
        // value that is not valid in the database's encoding (a SQL_ASCII
        // database holding other bytes): every restart would fail the same way.
        if message.contains("SQLSTATE 22021") {
            return SourceError::Decode {
                table: format!("(a table of {})", self.target),
                message: format!(
                    "postgres cannot stream a changed row as UTF-8 ({message}): the database holds text that is \
                     not valid UTF-8 (a SQL_ASCII database?), and no restart can get past it. Correct such text \
                     in the source tables so later changes stream; to go on, advance the slot past the failing \
                     transaction with pg_replication_slot_advance (its changes are then lost to every sink), or \
                     start the job over from a fresh snapshot"
                ),
            };
        }
        SourceError::Stream {
            target: self.target.clone(),
            message,
        }
    }
}
