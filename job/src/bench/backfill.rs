//! `engage bench --backfill-rows N`: a backfill of N rows of history under
//! live load, beside the limit here, a `COPY` of the same range.
//!
//! 1. N events are inserted with event times over the last 7 days, before
//!    the job's slot exists (history to it);
//! 2. `COPY (SELECT <the job's columns> ... <the range>) TO STDOUT`, read
//!    and dropped by this process: how fast Postgres hands the rows out;
//! 3. the job starts; the first steady rate (`--rates`, 5,000/s by the
//!    issue's measure) runs for `--phase-secs` with freshness markers, and
//!    3 s in, `engage backfill --since now-8d` runs (handed to the job);
//! 4. figures: the backfill's rows/s (rows read over its own seconds, from
//!    the checkpoint that recorded it complete), the markers committed
//!    while it ran (commit to visible, p50/p99), the job's resident memory
//!    at its highest while it ran, and the WAL the slot retained at most.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tokio::process::Command;

use super::markers::{mark, Watch};
use super::process::JobProcess;
use super::report::Percentiles;
use super::{
    connect, context, step, BenchError, BenchOptions, World, BUILD, CONTENT_ITEMS, MARKER_MARGIN,
    RESOLVE_GRACE, SEED, STOP_TIMEOUT,
};
use crate::checkpoint::CheckpointStore;
use crate::generate::{self, GenerateOptions, GenerateProgress};

/// How far back the history goes, and the range backfilled (a day more).
const HISTORY: Duration = Duration::from_secs(7 * 86_400);
const SINCE: &str = "now-8d";
/// Live load before the backfill starts.
const LEAD: Duration = Duration::from_secs(3);

/// What `engage bench --backfill-rows` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BackfillReport {
    pub build: &'static str,
    pub cores: usize,
    pub rows: u64,
    pub seed_secs: f64,
    /// `COPY ... TO STDOUT` of the range, read and dropped.
    pub copy_secs: f64,
    pub copy_rows_per_sec: f64,
    pub live_rate: u64,
    pub backfill_secs: f64,
    pub backfill_rows_per_sec: f64,
    /// backfill / COPY, in rows per second.
    pub ratio: f64,
    pub rows_read: u64,
    pub rows_emitted: u64,
    pub historical_windows: u64,
    /// From the command's start to its exit (hand-off and the final checkpoint included).
    pub command_secs: f64,
    /// Markers committed while the backfill ran.
    pub top_content: Percentiles,
    pub recent: Percentiles,
    pub kafka: Percentiles,
    /// The job's resident memory at its highest while the backfill ran (KiB).
    pub job_peak_rss_kb: u64,
    /// WAL the job's slot retained at most while the backfill ran.
    pub peak_wal_retained_bytes: i64,
}

impl World {
    pub(super) async fn measure_backfill(
        &self,
        options: &BenchOptions,
        rows: u64,
    ) -> Result<BackfillReport, BenchError> {
        let db = connect(&self.postgres_url).await?;
        generate::ensure_schema(&db).await?;
        let content = generate::seed_content(&db, CONTENT_ITEMS, SEED).await?;
        let content: Vec<String> = content.into_iter().map(|item| item.id).collect();
        step(&format!("seeding {rows} events over the last 7 days"));
        let seeded = Instant::now();
        generate::seed_history(&db, HISTORY, rows).await?;
        let seed_secs = seeded.elapsed().as_secs_f64();
        db.batch_execute("VACUUM ANALYZE engagement_events")
            .await
            .map_err(context("failed to vacuum the history"))?;

        step("COPY of the same range to nowhere (the limit)");
        let copy = Instant::now();
        let copied = copy_range(&db).await?;
        let copy_secs = copy.elapsed().as_secs_f64();

        step("starting the job");
        let mut job = JobProcess::spawn(self, None, "job-live.log")?;
        self.await_checkpoint(&mut job).await?;
        let redis = redis::Client::open(self.redis_url.as_str())
            .map_err(context("invalid redis url"))?
            .get_multiplexed_async_connection()
            .await
            .map_err(context("failed to connect to redis"))?;
        let rate = options.rates.first().copied().unwrap_or(5_000);
        let length = Duration::from_secs(options.phase_secs.unwrap_or(60));
        step(&format!(
            "{rate} events/s for {} s, the backfill from {} s in",
            length.as_secs(),
            LEAD.as_secs()
        ));
        let watch = Watch::start(&redis, &self.job, &self.kafka_brokers).await?;
        let start = Instant::now();
        let generator = generate::run(
            &self.postgres_url,
            GenerateOptions {
                rate: Some(rate),
                duration: Some(length),
                content_items: CONTENT_ITEMS,
                seed: SEED + 1,
                ..GenerateOptions::default()
            },
            Arc::new(GenerateProgress::default()),
            futures::future::pending(),
        );
        let markers = mark(&db, &content, &watch, start + length - MARKER_MARGIN);
        let backfill = self.run_backfill(&db, &mut job);
        let (generated, markers, backfill) = tokio::join!(generator, markers, backfill);
        let (_, _, backfill) = (generated?, markers?, backfill?);
        let samples = watch.settle(&mut job, RESOLVE_GRACE).await?;
        let during: Vec<_> = samples
            .iter()
            .filter(|s| s.committed >= backfill.started && s.committed <= backfill.ended)
            .collect();
        write_timeline(&self.root.join("freshness.csv"), &samples)?;
        job.terminate(STOP_TIMEOUT).await?;

        let store =
            CheckpointStore::open(&self.root.join("checkpoints").to_string_lossy(), &self.job)?;
        let latest = store.latest().await?;
        let finished = latest
            .as_ref()
            .and_then(|m| m.backfills.last())
            .ok_or_else(|| BenchError::Failed("no checkpoint records the backfill".into()))?;
        let backfill_secs = finished.seconds;
        let per_sec = finished.counts.read as f64 / backfill_secs.max(1e-9);
        let copy_rows_per_sec = copied as f64 / copy_secs.max(1e-9);
        Ok(BackfillReport {
            build: BUILD,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            rows,
            seed_secs,
            copy_secs,
            copy_rows_per_sec,
            live_rate: rate,
            backfill_secs,
            backfill_rows_per_sec: per_sec,
            ratio: per_sec / copy_rows_per_sec.max(1e-9),
            rows_read: finished.counts.read,
            rows_emitted: finished.counts.emitted,
            historical_windows: finished.counts.windows,
            command_secs: backfill
                .ended
                .duration_since(backfill.started)
                .as_secs_f64(),
            top_content: Percentiles::of(during.iter().map(|s| s.top)),
            recent: Percentiles::of(during.iter().map(|s| s.recent)),
            kafka: Percentiles::of(during.iter().map(|s| s.kafka)),
            job_peak_rss_kb: backfill.peak_rss_kb,
            peak_wal_retained_bytes: backfill.peak_wal_bytes,
        })
    }

    /// Runs `engage backfill` after [`LEAD`], sampling the job's memory and
    /// the slot's retained WAL until it exits.
    async fn run_backfill(
        &self,
        db: &tokio_postgres::Client,
        job: &mut JobProcess,
    ) -> Result<BackfillRun, BenchError> {
        tokio::time::sleep(LEAD).await;
        let log = self.root.join("backfill.log");
        let file = std::fs::File::create(&log).map_err(context("failed to create backfill.log"))?;
        let mut command = Command::from(self.command(&["backfill"])?);
        let mut child = command
            .args(["--since", SINCE, "--progress", "plain", "--http", "off"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .map_err(context("failed to start engage backfill"))?;
        let started = Instant::now();
        let (mut peak_rss_kb, mut peak_wal_bytes) = (0u64, 0i64);
        let slot = format!("engage_{}", self.job.to_lowercase());
        loop {
            let exited = child
                .try_wait()
                .map_err(context("failed to wait for engage backfill"))?;
            peak_rss_kb = peak_rss_kb.max(job.sample_usage().rss_kb);
            let retained = db
                .query_opt(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(context("failed to read the slot's retained WAL"))?;
            peak_wal_bytes = peak_wal_bytes.max(retained.map_or(0, |r| r.get(0)));
            if let Some(status) = exited {
                if !status.success() {
                    return Err(BenchError::Failed(format!(
                        "engage backfill failed ({status}); see {}",
                        log.display()
                    )));
                }
                break;
            }
            job.check_running()?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(BackfillRun {
            started,
            ended: Instant::now(),
            peak_rss_kb,
            peak_wal_bytes,
        })
    }
}

struct BackfillRun {
    started: Instant,
    ended: Instant,
    peak_rss_kb: u64,
    peak_wal_bytes: i64,
}

/// `COPY` of the backfilled range's rows, the columns the job declares, to
/// this process, which drops them. Returns the rows.
async fn copy_range(db: &tokio_postgres::Client) -> Result<u64, BenchError> {
    let sql = "COPY (SELECT id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload \
               FROM engagement_events WHERE event_ts >= now() - interval '8 days' ORDER BY id) TO STDOUT";
    let stream = db
        .copy_out(sql)
        .await
        .map_err(context("failed to COPY the range"))?;
    futures::pin_mut!(stream);
    let mut rows = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(context("failed to COPY the range"))?;
        rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    Ok(rows)
}

/// Prints one line per figure.
pub(super) fn print(report: &BackfillReport) {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ms"));
    println!(
        "build {}, {} cores; {} rows of history seeded in {:.1} s",
        report.build, report.cores, report.rows, report.seed_secs
    );
    println!(
        "COPY of the range to nowhere: {:.1} s, {:.0} rows/s (the limit)",
        report.copy_secs, report.copy_rows_per_sec
    );
    println!(
        "backfill: {} rows read, {} emitted, {} historical windows in {:.1} s: {:.0} rows/s, {:.2} of COPY \
         (command, hand-off to the final checkpoint: {:.1} s)",
        report.rows_read,
        report.rows_emitted,
        report.historical_windows,
        report.backfill_secs,
        report.backfill_rows_per_sec,
        report.ratio,
        report.command_secs
    );
    for (name, p) in [
        ("top_content", &report.top_content),
        ("recent", &report.recent),
        ("kafka", &report.kafka),
    ] {
        println!(
            "live freshness during the backfill at {} events/s, {name}: p50 {} p99 {} max {} ({} markers, {} unresolved)",
            report.live_rate,
            ms(p.p50_ms),
            ms(p.p99_ms),
            ms(p.max_ms),
            p.samples,
            p.unresolved
        );
    }
    println!(
        "job resident memory at its highest during the backfill: {:.0} MiB; WAL retained by the slot at most: {:.1} MiB",
        report.job_peak_rss_kb as f64 / 1024.0,
        report.peak_wal_retained_bytes as f64 / 1_048_576.0
    );
}

/// Writes every marker's commit time (Unix ms) and how long each output
/// took to show it, one line each, to set beside the job's log (kept with
/// `--keep`).
fn write_timeline(
    path: &std::path::Path,
    samples: &[super::markers::Sample],
) -> Result<(), BenchError> {
    let now = Instant::now();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let ms = |d: Option<Duration>| d.map_or(String::new(), |d| d.as_millis().to_string());
    let mut text = String::from("committed_unix_ms,top_content_ms,recent_ms,kafka_ms\n");
    for sample in samples {
        let committed = now_ms - now.duration_since(sample.committed).as_millis() as i64;
        text += &format!(
            "{committed},{},{},{}\n",
            ms(sample.top),
            ms(sample.recent),
            ms(sample.kafka)
        );
    }
    std::fs::write(path, text).map_err(context(format!("failed to write {}", path.display())))
}
