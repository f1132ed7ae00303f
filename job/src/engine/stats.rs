//! Live figures of a running job, shared with whoever displays them.
//!
//! Counters are updated once per batch, never per row. The demo's status line
//! and `engage run --progress` read them, the HTTP server (`crate::http`)
//! serves them: [`JobStats::prometheus`] renders them in Prometheus' text
//! format with Prometheus' own Rust client (`prometheus-client`), which also
//! keeps the histograms.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use prometheus_client::metrics::histogram::exponential_buckets;

use super::histogram::RunHistogram;
use super::latency::{unix_ms, RecentLatencies};
use super::recent::{DeadLetterLog, RecentWindows};
use crate::change::OP_COLUMN;

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
    pub batch_seconds: RunHistogram,
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
    /// for every change of the driving table (see `sink/task.rs`).
    pub commit_to_visible: Vec<RunHistogram>,
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
    pub checkpoint_seconds: RunHistogram,
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
    /// The backfill under way, if any (`engage backfill`).
    pub backfill: BackfillStats,
}

/// Letters of [`JobStats::source_ops`], in order.
pub const OPS: [&str; 3] = ["c", "u", "d"];

/// A latency histogram: 1 ms to about 128 s, each bucket 1.5 times the
/// last, so a quantile read from them (`histogram_quantile`) is off by at
/// most about a quarter.
pub fn latency_buckets() -> RunHistogram {
    RunHistogram::new(exponential_buckets(0.001, 1.5, 30))
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
            backfill: BackfillStats::default(),
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

    /// Records a write of `rows` rows to sink `index` covering input up to
    /// commit LSN `lsn` (not counted as received while the sink is
    /// `detached`: it drops what it is sent).
    pub fn record_write(&self, index: usize, rows: u64, lsn: u64, detached: bool) {
        self.sink_rows[index].fetch_add(rows, Ordering::Relaxed);
        self.sink_last_write_ms[index].store(unix_ms() as u64, Ordering::Relaxed);
        if !detached {
            self.sink_lsn[index].fetch_max(lsn, Ordering::Relaxed);
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

/// A backfill's figures, for its progress bar, `/metrics` and the JSON API.
#[derive(Debug, Default)]
pub struct BackfillStats {
    pub active: std::sync::atomic::AtomicBool,
    /// Computing the historical windows (every chunk is read).
    pub windows_phase: std::sync::atomic::AtomicBool,
    pub read: AtomicU64,
    pub emitted: AtomicU64,
    pub superseded: AtomicU64,
    pub streamed: AtomicU64,
    pub estimate: AtomicU64,
    /// The last chunk's SELECT (µs).
    pub chunk_micros: AtomicU64,
}
