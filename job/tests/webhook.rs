//! The webhook sink (`sql/examples/webhook.sql`) against a real HTTP server
//! on loopback, started by the test: every finished play arrives, a batch
//! keeps its `webhook-id` and its rows across kill -9 and replay, signatures
//! verify with an independent implementation (PyPI's `standardwebhooks`),
//! 5xx and 429 are retried (after `Retry-After`), and a 400 sends the batch's
//! rows to `dead_letter`; a replay sends no row under a new id.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::receiver::*;
use support::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const EXAMPLE_SQL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/examples/webhook.sql");

/// Runs PyPI's `standardwebhooks` over every request received: each
/// signature must verify with the secret.
fn verify_with_standardwebhooks(requests: &[Received], dir: &Path) {
    let file = dir.join("requests.json");
    std::fs::write(&file, serde_json::to_vec(requests).unwrap()).unwrap();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
hook = Webhook(sys.argv[1])
requests = json.load(open(sys.argv[2]))
for r in requests:
    hook.verify(r["body"], {"webhook-id": r["id"], "webhook-timestamp": r["timestamp"],
                            "webhook-signature": r["signature"]})
print(len(requests))
"#;
    let output = std::process::Command::new(test_python())
        .args(["-c", script, SECRET, file.to_str().unwrap()])
        .output()
        .expect("the test Python runs");
    assert!(
        output.status.success(),
        "standardwebhooks refused a signature: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        requests.len().to_string()
    );
}

/// The webhook job's SQL (named `webhook`, as the example) in the world's
/// directory, with `batch_size` rows per request.
fn job_sql(world: &World, batch_size: usize) -> PathBuf {
    let sql = std::fs::read_to_string(EXAMPLE_SQL).unwrap().replace(
        "'webhook.batch_size' = '100'",
        &format!("'webhook.batch_size' = '{batch_size}'"),
    );
    let path = world.data_dir().parent().unwrap().join("webhook.sql");
    std::fs::write(&path, sql).unwrap();
    path
}

fn start(world: &World, sql: &Path, receiver: &Receiver) -> Job {
    start_as(world, &["run"], sql, receiver)
}

fn start_as(world: &World, subcommand: &[&str], sql: &Path, receiver: &Receiver) -> Job {
    world.start_job_env(
        subcommand,
        sql.to_str().unwrap(),
        "0.3",
        &[
            ("ENGAGE_WEBHOOK_URL", receiver.url.as_str()),
            ("ENGAGE_WEBHOOK_SECRET", SECRET),
        ],
    )
}

/// Inserts `transactions` transactions of 1 to 20 events, a quarter of them
/// finished plays, `device` set to `refuse` on those `refuse` picks.
async fn insert_events(
    world: &World,
    transactions: usize,
    pause: Duration,
    refuse: fn(usize) -> bool,
) {
    let client = world.sql().await;
    for t in 0..transactions {
        let rows = 1 + (t * 7) % 20;
        let device = if refuse(t) { "refuse" } else { "ios" };
        client
            .batch_execute(&format!(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
                 SELECT (SELECT id FROM content ORDER BY id LIMIT 1), gen_random_uuid(),
                        (ARRAY['play','pause','finish','click'])[1 + (g % 4)], now(), 1000 * g, '{device}'
                 FROM generate_series(1, {rows}) g"
            ))
            .await
            .unwrap();
        tokio::time::sleep(pause).await;
    }
}

async fn finished_ids(world: &World, device: &str) -> BTreeSet<i64> {
    let client = world.sql().await;
    client
        .query(
            "SELECT id FROM engagement_events WHERE event_type = 'finish' AND device = $1",
            &[&device],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn wait_delivered(receiver: &Receiver, job: &mut Job, expected: &BTreeSet<i64>) {
    wait_for(
        "every finished play delivered",
        Duration::from_secs(90),
        || {
            job.assert_running();
            let got: BTreeSet<i64> = receiver.accepted().into_values().flatten().collect();
            let done = expected.is_subset(&got);
            async move { done }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_finished_play_arrives_once_per_webhook_id_across_kill_9() {
    let world = World::start().await;
    seed_for_oracle(&world, 10, 3).await;
    // A slow endpoint (4 requests in flight of 100 ms each: 40 batches/s,
    // fewer than the load makes), so batches are in flight when the job is killed.
    let receiver = start_receiver(Script {
        delay: Duration::from_millis(100),
        ..Script::default()
    })
    .await;
    let sql = job_sql(&world, 5);
    let mut job = Some(start(&world, &sql, &receiver));
    wait_started_as(&world, job.as_mut().unwrap(), "webhook").await;
    let load = insert_events(&world, 300, Duration::from_millis(10), |_| false);
    let kills = async {
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            job.take().unwrap().kill_9();
            job = Some(start(&world, &sql, &receiver));
        }
    };
    tokio::join!(load, kills);
    let mut job = job.unwrap();
    let expected = finished_ids(&world, "ios").await;
    assert!(expected.len() > 300, "{}", expected.len());
    wait_delivered(&receiver, &mut job, &expected).await;
    job.stop();

    let accepted = receiver.accepted();
    let mut seen: BTreeMap<i64, &String> = BTreeMap::new();
    for (id, rows) in &accepted {
        assert!(!rows.is_empty() && rows.len() <= 5, "batch {id}: {rows:?}");
        for row in rows {
            if let Some(other) = seen.insert(*row, id) {
                panic!("event {row} was sent in batches {other} and {id}");
            }
        }
    }
    let delivered: BTreeSet<i64> = seen.keys().copied().collect();
    assert_eq!(delivered, expected, "finished plays after de-duplication");
    let requests = receiver.received();
    println!(
        "{} requests, {} distinct ids, {} rows",
        requests.len(),
        accepted.len(),
        delivered.len()
    );
    // The kills left batches to send again (else this test proves nothing
    // about ids across a replay).
    assert!(requests.len() > accepted.len(), "no batch was sent twice");

    // `engage replay` from the oldest checkpoint sends no row under a new id
    // (the sink holds every row up to its position, so it sends none).
    let oldest = std::fs::read_dir(world.checkpoint_dir().join("webhook"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("epoch-")?
                .parse::<u64>()
                .ok()
        })
        .min()
        .unwrap();
    let last = world.latest_checkpoint_of("webhook");
    let from = oldest.to_string();
    let mut replay = start_as(
        &world,
        &["replay", "--from-checkpoint", &from],
        &sql,
        &receiver,
    );
    wait_for(
        "a checkpoint after the replay",
        Duration::from_secs(60),
        || {
            replay.assert_running();
            let newer = world.latest_checkpoint_of("webhook") > last;
            async move { newer }
        },
    )
    .await;
    replay.stop();
    assert_eq!(
        receiver.accepted().keys().collect::<Vec<_>>(),
        accepted.keys().collect::<Vec<_>>(),
        "the replay sent a batch under a new id"
    );
    verify_with_standardwebhooks(&requests, &world.data_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_and_429_are_retried_and_a_400_goes_to_dead_letter() {
    let world = World::start().await;
    seed_for_oracle(&world, 10, 4).await;
    let receiver = start_receiver(Script {
        statuses: vec![500, 503, 429],
        ..Script::default()
    })
    .await;
    let sql = job_sql(&world, 1);
    // One request at a time, so the scripted answers meet one batch in turn.
    let text = std::fs::read_to_string(&sql).unwrap().replace(
        "'webhook.batch_size' = '1'",
        "'webhook.batch_size' = '1',\n    'webhook.max_in_flight' = '1'",
    );
    std::fs::write(&sql, text).unwrap();
    let mut job = start(&world, &sql, &receiver);
    wait_started_as(&world, &mut job, "webhook").await;
    insert_events(&world, 40, Duration::from_millis(20), |t| t % 10 == 3).await;
    let expected = finished_ids(&world, "ios").await;
    let refused = finished_ids(&world, "refuse").await;
    assert!(!refused.is_empty());
    wait_delivered(&receiver, &mut job, &expected).await;
    // Refused rows reach dead_letter at the checkpoint after the refusal.
    wait_for(
        "refused rows in dead_letter",
        Duration::from_secs(30),
        || {
            job.assert_running();
            let sql = sql.clone();
            let count = refused.len();
            async move {
                std::fs::read_dir(sql.parent().unwrap().join("data/webhook/dead_letter"))
                    .map(|dir| {
                        dir.filter_map(Result::ok)
                            .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
                            .count()
                    })
                    .unwrap_or(0)
                    >= count
            }
        },
    )
    .await;
    job.stop();

    let requests = receiver.received();
    // The first three answers were 500, 503 and 429 (Retry-After: 1): the
    // same batch came again each time, and not sooner than a second after the 429.
    assert_eq!(
        requests[..4].iter().map(|r| r.status).collect::<Vec<_>>()[..3],
        [500, 503, 429]
    );
    assert!(
        requests[..4].iter().all(|r| r.id == requests[0].id),
        "{requests:?}"
    );
    assert!(requests[3].at - requests[2].at >= Duration::from_secs(1));
    // One object per request with batch_size 1.
    assert!(requests.iter().all(|r| r.body.starts_with('{')));

    std::env::set_var("ENGAGE_DATA_DIR", world.data_dir());
    let dead = dead_letters(&sql).await;
    let dead_ids: BTreeSet<i64> = dead
        .iter()
        .map(|(reason, row)| {
            assert_eq!(reason, "webhook_rejected:400");
            assert_eq!(row["status"], 400);
            assert_eq!(row["response"], "device `refuse` is not accepted");
            row["row"]["id"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(dead_ids, refused, "refused rows in dead_letter, once each");
    assert_eq!(dead.len(), refused.len());
    verify_with_standardwebhooks(&requests, &world.data_dir());
}
