//! The Redis sink's `string` and `hash` targets, end to end.

mod support;

use std::time::Duration;

use engage::generate;
use redis::AsyncCommands;
use support::{wait_for, World};

const JOB_SQL: &str = r#"
CREATE TABLE engagement_events (
    id BIGINT, content_id TEXT, event_type TEXT, device TEXT, duration_ms INT,
    PRIMARY KEY (id)
) WITH (connector = 'postgres-cdc', connection = '${ENGAGE_POSTGRES_URL}', table = 'public.engagement_events');

CREATE TABLE last_event WITH (
    connector = 'redis', address = '${ENGAGE_REDIS_URL}', target = 'string',
    'target.key_prefix' = 'targets:last:', 'target.key_column' = 'content_id', 'target.ttl_secs' = '3600'
);
INSERT INTO last_event SELECT content_id, id, event_type FROM engagement_events WHERE _op = 'c' AND content_id IS NOT NULL;

CREATE TABLE by_device WITH (
    connector = 'redis', address = '${ENGAGE_REDIS_URL}', target = 'hash',
    'target.key_prefix' = 'targets:device:', 'target.key_column' = 'content_id', 'target.field_column' = 'device'
);
INSERT INTO by_device SELECT content_id, device, id FROM engagement_events WHERE _op = 'c' AND content_id IS NOT NULL;
"#;

#[tokio::test(flavor = "multi_thread")]
async fn string_and_hash_targets_keep_the_latest_row_per_key_and_field() {
    let world = World::start().await;
    let client = world.sql().await;
    generate::ensure_schema(&client).await.unwrap();
    let content = generate::seed_content(&client, 3, 11).await.unwrap();
    let sql = world.root.path().join("targets.sql");
    std::fs::write(&sql, JOB_SQL).unwrap();
    let mut job = world.start_job_sql(&["run"], sql.to_str().unwrap(), "0.3");
    support::wait_started_as(&world, &mut job, "targets").await;

    let a = &content[0].id;
    let mut ids = Vec::new();
    for device in ["ios", "web-chrome", "ios"] {
        let row = client
            .query_one(
                "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms, device)
                 VALUES ($1::text::uuid, 'click', now(), 10, $2) RETURNING id",
                &[a, &device],
            )
            .await
            .unwrap();
        ids.push(row.get::<_, i64>(0));
    }
    let mut redis = world.redis().await;
    let key = format!("targets:last:{a}");
    wait_for(
        "the last event of the content",
        Duration::from_secs(30),
        || {
            let mut redis = redis.clone();
            let key = key.clone();
            let last = ids[2];
            async move {
                let value: Option<String> = redis.get(&key).await.unwrap();
                value.is_some_and(|v| {
                    serde_json::from_str::<serde_json::Value>(&v).unwrap()["id"] == last
                })
            }
        },
    )
    .await;
    let ttl: i64 = redis.ttl(&key).await.unwrap();
    assert!(ttl > 3000 && ttl <= 3600, "ttl {ttl}");

    let hash: std::collections::BTreeMap<String, String> =
        redis.hgetall(format!("targets:device:{a}")).await.unwrap();
    let id_of = |device: &str| {
        serde_json::from_str::<serde_json::Value>(&hash[device]).unwrap()["id"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(hash.len(), 2, "{hash:?}");
    assert_eq!(id_of("ios"), ids[2], "a field holds the newest row");
    assert_eq!(id_of("web-chrome"), ids[1]);
    job.stop();
}
