//! End-to-end tests of the mission pipeline (`sql/engagement.sql`) against
//! real PostgreSQL (logical replication) and Redis, with the job running as
//! the `engage` binary.

mod support;

use std::time::Duration;

use engage::chaos::workload::{Workload, WorkloadOptions};
use engage::checkpoint::{CheckpointStore, Kept};
use engage::embedded::PostgresOptions;
use engage::generate;
use redis::AsyncCommands;
use support::{
    assert_matches_oracle, seed_for_oracle, wait_caught_up, wait_for, wait_started, World,
};

const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";

async fn schema_with_two_items(world: &World) -> tokio_postgres::Client {
    let client = world.sql().await;
    generate::ensure_schema(&client).await.unwrap();
    client
        .batch_execute(&format!(
            "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
               ('{A}', 'a', 'Item A', 'podcast', 100, now()),
               ('{B}', 'b', 'Item B', 'video', NULL, now())"
        ))
        .await
        .unwrap();
    client
}

async fn insert_event(
    client: &tokio_postgres::Client,
    content: Option<&str>,
    duration_ms: Option<i32>,
) -> i64 {
    let row = client
        .query_one(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
             VALUES ($1::text::uuid, gen_random_uuid(), 'play', now(), $2, 'ios', '{\"k\": 1}') RETURNING id",
            &[&content, &duration_ms],
        )
        .await
        .unwrap();
    row.get(0)
}

/// (id, _op, content_type, length_seconds, engagement_pct*100) of every change row, in stream order.
async fn change_rows(
    world: &World,
) -> Vec<(i64, String, Option<String>, Option<i64>, Option<i64>)> {
    let mut out = Vec::new();
    let batches = world
        .query(
            "SELECT id, _op, content_type, CAST(length_seconds AS BIGINT), CAST(round(engagement_pct * 100) AS BIGINT)
             FROM enriched_events ORDER BY _lsn, _seq",
        )
        .await;
    for batch in batches {
        let ids =
            arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Int64).unwrap();
        let ids = ids
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let text = |i: usize| {
            let c =
                arrow::compute::cast(batch.column(i), &arrow::datatypes::DataType::Utf8).unwrap();
            c.as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap()
                .clone()
        };
        let int = |i: usize| {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap()
                .clone()
        };
        let (ops, types, lengths, pcts) = (text(1), text(2), int(3), int(4));
        use arrow::array::Array;
        for row in 0..batch.num_rows() {
            out.push((
                ids.value(row),
                ops.value(row).to_string(),
                types.is_valid(row).then(|| types.value(row).to_string()),
                lengths.is_valid(row).then(|| lengths.value(row)),
                pcts.is_valid(row).then(|| pcts.value(row)),
            ));
        }
    }
    out
}

async fn recent_ids(world: &World, content: &str) -> Vec<i64> {
    let mut redis = world.redis().await;
    let entries: Vec<String> = redis
        .lrange(format!("engage:recent:{content}"), 0, -1)
        .await
        .unwrap();
    entries
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn inserts_updates_deletes_and_nulls_reach_parquet_and_redis_joined_point_in_time() {
    let world = World::start().await;
    let client = schema_with_two_items(&world).await;
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;

    let e1 = insert_event(&client, Some(A), Some(50_000)).await; // A is 100 s long: 50 %
    let e2 = insert_event(&client, Some(B), None).await; // unknown length and duration: NULL
    let e3 = insert_event(&client, None, Some(1_000)).await; // no content: bad input, dead-lettered
    client
        .batch_execute(&format!(
            "UPDATE content SET length_seconds = 200 WHERE id = '{A}'"
        ))
        .await
        .unwrap();
    let e4 = insert_event(&client, Some(A), Some(50_000)).await; // A is now 200 s long: 25 %
    client
        .batch_execute(&format!(
            "UPDATE engagement_events SET duration_ms = 10000 WHERE id = {e1}"
        ))
        .await
        .unwrap();
    client
        .batch_execute(&format!("DELETE FROM engagement_events WHERE id = {e2}"))
        .await
        .unwrap();

    let expected = vec![
        (
            e1,
            "c".to_string(),
            Some("podcast".to_string()),
            Some(100),
            Some(5000),
        ),
        (e2, "c".to_string(), Some("video".to_string()), None, None),
        (
            e4,
            "c".to_string(),
            Some("podcast".to_string()),
            Some(200),
            Some(2500),
        ),
        (
            e1,
            "u".to_string(),
            Some("podcast".to_string()),
            Some(200),
            Some(500),
        ),
        (e2, "d".to_string(), Some("video".to_string()), None, None),
    ];
    wait_for(
        "all five good changes in parquet",
        Duration::from_secs(30),
        || async { change_rows(&world).await.len() >= expected.len() },
    )
    .await;
    assert_eq!(change_rows(&world).await, expected, "{}", job.log_tail());
    let dead_letter = format!(
        "SELECT _lsn FROM dead_letter WHERE reason = 'content_missing' AND \"row\" LIKE '%\"id\":{e3},%'"
    );
    wait_for(
        "the event without content in dead_letter",
        Duration::from_secs(30),
        || async { world.query_i64(&dead_letter).await.len() == 1 },
    )
    .await;

    wait_for("redis recent lists", Duration::from_secs(30), || async {
        recent_ids(&world, A).await.len() == 2
    })
    .await;
    assert_eq!(
        recent_ids(&world, A).await,
        vec![e4, e1],
        "newest first, inserts only (an update does not move an event)"
    );
    assert_eq!(
        recent_ids(&world, B).await,
        Vec::<i64>::new(),
        "the deleted event left its list"
    );
    let mut redis = world.redis().await;
    let json: Vec<String> = redis
        .lrange(format!("engage:recent:{A}"), 0, 0)
        .await
        .unwrap();
    let newest: serde_json::Value = serde_json::from_str(&json[0]).unwrap();
    assert!(
        newest.get("_op").is_none(),
        "`_op` is not written: {newest}"
    );
    assert_eq!(newest["engagement_pct"], serde_json::json!(25.0));
    assert_eq!(newest["content_type"], "podcast");
    job.stop();
}

/// Rows of `enriched_events` (Parquet), by event id.
async fn parquet_ids(world: &World) -> Vec<i64> {
    let mut ids: Vec<i64> = change_rows(world).await.iter().map(|row| row.0).collect();
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_outage_leaves_parquet_flowing_and_redis_is_caught_up_after() {
    let mut world = World::start().await;
    let client = schema_with_two_items(&world).await;
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;
    let e1 = insert_event(&client, Some(A), Some(1_000)).await;
    wait_for(
        "the first event in redis",
        Duration::from_secs(30),
        || async { recent_ids(&world, A).await == vec![e1] },
    )
    .await;

    {
        let redis = &mut world.redis;
        tokio::task::block_in_place(|| redis.stop()).unwrap();
    }
    let e2 = insert_event(&client, Some(A), Some(2_000)).await;
    let e3 = insert_event(&client, Some(A), Some(3_000)).await;
    // Checked, not timed: the Parquet output takes the events Redis cannot.
    wait_for(
        "events committed while redis is down, in parquet",
        Duration::from_secs(60),
        || async { parquet_ids(&world).await == vec![e1, e2, e3] },
    )
    .await;
    job.assert_running();
    assert!(
        job.log_tail().contains("sink detached"),
        "{}",
        job.log_tail()
    );

    // Killed and started again while Redis is still down: the Redis sinks
    // start detached, and Parquet goes on.
    job.kill_9();
    let mut job = world.start_job(&["run"]);
    let e4 = insert_event(&client, Some(A), Some(4_000)).await;
    wait_for(
        "an event committed after the restart, in parquet",
        Duration::from_secs(60),
        || async { parquet_ids(&world).await == vec![e1, e2, e3, e4] },
    )
    .await;
    job.assert_running();
    assert!(
        job.log_tail().contains("sink detached at start"),
        "{}",
        job.log_tail()
    );

    world.redis.restart().await.unwrap();
    wait_for(
        "redis caught up once it is back",
        Duration::from_secs(60),
        || async { recent_ids(&world, A).await == vec![e4, e3, e2, e1] },
    )
    .await;
    // Nothing twice in either output, and the job carries on as usual.
    let e5 = insert_event(&client, Some(A), Some(5_000)).await;
    wait_for("a later event in both", Duration::from_secs(30), || async {
        recent_ids(&world, A).await == vec![e5, e4, e3, e2, e1]
            && parquet_ids(&world).await == vec![e1, e2, e3, e4, e5]
    })
    .await;
    job.assert_running();
    job.stop();
}

/// Starts the fault suite's workload: `count` inserts at `rate`, with
/// updates, deletes, content changes, out-of-order and late events mixed in.
fn workload(world: &World, count: u64, rate: u64, items: usize) -> Workload {
    Workload::start(
        &world.postgres_url,
        WorkloadOptions::mixed(Some(count), rate, 7, items),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_then_restart_matches_the_oracle_with_every_kind_of_change() {
    let world = World::start().await;
    seed_for_oracle(&world, 50, 7).await;
    let interval = "1.0";
    let mut job = world.start_job_with_interval(&["run"], interval);
    wait_started(&world, &mut job).await;

    let mut changes = workload(&world, 12_000, 2_000, 50);
    // Seeded moments: each kill lands somewhere inside an epoch, after the sinks
    // applied changes that no checkpoint covers yet.
    let mut seed = 0x5eed_u64;
    for kill in 0..3 {
        let epoch = world.latest_checkpoint();
        wait_for(
            "a checkpoint before the kill",
            Duration::from_secs(30),
            || async { world.latest_checkpoint() > epoch },
        )
        .await;
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(100 + (seed >> 33) % 800);
        tokio::time::sleep(delay).await; // fault injection timing, not a wait for a condition
        job.kill_9();
        eprintln!(
            "kill {kill} at checkpoint {} + {delay:?}",
            world.latest_checkpoint()
        );
        job = world.start_job_with_interval(&["run"], interval);
    }
    changes.wait_done().await.expect("the workload ran");
    wait_caught_up(&world, &mut job).await;
    job.stop();
    let verdict = assert_matches_oracle(&world, &[]).await;
    assert!(
        verdict.late > 0 && verdict.content_changes > 0,
        "{verdict:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_from_an_older_checkpoint_counts_nothing_twice_and_refills_a_flushed_redis() {
    let world = World::start().await;
    seed_for_oracle(&world, 20, 3).await;
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;
    let first = world.latest_checkpoint();
    // 4 s of changes: longer than the 3 s at the end of a minute in which the
    // workload makes no update or delete, so the run always has some.
    four_seconds_of_changes_then_stop(&world, job).await;

    // Replaying from the first checkpoint re-reads every captured change: the
    // sinks already hold them all, so nothing changes.
    replay_to_a_new_checkpoint(&world, first).await.stop();
    assert_matches_oracle(&world, &[]).await;

    // With Redis emptied, the same replay rebuilds the recent lists exactly,
    // and rewrites every windowed key with the last window it held.
    let mut redis = world.redis().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    let replay = replay_to_a_new_checkpoint(&world, first).await;
    let log = std::fs::read_to_string(&replay.log).unwrap();
    replay.stop();
    assert!(
        log.contains("rewrote the last window it held"),
        "the windowed sinks were not rewritten at start:\n{log}"
    );
    assert_matches_oracle(&world, &[]).await;
    let windows: Vec<String> = redis::cmd("KEYS")
        .arg("engage:top_*")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(windows.len(), 3, "{windows:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_redis_is_rebuilt_from_captures_older_than_the_whole_checkpoints() {
    let world = World::start().await;
    seed_for_oracle(&world, 20, 3).await;
    let run = ["run", "--keep-checkpoints", "2"];
    // Checkpoints every 0.1 s: tens of them in the 4 s of changes, far more
    // than the 2 kept whole and the up to 10 whose window files those build on.
    let mut job = world.start_job_with_interval(&run, "0.1");
    wait_started(&world, &mut job).await;
    four_seconds_of_changes_then_stop(&world, job).await;

    // Two checkpoints are whole (and those whose window files they build
    // on); the older ones keep their capture, and the first (taken at start,
    // before any change) its dimension tables too.
    let store =
        CheckpointStore::open(support::path_str(&world.checkpoint_dir()), "engagement").unwrap();
    let manifests = store.list().await.unwrap();
    let count = |kept: Kept| manifests.iter().filter(|m| m.kept == kept).count();
    let (whole, thinned) = (count(Kept::Everything), count(Kept::Capture));
    assert!(whole >= 2 && thinned >= 10, "{:?}", kept(&manifests));
    assert_eq!(manifests[0].epoch, 1);
    assert_eq!(manifests[0].kept, Kept::CaptureAndDimensions);

    // Redis loses everything: the job rebuilds the lists from checkpoint 1's
    // dimension tables and every capture since, not only the whole checkpoints.
    let mut redis = world.redis().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    let last = world.latest_checkpoint();
    let job = world.start_job_with_interval(&run, "0.1");
    wait_for(
        "a checkpoint after the rebuild",
        Duration::from_secs(30),
        || async { world.latest_checkpoint() > last },
    )
    .await;
    let log = std::fs::read_to_string(&job.log).unwrap();
    job.stop();
    assert!(
        log.contains("rebuilding sinks whose store lost its data")
            && log.contains("from_checkpoint=1"),
        "the lists were not rebuilt from checkpoint 1:\n{log}"
    );
    assert_matches_oracle(&world, &[]).await;

    // A replay (a sink added later) starts at a checkpoint that kept its
    // dimension tables, and says which when asked for one that did not.
    // (A base opens every 10 minutes of wall time: look, do not assume.)
    let thinned = manifests
        .iter()
        .position(|m| m.kept == Kept::Capture)
        .unwrap();
    let base = manifests[..thinned]
        .iter()
        .rev()
        .find(|m| m.holds_dimensions());
    let (thinned, base) = (manifests[thinned].epoch, base.unwrap().epoch);
    let mut refused = world.start_job(&["replay", "--from-checkpoint", &thinned.to_string()]);
    let status = refused.wait_exit(Duration::from_secs(60), "refusing the replay");
    let log = std::fs::read_to_string(&refused.log).unwrap();
    assert!(!status.success());
    assert!(
        log.contains(&format!(
            "checkpoint {thinned} keeps only its captured changes"
        )) && log.contains(&format!("the nearest before it is {base}")),
        "{log}"
    );
    replay_to_a_new_checkpoint(&world, base).await.stop();
    assert_matches_oracle(&world, &[]).await;
}

/// Runs the workload for 4 s (8,000 inserts with every other kind of change
/// among them) under `job`, lets the job catch up, stops it and checks every
/// output against the oracle.
async fn four_seconds_of_changes_then_stop(world: &World, mut job: support::Job) {
    workload(world, 8_000, 2_000, 20)
        .wait_done()
        .await
        .expect("the workload ran");
    wait_caught_up(world, &mut job).await;
    job.stop();
    assert_matches_oracle(world, &[]).await;
}

/// Starts `engage replay --from-checkpoint epoch`, and returns it running
/// once it has taken a checkpoint (the replay is done by then).
async fn replay_to_a_new_checkpoint(world: &World, epoch: u64) -> support::Job {
    let last = world.latest_checkpoint();
    let mut replay = world.start_job(&["replay", "--from-checkpoint", &epoch.to_string()]);
    wait_for(
        "a checkpoint after the replay",
        Duration::from_secs(30),
        || async { world.latest_checkpoint() > last },
    )
    .await;
    replay.assert_running();
    replay
}

fn kept(manifests: &[engage::checkpoint::Manifest]) -> Vec<(u64, Kept)> {
    manifests.iter().map(|m| (m.epoch, m.kept)).collect()
}

/// Under a backlog an epoch is cut by its size, not only by the interval
/// (what an epoch holds stays in memory until its checkpoint): with a 60 s
/// interval and `--checkpoint-max-changes 500`, 30 transactions of 100
/// changes (the reader may merge a few into one batch, so an epoch can hold
/// a little more) and a last one of 500 are checkpointed at least four
/// times, every row committed to Parquet, long before the interval ends.
#[tokio::test(flavor = "multi_thread")]
async fn an_epoch_is_checkpointed_once_it_holds_checkpoint_max_changes() {
    let world = World::start().await;
    let client = schema_with_two_items(&world).await;
    let mut job = world.start_job_sql(
        &["run", "--checkpoint-max-changes", "500"],
        support::MISSION_SQL,
        "60",
    );
    wait_started(&world, &mut job).await;
    let first = world.latest_checkpoint();
    let insert = "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
                  SELECT $1::text::uuid, gen_random_uuid(), 'play', now(), 1000, 'ios' FROM generate_series(1, $2)";
    for rows in [100i32; 30].into_iter().chain([500]) {
        client.execute(insert, &[&A, &rows]).await.unwrap();
        // Apart, so that the reader's batches do not merge them all.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let committed = || async {
        let rows = world
            .query_i64("SELECT count(*) FROM enriched_events")
            .await;
        rows.first().and_then(|row| row[0]).unwrap_or(0)
    };
    wait_for(
        "checkpoints cut by size",
        Duration::from_secs(30),
        || async { world.latest_checkpoint() >= first + 4 && committed().await == 3_500 },
    )
    .await;
    job.stop();
    assert_eq!(committed().await, 3_500);
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_command_lists_epochs_with_positions() {
    let world = World::start().await;
    let client = world.sql().await;
    generate::ensure_schema(&client).await.unwrap();
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;
    job.stop();
    let checkpoint_dir = world.checkpoint_dir();
    let output = world
        .engage(&[
            "checkpoints",
            support::MISSION_SQL,
            "--checkpoint-dir",
            support::path_str(&checkpoint_dir),
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("resume lsn"), "{text}");
    assert!(text.lines().count() >= 2, "{text}");
}

#[test]
fn bad_job_sql_fails_with_a_clear_error_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.sql");
    std::fs::write(&path, "CREATE TABLE t (\n  id BIGINT\n) WITH (connector = 'postgres-cdc', table = 't');\nINSERT INTO nowhere SELECT * FROM t;")
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_engage"))
        .args(["run", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("needs option `connection`"), "{stderr}");
    assert!(stderr.contains("line 1, column 14"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn job_refuses_to_start_when_wal_level_is_not_logical() {
    let world = World::start_with(PostgresOptions {
        extra_settings: vec![("wal_level".into(), "replica".into())],
        ..PostgresOptions::default()
    })
    .await;
    generate::ensure_schema(&world.sql().await).await.unwrap();
    let output = world.run_mission_once();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("wal_level is `replica`"), "{stderr}");
    assert!(
        stderr.contains("ALTER SYSTEM SET wal_level = logical"),
        "{stderr}"
    );
}
