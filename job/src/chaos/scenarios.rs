//! The five scenarios of the fault suite; each returns its report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::oracle;
use super::world::{
    log_tail, summary_figure, time_until_changed, JobChild, World, RECENT_POSITION_KEY,
};
use super::{ChaosError, ScenarioReport, Settings};
use crate::failpoint;

/// Injected bad events: id → the CHECK of `sql/engagement.sql` it fails.
type Injected = BTreeMap<i64, String>;

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
            other => return Err(ChaosError::UnknownScenario(other.to_string())),
        };
        verify(&world, &injected, &mut report).await
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
    report: &mut ScenarioReport,
) -> Result<(), ChaosError> {
    let verdict = oracle::check(world, injected).await?;
    report.events = verdict.events;
    report.figure("late", verdict.late as f64);
    if !injected.is_empty() {
        report.figure("dead_lettered", verdict.dead_letter.len() as f64);
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

/// Scenario 1: SIGKILL at seeded moments (and two SIGTERM restarts) while events flow.
async fn kill_storm(
    world: &World,
    settings: &Settings,
    report: &mut ScenarioReport,
) -> Result<Injected, ChaosError> {
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut job = Some(start_job(world, None).await?);
    let mut generator = world.generator(Some(settings.events), settings.rate, settings.seed);
    let expected = Duration::from_secs_f64(settings.events as f64 / settings.rate as f64);
    // Fault moments as fractions of the expected run; the clean ones are marked.
    let mut moments: Vec<(f64, bool)> = (0..settings.kills + 2)
        .map(|i| (rng.random_range(0.05..0.95), i >= settings.kills))
        .collect();
    moments.sort_by(|a, b| a.0.total_cmp(&b.0));
    let started = Instant::now();
    let mut redis = world.redis().await?;
    let mut first_apply = Vec::new();
    let (mut kills, mut clean) = (0, 0);
    for (at, graceful) in moments {
        let due = expected.mul_f64(at);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let current = job.take().expect("a job runs between faults");
        if graceful {
            current.terminate().await?;
            clean += 1;
        } else {
            current.kill_9().await;
            kills += 1;
        }
        let before: Option<String> = redis::cmd("GET")
            .arg(RECENT_POSITION_KEY)
            .query_async(&mut redis)
            .await
            .ok()
            .flatten();
        let restarted = Instant::now();
        job = Some(world.spawn_job(None, None)?);
        if !generator.is_done() {
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
    }
    generator.wait_done().await;
    report.faults = format!("{kills} SIGKILL + {clean} SIGTERM");
    first_apply.sort_by(f64::total_cmp);
    report.figure(
        "restart_to_first_apply_p50_ms",
        percentile(&first_apply, 0.5).round(),
    );
    report.figure(
        "restart_to_first_apply_max_ms",
        first_apply.last().copied().unwrap_or(f64::NAN).round(),
    );
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
    let generator = world.generator(None, settings.rate.min(2_000), settings.seed);
    first.kill_9().await;
    let mut crashes = 0;
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
                    crashes += 1
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
    generator.stop().await;
    report.faults = format!(
        "{crashes} crashes at {} points × {}",
        failpoint::POINTS.len(),
        settings.crash_repeats
    );
    world.drain(Some(last)).await?;
    Ok(Injected::new())
}

/// Scenario 3: `pg_ctl -m immediate` restarts while the job streams.
async fn postgres_restart(
    world: &mut World,
    settings: &Settings,
    report: &mut ScenarioReport,
) -> Result<Injected, ChaosError> {
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut job = start_job(world, None).await?;
    let mut generator = world.generator(Some(settings.events), settings.rate, settings.seed);
    let expected = Duration::from_secs_f64(settings.events as f64 / settings.rate as f64);
    let mut moments: Vec<f64> = (0..settings.postgres_restarts)
        .map(|_| rng.random_range(0.1..0.9))
        .collect();
    moments.sort_by(f64::total_cmp);
    let started = Instant::now();
    for at in moments {
        if let Some(wait) = expected.mul_f64(at).checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let postgres = &mut world.postgres;
        tokio::task::block_in_place(|| postgres.restart_immediate())
            .map_err(super::context("failed to restart postgres"))?;
    }
    generator.wait_done().await;
    ensure_running(world, &mut job, "after a postgres restart")?;
    report.faults = format!("{} immediate restarts", settings.postgres_restarts);
    let summary = world.drain(Some(job)).await?.unwrap_or_default();
    report.figure(
        "resent_suppressed",
        summary_figure(&summary, "re-sent changes suppressed").unwrap_or(0) as f64,
    );
    record_summary(report, &summary);
    Ok(Injected::new())
}

/// Scenario 4: Redis down for the outage and restarted with its data;
/// later restarted without it.
async fn redis_outage(
    world: &mut World,
    settings: &Settings,
    report: &mut ScenarioReport,
) -> Result<Injected, ChaosError> {
    let mut job = start_job(world, None).await?;
    let rate = settings.rate.min(5_000);
    let generator = world.generator(None, rate, settings.seed);
    let db = world.db().await?;
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
    tokio::time::sleep(settings.outage).await;
    world
        .redis
        .restart()
        .await
        .map_err(super::context("failed to restart redis"))?;
    let back = Instant::now();
    let behind: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(super::context("failed to read the WAL position"))?
        .get(0);
    // Drained: the slot is confirmed past the WAL written while Redis was down.
    let drained = loop {
        let done: bool = db
            .query_one(
                "SELECT bool_and(confirmed_flush_lsn >= $1::text::pg_lsn) FROM pg_replication_slots",
                &[&behind],
            )
            .await
            .map_err(super::context("failed to read the slot"))?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false);
        if done {
            break back.elapsed();
        }
        if back.elapsed() > Duration::from_secs(300) || !job.running() {
            return Err(ChaosError::Failed(format!(
                "the job did not drain the outage's backlog; the end of its log:\n{}",
                log_tail(&world.log)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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
    generator.stop().await;
    ensure_running(world, &mut job, "during the redis faults")?;
    report.faults = format!(
        "{} s outage + restart without data",
        settings.outage.as_secs()
    );
    let summary = world.drain(Some(job)).await?.unwrap_or_default();
    record_summary(report, &summary);
    Ok(Injected::new())
}

/// The bad events of the bad-input scenario, by the CHECK they fail.
const BAD_KINDS: [(&str, &str); 6] = [
    (
        "content_missing",
        "NULL, gen_random_uuid(), 'play', now(), 1000, 'web', '{}'",
    ),
    (
        "unknown_event_type",
        "$1::text::uuid, gen_random_uuid(), 'swipe', now(), 1000, 'web', '{}'",
    ),
    (
        "bad_duration",
        "$1::text::uuid, gen_random_uuid(), 'play', now(), -5, 'web', '{}'",
    ),
    (
        "payload_not_object",
        "$1::text::uuid, gen_random_uuid(), 'play', now(), 1000, 'web', '[1, 2]'",
    ),
    (
        "unknown_content",
        "gen_random_uuid(), gen_random_uuid(), 'play', now(), 1000, 'web', '{}'",
    ),
    (
        "bad_duration",
        "$1::text::uuid, gen_random_uuid(), 'click', now(), 999999999, 'web', '{}'",
    ),
];
/// 2 MB payloads are few: each is 2 MB of WAL and of dead-letter output.
const LARGE_PAYLOADS: u64 = 5;

/// Scenario 5: about 1% bad events of every kind, mixed into good traffic.
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
    let content: String = db
        .query_one("SELECT id::text FROM content ORDER BY id LIMIT 1", &[])
        .await
        .map_err(super::context("failed to read content"))?
        .get(0);
    let mut job = start_job(world, None).await?;
    let generator = world.generator(Some(settings.events), settings.rate, settings.seed);
    let bad_total = (settings.events / 100).max(BAD_KINDS.len() as u64 + LARGE_PAYLOADS);
    let expected = Duration::from_secs_f64(settings.events as f64 / settings.rate as f64);
    let gap = expected.div_f64(bad_total as f64);
    let large = format!("{{\"blob\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let mut injected = Injected::new();
    for i in 0..bad_total {
        let (reason, row) = if i % (bad_total / LARGE_PAYLOADS) == 0
            && injected
                .values()
                .filter(|r| *r == "payload_too_large")
                .count()
                < LARGE_PAYLOADS as usize
        {
            ("payload_too_large", None)
        } else {
            let (reason, row) = BAD_KINDS[(i as usize) % BAD_KINDS.len()];
            (reason, Some(row))
        };
        let id: i64 = match row {
            Some(row) => {
                let sql = format!(
                    "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) \
                     VALUES ({row}) RETURNING id"
                );
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    if row.contains("$1") { vec![&content] } else { vec![] };
                db.query_one(&sql, &params).await
            }
            None => {
                db.query_one(
                    "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) \
                     VALUES ($1::text::uuid, gen_random_uuid(), 'play', now(), 1000, 'web', $2::text::jsonb) RETURNING id",
                    &[&content, &large],
                )
                .await
            }
        }
        .map_err(super::context(format!("failed to insert a {reason} event")))?
        .get(0);
        injected.insert(id, reason.to_string());
        tokio::time::sleep(gap).await;
    }
    let mut generator = generator;
    generator.wait_done().await;
    ensure_running(world, &mut job, "on bad input")?;
    let reasons: std::collections::BTreeSet<&String> = injected.values().collect();
    report.faults = format!("{} bad events, {} reasons", injected.len(), reasons.len());
    report.figure("injected", injected.len() as f64);
    let summary = world.drain(Some(job)).await?.unwrap_or_default();
    record_summary(report, &summary);
    Ok(injected)
}
