//! The operator surface against a running job on real Postgres, Redis and
//! Kafka: status codes, `/metrics` parsed by Prometheus' own Python parser,
//! counters equal to the events generated, the API's top content equal to the
//! Redis sorted set, tokens, and the dashboard in real headless Chromium.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use engage::generate::{self, GenerateOptions, GenerateProgress};
use redis::AsyncCommands;
use support::{wait_caught_up, wait_for, wait_started, World};

const TOP_KEY: &str = "engage:top_content:10m";

/// Starts `engage run` on the mission SQL with its HTTP server on a free
/// loopback port, with `env` added; returns the job and the server's base URL.
fn start_http_job(world: &World, env: &[(&str, &str)]) -> (support::Job, String) {
    let port = engage::embedded::free_port().expect("a free port");
    let addr = format!("127.0.0.1:{port}");
    let mut all = vec![("ENGAGE_HTTP_ADDR", addr.as_str())];
    all.extend_from_slice(env);
    let job = world.start_job_env(&["run"], support::MISSION_SQL, "0.3", &all);
    (job, format!("http://{addr}"))
}

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut request = client.get(url).timeout(Duration::from_secs(10));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(error) => (0, error.to_string()),
    }
}

async fn get_json(url: &str) -> serde_json::Value {
    let (status, body) = get(url, None).await;
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"))
}

async fn generate(world: &World, count: u64, rate: Option<u64>) -> u64 {
    let options = GenerateOptions {
        count: Some(count),
        rate,
        content_items: 50,
        ..GenerateOptions::default()
    };
    let report = generate::run(
        &world.postgres_url,
        options,
        std::sync::Arc::new(GenerateProgress::default()),
        std::future::pending(),
    )
    .await
    .unwrap();
    report.events
}

/// Parses Prometheus text with the official Python client's parser and
/// returns `{sample name + labels: value}` as JSON.
fn parse_with_prometheus_client(text: &str) -> serde_json::Value {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
        out[f"{sample.name}{{{labels}}}"] = sample.value
print(json.dumps(out))
"#;
    let python = support::test_python();
    let mut child = Command::new(&python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): run scripts/install-deps.sh --test, which installs prometheus_client there",
                python.display()
            )
        });
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "prometheus_client rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_serve_health_metrics_and_the_api_of_a_running_job() {
    let world = World::start().await;
    generate::ensure_schema(&world.sql().await).await.unwrap();
    let (mut job, base) = start_http_job(&world, &[]);
    wait_started(&world, &mut job).await;
    let (status, body) = get(&format!("{base}/health"), None).await;
    assert_eq!(status, 200, "{body}");

    let events = generate(&world, 3_000, None).await;
    // One bad row, for the dead-letter endpoint.
    world
        .sql()
        .await
        .batch_execute(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
             VALUES (NULL, gen_random_uuid(), 'play', now(), 1000, 'ios')",
        )
        .await
        .unwrap();
    wait_caught_up(&world, &mut job).await;
    wait_for("the job to be ready", Duration::from_secs(30), || async {
        get(&format!("{base}/ready"), None).await.0 == 200
    })
    .await;

    // Metrics, through Prometheus' own parser.
    let (status, text) = get(&format!("{base}/metrics"), None).await;
    assert_eq!(status, 200);
    let metrics = parse_with_prometheus_client(&text);
    let value = |key: &str| {
        metrics[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing from /metrics:\n{text}"))
    };
    assert_eq!(
        value("engage_source_changes_total{op=c,table=engagement_events}"),
        (events + 1) as f64
    );
    assert_eq!(
        value("engage_sink_rows_total{sink=enriched_events}"),
        events as f64
    );
    assert_eq!(
        value("engage_dead_letters_total{reason=content_missing}"),
        1.0
    );
    assert!(value("engage_commit_to_visible_seconds_count{sink=recent_events}") >= events as f64);
    assert!(
        value("engage_commit_to_visible_seconds_count{sink=enriched_events_topic}")
            >= events as f64
    );
    assert!(value("engage_checkpoints_total{}") >= 1.0);
    assert!(value("engage_resident_memory_bytes{}") > 0.0);
    assert!(value("engage_checkpoint_duration_seconds_count{}") >= 1.0);

    // The top content equals the Redis sorted set, with Postgres' titles.
    wait_for(
        "a 10-minute window to close",
        Duration::from_secs(30),
        || async { get(&format!("{base}/api/top-content"), None).await.0 == 200 },
    )
    .await;
    let mut redis = world.redis().await;
    let top: serde_json::Value = get_json(&format!("{base}/api/top-content?limit=10")).await;
    let expected: Vec<(String, f64)> = redis.zrevrange_withscores(TOP_KEY, 0, 9).await.unwrap();
    let items = top["items"].as_array().unwrap();
    assert_eq!(items.len(), expected.len().min(10), "{top}");
    let client = world.sql().await;
    for (item, (id, score)) in items.iter().zip(&expected) {
        assert_eq!(item["content_id"].as_str().unwrap(), id, "{top}");
        assert!(
            (item["score"].as_f64().unwrap() - score).abs() < 1e-6,
            "{top}"
        );
        let title: String = client
            .query_one("SELECT title FROM content WHERE id::text = $1", &[id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(item["title"].as_str(), Some(title.as_str()));
    }
    assert!(top["window_start"].as_str().is_some() && top["window_end"].as_str().is_some());

    let pipeline = get_json(&format!("{base}/api/pipeline")).await;
    let tables = pipeline["source"]["tables"].as_array().unwrap();
    let events_table = tables
        .iter()
        .find(|t| t["table"] == "engagement_events")
        .unwrap();
    assert_eq!(
        events_table["changes"]["c"].as_u64(),
        Some(events + 1),
        "{pipeline}"
    );
    let recent = pipeline["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "recent_events")
        .unwrap();
    assert!(
        recent["freshness_p99_seconds"].as_f64().is_some(),
        "{recent}"
    );
    assert_eq!(recent["state"], "ok");

    let dead = get_json(&format!("{base}/api/dead-letters?limit=5")).await;
    assert_eq!(dead["newest"][0]["reason"], "content_missing", "{dead}");
    assert!(dead["newest"][0]["position"].as_str().is_some(), "{dead}");

    let kpi = get_json(&format!("{base}/api/kpi")).await;
    for timeframe in ["1m", "15m", "1h", "24h"] {
        assert!(kpi["timeframes"].get(timeframe).is_some(), "{kpi}");
    }

    // Any windowed sink, as its rows were written; unknown tables are named.
    let devices = get_json(&format!("{base}/api/windows/top_devices?limit=2")).await;
    let newest = &devices["windows"][0];
    let mut expected: Vec<(String, f64)> = redis
        .zrevrange_withscores("engage:top_devices:10m", 0, -1)
        .await
        .unwrap();
    let mut served: Vec<(String, f64)> = newest["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["device"].as_str().unwrap().to_string(),
                row["events"].as_f64().unwrap(),
            )
        })
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    served.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(served, expected, "{devices}");
    let (status, body) = get(&format!("{base}/api/windows/nope"), None).await;
    assert_eq!(status, 404);
    assert!(body.contains("top_devices"), "{body}");

    let generator = get_json(&format!("{base}/api/generator")).await;
    assert_eq!(generator["available"], false, "{generator}");

    let (status, body) = get(&format!("{base}/api/nothing"), None).await;
    assert_eq!(status, 404);
    assert!(body.contains("\"error\""), "{body}");
    let (status, page) = get(&format!("{base}/"), None).await;
    assert_eq!(status, 200);
    assert!(page.contains("EventSource"), "the dashboard page");
    job.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_guards_everything_but_health_and_a_public_bind_needs_one() {
    let world = World::start().await;
    generate::ensure_schema(&world.sql().await).await.unwrap();
    // Off loopback without a token: refused before anything starts.
    let output = world
        .engage(&["run", support::MISSION_SQL, "--http", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--http-token"), "{stderr}");

    let (mut job, base) = start_http_job(&world, &[("ENGAGE_HTTP_TOKEN", "s3cret")]);
    wait_started(&world, &mut job).await;
    assert_eq!(get(&format!("{base}/health"), None).await.0, 200);
    for path in ["/metrics", "/ready", "/api/pipeline", "/"] {
        let (status, body) = get(&format!("{base}{path}"), None).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(get(&format!("{base}{path}"), Some("wrong")).await.0, 401);
        assert_eq!(
            get(&format!("{base}{path}"), Some("s3cret")).await.0,
            200,
            "{path}"
        );
    }
    let (status, _) = get(&format!("{base}/api/pipeline?access_token=s3cret"), None).await;
    assert_eq!(status, 200);
    job.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_generator_is_paused_and_paced_from_the_api() {
    let root = tempfile::tempdir().unwrap();
    let port = engage::embedded::free_port().expect("a free port");
    let base = format!("http://127.0.0.1:{port}");
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_engage"))
        .args([
            "demo",
            "--rate",
            "300",
            "--duration",
            "120",
            "--content-items",
            "50",
        ])
        .args(["--http", &format!("127.0.0.1:{port}")])
        .args(["--checkpoint-dir", "checkpoints", "--data-dir", "data"])
        .env_remove("ENGAGE_POSTGRES_URL")
        .env_remove("ENGAGE_REDIS_URL")
        .env_remove("ENGAGE_KAFKA_BROKERS")
        .env_remove("ENGAGE_DATA_DIR")
        .current_dir(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let events = || async {
        let (status, body) = get(&format!("{base}/api/generator"), None).await;
        if status != 200 {
            return None;
        }
        let state: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(state["available"], true, "{state}");
        state["events"].as_u64()
    };
    wait_for(
        "the demo's generator to write events",
        Duration::from_secs(90),
        || async { events().await.is_some_and(|n| n > 0) },
    )
    .await;
    let post = |body: &'static str| {
        let url = format!("{base}/api/generator");
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (status, body) = post(r#"{"running": false}"#).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"running\":false"), "{body}");
    // A batch in flight may still land; then nothing more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused_at = events().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(events().await.unwrap(), paused_at, "events while paused");
    let (status, body) = post(r#"{"rate": 0}"#).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(r#"{"running": true, "rate": 1000}"#).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"rate\":1000"), "{body}");
    wait_for("events after resuming", Duration::from_secs(10), || async {
        events().await.unwrap() > paused_at + 500
    })
    .await;
    // SIGTERM: the demo stops its generator, the job and its servers.
    engage::harness::sigterm(demo.id().unwrap()).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), demo.wait())
        .await
        .expect("the demo stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// Chromium and playwright-core, as scripts/install-deps.sh --test installs them.
fn browser_tools() -> (PathBuf, PathBuf) {
    let chromium = std::env::var_os("ENGAGE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let node_modules =
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/engage/node/node_modules");
    assert!(
        chromium.exists() && node_modules.join("playwright-core").exists(),
        "the dashboard test needs Debian's chromium and playwright-core: run scripts/install-deps.sh --test"
    );
    (chromium, node_modules)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_renders_updates_and_shows_when_the_job_is_gone_in_chromium() {
    let (chromium, node_modules) = browser_tools();
    let world = World::start().await;
    generate::ensure_schema(&world.sql().await).await.unwrap();
    let (mut job, base) = start_http_job(&world, &[]);
    wait_started(&world, &mut job).await;
    generate(&world, 2_000, None).await;
    // Events keep arriving while the page is open, so its figures must move.
    let background = {
        let url = world.postgres_url.clone();
        tokio::spawn(async move {
            let options = GenerateOptions {
                rate: Some(200),
                content_items: 50,
                seed: 7,
                ..GenerateOptions::default()
            };
            let _ = generate::run(
                &url,
                options,
                std::sync::Arc::new(GenerateProgress::default()),
                std::future::pending(),
            )
            .await;
        })
    };
    // The oracle for titles: every content row, from Postgres.
    let titles: std::collections::BTreeMap<String, String> = world
        .sql()
        .await
        .query("SELECT id::text, title FROM content", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let titles_file = world.root.path().join("titles.json");
    std::fs::write(&titles_file, serde_json::to_vec(&titles).unwrap()).unwrap();
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("dashboard.png");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dashboard/check.mjs");
    let mut browser = tokio::process::Command::new("node")
        .arg(script)
        .env("NODE_PATH", &node_modules)
        .env("ENGAGE_CHROMIUM", &chromium)
        .env("DASHBOARD_URL", format!("{base}/"))
        .env("TITLES_FILE", &titles_file)
        .env("SCREENSHOT", &screenshot)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    // The script prints `stop-the-job` once the live checks passed, then
    // waits for the page to show the job unreachable.
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(browser.stdout.take().unwrap()).lines();
    let mut transcript = String::new();
    let told = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(line)) = lines.next_line().await {
            transcript.push_str(&line);
            transcript.push('\n');
            if line.trim() == "stop-the-job" {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    background.abort();
    let output = if told {
        job.kill_9();
        let rest = tokio::time::timeout(Duration::from_secs(60), browser.wait_with_output())
            .await
            .expect("the browser check ends")
            .unwrap();
        transcript.push_str(&String::from_utf8_lossy(&rest.stdout));
        rest
    } else {
        let _ = browser.start_kill();
        browser.wait_with_output().await.unwrap()
    };
    assert!(
        told && output.status.success(),
        "the dashboard check failed:\n{transcript}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        screenshot.exists(),
        "screenshot saved at {}",
        screenshot.display()
    );
    eprintln!("dashboard screenshot: {}", screenshot.display());
}
