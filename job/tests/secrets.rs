//! No secret in any output: the mission pipeline plus a webhook sink, run
//! with a password in the Postgres and Redis URLs, a Kafka SASL password, a
//! webhook URL with credentials, a bearer token header, a signing secret and
//! an HTTP API token. The job's whole log (at debug level, through retried
//! webhook requests), every checkpoint file, `/api/pipeline`, `/metrics`,
//! `engage checkpoints` and `engage run --help` are searched for each secret.

mod support;

use std::path::Path;
use std::time::Duration;

use support::receiver::*;
use support::*;

const PG_PASSWORD: &str = "pg-S3cr3t-9f1";
const REDIS_PASSWORD: &str = "rd-S3cr3t-4c2";
const KAFKA_PASSWORD: &str = "kf-S3cr3t-7d3";
const URL_PASSWORD: &str = "wh-S3cr3t-2b8";
const BEARER: &str = "tok-S3cr3t-5e6";
const SIGNING: &str = "S3cr3tU2lnbmluZ0tleUZvclRlc3RzAA";
const HTTP_TOKEN: &str = "http-S3cr3t-1a0";

fn secrets() -> [&'static str; 7] {
    [
        PG_PASSWORD,
        REDIS_PASSWORD,
        KAFKA_PASSWORD,
        URL_PASSWORD,
        BEARER,
        SIGNING,
        HTTP_TOKEN,
    ]
}

/// Fails if any secret appears in `text`, naming where.
fn assert_no_secret(what: &str, text: &str) {
    for secret in secrets() {
        assert!(!text.contains(secret), "{what} shows the secret `{secret}`");
    }
}

/// Every file under `dir`, as bytes read lossily as text.
fn all_files(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            all_files(&path, out);
        } else {
            let bytes = std::fs::read(&path).unwrap_or_default();
            out.push((
                path.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
}

/// The mission SQL with a webhook sink of finished plays added, its URL,
/// header and secret from the environment.
fn job_sql(world: &World) -> std::path::PathBuf {
    let mut sql = std::fs::read_to_string(MISSION_SQL).unwrap();
    sql = sql.replace(
        "    'sink.key_field'  = 'content_id'\n",
        "    'sink.key_field'  = 'content_id',\n    'kafka.sasl.password' = '${KAFKA_PASSWORD}'\n",
    );
    sql.push_str(
        "
CREATE TABLE finished_plays WITH (
    connector = 'webhook',
    endpoint  = '${HOOK_URL}',
    headers   = 'Authorization: Bearer ${HOOK_TOKEN}',
    'webhook.secret' = '${HOOK_SECRET}'
);
INSERT INTO finished_plays SELECT id, content_id, event_type, _lsn, _seq
FROM enriched WHERE event_type = 'finish' AND _op = 'c';
",
    );
    let path = world.data_dir().parent().unwrap().join("engagement.sql");
    std::fs::write(&path, sql).unwrap();
    path
}

async fn get(url: &str) -> String {
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(HTTP_TOKEN)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{url}");
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_a_log_a_checkpoint_the_api_or_the_cli() {
    let world = World::start().await;
    seed_for_oracle(&world, 10, 5).await;
    // Redis asks for a password; Postgres trusts loopback here, so the URL's
    // password is carried (and must stay hidden) without being checked.
    let mut redis = world.redis().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(REDIS_PASSWORD)
        .query_async(&mut redis)
        .await
        .unwrap();
    let redis_url =
        world
            .redis
            .url()
            .replacen("redis://", &format!("redis://:{REDIS_PASSWORD}@"), 1);
    let postgres_url = world
        .postgres_url
        .replacen("@", &format!(":{PG_PASSWORD}@"), 1);
    assert!(postgres_url.contains(PG_PASSWORD), "{postgres_url}");
    // Two 500s first, so the job logs retries.
    let receiver = start_receiver(Script {
        statuses: vec![500, 500],
        ..Script::default()
    })
    .await;
    let hook_url = receiver
        .url
        .replacen("http://", &format!("http://hook:{URL_PASSWORD}@"), 1);
    let signing = format!("whsec_{SIGNING}");
    let port = engage::embedded::free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http_addr = format!("127.0.0.1:{port}");
    let sql = job_sql(&world);
    let env = [
        ("ENGAGE_POSTGRES_URL", postgres_url.as_str()),
        ("ENGAGE_REDIS_URL", redis_url.as_str()),
        ("KAFKA_PASSWORD", KAFKA_PASSWORD),
        ("HOOK_URL", hook_url.as_str()),
        ("HOOK_TOKEN", BEARER),
        ("HOOK_SECRET", signing.as_str()),
        ("ENGAGE_HTTP_ADDR", http_addr.as_str()),
        ("ENGAGE_HTTP_TOKEN", HTTP_TOKEN),
    ];
    let mut job = world.start_job_env(&["run"], sql.to_str().unwrap(), "0.3", &env);
    wait_started(&world, &mut job).await;
    engage::chaos::workload::Workload::start(
        &world.postgres_url,
        engage::chaos::workload::WorkloadOptions::mixed(Some(2_000), 2_000, 5, 10),
    )
    .wait_done()
    .await
    .unwrap();
    wait_caught_up(&world, &mut job).await;
    wait_for("finished plays delivered", Duration::from_secs(60), || {
        job.assert_running();
        let delivered = !receiver.accepted().is_empty();
        async move { delivered }
    })
    .await;
    let requests = receiver.received();
    assert!(requests.iter().any(|r| r.status == 500));
    let pipeline = get(&format!("{base}/api/pipeline")).await;
    let metrics = get(&format!("{base}/metrics")).await;
    let log_path = job.log.clone();
    job.stop();

    let log = std::fs::read_to_string(&log_path).unwrap();
    // The outputs searched do describe the sinks holding the secrets.
    assert!(log.contains("retrying"), "the webhook retries are logged");
    assert!(log.contains("sink=finished_plays") && pipeline.contains("finished_plays"));
    assert_no_secret("the job's log", &log);
    assert_no_secret("/api/pipeline", &pipeline);
    assert_no_secret("/metrics", &metrics);
    let mut files = Vec::new();
    all_files(&world.checkpoint_dir(), &mut files);
    assert!(files.len() > 3);
    for (path, text) in &files {
        assert_no_secret(path, text);
    }
    for args in [
        vec!["checkpoints", sql.to_str().unwrap(), "--all"],
        vec!["run", "--help"],
    ] {
        let mut command = world.engage(&args);
        command
            .args(["--checkpoint-dir", world.checkpoint_dir().to_str().unwrap()])
            .envs(env);
        if args[0] == "run" {
            command.env_remove("ENGAGE_HTTP_ADDR");
        }
        let output = command.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "engage {args:?}: {text}");
        assert_no_secret(&format!("engage {}", args.join(" ")), &text);
    }
}
