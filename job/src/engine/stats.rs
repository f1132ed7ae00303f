//! Live figures of a running job, shared with whoever displays them.
//!
//! Counters are updated once per batch, never per row. The demo's status line
//! and `engage run --progress` read them, the HTTP server (`crate::http`)
//! serves them: [`JobStats::prometheus`] renders them in Prometheus' text
//! format with Prometheus' own Rust client (`prometheus-client`), which also
//! keeps the histograms.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::Serialize;

use crate::change::{Position, COMMIT_TS_COLUMN, OP_COLUMN};

/// Counters and gauges of one job.
#[derive(Debug)]
pub struct JobStats {
    /// Source changes read (all tables).
    pub changes_in: AtomicU64,
    /// Source table names, in plan order.
    pub source_names: Vec<String>,
    /// Changes read per source (same order as `source_names`) and op:
    /// inserts, updates, deletes ([`OPS`]).
    pub source_ops: Vec<[AtomicU64; 3]>,
    /// Batches processed.
    pub batches: AtomicU64,
    /// Seconds to process one change batch (queries, hand-off to sinks, windows).
    pub batch_seconds: Histogram,
    /// Sink table names, in plan order.
    pub sink_names: Vec<String>,
    /// Rows written per sink, same order as `sink_names`.
    pub sink_rows: Vec<AtomicU64>,
    /// Commit LSN of the last change each sink has received (0: none yet),
    /// same order as `sink_names`. Parquet makes it visible at the next checkpoint.
    pub sink_lsn: Vec<AtomicU64>,
    /// 1 while a sink is detached (its store unreachable, see `sink/task.rs`),
    /// as of the last checkpoint; same order as `sink_names`.
    pub sink_detached: Vec<AtomicU64>,
    /// Unix milliseconds of each sink's last write (0: none yet).
    pub sink_last_write_ms: Vec<AtomicU64>,
    /// Unix milliseconds since which each sink has been detached (0: it is not).
    pub sink_detached_since_ms: Vec<AtomicU64>,
    /// Per sink (same order as `sink_names`): seconds from a change's commit
    /// to the moment the sink made its effect visible to readers, observed
    /// once per change of the driving table (see `sink/task.rs`).
    pub commit_to_visible: Vec<Histogram>,
    /// Per sink: the same latencies for the newest changes, for p50/p99 in
    /// the JSON API (a histogram's buckets are too coarse for that).
    pub recent_visible: Vec<Arc<RecentLatencies>>,
    /// Resume LSN of the last checkpoint: work after it is not checkpointed yet.
    pub checkpoint_resume_lsn: AtomicU64,
    /// Unix milliseconds when the job started.
    pub started_unix_ms: AtomicU64,
    /// Epoch of the last completed checkpoint.
    pub checkpoint_epoch: AtomicU64,
    /// Unix milliseconds of the last completed checkpoint (0: none yet).
    pub checkpoint_unix_ms: AtomicU64,
    /// Checkpoints taken by this process.
    pub checkpoints: AtomicU64,
    /// Seconds a checkpoint takes, from barrier to commit.
    pub checkpoint_seconds: Histogram,
    /// Bytes of state files the last checkpoint wrote.
    pub checkpoint_bytes: AtomicU64,
    /// The checkpoint interval (milliseconds), for readiness.
    pub checkpoint_interval_ms: AtomicU64,
    /// LSN up to which the slot is confirmed.
    pub confirmed_lsn: AtomicU64,
    /// End LSN of the last commit the job has processed (not yet checkpointed).
    pub processed_lsn: AtomicU64,
    /// The server's WAL end as last reported by the stream.
    pub server_wal_end: AtomicU64,
    /// The engine is streaming changes (not starting, replaying or restarting).
    pub streaming: AtomicBool,
    /// Truncates of driving tables, which have no rows to deliver.
    pub truncates_ignored: AtomicU64,
    /// Inserts older than the watermark, not aggregated by windows.
    pub late_events: AtomicU64,
    /// Retractions whose windows had all closed.
    pub expired_retractions: AtomicU64,
    /// Change rows that failed a CHECK and went to the dead-letter output.
    pub dead_lettered: AtomicU64,
    /// Dead letters per reason, and the newest few.
    pub dead_letters: DeadLetterLog,
    /// Changes the source sent again after a restart that a sink (or the
    /// whole engine) already held, and that were therefore not applied again.
    pub resent_suppressed: AtomicU64,
    /// In-process restarts from the newest checkpoint (see `engine::supervise`).
    pub restarts: AtomicU64,
    /// Rows of window state held in memory (all windowed queries).
    pub window_state_rows: AtomicU64,
    /// The newest windows each windowed sink was written, for the JSON API.
    pub windows: RecentWindows,
}

/// Letters of [`JobStats::source_ops`], in order.
pub const OPS: [&str; 3] = ["c", "u", "d"];

/// Buckets of the latency histograms: 1 ms to about 65 s, doubling.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for JobStats {
    fn default() -> Self {
        JobStats::new(Vec::new())
    }
}

impl JobStats {
    /// Statistics of the job `spec`, with one sink slot per `INSERT`, in the
    /// order the plan numbers its queries (the engine counts rows of query
    /// `i` in slot `i`), named after the table each writes; and one source
    /// slot per source table, in the plan's order.
    pub fn for_job(spec: &crate::sql::JobSpec) -> JobStats {
        let mut stats = JobStats::new(spec.inserts.iter().map(|i| i.sink.clone()).collect());
        stats.source_names = spec
            .tables
            .iter()
            .filter(|t| matches!(t.connector, crate::sql::Connector::Source(_)))
            .map(|t| t.name.clone())
            .collect();
        stats.source_ops = stats
            .source_names
            .iter()
            .map(|_| Default::default())
            .collect();
        stats
    }

    pub fn new(sink_names: Vec<String>) -> JobStats {
        let per_sink = || sink_names.iter().map(|_| AtomicU64::new(0)).collect();
        JobStats {
            changes_in: AtomicU64::new(0),
            source_names: Vec::new(),
            source_ops: Vec::new(),
            batches: AtomicU64::new(0),
            batch_seconds: latency_buckets(),
            sink_rows: per_sink(),
            sink_lsn: per_sink(),
            sink_detached: per_sink(),
            sink_detached_since_ms: per_sink(),
            sink_last_write_ms: per_sink(),
            commit_to_visible: sink_names.iter().map(|_| latency_buckets()).collect(),
            recent_visible: sink_names.iter().map(|_| Arc::default()).collect(),
            checkpoint_resume_lsn: AtomicU64::new(0),
            started_unix_ms: AtomicU64::new(unix_ms() as u64),
            sink_names,
            checkpoint_epoch: AtomicU64::new(0),
            checkpoint_unix_ms: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            checkpoint_seconds: latency_buckets(),
            checkpoint_bytes: AtomicU64::new(0),
            checkpoint_interval_ms: AtomicU64::new(10_000),
            confirmed_lsn: AtomicU64::new(0),
            processed_lsn: AtomicU64::new(0),
            server_wal_end: AtomicU64::new(0),
            streaming: AtomicBool::new(false),
            truncates_ignored: AtomicU64::new(0),
            late_events: AtomicU64::new(0),
            expired_retractions: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            dead_letters: DeadLetterLog::default(),
            resent_suppressed: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            window_state_rows: AtomicU64::new(0),
            windows: RecentWindows::default(),
        }
    }

    /// The changes of `batch` by op ([`OPS`]), for [`JobStats::add_ops`].
    pub fn op_counts(batch: &RecordBatch) -> [u64; 3] {
        let mut counts = [0u64; 3];
        let Some(ops) = batch
            .column_by_name(OP_COLUMN)
            .and_then(|c| c.as_string_opt::<i32>())
        else {
            return counts;
        };
        for op in ops.iter().flatten() {
            match op.as_bytes().first() {
                Some(b'c') => counts[0] += 1,
                Some(b'u') => counts[1] += 1,
                Some(b'd') => counts[2] += 1,
                _ => {}
            }
        }
        counts
    }

    /// Counts changes read from source `source`, by op.
    pub fn add_ops(&self, source: usize, counts: [u64; 3]) {
        let Some(counters) = self.source_ops.get(source) else {
            return;
        };
        for (counter, count) in counters.iter().zip(counts) {
            counter.fetch_add(count, Ordering::Relaxed);
        }
    }

    /// Bytes of WAL the slot still retains beyond the last confirmation.
    pub fn replication_lag_bytes(&self) -> u64 {
        self.server_wal_end
            .load(Ordering::Relaxed)
            .saturating_sub(self.confirmed_lsn.load(Ordering::Relaxed))
    }

    /// Per sink (same order as `sink_names`): bytes of WAL between the
    /// server's end and the last change the sink received.
    pub fn sink_lag_bytes(&self) -> Vec<u64> {
        let end = self.server_wal_end.load(Ordering::Relaxed);
        let start = self.confirmed_lsn.load(Ordering::Relaxed);
        self.sink_lsn
            .iter()
            .map(|lsn| end.saturating_sub(lsn.load(Ordering::Relaxed).max(start)))
            .collect()
    }

    /// Bytes of WAL the job has yet to process.
    pub fn processing_lag_bytes(&self) -> u64 {
        self.server_wal_end
            .load(Ordering::Relaxed)
            .saturating_sub(self.processed_lsn.load(Ordering::Relaxed))
    }

    /// Records the detached flags of the last checkpoint (same order as
    /// `sink_names`), keeping since when each sink has been detached.
    pub fn set_detached(&self, index: usize, detached: bool, now_ms: u64) {
        self.sink_detached[index].store(u64::from(detached), Ordering::Relaxed);
        let since = &self.sink_detached_since_ms[index];
        if !detached {
            since.store(0, Ordering::Relaxed);
        } else if since.load(Ordering::Relaxed) == 0 {
            since.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Metrics in Prometheus' text exposition format (version 0.0.4).
    pub fn prometheus(self: &Arc<Self>) -> String {
        super::metrics::render(self.clone())
    }
}

/// Commit times of the changes one write carries, for the commit → visible
/// histogram: runs of (commit time in Unix milliseconds, changes), in stream
/// order. Changes committed in the same millisecond share a run, so the
/// list stays short however many changes a batch holds.
#[derive(Debug, Default)]
pub struct CommitTimes {
    runs: Vec<(i64, u32)>,
}

impl CommitTimes {
    /// The commit times of the changes of `batch` (a change batch, with
    /// `_commit_ts`); `None` if it has none.
    pub fn of(batch: &RecordBatch) -> Option<Arc<CommitTimes>> {
        let column = batch.column_by_name(COMMIT_TS_COLUMN)?;
        let times = column.as_primitive_opt::<TimestampMicrosecondType>()?;
        let mut commits = CommitTimes::default();
        for micros in times.iter().flatten() {
            commits.push(micros.div_euclid(1000), 1);
        }
        (!commits.runs.is_empty()).then(|| Arc::new(commits))
    }

    /// Most runs a [`CommitTimes`] that accumulates (a window's pending
    /// changes) keeps: past it, neighbouring runs merge (a 24-hour window's
    /// commit times are kept to about 20 s).
    pub const MAX_RUNS: usize = 4096;

    /// Appends `other`'s runs (later commits), merging neighbours past [`Self::MAX_RUNS`].
    pub fn absorb(&mut self, other: &CommitTimes) {
        for &(millis, changes) in &other.runs {
            self.push(millis, changes);
        }
        if self.runs.len() > Self::MAX_RUNS {
            let merged: Vec<(i64, u32)> = self
                .runs
                .chunks(2)
                .map(|pair| {
                    let changes: u64 = pair.iter().map(|(_, n)| u64::from(*n)).sum();
                    let weighted: i128 = pair
                        .iter()
                        .map(|(ms, n)| i128::from(*ms) * i128::from(*n))
                        .sum();
                    let mean = (weighted / i128::from(changes.max(1))) as i64;
                    (mean, changes.min(u64::from(u32::MAX)) as u32)
                })
                .collect();
            self.runs = merged;
        }
    }

    /// Takes the runs committed before `end_micros` (Unix µs), leaving the rest.
    pub fn take_before(&mut self, end_micros: i64) -> Option<Arc<CommitTimes>> {
        let end_ms = end_micros.div_euclid(1000);
        let split = self.runs.partition_point(|(ms, _)| *ms < end_ms);
        if split == 0 {
            return None;
        }
        let rest = self.runs.split_off(split);
        let taken = std::mem::replace(&mut self.runs, rest);
        Some(Arc::new(CommitTimes { runs: taken }))
    }

    fn push(&mut self, millis: i64, changes: u32) {
        match self.runs.last_mut() {
            Some((last, count)) if *last == millis => *count = count.saturating_add(changes),
            _ => self.runs.push((millis, changes)),
        }
    }

    /// Observes, in `histogram` and `recent`, the seconds from each
    /// change's commit to `now_ms` (Unix milliseconds).
    pub fn observe(&self, histogram: &Histogram, recent: &RecentLatencies, now_ms: i64) {
        let mut newest = recent.inner.lock().unwrap_or_else(|e| e.into_inner());
        for &(millis, changes) in &self.runs {
            let seconds = (now_ms - millis).max(0) as f64 / 1000.0;
            for _ in 0..changes {
                histogram.observe(seconds);
            }
            if newest.len() == RecentLatencies::KEEP {
                newest.pop_front();
            }
            newest.push_back((seconds, changes));
        }
    }
}

/// The latencies of the newest changes a sink made visible, as runs of
/// (seconds, changes): the newest [`RecentLatencies::KEEP`] runs.
#[derive(Debug, Default)]
pub struct RecentLatencies {
    inner: Mutex<VecDeque<(f64, u32)>>,
}

impl RecentLatencies {
    pub const KEEP: usize = 4096;

    /// The `q` quantile (0..=1) of the newest latencies, in seconds; `None`
    /// before any change was made visible.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut runs: Vec<(f64, u32)> = inner.iter().copied().collect();
        drop(inner);
        let total: u64 = runs.iter().map(|(_, n)| u64::from(*n)).sum();
        if total == 0 {
            return None;
        }
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (seconds, changes) in runs {
            seen += u64::from(changes);
            if seen >= rank {
                return Some(seconds);
            }
        }
        None
    }
}

/// Unix milliseconds now.
pub fn unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One dead letter, as the JSON API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// When the job diverted it (RFC 3339).
    pub at: String,
    pub table: String,
    pub reason: String,
    /// The change's source position (`LSN/seq`), if known.
    pub position: Option<String>,
    /// The original row as JSON (cut at [`DeadLetterLog::ROW_LIMIT`] bytes).
    pub row: String,
}

/// Dead letters per reason since the job started, and the newest
/// [`DeadLetterLog::KEEP`] of them.
#[derive(Debug, Default)]
pub struct DeadLetterLog {
    inner: Mutex<DeadLetterInner>,
}

#[derive(Debug, Default)]
struct DeadLetterInner {
    by_reason: BTreeMap<String, u64>,
    newest: VecDeque<DeadLetter>,
}

impl DeadLetterLog {
    pub const KEEP: usize = 100;
    pub const ROW_LIMIT: usize = 2048;

    /// Records the rows of a dead-letter batch (the `dead_letter` schema:
    /// `table`, `reason`, `_lsn`, `_seq`, `_commit_ts`, `row`).
    pub fn record(&self, rows: &RecordBatch) {
        let text = |name: &str| {
            rows.column_by_name(name)
                .and_then(|c| c.as_string_opt::<i32>().cloned())
        };
        let int = |name: &str| {
            rows.column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int64Type>().cloned())
        };
        let (Some(tables), Some(reasons), Some(row_texts)) =
            (text("table"), text("reason"), text("row"))
        else {
            return;
        };
        let (lsns, seqs) = (
            int(crate::change::LSN_COLUMN),
            int(crate::change::SEQ_COLUMN),
        );
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let first_kept = rows.num_rows().saturating_sub(Self::KEEP);
        for row in 0..rows.num_rows() {
            let reason = reasons.value(row);
            match inner.by_reason.get_mut(reason) {
                Some(count) => *count += 1,
                None => {
                    inner.by_reason.insert(reason.to_string(), 1);
                }
            }
            if row < first_kept {
                continue;
            }
            let position = match (&lsns, &seqs) {
                (Some(l), Some(s)) if l.is_valid(row) && s.is_valid(row) => {
                    Some(Position::new(l.value(row) as u64, s.value(row) as u64).to_string())
                }
                _ => None,
            };
            let mut text = row_texts.value(row);
            if text.len() > Self::ROW_LIMIT {
                let mut cut = Self::ROW_LIMIT;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text = &text[..cut];
            }
            if inner.newest.len() == Self::KEEP {
                inner.newest.pop_front();
            }
            inner.newest.push_back(DeadLetter {
                at: at.clone(),
                table: tables.value(row).to_string(),
                reason: reason.to_string(),
                position,
                row: text.to_string(),
            });
        }
    }

    /// Dead letters per reason.
    pub fn by_reason(&self) -> Vec<(String, u64)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .by_reason
            .iter()
            .map(|(r, c)| (r.clone(), *c))
            .collect()
    }

    /// The newest `limit` dead letters, newest first.
    pub fn newest(&self, limit: usize) -> Vec<DeadLetter> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.newest.iter().rev().take(limit).cloned().collect()
    }
}

/// The newest windows written to each windowed sink, kept in memory for the
/// JSON API and the dashboard (the last [`RecentWindows::KEEP`] per sink).
#[derive(Debug, Default)]
pub struct RecentWindows {
    inner: Mutex<BTreeMap<String, VecDeque<WindowRows>>>,
}

/// The output of one closed window.
#[derive(Debug, Clone)]
pub struct WindowRows {
    /// Window start and end, Unix microseconds.
    pub start_micros: i64,
    pub end_micros: i64,
    pub batches: Vec<RecordBatch>,
}

impl RecentWindows {
    pub const KEEP: usize = 120;

    /// Records the output of the window `[start_micros, end_micros)` for `sink`.
    pub fn record(&self, sink: &str, start_micros: i64, end_micros: i64, batches: &[RecordBatch]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let windows = inner.entry(sink.to_string()).or_default();
        if windows.back().is_some_and(|w| w.end_micros >= end_micros) {
            return; // a replayed window, or one already recorded
        }
        if windows.len() == Self::KEEP {
            windows.pop_front();
        }
        windows.push_back(WindowRows {
            start_micros,
            end_micros,
            batches: batches.to_vec(),
        });
    }

    /// The newest `limit` windows of `sink`, newest first (`None`: the sink
    /// has written no window since the job started).
    pub fn newest(&self, sink: &str, limit: usize) -> Option<Vec<WindowRows>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let windows = inner.get(sink)?;
        Some(windows.iter().rev().take(limit).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_lag_counts_from_the_last_change_received_or_the_confirmed_position() {
        let stats = JobStats::new(vec!["recent".into(), "quiet".into()]);
        stats.server_wal_end.store(1_000, Ordering::Relaxed);
        stats.confirmed_lsn.store(100, Ordering::Relaxed);
        stats.sink_lsn[0].store(900, Ordering::Relaxed);
        assert_eq!(stats.sink_lag_bytes(), vec![100, 900]);
        stats.sink_detached[1].store(1, Ordering::Relaxed);
        let text = Arc::new(stats).prometheus();
        assert!(
            text.contains(
                "engage_sink_detached{sink=\"recent\"} 0\nengage_sink_detached{sink=\"quiet\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("engage_sink_lag_bytes{sink=\"recent\"} 100"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE engage_sink_lag_bytes gauge"),
            "{text}"
        );
    }

    #[test]
    fn commit_times_split_at_a_window_end_and_stay_bounded() {
        let mut pending = CommitTimes::default();
        let batch = CommitTimes {
            runs: vec![(1_000, 2), (1_500, 1), (2_000, 3)],
        };
        pending.absorb(&batch);
        let taken = pending.take_before(1_600_000).unwrap();
        assert_eq!(taken.runs, vec![(1_000, 2), (1_500, 1)]);
        assert_eq!(pending.runs, vec![(2_000, 3)]);
        assert!(pending.take_before(1_000_000).is_none());
        let histogram = latency_buckets();
        let recent = RecentLatencies::default();
        taken.observe(&histogram, &recent, 3_000);
        // 2 s twice, 1.5 s once.
        assert_eq!(recent.quantile(0.5), Some(2.0));
        assert_eq!(recent.quantile(0.01), Some(1.5));
        // A day of one change per millisecond stays within MAX_RUNS runs,
        // and keeps its count.
        let mut day = CommitTimes::default();
        for second in 0..200 {
            let runs = (0..1000).map(|ms| (second * 1000 + ms, 1)).collect();
            day.absorb(&CommitTimes { runs });
        }
        assert!(day.runs.len() <= CommitTimes::MAX_RUNS);
        assert_eq!(
            day.runs.iter().map(|(_, n)| u64::from(*n)).sum::<u64>(),
            200_000
        );
        assert!(day.runs.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    /// Sinks declared in another order than their INSERTs, and a
    /// `dead_letter` table no INSERT writes: each query's rows are still
    /// counted under its own table's name.
    #[tokio::test]
    async fn rows_are_counted_under_the_name_of_the_table_each_query_writes() {
        let sql = "
            CREATE TABLE dead_letter WITH (connector = 'filesystem', path = '/tmp/d', format = 'parquet');
            CREATE TABLE second WITH (connector = 'filesystem', path = '/tmp/s', format = 'parquet');
            CREATE TABLE first WITH (connector = 'filesystem', path = '/tmp/f', format = 'parquet');
            CREATE TABLE t (id BIGINT, PRIMARY KEY (id)) WITH (connector = 'postgres-cdc',
                connection = 'postgres://u@127.0.0.1/db', table = 'public.t');
            INSERT INTO first SELECT id FROM t;
            INSERT INTO second SELECT id, _op FROM t;";
        let spec = crate::sql::parse_job("j", sql, &|_| None).unwrap();
        let plan = crate::sql::plan::JobPlan::new(&spec).await.unwrap();
        let stats = JobStats::for_job(&spec);
        let written: Vec<&str> = plan
            .queries
            .iter()
            .map(|q| plan.sinks[q.sink].def.name.as_str())
            .collect();
        assert_eq!(written, ["first", "second"]);
        assert_eq!(stats.sink_names, written);
    }
}
