//! Scenario 6, `kafka-outage`: the Kafka broker hangs (SIGSTOP) for the
//! outage while changes flow, then comes back with its data; later it
//! restarts *without* its data (Tansu keeps the topic in memory). The job
//! must ride through the hang: the Kafka sink is detached after its retry
//! budget, the other sinks go on (the Parquet output must commit files while
//! the broker hangs), and once the broker answers the sink is caught up,
//! losing nothing. It must then notice the emptied topic and rebuild it from
//! its checkpoints rather than go on appending to it. It ends in place.

use std::time::Duration;

use super::{
    ensure_running, parquet_commits_during_outage, record_summary, start_job, ChaosError, Injected,
    ScenarioReport, Settings, World,
};

pub(super) async fn kafka_outage(
    world: &mut World,
    settings: &Settings,
    report: &mut ScenarioReport,
) -> Result<Injected, ChaosError> {
    let mut job = start_job(world, None).await?;
    let rate = settings.rate.min(5_000);
    let workload = world.workload(None, rate, settings.seed);
    tokio::time::sleep(Duration::from_secs(3)).await;

    world
        .kafka
        .pause()
        .map_err(crate::chaos::context("failed to pause the broker"))?;
    // An outage shorter than the sink's retry budget (5 s) plus a checkpoint
    // would end before anything is committed without the Kafka sink.
    parquet_commits_during_outage(world, settings, report, "while the kafka broker hung").await;
    // The job waits for the broker; it must not have given up.
    ensure_running(world, &mut job, "while the broker hung")?;
    world
        .kafka
        .resume()
        .map_err(crate::chaos::context("failed to resume the broker"))?;
    let drained = world
        .wait_drained(&mut job, "drain the broker outage's backlog")
        .await?;
    report.figure("outage_s", settings.outage.as_secs() as f64);
    report.figure(
        "drain_after_outage_s",
        (drained.as_secs_f64() * 10.0).round() / 10.0,
    );

    // The broker comes back empty: the job must rebuild the topic.
    tokio::time::sleep(Duration::from_secs(3)).await;
    world
        .kafka
        .restart_empty()
        .await
        .map_err(crate::chaos::context("failed to restart the broker empty"))?;
    let rebuilt = world
        .wait_drained(&mut job, "rebuild the topic after the broker lost it")
        .await?;
    report.figure(
        "rebuild_after_broker_loss_s",
        (rebuilt.as_secs_f64() * 10.0).round() / 10.0,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let finished = workload.stop().await;
    ensure_running(world, &mut job, "during the broker faults")?;
    report.faults = format!(
        "{} s broker hang + restart without data, ended in place",
        settings.outage.as_secs()
    );
    finished.map_err(ChaosError::Failed)?;
    let summary = world.finish_in_place(job).await?.unwrap_or_default();
    record_summary(report, &summary);
    Ok(Injected::new())
}
