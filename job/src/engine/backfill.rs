//! The engine's side of a backfill (see `crate::backfill` for the
//! algorithm and why it gives every row once): picking up requests, reading
//! chunks under watermarks, emitting their rows at the high watermark,
//! computing the historical windows, and recording progress in checkpoints.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, BooleanArray, Int64Array, TimestampMicrosecondArray};
use arrow::compute::filter_record_batch;
use arrow::record_batch::RecordBatch;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{Engine, JobError};
use crate::backfill::chunk::{self, Chunk, Table};
use crate::backfill::{
    describe, Counts, Finished, Marker, Outcome, Phase, Progress, Request, CANCEL_FILE, HISTORY,
    REQUEST_FILE,
};
use crate::change::{Position, COMMIT_TS_COLUMN, LSN_COLUMN, SEQ_COLUMN};
use crate::checkpoint::{Manifest, StreamOrigin};
use crate::source::replication::SourceError;

mod saved;

/// Chunk sizes: the first, and the bounds the adaptation keeps to.
const FIRST_CHUNK: usize = 2_000;
const MIN_CHUNK: usize = 100;
const MAX_CHUNK: usize = 50_000;
/// What a chunk's `SELECT` should take: short, so the window in which live
/// changes supersede rows stays small.
const CHUNK_TARGET: Duration = Duration::from_millis(250);
/// Rows per read of the historical-windows phase (fed to window state
/// between live batches).
const HISTORY_CHUNK: usize = 5_000;
/// What pushing a chunk's rows through the job should take: the live
/// stream waits meanwhile, so this bounds what a backfill adds to its
/// freshness.
const EMIT_TARGET: Duration = Duration::from_millis(80);
/// What a chunk should take from its emission until every sink has taken
/// up its rows: they queue in the sinks ahead of the live changes that
/// follow them, so this, not the emission alone, is what a chunk adds to
/// live freshness.
const ROUND_TARGET: Duration = Duration::from_millis(300);

/// A backfill's state in the engine.
#[derive(Default)]
pub(super) struct Backfill {
    /// The backfill under way, as the next checkpoint records it.
    pub(super) progress: Option<Progress>,
    /// Backfills that ended, newest last.
    pub(super) finished: Vec<Finished>,
    /// The snapshot the job's stream began at.
    pub(super) origin: Option<StreamOrigin>,
    table: Option<Table>,
    client: Option<Arc<tokio_postgres::Client>>,
    /// The chunk whose low watermark the stream has passed.
    window: Option<Window>,
    /// The chunk being read by this run.
    inflight: Option<InFlight>,
    /// The last chunk emitted, until the sinks have taken up its rows.
    emitted: Option<Emitted>,
    /// Where the WAL ended when this run began streaming, until the
    /// stream has delivered everything before it.
    run_start_wal: Option<u64>,
    /// Chunk files of earlier runs not brought back by then are to go at
    /// the next checkpoint (`saved.rs`).
    sweep_due: bool,
    /// The historical windows being computed (phase `windows`).
    history: Option<History>,
    chunk_size: usize,
    next_chunk: Option<Instant>,
    /// When this run took the backfill up, and its seconds before.
    resumed: Option<(Instant, f64)>,
    /// Chunks saved since the last checkpoint (`saved.rs`), deleted once
    /// one covers them.
    saved: Vec<u64>,
    /// Request files to delete once a checkpoint records why, with the
    /// request they must still hold (`None`: whatever they hold).
    cleanup: Vec<(&'static str, Option<Request>)>,
}

/// A chunk on its way through the sinks.
struct Emitted {
    /// When its emission began.
    at: Instant,
    limit: usize,
}

struct Window {
    nonce: u64,
    cursor: Option<String>,
    limit: usize,
    /// Keys of the table changed by the stream since the low watermark.
    keys: HashSet<String>,
}

struct InFlight {
    nonce: u64,
    /// The chunk, once the task has read it (`ready` then holds it).
    rows: oneshot::Receiver<Result<Chunk, SourceError>>,
    ready: Option<Chunk>,
    /// Set by the task if it could not write the high watermark.
    high_failed: Arc<std::sync::Mutex<Option<SourceError>>>,
    task: JoinHandle<()>,
}

impl InFlight {
    /// The chunk: at hand, or awaited (the task sends it before it writes
    /// the high watermark, so this does not wait for long).
    async fn chunk(mut self) -> Result<Chunk, JobError> {
        if let Some(chunk) = self.ready.take() {
            return Ok(chunk);
        }
        match (&mut self.rows).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(JobError::Restore(
                "a backfill chunk task ended without its rows".into(),
            )),
        }
    }
}

struct History {
    windows: super::windowed::WindowStates,
    cursor: Option<String>,
    reading: Option<JoinHandle<Result<Chunk, SourceError>>>,
    done: bool,
    /// Once every row is read: the windows closed and still to write.
    closed: Option<std::collections::VecDeque<super::windowed::ClosedWindow>>,
    /// The next query whose windows to close (one per step).
    closing: usize,
}

impl Drop for Backfill {
    fn drop(&mut self) {
        if let Some(inflight) = &self.inflight {
            inflight.task.abort();
        }
        if let Some(reading) = self.history.as_ref().and_then(|h| h.reading.as_ref()) {
            reading.abort();
        }
    }
}

impl Backfill {
    /// Whether a checkpoint may be taken now: not while a chunk's window is
    /// open (a checkpoint between its watermarks would let a restart lose
    /// the window, then emit the chunk a second time under a new one), nor
    /// while historical windows are being written (a restart computes them
    /// again, and would write those the checkpoint committed twice).
    pub(super) fn allows_checkpoint(&self) -> bool {
        self.window.is_none() && self.history.as_ref().is_none_or(|h| h.closed.is_none())
    }

    /// Whether a backfill is under way.
    pub(super) fn active(&self) -> bool {
        self.progress.is_some()
    }

    /// Takes up what `latest` records.
    pub(super) fn restore(&mut self, latest: &Manifest) {
        self.progress = latest.backfill.clone();
        self.finished = latest.backfills.clone();
        self.origin = latest.source.origin.clone();
    }
}

impl Engine {
    /// Reads the request and cancel files beside the checkpoints (at start
    /// and after each checkpoint).
    pub(super) async fn poll_backfill_requests(&mut self) -> Result<(), JobError> {
        if let Some(bytes) = self.store.get_control(CANCEL_FILE).await? {
            let id = String::from_utf8_lossy(&bytes).trim().to_string();
            match &self.backfill.progress {
                Some(progress) if progress.request.id == id || id.is_empty() => {
                    tracing::info!(backfill = %progress.request.id, "backfill cancelled");
                    self.finish_backfill(Outcome::Cancelled);
                }
                _ => {}
            }
            self.backfill.cleanup.push((CANCEL_FILE, None));
        }
        if self.backfill.active() {
            return Ok(());
        }
        let Some(bytes) = self.store.get_control(REQUEST_FILE).await? else {
            return Ok(());
        };
        let request: Request = match serde_json::from_slice(&bytes) {
            Ok(request) => request,
            Err(error) => {
                tracing::error!(error = %error, file = REQUEST_FILE, "unreadable backfill request; ignored");
                self.backfill.cleanup.push((REQUEST_FILE, None));
                return Ok(());
            }
        };
        if self.backfill.finished.iter().any(|f| {
            // Done, or cancelled after this request was made (a request
            // made after the cancel asks for it again: it resumes).
            f.request.id == request.id
                && (f.outcome == Outcome::Completed || request.requested_at <= f.finished_at)
        }) {
            self.backfill.cleanup.push((REQUEST_FILE, Some(request)));
            return Ok(());
        }
        let table = match chunk::table_for(&self.plan.sources, Some(&request.table)) {
            Ok(table) => table,
            Err(message) => {
                tracing::error!(backfill = %request.id, "{message}; request ignored");
                self.backfill.cleanup.push((REQUEST_FILE, Some(request)));
                return Ok(());
            }
        };
        let client = self.backfill_client(&table).await?;
        let estimate = chunk::estimate(&client, &table, &request).await?;
        if self.backfill.origin.is_none() {
            tracing::warn!(
                "this job's checkpoints do not record the snapshot its stream began at (they predate it): the \
                 backfill treats every row as never streamed, so rows the stream delivered appear again as `r`"
            );
        }
        tracing::info!(backfill = %request.id, table = %request.table, range = %request.range(), estimate, "backfill starts");
        // The same backfill, cancelled before: it resumes where it stopped.
        let cancelled = self
            .backfill
            .finished
            .iter()
            .position(|f| f.request.id == request.id);
        let (cursor, counts, seconds) = match cancelled {
            Some(i) => {
                let before = self.backfill.finished.remove(i);
                tracing::info!(backfill = %request.id, cursor = ?before.cursor, "the cancelled backfill resumes where it stopped");
                (before.cursor, before.counts, before.seconds)
            }
            None => (None, Counts::default(), 0.0),
        };
        self.backfill.progress = Some(Progress {
            request,
            phase: Phase::Snapshot,
            cursor,
            estimate,
            counts,
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            seconds,
        });
        self.dirty = true;
        Ok(())
    }

    /// Deletes the request files whose outcome the checkpoint just written records.
    pub(super) async fn backfill_checkpointed(&mut self) -> Result<(), JobError> {
        if std::mem::take(&mut self.backfill.sweep_due) {
            let swept = self.sweep_chunks().await?;
            if swept > 0 {
                tracing::info!(
                    files = swept,
                    "deleted backfill chunk files an earlier run left behind"
                );
            }
        }
        for nonce in std::mem::take(&mut self.backfill.saved) {
            self.forget_chunk(nonce).await?;
        }
        for (file, expected) in std::mem::take(&mut self.backfill.cleanup) {
            // A request for the next backfill (or the same one, asked again)
            // may have replaced the one that just ended: that one stays.
            if let Some(expected) = expected {
                let current = self.store.get_control(file).await?;
                let same = current
                    .and_then(|bytes| serde_json::from_slice::<Request>(&bytes).ok())
                    .is_some_and(|request| request == expected);
                if !same {
                    continue;
                }
            }
            self.store.delete_control(file).await?;
        }
        self.poll_backfill_requests().await
    }

    async fn backfill_client(
        &mut self,
        table: &Table,
    ) -> Result<Arc<tokio_postgres::Client>, JobError> {
        if let Some(client) = &self.backfill.client {
            if !client.is_closed() {
                return Ok(client.clone());
            }
        }
        let client = Arc::new(table.connect().await?);
        self.backfill.client = Some(client.clone());
        Ok(client)
    }

    /// What reading the active backfill's rows takes: its table, a
    /// connection, its request.
    async fn backfill_reader(
        &mut self,
    ) -> Result<(Table, Arc<tokio_postgres::Client>, Request), JobError> {
        let table = self.backfill_table()?;
        let client = self.backfill_client(&table).await?;
        let progress = self
            .backfill
            .progress
            .as_ref()
            .expect("a backfill is active");
        Ok((table, client, progress.request.clone()))
    }

    fn backfill_table(&mut self) -> Result<Table, JobError> {
        if let Some(table) = &self.backfill.table {
            return Ok(table.clone());
        }
        let progress = self
            .backfill
            .progress
            .as_ref()
            .expect("a backfill is active");
        let table = chunk::table_for(&self.plan.sources, Some(&progress.request.table))
            .map_err(JobError::Restore)?;
        self.backfill.table = Some(table.clone());
        Ok(table)
    }

    /// Moves the backfill on: starts the next chunk when none is open, or
    /// reads on for the historical windows. Called from the streaming loop.
    pub(super) async fn backfill_tick(&mut self) -> Result<(), JobError> {
        let Some(progress) = &self.backfill.progress else {
            return Ok(());
        };
        if self.backfill.resumed.is_none() {
            self.backfill.resumed = Some((Instant::now(), progress.seconds));
        }
        let phase = progress.phase;
        self.update_backfill_stats();
        match phase {
            Phase::Snapshot => self.start_chunk().await,
            Phase::Windows => self.read_history(true).await,
        }
    }

    async fn start_chunk(&mut self) -> Result<(), JobError> {
        if self.backfill.window.is_some() || self.backfill.inflight.is_some() {
            return Ok(());
        }
        if self
            .backfill
            .next_chunk
            .is_some_and(|at| Instant::now() < at)
        {
            return Ok(());
        }
        if !self.sinks_caught_up() {
            return Ok(());
        }
        self.adapt_to_sinks();
        let table = self.backfill_table()?;
        let client = self.backfill_client(&table).await?;
        let progress = self.backfill.progress.as_ref().expect("active");
        if self.backfill.chunk_size == 0 {
            let most = progress
                .request
                .max_rate
                .map_or(MAX_CHUNK, |rate| (rate as usize / 4).max(MIN_CHUNK));
            self.backfill.chunk_size = FIRST_CHUNK.min(most);
        }
        let limit = self.backfill.chunk_size;
        let nonce: u64 = rand::random();
        let low = Marker {
            job: self.job.clone(),
            id: progress.request.id.clone(),
            nonce,
            high: false,
            cursor: progress.cursor.clone(),
            limit,
        };
        let request = progress.request.clone();
        let origin = self.backfill.origin.clone();
        let (send, rows) = oneshot::channel();
        let high_failed = Arc::new(std::sync::Mutex::new(None));
        let high_failed_by_task = high_failed.clone();
        let task = tokio::spawn(async move {
            let result = async {
                chunk::emit_marker(&client, &table, &low).await?;
                let chunk = chunk::read(
                    &client,
                    &table,
                    &request,
                    origin.as_ref(),
                    low.cursor.as_deref(),
                    limit,
                )
                .await?;
                Ok::<_, SourceError>(chunk)
            }
            .await;
            let failed = result.is_err();
            // The rows are handed over before the high watermark is written,
            // so the engine has them when the stream reaches it.
            let _ = send.send(result);
            if !failed {
                let high = Marker { high: true, ..low };
                if let Err(error) = chunk::emit_marker(&client, &table, &high).await {
                    *high_failed_by_task.lock().expect("not poisoned") = Some(error);
                }
            }
        });
        self.backfill.inflight = Some(InFlight {
            nonce,
            rows,
            ready: None,
            high_failed,
            task,
        });
        Ok(())
    }

    /// Whether every sink that is not detached has taken up what it was
    /// sent. The backfill reads its next chunk (or writes its next slice of
    /// historical windows) only then: what it sends queues in the sinks
    /// ahead of live changes, so it must not pile up there.
    fn sinks_caught_up(&self) -> bool {
        self.each_sink()
            .all(|sink| sink.detached() || sink.queued() == 0)
    }

    /// Shrinks the chunk size when the last chunk took longer than
    /// [`ROUND_TARGET`] from its emission until the sinks took it up.
    fn adapt_to_sinks(&mut self) {
        let Some(emitted) = self.backfill.emitted.take() else {
            return;
        };
        let round = emitted.at.elapsed().max(Duration::from_millis(1));
        if round <= ROUND_TARGET {
            return;
        }
        let by_round = emitted.limit as f64 * ROUND_TARGET.as_secs_f64() / round.as_secs_f64();
        let by_round = (by_round.max(emitted.limit as f64 / 2.0) as usize).max(MIN_CHUNK);
        self.backfill.chunk_size = self.backfill.chunk_size.min(by_round);
    }

    /// A chunk task that failed before its high watermark: its error.
    pub(super) fn backfill_failed(&mut self) -> Result<(), JobError> {
        let Some(inflight) = &mut self.backfill.inflight else {
            return Ok(());
        };
        // Without its high watermark the chunk's window would stay open:
        // the run restarts, and the next one reads the chunk again.
        let high_failed = inflight.high_failed.lock().expect("not poisoned").take();
        if let Some(error) = high_failed {
            self.backfill.inflight = None;
            self.backfill.window = None;
            return Err(error.into());
        }
        if inflight.ready.is_some() {
            return Ok(());
        }
        match inflight.rows.try_recv() {
            Ok(Ok(chunk)) => inflight.ready = Some(chunk),
            Ok(Err(error)) => {
                self.backfill.inflight = None;
                self.backfill.window = None;
                return Err(error.into());
            }
            Err(_) => {}
        }
        Ok(())
    }

    /// Notes where the WAL ends as this run starts streaming: a chunk
    /// window an earlier run opened and never closed is given up once the
    /// stream has delivered everything before it (see [`Self::backfill_idle`]).
    pub(super) async fn backfill_run_starts(
        &mut self,
        control: &tokio_postgres::Client,
    ) -> Result<(), JobError> {
        let row = control
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| SourceError::Stream {
                target: "postgres".into(),
                message: format!("failed to read where the WAL ends (pg_current_wal_lsn()): {e}"),
            })?;
        let text: String = row.get(0);
        self.backfill.run_start_wal = crate::change::parse_lsn(&text);
        Ok(())
    }

    /// The stream has delivered every commit before `lsn`. A chunk window
    /// opened by an earlier run's low watermark whose high watermark has
    /// not come by this run's start never closes (that run stopped between
    /// the two): it is given up, and the chunk is read again under a new
    /// one. No row of it was emitted, and the cursor has not moved. Chunk
    /// files no watermark brought back by then go at the next checkpoint.
    pub(super) fn backfill_idle(&mut self, lsn: u64) {
        if self.backfill.run_start_wal.is_none_or(|start| lsn < start) {
            return;
        }
        self.backfill.run_start_wal = None;
        self.backfill.sweep_due = true;
        // A window that is not this run's chunk's: its low watermark was
        // written by an earlier run and streamed again after a restart, and
        // its high one, if that run wrote it, came before this run's start.
        let inflight = self.backfill.inflight.as_ref();
        let earlier_run = self
            .backfill
            .window
            .as_ref()
            .is_some_and(|window| inflight.is_none_or(|i| i.nonce != window.nonce));
        if earlier_run {
            let window = self.backfill.window.take().expect("checked above");
            tracing::info!(
                nonce = window.nonce,
                "a backfill chunk's high watermark never came (an earlier run stopped between its \
                 watermarks): the chunk is read again"
            );
        }
    }

    /// Keys of the backfilled table that the stream changes while a chunk's window is open.
    pub(super) fn backfill_saw(
        &mut self,
        source: usize,
        batch: &RecordBatch,
    ) -> Result<(), JobError> {
        let (Some(window), Some(table)) = (&mut self.backfill.window, &self.backfill.table) else {
            return Ok(());
        };
        if source != table.source || batch.num_rows() == 0 {
            return Ok(());
        }
        let keys = chunk::key_texts(batch, &table.key).map_err(JobError::Arrow)?;
        for key in keys.iter().flatten() {
            if !window.keys.contains(key) {
                window.keys.insert(key.to_string());
            }
        }
        Ok(())
    }

    /// A watermark reached by the stream, at `position`.
    pub(super) async fn backfill_marker(
        &mut self,
        content: &[u8],
        position: Position,
    ) -> Result<(), JobError> {
        let Some(marker) = Marker::decode(content) else {
            tracing::warn!("an `engage.backfill` message engage cannot read; ignored");
            return Ok(());
        };
        let Some(progress) = &self.backfill.progress else {
            return Ok(());
        };
        let current = marker.job == self.job
            && progress.request.id == marker.id
            && progress.cursor == marker.cursor
            && progress.phase == Phase::Snapshot;
        tracing::debug!(
            nonce = %format!("{:016x}", marker.nonce),
            high = marker.high,
            %position,
            current,
            cursor = ?marker.cursor,
            window = ?self.backfill.window.as_ref().map(|w| format!("{:016x}", w.nonce)),
            inflight = ?self.backfill.inflight.as_ref().map(|i| format!("{:016x}", i.nonce)),
            "backfill watermark"
        );
        if !marker.high {
            if current {
                self.backfill_table()?;
                self.backfill.window = Some(Window {
                    nonce: marker.nonce,
                    cursor: marker.cursor,
                    limit: marker.limit,
                    keys: HashSet::new(),
                });
            }
            return Ok(());
        }
        let ours = self
            .backfill
            .inflight
            .as_ref()
            .is_some_and(|i| i.nonce == marker.nonce);
        let open = self
            .backfill
            .window
            .as_ref()
            .is_some_and(|w| w.nonce == marker.nonce);
        // A watermark an earlier run wrote and emitted (its rows are
        // saved), streamed again: the same rows, at the same positions, so
        // the sinks that hold them drop them and the cursor moves past
        // them. Also when this run did not see its low watermark, as long
        // as the cursor is still the chunk's: reading the range again under
        // a new chunk would put its rows at new positions, which no sink
        // could tell from new rows. (No checkpoint falls between a chunk's
        // watermarks, so the low one is not expected to be missed: the
        // reader once let one, and this kept the Kafka topic right then.)
        if !ours && (open || current) {
            if let Some(prepared) = self.load_chunk(marker.nonce).await? {
                if open {
                    self.backfill.window = None;
                }
                return self.emit_prepared(prepared).await;
            }
        }
        if !open {
            if ours {
                // Its low watermark came before a checkpoint this run
                // restored from, or was superseded: read the chunk again.
                self.backfill.inflight = None;
            }
            return Ok(());
        }
        let window = self.backfill.window.take().expect("open");
        let chunk = match self.backfill.inflight.take() {
            Some(inflight) if inflight.nonce == marker.nonce => inflight.chunk().await?,
            other => {
                // Written before a restart and never emitted: read now, at
                // its place in the stream.
                self.backfill.inflight = other;
                let (table, client, request) = self.backfill_reader().await?;
                chunk::read(
                    &client,
                    &table,
                    &request,
                    self.backfill.origin.as_ref(),
                    window.cursor.as_deref(),
                    window.limit,
                )
                .await?
            }
        };
        self.emit_chunk(chunk, &window, position).await
    }

    /// Emits a chunk's rows that the stream neither changed in its window
    /// nor delivered already, at `position`, and moves the cursor on. The
    /// rows are saved beside the checkpoints first (`saved.rs`), so the
    /// same high watermark streamed again after a crash emits the same rows.
    async fn emit_chunk(
        &mut self,
        chunk: Chunk,
        window: &Window,
        position: Position,
    ) -> Result<(), JobError> {
        let emitting = Instant::now();
        let table = self.backfill_table()?;
        let rows = &chunk.rows;
        let keys = chunk::key_texts(rows, &table.key).map_err(JobError::Arrow)?;
        let (mut superseded, mut streamed) = (0u64, 0u64);
        let keep: BooleanArray = (0..rows.num_rows())
            .map(|i| {
                if window.keys.contains(keys.value(i)) {
                    superseded += 1;
                    Some(false)
                } else if !chunk.unstreamed.value(i) {
                    streamed += 1;
                    Some(false)
                } else {
                    Some(true)
                }
            })
            .collect();
        let kept = filter_record_batch(rows, &keep).map_err(JobError::Arrow)?;
        let kept = at_position(&kept, position).map_err(JobError::Arrow)?;
        let emitted = kept.num_rows() as u64;
        let mut rejected = chunk.rejected;
        for (i, change) in rejected.iter_mut().enumerate() {
            change.position = Position::new(position.lsn, position.seq + emitted + i as u64);
        }
        let prepared = saved::Prepared {
            rows: kept,
            summary: saved::Summary {
                read: rows.num_rows() as u64 + rejected.len() as u64,
                superseded,
                streamed,
                last_key: chunk.last_key,
                last: chunk.last,
                rejected,
            },
        };
        self.save_chunk(window.nonce, &prepared).await?;
        self.emit_prepared(prepared).await?;
        self.backfill.emitted = Some(Emitted {
            at: emitting,
            limit: window.limit,
        });
        // Adapt the chunk size to keep each SELECT, and the rows' trip
        // through the job, near their targets.
        let elapsed = chunk.elapsed.max(Duration::from_millis(1));
        self.stats
            .backfill
            .chunk_micros
            .store(chunk.elapsed.as_micros() as u64, Ordering::Relaxed);
        let emitted_in = emitting.elapsed().max(Duration::from_millis(1));
        let by_select = window.limit as f64 * CHUNK_TARGET.as_secs_f64() / elapsed.as_secs_f64();
        let by_emit = window.limit as f64 * EMIT_TARGET.as_secs_f64() / emitted_in.as_secs_f64();
        let scaled = by_select
            .min(by_emit)
            .clamp(window.limit as f64 / 2.0, window.limit as f64 * 2.0);
        let progress = self.backfill.progress.as_ref().expect("active");
        // Under --max-rate, a chunk is at most a quarter second of it, so
        // the rate holds from one chunk to the next.
        let most = progress
            .request
            .max_rate
            .map_or(MAX_CHUNK, |rate| (rate as usize / 4).max(MIN_CHUNK));
        self.backfill.chunk_size = (scaled as usize).clamp(MIN_CHUNK, MAX_CHUNK).min(most);
        Ok(())
    }

    /// Pushes a prepared chunk through the job and records it in the
    /// backfill's progress.
    async fn emit_prepared(&mut self, prepared: saved::Prepared) -> Result<(), JobError> {
        let table = self.backfill_table()?;
        let saved::Prepared { rows, summary } = prepared;
        let emitted = rows.num_rows() as u64;
        let written = self.written_so_far();
        self.divert_rejected(table.source, &summary.rejected)
            .await?;
        if emitted > 0 {
            let capture_error = |e| JobError::State {
                what: format!("failed to capture backfilled rows of `{}`", table.name),
                source: e,
            };
            self.capture
                .append(&table.name, &rows)
                .await
                .map_err(capture_error)?;
            self.process(table.source, rows, None).await?;
        }
        self.dirty = true;
        self.count_written(written);
        let progress = self.backfill.progress.as_mut().expect("active");
        progress.counts.read += summary.read;
        progress.counts.emitted += emitted;
        progress.counts.superseded += summary.superseded;
        progress.counts.streamed += summary.streamed;
        progress.counts.chunks += 1;
        if let Some(rate) = progress.request.max_rate.filter(|r| *r > 0) {
            self.backfill.next_chunk =
                Some(Instant::now() + Duration::from_secs_f64(summary.read as f64 / rate as f64));
        }
        if summary.last_key.is_some() {
            progress.cursor = summary.last_key;
        }
        if summary.last {
            progress.phase = Phase::Windows;
            tracing::info!("{}", describe(progress));
        }
        self.update_backfill_stats();
        Ok(())
    }

    /// Phase `windows`: reads the whole range once more, in key order,
    /// into fresh window state, then writes its closed windows.
    /// `paced`: wait for the sinks between slices of historical windows
    /// (not when the job is stopping and writes what is left at once).
    async fn read_history(&mut self, paced: bool) -> Result<(), JobError> {
        if self.backfill.history.is_none() {
            let windows = super::windowed::WindowStates::new(&self.plan)?;
            self.backfill.history = Some(History {
                windows,
                cursor: None,
                reading: None,
                done: false,
                closed: None,
                closing: 0,
            });
        }
        let history = self.backfill.history.as_mut().expect("set above");
        if !history.done && history.reading.is_none() {
            let (table, client, request) = self.backfill_reader().await?;
            let history = self.backfill.history.as_mut().expect("set above");
            let cursor = history.cursor.clone();
            history.reading = Some(tokio::spawn(async move {
                chunk::read(
                    &client,
                    &table,
                    &request,
                    None,
                    cursor.as_deref(),
                    HISTORY_CHUNK,
                )
                .await
            }));
            return Ok(());
        }
        if let Some(reading) = &history.reading {
            if !reading.is_finished() {
                return Ok(());
            }
            let reading = history.reading.take().expect("finished");
            let chunk = reading
                .await
                .map_err(|e| JobError::Restore(format!("backfill window read failed: {e}")))??;
            let history = self.backfill.history.as_mut().expect("set above");
            if chunk.last_key.is_some() {
                history.cursor = chunk.last_key.clone();
            }
            history.done = chunk.last;
            self.feed_history(chunk.rows).await?;
            return Ok(());
        }
        // Every row is in: write the historical windows, a slice at a
        // time between live batches once the sinks took up the last one,
        // then finish.
        if paced && !self.sinks_caught_up() {
            return Ok(());
        }
        let before = self.written_so_far();
        let (written, left) = self.write_history().await?;
        self.count_written(before);
        let progress = self.backfill.progress.as_mut().expect("active");
        progress.counts.windows += written;
        if !left {
            self.finish_backfill(Outcome::Completed);
        }
        Ok(())
    }

    /// Feeds rows of the range to the historical window state. Only rows
    /// before the stream began: later windows are the live path's.
    async fn feed_history(&mut self, rows: RecordBatch) -> Result<(), JobError> {
        let Some(table) = self.backfill.table.clone() else {
            return Ok(());
        };
        let cutoff = self.backfill.origin.as_ref().map(|o| o.at_micros);
        let rows = match cutoff {
            Some(cutoff) => before_time(&rows, &table.time, cutoff).map_err(JobError::Arrow)?,
            None => rows,
        };
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let mut history = self.backfill.history.take().expect("history is being read");
        let result = self
            .feed_windows_apart(&mut history.windows, table.source, &rows)
            .await;
        self.backfill.history = Some(history);
        result
    }

    /// Writes every historical window left to write, if the backfill is
    /// writing them, and finishes it (before a final checkpoint).
    pub(super) async fn finish_history_writes(&mut self) -> Result<(), JobError> {
        while self
            .backfill
            .history
            .as_ref()
            .is_some_and(|h| h.closed.is_some())
        {
            self.read_history(false).await?;
        }
        Ok(())
    }

    /// Closes the next query's historical windows, or writes the next
    /// slice of those closed (once every query's are); returns how many it
    /// wrote and whether any are left.
    async fn write_history(&mut self) -> Result<(u64, bool), JobError> {
        let mut history = self.backfill.history.take().expect("history is being read");
        let result = async {
            let closed = history.closed.get_or_insert_with(Default::default);
            if history.closing < self.plan.queries.len() {
                // One query's windows per step: closing them all at once
                // held the live stream for a quarter of a second.
                let q = history.closing;
                history.closing += 1;
                let progress = self.backfill.progress.as_ref().expect("active");
                let since = progress.request.since;
                let until = progress.request.until.unwrap_or(i64::MAX);
                let cutoff = self
                    .backfill
                    .origin
                    .as_ref()
                    .map_or(i64::MAX, |o| o.at_micros);
                let windows =
                    self.close_windows_apart(&mut history.windows, q, since, until.min(cutoff))?;
                closed.extend(windows);
                return Ok((0, true));
            }
            let written = self.write_windows_apart(closed, EMIT_TARGET).await?;
            Ok((written, !closed.is_empty()))
        }
        .await;
        self.backfill.history = Some(history);
        result
    }

    /// Ends the backfill under way: it moves to the finished list, and its
    /// request file is deleted once a checkpoint records that.
    fn finish_backfill(&mut self, outcome: Outcome) {
        let Some(progress) = self.backfill.progress.take() else {
            return;
        };
        let seconds = self.backfill_seconds(&progress);
        if let Some(inflight) = self.backfill.inflight.take() {
            inflight.task.abort();
        }
        self.backfill.window = None;
        self.backfill.history = None;
        self.backfill.resumed = None;
        self.backfill.chunk_size = 0;
        let mut done = progress.clone();
        done.seconds = seconds;
        tracing::info!(outcome = ?outcome, "{}", describe(&done));
        self.backfill.finished.push(Finished {
            request: progress.request,
            outcome,
            counts: progress.counts,
            seconds,
            finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            cursor: progress.cursor,
        });
        let excess = self.backfill.finished.len().saturating_sub(HISTORY);
        self.backfill.finished.drain(..excess);
        let request = self.backfill.finished.last().map(|f| f.request.clone());
        self.backfill.cleanup.push((REQUEST_FILE, request));
        self.backfill.table = None;
        self.update_backfill_stats();
        self.dirty = true;
    }

    /// Rows written so far per sink, and dead-lettered (see [`Self::count_written`]).
    fn written_so_far(&self) -> (Vec<u64>, u64) {
        (
            self.stats
                .sink_rows
                .iter()
                .map(|r| r.load(Ordering::Relaxed))
                .collect(),
            self.stats.dead_lettered.load(Ordering::Relaxed),
        )
    }

    /// Adds what was written since `before` to the backfill's counts.
    fn count_written(&mut self, before: (Vec<u64>, u64)) {
        let (rows, dead) = self.written_so_far();
        let Some(progress) = self.backfill.progress.as_mut() else {
            return;
        };
        for (i, (now, then)) in rows.iter().zip(&before.0).enumerate() {
            if now > then {
                *progress
                    .counts
                    .sinks
                    .entry(self.stats.sink_names[i].clone())
                    .or_default() += now - then;
            }
        }
        progress.counts.dead_lettered += dead.saturating_sub(before.1);
    }

    fn backfill_seconds(&self, progress: &Progress) -> f64 {
        match self.backfill.resumed {
            Some((since, before)) => before + since.elapsed().as_secs_f64(),
            None => progress.seconds,
        }
    }

    /// The progress as the next checkpoint records it.
    pub(super) fn backfill_for_checkpoint(&self) -> Option<Progress> {
        self.backfill.progress.as_ref().map(|p| {
            let mut p = p.clone();
            p.seconds = self.backfill_seconds(&p);
            p
        })
    }

    fn update_backfill_stats(&self) {
        let stats = &self.stats.backfill;
        match &self.backfill.progress {
            Some(p) => {
                stats.active.store(true, Ordering::Relaxed);
                stats.read.store(p.counts.read, Ordering::Relaxed);
                stats.emitted.store(p.counts.emitted, Ordering::Relaxed);
                stats
                    .superseded
                    .store(p.counts.superseded, Ordering::Relaxed);
                stats.streamed.store(p.counts.streamed, Ordering::Relaxed);
                stats.estimate.store(p.estimate, Ordering::Relaxed);
                stats
                    .windows_phase
                    .store(p.phase == Phase::Windows, Ordering::Relaxed);
            }
            None => stats.active.store(false, Ordering::Relaxed),
        }
    }
}

/// `batch` with every row at `position`'s LSN, numbered from its seq, and
/// committed now.
fn at_position(
    batch: &RecordBatch,
    position: Position,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let rows = batch.num_rows();
    let schema = batch.schema();
    let now = chrono::Utc::now().timestamp_micros();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, column)| -> ArrayRef {
            match field.name().as_str() {
                LSN_COLUMN => Arc::new(Int64Array::from(vec![position.lsn as i64; rows])),
                SEQ_COLUMN => Arc::new(Int64Array::from_iter_values(
                    (0..rows as i64).map(|i| position.seq as i64 + i),
                )),
                COMMIT_TS_COLUMN => {
                    Arc::new(TimestampMicrosecondArray::from(vec![now; rows]).with_timezone("UTC"))
                }
                _ => column.clone(),
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns)
}

/// The rows of `batch` whose `column` is before `cutoff` (Unix µs).
fn before_time(
    batch: &RecordBatch,
    column: &str,
    cutoff: i64,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let times = batch.column_by_name(column).ok_or_else(|| {
        arrow::error::ArrowError::SchemaError(format!("backfilled rows without `{column}`"))
    })?;
    let times = arrow::compute::cast(
        times,
        &arrow::datatypes::DataType::Timestamp(
            arrow::datatypes::TimeUnit::Microsecond,
            Some("UTC".into()),
        ),
    )?;
    let times = times
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .expect("cast to timestamps");
    let keep: BooleanArray = times
        .iter()
        .map(|t| Some(t.is_some_and(|t| t < cutoff)))
        .collect();
    filter_record_batch(batch, &keep)
}
