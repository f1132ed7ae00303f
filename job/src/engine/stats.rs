//! Live figures of a running job, shared with whoever displays them.
//!
//! Counters are updated once per batch, never per row. The demo's status line
//! and `engage run --progress` read them; [`JobStats::prometheus`] renders
//! them in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters and gauges of one job.
#[derive(Debug, Default)]
pub struct JobStats {
    /// Source changes read (all tables).
    pub changes_in: AtomicU64,
    /// Batches processed.
    pub batches: AtomicU64,
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
    /// Epoch of the last completed checkpoint.
    pub checkpoint_epoch: AtomicU64,
    /// Unix milliseconds of the last completed checkpoint (0: none yet).
    pub checkpoint_unix_ms: AtomicU64,
    /// LSN up to which the slot is confirmed.
    pub confirmed_lsn: AtomicU64,
    /// End LSN of the last commit the job has processed (not yet checkpointed).
    pub processed_lsn: AtomicU64,
    /// The server's WAL end as last reported by the stream.
    pub server_wal_end: AtomicU64,
    /// Truncates of driving tables, which have no rows to deliver.
    pub truncates_ignored: AtomicU64,
    /// Inserts older than the watermark, not aggregated by windows.
    pub late_events: AtomicU64,
    /// Retractions whose windows had all closed.
    pub expired_retractions: AtomicU64,
    /// Change rows that failed a CHECK and went to the dead-letter output.
    pub dead_lettered: AtomicU64,
    /// Changes the source sent again after a restart that a sink (or the
    /// whole engine) already held, and that were therefore not applied again.
    pub resent_suppressed: AtomicU64,
    /// In-process restarts from the newest checkpoint (see `engine::supervise`).
    pub restarts: AtomicU64,
}

impl JobStats {
    /// Statistics of the job `spec`, with one sink slot per `INSERT`, in the
    /// order the plan numbers its queries (the engine counts rows of query
    /// `i` in slot `i`), named after the table each writes.
    pub fn for_job(spec: &crate::sql::JobSpec) -> JobStats {
        JobStats::new(spec.inserts.iter().map(|i| i.sink.clone()).collect())
    }

    pub fn new(sink_names: Vec<String>) -> JobStats {
        JobStats {
            sink_rows: sink_names.iter().map(|_| AtomicU64::new(0)).collect(),
            sink_lsn: sink_names.iter().map(|_| AtomicU64::new(0)).collect(),
            sink_detached: sink_names.iter().map(|_| AtomicU64::new(0)).collect(),
            sink_names,
            ..JobStats::default()
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

    /// Metrics in Prometheus' text exposition format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "engage_source_changes_total",
            "counter",
            "Source changes read.",
            self.changes_in.load(Ordering::Relaxed),
        );
        metric(
            "engage_batches_total",
            "counter",
            "Change batches processed.",
            self.batches.load(Ordering::Relaxed),
        );
        metric(
            "engage_dead_lettered_total",
            "counter",
            "Change rows that failed a CHECK and went to the dead-letter output.",
            self.dead_lettered.load(Ordering::Relaxed),
        );
        metric(
            "engage_resent_suppressed_total",
            "counter",
            "Changes re-sent after a restart that were already applied, and skipped.",
            self.resent_suppressed.load(Ordering::Relaxed),
        );
        metric(
            "engage_restarts_total",
            "counter",
            "In-process restarts from the newest checkpoint after a curable failure.",
            self.restarts.load(Ordering::Relaxed),
        );
        metric(
            "engage_late_events_total",
            "counter",
            "Inserts older than the watermark, not aggregated by windows.",
            self.late_events.load(Ordering::Relaxed),
        );
        metric(
            "engage_checkpoint_epoch",
            "gauge",
            "Epoch of the last checkpoint.",
            self.checkpoint_epoch.load(Ordering::Relaxed),
        );
        metric(
            "engage_processing_lag_bytes",
            "gauge",
            "WAL the job has not processed yet.",
            self.processing_lag_bytes(),
        );
        metric(
            "engage_replication_lag_bytes",
            "gauge",
            "WAL retained by the slot beyond the last confirmed position.",
            self.replication_lag_bytes(),
        );
        let _ = writeln!(
            out,
            "# HELP engage_sink_rows_total Rows written per sink.\n# TYPE engage_sink_rows_total counter"
        );
        for (name, rows) in self.sink_names.iter().zip(&self.sink_rows) {
            let _ = writeln!(
                out,
                "engage_sink_rows_total{{sink=\"{name}\"}} {}",
                rows.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP engage_sink_lag_bytes WAL between the server's end and the last change a sink received.\n\
             # TYPE engage_sink_lag_bytes gauge"
        );
        for (name, lag) in self.sink_names.iter().zip(self.sink_lag_bytes()) {
            let _ = writeln!(out, "engage_sink_lag_bytes{{sink=\"{name}\"}} {lag}");
        }
        let _ = writeln!(
            out,
            "# HELP engage_sink_detached 1 while a sink is detached because its store is unreachable.\n\
             # TYPE engage_sink_detached gauge"
        );
        for (name, detached) in self.sink_names.iter().zip(&self.sink_detached) {
            let detached = detached.load(Ordering::Relaxed);
            let _ = writeln!(out, "engage_sink_detached{{sink=\"{name}\"}} {detached}");
        }
        out
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
        let text = stats.prometheus();
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
