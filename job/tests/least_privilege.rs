//! The mission pipeline run as a role with no more than the README asks
//! for: `LOGIN REPLICATION`, `SELECT` on the two source tables, and a
//! publication an administrator created beforehand. Every sink must equal
//! the oracle, as when the job runs as a superuser. And the same role,
//! without a publication made for it, is told what to ask for.

mod support;

use std::time::Duration;

use support::*;

/// What the README's "Least privilege" block asks an administrator to run,
/// for job `engagement` (the mission SQL).
const GRANTS: &str = "
CREATE ROLE engage_job LOGIN REPLICATION PASSWORD 'engage-job-password';
GRANT SELECT ON content, engagement_events TO engage_job;
CREATE PUBLICATION engage_engagement FOR TABLE content, engagement_events;
";

fn url_as(world: &World, role: &str) -> String {
    world
        .postgres_url
        .replacen("postgres@", &format!("{role}:engage-job-password@"), 1)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mission_runs_as_a_replication_role_with_select_and_a_precreated_publication() {
    let world = World::start().await;
    seed_for_oracle(&world, 30, 21).await;
    world.sql().await.batch_execute(GRANTS).await.unwrap();
    let url = url_as(&world, "engage_job");
    let mut job = world.start_job_env(
        &["run"],
        MISSION_SQL,
        "0.3",
        &[("ENGAGE_POSTGRES_URL", url.as_str())],
    );
    wait_started(&world, &mut job).await;
    let client = world.sql().await;
    let superuser: bool = client
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = 'engage_job'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!superuser);
    // The job's stream is the role's.
    let streaming: Vec<String> = client
        .query("SELECT usename::text FROM pg_stat_replication", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(streaming, ["engage_job"]);
    // 6 s: updates and deletes pause in the last 3 s of each minute, and the
    // oracle wants some.
    let mut changes = engage::chaos::workload::Workload::start(
        &world.postgres_url,
        engage::chaos::workload::WorkloadOptions::mixed(Some(12_000), 2_000, 21, 30),
    );
    changes.wait_done().await.expect("the workload ran");
    wait_caught_up(&world, &mut job).await;
    job.stop();
    assert_matches_oracle(&world, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_cannot_create_the_publication_is_told_what_to_ask_for() {
    let world = World::start().await;
    seed_for_oracle(&world, 5, 22).await;
    world
        .sql()
        .await
        .batch_execute(
            "CREATE ROLE engage_job LOGIN REPLICATION PASSWORD 'engage-job-password';
             GRANT SELECT ON content, engagement_events TO engage_job;",
        )
        .await
        .unwrap();
    let url = url_as(&world, "engage_job");
    let mut job = world.start_job_env(
        &["run"],
        MISSION_SQL,
        "10",
        &[("ENGAGE_POSTGRES_URL", url.as_str())],
    );
    let status = job.wait_exit(Duration::from_secs(60), "refusing to start");
    assert!(!status.success());
    let log = job.log_tail();
    assert!(
        log.contains("CREATE PUBLICATION \"engage_engagement\"")
            && log.contains("create the publication as a superuser"),
        "{log}"
    );
    assert!(!log.contains("engage-job-password"), "{log}");
}
