//! The `engage` command line: parses arguments and calls the library.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use engage::backfill::command::parse_span;
use engage::change::format_lsn;
use engage::checkpoint::{CheckpointStore, Kept, Manifest};
use engage::embedded::{EmbeddedKafka, EmbeddedPostgres, EmbeddedRedis, PostgresOptions};
use engage::engine::stats::JobStats;
use engage::engine::{self, RunOptions};
use engage::generate::{self, GenerateOptions, GenerateProgress};
use engage::query::{self, OutputFormat};
use engage::{bench, demo, sql};

/// engage: a streaming job from Postgres changes to Redis and Parquet, defined in SQL.
///
/// Jobs are written in Arroyo's SQL dialect (CREATE TABLE ... WITH (connector = ...),
/// CREATE VIEW, INSERT INTO ... SELECT). `${NAME}` in options comes from the environment.
#[derive(Parser)]
#[command(name = "engage", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mission pipeline (sql/engagement.sql) with throwaway Postgres, Redis and a
    /// Kafka-protocol broker (or ENGAGE_POSTGRES_URL / ENGAGE_REDIS_URL /
    /// ENGAGE_KAFKA_BROKERS) and a load generator, until Ctrl-C.
    Demo {
        /// Events per second to generate.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
        /// Content items to seed.
        #[arg(long, default_value_t = 1000)]
        content_items: usize,
        #[arg(long, default_value = "checkpoints")]
        checkpoint_dir: String,
        /// Where outputs go (ENGAGE_DATA_DIR wins when set).
        #[arg(long, default_value = "data")]
        data_dir: String,
        /// Seed this much history (10,000 events per hour, event times spread over it)
        /// before a new job starts, and backfill it, so the KPIs and dashboards are full
        /// from the start: e.g. 1d, 6h.
        #[arg(long, value_parser = parse_span)]
        history: Option<Duration>,
        #[command(flatten)]
        http: HttpArgs,
        #[command(flatten)]
        udfs: UdfArgs,
    },
    /// Run a job until SIGINT/SIGTERM, which takes a final checkpoint. A restarted
    /// job resumes from its newest checkpoint.
    Run {
        #[command(flatten)]
        job: JobArgs,
        #[command(flatten)]
        running: RunArgs,
    },
    /// Reprocess the changes captured after a checkpoint through the job's current SQL,
    /// then keep running. Sinks skip what they already hold, so nothing counts twice.
    Replay {
        #[command(flatten)]
        job: JobArgs,
        /// The checkpoint to replay from (see `engage checkpoints`).
        #[arg(long)]
        from_checkpoint: u64,
        #[command(flatten)]
        running: RunArgs,
    },
    /// Read rows already in the driving table, by event-time range, through the job's
    /// SQL as changes with `_op = 'r'`, while the live stream keeps flowing; returns once
    /// a checkpoint records every row of the range in every sink. Hands the backfill to
    /// the job if it is running, else runs the job until then. Run again after an
    /// interruption, it resumes. Rows the live stream already delivered are not sent
    /// again; historical windows go to Parquet once, complete, at the end.
    /// Examples: `engage backfill sql/engagement.sql --since 2026-11-01 --until
    /// 2026-11-15T12:00:00Z`, `--since now-24h`, `--status`, `--cancel`.
    Backfill {
        #[command(flatten)]
        job: JobArgs,
        /// Start of the event-time range, inclusive: 2026-11-01 (midnight UTC),
        /// 2026-11-15T12:00:00Z, now-24h.
        #[arg(long, required_unless_present_any = ["status", "cancel"])]
        since: Option<String>,
        /// End of the range, exclusive (default: no end).
        #[arg(long)]
        until: Option<String>,
        /// The driving table to read (default: the job's only one).
        #[arg(long)]
        table: Option<String>,
        /// Only rows matching this SQL condition on the table's columns, e.g. "device = 'ios'".
        #[arg(long = "where", value_name = "CONDITION")]
        filter: Option<String>,
        /// Rows per second at most (default: as fast as chunks of ~250 ms allow).
        #[arg(long)]
        max_rate: Option<u64>,
        /// Run a range that overlaps a completed backfill again (its rows are then
        /// in the sinks twice).
        #[arg(long)]
        force: bool,
        /// Show the backfill under way and those that ended, then exit.
        #[arg(long, conflicts_with = "cancel")]
        status: bool,
        /// End the backfill under way (rows it emitted stay), then exit.
        #[arg(long)]
        cancel: bool,
        /// `bar` (default on a terminal) or `plain` lines for logs and CI.
        #[arg(long, value_enum)]
        progress: Option<engage::backfill::command::ProgressStyle>,
        /// Seconds between checkpoints, when the job runs here.
        #[arg(long, default_value_t = 10.0)]
        checkpoint_interval: f64,
        #[command(flatten)]
        http: HttpArgs,
        #[command(flatten)]
        udfs: UdfArgs,
    },
    /// List a job's checkpoints: id, time, what it keeps, source position, sizes.
    /// Runs of checkpoints thinned to their capture are summed up in one line each.
    Checkpoints {
        #[command(flatten)]
        job: JobArgs,
        /// One line per checkpoint, capture-only ones too.
        #[arg(long)]
        all: bool,
    },
    /// Print a Kafka topic's committed messages (values, one per line), e.g.
    /// `engage tail engage.enriched_events --from-beginning --count 10`.
    Tail(engage::tail::TailOptions),
    /// Run DataFusion SQL over a job's filesystem sinks (each registered under its table name).
    Query {
        /// The SQL query, e.g. "SELECT count(*) FROM enriched_events".
        query: String,
        /// The job whose outputs to query.
        #[arg(long, default_value = "sql/engagement.sql")]
        sql: PathBuf,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Start throwaway PostgreSQL (wal_level=logical), Redis and Kafka-protocol (Tansu)
    /// servers on free ports, print their addresses as shell exports, and keep them
    /// until Ctrl-C / SIGTERM.
    Services {
        /// Directory for their data and logs (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Measure the mission pipeline on throwaway Postgres and Redis: freshness at
    /// steady rates, drain throughput beside pg_recvlogical, memory, CPU and state.
    /// Prints one line per figure and writes them all as JSON.
    Bench(bench::BenchOptions),
    /// The fault suite: a seeded workload through sql/engagement.sql on private
    /// Postgres and Redis, with kill -9 storms, crashes at every checkpoint
    /// boundary, Postgres immediate restarts, a Redis outage and data loss, and
    /// bad input; every sink is then compared with an oracle. Prints one line
    /// per scenario, writes a JSON report, and exits non-zero if any failed.
    Chaos(engage::chaos::ChaosOptions),
    /// BigQuery load jobs for filesystem sinks with `bigquery.table` (a running job
    /// submits one per checkpoint itself): `engage bigquery schema SQL --table T`
    /// prints the table's schema for `bq mk --table`; `engage bigquery load SQL`
    /// loads committed files no job has loaded, under the job's own job ids.
    Bigquery {
        #[command(subcommand)]
        action: BigqueryCommand,
    },
    /// User-defined functions written with arroyo-udf-plugin's #[udf] (see udfs/):
    /// `engage udf build [CRATE...]`, `engage udf list` (also `engage udfs`).
    #[command(alias = "udfs")]
    Udf {
        #[command(subcommand)]
        action: Option<UdfCommand>,
    },
    /// Insert realistic engagement events into Postgres (seeds `content` first).
    Generate {
        /// Postgres to write to.
        #[arg(long, env = "ENGAGE_POSTGRES_URL", hide_env_values = true)]
        postgres: String,
        /// Events per second (default: as fast as possible).
        #[arg(long)]
        rate: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        #[arg(long, default_value_t = 1000)]
        content_items: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Args)]
struct JobArgs {
    /// The job SQL file.
    sql: PathBuf,
    /// The job's name (slot, publication and checkpoint folder); defaults to the file's stem.
    #[arg(long)]
    name: Option<String>,
    /// Directory or object store URL of checkpoints.
    #[arg(long, default_value = "checkpoints")]
    checkpoint_dir: String,
}

#[derive(Args, Clone)]
struct UdfArgs {
    /// A UDF to load: a UDF crate directory (built first if needed) or a built library
    /// (with the manifest `engage udf build` writes beside it). Repeatable;
    /// ENGAGE_UDF_PATH adds more (`:`-separated).
    #[arg(long = "udf", value_name = "PATH")]
    udf: Vec<PathBuf>,
    /// Directory of UDF crates: built ones are loaded, and one the SQL calls is built
    /// first if it is not yet [default: ./udfs when it exists].
    #[arg(long, value_name = "DIR")]
    udfs_dir: Option<PathBuf>,
}

impl UdfArgs {
    fn options(&self) -> engage::udf::UdfOptions {
        engage::udf::UdfOptions::with_env(self.udf.clone(), self.udfs_dir.clone())
    }
}

#[derive(Subcommand)]
enum BigqueryCommand {
    /// Print the BigQuery schema (JSON) of a filesystem sink's files, e.g.
    /// `engage bigquery schema sql/engagement.sql --table enriched_events > schema.json`
    /// then `bq mk --table project:dataset.enriched_events schema.json`.
    Schema {
        #[command(flatten)]
        job: JobArgs,
        /// The filesystem sink.
        #[arg(long)]
        table: String,
        #[command(flatten)]
        udfs: UdfArgs,
    },
    /// Submit a load job for every checkpoint's files that no job has loaded (for a
    /// sink that gained `bigquery.table` later, or loads that failed); ids are
    /// `engage_<job>_<sink>_<epoch>`, so nothing loads twice.
    Load {
        #[command(flatten)]
        job: JobArgs,
        /// Only this filesystem sink [default: every one with `bigquery.table`].
        #[arg(long)]
        table: Option<String>,
        /// Only partitions from this day on (YYYY-MM-DD), for sinks partitioned by day.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand)]
enum UdfCommand {
    /// Build UDF crates (release) and write each library's manifest; prints where each
    /// library is. Default: every crate under ./udfs.
    Build {
        /// UDF crate directories.
        paths: Vec<PathBuf>,
    },
    /// List the UDFs a job would load, with their signatures and whether they are built.
    List {
        #[command(flatten)]
        udfs: UdfArgs,
    },
    /// Rows/s of the shipped `device_family` through the plugin ABI beside the same
    /// logic as a SQL CASE, over the same rows (best of --runs).
    Bench {
        #[arg(long, default_value_t = 2_000_000)]
        rows: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[command(flatten)]
        udfs: UdfArgs,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Seconds between checkpoints.
    #[arg(long, default_value_t = 10.0)]
    checkpoint_interval: f64,
    /// Take a checkpoint early once this many changes arrived since the last one
    /// (0: never). An epoch's capture log and Parquet rows stay in memory until its
    /// checkpoint; under a backlog this bounds them.
    #[arg(long, env = "ENGAGE_CHECKPOINT_MAX_CHANGES", default_value_t = engage::engine::DEFAULT_CHECKPOINT_MAX_CHANGES)]
    checkpoint_max_changes: u64,
    /// Checkpoints to keep whole (state, windows and capture). Older ones are
    /// thinned to the changes they captured, kept for --capture-retention.
    #[arg(long, default_value_t = engage::checkpoint::DEFAULT_KEEP)]
    keep_checkpoints: usize,
    /// How long to keep captured changes, beyond the checkpoints kept whole: a Redis that
    /// lost its data, or a sink added later (`engage replay`), is refilled from them.
    /// E.g. 24h, 90m, 7d; 0 keeps them only with whole checkpoints. Default: the job's
    /// longest window, at least 1h. Costs disk: about the changes' compressed size.
    #[arg(long, value_parser = parse_span)]
    capture_retention: Option<Duration>,
    /// Print a status line every second.
    #[arg(long)]
    progress: bool,
    /// Stop, with a final checkpoint, once the stream reaches this LSN (Postgres' text
    /// form, e.g. 0/16B3748), like pg_recvlogical --endpos.
    #[arg(long, value_parser = parse_lsn_arg)]
    end_lsn: Option<u64>,
    /// Warn when the replication slot retains more WAL than this many MiB.
    #[arg(long, default_value_t = 1024)]
    warn_retained_wal_mib: u64,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    udfs: UdfArgs,
}

#[derive(Args)]
struct HttpArgs {
    /// Serve /health, /ready, /metrics (Prometheus), the JSON API (/api/...) and the
    /// dashboard (/) here: IP:PORT, 127.0.0.1:0 for a free port, or `off`.
    /// Default 127.0.0.1:9464, or a free port (logged) if another job holds it.
    #[arg(long, env = "ENGAGE_HTTP_ADDR")]
    http: Option<String>,
    /// Bearer token the HTTP server asks for on everything but /health; required
    /// when --http is not a loopback address.
    #[arg(long, env = "ENGAGE_HTTP_TOKEN", hide_env_values = true)]
    http_token: Option<String>,
}

impl HttpArgs {
    fn options(&self) -> anyhow::Result<engage::http::HttpOptions> {
        Ok(engage::http::HttpOptions::parse(
            self.http.as_deref(),
            self.http_token.clone(),
        )?)
    }
}

/// The lines of `engage checkpoints`: a header, then every checkpoint kept
/// whole or as a base, and each run of capture-only ones summed up in one
/// line (or listed one by one with `all`).
fn checkpoint_lines(manifests: &[Manifest], all: bool) -> Vec<String> {
    let row = |id: &str, time: &str, kept: &str, lsn: &str, rows: u64, bytes: u64, rest: &str| {
        format!("{id:>8}  {time:<24}  {kept:<7}  {lsn:>14}  {rows:>10}  {bytes:>12}  {rest}")
    };
    let mut lines = vec![format!(
        "{:>8}  {:<24}  {:<7}  {:>14}  {:>10}  {:>12}  sinks",
        "id", "time", "kept", "resume lsn", "captured", "state bytes"
    )];
    let mut index = 0;
    while index < manifests.len() {
        let m = &manifests[index];
        let run = manifests[index..]
            .iter()
            .take_while(|m| m.kept == Kept::Capture)
            .count();
        if run > 1 && !all {
            let (first, last) = (m, &manifests[index + run - 1]);
            let rows = manifests[index..index + run]
                .iter()
                .map(Manifest::captured_rows)
                .sum();
            let bytes = manifests[index..index + run]
                .iter()
                .map(Manifest::state_bytes)
                .sum();
            let time = first.created_at.clone();
            let rest = format!(
                "{run} checkpoints thinned to their capture, to {} at {} (--all lists them)",
                last.epoch, last.created_at
            );
            lines.push(row(
                &first.epoch.to_string(),
                &time,
                Kept::Capture.label(),
                &format_lsn(last.source.resume_lsn),
                rows,
                bytes,
                &rest,
            ));
            index += run;
            continue;
        }
        let sinks: Vec<String> = m
            .sinks
            .iter()
            .map(|(n, s)| match &s.bigquery {
                Some(bq) if !bq.pending.is_empty() => format!(
                    "{n}@{} (bigquery: epochs {:?} not loaded)",
                    s.position, bq.pending
                ),
                _ => format!("{n}@{}", s.position),
            })
            .collect();
        lines.push(row(
            &m.epoch.to_string(),
            &m.created_at,
            m.kept.label(),
            &format_lsn(m.source.resume_lsn),
            m.captured_rows(),
            m.state_bytes(),
            &sinks.join(" "),
        ));
        index += 1;
    }
    lines
}

/// A span like `90s`, `30m`, `24h` or `7d` (`0` alone is allowed).
fn parse_lsn_arg(text: &str) -> Result<u64, String> {
    engage::change::parse_lsn(text).ok_or_else(|| format!("`{text}` is not an LSN like 0/16B3748"))
}

impl JobArgs {
    fn load(&self) -> anyhow::Result<(String, String)> {
        let script = std::fs::read_to_string(&self.sql)
            .with_context(|| format!("failed to read job SQL {}", self.sql.display()))?;
        let name = match &self.name {
            Some(name) => name.clone(),
            None => job_name(&self.sql)?,
        };
        Ok((name, script))
    }
}

fn udf_command(action: Option<UdfCommand>) -> anyhow::Result<()> {
    match action.unwrap_or(UdfCommand::List {
        udfs: UdfArgs {
            udf: Vec::new(),
            udfs_dir: None,
        },
    }) {
        UdfCommand::Build { paths } => {
            let paths = if paths.is_empty() {
                let dir = Path::new("udfs");
                if !dir.is_dir() {
                    bail!("no ./udfs directory here: pass the UDF crate directories to build");
                }
                engage::udf::discover::crate_dirs(dir).map_err(anyhow::Error::msg)?
            } else {
                paths
            };
            for path in paths {
                eprintln!("building UDF crate {} ...", path.display());
                let built = engage::udf::discover::build(&path).map_err(anyhow::Error::msg)?;
                println!(
                    "{}\t{}\t{}",
                    built.signature.name,
                    built.library.display(),
                    built.signature.display()
                );
            }
            Ok(())
        }
        UdfCommand::Bench { .. } => unreachable!("run in the async dispatch"),
        UdfCommand::List { udfs } => {
            let listed =
                engage::udf::discover::list(&udfs.options()).map_err(anyhow::Error::msg)?;
            if listed.is_empty() {
                println!("no UDFs: none under ./udfs, --udf or ENGAGE_UDF_PATH");
            }
            for l in listed {
                println!(
                    "{}\n    from: {}\n    {}",
                    l.signature.display(),
                    l.origin,
                    l.status
                );
            }
            Ok(())
        }
    }
}

fn job_name(path: &Path) -> anyhow::Result<String> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if stem.is_empty() {
        bail!("cannot name the job after {}; pass --name", path.display());
    }
    Ok(stem.to_string())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,datafusion=warn,tokio_postgres=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    listen_for_shutdown();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo {
            rate,
            duration,
            content_items,
            checkpoint_dir,
            data_dir,
            history,
            http,
            udfs,
        } => {
            let options = demo::DemoOptions {
                rate,
                duration: duration.map(Duration::from_secs),
                content_items,
                checkpoint_dir,
                data_dir,
                http: http.options()?,
                udfs: udfs.options(),
                history,
            };
            demo::run(options, shutdown_signal()).await
        }
        Command::Run { job, running } => run_job(job, running, None).await,
        Command::Udf {
            action: Some(UdfCommand::Bench { rows, runs, udfs }),
        } => {
            let (plugin, case) = engage::udf::bench::device_family(rows, runs, &udfs.options())
                .await
                .map_err(anyhow::Error::msg)?;
            println!("device_family via the plugin: {plugin:.0} rows/s");
            println!("the same logic as SQL CASE:   {case:.0} rows/s");
            println!("ratio plugin / CASE: {:.2}", plugin / case);
            Ok(())
        }
        Command::Udf { action } => udf_command(action),
        Command::Bigquery { action } => bigquery_command(action).await,
        Command::Replay {
            job,
            from_checkpoint,
            running,
        } => run_job(job, running, Some(from_checkpoint)).await,
        Command::Backfill {
            job,
            since,
            until,
            table,
            filter,
            max_rate,
            force,
            status,
            cancel,
            progress,
            checkpoint_interval,
            http,
            udfs,
        } => {
            let options = engage::backfill::command::Options {
                since: since.unwrap_or_default(),
                until,
                table,
                filter,
                max_rate,
                force,
            };
            let what = BackfillWhat { status, cancel };
            backfill_command(
                job,
                options,
                what,
                progress,
                checkpoint_interval,
                http,
                udfs,
            )
            .await
        }
        Command::Checkpoints { job, all } => {
            let (name, _) = job.load()?;
            let store = CheckpointStore::open(&job.checkpoint_dir, &name)?;
            let manifests = store.list().await?;
            if manifests.is_empty() {
                println!("job `{name}` has no checkpoints in {}", store.display());
                return Ok(());
            }
            for line in checkpoint_lines(&manifests, all) {
                println!("{line}");
            }
            Ok(())
        }
        Command::Tail(options) => {
            let read = tokio::task::spawn_blocking(move || engage::tail::run(&options))
                .await?
                .map_err(|message| anyhow::anyhow!(message))?;
            eprintln!("{read} messages");
            Ok(())
        }
        Command::Query { query, sql, format } => {
            let script = std::fs::read_to_string(&sql).with_context(|| {
                format!("failed to read job SQL {} (pass --sql)", sql.display())
            })?;
            let spec = query::parse_for_outputs(&job_name(&sql)?, &script)?;
            let output = query::run(&spec, &query, format).await?;
            if output.ends_with('\n') {
                print!("{output}");
            } else {
                println!("{output}");
            }
            Ok(())
        }
        Command::Services { dir } => {
            let temporary = tempfile::Builder::new()
                .prefix("engage-services-")
                .tempdir()?;
            let root = dir.unwrap_or_else(|| temporary.path().to_path_buf());
            let mut postgres =
                EmbeddedPostgres::start(&root.join("postgres"), PostgresOptions::default()).await?;
            let url = postgres.create_database("engage").await?;
            let mut redis = EmbeddedRedis::start(&root.join("redis")).await?;
            let mut kafka = EmbeddedKafka::start(&root.join("kafka")).await?;
            println!("export ENGAGE_POSTGRES_URL={url}");
            println!("export ENGAGE_REDIS_URL={}", redis.url());
            println!("export ENGAGE_KAFKA_BROKERS={}", kafka.bootstrap());
            eprintln!(
                "postgres log: {}; Ctrl-C stops all three",
                postgres.log_path().display()
            );
            shutdown_signal().await;
            postgres.stop()?;
            redis.stop()?;
            kafka.stop();
            Ok(())
        }
        Command::Chaos(options) => {
            tokio::select! {
                outcome = engage::chaos::run(options) => { outcome?; }
                () = shutdown_signal() => bail!("interrupted"),
            }
            Ok(())
        }
        Command::Bench(options) => {
            bench::run(options, shutdown_signal()).await?;
            Ok(())
        }
        Command::Generate {
            postgres,
            rate,
            duration,
            count,
            content_items,
            seed,
        } => {
            let options = GenerateOptions {
                rate,
                duration: duration.map(Duration::from_secs),
                count,
                content_items,
                seed,
                ..GenerateOptions::default()
            };
            let progress = Arc::new(GenerateProgress::default());
            let bar = progress_bar(count);
            let watcher = {
                let progress = progress.clone();
                let bar = bar.clone();
                tokio::spawn(async move {
                    loop {
                        bar.set_position(
                            progress.events.load(std::sync::atomic::Ordering::Relaxed),
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            };
            let report = generate::run(&postgres, options, progress, shutdown_signal()).await?;
            watcher.abort();
            bar.finish_and_clear();
            println!(
                "generated {} events in {:.1} s ({:.0} events/s)",
                report.events, report.elapsed_secs, report.events_per_sec
            );
            Ok(())
        }
    }
}

async fn bigquery_command(action: BigqueryCommand) -> anyhow::Result<()> {
    let parse = |job: &JobArgs| -> anyhow::Result<(String, sql::JobSpec)> {
        let (name, script) = job.load()?;
        let spec = sql::parse_job(&name, &script, &|k| std::env::var(k).ok())
            .with_context(|| format!("in {}", job.sql.display()))?;
        Ok((script, spec))
    };
    match action {
        BigqueryCommand::Schema { job, table, udfs } => {
            let (script, mut spec) = parse(&job)?;
            spec.udfs = engage::udf::prepare_async(script, udfs.options())
                .await
                .map_err(anyhow::Error::msg)?;
            let schema = engage::bigquery::command::schema(&spec, &table)
                .await
                .map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(())
        }
        BigqueryCommand::Load { job, table, since } => {
            let (_, spec) = parse(&job)?;
            engage::bigquery::command::load_with_progress(&spec, table.as_deref(), since.as_deref())
                .await
                .map_err(anyhow::Error::msg)
        }
    }
}

async fn run_job(job: JobArgs, running: RunArgs, replay_from: Option<u64>) -> anyhow::Result<()> {
    let (name, script) = job.load()?;
    let mut spec = sql::parse_job(&name, &script, &|k| std::env::var(k).ok())
        .with_context(|| format!("in {}", job.sql.display()))?;
    spec.udfs = engage::udf::prepare_async(script.clone(), running.udfs.options())
        .await
        .map_err(anyhow::Error::msg)?;
    if running.checkpoint_interval.is_nan() || running.checkpoint_interval <= 0.0 {
        bail!("--checkpoint-interval must be positive");
    }
    let options = RunOptions {
        checkpoint_dir: job.checkpoint_dir.clone(),
        checkpoint_interval: Duration::from_secs_f64(running.checkpoint_interval),
        checkpoint_max_changes: running.checkpoint_max_changes,
        keep_checkpoints: running.keep_checkpoints.max(1),
        capture_retention: running.capture_retention,
        replay_from,
        end_lsn: running.end_lsn,
        warn_retained_wal_bytes: running.warn_retained_wal_mib << 20,
        ..RunOptions::default()
    };
    let http = running.http.options()?;
    let stats = Arc::new(JobStats::for_job(&spec));
    let _server = engage::http::serve(&http, &spec, stats.clone(), None).await?;
    let reporter =
        running.progress.then(|| {
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut last = 0;
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let now = stats.changes_in.load(std::sync::atomic::Ordering::Relaxed);
                    eprintln!(
                    "{} changes/s | {} total | behind {} KiB | slot retains {} KiB | checkpoint {}",
                    now - last,
                    now,
                    stats.processing_lag_bytes() / 1024,
                    stats.replication_lag_bytes() / 1024,
                    stats.checkpoint_epoch.load(std::sync::atomic::Ordering::Relaxed),
                );
                    last = now;
                }
            })
        });
    let summary = engine::run(&spec, &script, options, stats.clone(), shutdown_signal()).await?;
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    eprintln!(
        "stopped after {} changes{}; last checkpoint {}; {} restarts; {} re-sent changes suppressed",
        summary.changes,
        if summary.replayed_changes > 0 {
            format!(" (and {} replayed)", summary.replayed_changes)
        } else {
            String::new()
        },
        summary.last_checkpoint.unwrap_or(0),
        summary.restarts,
        stats
            .resent_suppressed
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

/// `--status` or `--cancel` of `engage backfill`.
struct BackfillWhat {
    status: bool,
    cancel: bool,
}

async fn backfill_command(
    job: JobArgs,
    options: engage::backfill::command::Options,
    what: BackfillWhat,
    progress: Option<engage::backfill::command::ProgressStyle>,
    checkpoint_interval: f64,
    http: HttpArgs,
    udfs: UdfArgs,
) -> anyhow::Result<()> {
    use engage::backfill::command::{self as backfill, ProgressStyle};
    use std::io::IsTerminal;
    let (name, script) = job.load()?;
    let store = CheckpointStore::open(&job.checkpoint_dir, &name)?;
    if what.status {
        println!(
            "{}",
            backfill::status(&store).await.map_err(anyhow::Error::msg)?
        );
        return Ok(());
    }
    if what.cancel {
        println!(
            "{}",
            backfill::cancel(&store).await.map_err(anyhow::Error::msg)?
        );
        return Ok(());
    }
    if checkpoint_interval.is_nan() || checkpoint_interval <= 0.0 {
        bail!("--checkpoint-interval must be positive");
    }
    let mut spec = sql::parse_job(&name, &script, &|k| std::env::var(k).ok())
        .with_context(|| format!("in {}", job.sql.display()))?;
    spec.udfs = engage::udf::prepare_async(script.clone(), udfs.options())
        .await
        .map_err(anyhow::Error::msg)?;
    let request = backfill::request(&spec, &options)
        .await
        .map_err(anyhow::Error::msg)?;
    let style = progress.unwrap_or(if std::io::stderr().is_terminal() {
        ProgressStyle::Bar
    } else {
        ProgressStyle::Plain
    });
    let run = RunOptions {
        checkpoint_dir: job.checkpoint_dir.clone(),
        checkpoint_interval: Duration::from_secs_f64(checkpoint_interval),
        ..RunOptions::default()
    };
    let stats = Arc::new(JobStats::for_job(&spec));
    let _server = engage::http::serve(&http.options()?, &spec, stats.clone(), None).await?;
    let finished = backfill::run(
        &spec,
        &script,
        run,
        &backfill::Submission {
            request,
            force: options.force,
            style,
        },
        stats,
        shutdown_signal(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    println!("{}", backfill::summary(&finished));
    if finished.outcome == engage::backfill::Outcome::Cancelled {
        bail!("backfill {} was cancelled", finished.request.id);
    }
    Ok(())
}

fn progress_bar(count: Option<u64>) -> indicatif::ProgressBar {
    match count {
        Some(total) => indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} events ({per_sec}, eta {eta})",
            )
            .expect("valid template"),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos} events ({per_sec})")
                .expect("valid template"),
        ),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
type Shutdown = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

/// SIGINT or SIGTERM, listened for from the start of the process.
static SHUTDOWN: std::sync::OnceLock<Shutdown> = std::sync::OnceLock::new();

/// Installs the SIGINT/SIGTERM handlers. Called first thing in `main`: a
/// signal that arrives while the job is still starting up (loading UDFs,
/// connecting) then stops it gracefully instead of killing it outright.
fn listen_for_shutdown() {
    use futures::FutureExt;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .expect("SIGINT handler installs");
    let signal = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    }
    .boxed()
    .shared();
    let _ = SHUTDOWN.set(signal);
}

/// Resolves once SIGINT or SIGTERM has arrived (any time since `main` started).
fn shutdown_signal() -> Shutdown {
    SHUTDOWN
        .get()
        .expect("listen_for_shutdown ran in main")
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(epoch: u64, kept: &str) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "job": "j", "epoch": epoch, "created_at": format!("2026-11-30T00:00:{epoch:02}Z"),
            "source": {"slot": "s", "resume_lsn": epoch, "resume_lsn_text": "0/1",
                       "position": {"lsn": epoch, "seq": 0}},
            "sinks": {}, "dimensions": {}, "capture_files": {},
            "capture_order": [["t", 10]], "sql_hash": "", "kept": kept,
        }))
        .unwrap()
    }

    #[test]
    fn runs_of_capture_only_checkpoints_are_summed_up() {
        let manifests: Vec<Manifest> = [
            (1, "capture_and_dimensions"),
            (2, "capture"),
            (3, "capture"),
            (4, "capture"),
            (5, "capture_and_dimensions"),
            (6, "capture"),
            (7, "everything"),
        ]
        .into_iter()
        .map(|(epoch, kept)| manifest(epoch, kept))
        .collect();
        let lines = checkpoint_lines(&manifests, false);
        // Header, 1, the run 2-4, 5, 6 (a run of one is listed), 7.
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert!(
            lines[2].contains("3 checkpoints thinned to their capture, to 4"),
            "{}",
            lines[2]
        );
        assert!(
            lines[2].contains("  30  "),
            "30 changes captured: {}",
            lines[2]
        );
        assert_eq!(checkpoint_lines(&manifests, true).len(), 8);
    }

    #[test]
    fn spans_take_a_unit() {
        assert_eq!(parse_span("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_span("90m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_span("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_span("0"), Ok(Duration::ZERO));
        assert!(parse_span("24").unwrap_err().contains("needs a unit"));
        assert!(parse_span("2w")
            .unwrap_err()
            .contains("the unit is s, m, h or d"));
        assert!(parse_span("h").unwrap_err().contains("not a span"));
    }
}
