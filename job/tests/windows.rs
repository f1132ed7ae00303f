//! Windowed outputs of the mission pipeline against an oracle computed in
//! Postgres from the same events: the 10-minute hop rankings (with deletes
//! and updates retracting), the content-type hash, the 1-minute KPI window
//! (closed by the idle watermark), late events, and a restore mid-window.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use engage::generate;
use redis::AsyncCommands;
use support::{wait_for, wait_started, World};

/// Inserts `count` events per content item (round robin) at `at` (a SQL
/// timestamp expression), in one transaction.
async fn insert_events(client: &tokio_postgres::Client, items: &[String], count: usize, at: &str) {
    let mut values = Vec::new();
    for i in 0..count * items.len() {
        let item = &items[i % items.len()];
        let kind = ["play", "pause", "finish", "click"][i % 4];
        let device = ["ios", "android", "web-chrome"][i % 3];
        let duration = if i % 7 == 0 {
            "NULL".to_string()
        } else {
            format!("{}", 1_000 + (i * 37) % 90_000)
        };
        values.push(format!(
            "('{item}', md5('u{}')::uuid, '{kind}', {at}, {duration}, '{device}', '{{}}')",
            i % 5
        ));
    }
    client
        .batch_execute(&format!(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) VALUES {}",
            values.join(",")
        ))
        .await
        .unwrap();
}

/// content_id -> score, as Postgres computes it for the last 10 minutes.
async fn expected_top_content(client: &tokio_postgres::Client) -> BTreeMap<String, f64> {
    client
        .query(
            "SELECT content_id::text, coalesce(sum(duration_ms), 0)::float8 / 1000.0 FROM engagement_events
             WHERE content_id IS NOT NULL AND event_ts > now() - interval '9 minutes' GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn sorted_set(world: &World, key: &str) -> BTreeMap<String, f64> {
    let mut redis = world.redis().await;
    let members: Vec<(String, f64)> = redis.zrange_withscores(key, 0, -1).await.unwrap();
    members.into_iter().collect()
}

fn close(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && (va - vb).abs() < 1e-6)
}

async fn wait_for_ranking(world: &World, client: &tokio_postgres::Client, job: &support::Job) {
    let expected = expected_top_content(client).await;
    let mut last = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        last = sorted_set(world, "engage:top_content:10m").await;
        if close(&last, &expected) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "top_content never matched the oracle\nexpected {expected:?}\nlast     {last:?}\n{}",
        job.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn windows_match_the_oracle_with_retractions_late_events_and_a_restore() {
    let world = World::start().await;
    let client = world.sql().await;
    generate::ensure_schema(&client).await.unwrap();
    let items: Vec<String> = generate::seed_content(&client, 6, 5)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let mut job = world.start_job(&["run"]);
    wait_started(&world, &mut job).await;

    // Two bursts in two whole past minutes (M-3 and M-2): their 1-minute KPI
    // windows close as soon as the source is idle (the wall clock drives the
    // watermark), and no window of the present minute can close during the
    // checks. Pinned once: `now()` in an oracle query could be a minute later.
    let row = client
        .query_one(
            "SELECT (date_trunc('minute', now()) - interval '3 minutes' + interval '10 seconds')::text,
                    (date_trunc('minute', now()) - interval '2 minutes' + interval '10 seconds')::text",
            &[],
        )
        .await
        .unwrap();
    let (first, second): (String, String) = (row.get(0), row.get(1));
    let earlier = &format!("'{first}'::timestamptz");
    let minute = &format!("'{second}'::timestamptz");
    insert_events(&client, &items, 5, earlier).await;
    insert_events(&client, &items[..3], 4, minute).await;
    wait_for_ranking(&world, &client, &job).await;

    // Devices and content types agree with Postgres too.
    let devices: BTreeMap<String, f64> = client
        .query(
            "SELECT coalesce(device, 'unknown'), count(*)::float8 FROM engagement_events GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Each query writes its own window: wait for this one too.
    wait_for("the device ranking", Duration::from_secs(30), || async {
        close(
            &sorted_set(&world, "engage:top_devices:10m").await,
            &devices,
        )
    })
    .await;
    let types: BTreeMap<String, f64> = client
        .query(
            "SELECT coalesce(c.content_type, 'unknown'), coalesce(sum(e.duration_ms), 0)::float8 / 1000.0
             FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut redis = world.redis().await;
    wait_for("the content-type hash", Duration::from_secs(30), || {
        let mut redis = redis.clone();
        let types = types.clone();
        async move {
            let hash: BTreeMap<String, String> =
                redis.hgetall("engage:content_type:10m").await.unwrap();
            let hash: BTreeMap<String, f64> = hash
                .into_iter()
                .map(|(k, v)| (k, v.parse().unwrap()))
                .collect();
            close(&hash, &types)
        }
    })
    .await;

    // The latest closed 1-minute KPI window (M-2) in Redis; both in Parquet.
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE event_type = 'play'), count(DISTINCT user_id),
                        coalesce(sum(duration_ms), 0)::float8 / 1000.0
                 FROM engagement_events WHERE date_trunc('minute', event_ts) = date_trunc('minute', {minute})"
            ),
            &[],
        )
        .await
        .unwrap();
    let (events, plays, users, seconds): (i64, i64, i64, f64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let kpi: BTreeMap<String, String> = redis.hgetall("engage:kpi:1m").await.unwrap();
        if kpi.get("events") == Some(&events.to_string()) {
            break;
        }
        if std::time::Instant::now() > deadline {
            let keys: Vec<String> = redis.keys("*").await.unwrap();
            panic!(
                "no 1-minute KPI: {kpi:?} (expected {events} events); keys {keys:?}\n{}",
                job.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kpi: BTreeMap<String, String> = redis.hgetall("engage:kpi:1m").await.unwrap();
    assert_eq!(kpi["plays"], plays.to_string());
    assert_eq!(kpi["distinct_users"], users.to_string());
    assert!((kpi["engagement_seconds"].parse::<f64>().unwrap() - seconds).abs() < 1e-6);
    wait_for(
        "the 1-minute KPI in parquet",
        Duration::from_secs(30),
        || async {
            world
                .query_i64("SELECT events FROM kpi WHERE timeframe = '1m' ORDER BY window_start")
                .await
                == vec![vec![Some(5 * items.len() as i64)], vec![Some(events)]]
        },
    )
    .await;

    // Deletes and updates take their old contribution back.
    client
        .batch_execute(&format!(
            "DELETE FROM engagement_events WHERE id IN (SELECT id FROM engagement_events WHERE content_id = '{}' LIMIT 2);
             UPDATE engagement_events SET duration_ms = 500000 WHERE id = (SELECT max(id) FROM engagement_events WHERE content_id = '{}');",
            items[0], items[1]
        ))
        .await
        .unwrap();
    wait_for_ranking(&world, &client, &job).await;

    // A late event (an hour old) changes nothing, and is kept in late_events.
    insert_events(&client, &items[..1], 1, "now() - interval '1 hour'").await;
    wait_for(
        "the late event in late_events",
        Duration::from_secs(30),
        || async {
            world
                .query_i64("SELECT count(*) FROM late_events WHERE \"table\" = 'engagement_events'")
                .await
                == vec![vec![Some(1)]]
        },
    )
    .await;
    client
        .batch_execute(
            "DELETE FROM engagement_events WHERE event_ts < now() - interval '30 minutes'",
        )
        .await
        .unwrap();

    // Kill the job mid-window; the restored state plus new events still match.
    let epoch = world.latest_checkpoint();
    wait_for("a checkpoint", Duration::from_secs(30), || async {
        world.latest_checkpoint() > epoch
    })
    .await;
    insert_events(&client, &items[2..], 3, "now()").await;
    job.kill_9();
    let job = world.start_job(&["run"]);
    insert_events(&client, &items, 2, "now()").await;
    wait_for_ranking(&world, &client, &job).await;
    job.stop();
}

const TOP_TWO_SQL: &str = r#"
CREATE TABLE engagement_events (
    id BIGINT, content_id TEXT, event_ts TIMESTAMP, duration_ms INT,
    PRIMARY KEY (id),
    WATERMARK FOR event_ts AS event_ts - INTERVAL '100 milliseconds'
) WITH (connector = 'postgres-cdc', connection = '${ENGAGE_POSTGRES_URL}', table = 'public.engagement_events');

CREATE TABLE top_two WITH (
    connector = 'redis', address = '${ENGAGE_REDIS_URL}', target = 'sorted_set',
    'target.key_prefix' = 'ties:top_two', 'target.member_column' = 'content_id', 'target.score_column' = 'events'
);
INSERT INTO top_two
SELECT content_id, events FROM (
    SELECT content_id, events, ROW_NUMBER() OVER (PARTITION BY window ORDER BY events DESC, content_id) AS rank
    FROM (
        SELECT hop(INTERVAL '500 milliseconds', INTERVAL '1 minute') AS window, content_id, count(*) AS events
        FROM engagement_events WHERE content_id IS NOT NULL
        GROUP BY window, content_id
    )
) WHERE rank <= 2;
"#;

#[tokio::test(flavor = "multi_thread")]
async fn top_n_breaks_ties_by_the_order_by_columns() {
    let world = World::start().await;
    let client = world.sql().await;
    generate::ensure_schema(&client).await.unwrap();
    let mut items: Vec<String> = generate::seed_content(&client, 4, 9)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let sql = world.root.path().join("ties.sql");
    std::fs::write(&sql, TOP_TWO_SQL).unwrap();
    let mut job = world.start_job_sql(&["run"], sql.to_str().unwrap(), "0.3");
    support::wait_started_as(&world, &mut job, "ties").await;
    // Three items tie with 2 events each; the fourth has 1.
    insert_events(&client, &items[..3], 2, "now()").await;
    insert_events(&client, &items[3..], 1, "now()").await;
    items[..3].sort();
    let expected: BTreeMap<String, f64> = items[..2].iter().map(|id| (id.clone(), 2.0)).collect();
    let mut last = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        last = sorted_set(&world, "ties:top_two").await;
        if close(&last, &expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last,
        expected,
        "ties go to the smallest content ids\n{}",
        job.log_tail()
    );
    job.stop();
}
