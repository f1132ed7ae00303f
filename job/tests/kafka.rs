//! The Kafka sink against a real Kafka-protocol broker (Tansu on a private
//! port): exactly once across crashes at its failpoints, Debezium envelopes,
//! a broker that comes back empty, a broker that hangs (the sink is detached
//! and the others go on), and the errors a user meets first.
//!
//! Every test that checks the mission pipeline against the oracle (here, in
//! pipeline.rs and in the fault suite) also checks the topic
//! `engage.enriched_events`: every change once, each key's changes in commit
//! order.

mod support;

use std::time::Duration;

use engage::tail::{self, TailMessage};
use support::*;

/// Every committed message of `topic`, read as a `read_committed` consumer.
fn messages(world: &World, topic: &str) -> Vec<TailMessage> {
    tail::read_all(&world.kafka.bootstrap(), topic).expect("the topic can be read")
}

/// Waits until the running `job` has taken a checkpoint of its own (a
/// restarted job finds its predecessors' checkpoints already there).
async fn wait_next_checkpoint(world: &World, job: &mut support::Job) {
    let before = world.latest_checkpoint();
    wait_for("a new checkpoint", Duration::from_secs(60), || {
        job.assert_running();
        async { world.latest_checkpoint() > before }
    })
    .await;
}

fn workload(world: &World, count: u64, rate: u64, seed: u64) -> engage::chaos::workload::Workload {
    engage::chaos::workload::Workload::start(
        &world.postgres_url,
        engage::chaos::workload::WorkloadOptions::mixed(Some(count), rate, seed, 30),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn crashes_at_each_kafka_failpoint_leave_every_change_in_the_topic_once() {
    let world = World::start().await;
    seed_for_oracle(&world, 30, 11).await;
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;
    // One workload throughout (a pause in the stream would let the idle
    // clock move the watermark, which the oracle cannot follow).
    let mut changes = workload(&world, 24_000, 2_000, 11);
    // Each point kills the job the n-th time it is reached: messages queued
    // but not acknowledged; acknowledged but in no checkpoint; a checkpoint
    // whose slot position was never confirmed.
    for point in [
        "kafka_in_flight:5",
        "kafka_acked:3",
        "before_slot_confirm:2",
    ] {
        job.kill_9();
        let mut failing = world.start_job_failing_at(point);
        let status = failing.wait_exit(Duration::from_secs(60), &format!("dying at {point}"));
        assert!(!status.success(), "{point}: {status}");
        assert!(
            failing.log_tail().contains("failpoint"),
            "{point}: {}",
            failing.log_tail()
        );
        job = world.start_job(&["run"]);
        wait_next_checkpoint(&world, &mut job).await;
    }
    assert!(!changes.is_done(), "the workload must outlast the crashes");
    changes.wait_done().await.expect("the workload ran");
    wait_caught_up(&world, &mut job).await;
    job.stop();
    let verdict = assert_matches_oracle(&world, &[]).await;
    let topic = verdict
        .sinks
        .iter()
        .find(|s| s.sink == "enriched_events_topic")
        .expect("the oracle checks the topic");
    assert!(topic.expected > 24_000, "{topic:?}");
    // The position header of every message, strictly increasing per key.
    let all = messages(&world, "engage.enriched_events");
    assert_eq!(all.len() as u64, topic.expected);
    // A crash after messages were sent made a restarted job skip some: the
    // dedupe was exercised, not just never needed.
    let logs: String = std::fs::read_dir(world.root.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("job-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(logs.contains("changes the topic already held were not sent again"));
    assert!(all.iter().all(|m| m.position.is_some() && m.key.is_some()));
}

#[tokio::test(flavor = "multi_thread")]
async fn debezium_json_envelopes_carry_inserts_updates_and_deletes() {
    let world = World::start().await;
    let client = world.sql().await;
    engage::generate::ensure_schema(&client).await.unwrap();
    engage::generate::seed_content(&client, 3, 1).await.unwrap();
    let sql = r#"
CREATE TABLE engagement_events (
    id BIGINT, content_id TEXT, user_id TEXT, event_type TEXT, event_ts TIMESTAMP,
    duration_ms INT, device TEXT, raw_payload TEXT,
    PRIMARY KEY (id)
) WITH (connector = 'postgres-cdc', connection = '${ENGAGE_POSTGRES_URL}',
        table = 'public.engagement_events');

CREATE TABLE changes WITH (
    connector = 'kafka', bootstrap_servers = '${ENGAGE_KAFKA_BROKERS}',
    topic = 'dbz.engagement_events', type = 'sink', format = 'debezium_json',
    'sink.key_field' = 'id', 'topic.partitions' = '1',
    'kafka.compression.type' = 'zstd'
);
INSERT INTO changes
SELECT id, content_id, event_type, event_ts, duration_ms, _op, _lsn, _seq, _commit_ts
FROM engagement_events;
"#;
    let (job, _) = world.start_named_job("dbz", sql).await;
    let content: String = client
        .query_one("SELECT id::text FROM content ORDER BY id LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "INSERT INTO engagement_events (id, content_id, user_id, event_type, event_ts, duration_ms, device)
             VALUES (1, $1::text::uuid, '00000000-0000-0000-0000-00000000000a', 'play', '2026-12-06 10:00:00.25', 1500, 'ios')",
            &[&content],
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "UPDATE engagement_events SET duration_ms = 2500 WHERE id = 1;
             DELETE FROM engagement_events WHERE id = 1;",
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while messages(&world, "dbz.engagement_events").len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no three messages in 30 s: {:?}\n{}",
            messages(&world, "dbz.engagement_events"),
            job.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    job.stop();
    let all = messages(&world, "dbz.engagement_events");
    assert_eq!(all.len(), 3, "{all:?}");
    let envelopes: Vec<serde_json::Value> = all
        .iter()
        .map(|m| serde_json::from_str(m.value.as_deref().unwrap()).unwrap())
        .collect();
    let ops: Vec<&str> = envelopes
        .iter()
        .map(|e| e["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["c", "u", "d"]);
    assert_eq!(envelopes[0]["after"]["duration_ms"], 1500);
    assert_eq!(
        envelopes[0]["after"]["event_ts"],
        "2026-12-06T10:00:00.250Z"
    );
    assert!(envelopes[0]["before"].is_null());
    assert!(envelopes[0]["after"].get("_lsn").is_none());
    assert_eq!(envelopes[1]["after"]["duration_ms"], 2500);
    assert!(envelopes[2]["after"].is_null());
    assert_eq!(envelopes[2]["before"]["id"], 1);
    for envelope in &envelopes {
        assert_eq!(envelope["source"]["table"], "engagement_events");
        assert_eq!(envelope["source"]["schema"], "public");
        assert_eq!(envelope["source"]["name"], "dbz");
        assert!(envelope["source"]["lsn"].as_i64().unwrap() > 0);
        assert!(envelope["ts_ms"].as_i64().unwrap() > 1_700_000_000_000);
    }
    // One key, one partition, in commit order.
    assert!(all.iter().all(|m| m.key.as_deref() == Some("1")));
    assert!(all
        .windows(2)
        .all(|w| w[0].partition == w[1].partition && w[0].position < w[1].position));
}

/// A broker that restarts without the topic's data (Tansu keeps it in
/// memory) is found out at start: the topic ends below what the checkpoint
/// recorded. The sink is then rebuilt from the captured changes (they reach
/// back to the job's first checkpoint here), and the refilled topic holds
/// every change once again. Had the captures expired, the job would stop
/// instead, as for Redis (pipeline.rs).
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_comes_back_empty_gets_the_topic_rebuilt_never_resumed_onto() {
    let mut world = World::start().await;
    seed_for_oracle(&world, 10, 3).await;
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;
    let mut changes = workload(&world, 1_000, 1_000, 3);
    changes.wait_done().await.expect("the workload ran");
    wait_caught_up(&world, &mut job).await;
    job.stop();
    let before = messages(&world, "engage.enriched_events").len();
    assert!(before > 1_000, "{before}");

    world
        .kafka
        .restart_empty()
        .await
        .expect("the broker restarts");
    let mut job = world.start_job(&["run"]);
    wait_next_checkpoint(&world, &mut job).await;
    let mut changes = workload(&world, 500, 1_000, 4);
    changes.wait_done().await.expect("the workload ran");
    wait_caught_up(&world, &mut job).await;
    let log = std::fs::read_to_string(&job.log).unwrap();
    job.stop();
    assert!(
        log.contains("holds less than the last checkpoint recorded"),
        "{log}"
    );
    assert!(log.contains("sinks rebuilt from checkpoints"), "{log}");
    let verdict = assert_matches_oracle(&world, &[]).await;
    let topic = verdict
        .sinks
        .iter()
        .find(|s| s.sink == "enriched_events_topic")
        .unwrap();
    assert!(topic.expected as usize > before, "{topic:?}");
}

/// A broker that hangs (SIGSTOP) while changes flow: after the retry
/// budget the Kafka sink is detached and the Parquet table keeps growing;
/// once the broker answers again the job restarts and catches the topic up,
/// and every sink, the topic included, equals the oracle.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_broker_is_detached_while_the_other_sinks_go_on_then_caught_up() {
    let world = World::start().await;
    seed_for_oracle(&world, 20, 21).await;
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;
    let changes = workload(&world, 20_000, 1_000, 21);
    tokio::time::sleep(Duration::from_secs(2)).await;
    world.kafka.pause().expect("the broker pauses");
    wait_for(
        "the kafka sink to be detached",
        Duration::from_secs(60),
        || {
            job.assert_running();
            let log = std::fs::read_to_string(&job.log).unwrap_or_default();
            async move { log.contains("sink detached") && log.contains("enriched_events_topic") }
        },
    )
    .await;
    parquet_flows_then_the_topic_catches_up(&world, job, changes).await;
}

/// A job restarted while the broker hangs opens its Kafka sink detached at
/// its checkpoint's position (a job that never checkpointed stops instead,
/// below): the other sinks go on, and once the broker answers the sink is
/// caught up, every change once.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_restarted_while_the_broker_hangs_opens_its_kafka_sink_detached() {
    let world = World::start().await;
    seed_for_oracle(&world, 10, 31).await;
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;
    let mut changes = workload(&world, 500, 1_000, 31);
    changes.wait_done().await.expect("the workload ran");
    wait_caught_up(&world, &mut job).await;
    job.stop();

    world.kafka.pause().expect("the broker pauses");
    let mut job = world.start_job(&["run"]);
    wait_for(
        "the kafka sink to open detached",
        Duration::from_secs(60),
        || {
            job.assert_running();
            let log = std::fs::read_to_string(&job.log).unwrap_or_default();
            async move { log.contains("sink detached at start: the kafka brokers are unreachable") }
        },
    )
    .await;
    let changes = workload(&world, 3_000, 1_000, 32);
    parquet_flows_then_the_topic_catches_up(&world, job, changes).await;
}

/// With the broker hung and the Kafka sink detached: the Parquet table keeps
/// growing; then the broker resumes, the job catches the sink up (its log
/// says so), and every sink, the topic included, equals the oracle.
async fn parquet_flows_then_the_topic_catches_up(
    world: &World,
    mut job: Job,
    mut changes: engage::chaos::workload::Workload,
) {
    let count = || async {
        world
            .query_i64("SELECT count(*) FROM enriched_events")
            .await[0][0]
            .unwrap_or(0)
    };
    let before = count().await;
    wait_for(
        "enriched_events to grow while the broker hangs",
        Duration::from_secs(30),
        || async { count().await > before + 500 },
    )
    .await;
    world.kafka.resume().expect("the broker resumes");
    changes.wait_done().await.expect("the workload ran");
    wait_caught_up(world, &mut job).await;
    let log = std::fs::read_to_string(&job.log).unwrap();
    job.stop();
    assert!(
        log.contains("detached while the kafka broker was unreachable"),
        "the sink was not caught up after the broker came back:\n{log}"
    );
    assert_matches_oracle(world, &[]).await;
}

#[test]
fn an_unreachable_broker_at_start_is_an_error_naming_the_address() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let world = runtime.block_on(World::start());
    runtime.block_on(seed_for_oracle(&world, 3, 1));
    let output = world
        .engage(&["run", MISSION_SQL, "--checkpoint-dir"])
        .arg(world.checkpoint_dir())
        .env("ENGAGE_KAFKA_BROKERS", "127.0.0.1:9")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot reach the kafka brokers at 127.0.0.1:9"),
        "{stderr}"
    );
}
