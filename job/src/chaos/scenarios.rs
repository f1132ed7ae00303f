//! The five scenarios of the fault suite; each returns its report.
//!
//! Every scenario runs the same workload (inserts, updates, deletes, content
//! changes, out-of-order and late events; bad events too in `bad-input`)
//! while its faults land. Kill storm, crash points and bad input end with a
//! drain in a fresh process; the Postgres restart and Redis outage scenarios
//! end *in place*: the job that restarted itself, or rebuilt a sink, runs to
//! the end and is checked as it is.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::oracle;
use super::workload::{Workload, WorkloadOptions};
use super::world::{
    log_tail, summary_figure, time_until_changed, JobChild, World, CONTENT_ITEMS,
    RECENT_POSITION_KEY,
};
use super::{ChaosError, ScenarioReport, Settings};
use crate::failpoint;
use crate::sink::parquet::committed_files;

mod kafka;

/// Injected bad events: id → the CHECK of `sql/engagement.sql` it fails.
type Injected = BTreeMap<i64, String>;

/// How long a kill waits for sinks to hold changes no checkpoint covers.
const IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a restarted job may take to apply its first change.
const FIRST_APPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an armed failpoint may take to be reached.
const FAILPOINT_TIMEOUT: Duration = Duration::from_secs(60);
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs scenario `name`; a scenario that cannot run is a failed report.
pub async fn run(name: &str, settings: &Settings) -> ScenarioReport {
    let started = Instant::now();
    let mut report = ScenarioReport {
        scenario: name.to_string(),
        ..ScenarioReport::default()
    };
    let outcome = async {
        let mut world = World::start(name, settings).await?;
        if settings.keep {
            report.dir = Some(world.root.display().to_string());
        }
        let injected = match name {
            "kill-storm" => kill_storm(&world, settings, &mut report).await?,
            "crash-points" => crash_points(&world, settings, &mut report).await?,
            "postgres-restart" => postgres_restart(&mut world, settings, &mut report).await?,
            "redis-outage" => redis_outage(&mut world, settings, &mut report).await?,
            "bad-input" => bad_input(&world, settings, &mut report).await?,
            "kafka-outage" => kafka::kafka_outage(&mut world, settings, &mut report).await?,
            other => return Err(ChaosError::UnknownScenario(other.to_string())),
        };
        let stopped_at = chrono::Utc::now().timestamp_micros();
        verify(&world, &injected, stopped_at, &mut report).await
    }
    .await;
    if let Err(error) = outcome {
        report.problems.push(error.to_string());
    }
    report.passed = report.problems.is_empty() && report.sinks.iter().all(|s| s.ok());
    report.elapsed_secs = started.elapsed().as_secs_f64();
    report
}

/// Runs the oracle and records its findings.
async fn verify(
    world: &World,
    injected: &Injected,
    stopped_at_micros: i64,
    report: &mut ScenarioReport,
) -> Result<(), ChaosError> {
    let target = oracle::Target {
        postgres_url: world.postgres_url.clone(),
        redis_url: world.redis.url(),
        kafka_brokers: world.kafka.bootstrap(),
        data_dir: world.data_dir(),
        stopped_at_micros,
    };
    let mut verdict = oracle::check(&target, injected).await?;
    report.events = verdict.events;
    report.figure("updates", verdict.updates as f64);
    report.figure("deletes", verdict.deletes as f64);
    report.figure("content_changes", verdict.content_changes as f64);
    report.figure("late_expected", verdict.late as f64);
    report.problems.append(&mut verdict.problems);
    if !injected.is_empty() {
        report.figure("dead_lettered", verdict.dead_lettered as f64);
        if let Some(good) = verdict.sinks.iter().find(|s| s.sink == "enriched_events") {
            let applied = good.expected.saturating_sub(good.lost) as f64;
            report.figure(
                "good_applied_pct",
                100.0 * applied / good.expected.max(1) as f64,
            );
        }
    }
    for sink in &verdict.sinks {
        if !sink.ok() {
            report.problems.push(format!(
                "{}: lost {}, duplicated {}, other {} of {} expected ({})",
                sink.sink, sink.lost, sink.duplicated, sink.other, sink.expected, sink.note
            ));
        }
    }
    report.sinks = verdict.sinks;
    Ok(())
}

/// Starts a job and waits for its first checkpoint (its slot exists).
async fn start_job(world: &World, failpoint: Option<&str>) -> Result<JobChild, ChaosError> {
    let mut job = world.spawn_job(failpoint, None)?;
    let started = Instant::now();
    let first = world
        .root
        .join("checkpoints")
        .join("engagement")
        .join("epoch-000000000001")
        .join("manifest.json");
    while !first.exists() {
        if !job.running() || started.elapsed() > START_TIMEOUT {
            return Err(ChaosError::Failed(format!(
                "the job did not start; the end of its log:\n{}",
                log_tail(&world.log)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(job)
}

/// Fails unless `job` still runs (`after` says what it went through).
fn ensure_running(world: &World, job: &mut JobChild, after: &str) -> Result<(), ChaosError> {
    if job.running() {
        return Ok(());
    }
    Err(ChaosError::Failed(format!(
        "the job stopped {after}; the end of its log:\n{}",
        log_tail(&world.log)
    )))
}

/// Records the figures of a stopped job's summary line.
fn record_summary(report: &mut ScenarioReport, summary: &str) {
    report.figure(
        "job_restarts",
        summary_figure(summary, "restarts").unwrap_or(0) as f64,
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Waits for the workload to commit `inserts` ordinary inserts.
async fn wait_inserted(workload: &Workload, inserts: u64) -> Result<(), ChaosError> {
    while workload.inserted() < inserts {
        if workload.is_done() {
            return Err(ChaosError::Failed(format!(
                "the workload stopped after {} of the inserts the faults were timed by",
                workload.inserted()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Waits (up to [`IN_FLIGHT_TIMEOUT`]) until sinks hold changes that no
/// checkpoint covers, so the fault about to land has work to lose.
async fn wait_in_flight(world: &World) -> Result<super::world::InFlight, ChaosError> {
    let started = Instant::now();
    loop {
        let in_flight = world.in_flight().await?;
        if in_flight.uncheckpointed() || started.elapsed() > IN_FLIGHT_TIMEOUT {
            return Ok(in_flight);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Records what the faults found in flight: how many landed on changes no
/// checkpoint covered, and how many changes the restarted jobs read again.
fn record_in_flight(
    report: &mut ScenarioReport,
    what: &str,
    landed: u32,
    faults: u32,
    replayed: u64,
) {
    report.figure(&format!("{what}_on_uncheckpointed"), landed as f64);
    report.figure(&format!("{what}_replayed_changes"), replayed as f64);
    report.faults.push_str(&format!(
        ", {landed}/{faults} on uncheckpointed changes, {replayed} changes replayed"
    ));
}

/// Scenario 1: SIGKILL at seeded moments (and two SIGTERM restarts) while
/// changes flow. Moments are fractions of the workload's inserts, so every
/// fault lands while it runs; each SIGKILL waits until sinks hold changes no
/// checkpoint covers.
async fn kill_storm(
    world: &World,
    settings: &Settings,
    report: &mut ScenarioReport,
) -> Result<Injected, ChaosError> {
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut job = Some(start_job(world, None).await?);
    let mut workload = world.workload(Some(settings.events), settings.rate, settings.seed);
    let mut moments: Vec<(f64, bool)> = (0..settings.kills + 2)
        .map(|i| (rng.random_range(0.05..0.95), i >= settings.kills))
        .collect();
    moments.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut redis = world.redis().await?;
    let mut first_apply = Vec::new();
    let (mut kills, mut clean, mut landed, mut replayed) = (0, 0, 0, 0);
    for (at, graceful) in moments {
        wait_inserted(&workload, (settings.events as f64 * at) as u64).await?;
        let current = job.take().expect("a job runs between faults");
        if graceful {
            current.terminate().await?;
            clean += 1;
        } else {
            let in_flight = wait_in_flight(world).await?;
            let wal = crate::change::parse_lsn(&world.wal_position().await?).unwrap_or(0);
            current.kill_9().await;
            kills += 1;
            landed += u32::from(in_flight.uncheckpointed());
            replayed += workload.log.changes_between(in_flight.resume_lsn, wal);
        }
        let before: Option<String> = redis::cmd("GET")
            .arg(RECENT_POSITION_KEY)
            .query_async(&mut redis)
            .await
            .ok()
            .flatten();
        let restarted = Instant::now();
        job = Some(world.spawn_job(None, None)?);
        match time_until_changed(
            &mut redis,
            RECENT_POSITION_KEY,
            before,
            restarted,
            FIRST_APPLY_TIMEOUT,
        )
        .await
        {
            Some(waited) => first_apply.push(waited.as_secs_f64() * 1000.0),
            None => report
                .problems
                .push("a restarted job applied nothing within 60 s".into()),
        }
    }
    let finished = workload.wait_done().await;
    report.faults = format!("{kills} SIGKILL + {clean} SIGTERM");
    record_in_flight(report, "kills", landed, kills, replayed);
    if landed < kills {
        report.problems.push(format!(
            "{} of {kills} kills found no uncheckpointed change in the sinks",
            kills - landed
        ));
    }
    first_apply.sort_by(f64::total_cmp);
    report.figure(
        "restart_to_first_apply_p50_ms",
        percentile(&first_apply, 0.5).round(),
    );
    report.figure(
        "restart_to_first_apply_max_ms",
        first_apply.last().copied().unwrap_or(f64::NAN).round(),
    );
    finished.map_err(ChaosError::Failed)?;
    world.drain(job).await?;
    Ok(Injected::new())
}

/// Scenario 2: the job dies at each failpoint, `crash_repeats` times each.
async fn crash_points(
    world: &World,
    settings: &Settings,
    report: &mut ScenarioReport,
) -> Result<Injected, ChaosError> {
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let first = start_job(world, None).await?;
    // Unbounded (crashes take as long as they take), so at a modest rate.
    let workload = world.workload(None, settings.rate.min(2_000), settings.seed);
    first.kill_9().await;
    let (mut crashes, mut landed, mut replayed) = (0, 0, 0);
    let mut job = None;
    for point in failpoint::POINTS {
        for _ in 0..settings.crash_repeats {
            // Points on the write path are hit per batch and sink, the others per checkpoint.
            let n = match point {
                "after_sink_write" | "redis_in_flight" => rng.random_range(5..60),
                _ => rng.random_range(1..4),
            };
            let mut armed = world.spawn_job(Some(&format!("{point}:{n}")), None)?;
            match armed.wait_exit(FAILPOINT_TIMEOUT).await {
                Some(status) if std::os::unix::process::ExitStatusExt::signal(&status) == Some(9) => {
                    crashes += 1;
                    let in_flight = world.in_flight().await?;
                    let wal = crate::change::parse_lsn(&world.wal_position().await?).unwrap_or(0);
                    landed += u32::from(in_flight.uncheckpointed());
                    replayed += workload.log.changes_between(in_flight.resume_lsn, wal);
                }
                Some(status) => {
                    return Err(ChaosError::Failed(format!(
                        "armed with {point}:{n}, the job exited with {status} instead of dying; the end of its log:\n{}",
                        log_tail(&world.log)
                    )))
                }
                None => {
                    report.problems.push(format!("failpoint {point}:{n} was not reached within {FAILPOINT_TIMEOUT:?}"));
                    job = Some(armed);
                    break;
                }
            }
        }
        if let Some(stuck) = job.take() {
            stuck.kill_9().await;
        }
    }
    // Run on without faults for a moment, so the last restart is exercised too.
    let last = world.spawn_job(None, None)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let finished = workload.stop().await;
    report.faults = format!(
        "{crashes} crashes at {} points × {}",
        failpoint::POINTS.len(),
        settings.crash_repeats
    );
    record_in_flight(report, "crashes", landed, crashes, replayed);
    finished.map_err(ChaosError::Failed)?;
    world.drain(Some(last)).await?;
    Ok(Injected::new())
}

/// Scenario 3: `pg_ctl -m immediate` restarts while the job streams; the job
/// restarts itself and runs to the end in place.
async fn postgres_restart(
    world: &mut World,
    settings: &Settings,
    report: &mut ScenarioReport,
) -> Result<Injected, ChaosError> {
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut job = start_job(world, None).await?;
    let mut workload = world.workload(Some(settings.events), settings.rate, settings.seed);
    let mut moments: Vec<f64> = (0..settings.postgres_restarts)
        .map(|_| rng.random_range(0.1..0.9))
        .collect();
    moments.sort_by(f64::total_cmp);
    let (mut landed, mut replayed) = (0, 0);
    for at in moments {
        wait_inserted(&workload, (settings.events as f64 * at) as u64).await?;
        let in_flight = wait_in_flight(world).await?;
        let wal = crate::change::parse_lsn(&world.wal_position().await?).unwrap_or(0);
        landed += u32::from(in_flight.uncheckpointed());
        replayed += workload.log.changes_between(in_flight.resume_lsn, wal);
        let postgres = &mut world.postgres;
        tokio::task::block_in_place(|| postgres.restart_immediate())
            .map_err(super::context("failed to restart postgres"))?;
    }
    workload.wait_done().await.map_err(ChaosError::Failed)?;
    ensure_running(world, &mut job, "after a postgres restart")?;
    report.faults = format!("{} immediate restarts", settings.postgres_restarts);
    record_in_flight(
        report,
        "restarts",
        landed,
        settings.postgres_restarts,
        replayed,
    );
    report.faults.push_str(", ended in place");
    let summary = world.finish_in_place(job).await?.unwrap_or_default();
    report.figure(
        "resent_suppressed",
        summary_figure(&summary, "re-sent changes suppressed").unwrap_or(0) as f64,
    );
    record_summary(report, &summary);
    if summary_figure(&summary, "restarts").unwrap_or(0) == 0 {
        report
            .problems
            .push("the job never restarted itself: the restarts did not reach it".into());
    }
    Ok(Injected::new())
}

/// Lasts the outage, then checks that the Parquet output committed files
/// meanwhile (the sink whose store is out is detached; the others go on).
/// Checked, not timed: a short outage on a slow machine may end before the
/// first checkpoint after the sink is detached, so the outage goes on (up to
/// 60 s more) until the Parquet output has committed something. `during`
/// says when, for the problem reported if it never does.
async fn parquet_commits_during_outage(
    world: &World,
    settings: &Settings,
    report: &mut ScenarioReport,
    during: &str,
) {
    let parquet = world.data_dir().join("enriched_events");
    let files_before = committed_files(&parquet);
    tokio::time::sleep(settings.outage).await;
    let mut files_during = committed_files(&parquet).saturating_sub(files_before);
    let deadline = Instant::now() + Duration::from_secs(60);
    while files_during == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        files_during = committed_files(&parquet).saturating_sub(files_before);
    }
    report.figure("parquet_files_committed_during_outage", files_during as f64);
    if files_during == 0 {
        report.problems.push(format!(
            "the parquet output committed nothing in 60 s {during}"
        ));
    }
}

/// Scenario 4: Redis down for the outage and restarted with its data;
/// later restarted without it. The job rebuilds and runs to the end in place.
async fn redis_outage(
    world: &mut World,
    settings: &Settings,
    report: &mut ScenarioReport,
) -> Result<Injected, ChaosError> {
    let mut job = start_job(world, None).await?;
    let rate = settings.rate.min(5_000);
    let workload = world.workload(None, rate, settings.seed);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let sampler = {
        let peak = peak.clone();
        let db = world.db().await?;
        tokio::spawn(async move {
            loop {
                if let Ok(row) = db
                    .query_one(
                        "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)), 0)::int8 \
                         FROM pg_replication_slots",
                        &[],
                    )
                    .await
                {
                    peak.fetch_max(row.get(0), std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    {
        let redis = &mut world.redis;
        tokio::task::block_in_place(|| redis.stop())
            .map_err(super::context("failed to stop redis"))?;
    }
    // A Redis sink that cannot write is detached: Parquet must keep taking
    // the workload's events meanwhile.
    parquet_commits_during_outage(world, settings, report, "while redis was down").await;
    world
        .redis
        .restart()
        .await
        .map_err(super::context("failed to restart redis"))?;
    // Drained: the slot is confirmed past the WAL written while Redis was down.
    let drained = world
        .wait_drained(&mut job, "drain the outage's backlog")
        .await?;
    report.figure("outage_s", settings.outage.as_secs() as f64);
    report.figure(
        "drain_after_outage_s",
        (drained.as_secs_f64() * 10.0).round() / 10.0,
    );
    sampler.abort();
    report.figure(
        "peak_wal_retained_kib",
        (peak.load(std::sync::atomic::Ordering::Relaxed) / 1024) as f64,
    );

    // Redis comes back empty: the job must rebuild, not serve an undercount.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let in_flight = world.in_flight().await?;
    world
        .redis
        .restart_empty()
        .await
        .map_err(super::context("failed to restart redis empty"))?;
    let lost_at = Instant::now();
    let mut redis = world.redis().await?;
    let rebuilt = time_until_changed(
        &mut redis,
        RECENT_POSITION_KEY,
        None,
        lost_at,
        Duration::from_secs(120),
    )
    .await;
    match rebuilt {
        Some(waited) => report.figure(
            "rebuild_after_data_loss_s",
            (waited.as_secs_f64() * 10.0).round() / 10.0,
        ),
        None => report
            .problems
            .push("the job wrote nothing to redis within 120 s of its data loss".into()),
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let finished = workload.stop().await;
    ensure_running(world, &mut job, "during the redis faults")?;
    report.faults = format!(
        "{} s outage + restart without data ({} uncheckpointed changes lost with it), ended in place",
        settings.outage.as_secs(),
        if in_flight.uncheckpointed() { "with" } else { "no" }
    );
    finished.map_err(ChaosError::Failed)?;
    let summary = world.finish_in_place(job).await?.unwrap_or_default();
    record_summary(report, &summary);
    Ok(Injected::new())
}

/// Scenario 5: about 1% bad events of every kind, mixed into the workload.
async fn bad_input(
    world: &World,
    settings: &Settings,
    report: &mut ScenarioReport,
) -> Result<Injected, ChaosError> {
    let db = world.db().await?;
    // The source has neither the event type CHECK nor the foreign key, so
    // that such events reach the stream (and engage must catch them).
    db.batch_execute(
        "ALTER TABLE engagement_events DROP CONSTRAINT IF EXISTS engagement_events_event_type_check, \
         DROP CONSTRAINT IF EXISTS engagement_events_content_id_fkey",
    )
    .await
    .map_err(super::context("failed to drop the source constraints"))?;
    let mut job = start_job(world, None).await?;
    let mut options = WorkloadOptions::mixed(
        Some(settings.events),
        settings.rate,
        settings.seed,
        CONTENT_ITEMS,
    );
    options.bad_per_mille = 10;
    let mut workload = world.workload_with(options);
    workload.wait_done().await.map_err(ChaosError::Failed)?;
    ensure_running(world, &mut job, "on bad input")?;
    let injected = workload.log.bad.lock().expect("log lock").clone();
    let reasons: std::collections::BTreeSet<&String> = injected.values().collect();
    report.faults = format!("{} bad events, {} reasons", injected.len(), reasons.len());
    report.figure("injected", injected.len() as f64);
    let summary = world.drain(Some(job)).await?.unwrap_or_default();
    record_summary(report, &summary);
    Ok(injected)
}
