//! The engine: runs a planned job over the change stream, in epochs.
//!
//! # The loop
//!
//! The source is opened through [`crate::source::postgres::open`], which
//! also decides where the stream starts. Change batches then arrive from the
//! source's reader task in commit order. For a batch of table T, the engine
//! (1) runs every query that T drives, with each query's dimension tables as
//! they stand *now*, and hands the output to the query's sink; then (2)
//! applies the batch to T's dimension, if T is one. Since the source cuts
//! batches where the table changes, a `content` update lands exactly between
//! the events committed before and after it.
//!
//! Each sink runs on a task of its own ([`crate::sink::task::SinkTask`]):
//! handing it the output means sending it through a bounded channel, so
//! encoding and writing overlap the next batch, and a Redis sink whose store
//! is unreachable is detached instead of stalling the others (see
//! `sink/mod.rs`). Windowed aggregates that keep the same state share one
//! (`windowed::WindowStates`).
//!
//! Before a query runs, input rows at or below its sink's position are
//! dropped: after a restart the source re-sends changes the sink may already
//! hold, and this is where "nothing twice" is enforced for the live path.
//!
//! # Epochs and checkpoints
//!
//! Every `checkpoint_interval`, or sooner once the epoch holds
//! `checkpoint_max_changes` changes, at a transaction boundary, the engine
//! takes a checkpoint (see [`crate::checkpoint`] for what it holds, and
//! `checkpointing.rs`): the barrier goes to every sink, each prepares once it
//! has applied what came before it (Parquet stages its files), the manifest
//! is written, sinks commit, and only then is the replication slot confirmed
//! up to the checkpoint's resume LSN (no further than a detached sink holds).
//! A graceful stop takes a final checkpoint.
//!
//! # Restore and replay
//!
//! A restarted job loads its newest checkpoint: dimensions, sink states, and
//! the LSN to resume streaming from. `replay --from-checkpoint K` loads the
//! dimensions of checkpoint K instead and first pushes the captured changes
//! of the epochs after K through the current SQL; sinks keep the state of
//! the newest checkpoint, so they skip what they already hold and fill in
//! what they lack (a sink added to the SQL since, a flushed Redis).
//!
//! # Files
//!
//! This file starts a run (`run_once`) and holds the streaming loop;
//! `open_sinks.rs` opens the sinks, `process.rs` runs one change batch,
//! `windowed.rs` feeds and closes windows (`window/` is their state, `clock.rs`
//! when the wall clock drives watermarks), `checkpointing.rs` takes and
//! restores checkpoints, `replay.rs` replays captures and rebuilds lost sinks,
//! `supervise.rs` restarts a run after a curable failure.

mod backfill;
mod checkpointing;
pub mod clock;
pub mod dead_letter;
pub mod dimension;
pub mod histogram;
pub mod late;
pub mod latency;
pub mod metrics;
mod open_sinks;
mod process;
pub mod recent;
use process::{after, last_position, position_columns, ViewOutputs, BEFORE_SUFFIX};
mod replay;
pub mod side_output;
pub mod stats;
pub mod supervise;
pub mod udf_errors;
pub mod window;
mod windowed;

pub use checkpointing::MIN_CAPTURE_RETENTION;
pub use clock::MIN_ALLOWANCE;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;

use crate::change::{format_lsn, Position};
use crate::checkpoint::{self, CaptureLog, CheckpointError, CheckpointStore, Retention};
use crate::sink::task::SinkTask;
use crate::sink::SinkError;
use crate::source::postgres::{self, Start};
use crate::source::replication::{BatchOptions, SourceError, SourceEvent, SourceHandle};
use crate::source::setup;
use crate::sql::plan::JobPlan;
use crate::sql::{JobSpec, SqlError};
use dimension::Dimension;
use stats::JobStats;

/// See [`RunOptions::checkpoint_max_changes`]: at about 50 bytes of
/// compressed capture per change, an epoch's capture stays near 10 MiB.
pub const DEFAULT_CHECKPOINT_MAX_CHANGES: u64 = 200_000;

/// How a job runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Directory or URL holding `<job>/epoch-*/` checkpoints.
    pub checkpoint_dir: String,
    pub checkpoint_interval: Duration,
    /// A checkpoint is taken early once an epoch holds this many changes (0:
    /// never). What an epoch holds in memory until its checkpoint (its
    /// capture log, the Parquet sinks' encoded rows) grows with it: under a
    /// backlog, where the interval alone would let an epoch hold a million
    /// changes, this bounds it.
    pub checkpoint_max_changes: u64,
    /// Checkpoints kept whole; older ones are thinned to their capture.
    pub keep_checkpoints: usize,
    /// How long thinned checkpoints keep their capture; `None`: the job's
    /// longest window, and at least [`MIN_CAPTURE_RETENTION`].
    pub capture_retention: Option<Duration>,
    /// Replay the captured changes after this checkpoint first.
    pub replay_from: Option<u64>,
    /// Stop (with a final checkpoint) once the stream reaches this LSN.
    pub end_lsn: Option<u64>,
    /// Warn when the slot retains more WAL than this (bytes).
    pub warn_retained_wal_bytes: u64,
    pub batching: BatchOptions,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            checkpoint_dir: "checkpoints".into(),
            checkpoint_interval: Duration::from_secs(10),
            checkpoint_max_changes: DEFAULT_CHECKPOINT_MAX_CHANGES,
            keep_checkpoints: checkpoint::DEFAULT_KEEP,
            capture_retention: None,
            replay_from: None,
            end_lsn: None,
            warn_retained_wal_bytes: 1 << 30,
            batching: BatchOptions::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("query feeding sink `{sink}` failed: {message}")]
    Query { sink: String, message: String },
    /// An Arrow kernel failed on a change batch (a bug, or data no type
    /// check caught): not the kind of failure a restart cures.
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    /// State the engine keeps (window state, dimension tables, the capture
    /// log) could not be built, encoded or decoded.
    #[error("{what}: {source}")]
    State {
        what: String,
        source: arrow::error::ArrowError,
    },
    /// A checkpoint lacks what this run needs from it (a dimension added to
    /// the SQL since, a capture cut short), or a lost sink cannot be rebuilt
    /// exactly from the checkpoints still kept.
    #[error("{0}")]
    Restore(String),
    /// A change that cannot be decoded or fails a CHECK, in a job without a
    /// `dead_letter` table to divert it to.
    #[error("{0}")]
    BadInput(String),
    /// A UDF panicked on `rows` rows of a batch: they were found and will be
    /// dead-lettered by the next run (see `udf_errors.rs`).
    #[error(
        "UDF `{udf}` panicked on {rows} row(s); they go to dead_letter (reason udf_error:{udf})"
    )]
    UdfPanicked { udf: String, rows: usize },
}

impl JobError {
    /// A [`JobError::State`] error about `what`.
    pub fn state(what: impl Into<String>) -> impl FnOnce(arrow::error::ArrowError) -> JobError {
        let what = what.into();
        move |source| JobError::State { what, source }
    }
}

/// What a finished run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub changes: u64,
    pub last_checkpoint: Option<u64>,
    pub replayed_changes: u64,
    /// In-process restarts after curable failures (see [`supervise`]).
    pub restarts: u64,
}

/// Runs `spec` until `shutdown` resolves, then takes a final checkpoint.
/// A failure that a restart can cure ([`supervise::is_restartable`]) restarts
/// the run from the newest checkpoint instead of ending it.
pub async fn run(
    spec: &JobSpec,
    script: &str,
    options: RunOptions,
    stats: Arc<JobStats>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<RunSummary, JobError> {
    let poisoned = udf_errors::SharedPoisoned::default();
    supervise::supervise(&stats, shutdown, |stop| {
        run_once(
            spec,
            script,
            options.clone(),
            stats.clone(),
            poisoned.clone(),
            stop,
        )
    })
    .await
}

/// One run, from the newest checkpoint (or a fresh snapshot) until `shutdown`.
async fn run_once(
    spec: &JobSpec,
    script: &str,
    options: RunOptions,
    stats: Arc<JobStats>,
    poisoned: udf_errors::SharedPoisoned,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, JobError> {
    let plan = JobPlan::new(spec).await?;
    let store = CheckpointStore::open(&options.checkpoint_dir, &spec.name)?;
    let latest = store.latest().await?;
    let restore = match options.replay_from {
        Some(epoch) => Some(checkpointing::replay_start(&store, epoch).await?),
        None => latest.clone(),
    };
    let windowed: Vec<Vec<String>> = (0..plan.sources.len())
        .map(|source| {
            plan.queries
                .iter()
                .filter(|q| q.driving == source && q.is_windowed())
                .map(|q| plan.sinks[q.sink].def.name.clone())
                .collect()
        })
        .collect();
    let checkpointed = latest.as_ref().map(|m| postgres::Checkpointed {
        epoch: m.epoch,
        resume_lsn: m.source.resume_lsn,
    });
    let (mut pg, start) = postgres::open(
        &spec.name,
        &plan.sources,
        &windowed,
        checkpointed,
        store.display(),
    )
    .await?;

    let mut dimensions = Vec::new();
    for source in &plan.sources {
        dimensions.push(if source.is_dimension {
            Some(
                Dimension::new(source.schema.clone(), source.primary_key.clone())
                    .map_err(JobError::Arrow)?,
            )
        } else {
            None
        });
    }
    let capture_retention = options
        .capture_retention
        .unwrap_or_else(|| checkpointing::default_capture_retention(&plan));
    let mut engine = Engine {
        job: spec.name.clone(),
        sql_hash: sql_hash(script),
        plan,
        sinks: Vec::new(),
        dimensions,
        store,
        capture: CaptureLog::default(),
        epoch: 0,
        resume_lsn: 0,
        position: Position::ZERO,
        at_boundary: true,
        dirty: false,
        slot: pg.slot().to_string(),
        stats,
        retention: Retention {
            keep: options.keep_checkpoints,
            capture: capture_retention,
        },
        windows: windowed::WindowStates::default(),
        window_guards: Vec::new(),
        last_windows: Vec::new(),
        window_commits: Vec::new(),
        last_change: Instant::now(),
        caught_up: false,
        live_batch: false,
        arrival_lag: clock::ArrivalLag::new(Instant::now()),
        late_sink: None,
        dead_letter_sink: None,
        warn_retained_wal_bytes: options.warn_retained_wal_bytes,
        max_changes: options.checkpoint_max_changes,
        applied_upto: Position::ZERO,
        rebuilding: None,
        held_by: None,
        poisoned,
        backfill: backfill::Backfill::default(),
    };
    engine.windows = windowed::WindowStates::new(&engine.plan)?;
    engine.window_guards = engine
        .plan
        .queries
        .iter()
        .map(|q| vec![None; q.windows.len()])
        .collect();
    engine.last_windows = vec![None; engine.plan.queries.len()];
    engine.window_commits = (0..engine.plan.queries.len())
        .map(|_| Default::default())
        .collect();

    // Snapshot rows the declared types cannot hold, per source: diverted to
    // dead_letter once its sink is open (below).
    let mut snapshot_rejected = Vec::new();
    match start {
        Start::Fresh {
            lsn,
            snapshots,
            origin,
        } => {
            engine.backfill.origin = Some(origin);
            for (index, rows, rejected) in snapshots {
                let dimension = engine.dimensions[index]
                    .as_mut()
                    .expect("snapshots are of dimension sources");
                dimension.apply(&rows).map_err(JobError::Arrow)?;
                snapshot_rejected.push((index, rejected));
            }
            engine.resume_lsn = lsn;
        }
        Start::Resume => {
            let latest = latest.as_ref().expect("resumed from a checkpoint");
            engine.warn_changed_udfs(&latest.udfs);
            let restore = restore.as_ref().expect("a latest checkpoint exists");
            engine.restore_dimensions(restore).await?;
            // A thinned checkpoint has no window state: the windows go on
            // from the newest one, and the replay feeds only the other sinks.
            let windows_from = if restore.kept.is_everything() {
                restore
            } else {
                latest
            };
            engine.restore_windows(windows_from, latest).await?;
            engine.epoch = latest.epoch;
            engine.backfill.restore(latest);
            engine.resume_lsn = latest.source.resume_lsn;
            engine.position = latest.source.position;
        }
    }
    engine
        .stats
        .confirmed_lsn
        .store(engine.resume_lsn, Ordering::Relaxed);
    engine
        .stats
        .processed_lsn
        .store(engine.resume_lsn, Ordering::Relaxed);

    if let Err(error) = engine.open_sinks(spec, latest.as_ref()).await {
        pg.abandon_new_slot().await;
        return Err(error);
    }
    for (source, rejected) in snapshot_rejected {
        engine.divert_rejected(source, &rejected).await?;
    }

    // Re-sent changes up to here are already in some sink (counted as suppressed).
    engine.applied_upto = engine
        .sinks
        .iter()
        .map(SinkTask::position)
        .max()
        .unwrap_or(Position::ZERO)
        .max(engine.position);
    let mut summary = RunSummary::default();
    match &latest {
        None => {
            engine.dirty = true;
            engine.checkpoint().await?;
        }
        Some(latest) => engine.rebuild_lost_sinks(latest).await?,
    }
    if let (Some(from), Some(latest)) = (options.replay_from, &latest) {
        let thinned = restore.as_ref().is_some_and(|r| !r.kept.is_everything());
        if thinned {
            let unwindowed = (0..engine.plan.queries.len())
                .filter(|&q| !engine.plan.queries[q].is_windowed())
                .collect();
            engine.rebuilding = Some(unwindowed);
        }
        summary.replayed_changes = engine.replay(from, latest.epoch).await?;
        engine.rebuilding = None;
    }

    let mut source = pg
        .stream(
            &engine.plan.sources,
            engine.resume_lsn,
            options.end_lsn,
            options.batching,
        )
        .await?;
    // Streaming: from here on a curable failure restarts the run (supervise.rs).
    engine
        .stats
        .checkpoint_epoch
        .fetch_max(engine.epoch, Ordering::Relaxed);
    engine.last_change = Instant::now();
    engine.caught_up = false;
    let outcome = engine
        .stream(
            &mut source,
            &pg.control,
            options.checkpoint_interval,
            shutdown,
        )
        .await;
    source.stop();
    engine.close_sinks().await;
    outcome?;
    summary.changes = engine.stats.changes_in.load(Ordering::Relaxed);
    summary.last_checkpoint = Some(engine.epoch);
    Ok(summary)
}

struct Engine {
    job: String,
    sql_hash: String,
    plan: JobPlan,
    /// One sink per query, same index, each on its own task.
    sinks: Vec<SinkTask>,
    /// By source index: the in-memory table of each dimension source.
    dimensions: Vec<Option<Dimension>>,
    store: CheckpointStore,
    capture: CaptureLog,
    epoch: u64,
    /// End LSN of the last processed commit: where streaming resumes.
    resume_lsn: u64,
    position: Position,
    /// No transaction is partly processed.
    at_boundary: bool,
    /// Something changed since the last checkpoint.
    dirty: bool,
    slot: String,
    stats: Arc<JobStats>,
    retention: Retention,
    /// The state of every windowed aggregate.
    windows: windowed::WindowStates,
    /// Per query and aggregate: windows ending at or before this are already in the sink.
    window_guards: Vec<Vec<Option<i64>>>,
    /// Per windowed query: commit times of the changes no window written to
    /// its sink reflects yet (for the commit → visible histograms).
    window_commits: Vec<crate::engine::latency::CommitTimes>,
    /// Per query: the last window written to its sink (end, rows), kept in
    /// checkpoints so a sink whose store lost its data can be rewritten.
    last_windows: Vec<Option<(i64, Vec<RecordBatch>)>>,
    /// When the last change batch arrived (idle sources advance watermarks by the clock).
    last_change: Instant,
    /// The source said it has nothing pending since the last change batch
    /// (see [`windowed`]: only then does the wall clock drive watermarks).
    caught_up: bool,
    /// The batch being processed arrived while the job was caught up.
    live_batch: bool,
    /// How late live events arrive: the wall clock's allowance (clock.rs).
    arrival_lag: clock::ArrivalLag,
    /// Where late events go, if the job declares a `late_events` table.
    late_sink: Option<SinkTask>,
    /// Where rows failing a CHECK go, if the job declares a `dead_letter` table.
    dead_letter_sink: Option<SinkTask>,
    /// Warn when the slot retains more WAL than this.
    warn_retained_wal_bytes: u64,
    /// [`RunOptions::checkpoint_max_changes`].
    max_changes: u64,
    /// The highest position any sink held at start: re-sent changes up to it
    /// are counted in [`JobStats::resent_suppressed`].
    applied_upto: Position,
    /// The detached sink holding the least, and its position, as of the last
    /// checkpoint: the slot is confirmed no further, and the checkpoints it
    /// will be caught up from are kept.
    held_by: Option<(String, Position)>,
    /// While lost sinks are rebuilt: their query indexes. Only they are fed;
    /// windows, side outputs and every other sink are left alone.
    rebuilding: Option<Vec<usize>>,
    /// Rows a UDF panicked on, left out of the steps calling it (udf_errors.rs).
    poisoned: udf_errors::SharedPoisoned,
    /// The backfill under way and those that ended (backfill.rs).
    backfill: backfill::Backfill,
}

impl Engine {
    /// Function name -> library hash of the UDFs this run loaded.
    fn udf_hashes(&self) -> std::collections::BTreeMap<String, String> {
        self.plan
            .udfs
            .iter()
            .map(|u| (u.name().to_string(), u.library_sha256.clone()))
            .collect()
    }

    /// A restart with other UDF libraries than the checkpoint's goes on, with
    /// a warning: outputs before and after may differ (as with changed SQL).
    fn warn_changed_udfs(&self, checkpointed: &std::collections::BTreeMap<String, String>) {
        let now = self.udf_hashes();
        for (name, hash) in &now {
            match checkpointed.get(name) {
                Some(old) if old != hash => tracing::warn!(
                    udf = name,
                    "the UDF library changed since the checkpoint: rows before and after may differ"
                ),
                None if !checkpointed.is_empty() => {
                    tracing::info!(udf = name, "a UDF the checkpoint did not use")
                }
                _ => {}
            }
        }
        for name in checkpointed.keys().filter(|n| !now.contains_key(*n)) {
            tracing::warn!(udf = name, "a UDF of the checkpoint is not loaded any more");
        }
    }

    async fn stream(
        &mut self,
        source: &mut SourceHandle,
        control: &tokio_postgres::Client,
        interval: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), JobError> {
        tokio::pin!(shutdown);
        self.stats.streaming.store(true, Ordering::Relaxed);
        self.stats
            .checkpoint_interval_ms
            .store(interval.as_millis() as u64, Ordering::Relaxed);
        let result = self.stream_until(source, control, interval, shutdown).await;
        self.stats.streaming.store(false, Ordering::Relaxed);
        result
    }

    async fn stream_until(
        &mut self,
        source: &mut SourceHandle,
        control: &tokio_postgres::Client,
        interval: Duration,
        shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), JobError> {
        let mut shutdown = shutdown;
        // Checked after every event too: under a backlog the source branch is
        // always ready and would starve a timer, letting one epoch grow unbounded.
        let mut next_checkpoint = Instant::now() + interval;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lag_probe = Instant::now();
        let mut last_warning = Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now);
        let has_windows = self.plan.queries.iter().any(|q| q.is_windowed());
        let mut window_ticker = tokio::time::interval(Duration::from_millis(50));
        window_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut backfill_ticker = tokio::time::interval(Duration::from_millis(20));
        backfill_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Backfill requests are looked for after each checkpoint, and on
        // this clock while the job is idle (no checkpoint is then due).
        let mut next_request_poll = Instant::now() + interval;
        self.backfill_run_starts(control).await?;
        self.poll_backfill_requests().await?;
        // When the backfill may work next: after a step of d, the live
        // stream has the loop to itself for d, so a backfill takes at most
        // half of it.
        let mut backfill_due = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                event = source.events.recv() => {
                    let event = event.ok_or_else(|| SourceError::Stream {
                        target: "postgres".into(),
                        message: "the replication reader stopped".into(),
                    })??;
                    if let SourceEvent::End { lsn } = event {
                        tracing::info!(lsn = %format_lsn(lsn), "reached the end LSN");
                        break;
                    }
                    let started = Instant::now();
                    self.handle(event).await?;
                    slow_step("source event", started);
                }
                _ = ticker.tick() => {}
                // After the source, never before: events already received
                // must be seen before the clock may close their windows.
                _ = window_ticker.tick(), if has_windows => {
                    let started = Instant::now();
                    self.tick_windows().await?;
                    slow_step("window tick", started);
                }
                _ = backfill_ticker.tick(), if self.backfill.active() => {}
            }
            if self.backfill.active() && Instant::now() >= backfill_due {
                let started = Instant::now();
                self.backfill_failed()?;
                self.backfill_tick().await?;
                backfill_due = Instant::now() + started.elapsed();
                slow_step("backfill", started);
            }
            if Instant::now() >= next_request_poll {
                next_request_poll = Instant::now() + interval;
                if !self.dirty {
                    self.poll_backfill_requests().await?;
                }
            }
            // A detached sink is asked at every checkpoint whether its store
            // answers again, so checkpoints go on while it is detached.
            let due = self.dirty || self.held_by.is_some();
            // Under a backlog an epoch fills long before the interval ends.
            let full = self.max_changes > 0 && self.capture.rows() >= self.max_changes;
            if (Instant::now() >= next_checkpoint || full)
                && self.at_boundary
                && due
                && self.backfill.allows_checkpoint()
            {
                let started = Instant::now();
                self.checkpoint().await?;
                slow_step("checkpoint", started);
                crate::failpoint::hit("before_slot_confirm");
                source.confirm(self.confirm_lsn());
                next_checkpoint = Instant::now() + interval;
                if let Some(sink) = self.sinks.iter().find(|sink| sink.reachable_again()) {
                    return Err(JobError::Sink(SinkError::Transient {
                        sink: sink.name().to_string(),
                        message: "its store answers again after the sink was detached: restarting the run to \
                                  catch it up from the checkpoints"
                            .into(),
                    }));
                }
            }
            self.stats.server_wal_end.fetch_max(
                source.server_wal_end.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            if lag_probe.elapsed() > Duration::from_secs(5) {
                lag_probe = Instant::now();
                if let Some(behind) = setup::wal_behind(control, self.resume_lsn).await {
                    let confirmed = self.stats.confirmed_lsn.load(Ordering::Relaxed);
                    self.stats
                        .server_wal_end
                        .fetch_max(confirmed + behind, Ordering::Relaxed);
                }
                let retained = self.stats.replication_lag_bytes();
                if retained > self.warn_retained_wal_bytes
                    && last_warning.elapsed() > Duration::from_secs(60)
                {
                    last_warning = Instant::now();
                    tracing::warn!(
                        retained_mib = retained >> 20,
                        threshold_mib = self.warn_retained_wal_bytes >> 20,
                        held_by_detached_sink = self.held_by.as_ref().map(|(sink, _)| sink.as_str()),
                        "the replication slot retains more WAL than the warning threshold: the job is behind, or \
                         checkpoints cannot complete; Postgres keeps this WAL until the job confirms it"
                    );
                }
            }
        }
        // A final checkpoint needs a transaction boundary: finish the open one.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.at_boundary && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(1), source.events.recv()).await {
                Ok(Some(Ok(SourceEvent::End { .. }))) => break,
                Ok(Some(event)) => self.handle(event?).await?,
                Ok(None) => break,
                Err(_) => continue,
            }
        }
        // Historical windows half written would be written again, whole,
        // after a restart: finish writing them first.
        self.finish_history_writes().await?;
        if self.at_boundary {
            if self.dirty {
                self.checkpoint().await?;
                source.confirm(self.confirm_lsn());
                // Give the reader a moment to send the confirmation.
                tokio::time::sleep(Duration::from_millis(1200)).await;
            }
        } else {
            tracing::warn!(
                epoch = self.epoch,
                "stopped inside a transaction; the next start resumes from the last checkpoint"
            );
        }
        Ok(())
    }

    /// Applies one source event.
    async fn handle(&mut self, event: SourceEvent) -> Result<(), JobError> {
        {
            match event {
                SourceEvent::Changes {
                    source,
                    batch,
                    before,
                    rejected,
                    commit_end,
                } => {
                    tracing::trace!(source, rows = batch.num_rows(), commit_end = ?commit_end.map(format_lsn), "changes");
                    self.live_batch = self.caught_up;
                    self.caught_up = false;
                    self.divert_rejected(source, &rejected).await?;
                    self.backfill_saw(source, &batch)?;
                    let (batch, before) = self.drop_resent(batch, before)?;
                    let name = self.plan.sources[source].def.name.clone();
                    let capture_error = |e| JobError::State {
                        what: format!("failed to capture changes of `{name}`"),
                        source: e,
                    };
                    // Old images first: replay pairs them with the batch that follows.
                    if let Some(before) = &before {
                        self.capture
                            .append(&format!("{name}{BEFORE_SUFFIX}"), before)
                            .await
                            .map_err(capture_error)?;
                    }
                    self.capture
                        .append(&name, &batch)
                        .await
                        .map_err(capture_error)?;
                    self.process(source, batch, before).await?;
                    self.last_change = Instant::now();
                    match commit_end {
                        Some(end) => {
                            self.resume_lsn = self.resume_lsn.max(end);
                            self.at_boundary = true;
                            self.stats.processed_lsn.fetch_max(end, Ordering::Relaxed);
                        }
                        None => self.at_boundary = false,
                    }
                }
                SourceEvent::Idle { lsn } => {
                    tracing::trace!(lsn = %format_lsn(lsn), at_boundary = self.at_boundary, "idle");
                    // Nothing pending at the server: only now may the clock drive watermarks.
                    self.caught_up = true;
                    self.backfill_idle(lsn);
                    if self.at_boundary && lsn > self.resume_lsn {
                        self.resume_lsn = lsn;
                        self.dirty = true;
                        self.stats.processed_lsn.fetch_max(lsn, Ordering::Relaxed);
                    }
                }
                SourceEvent::Truncated { source, .. } => match &mut self.dimensions[source] {
                    Some(dimension) => {
                        dimension.clear();
                        self.dirty = true;
                    }
                    None => {
                        self.stats.truncates_ignored.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            table = %self.plan.sources[source].def.name,
                            "TRUNCATE has no rows to deliver; sinks keep what they hold"
                        );
                    }
                },
                SourceEvent::Marker {
                    content,
                    position,
                    commit_end,
                } => {
                    self.live_batch = self.caught_up;
                    self.caught_up = false;
                    self.backfill_marker(&content, position).await?;
                    self.resume_lsn = self.resume_lsn.max(commit_end);
                    self.at_boundary = true;
                    self.dirty = true;
                    self.stats
                        .processed_lsn
                        .fetch_max(commit_end, Ordering::Relaxed);
                }
                SourceEvent::End { .. } => {}
            }
            Ok(())
        }
    }
}

/// A short stable hash of the job SQL (FNV-1a), recorded in manifests.
fn sql_hash(script: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in script.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Logs (at debug) a step of the engine's loop that held it long enough to
/// be seen in freshness: nothing else runs on the loop meanwhile.
fn slow_step(what: &str, started: Instant) {
    let elapsed = started.elapsed();
    if elapsed >= Duration::from_millis(150) {
        tracing::debug!(
            step = what,
            elapsed_ms = elapsed.as_millis() as u64,
            "slow engine step"
        );
    }
}
