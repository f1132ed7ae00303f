//! BigQuery load jobs, proven in two places:
//!
//! - against `bqemulator` (PyPI, on a private port): the mission's
//!   `enriched_events` with `bigquery.table` keeps streaming while every
//!   load fails (no table yet), the checkpoints list the epochs not loaded,
//!   the next start loads them once the table exists, the loaded rows equal
//!   the Parquet files, and `engage bigquery load` afterwards loads nothing
//!   twice (it finds each epoch's job). The emulator maps `gs://` URIs to a local directory and
//!   reads the partition column from the path (DuckDB's hive detection),
//!   but takes no `hivePartitioningOptions`, matches columns by position,
//!   creates no table and does not refuse a duplicate job id;
//! - so against a recording fake of the REST exchange too: the job id
//!   format, the hive partitioning options, a 409 answer (the id exists)
//!   taken as "loaded before", and tokens from a service-account key (JWT
//!   bearer grant) and from gcloud's user credentials (refresh token) sent
//!   as `Authorization: Bearer`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const PROJECT: &str = "test-proj";

/// The emulator, stopped on drop.
struct Emulator {
    child: Child,
    url: String,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bqemulator() -> PathBuf {
    std::env::var_os("ENGAGE_BQEMULATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/engage/bqemu/bin/bqemulator")
        })
}

/// Starts the emulator with `gs://<bucket>/...` read from `gcs_root/<bucket>/...`.
async fn start_emulator(gcs_root: &Path, log: &Path) -> Emulator {
    let rest = engage::embedded::free_port().unwrap();
    let grpc = engage::embedded::free_port().unwrap();
    let child = Command::new(bqemulator())
        .args([
            "start",
            "--rest-port",
            &rest.to_string(),
            "--grpc-port",
            &grpc.to_string(),
        ])
        .args(["--project", PROJECT])
        .env("BQEMU_GCS_LOCAL_ROOT", gcs_root)
        .stdout(Stdio::from(std::fs::File::create(log).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .expect("bqemulator runs (scripts/install-deps.sh --test installs it)");
    let emulator = Emulator {
        child,
        url: format!("http://127.0.0.1:{rest}"),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let datasets = format!("{}/bigquery/v2/projects/{PROJECT}/datasets", emulator.url);
        if client
            .get(&datasets)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return emulator;
        }
        assert!(
            Instant::now() < deadline,
            "bqemulator did not answer in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn post(url: &str, body: Value) -> Value {
    let response = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    assert!(status.is_success(), "{url}: {status} {body}");
    body
}

/// `SELECT count(*)` and `SELECT sum(id)` of the emulator's table.
async fn count_and_sum(emulator: &Emulator) -> (i64, i64) {
    let body = post(
        &format!("{}/bigquery/v2/projects/{PROJECT}/queries", emulator.url),
        json!({"query": "SELECT count(*), coalesce(sum(id), 0) FROM ds.enriched_events", "useLegacySql": false}),
    )
    .await;
    let cell = |i: usize| {
        body["rows"][0]["f"][i]["v"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    (cell(0), cell(1))
}

/// The mission SQL with `bigquery.*` options on `enriched_events`.
fn mission_with_bigquery(world: &World, options: &str) -> PathBuf {
    let sql = std::fs::read_to_string(MISSION_SQL).unwrap().replace(
        "    'partitioning.time_pattern' = 'event_date=%Y-%m-%d'\n);\n\nINSERT INTO enriched_events",
        &format!("    'partitioning.time_pattern' = 'event_date=%Y-%m-%d',\n{options}\n);\n\nINSERT INTO enriched_events"),
    );
    assert!(
        sql.contains("bigquery.table"),
        "the mission's enriched_events changed shape"
    );
    let path = world.root.path().join("engagement.sql");
    std::fs::write(&path, sql).unwrap();
    path
}

fn engage(world: &World, args: &[&str]) -> String {
    let output = world.engage(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "engage {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn each_checkpoint_is_loaded_once_into_the_emulator() {
    let world = World::start().await;
    seed_for_oracle(&world, 20, 41).await;
    // gs://data/enriched_events/... is <root>/data/enriched_events/...: the sink's own files.
    let emulator =
        start_emulator(world.root.path(), &world.root.path().join("bqemulator.log")).await;
    let sql = mission_with_bigquery(
        &world,
        &format!(
            "    'bigquery.table' = '{PROJECT}.ds.enriched_events',\n    'bigquery.endpoint' = '{}',\n    \
             'bigquery.source_uri_prefix' = 'gs://data/enriched_events'",
            emulator.url
        ),
    );
    let sql_arg = sql.to_str().unwrap();
    let schema: Value = serde_json::from_str(&engage(
        &world,
        &["bigquery", "schema", sql_arg, "--table", "enriched_events"],
    ))
    .unwrap();
    let fields = schema.as_array().unwrap().clone();
    assert_eq!(fields.last().unwrap()["name"], "event_date");
    assert_eq!(fields.last().unwrap()["type"], "DATE");
    let base = format!("{}/bigquery/v2/projects/{PROJECT}", emulator.url);
    post(
        &format!("{base}/datasets"),
        json!({"datasetReference": {"projectId": PROJECT, "datasetId": "ds"}}),
    )
    .await;

    // No table yet: every load fails, the stream goes on, and the
    // checkpoints list the epochs not loaded.
    let mut job = world.start_job_sql(&["run"], sql_arg, "0.5");
    wait_started_as(&world, &mut job, "engagement").await;
    engage::chaos::workload::Workload::start(
        &world.postgres_url,
        engage::chaos::workload::WorkloadOptions::mixed(Some(4_000), 2_000, 41, 20),
    )
    .wait_done()
    .await
    .expect("the workload ran");
    wait_caught_up(&world, &mut job).await;
    let log_path = job.log.clone();
    job.stop();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("bigquery load failed") && log.contains("enriched_events"),
        "{log}"
    );
    let listed = engage(&world, &["checkpoints", sql_arg]);
    let newest = listed.lines().last().unwrap();
    assert!(newest.contains("(bigquery: epochs ["), "{listed}");
    // Every committed row, as the files hold them.
    std::env::set_var("ENGAGE_DATA_DIR", world.data_dir());
    let parquet = csv(&sql, "SELECT count(*), sum(id) FROM enriched_events").await;
    let parquet: Vec<i64> = parquet
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(parquet[0] > 4_000, "{parquet:?}");

    // The table, from `engage bigquery schema` (the emulator creates none);
    // the next start loads what is pending.
    post(
        &format!("{base}/datasets/ds/tables"),
        json!({"tableReference": {"projectId": PROJECT, "datasetId": "ds", "tableId": "enriched_events"},
               "schema": {"fields": fields}}),
    )
    .await;
    let mut job = world.start_job_sql(&["run"], sql_arg, "0.5");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let loaded = count_and_sum(&emulator).await;
        if loaded == (parquet[0], parquet[1]) {
            break;
        }
        job.assert_running();
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&job.log).unwrap_or_default();
            let bigquery: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("bigquery"))
                .take(10)
                .collect();
            panic!(
                "loaded {loaded:?} of {parquet:?} in 60 s; the job's log says:\n{}",
                bigquery.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // For the record: how long the catch-up took (run with --nocapture).
    let log = std::fs::read_to_string(&job.log).unwrap_or_default();
    for line in log.lines().filter(|l| {
        l.contains("loaded into bigquery") || l.contains("sink open sink=enriched_events")
    }) {
        println!("{line}");
    }
    // A checkpoint after the loads (one is taken when changes came) lists
    // none pending; its own files are loaded too.
    world
        .sql()
        .await
        .batch_execute(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
             SELECT id, gen_random_uuid(), 'play', now(), 1000, 'ios' FROM content LIMIT 5",
        )
        .await
        .unwrap();
    wait_caught_up(&world, &mut job).await;
    job.stop();
    let listed = engage(&world, &["checkpoints", sql_arg]);
    assert!(
        !listed
            .lines()
            .last()
            .unwrap()
            .contains("bigquery: epochs [2"),
        "{listed}"
    );
    let parquet = csv(&sql, "SELECT count(*), sum(id) FROM enriched_events").await;
    let parquet: Vec<i64> = parquet
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    wait_for(
        "the last checkpoint's files loaded",
        Duration::from_secs(30),
        || {
            let emulator = &emulator;
            let parquet = parquet.clone();
            async move { count_and_sum(emulator).await == (parquet[0], parquet[1]) }
        },
    )
    .await;
    let loaded = count_and_sum(&emulator).await;

    // Again by hand: every epoch's job is found, nothing loads twice.
    let out = engage(&world, &["bigquery", "load", sql_arg]);
    assert!(
        out.contains(" 0 loaded now") && out.contains("0 failed"),
        "{out}"
    );
    assert_eq!(count_and_sum(&emulator).await, loaded);
}

/// What the fake saw.
#[derive(Default)]
struct Seen {
    /// (method, path, authorization header, body)
    requests: Vec<(String, String, String, Value)>,
}

/// A fake of BigQuery's REST API and Google's token endpoint: jobs are
/// unknown (404) until inserted; an insert of a job id in `conflict` answers
/// 409 and the job then reads as done. Every request is recorded.
async fn start_fake(conflict: Vec<String>) -> (String, Arc<Mutex<Seen>>) {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    type Shared = Arc<Mutex<(Seen, std::collections::HashMap<String, Value>, Vec<String>)>>;
    let state: Shared = Arc::new(Mutex::new((Seen::default(), Default::default(), conflict)));
    let auth = |headers: &HeaderMap| {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let app = axum::Router::new()
        .route(
            "/token",
            post(move |State(state): State<Shared>, body: String| async move {
                let form: Value = json!(body);
                state.lock().unwrap().0.requests.push(("POST".into(), "/token".into(), String::new(), form));
                axum::Json(json!({"access_token": "fake-token", "expires_in": 3600, "token_type": "Bearer"}))
            }),
        )
        .route(
            "/bigquery/v2/projects/{project}/jobs",
            post(move |State(state): State<Shared>, headers: HeaderMap, axum::Json(body): axum::Json<Value>| async move {
                let mut state = state.lock().unwrap();
                let path = "/jobs".to_string();
                state.0.requests.push(("POST".into(), path, auth(&headers), body.clone()));
                let id = body["jobReference"]["jobId"].as_str().unwrap().to_string();
                let mut job = body.clone();
                job["status"] = json!({"state": "DONE"});
                job["statistics"] = json!({"load": {"outputRows": "3"}});
                state.1.insert(id.clone(), job.clone());
                if state.2.contains(&id) {
                    return (StatusCode::CONFLICT, axum::Json(json!({"error": {"message": "Already Exists"}})));
                }
                (StatusCode::OK, axum::Json(job))
            }),
        )
        .route(
            "/bigquery/v2/projects/{project}/jobs/{id}",
            get(move |State(state): State<Shared>, headers: HeaderMap, UrlPath((_, id)): UrlPath<(String, String)>| async move {
                let mut state = state.lock().unwrap();
                state.0.requests.push(("GET".into(), format!("/jobs/{id}"), auth(&headers), Value::Null));
                match state.1.get(&id) {
                    Some(job) => (StatusCode::OK, axum::Json(job.clone())),
                    None => (StatusCode::NOT_FOUND, axum::Json(json!({"error": {"message": "Not found"}}))),
                }
            }),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let requests = std::mem::take(&mut state.lock().unwrap().0.requests);
            shared.lock().unwrap().requests.extend(requests);
        }
    });
    (url, seen)
}

/// A service-account key file whose token_uri is the fake's.
fn key_file(dir: &Path, token_uri: &str) -> PathBuf {
    let key = dir.join("sa.pem");
    let output = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = dir.join("sa.json");
    let json = json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key": std::fs::read_to_string(&key).unwrap(),
        "client_email": "engage@test-proj.iam.gserviceaccount.com",
        "token_uri": token_uri,
    });
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn load_jobs_carry_stable_ids_hive_options_and_a_token_and_409_means_loaded() {
    let world = World::start().await;
    // Two checkpoints' files, as a sink partitioned by day leaves them.
    let sink_dir = world.data_dir().join("enriched_events");
    for (dir, file) in [
        (
            "event_date=2026-12-01",
            "part-000000000003-0000-0a0b0c0d.parquet",
        ),
        (
            "event_date=2026-12-02",
            "part-000000000003-0001-0a0b0c0e.parquet",
        ),
        (
            "event_date=2026-12-02",
            "part-000000000004-0000-0a0b0c0f.parquet",
        ),
    ] {
        std::fs::create_dir_all(sink_dir.join(dir)).unwrap();
        std::fs::write(sink_dir.join(dir).join(file), b"PAR1").unwrap();
    }
    std::fs::create_dir_all(sink_dir.join("_staging")).unwrap();
    std::fs::write(
        sink_dir.join("_staging/part-000000000005-0000-00000000.parquet"),
        b"x",
    )
    .unwrap();
    let epoch4 = "engage_engagement_enriched_events_000000000004";
    let (url, seen_all) = start_fake(vec![epoch4.to_string()]).await;
    let key = key_file(world.root.path(), &format!("{url}/token"));
    let sql = mission_with_bigquery(
        &world,
        &format!(
            "    'bigquery.table' = '{PROJECT}.ds.enriched_events',\n    'bigquery.endpoint' = '{url}',\n    \
             'bigquery.credentials' = '{}',\n    'bigquery.location' = 'EU',\n    \
             'bigquery.source_uri_prefix' = 'gs://bucket/engage/enriched_events'",
            key.display()
        ),
    );
    let text = engage(&world, &["bigquery", "load", sql.to_str().unwrap()]);
    assert!(
        text.contains("2 checkpoints' files: 1 loaded now (3 rows), 1 loaded before, 0 failed"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;

    {
        let seen = seen_all.lock().unwrap();
        let token = seen
            .requests
            .iter()
            .find(|r| r.1 == "/token")
            .expect("a token request");
        let form = token.3.as_str().unwrap();
        assert!(
            form.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"),
            "{form}"
        );
        assert_eq!(
            form.split("assertion=").nth(1).unwrap().split('.').count(),
            3,
            "a JWT"
        );
        let api: Vec<_> = seen.requests.iter().filter(|r| r.1 != "/token").collect();
        assert!(
            api.iter().all(|r| r.2 == "Bearer fake-token"),
            "every API call carries the token"
        );
        let inserts: Vec<&Value> = api.iter().filter(|r| r.0 == "POST").map(|r| &r.3).collect();
        assert_eq!(inserts.len(), 2);
        let epoch3 = inserts[0];
        assert_eq!(
            epoch3["jobReference"]["jobId"],
            "engage_engagement_enriched_events_000000000003"
        );
        assert_eq!(epoch3["jobReference"]["location"], "EU");
        let load = &epoch3["configuration"]["load"];
        assert_eq!(load["sourceFormat"], "PARQUET");
        assert_eq!(load["writeDisposition"], "WRITE_APPEND");
        assert_eq!(
        load["sourceUris"],
        json!([
            "gs://bucket/engage/enriched_events/event_date=2026-12-01/part-000000000003-0000-0a0b0c0d.parquet",
            "gs://bucket/engage/enriched_events/event_date=2026-12-02/part-000000000003-0001-0a0b0c0e.parquet",
        ])
    );
        assert_eq!(
            load["hivePartitioningOptions"],
            json!({"mode": "AUTO", "sourceUriPrefix": "gs://bucket/engage/enriched_events/"})
        );
        assert_eq!(load["destinationTable"]["tableId"], "enriched_events");
        // Epoch 4's insert got 409: looked up, not submitted again.
        assert_eq!(inserts[1]["jobReference"]["jobId"], epoch4);
        let lookups = api
            .iter()
            .filter(|r| r.0 == "GET" && r.1.ends_with(epoch4))
            .count();
        assert_eq!(lookups, 2, "looked up before the insert and after the 409");
    }

    // gcloud's user credentials: the refresh token is exchanged; both epochs
    // are found loaded.
    let user = world.root.path().join("user.json");
    let credentials = json!({
        "type": "authorized_user",
        "client_id": "engage-client",
        "client_secret": "engage-client-secret",
        "refresh_token": "engage-refresh-token",
        "token_uri": format!("{url}/token"),
    });
    std::fs::write(&user, credentials.to_string()).unwrap();
    let text = std::fs::read_to_string(&sql)
        .unwrap()
        .replace(&key.display().to_string(), &user.display().to_string());
    std::fs::write(&sql, text).unwrap();
    let text = engage(&world, &["bigquery", "load", sql.to_str().unwrap()]);
    assert!(
        text.contains("2 checkpoints' files: 0 loaded now (0 rows), 2 loaded before, 0 failed"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = seen_all.lock().unwrap();
    let refresh = seen
        .requests
        .iter()
        .filter(|r| r.1 == "/token")
        .nth(1)
        .expect("a second token request");
    let form = refresh.3.as_str().unwrap();
    assert!(
        form.contains("grant_type=refresh_token")
            && form.contains("refresh_token=engage-refresh-token"),
        "{form}"
    );
}
