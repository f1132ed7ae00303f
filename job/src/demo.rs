//! `engage demo`: the mission pipeline on an embedded default, one command.
//!
//! Uses `ENGAGE_POSTGRES_URL` / `ENGAGE_REDIS_URL` / `ENGAGE_KAFKA_BROKERS`
//! when set; otherwise starts
//! throwaway servers from the machine's own binaries on free ports (their
//! data lives in a temporary directory and goes away with them). Then it
//! creates the source tables, seeds content, starts `sql/engagement.sql`
//! (embedded in the binary), waits for the job's slot to exist, and starts
//! the load generator. A status line per second shows what flows; Ctrl-C
//! stops the generator and the job (which takes a final checkpoint).
//!
//! Outputs stay under `./data` (or `ENGAGE_DATA_DIR`) for `engage query`.
//! With throwaway servers every run is a new world: the previous run's
//! checkpoints and outputs of this job are cleared first, since they refer
//! to a database that no longer exists.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::embedded::{EmbeddedKafka, EmbeddedPostgres, EmbeddedRedis, PostgresOptions};
use crate::engine::stats::JobStats;
use crate::engine::{self, RunOptions};
use crate::generate::{self, GenerateOptions, GenerateProgress};
use crate::source::setup::PgTarget;
use crate::sql;

/// The mission's job SQL, embedded so the demo runs from any directory.
pub const ENGAGEMENT_SQL: &str = include_str!("../../sql/engagement.sql");

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Events per second from the generator.
    pub rate: u64,
    /// Stop after this long (None: until Ctrl-C).
    pub duration: Option<Duration>,
    pub content_items: usize,
    pub checkpoint_dir: String,
    pub data_dir: String,
    /// The dashboard, metrics and JSON API (`--http`).
    pub http: crate::http::HttpOptions,
    /// Where the UDFs the mission SQL calls come from (`--udf`, `--udfs-dir`).
    pub udfs: crate::udf::UdfOptions,
    /// Seed this much history before the job starts, and backfill it (`--history`).
    pub history: Option<Duration>,
}

/// Events of history seeded per hour of `--history` (a day: 240,000).
const HISTORY_PER_HOUR: u64 = 10_000;

/// Runs the demo until `shutdown` resolves (or `duration` passes).
pub async fn run(options: DemoOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let root = tempfile::Builder::new().prefix("engage-demo-").tempdir()?;
    let mut embedded_postgres = None;
    let mut embedded_redis = None;
    let postgres_url = match std::env::var("ENGAGE_POSTGRES_URL") {
        Ok(url) => url,
        Err(_) => {
            eprintln!("starting a throwaway PostgreSQL (wal_level=logical) ...");
            let server =
                EmbeddedPostgres::start(&root.path().join("postgres"), PostgresOptions::default())
                    .await?;
            let url = server.create_database("engage").await?;
            embedded_postgres = Some(server);
            url
        }
    };
    let redis_url = match std::env::var("ENGAGE_REDIS_URL") {
        Ok(url) => url,
        Err(_) => {
            eprintln!("starting a throwaway Redis ...");
            let server = EmbeddedRedis::start(&root.path().join("redis")).await?;
            let url = server.url();
            embedded_redis = Some(server);
            url
        }
    };
    let mut embedded_kafka = None;
    let kafka_brokers = match std::env::var("ENGAGE_KAFKA_BROKERS") {
        Ok(brokers) => brokers,
        Err(_) => {
            eprintln!("starting a throwaway Kafka-protocol broker (Tansu) ...");
            let server = EmbeddedKafka::start(&root.path().join("kafka")).await?;
            let brokers = server.bootstrap();
            embedded_kafka = Some(server);
            brokers
        }
    };
    let fresh_world = embedded_postgres.is_some();
    let data_dir = std::env::var("ENGAGE_DATA_DIR").unwrap_or(options.data_dir.clone());
    let env = |name: &str| match name {
        "ENGAGE_POSTGRES_URL" => Some(postgres_url.clone()),
        "ENGAGE_REDIS_URL" => Some(redis_url.clone()),
        "ENGAGE_KAFKA_BROKERS" => Some(kafka_brokers.clone()),
        "ENGAGE_DATA_DIR" => Some(data_dir.clone()),
        other => std::env::var(other).ok(),
    };
    let mut spec = sql::parse_job("engagement", ENGAGEMENT_SQL, &env)?;
    spec.udfs = crate::udf::prepare_async(ENGAGEMENT_SQL.to_string(), options.udfs.clone())
        .await
        .map_err(anyhow::Error::msg)?;
    if fresh_world {
        clear_previous_run(&spec, &options.checkpoint_dir)?;
    }

    let target = PgTarget::parse(&postgres_url)?;
    let client = target.connect().await?;
    generate::ensure_schema(&client).await?;
    let content = generate::seed_content(&client, options.content_items, 42).await?;
    eprintln!(
        "{} content items ready (both tables REPLICA IDENTITY FULL: updates and deletes carry whole rows); \
         starting the job",
        content.len()
    );

    // History goes in before the job's slot exists, so only a backfill can
    // bring it in; a job that has checkpoints already had its chance.
    let store = crate::checkpoint::CheckpointStore::open(&options.checkpoint_dir, &spec.name)?;
    let history = match options.history {
        Some(span) if store.latest().await?.is_none() => {
            let rows = (span.as_secs_f64() / 3600.0 * HISTORY_PER_HOUR as f64).ceil() as u64;
            eprintln!(
                "seeding {rows} events of history over the last {} ...",
                crate::backfill::command::format_span(span)
            );
            generate::seed_history(&client, span, rows).await?;
            Some(span)
        }
        Some(_) => {
            eprintln!(
                "the job has checkpoints already: --history seeds and backfills only a new job"
            );
            None
        }
        None => None,
    };

    let stats = Arc::new(JobStats::for_job(&spec));
    let progress = Arc::new(GenerateProgress::default());
    progress.target_rate.store(options.rate, Ordering::Relaxed);
    let server =
        crate::http::serve(&options.http, &spec, stats.clone(), Some(progress.clone())).await?;
    if let Some(server) = &server {
        eprintln!(
            "dashboard: http://{0}/   metrics: http://{0}/metrics   API: http://{0}/api/pipeline",
            server.addr
        );
    }
    let (stop_job, job_stopped) = tokio::sync::oneshot::channel::<()>();
    let run_options = RunOptions {
        checkpoint_dir: options.checkpoint_dir.clone(),
        ..RunOptions::default()
    };
    let job_stats = stats.clone();
    let job_spec = spec.clone();
    let mut job = tokio::spawn(async move {
        engine::run(&job_spec, ENGAGEMENT_SQL, run_options, job_stats, async {
            let _ = job_stopped.await;
        })
        .await
    });

    // Events committed before the slot exists are history: wait for the first checkpoint.
    let waited = Instant::now();
    while stats.checkpoint_epoch.load(Ordering::Relaxed) == 0 {
        if job.is_finished() {
            return Err(anyhow::anyhow!(
                "the job stopped during start-up: {}",
                job_result(&mut job).await
            ));
        }
        if waited.elapsed() > Duration::from_secs(60) {
            return Err(anyhow::anyhow!(
                "the job did not take its first checkpoint within 60 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    if let Some(span) = history {
        let request = crate::backfill::command::request(
            &spec,
            &crate::backfill::command::Options {
                since: format!("now-{}s", span.as_secs()),
                ..Default::default()
            },
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let id = crate::backfill::command::submit(&store, &request, false)
            .await
            .map_err(anyhow::Error::msg)?;
        eprintln!(
            "backfill {id} of the history handed to the job (engage backfill --status, or the status line)"
        );
    }

    let (stop_generator, generator_stopped) = tokio::sync::oneshot::channel::<()>();
    let generator_options = GenerateOptions {
        rate: Some(options.rate),
        content_items: options.content_items,
        ..GenerateOptions::default()
    };
    let generator_progress = progress.clone();
    let generator_url = postgres_url.clone();
    let generator = tokio::spawn(async move {
        generate::run(
            &generator_url,
            generator_options,
            generator_progress,
            async {
                let _ = generator_stopped.await;
            },
        )
        .await
    });
    eprintln!(
        "generating {} events/s; Ctrl-C stops the demo\n",
        options.rate
    );

    let titles: std::collections::HashMap<String, (String, String)> = content
        .iter()
        .map(|c| (c.id.clone(), (c.title.clone(), c.content_type.clone())))
        .collect();
    let mut redis = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let mut seconds = 0u64;
    tokio::pin!(shutdown);
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut last = (Instant::now(), 0u64, 0u64);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = ticker.tick() => {
                if job.is_finished() {
                    let _ = stop_generator.send(());
                    return Err(anyhow::anyhow!("the job stopped: {}", job_result(&mut job).await));
                }
                last = print_status(&stats, &progress, last);
                seconds += 1;
                if seconds.is_multiple_of(5) {
                    print_top_content(&mut redis, &titles).await;
                }
            }
        }
    }
    eprintln!("\nstopping the generator and the job (final checkpoint) ...");
    let _ = stop_generator.send(());
    let generated = generator.await??;
    // Let the job catch up with what was committed, so its outputs hold every event.
    let caught_up = Instant::now();
    while stats.changes_in.load(Ordering::Relaxed) < generated.events
        && caught_up.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_job.send(());
    let summary = job.await??;
    eprintln!(
        "generated {} events; the job read {} changes; last checkpoint {}",
        generated.events,
        summary.changes,
        summary.last_checkpoint.unwrap_or(0)
    );
    drop(embedded_postgres);
    drop(embedded_redis);
    drop(embedded_kafka);
    let data = PathBuf::from(&data_dir);
    eprintln!(
        "outputs are in {}; try:\n  engage query \"SELECT content_type, count(*) AS events, round(avg(engagement_pct), 2) AS avg_pct FROM enriched_events GROUP BY content_type\"",
        data.display()
    );
    Ok(())
}

async fn job_result(
    job: &mut tokio::task::JoinHandle<Result<engine::RunSummary, engine::JobError>>,
) -> String {
    match job.await {
        Ok(Ok(_)) => "it finished".into(),
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    }
}

/// One status line: events/s in, rows out per sink, lag, last checkpoint.
fn print_status(
    stats: &JobStats,
    progress: &GenerateProgress,
    last: (Instant, u64, u64),
) -> (Instant, u64, u64) {
    let now = Instant::now();
    let generated = progress.events.load(Ordering::Relaxed);
    let read = stats.changes_in.load(Ordering::Relaxed);
    let seconds = now.duration_since(last.0).as_secs_f64().max(1e-3);
    // The two row sinks by name; windowed sinks summed (rows of closed windows).
    let mut sinks = Vec::new();
    let mut window_rows = 0;
    for (name, rows) in stats.sink_names.iter().zip(&stats.sink_rows) {
        let rows = rows.load(Ordering::Relaxed);
        if name == "enriched_events" || name == "recent_events" {
            sinks.push(format!("{name} {rows}"));
        } else if name == "enriched_events_topic" {
            sinks.push(format!("kafka messages {rows}"));
        } else {
            window_rows += rows;
        }
    }
    sinks.push(format!("window rows {window_rows}"));
    let checkpoint_ms = stats.checkpoint_unix_ms.load(Ordering::Relaxed);
    let age = if checkpoint_ms == 0 {
        "-".to_string()
    } else {
        format!(
            "{:.0}s ago",
            (chrono::Utc::now().timestamp_millis() as u64).saturating_sub(checkpoint_ms) as f64
                / 1000.0
        )
    };
    let backfill = &stats.backfill;
    if backfill.active.load(Ordering::Relaxed) {
        sinks.push(format!(
            "backfill {}/{} rows",
            backfill.read.load(Ordering::Relaxed),
            backfill.estimate.load(Ordering::Relaxed)
        ));
    }
    eprintln!(
        "in {:>6.0} ev/s (generated {:>6.0}/s) | out: {} | behind {} KiB, slot retains {} KiB | checkpoint {} ({})",
        (read - last.2) as f64 / seconds,
        (generated - last.1) as f64 / seconds,
        sinks.join(", "),
        stats.processing_lag_bytes() / 1024,
        stats.replication_lag_bytes() / 1024,
        stats.checkpoint_epoch.load(Ordering::Relaxed),
        age
    );
    (now, generated, read)
}

/// The live top 10 of `engage:top_content:10m`, with titles and types.
async fn print_top_content(
    redis: &mut redis::aio::MultiplexedConnection,
    titles: &std::collections::HashMap<String, (String, String)>,
) {
    let top: Vec<(String, f64)> = match redis::cmd("ZRANGE")
        .arg("engage:top_content:10m")
        .arg(0)
        .arg(9)
        .arg("REV")
        .arg("WITHSCORES")
        .query_async(redis)
        .await
    {
        Ok(top) => top,
        Err(error) => {
            eprintln!("(top content unavailable: {error})");
            return;
        }
    };
    eprintln!("\n  most engaged content, last 10 minutes (engage:top_content:10m)");
    for (rank, (id, score)) in top.iter().enumerate() {
        let (title, kind) = titles
            .get(id)
            .cloned()
            .unwrap_or_else(|| (id.clone(), String::new()));
        let title: String = title.chars().take(44).collect();
        eprintln!("  {:>2}. {title:<44} {kind:<10} {score:>10.1} s", rank + 1);
    }
    eprintln!();
}

/// Clears the previous demo's checkpoints and outputs of this job.
fn clear_previous_run(spec: &sql::JobSpec, checkpoint_dir: &str) -> anyhow::Result<()> {
    let checkpoints = PathBuf::from(checkpoint_dir).join(&spec.name);
    if checkpoints.exists() {
        std::fs::remove_dir_all(&checkpoints)?;
    }
    for table in &spec.tables {
        if let Some(options) = table.connector.filesystem() {
            let path = PathBuf::from(&options.path);
            if !options.path.contains("://") && path.exists() {
                std::fs::remove_dir_all(&path)?;
            }
        }
    }
    Ok(())
}
