//! Replication-slot safety against a real Postgres: an invalidated slot stops
//! the job with an error saying what happened and how to recover — never a
//! silent new slot; so does a slot confirmed past the newest checkpoint (a gap).

mod support;

use std::time::Duration;

use engage::embedded::PostgresOptions;
use engage::generate::{self, GenerateOptions};
use support::{wait_started, World};

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_stops_the_job_with_a_recovery_hint() {
    let world = World::start_with(PostgresOptions {
        wal_segsize_mb: Some(1),
        extra_settings: vec![
            ("max_slot_wal_keep_size".into(), "2MB".into()),
            ("min_wal_size".into(), "2MB".into()),
            ("max_wal_size".into(), "4MB".into()),
        ],
        ..PostgresOptions::default()
    })
    .await;
    let client = world.sql().await;
    generate::ensure_schema(&client).await.unwrap();
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;
    job.stop();

    // With the job stopped, write far more WAL than the slot may keep.
    let options = GenerateOptions {
        count: Some(40_000),
        content_items: 20,
        ..GenerateOptions::default()
    };
    generate::run(
        &world.postgres_url,
        options,
        Default::default(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        client
            .batch_execute("SELECT pg_switch_wal(); CHECKPOINT;")
            .await
            .unwrap();
        let status: Option<String> = client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'engage_engagement'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if status.as_deref() == Some("lost") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot never invalidated (wal_status {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let output = world.run_mission_once();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("was invalidated by postgres (wal_status = lost"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pg_drop_replication_slot('engage_engagement')"),
        "{stderr}"
    );
    // No new slot was created behind the user's back.
    assert_eq!(world.slot_count().await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_job_still_advances_its_slot_past_unrelated_wal() {
    let world = World::start().await;
    let client = world.sql().await;
    generate::ensure_schema(&client).await.unwrap();
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;
    // WAL the job does not read: a table outside its publication.
    client
        .batch_execute(
            "CREATE TABLE noise (x int); INSERT INTO noise SELECT generate_series(1, 200000);",
        )
        .await
        .unwrap();
    let written: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let caught_up: bool = client
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'engage_engagement'",
                &[&written],
            )
            .await
            .unwrap()
            .get(0);
        if caught_up {
            break;
        }
        job.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "the slot did not advance past {written}\n{}",
            job.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    job.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_confirmed_past_the_newest_checkpoint_stops_the_job_naming_the_gap() {
    let world = World::start().await;
    let client = world.sql().await;
    generate::ensure_schema(&client).await.unwrap();
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;
    job.stop();

    // Another consumer acknowledges changes the job never checkpointed.
    generate::run(
        &world.postgres_url,
        GenerateOptions {
            count: Some(1_000),
            content_items: 20,
            ..GenerateOptions::default()
        },
        Default::default(),
        std::future::pending(),
    )
    .await
    .unwrap();
    // A slot advances only to flushed WAL: CHECKPOINT flushes it all.
    client
        .batch_execute(
            "CHECKPOINT; \
             SELECT pg_replication_slot_advance('engage_engagement', pg_current_wal_lsn())",
        )
        .await
        .unwrap();

    let output = world.run_mission_once();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("the changes in between were acknowledged without being checkpointed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pg_drop_replication_slot('engage_engagement')"),
        "{stderr}"
    );
    // The slot is left as it was: no new slot, no silent restart.
    assert_eq!(world.slot_count().await, 1);
}
