//! Bad input goes to the dead-letter output with a reason, its position and
//! the original row; good events are unaffected and the job never stops.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{wait_for, wait_started, World};

/// The source tables without Postgres-side constraints, so bad rows can exist.
const LOOSE_SCHEMA: &str = "
CREATE TABLE content (id UUID PRIMARY KEY, slug TEXT, title TEXT, content_type TEXT,
                      length_seconds INTEGER, publish_ts TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE engagement_events (id BIGSERIAL PRIMARY KEY, content_id UUID, user_id UUID, event_type TEXT,
                                event_ts TIMESTAMPTZ NOT NULL, duration_ms INTEGER, device TEXT, raw_payload JSONB);
ALTER TABLE content REPLICA IDENTITY FULL;
ALTER TABLE engagement_events REPLICA IDENTITY FULL;
INSERT INTO content (id, slug, title, content_type, length_seconds) VALUES
  ('00000000-0000-0000-0000-0000000000c1', 'c1', 'One', 'video', 100),
  ('00000000-0000-0000-0000-0000000000c2', 'c2', 'Two', 'podcast', 200);
";

#[tokio::test(flavor = "multi_thread")]
async fn bad_events_are_dead_lettered_with_reasons_and_good_ones_flow() {
    let world = World::start().await;
    let client = world.sql().await;
    client.batch_execute(LOOSE_SCHEMA).await.unwrap();
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;

    let good = "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
                SELECT CASE WHEN i % 2 = 0 THEN '00000000-0000-0000-0000-0000000000c1'::uuid
                            ELSE '00000000-0000-0000-0000-0000000000c2'::uuid END,
                       gen_random_uuid(), 'play', now(), 1000 * i, 'ios', '{\"i\": 1}'
                FROM generate_series(1, 50) i";
    client.batch_execute(good).await.unwrap();
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let bad: Vec<(&str, String)> = vec![
        ("content_missing", "NULL, 'play', 10, '{}'".into()),
        (
            "unknown_event_type",
            "'00000000-0000-0000-0000-0000000000c1', 'teleport', 10, '{}'".into(),
        ),
        (
            "bad_duration",
            "'00000000-0000-0000-0000-0000000000c1', 'play', -5, '{}'".into(),
        ),
        (
            "bad_duration",
            "'00000000-0000-0000-0000-0000000000c1', 'play', 1000000000, '{}'".into(),
        ),
        (
            "payload_not_object",
            "'00000000-0000-0000-0000-0000000000c1', 'play', 10, '[1, 2]'".into(),
        ),
        (
            "payload_too_large",
            format!("'00000000-0000-0000-0000-0000000000c1', 'play', 10, '{big}'"),
        ),
        (
            "unknown_content",
            "'00000000-0000-0000-0000-00000000dead', 'play', 10, '{}'".into(),
        ),
    ];
    for (_, values) in &bad {
        let (content, rest) = values.split_once(", ").unwrap();
        let (kind, rest) = rest.split_once(", ").unwrap();
        let (duration, payload) = rest.split_once(", ").unwrap();
        client
            .batch_execute(&format!(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
                 VALUES ({content}, gen_random_uuid(), {kind}, now(), {duration}, 'web', {payload})"
            ))
            .await
            .unwrap();
    }
    client.batch_execute(good).await.unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while world
        .query_i64("SELECT count(*) FROM enriched_events")
        .await
        != vec![vec![Some(100)]]
    {
        assert!(
            std::time::Instant::now() < deadline,
            "good events missing\n{}",
            job.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(
        "every bad event in dead_letter",
        Duration::from_secs(60),
        || async {
            world.query_i64("SELECT count(*) FROM dead_letter").await
                == vec![vec![Some(bad.len() as i64)]]
        },
    )
    .await;
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for (reason, _) in &bad {
        *expected.entry(reason.to_string()).or_default() += 1;
    }
    let (ctx, _) = engage::query::session_for(
        &engage::query::parse_for_outputs(
            "engagement",
            &std::fs::read_to_string(support::MISSION_SQL).unwrap(),
        )
        .unwrap(),
    )
    .await;
    let batches = ctx
        .sql("SELECT reason, count(*) AS n, min(_lsn) > 0 AS positioned, min(length(\"row\")) > 0 AS has_row FROM dead_letter GROUP BY reason")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut found: BTreeMap<String, i64> = BTreeMap::new();
    for batch in &batches {
        let reasons =
            arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let reasons = reasons
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        let counts = batch
            .column(1)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let positioned = batch
            .column(2)
            .as_any()
            .downcast_ref::<arrow::array::BooleanArray>()
            .unwrap();
        let has_row = batch
            .column(3)
            .as_any()
            .downcast_ref::<arrow::array::BooleanArray>()
            .unwrap();
        for i in 0..batch.num_rows() {
            assert!(positioned.value(i) && has_row.value(i));
            found.insert(reasons.value(i).to_string(), counts.value(i));
        }
    }
    assert_eq!(found, expected);
    job.assert_running();
    job.stop();
}
