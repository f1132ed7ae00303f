//! `engage bench`: the figures of the mission pipeline, measured in one run.
//!
//! The bench starts its own Postgres (fsync off, `synchronous_commit` on) and
//! Redis in a temporary directory, seeds [`CONTENT_ITEMS`] content items, and
//! runs the job SQL with the job as a *child process* (this binary's `run`), so
//! that memory (`VmHWM`, `VmRSS` of `/proc/<pid>/status`) and CPU (`utime +
//! stime` of `/proc/<pid>/stat`) are the job's alone. It prints figures and
//! asserts nothing.
//!
//! # Method
//!
//! 1. **Freshness** at each steady rate of `--rates`, for `--phase-secs` each.
//!    The load generator ([`generate::run`]) runs in-process at that rate, and
//!    beside it, every [`MARKER_INTERVAL`] until [`MARKER_MARGIN`] before the
//!    end, a *marker* event is committed (one autocommitted `INSERT ...
//!    RETURNING`, `event_ts = now()`, a content item drawn uniformly, so its
//!    list moves slowly). A watcher polls Redis every [`POLL_INTERVAL`] with
//!    one pipeline and resolves markers:
//!    - `engage:top_content:10m` once the applied window end (hash
//!      `engage:job:<job>:window_end`, field `top_content`) reaches the end of
//!      the first hop window holding the event time `t`,
//!      `E = floor(t / 500 ms) * 500 ms + 500 ms`;
//!    - `engage:recent:{content_id}` once the list's 50 entries hold the id;
//!    - `engage.enriched_events` once a `read_committed` consumer of the
//!      topic receives the marker's message (`bench/topic_watch.rs`).
//!
//!    Freshness = the poll reply that showed the effect minus the return of the
//!    `INSERT`. Per phase also: events generated and processed per second (the
//!    job's `--progress` counter, between its first and last line of the phase)
//!    and the job's CPU.
//! 2. **Idle stream**: `--idle-markers` markers alone, each after [`IDLE_GAP`]
//!    of nothing (plus a random part of a slide, so the markers fall at every
//!    point of their window's slide, not all at the same one), resolved the
//!    same way: a single event's freshness when no newer event closes its
//!    window (the wall clock has to).
//! 3. **Burst**. The job is stopped (SIGTERM, final checkpoint); a
//!    `pg_recvlogical` slot is created; `--burst-events` events are generated as
//!    fast as Postgres takes them; `END = pg_current_wal_lsn()`; one more
//!    transaction commits past END. `pg_recvlogical` (pgoutput, the job's
//!    publication) drains to END, the physical limit of logical decoding here;
//!    then `engage run --end-lsn END` drains the same WAL through every sink,
//!    start-up and final checkpoint included. Then the same again for a
//!    backlog of `--large-transactions` transactions of
//!    `--large-transaction-events` events each (one COPY each), with the
//!    drain's peak RSS: how the job copes with transactions far larger than
//!    its batches.
//! 4. **Resources and state**: peak RSS and CPU of both job processes; from the
//!    newest checkpoint manifest, window, dimension and capture sizes and the
//!    distinct content ids in the `top_content` window state.
//!
//! # Limits
//!
//! - Bench, generator, job, Postgres and Redis share the machine: on two cores
//!   the generator and watcher take CPU the job would otherwise have, so the
//!   highest rates measure the machine as much as the job.
//! - An effect is timed to within a poll interval plus a Redis round trip; the
//!   commit instant is when the `INSERT` returned (late by under a local round
//!   trip). Markers are one-row transactions between the generator's COPY
//!   batches and wait in the same queue as its events.
//! - Top-content freshness includes, by design, waiting for event time to pass
//!   the window end plus the 200 ms watermark delay: ~450 ms on average.
//! - Memory is read every 10 ms while a job exits, so a peak in its last
//!   milliseconds can be missed; CPU is read exactly, from the exited process
//!   before it is reaped.
//! - `E` assumes the 500 ms slide and the keys of `sql/engagement.sql`; with a
//!   `--sql` that differs, markers stay unresolved and are counted as such.

use std::collections::HashSet;
use std::future::{pending, Future};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arrow::array::{Array, BinaryArray};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use tokio::process::Command;
use tokio_postgres::{Client, NoTls};

use crate::checkpoint::{self, CheckpointError, CheckpointStore};
use crate::embedded::{
    EmbeddedError, EmbeddedKafka, EmbeddedPostgres, EmbeddedRedis, PostgresOptions,
};
use crate::generate::{self, GenerateError, GenerateOptions, GenerateProgress};
use crate::harness;

mod backfill;
mod markers;
mod process;
mod report;
mod topic_watch;

use markers::{insert_marker, mark, Watch};
use process::JobProcess;
pub use report::{
    BenchReport, BurstReport, IdleReport, Percentiles, PhaseReport, StateReport, TwinDrain, Usage,
};

/// Content items seeded, so Zipf traffic keeps thousands of them active.
pub const CONTENT_ITEMS: usize = 10_000;
const SEED: u64 = 42;
/// Slide of the `top_content` hop window in `sql/engagement.sql`.
const HOP_SLIDE_MICROS: i64 = 500_000;
const TOP_CONTENT_SINK: &str = "top_content";
const RECENT_KEY_PREFIX: &str = "engage:recent:";
const RECENT_LENGTH: isize = 50;
/// 20 markers per second: the generator's batch rate.
const MARKER_INTERVAL: Duration = Duration::from_millis(50);
/// Markers stop this long before the generator: a marker's window closes only
/// once events 700 ms younger arrive (slide + watermark delay), or the wall
/// clock passes it on a quiet stream.
const MARKER_MARGIN: Duration = Duration::from_secs(1);
const POLL_INTERVAL: Duration = Duration::from_millis(3);
/// How long after its phase a marker may still resolve.
const RESOLVE_GRACE: Duration = Duration::from_secs(30);
const START_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);
const BUILD: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};
/// One commit after the burst's end LSN, so both readers see the stream reach it.
const PAST_END_SQL: &str =
    "UPDATE content SET title = title WHERE id = (SELECT id FROM content LIMIT 1)";
/// The job's slot and publication: the only ones in the bench's database.
/// The measured job's slot: neither pg_recvlogical's ($1) nor a twin's (blackhole, TLS).
const SLOT_SQL: &str = "SELECT s.slot_name::text, p.pubname::text \
     FROM pg_replication_slots s, pg_publication p WHERE s.slot_type = 'logical' \
     AND s.slot_name <> $1 AND s.slot_name NOT LIKE '%_blackhole' AND s.slot_name NOT LIKE '%_tls' \
     ORDER BY s.slot_name LIMIT 1";
const END_SQL: &str = "SELECT pg_current_wal_lsn()::text, \
     pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
     FROM pg_replication_slots WHERE slot_name = $1";
const RECV_SLOT: &str = "engage_bench_recv";
const RECV_SLOT_SQL: &str = "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1";
/// Quiet time before each idle-stream marker: longer than any idle rule.
const IDLE_GAP: Duration = Duration::from_secs(2);
const MARKER_SQL: &str = "INSERT INTO engagement_events \
     (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) \
     VALUES ($1::text::uuid, NULL, 'play', now(), 1000, 'web-chrome', '{\"bench\":1}') \
     RETURNING id, (extract(epoch FROM event_ts) * 1000000)::int8";

/// Why the bench could not produce its figures.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A Postgres, Redis, file or process operation failed; `what` names it.
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Failed(String),
    #[error("interrupted")]
    Interrupted,
    #[error("the bench failed (its logs and data are kept in {})", dir.display())]
    Kept {
        dir: PathBuf,
        #[source]
        error: Box<BenchError>,
    },
}

fn context<E>(what: impl Into<String>) -> impl FnOnce(E) -> BenchError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let what = what.into();
    move |source| BenchError::Context {
        what,
        source: Box::new(source),
    }
}

/// What `engage bench` measures; `--quick` shortens the defaults.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct BenchOptions {
    /// 5 s phases and a burst of 100,000 events: a smoke run.
    #[arg(long)]
    pub quick: bool,
    /// Seconds per steady-rate phase [default: 20, 5 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    pub phase_secs: Option<u64>,
    /// Events in the backlog [default: 1000000, 100000 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub burst_events: Option<u64>,
    /// Markers committed one at a time on an otherwise idle stream, 2 s
    /// apart, to time a single event's freshness [default: 10, 3 with --quick;
    /// 0 skips].
    #[arg(long)]
    pub idle_markers: Option<u64>,
    /// A second backlog of this many very large transactions (one COPY each)
    /// [default: 4, 2 with --quick; 0 skips].
    #[arg(long)]
    pub large_transactions: Option<u64>,
    /// Events per large transaction [default: 100000, 20000 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub large_transaction_events: Option<u64>,
    /// Steady rates, events per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub rates: Vec<u64>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-report.json")]
    pub report: PathBuf,
    /// The job SQL [default: the embedded sql/engagement.sql].
    #[arg(long)]
    pub sql: Option<PathBuf>,
    /// Skip the drains of the same job with every sink a blackhole (which
    /// measure the pipeline without the cost of its outputs).
    #[arg(long)]
    pub no_blackhole: bool,
    /// Start Postgres with TLS (a self-signed certificate, made with
    /// `openssl`) and drain each backlog once more over TLS
    /// (`sslmode=require`) by the blackhole twin of the job: against the
    /// blackhole drain, TLS' cost in the same run.
    #[arg(long)]
    pub postgres_tls: bool,
    /// Instead of the figures above: seed this many events of history (over
    /// the last 7 days), then backfill them while the first `--rates` rate
    /// runs for `--phase-secs` [default 60], beside a COPY of the same range
    /// (see job/src/bench/backfill.rs).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub backfill_rows: Option<u64>,
    /// Keep the run's directory (the job's logs, checkpoints, data and the
    /// servers' files) after a successful run too, and print where it is; a
    /// failed run always keeps it.
    #[arg(long)]
    pub keep: bool,
}

impl BenchOptions {
    /// The options with every default filled in.
    fn resolved(mut self) -> BenchOptions {
        let quick = self.quick;
        self.phase_secs.get_or_insert(if quick { 5 } else { 20 });
        self.burst_events
            .get_or_insert(if quick { 100_000 } else { 1_000_000 });
        self.idle_markers.get_or_insert(if quick { 3 } else { 10 });
        self.large_transactions
            .get_or_insert(if quick { 2 } else { 4 });
        self.large_transaction_events
            .get_or_insert(if quick { 20_000 } else { 100_000 });
        self
    }
}

/// Runs the bench, writes the JSON report and prints one line per figure.
/// When `shutdown` resolves first, the job is killed and the servers stopped.
pub async fn run(
    options: BenchOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BenchError> {
    let options = options.resolved();
    let root = tempfile::Builder::new().prefix("engage-bench-").tempdir();
    let root = root.map_err(context("failed to create a temporary directory"))?;
    let outcome = tokio::select! {
        outcome = measure(&options, root.path()) => outcome,
        () = shutdown => Err(BenchError::Interrupted),
    };
    let report = match outcome {
        Ok(report) => report,
        Err(error) => {
            return Err(BenchError::Kept {
                error: Box::new(error),
                dir: root.keep(),
            })
        }
    };
    if options.keep {
        println!("kept: {}", root.keep().display());
    }
    let json = match &report {
        Reports::Full(report) => serde_json::to_string_pretty(report),
        Reports::Backfill(report) => serde_json::to_string_pretty(report),
    };
    let json = json.expect("report serialises") + "\n";
    let path = &options.report;
    std::fs::write(path, json).map_err(context(format!("failed to write {}", path.display())))?;
    match &report {
        Reports::Full(report) => report::print_figures(report),
        Reports::Backfill(report) => backfill::print(report),
    }
    println!("report: {}", path.display());
    Ok(())
}

/// What a run measured: the default figures, or `--backfill-rows`'.
enum Reports {
    Full(Box<BenchReport>),
    Backfill(Box<backfill::BackfillReport>),
}

/// Makes a self-signed certificate for `localhost` in `dir` (with the
/// `openssl` tool) for the embedded Postgres; returns the settings that
/// turn its TLS on.
async fn self_signed_certificate(dir: &Path) -> Result<Vec<(String, String)>, BenchError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(context(format!("failed to create {}", dir.display())))?;
    let mut openssl = Command::new("openssl");
    openssl
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.pem",
            "-days",
            "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .current_dir(dir);
    run_tool(&mut openssl).await?;
    let set = |name: &str, mode: u32| {
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(mode))
            .map_err(context(format!("failed to chmod {name}")))
    };
    set(".", 0o755)?;
    set("server.key", 0o600)?;
    // The server runs as `postgres` when we are root: the key must be its own.
    if unsafe { libc::geteuid() } == 0 {
        let mut chown = Command::new("chown");
        chown.arg("postgres").arg(dir.join("server.key"));
        run_tool(&mut chown).await?;
    }
    let file = |name: &str| dir.join(name).display().to_string();
    Ok(vec![
        ("ssl".into(), "on".into()),
        ("ssl_cert_file".into(), file("server.pem")),
        ("ssl_key_file".into(), file("server.key")),
    ])
}

fn step(message: &str) {
    eprintln!("[bench] {message}");
}

/// Paths, URLs and names the steps share.
struct World {
    root: PathBuf,
    sql: PathBuf,
    job: String,
    postgres_url: String,
    redis_url: String,
    kafka_brokers: String,
    /// The same job with every sink a blackhole, in a directory of its own:
    /// it drains each backlog after the real one.
    blackhole: Option<Box<World>>,
    /// The blackhole twin over TLS to Postgres (`--postgres-tls`), likewise.
    tls: Option<Box<World>>,
}

impl World {
    /// `engage <subcommand> <sql> --checkpoint-dir <root>/checkpoints` (this
    /// binary), with the world's services in its environment.
    fn command(&self, subcommand: &[&str]) -> Result<std::process::Command, BenchError> {
        let exe = std::env::current_exe().map_err(context("failed to locate this binary"))?;
        let services = harness::Services {
            postgres_url: self.postgres_url.clone(),
            redis_url: self.redis_url.clone(),
            kafka_brokers: self.kafka_brokers.clone(),
            data_dir: self.root.join("data"),
        };
        let checkpoints = self.root.join("checkpoints");
        Ok(harness::job_command(
            &exe,
            subcommand,
            &self.sql,
            &checkpoints,
            &services,
        ))
    }
}

/// `sql` with every table an INSERT writes to declared as a blackhole sink
/// (side outputs, which no INSERT names, stay as they are).
fn blackhole_sql(sql: &str) -> String {
    let mut out = sql.to_string();
    let targets: Vec<String> = sql
        .split("INSERT INTO ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect();
    for target in targets {
        let head = format!("CREATE TABLE {target} WITH (");
        let Some(start) = out.find(&head) else {
            continue;
        };
        let Some(length) = out[start..].find(");") else {
            continue;
        };
        out.replace_range(
            start..start + length + 2,
            &format!("CREATE TABLE {target} WITH (connector = 'blackhole');"),
        );
    }
    out
}

async fn measure(options: &BenchOptions, root: &Path) -> Result<Reports, BenchError> {
    step("starting postgres, redis and a kafka broker");
    // Walsenders send only flushed WAL: with `synchronous_commit = off` (what
    // `fsync: false` implies) a commit would wait up to `wal_writer_delay`
    // (200 ms) before any reader sees it. On, as on production servers.
    let mut settings = PostgresOptions {
        fsync: false,
        extra_settings: vec![("synchronous_commit".into(), "on".into())],
        ..PostgresOptions::default()
    };
    if options.postgres_tls {
        settings
            .extra_settings
            .extend(self_signed_certificate(&root.join("postgres-tls")).await?);
    }
    let mut postgres = EmbeddedPostgres::start(&root.join("postgres"), settings).await?;
    let postgres_url = postgres.create_database("engage").await?;
    let mut redis = EmbeddedRedis::start(&root.join("redis")).await?;
    let mut kafka = EmbeddedKafka::start(&root.join("kafka")).await?;
    let sql = match &options.sql {
        Some(path) => path.clone(),
        None => {
            let path = root.join("engagement.sql");
            let written = std::fs::write(&path, crate::demo::ENGAGEMENT_SQL);
            written.map_err(context(format!("failed to write {}", path.display())))?;
            path
        }
    };
    let job = sql
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("engagement");
    // Twins of the job, each in a directory (and slot) of its own, with
    // every sink a blackhole: the pipeline without its outputs' cost, and
    // the same over TLS to Postgres.
    let twin = |name: &str, postgres_url: String| -> Result<Box<World>, BenchError> {
        let dir = root.join(name);
        let path = dir.join(format!("{job}_{name}.sql"));
        let script = std::fs::read_to_string(&sql)
            .map_err(context(format!("failed to read {}", sql.display())))?;
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, blackhole_sql(&script)))
            .map_err(context(format!("failed to write {}", path.display())))?;
        Ok(Box::new(World {
            root: dir,
            job: format!("{job}_{name}"),
            sql: path,
            postgres_url,
            redis_url: redis.url(),
            kafka_brokers: kafka.bootstrap(),
            blackhole: None,
            tls: None,
        }))
    };
    let blackhole = match options.no_blackhole {
        true => None,
        false => Some(twin("blackhole", postgres_url.clone())?),
    };
    let tls = match options.postgres_tls {
        true => Some(twin("tls", format!("{postgres_url}?sslmode=require"))?),
        false => None,
    };
    let world = World {
        root: root.to_path_buf(),
        job: job.to_owned(),
        sql,
        postgres_url,
        redis_url: redis.url(),
        kafka_brokers: kafka.bootstrap(),
        blackhole,
        tls,
    };
    let report = match options.backfill_rows {
        Some(rows) => world
            .measure_backfill(options, rows)
            .await
            .map(|r| Reports::Backfill(Box::new(r))),
        None => world
            .measure(options)
            .await
            .map(|r| Reports::Full(Box::new(r))),
    };
    postgres.stop()?;
    redis.stop()?;
    kafka.stop();
    report
}

impl World {
    async fn measure(&self, options: &BenchOptions) -> Result<BenchReport, BenchError> {
        let db = connect(&self.postgres_url).await?;
        generate::ensure_schema(&db).await?;
        let content = generate::seed_content(&db, CONTENT_ITEMS, SEED).await?;
        let content: Vec<String> = content.into_iter().map(|item| item.id).collect();
        let client = redis::Client::open(self.redis_url.as_str());
        let client = client.map_err(context("invalid redis url"))?;
        let redis = client.get_multiplexed_async_connection().await;
        let redis = redis.map_err(context("failed to connect to redis"))?;
        step("starting the job");
        let mut job = JobProcess::spawn(self, None, "job-live.log")?;
        self.await_checkpoint(&mut job).await?;
        let mut phases = Vec::new();
        for (index, &rate) in options.rates.iter().enumerate() {
            let secs = options.phase_secs.unwrap_or(20);
            step(&format!("{rate} events/s for {secs} s"));
            let seed = SEED + 1 + index as u64;
            let phase = Phase {
                rate,
                length: Duration::from_secs(secs),
                seed,
            };
            phases.push(self.phase(&db, &redis, &content, &mut job, phase).await?);
        }
        let idle = match options.idle_markers.unwrap_or(0) {
            0 => None,
            markers => {
                step(&format!(
                    "{markers} markers on an idle stream, {} s apart",
                    IDLE_GAP.as_secs()
                ));
                Some(self.idle(&db, &redis, &content, &mut job, markers).await?)
            }
        };
        step("stopping the job (final checkpoint)");
        let live_job = job.terminate(STOP_TIMEOUT).await?;
        let live_late_events = self.late_events().await?;
        for twin in self.blackhole.iter().chain(&self.tls) {
            // Its slot must exist before the backlogs are written.
            step(&format!(
                "starting and stopping job {} (its slot)",
                twin.job
            ));
            let mut job = JobProcess::spawn(twin, None, "job-live.log")?;
            twin.await_checkpoint(&mut job).await?;
            job.terminate(STOP_TIMEOUT).await?;
        }
        let burst = self
            .burst(&db, options.burst_events.unwrap_or(1_000_000), None)
            .await?;
        let large_transactions = match options.large_transactions.unwrap_or(0) {
            0 => None,
            count => {
                let rows = options.large_transaction_events.unwrap_or(100_000);
                let burst = self.burst(&db, count * rows, Some(rows as usize)).await?;
                Some(burst)
            }
        };
        Ok(BenchReport {
            options: options.clone(),
            build: BUILD,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            content_items: content.len(),
            phases,
            job_overall: Usage {
                peak_rss_kb: live_job.peak_rss_kb.max(burst.job.peak_rss_kb),
                rss_kb: burst.job.rss_kb,
                cpu_secs: ((live_job.cpu_secs + burst.job.cpu_secs) * 100.0).round() / 100.0,
            },
            live_job,
            live_late_events,
            idle,
            burst,
            large_transactions,
            state: self.state().await?,
        })
    }

    /// Waits for the job's first checkpoint: its slot exists, and every commit
    /// from then on streams (earlier events are history to it).
    async fn await_checkpoint(&self, job: &mut JobProcess) -> Result<(), BenchError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let dir = self.root.join("checkpoints");
        let store = CheckpointStore::open(&dir.to_string_lossy(), &self.job)?;
        while store.latest().await?.is_none() {
            job.check_running()?;
            if Instant::now() > deadline {
                return Err(job.failure("took no first checkpoint in time"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn phase(
        &self,
        db: &Client,
        redis: &MultiplexedConnection,
        content: &[String],
        job: &mut JobProcess,
        phase: Phase,
    ) -> Result<PhaseReport, BenchError> {
        let watch = Watch::start(redis, &self.job, &self.kafka_brokers).await?;
        let usage_before = job.sample_usage();
        let start = Instant::now();
        let options = GenerateOptions {
            rate: Some(phase.rate),
            duration: Some(phase.length),
            content_items: CONTENT_ITEMS,
            seed: phase.seed,
            ..GenerateOptions::default()
        };
        let progress = Arc::new(GenerateProgress::default());
        let generator = generate::run(&self.postgres_url, options, progress, pending());
        let markers = mark(db, content, &watch, start + phase.length - MARKER_MARGIN);
        let (generated, markers) = tokio::join!(generator, markers);
        let (generated, markers) = (generated?, markers?);
        let seconds = start.elapsed().as_secs_f64();
        let usage = job.sample_usage();
        let processed_per_sec = job.processed_per_sec(start);
        let samples = watch.settle(job, RESOLVE_GRACE).await?;
        Ok(PhaseReport {
            rate: phase.rate,
            seconds,
            generated_per_sec: (generated.events + markers) as f64 / seconds,
            processed_per_sec,
            job_cpu_cores: (usage.cpu_secs - usage_before.cpu_secs) / seconds,
            job_rss_kb: usage.rss_kb,
            top_content: Percentiles::of(samples.iter().map(|s| s.top)),
            recent: Percentiles::of(samples.iter().map(|s| s.recent)),
            kafka: Percentiles::of(samples.iter().map(|s| s.kafka)),
        })
    }

    /// A backlog of `events` drained by pg_recvlogical, then by the job with
    /// `--end-lsn`; `transaction_events` makes each COPY (one transaction)
    /// that large instead of the generator's default.
    /// Commits `markers` markers one at a time, each after [`IDLE_GAP`] of
    /// nothing, and times each one's effects: a single event's freshness on a
    /// quiet stream (its window closes by the wall clock, not by newer events).
    async fn idle(
        &self,
        db: &Client,
        redis: &MultiplexedConnection,
        content: &[String],
        job: &mut JobProcess,
        markers: u64,
    ) -> Result<IdleReport, BenchError> {
        let watch = Watch::start(redis, &self.job, &self.kafka_brokers).await?;
        let mut rng = StdRng::seed_from_u64(SEED + 200);
        for _ in 0..markers {
            // A marker's freshness depends on where in its slide it falls.
            let offset = rng.random_range(0..HOP_SLIDE_MICROS as u64);
            tokio::time::sleep(IDLE_GAP + Duration::from_micros(offset)).await;
            job.check_running()?;
            let content_id = &content[rng.random_range(0..content.len())];
            watch.push(insert_marker(db, content_id).await?);
        }
        let samples = watch.settle(job, RESOLVE_GRACE).await?;
        Ok(IdleReport {
            top_content: Percentiles::of(samples.iter().map(|s| s.top)),
            recent: Percentiles::of(samples.iter().map(|s| s.recent)),
            kafka: Percentiles::of(samples.iter().map(|s| s.kafka)),
        })
    }

    async fn burst(
        &self,
        db: &Client,
        events: u64,
        transaction_events: Option<usize>,
    ) -> Result<BurstReport, BenchError> {
        let row = db.query_one(SLOT_SQL, &[&RECV_SLOT]).await;
        let row = row.map_err(context("failed to find the job's slot"))?;
        let (slot, publication): (String, String) = (row.get(0), row.get(1));
        let url = self.postgres_url.as_str();
        let recvlogical = pg_recvlogical_path();
        // Without TLS, as engage's own drain (libpq would take TLS when the
        // server offers it, under `--postgres-tls`).
        let separator = if url.contains('?') { '&' } else { '?' };
        let recv_url = format!("{url}{separator}sslmode=disable");
        let slot_args = ["-d", recv_url.as_str(), "--slot", RECV_SLOT];
        let exists = db.query_opt(RECV_SLOT_SQL, &[&RECV_SLOT]).await;
        if exists
            .map_err(context("failed to look for the bench's slot"))?
            .is_none()
        {
            step("burst: creating a slot for pg_recvlogical");
            let mut create = Command::new(&recvlogical);
            create
                .args(slot_args)
                .args(["--create-slot", "-P", "pgoutput"]);
            run_tool(&mut create).await?;
        }

        let shape =
            transaction_events.map_or(String::new(), |n| format!(" in transactions of {n}"));
        step(&format!("burst: generating {events} events{shape}"));
        let defaults = GenerateOptions::default();
        let options = GenerateOptions {
            count: Some(events),
            content_items: CONTENT_ITEMS,
            seed: SEED + 100 + u64::from(transaction_events.is_some()),
            batch_size: transaction_events.unwrap_or(defaults.batch_size),
            ..defaults
        };
        let progress = Arc::new(GenerateProgress::default());
        let start = Instant::now();
        let events = generate::run(url, options, progress, pending())
            .await?
            .events;
        let generate_secs = start.elapsed().as_secs_f64();
        let row = db.query_one(END_SQL, &[&slot]).await;
        let row = row.map_err(context("failed to read the wal position"))?;
        let (end_lsn, wal_bytes): (String, i64) = (row.get(0), row.get(1));
        let past_end = db.execute(PAST_END_SQL, &[]).await;
        past_end.map_err(context("failed to commit past the end lsn"))?;

        step(&format!("burst: pg_recvlogical drains to {end_lsn}"));
        let mut drain = Command::new(&recvlogical);
        drain
            .args(slot_args)
            .args(["--start", "--no-loop", "-f", "/dev/null"]);
        drain.args(["-o", "proto_version=1", "-o"]);
        drain.arg(format!("publication_names={publication}"));
        drain.arg(format!("--endpos={end_lsn}"));
        let start = Instant::now();
        run_tool(&mut drain).await?;
        let recv_secs = start.elapsed().as_secs_f64();

        step(&format!("burst: engage run --end-lsn {end_lsn}"));
        let start = Instant::now();
        let mut job = JobProcess::spawn(self, Some(&end_lsn), "job-burst.log")?;
        let usage = job.wait_exit(DRAIN_TIMEOUT).await?;
        let engage_secs = start.elapsed().as_secs_f64();
        let blackhole = match &self.blackhole {
            Some(twin) => Some(
                twin.drain(&end_lsn, events, recv_secs, "every sink a blackhole")
                    .await?,
            ),
            None => None,
        };
        let tls = match &self.tls {
            Some(twin) => Some(
                twin.drain(&end_lsn, events, recv_secs, "over TLS (sslmode=require)")
                    .await?,
            ),
            None => None,
        };
        Ok(BurstReport {
            events,
            generate_secs,
            wal_bytes,
            end_lsn,
            pg_recvlogical_secs: recv_secs,
            pg_recvlogical_per_sec: events as f64 / recv_secs,
            engage_secs,
            engage_per_sec: events as f64 / engage_secs,
            ratio: recv_secs / engage_secs,
            job: usage,
            blackhole,
            tls,
        })
    }

    /// This twin's drain of the backlog up to `end_lsn` (`events` events,
    /// which pg_recvlogical drained in `recv_secs`).
    async fn drain(
        &self,
        end_lsn: &str,
        events: u64,
        recv_secs: f64,
        what: &str,
    ) -> Result<TwinDrain, BenchError> {
        step(&format!("burst: engage run --end-lsn {end_lsn}, {what}"));
        let start = Instant::now();
        let mut job = JobProcess::spawn(self, Some(end_lsn), "job-burst.log")?;
        let usage = job.wait_exit(DRAIN_TIMEOUT).await?;
        let secs = start.elapsed().as_secs_f64();
        Ok(TwinDrain {
            engage_secs: secs,
            engage_per_sec: events as f64 / secs,
            ratio: recv_secs / secs,
            job: usage,
        })
    }

    /// Rows of the job's `late_events` output (`None`: the SQL has none).
    /// The generator stamps every event with its batch's time, so each one
    /// is an event the wall clock declared late (engine/clock.rs).
    async fn late_events(&self) -> Result<Option<u64>, BenchError> {
        let script = std::fs::read_to_string(&self.sql)
            .map_err(context(format!("failed to read {}", self.sql.display())))?;
        let spec = crate::query::parse_outputs_under(&self.job, &script, &self.root.join("data"))
            .map_err(context("failed to parse the job SQL"))?;
        let Some(table) = spec.tables.iter().find(|t| t.name == "late_events") else {
            return Ok(None);
        };
        let Some(options) = table.connector.filesystem() else {
            return Ok(None);
        };
        if !crate::sink::parquet::has_committed_files(Path::new(&options.path)) {
            return Ok(Some(0));
        }
        let (ctx, _) = crate::query::session_for(&spec).await;
        let count = async {
            let batches = ctx
                .sql("SELECT count(*) FROM late_events")
                .await?
                .collect()
                .await?;
            let column = batches[0].column(0).as_any();
            let count = column.downcast_ref::<arrow::array::Int64Array>();
            Ok::<_, datafusion::error::DataFusionError>(count.map_or(0, |c| c.value(0) as u64))
        };
        let count = count.await;
        count
            .map(Some)
            .map_err(context("failed to count the late events"))
    }

    /// Sizes from the job's newest checkpoint.
    async fn state(&self) -> Result<StateReport, BenchError> {
        let dir = self.root.join("checkpoints");
        let store = CheckpointStore::open(&dir.to_string_lossy(), &self.job)?;
        let Some(manifest) = store.latest().await? else {
            return Err(BenchError::Failed("the job left no checkpoint".into()));
        };
        let mut report = StateReport {
            epoch: manifest.epoch,
            checkpoint_bytes: manifest.state_bytes(),
            ..StateReport::default()
        };
        let mut counted = std::collections::BTreeSet::new();
        for (name, window) in &manifest.windows {
            // Its layers: the files of earlier checkpoints it builds on, then its own.
            let own = checkpoint::EpochFile {
                epoch: manifest.epoch,
                file: window.state.clone(),
            };
            let layers: Vec<&checkpoint::EpochFile> =
                window.base.iter().chain(std::iter::once(&own)).collect();
            // Windows shared by several sinks name the same files: count them once.
            if counted.insert(window.state.file.as_str()) {
                report.window_written_bytes += window.state.bytes;
                for layer in &layers {
                    report.window_rows += layer.file.rows;
                    report.window_bytes += layer.file.bytes;
                }
            }
            if name.split('/').next() == Some(TOP_CONTENT_SINK) {
                let mut keys = HashSet::new();
                for layer in &layers {
                    let bytes = store.read_file(layer.epoch, &layer.file.file).await?;
                    distinct_keys(bytes, &mut keys)?;
                }
                report.top_content_distinct_content += keys.len();
            }
        }
        for file in manifest.dimensions.values() {
            report.dimension_rows += file.rows;
            report.dimension_bytes += file.bytes;
        }
        for file in manifest.capture_files.values() {
            report.capture_rows += file.rows;
            report.capture_bytes += file.bytes;
        }
        Ok(report)
    }
}

/// One steady-rate phase to run.
struct Phase {
    rate: u64,
    length: Duration,
    seed: u64,
}

/// Distinct values of the `key` column (group keys) of a window state file.
/// Adds the group keys of a window state file to `keys`.
fn distinct_keys(state: bytes::Bytes, keys: &mut HashSet<Vec<u8>>) -> Result<(), BenchError> {
    let batches = checkpoint::decode_ipc(state);
    let batches = batches.map_err(context("a window state file is unreadable"))?;
    for batch in &batches {
        let column = batch.column_by_name("key").map(|c| c.as_any());
        if let Some(column) = column.and_then(|c| c.downcast_ref::<BinaryArray>()) {
            keys.extend(column.iter().flatten().map(<[u8]>::to_vec));
        }
    }
    Ok(())
}

async fn connect(url: &str) -> Result<Client, BenchError> {
    let connected = tokio_postgres::connect(url, NoTls).await;
    let (client, connection) = connected.map_err(context("failed to connect to postgres"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(error = %error, "bench connection to postgres closed");
        }
    });
    Ok(client)
}

/// The newest installed `pg_recvlogical` (Debian keeps it out of `PATH`).
fn pg_recvlogical_path() -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten();
    let mut found: Vec<(u32, PathBuf)> = versions
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let path = entry.path().join("bin/pg_recvlogical");
            path.is_file().then_some((version, path))
        })
        .collect();
    found.sort();
    let newest = found.pop().map(|(_, path)| path);
    newest.unwrap_or_else(|| PathBuf::from("pg_recvlogical"))
}

/// Runs a tool to completion; a failure carries its stderr.
async fn run_tool(command: &mut Command) -> Result<(), BenchError> {
    let name = format!("{:?}", command.as_std().get_program());
    let output = command.stdin(Stdio::null()).output().await;
    let output = output.map_err(context(format!("failed to run {name}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = format!("{name} failed ({}): {}", output.status, stderr.trim());
        return Err(BenchError::Failed(message));
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blackhole_sql_turns_every_insert_target_into_a_blackhole() {
        let sql = blackhole_sql(crate::demo::ENGAGEMENT_SQL);
        let env = |name: &str| match name {
            "ENGAGE_POSTGRES_URL" => Some("postgres://engage@127.0.0.1:5432/app".to_string()),
            _ => None,
        };
        let spec = crate::sql::parse_job("engagement", &sql, &env).unwrap();
        for table in &spec.tables {
            let blackhole = matches!(
                table.connector.as_sink(),
                Some(crate::sql::SinkConnector::Blackhole)
            );
            let side_output = ["late_events", "dead_letter"].contains(&table.name.as_str());
            let source = table.connector.as_source().is_some();
            assert_eq!(blackhole, !side_output && !source, "{}", table.name);
        }
    }
}
