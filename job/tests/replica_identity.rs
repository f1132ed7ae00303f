//! Tables as users create them, with Postgres' default replica identity
//! (a delete carries only the key, an update no old row): deletes pass every
//! CHECK and reach non-windowed sinks as `d` rows; a job whose windowed
//! queries would need old rows refuses to start, or sets `FULL` itself when
//! asked to, and then retracts deletes from every window.

mod support;

use std::time::Duration;

use engage::chaos::workload::{Workload, WorkloadOptions};
use support::{
    assert_matches_oracle, csv, has_committed_files, wait_caught_up, wait_for, World, MISSION_SQL,
};

/// The design's schema exactly as written: no `REPLICA IDENTITY` clause.
const DEFAULT_IDENTITY_SCHEMA: &str = "
CREATE TABLE content (
    id UUID PRIMARY KEY, slug TEXT UNIQUE NOT NULL, title TEXT NOT NULL,
    content_type TEXT CHECK (content_type IN ('podcast', 'newsletter', 'video')),
    length_seconds INTEGER, publish_ts TIMESTAMPTZ NOT NULL);
CREATE TABLE engagement_events (
    id BIGSERIAL PRIMARY KEY, content_id UUID REFERENCES content(id), user_id UUID,
    event_type TEXT CHECK (event_type IN ('play', 'pause', 'finish', 'click')),
    event_ts TIMESTAMPTZ NOT NULL, duration_ms INTEGER, device TEXT, raw_payload JSONB);
";

async fn replica_identity(world: &World, table: &str) -> String {
    world
        .sql()
        .await
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn windowed_queries_on_a_default_identity_table_refuse_to_start_and_name_the_fix() {
    let world = World::start().await;
    world
        .sql()
        .await
        .batch_execute(DEFAULT_IDENTITY_SCHEMA)
        .await
        .unwrap();
    let output = world.run_mission_once();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{log}");
    for expected in [
        "table public.engagement_events has REPLICA IDENTITY DEFAULT",
        "top_content",
        "kpi_1m_latest",
        "ALTER TABLE public.engagement_events REPLICA IDENTITY FULL",
        "'replica_identity.autoset' = 'full'",
    ] {
        assert!(log.contains(expected), "no `{expected}` in:\n{log}");
    }
    // `content` is only a dimension: its identity is not in question.
    assert!(!log.contains("table public.content has"), "{log}");
    assert_eq!(replica_identity(&world, "engagement_events").await, "d");
}

#[tokio::test(flavor = "multi_thread")]
async fn autoset_makes_the_table_full_and_deletes_leave_every_window() {
    let world = World::start().await;
    let client = world.sql().await;
    client.batch_execute(DEFAULT_IDENTITY_SCHEMA).await.unwrap();
    engage::chaos::workload::install_history(&client)
        .await
        .unwrap();
    engage::generate::seed_content(&client, 30, 5)
        .await
        .unwrap();
    let sql = std::fs::read_to_string(MISSION_SQL).unwrap().replace(
        "table      = 'public.engagement_events'",
        "table      = 'public.engagement_events',\n    'replica_identity.autoset' = 'full'",
    );
    assert!(sql.contains("replica_identity.autoset"));
    // Job `engagement`, as the oracle expects.
    let (mut job, _) = world.start_named_job("engagement", &sql).await;
    assert_eq!(replica_identity(&world, "engagement_events").await, "f");
    let log = std::fs::read_to_string(&job.log).unwrap();
    assert!(
        log.contains("set REPLICA IDENTITY FULL on the table"),
        "{log}"
    );

    // 4 s of changes: longer than the 3 s at the end of a minute in which the
    // workload makes no update or delete, so the run always has some.
    let mut changes = Workload::start(
        &world.postgres_url,
        WorkloadOptions::mixed(Some(8_000), 2_000, 5, 30),
    );
    changes.wait_done().await.expect("the workload ran");
    wait_caught_up(&world, &mut job).await;
    job.stop();
    let verdict = assert_matches_oracle(&world, &[]).await;
    assert!(verdict.deletes > 0, "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parquet_job_gets_key_only_deletes_as_d_rows_and_no_check_rejects_them() {
    let world = World::start().await;
    let client = world.sql().await;
    client.batch_execute(DEFAULT_IDENTITY_SCHEMA).await.unwrap();
    client
        .batch_execute(
            "INSERT INTO content VALUES ('00000000-0000-0000-0000-0000000000c1', 'c1', 'One', 'video', 100, now())",
        )
        .await
        .unwrap();
    let data = world.data_dir();
    let sql = format!(
        "CREATE TABLE engagement_events (
             id BIGINT, content_id TEXT, event_type TEXT, event_ts TIMESTAMP, duration_ms INT,
             PRIMARY KEY (id),
             CONSTRAINT content_missing CHECK (content_id IS NOT NULL),
             CONSTRAINT bad_duration CHECK (duration_ms BETWEEN 0 AND 86400000)
         ) WITH (connector = 'postgres-cdc', connection = '${{ENGAGE_POSTGRES_URL}}',
                 table = 'public.engagement_events');
         CREATE TABLE changes WITH (connector = 'filesystem', path = '{data}/changes', format = 'parquet');
         INSERT INTO changes SELECT id, content_id, duration_ms, _op, _lsn, _seq FROM engagement_events;
         CREATE TABLE dead_letter WITH (connector = 'filesystem', path = '{data}/dead_letter', format = 'parquet');",
        data = data.display()
    );
    let (job, path) = world.start_named_job("changes", &sql).await;
    client
        .batch_execute(
            "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms)
                 VALUES ('00000000-0000-0000-0000-0000000000c1', 'play', now(), 1000),
                        ('00000000-0000-0000-0000-0000000000c1', 'play', now(), 2000);
             UPDATE engagement_events SET duration_ms = 3000 WHERE id = 2;
             DELETE FROM engagement_events WHERE id = 1;",
        )
        .await
        .unwrap();
    wait_for("the delete in parquet", Duration::from_secs(30), || async {
        has_committed_files(&data.join("changes"))
            && csv(&path, "SELECT count(*) AS n FROM changes WHERE _op = 'd'").await == "n\n1\n"
    })
    .await;
    job.stop();
    let rows = csv(
        &path,
        "SELECT id, content_id IS NULL AS key_only, duration_ms, _op FROM changes ORDER BY _lsn, _seq",
    )
    .await;
    assert_eq!(
        rows.lines().skip(1).collect::<Vec<_>>(),
        vec![
            "1,false,1000,c",
            "2,false,2000,c",
            "2,false,3000,u",
            "1,true,,d"
        ],
        "{rows}"
    );
    assert!(
        !has_committed_files(&data.join("dead_letter")),
        "a delete was dead-lettered"
    );
}
