//! The engine's side of windowed queries: feeding window state, closing
//! windows as the watermark passes them, and checkpointing the state.
//!
//! # Signs
//!
//! A change batch is split by operation before the pre-plans run: inserts
//! (`+1`, and late if below the watermark as it stands at that row), new
//! images of updates (`+1`),
//! and deletes plus old images of updates (`-1`, retractions). Retractions are
//! computed with the dimension tables as they stand at the retracting change.
//!
//! # Watermark
//!
//! Per query: the newest event time seen minus the `WATERMARK` delay; within
//! a batch it moves row by row (see `split_late`), so lateness never depends
//! on batch boundaries. When the source has caught up (it says it has nothing
//! pending) and has been silent for [`clock::QUIET`], the wall clock stands in
//! for event time, minus the delay and an allowance learnt from how late the
//! stream's events arrive ([`clock`]), so windows close within a few hundred
//! milliseconds on a quiet stream and stale content leaves the rankings. The
//! watermark never moves back below a window already emitted: an insert
//! behind it is late and goes to the late-events output, never silently into
//! a closed window.
//!
//! # Exactly once
//!
//! Window state is restored from the checkpoint the job resumes from, and
//! input is never filtered by sink position for windowed queries. A window is
//! written to a sink only if it ends after the last window that sink holds:
//! Redis keeps that end itself, and for other sinks the engine takes it from
//! the newest checkpoint (which matters for `replay`, which restores older
//! window state).

use std::sync::atomic::Ordering;
use std::time::Instant;

use arrow::array::{Array, BooleanArray, StringArray};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::record_batch::RecordBatch;

use super::checkpointing::read_state;
use super::window::{DistinctValues, WindowState};
use super::{clock, Engine, JobError};
use crate::change::{Op, LSN_COLUMN, OP_COLUMN, SEQ_COLUMN};
use crate::checkpoint::{
    EpochFile, Manifest, StateFile, StateWriter, WindowCheckpoint, WindowOutput,
};
use crate::sql::plan::JobPlan;

mod history;
pub(super) use history::ClosedWindow;

/// The window state of a job: one [`WindowState`] per distinct windowed
/// aggregate. Aggregates of different queries that read the same input and
/// keep the same state (see [`WindowedAggregate::same_state_as`]) share one,
/// which is fed once; the windows it closes go to every query reading it.
///
/// [`WindowedAggregate::same_state_as`]: crate::sql::window::WindowedAggregate::same_state_as
#[derive(Default)]
pub struct WindowStates {
    states: Vec<WindowState>,
    /// Per query, per windowed aggregate: its state.
    slots: Vec<Vec<usize>>,
    /// Per state: the (query, aggregate) pairs reading it; the first one's
    /// pre-plan feeds it.
    readers: Vec<Vec<(usize, usize)>>,
    /// Per query and aggregate: windows its shared state closed while
    /// another reader was being closed, not yet written to this query's sink.
    pending: Vec<Vec<Vec<(i64, RecordBatch)>>>,
    /// Per state: the checkpoint files its next snapshot of changes goes
    /// over, a whole snapshot first (empty: the next one is whole).
    layers: Vec<Vec<EpochFile>>,
    /// The distinct values every state's ids refer to.
    distinct: DistinctValues,
}

/// Every window state is written whole at the checkpoints whose epoch is a
/// multiple of this, so a restore reads a bounded number of layers, and all
/// states' layers start at or after the same checkpoint: pruning keeps at
/// most this many checkpoints more for them (checkpoint/retention.rs).
pub const WHOLE_EVERY: u64 = 10;

impl WindowStates {
    /// Empty window state for every windowed aggregate of `plan`.
    pub fn new(plan: &JobPlan) -> Result<WindowStates, JobError> {
        let mut shared = WindowStates::default();
        for (q, query) in plan.queries.iter().enumerate() {
            let mut slots = Vec::new();
            for (w, window) in query.windows.iter().enumerate() {
                let same = shared.readers.iter().position(|readers| {
                    let (rq, rw) = readers[0];
                    let reader = &plan.queries[rq];
                    reader.driving == query.driving
                        && reader.view == query.view
                        && reader.watermark_delay == query.watermark_delay
                        && reader.windows[rw].same_state_as(window)
                });
                let s = match same {
                    Some(s) => s,
                    None => {
                        let state = WindowState::sharing(
                            window,
                            window.pre_plan.schema().as_arrow(),
                            shared.distinct.clone(),
                        )
                        .map_err(JobError::state("window state"))?;
                        shared.states.push(state);
                        shared.readers.push(Vec::new());
                        shared.layers.push(Vec::new());
                        shared.states.len() - 1
                    }
                };
                shared.readers[s].push((q, w));
                slots.push(s);
            }
            shared.pending.push(vec![Vec::new(); slots.len()]);
            shared.slots.push(slots);
        }
        Ok(shared)
    }

    /// Window states kept (fewer than windowed aggregates when some are shared).
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Rows of state held, over every window state.
    pub fn entries(&self) -> usize {
        self.states.iter().map(WindowState::entries).sum()
    }

    /// The states of query `q`, by aggregate.
    fn of_query(&self, q: usize) -> impl Iterator<Item = &WindowState> {
        self.slots[q].iter().map(|&s| &self.states[s])
    }

    /// Emits the windows of aggregate `w` of query `q` that end at or before
    /// `watermark`, with those its state closed earlier for another reader.
    fn emit(
        &mut self,
        q: usize,
        w: usize,
        watermark: i64,
    ) -> Result<Vec<(i64, RecordBatch)>, JobError> {
        let s = self.slots[q][w];
        let emitted = self.states[s]
            .emit_until(watermark)
            .map_err(JobError::Arrow)?;
        if !emitted.is_empty() {
            for &(rq, rw) in &self.readers[s] {
                if (rq, rw) != (q, w) {
                    self.pending[rq][rw].extend(emitted.iter().cloned());
                }
            }
        }
        let mut out = std::mem::take(&mut self.pending[q][w]);
        out.extend(emitted);
        Ok(out)
    }
}

fn window_key(sink: &str, index: usize) -> String {
    format!("{sink}/{index}")
}

/// Row indexes of `batch` in stream order (`_lsn`, then `_seq`), or as they
/// are if the batch does not carry its positions.
fn stream_order(batch: &RecordBatch) -> Result<Vec<usize>, JobError> {
    let (Some(lsn), Some(seq)) = (
        batch.column_by_name(LSN_COLUMN),
        batch.column_by_name(SEQ_COLUMN),
    ) else {
        return Ok((0..batch.num_rows()).collect());
    };
    // Usually already in order: check before sorting.
    if let (Some(l), Some(q)) = (
        lsn.as_any().downcast_ref::<arrow::array::Int64Array>(),
        seq.as_any().downcast_ref::<arrow::array::Int64Array>(),
    ) {
        let at = |i: usize| (l.value(i), q.value(i));
        if l.null_count() == 0
            && q.null_count() == 0
            && (1..batch.num_rows()).all(|i| at(i - 1) <= at(i))
        {
            return Ok((0..batch.num_rows()).collect());
        }
    }
    let columns = [lsn, seq].map(|column| arrow::compute::SortColumn {
        values: column.clone(),
        options: None,
    });
    let indices = arrow::compute::lexsort_to_indices(&columns, None).map_err(JobError::Arrow)?;
    Ok(indices.values().iter().map(|&i| i as usize).collect())
}

/// The rows of `batch` whose `_op` is one of `ops`.
fn with_ops(batch: &RecordBatch, ops: &[&str]) -> Result<RecordBatch, JobError> {
    let column = batch
        .column_by_name(OP_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| {
            arrow::error::ArrowError::SchemaError("change batch without `_op`".into())
        })?;
    let keep: BooleanArray = (0..batch.num_rows())
        .map(|i| Some(column.is_valid(i) && ops.contains(&column.value(i))))
        .collect();
    filter_record_batch(batch, &keep).map_err(JobError::Arrow)
}

impl Engine {
    /// Feeds a change batch of `source` (and its updates' old images) to the
    /// windowed queries it drives, then closes the windows the watermark passed.
    pub(super) async fn process_windowed(
        &mut self,
        source: usize,
        batch: &RecordBatch,
        before: Option<&RecordBatch>,
        views: &super::ViewOutputs,
    ) -> Result<(), JobError> {
        let driven: Vec<usize> = (0..self.plan.queries.len())
            .filter(|&q| {
                self.plan.queries[q].driving == source && self.plan.queries[q].is_windowed()
            })
            .collect();
        if driven.is_empty() {
            return Ok(());
        }
        self.last_change = Instant::now();
        // Queries grouped by their input: the source batch, or a shared view's rows.
        let mut inputs: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
        for &q in &driven {
            let view = self.plan.queries[q].view;
            match inputs.iter_mut().find(|(v, _)| *v == view) {
                Some((_, queries)) => queries.push(q),
                None => inputs.push((view, vec![q])),
            }
        }
        for (view, queries) in inputs {
            let (rows, old) = match view {
                Some(v) => {
                    let (rows, old) = views[v].as_ref().expect("computed for its driving source");
                    (rows, old.as_ref())
                }
                None => (batch, before),
            };
            let inserts = self.split_late(source, &queries, rows).await?;
            let reads = with_ops(rows, &[Op::Read.letter()])?;
            let updates = with_ops(rows, &[Op::Update.letter()])?;
            let mut retractions = with_ops(rows, &[Op::Delete.letter()])?;
            if let Some(old) = old {
                retractions =
                    concat_batches(&rows.schema(), [&retractions, old]).map_err(JobError::Arrow)?;
            }
            self.feed_windows(&queries, [&inserts, &updates, &retractions, &reads])
                .await?;
        }
        Ok(())
    }

    /// Runs the pre-plans of `queries` over inserts (+1), new images of
    /// updates (+1), retractions (-1) and backfilled rows (+1), then closes
    /// the windows they passed. A state shared by several of them is fed
    /// once, by its first reader.
    ///
    /// A backfilled row (`r`) is added only to windows the live state still
    /// holds open and that end after the stream began: the others are
    /// historical, computed apart when the backfill has read its range
    /// (`windowed/history.rs`). Rows left out so are not late events.
    async fn feed_windows(
        &mut self,
        queries: &[usize],
        parts: [&RecordBatch; 4],
    ) -> Result<(), JobError> {
        let [inserts, updates, retractions, reads] = parts;
        let origin = self.backfill.origin.as_ref().map(|o| o.at_micros);
        // The watermarks before this batch: its own inserts, fed first,
        // must not make its updates look old.
        let watermarks: Vec<Option<i64>> = queries.iter().map(|&q| self.watermark(q)).collect();
        for (&q, &watermark) in queries.iter().zip(&watermarks) {
            let query = &self.plan.queries[q];
            let dimensions = self.dimension_contents(&query.dimensions);
            for w in 0..query.windows.len() {
                let s = self.windows.slots[q][w];
                if self.windows.readers[s][0] != (q, w) {
                    continue; // fed by its first reader
                }
                // (rows, sign, backfilled, checked against a fresh state's floor)
                for (part, sign, read, floored) in [
                    (inserts, 1, false, false),
                    (updates, 1, false, true),
                    (retractions, -1, false, true),
                    (reads, 1, true, false),
                ] {
                    if part.num_rows() == 0 {
                        continue;
                    }
                    let kind = self.windows.states[s].kind();
                    // A state that has emitted nothing has no closed windows
                    // yet: updates and retractions more than a window behind
                    // the watermark (the wall clock before the first event)
                    // count as closed instead of opening buckets long past,
                    // which days of windows would then be emitted from.
                    let fresh = match (floored, self.windows.states[s].last_end()) {
                        (true, None) => Some(
                            watermark.unwrap_or_else(|| chrono::Utc::now().timestamp_micros())
                                - kind.width(),
                        ),
                        _ => None,
                    };
                    let floor = match (read, origin) {
                        (false, _) => None,
                        // The first bucket of a window ending after the origin.
                        (true, Some(origin)) => Some(
                            ((origin - kind.width()).div_euclid(kind.slide()) + 1) * kind.slide(),
                        ),
                        (true, None) => match self.windows.states[s].last_end() {
                            Some(_) => None,
                            None => continue, // no live window yet: all historical
                        },
                    };
                    let step = super::udf_errors::Step::Pre(q, w);
                    let part = self.unpoisoned(step, part.clone())?;
                    let result = self.plan.execute_pre(q, w, part.clone(), &dimensions).await;
                    let rows = self
                        .checked(step, &part, &dimensions, result, |e| self.query_error(q, e))
                        .await?;
                    for rows in rows {
                        let done = self.windows.states[s]
                            .accumulate_above(&rows, sign, floor, fresh)
                            .map_err(JobError::Arrow)?;
                        if done.late > 0 && !read {
                            self.stats
                                .late_events
                                .fetch_add(done.late, Ordering::Relaxed);
                            tracing::warn!(
                                sink = %self.plan.sinks[query.sink].def.name,
                                late = done.late,
                                "events older than the watermark were not aggregated"
                            );
                        }
                        self.stats
                            .expired_retractions
                            .fetch_add(done.expired, Ordering::Relaxed);
                    }
                }
            }
        }
        for &q in queries {
            self.close_windows(q).await?;
        }
        self.windows.distinct.collect_unused(&self.windows.states);
        Ok(())
    }

    /// The inserts of `rows` (a change batch in stream order, every op) that
    /// are on time. The others are late: counted and written to the
    /// late-events output, once each.
    ///
    /// The watermark moves *within* the batch, row by row: an insert is late
    /// when its event time is below the newest event time of the on-time
    /// inserts and updates before it (in this batch or earlier ones) minus the
    /// delay, or below the idle watermark. So which events are late depends
    /// on the changes and their order alone, never on where the source cut
    /// its batches: a job restarted after a crash decides exactly as an
    /// uninterrupted one would.
    async fn split_late(
        &mut self,
        source: usize,
        driven: &[usize],
        rows: &RecordBatch,
    ) -> Result<RecordBatch, JobError> {
        let inserts =
            |mask: &BooleanArray| filter_record_batch(rows, mask).map_err(JobError::Arrow);
        let ops = rows
            .column_by_name(OP_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| {
                arrow::error::ArrowError::SchemaError("change batch without `_op`".into())
            })?;
        let is_insert: BooleanArray = (0..rows.num_rows())
            .map(|i| Some(ops.is_valid(i) && ops.value(i) == Op::Insert.letter()))
            .collect();
        let column = self.plan.sources[source].def.watermark.clone();
        let times = column.as_ref().and_then(|c| rows.column_by_name(&c.column));
        let (Some(column), Some(times)) = (column, times) else {
            // No event time here: windows count late rows themselves.
            return inserts(&is_insert);
        };
        let times = arrow::compute::cast(
            times,
            &arrow::datatypes::DataType::Timestamp(
                arrow::datatypes::TimeUnit::Microsecond,
                Some("UTC".into()),
            ),
        )
        .map_err(JobError::Arrow)?;
        let times = times
            .as_any()
            .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
            .expect("cast to timestamps");
        let delay = driven
            .iter()
            .map(|&q| self.plan.queries[q].watermark_delay)
            .min()
            .unwrap_or(0);
        let mut watermark = driven.iter().filter_map(|&q| self.watermark(q)).max();
        // How late on-time inserts arrive, measured only on a live stream
        // (the batch came while the job was caught up): see `clock`.
        let now = chrono::Utc::now().timestamp_micros();
        let mut lag: Option<i64> = None;
        // Per row: the watermark it met, if it is a late insert. Rows are
        // visited in stream order: a view's join need not keep it.
        let mut missed: Vec<Option<i64>> = vec![None; rows.num_rows()];
        for i in stream_order(rows)? {
            let missed = &mut missed[i];
            let op = if ops.is_valid(i) { ops.value(i) } else { "" };
            if op != "c" && op != "u" {
                continue;
            }
            let time = (!times.is_null(i)).then(|| times.value(i));
            match (op, time, watermark) {
                ("c", None, w) => *missed = Some(w.unwrap_or(0)),
                ("c", Some(t), Some(w)) if t < w => *missed = Some(w),
                (_, Some(t), _) => {
                    if op == "c" && self.live_batch {
                        lag = Some(lag.map_or(now - t, |l| l.max(now - t)));
                    }
                    watermark = Some(watermark.map_or(t - delay, |w| w.max(t - delay)))
                }
                _ => {}
            }
        }
        if let Some(lag) = lag {
            self.arrival_lag.observe(lag, Instant::now());
        }
        let late: BooleanArray = missed.iter().map(|m| Some(m.is_some())).collect();
        let on_time = arrow::compute::and(
            &is_insert,
            &arrow::compute::not(&late).map_err(JobError::Arrow)?,
        )
        .map_err(JobError::Arrow)?;
        if late.true_count() == 0 {
            return inserts(&on_time);
        }
        let late_rows = inserts(&late)?;
        let watermarks: Vec<i64> = missed.into_iter().flatten().collect();
        let table = self.plan.sources[source].def.name.clone();
        self.stats
            .late_events
            .fetch_add(late_rows.num_rows() as u64, Ordering::Relaxed);
        match &mut self.late_sink {
            Some(late_sink) => {
                let rows = super::late::rows(&table, &watermarks, &column.column, &late_rows)
                    .and_then(|rows| super::side_output::unheld(&rows, late_sink.position()))
                    .map_err(JobError::state("late events"))?;
                if rows.num_rows() > 0 {
                    late_sink
                        .write_window(vec![rows], 0, self.position, None)
                        .await?;
                    self.dirty = true;
                }
            }
            None => tracing::warn!(
                table = %table,
                late = late_rows.num_rows(),
                "events older than the watermark were not aggregated; declare a filesystem table `late_events` \
                 to keep them"
            ),
        }
        inserts(&on_time)
    }

    /// The watermark of query `q`: newest event time minus the delay, or the
    /// wall clock (see [`clock`]) when the source is idle; never below the end
    /// of a window already emitted, so it never moves back.
    ///
    /// The clock stands in only once the source has said it has nothing
    /// pending (a keepalive with no transaction open) and no change came for
    /// [`clock::QUIET`]: a job catching up on a backlog (after a restart, an
    /// outage) is never idle, however long its first batch takes, so its
    /// windows do not close before their events arrive.
    fn watermark(&self, q: usize) -> Option<i64> {
        let delay = self.plan.queries[q].watermark_delay;
        let event_time = self
            .windows
            .of_query(q)
            .filter_map(WindowState::max_event_time)
            .max();
        let from_events = event_time.map(|t| t - delay);
        let idle = (self.caught_up && self.last_change.elapsed() >= clock::QUIET).then(|| {
            let allowance = self.arrival_lag.allowance_micros(Instant::now());
            chrono::Utc::now().timestamp_micros() - delay - allowance
        });
        let emitted = self
            .windows
            .of_query(q)
            .filter_map(WindowState::last_end)
            .max();
        [from_events, idle, emitted].into_iter().flatten().max()
    }

    /// Emits every window of query `q` that the watermark has passed.
    pub(super) async fn close_windows(&mut self, q: usize) -> Result<(), JobError> {
        let Some(watermark) = self.watermark(q) else {
            return Ok(());
        };
        let mut closed = Vec::new();
        for w in 0..self.windows.slots[q].len() {
            for (end, rows) in self.windows.emit(q, w, watermark)? {
                closed.push((end, w, rows));
            }
        }
        closed.sort_by_key(|(end, w, _)| (*end, *w));
        if let Some((end, _, rows)) = closed.last() {
            tracing::debug!(
                query = q,
                watermark,
                windows = closed.len(),
                last_end = end,
                rows = rows.num_rows(),
                "windows closed"
            );
        }
        for (end, w, rows) in closed {
            if self.window_guards[q][w].is_some_and(|guard| end <= guard) {
                continue; // the sink already holds this window (replay)
            }
            let commits = self.window_commits[q].take_before(end);
            let output = self.write_closed_window(q, w, end, rows, commits).await?;
            let query = &self.plan.queries[q];
            let start = end - query.windows[w].kind.width();
            let sink = &self.plan.sinks[query.sink].def.name;
            self.stats.windows.record(sink, start, end, &output);
            self.last_windows[q] = Some((end, output));
        }
        Ok(())
    }

    /// Runs query `q`'s post-plan over the rows of its closed window
    /// (aggregate `w`, ending at `end`) and writes the result to its sink;
    /// returns what was written. `commits`: the changes it is the first
    /// window to reflect (for commit → visible).
    pub(super) async fn write_closed_window(
        &mut self,
        q: usize,
        w: usize,
        end: i64,
        rows: RecordBatch,
        commits: Option<std::sync::Arc<crate::engine::latency::CommitTimes>>,
    ) -> Result<Vec<RecordBatch>, JobError> {
        let output = self
            .plan
            .execute_post(q, w, rows)
            .await
            .map_err(|e| self.query_error(q, e))?;
        let count: u64 = output.iter().map(|b| b.num_rows() as u64).sum();
        let position = self.position;
        self.sinks[q]
            .write_window(output.clone(), end, position, commits)
            .await?;
        self.stats
            .record_write(q, count, position.lsn, self.sinks[q].detached());
        self.dirty = true;
        Ok(output)
    }

    /// Closes windows of every windowed query (called on a timer).
    pub(super) async fn tick_windows(&mut self) -> Result<(), JobError> {
        for q in 0..self.plan.queries.len() {
            if self.plan.queries[q].is_windowed() {
                self.close_windows(q).await?;
            }
        }
        self.stats
            .window_state_rows
            .store(self.windows.entries() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn query_error(&self, q: usize, error: datafusion::error::DataFusionError) -> JobError {
        JobError::Query {
            sink: self.plan.sinks[self.plan.queries[q].sink].def.name.clone(),
            message: error.to_string(),
        }
    }

    /// Serialises window state into the files of checkpoint `epoch`: per
    /// state, the buckets changed since the last checkpoint over the layers
    /// before, or a whole snapshot at every [`WHOLE_EVERY`]th epoch and
    /// whenever the changes written since the state's last whole one
    /// outweigh it.
    pub(super) fn snapshot_windows(
        &mut self,
        epoch: u64,
        files: &mut Vec<(String, bytes::Bytes)>,
    ) -> Result<std::collections::BTreeMap<String, WindowCheckpoint>, JobError> {
        let mut out = std::collections::BTreeMap::new();
        // A shared state is written once; every reader's entry names its file.
        let mut written: Vec<Option<WindowCheckpoint>> = vec![None; self.windows.len()];
        for q in 0..self.windows.slots.len() {
            let sink = &self.plan.sinks[self.plan.queries[q].sink].def.name;
            for w in 0..self.windows.slots[q].len() {
                let s = self.windows.slots[q][w];
                debug_assert!(
                    self.windows.pending[q][w].is_empty(),
                    "closed windows not written"
                );
                if written[s].is_none() {
                    let layers = &mut self.windows.layers[s];
                    let changes: u64 = layers.iter().skip(1).map(|l| l.file.bytes).sum();
                    let whole = match layers.first() {
                        None => true,
                        Some(first) => {
                            epoch.is_multiple_of(WHOLE_EVERY) || changes > first.file.bytes
                        }
                    };
                    // Each batch of the snapshot is encoded as it is built.
                    let state = &mut self.windows.states[s];
                    let mut writer =
                        StateWriter::new(&state.snapshot_schema()).map_err(JobError::Arrow)?;
                    let meta = state
                        .snapshot_changes_into(whole, &mut |batch| writer.write(&batch))
                        .map_err(JobError::Arrow)?;
                    let state = writer
                        .finish(format!("window-{sink}-{w}.arrows"), files)
                        .map_err(JobError::Arrow)?;
                    if whole {
                        layers.clear();
                    }
                    let base = layers.clone();
                    layers.push(EpochFile {
                        epoch,
                        file: state.clone(),
                    });
                    written[s] = Some(WindowCheckpoint { state, meta, base });
                }
                out.insert(
                    window_key(sink, w),
                    written[s].clone().expect("written above"),
                );
            }
        }
        Ok(out)
    }

    /// Serialises the last window written to each windowed Redis sink.
    pub(super) fn snapshot_window_outputs(
        &self,
        files: &mut Vec<(String, bytes::Bytes)>,
    ) -> Result<std::collections::BTreeMap<String, WindowOutput>, JobError> {
        let mut out = std::collections::BTreeMap::new();
        for (q, last) in self.last_windows.iter().enumerate() {
            let Some((end, batches)) = last else { continue };
            let Some(first) = batches.first() else {
                continue;
            };
            if !self.sinks[q].is_redis() {
                continue; // appended sinks (Parquet) are never rewritten
            }
            let sink = self.sinks[q].name().to_string();
            let state = StateFile::encode(
                format!("window-output-{sink}.arrows"),
                &first.schema(),
                batches,
                files,
            )
            .map_err(JobError::state(format!("window output of {sink}")))?;
            out.insert(sink, WindowOutput { end: *end, state });
        }
        Ok(out)
    }

    /// Loads the last window written to each windowed sink as of `latest`.
    async fn restore_window_outputs(&mut self, latest: &Manifest) -> Result<(), JobError> {
        for q in 0..self.last_windows.len() {
            let sink = self.sinks_name(q);
            let Some(saved) = latest.window_outputs.get(&sink) else {
                continue;
            };
            let what = format!("window output of {sink}");
            let batches = read_state(&self.store, latest.epoch, &saved.state, what).await?;
            // The JSON API shows the last window at once after a restart.
            let width = self.plan.queries[q]
                .windows
                .first()
                .map_or(0, |w| w.kind.width());
            self.stats
                .windows
                .record(&sink, saved.end - width, saved.end, &batches);
            self.last_windows[q] = Some((saved.end, batches));
        }
        Ok(())
    }

    fn sinks_name(&self, q: usize) -> String {
        self.plan.sinks[self.plan.queries[q].sink].def.name.clone()
    }

    /// Rewrites windowed sink `q`, whose store lost its keys, with the last
    /// window it was written before the checkpoint the job resumes from;
    /// windows after it are written again as the job streams on.
    pub(super) async fn rewrite_lost_window(&mut self, q: usize) -> Result<bool, JobError> {
        let Some((end, batches)) = self.last_windows[q].clone() else {
            return Ok(false);
        };
        let position = self.position;
        self.sinks[q]
            .write_window(batches, end, position, None)
            .await?;
        Ok(true)
    }

    /// Restores window state from `restore`, and write guards from `latest`.
    pub(super) async fn restore_windows(
        &mut self,
        restore: &Manifest,
        latest: &Manifest,
    ) -> Result<(), JobError> {
        // A shared state is restored once, from the first reader the
        // checkpoint holds it for (older checkpoints hold a copy per reader).
        let mut restored = vec![false; self.windows.len()];
        for q in 0..self.windows.slots.len() {
            let sink = self.sinks_name(q);
            for w in 0..self.windows.slots[q].len() {
                let s = self.windows.slots[q][w];
                let key = window_key(&sink, w);
                match restore.windows.get(&key) {
                    Some(saved) if !restored[s] => {
                        let mut layers = saved.base.clone();
                        layers.push(EpochFile {
                            epoch: restore.epoch,
                            file: saved.state.clone(),
                        });
                        let mut batches = Vec::new();
                        for layer in &layers {
                            let what = format!("window {key} (checkpoint {})", layer.epoch);
                            batches.push(
                                read_state(&self.store, layer.epoch, &layer.file, what).await?,
                            );
                        }
                        self.windows.states[s]
                            .restore(&batches, &saved.meta)
                            .map_err(JobError::state(format!("window {key}")))?;
                        // The next checkpoint writes its changes over these.
                        self.windows.layers[s] = layers;
                        restored[s] = true;
                    }
                    _ => {}
                }
                self.window_guards[q][w] = latest
                    .windows
                    .get(&key)
                    .and_then(|c: &WindowCheckpoint| c.meta.last_end);
                if restore.epoch == latest.epoch {
                    // The state and the sink agree: nothing to guard against.
                    self.window_guards[q][w] = None;
                }
            }
        }
        self.restore_window_outputs(latest).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mission_kpi_windows_are_kept_once_for_parquet_and_redis() {
        let env = |name: &str| match name {
            "ENGAGE_POSTGRES_URL" => Some("postgres://engage@127.0.0.1:5432/app".to_string()),
            "ENGAGE_REDIS_URL" => Some("redis://127.0.0.1:6379".to_string()),
            "ENGAGE_KAFKA_BROKERS" => Some("127.0.0.1:9092".to_string()),
            _ => None,
        };
        let sql = include_str!("../../../sql/engagement.sql");
        let mut spec = crate::sql::parse_job("engagement", sql, &env).unwrap();
        spec.udfs = crate::udf::prepare(sql, &Default::default()).unwrap();
        let plan = JobPlan::new(&spec).await.unwrap();
        let windows = WindowStates::new(&plan).unwrap();
        // 4 rankings + 4 KPI timeframes, read by 12 windowed aggregates.
        assert_eq!(windows.len(), 8);
        for (i, latest) in (7..11).enumerate() {
            assert_eq!(windows.slots[6][i], windows.slots[latest][0]);
            assert_eq!(
                windows.readers[windows.slots[6][i]],
                vec![(6, i), (latest, 0)]
            );
        }
    }
}
