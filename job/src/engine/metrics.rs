//! The job's figures in Prometheus' text format, rendered by Prometheus'
//! own Rust client (`prometheus-client`).
//!
//! The counters live in [`JobStats`] as plain atomics (the engine bumps them
//! once per batch); a [`Collector`] reads them at each scrape. Histograms are
//! [`RunHistogram`]s, which encode as the client's own do. Names follow Prometheus' conventions: the `engage_`
//! prefix, `_total` on counters (the client appends it), base units in the
//! name (`_seconds`, `_bytes`), and only low-cardinality labels (`sink`,
//! `table`, `op`, `reason`). Names that existed before the HTTP server are
//! kept: dashboards are built on them.

use std::fmt::Error;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backfill::Phase;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::histogram::RunHistogram;
use super::stats::{JobStats, OPS};

/// The Content-Type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric of `stats`, in Prometheus' text exposition format.
pub fn render(stats: Arc<JobStats>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatsCollector(stats)));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct StatsCollector(Arc<JobStats>);

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

/// Writes one metric without labels.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), Error> {
    let metric_encoder = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(metric_encoder)
}

/// Writes one metric family: a value per label set.
fn family<'a, M: EncodeMetric + 'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    members: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, M)>,
) -> Result<(), Error> {
    let mut metric_encoder = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in members {
        metric.encode(metric_encoder.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes a histogram per sink.
fn per_sink_histograms(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    names: &[String],
    histograms: &[RunHistogram],
) -> Result<(), Error> {
    let mut metric_encoder = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (sink, histogram) in names.iter().zip(histograms) {
        histogram.encode(metric_encoder.encode_family(&[("sink", sink.as_str())])?)?;
    }
    Ok(())
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        let stats = &self.0;
        let e = &mut encoder;
        // Counters (the client writes the `_total` suffix).
        family(
            e,
            "engage_source_changes",
            "Source changes read, per table and op (c insert, u update, d delete).",
            MetricType::Counter,
            stats
                .source_names
                .iter()
                .zip(&stats.source_ops)
                .flat_map(|(table, ops)| {
                    OPS.iter().zip(ops).map(move |(op, count)| {
                        (
                            vec![("table", table.as_str()), ("op", *op)],
                            ConstCounter::new(load(count)),
                        )
                    })
                }),
        )?;
        single(
            e,
            "engage_batches",
            "Change batches processed.",
            ConstCounter::new(load(&stats.batches)),
        )?;
        family(
            e,
            "engage_sink_rows",
            "Rows written per sink.",
            MetricType::Counter,
            stats
                .sink_names
                .iter()
                .zip(&stats.sink_rows)
                .map(|(sink, rows)| (vec![("sink", sink.as_str())], ConstCounter::new(load(rows)))),
        )?;
        single(
            e,
            "engage_dead_lettered",
            "Change rows that failed a CHECK or could not be decoded, sent to the dead-letter output.",
            ConstCounter::new(load(&stats.dead_lettered)),
        )?;
        let reasons = stats.dead_letters.by_reason();
        family(
            e,
            "engage_dead_letters",
            "Dead letters per reason (the CHECK's name, or decode_error:<column>).",
            MetricType::Counter,
            reasons.iter().map(|(reason, count)| {
                (vec![("reason", reason.as_str())], ConstCounter::new(*count))
            }),
        )?;
        single(
            e,
            "engage_late_events",
            "Inserts older than the watermark, not aggregated by windows.",
            ConstCounter::new(load(&stats.late_events)),
        )?;
        single(
            e,
            "engage_resent_suppressed",
            "Changes re-sent after a restart that were already applied, and skipped.",
            ConstCounter::new(load(&stats.resent_suppressed)),
        )?;
        let backfill = &stats.backfill;
        let active = backfill.active.load(Ordering::Relaxed);
        single(
            e,
            "engage_backfill_active",
            "1 while an `engage backfill` is under way.",
            ConstGauge::new(active as i64),
        )?;
        let windows = backfill.windows_phase.load(Ordering::Relaxed);
        family(
            e,
            "engage_backfill_phase",
            "The phase of the backfill under way: snapshot (reading chunks) or windows (historical windows).",
            MetricType::Gauge,
            [
                (Phase::Snapshot.label(), active && !windows),
                (Phase::Windows.label(), active && windows),
            ]
                .into_iter()
                .map(|(phase, on)| (vec![("phase", phase)], ConstGauge::new(on as i64))),
        )?;
        family(
            e,
            "engage_backfill_rows",
            "Rows of the backfill under way: read, emitted as `r`, superseded by the live stream while \
             their chunk was read, or already streamed.",
            MetricType::Gauge,
            [
                ("read", &backfill.read),
                ("emitted", &backfill.emitted),
                ("superseded", &backfill.superseded),
                ("streamed", &backfill.streamed),
            ]
            .into_iter()
            .map(|(kind, value)| (vec![("kind", kind)], ConstGauge::new(load(value) as i64))),
        )?;
        let (read, estimate) = (load(&backfill.read), load(&backfill.estimate));
        single(
            e,
            "engage_backfill_progress_ratio",
            "Rows read over the rows the range held when the backfill began (0 to 1).",
            ConstGauge::new(if estimate > 0 {
                (read as f64 / estimate as f64).min(1.0)
            } else {
                0.0
            }),
        )?;
        single(
            e,
            "engage_backfill_chunk_seconds",
            "How long the last backfill chunk's SELECT took.",
            ConstGauge::new(load(&backfill.chunk_micros) as f64 / 1e6),
        )?;
        single(
            e,
            "engage_restarts",
            "In-process restarts from the newest checkpoint after a curable failure.",
            ConstCounter::new(load(&stats.restarts)),
        )?;
        single(
            e,
            "engage_checkpoints",
            "Checkpoints taken by this process.",
            ConstCounter::new(load(&stats.checkpoints)),
        )?;
        // Histograms.
        single(
            e,
            "engage_checkpoint_duration_seconds",
            "Seconds a checkpoint takes, from the barrier to the sinks' commit.",
            stats.checkpoint_seconds.clone(),
        )?;
        single(
            e,
            "engage_batch_duration_seconds",
            "Seconds to process one change batch: checks, queries, hand-off to the sinks, windows.",
            stats.batch_seconds.clone(),
        )?;
        per_sink_histograms(
            e,
            "engage_commit_to_visible_seconds",
            "Seconds from a change's commit in Postgres to the moment the sink made it visible \
             (Redis: applied; Kafka: transaction committed; Parquet: file published at a checkpoint).",
            &stats.sink_names,
            &stats.commit_to_visible,
        )?;
        // Gauges.
        let gauge = |value: u64| ConstGauge::new(value as i64);
        single(
            e,
            "engage_checkpoint_epoch",
            "Epoch of the last checkpoint.",
            gauge(load(&stats.checkpoint_epoch)),
        )?;
        single(
            e,
            "engage_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint (0: none yet).",
            ConstGauge::new(load(&stats.checkpoint_unix_ms) as f64 / 1000.0),
        )?;
        single(
            e,
            "engage_checkpoint_size_bytes",
            "Bytes of state the last checkpoint wrote.",
            gauge(load(&stats.checkpoint_bytes)),
        )?;
        single(
            e,
            "engage_processing_lag_bytes",
            "WAL the job has not processed yet.",
            gauge(stats.processing_lag_bytes()),
        )?;
        single(
            e,
            "engage_replication_lag_bytes",
            "WAL retained by the slot beyond the last confirmed position.",
            gauge(stats.replication_lag_bytes()),
        )?;
        let lags = stats.sink_lag_bytes();
        family(
            e,
            "engage_sink_lag_bytes",
            "WAL between the server's end and the last change a sink received.",
            MetricType::Gauge,
            stats
                .sink_names
                .iter()
                .zip(lags)
                .map(|(sink, lag)| (vec![("sink", sink.as_str())], gauge(lag))),
        )?;
        family(
            e,
            "engage_sink_detached",
            "1 while a sink is detached because its store is unreachable.",
            MetricType::Gauge,
            stats
                .sink_names
                .iter()
                .zip(&stats.sink_detached)
                .map(|(sink, detached)| (vec![("sink", sink.as_str())], gauge(load(detached)))),
        )?;
        single(
            e,
            "engage_window_state_rows",
            "Rows of window state held in memory.",
            gauge(load(&stats.window_state_rows)),
        )?;
        single(
            e,
            "engage_streaming",
            "1 while the job streams changes (0: starting, replaying or restarting).",
            gauge(u64::from(stats.streaming.load(Ordering::Relaxed))),
        )?;
        single(
            e,
            "engage_resident_memory_bytes",
            "Resident memory of the process.",
            gauge(resident_bytes().unwrap_or(0)),
        )?;
        Ok(())
    }
}

/// The process' resident set, from `/proc/self/statm` (Linux).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}
