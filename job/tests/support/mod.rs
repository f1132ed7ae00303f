//! Test harness: real Postgres, Redis and a Kafka-protocol broker on private ports, and the `engage`
//! binary run as a child process (so tests can SIGKILL it).
//!
//! Every test gets its own servers, database, checkpoint and data
//! directories. Waits poll a condition with a deadline; they never sleep for
//! a fixed time and hope.

#![allow(dead_code)]

pub mod receiver;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use engage::embedded::{EmbeddedKafka, EmbeddedPostgres, EmbeddedRedis, PostgresOptions};
use engage::harness;
use engage::query;

pub const MISSION_SQL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/engagement.sql");

/// Servers and directories of one test.
pub struct World {
    pub postgres: EmbeddedPostgres,
    pub redis: EmbeddedRedis,
    pub kafka: EmbeddedKafka,
    pub postgres_url: String,
    /// Declared last: fields drop in order, and the servers must stop before
    /// their directory goes.
    pub root: tempfile::TempDir,
}

impl World {
    pub async fn start() -> World {
        Self::start_with(PostgresOptions::default()).await
    }

    pub async fn start_with(options: PostgresOptions) -> World {
        let root = tempfile::Builder::new()
            .prefix("engage-test-")
            .tempdir()
            .unwrap();
        let postgres = EmbeddedPostgres::start(&root.path().join("pg"), options)
            .await
            .expect("postgres starts");
        let postgres_url = postgres
            .create_database("app")
            .await
            .expect("database created");
        let redis = EmbeddedRedis::start(&root.path().join("redis"))
            .await
            .expect("redis starts");
        let kafka = EmbeddedKafka::start(&root.path().join("kafka"))
            .await
            .expect("kafka (tansu) starts");
        World {
            root,
            postgres,
            redis,
            kafka,
            postgres_url,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.root.path().join("checkpoints")
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.postgres_url, tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        client
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// An `engage` command with this world's environment.
    /// Where this world's servers and outputs are, for a job's environment.
    pub fn services(&self) -> harness::Services {
        harness::Services {
            postgres_url: self.postgres_url.clone(),
            redis_url: self.redis.url(),
            kafka_brokers: self.kafka.bootstrap(),
            data_dir: self.data_dir(),
        }
    }

    pub fn engage(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_engage"));
        self.services()
            .apply(command.args(args))
            .env("RUST_LOG", "info,engage=debug")
            .current_dir(self.root.path());
        command
    }

    /// Starts `engage run` (or another job subcommand) on the mission SQL in the background.
    pub fn start_job(&self, subcommand: &[&str]) -> Job {
        self.start_job_with_interval(subcommand, "0.3")
    }

    /// Like [`World::start_job`] with a checkpoint interval in seconds.
    pub fn start_job_with_interval(&self, subcommand: &[&str], interval: &str) -> Job {
        self.start_job_sql(subcommand, MISSION_SQL, interval)
    }

    /// Writes `sql` as job `name` (`<name>.sql` in the world's directory),
    /// starts `engage run` on it and waits for its first checkpoint.
    pub async fn start_named_job(&self, name: &str, sql: &str) -> (Job, PathBuf) {
        let path = self.root.path().join(format!("{name}.sql"));
        std::fs::write(&path, sql).unwrap();
        let mut job = self.start_job_sql(&["run"], path.to_str().unwrap(), "0.3");
        wait_started_as(self, &mut job, name).await;
        (job, path)
    }

    /// Starts `engage run` on the mission SQL with failpoint `point` (`name:n`) armed.
    pub fn start_job_failing_at(&self, point: &str) -> Job {
        self.start_job_env(&["run"], MISSION_SQL, "0.3", &[("ENGAGE_FAILPOINT", point)])
    }

    /// Starts a job subcommand on any job SQL file.
    pub fn start_job_sql(&self, subcommand: &[&str], sql: &str, interval: &str) -> Job {
        self.start_job_env(subcommand, sql, interval, &[])
    }

    /// Starts a job subcommand on any job SQL file, with `env` added.
    pub fn start_job_env(
        &self,
        subcommand: &[&str],
        sql: &str,
        interval: &str,
        env: &[(&str, &str)],
    ) -> Job {
        let log = self.root.path().join(format!(
            "job-{}.log",
            Instant::now().elapsed().as_nanos() ^ rand_suffix()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = harness::job_command(
            Path::new(env!("CARGO_BIN_EXE_engage")),
            subcommand,
            Path::new(sql),
            &self.checkpoint_dir(),
            &self.services(),
        );
        command.envs(env.iter().copied());
        let child = command
            .args(["--checkpoint-interval", interval])
            .env("RUST_LOG", "info,engage=debug")
            .current_dir(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("engage binary runs");
        Job { child, log }
    }

    /// Runs `engage run` on the mission SQL to its exit (for start-up
    /// errors); its stderr is in the output. A job still running after 60 s
    /// (it missed the error and streams on) fails the test instead of hanging it.
    pub fn run_mission_once(&self) -> std::process::Output {
        let mut job = self.start_job_with_interval(&["run"], "10");
        let status = job.wait_exit(Duration::from_secs(60), "stopping at start-up");
        std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: std::fs::read(&job.log).unwrap(),
        }
    }

    /// Replication slots in the world's Postgres.
    pub async fn slot_count(&self) -> i64 {
        self.sql()
            .await
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Newest checkpoint epoch on disk of the mission job (0: none).
    pub fn latest_checkpoint(&self) -> u64 {
        self.latest_checkpoint_of("engagement")
    }

    /// Newest checkpoint epoch on disk of job `job` (0: none).
    pub fn latest_checkpoint_of(&self, job: &str) -> u64 {
        let dir = self.checkpoint_dir().join(job);
        std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().join("manifest.json").exists())
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix("epoch-")?.parse().ok())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// Runs DataFusion SQL over the job's filesystem sinks. A query of a
    /// table the job has not committed a file to yet reads as empty; any
    /// other error fails the test (an error never passes for "no rows").
    pub async fn query(&self, sql: &str) -> Vec<arrow::record_batch::RecordBatch> {
        std::env::set_var("ENGAGE_DATA_DIR", self.data_dir());
        let script = std::fs::read_to_string(MISSION_SQL).unwrap();
        let spec = query::parse_for_outputs("engagement", &script).unwrap();
        // Looked at before the session reads the directories: a file the job
        // commits in between must not turn "absent" into a failure.
        let absent = spec.tables.iter().any(|table| {
            let Some(options) = table.connector.filesystem() else {
                return false;
            };
            sql.contains(table.name.as_str()) && !has_committed_files(Path::new(&options.path))
        });
        let (ctx, unavailable) = query::session_for(&spec).await;
        let frame = match ctx.sql(sql).await {
            Ok(frame) => frame,
            Err(error) => {
                assert!(
                    absent,
                    "query `{sql}` failed: {error}; unavailable: {unavailable:?}"
                );
                return Vec::new();
            }
        };
        frame
            .collect()
            .await
            .unwrap_or_else(|error| panic!("query `{sql}` failed: {error}"))
    }

    /// Rows of `SELECT count(*) ...` style queries, as i64.
    pub async fn query_i64(&self, sql: &str) -> Vec<Vec<Option<i64>>> {
        let mut rows = Vec::new();
        for batch in self.query(sql).await {
            for row in 0..batch.num_rows() {
                rows.push(
                    batch
                        .columns()
                        .iter()
                        .map(|c| {
                            let c = arrow::compute::cast(c, &arrow::datatypes::DataType::Int64)
                                .unwrap();
                            let c = c
                                .as_any()
                                .downcast_ref::<arrow::array::Int64Array>()
                                .unwrap()
                                .clone();
                            arrow::array::Array::is_valid(&c, row).then(|| c.value(row))
                        })
                        .collect(),
                );
            }
        }
        rows
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A running `engage` process.
pub struct Job {
    pub child: Child,
    pub log: PathBuf,
}

impl Job {
    /// SIGKILL: no final checkpoint, no cleanup.
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit (final checkpoint).
    pub fn stop(mut self) {
        harness::sigterm(self.child.id()).expect("engage can be signalled");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "engage exited with {status}\n{}",
                    self.log_tail()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "engage did not stop within 60 s\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself (`what` it
    /// was expected to do, for the failure message).
    pub fn wait_exit(&mut self, timeout: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "engage kept running instead of {what}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("engage exited early with {status}\n{}", self.log_tail());
        }
    }

    pub fn log_tail(&self) -> String {
        harness::log_tail(&self.log, 40)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it holds or `timeout` passes (then panics with `what`).
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the job has written its first checkpoint (its slot exists).
pub async fn wait_started(world: &World, job: &mut Job) {
    wait_started_as(world, job, "engagement").await;
}

/// Waits until job `name` has written its first checkpoint.
pub async fn wait_started_as(world: &World, job: &mut Job, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.latest_checkpoint_of(name) == 0 {
        job.assert_running();
        assert!(
            Instant::now() < deadline,
            "job did not start\n{}",
            job.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Creates the source tables, the oracle's history triggers (before any
/// content exists, so the oracle sees every content version) and `items`
/// content rows for the fault-suite workload.
pub async fn seed_for_oracle(world: &World, items: usize, seed: u64) {
    let client = world.sql().await;
    engage::generate::ensure_schema(&client).await.unwrap();
    engage::chaos::workload::install_history(&client)
        .await
        .unwrap();
    engage::generate::seed_content(&client, items, seed)
        .await
        .unwrap();
}

/// Waits until the running `job` has made every change committed so far
/// durable in every sink: its slot is confirmed past them.
pub async fn wait_caught_up(world: &World, job: &mut Job) {
    let client = world.sql().await;
    let end: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    // One more commit, so the stream is seen to pass `end`.
    client
        .batch_execute("UPDATE content SET title = title WHERE id = (SELECT id FROM content ORDER BY id LIMIT 1)")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done: bool = client
            .query_one(
                "SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false) FROM pg_replication_slots",
                &[&end],
            )
            .await
            .unwrap()
            .get(0);
        if done {
            return;
        }
        job.assert_running();
        assert!(
            Instant::now() < deadline,
            "the job did not catch up with {end}\n{}",
            job.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the fault suite's oracle over this world's outputs (the job stopped
/// just now) and fails the test on any difference, except in `skip`ped sinks.
pub async fn assert_matches_oracle(world: &World, skip: &[&str]) -> engage::chaos::oracle::Verdict {
    let target = engage::chaos::oracle::Target {
        postgres_url: world.postgres_url.clone(),
        redis_url: world.redis.url(),
        kafka_brokers: world.kafka.bootstrap(),
        data_dir: world.data_dir(),
        stopped_at_micros: chrono::Utc::now().timestamp_micros(),
    };
    let verdict = engage::chaos::oracle::check(&target, &Default::default())
        .await
        .expect("the oracle runs");
    assert!(verdict.problems.is_empty(), "{:?}", verdict.problems);
    for sink in &verdict.sinks {
        if !skip.contains(&sink.sink.as_str()) {
            assert!(sink.ok(), "{sink:?}");
        }
    }
    assert!(verdict.updates > 0 && verdict.deletes > 0, "{verdict:?}");
    verdict
}

pub use engage::sink::parquet::has_committed_files;

/// The job's `dead_letter` rows in stream order, as (reason, row parsed
/// from its JSON).
pub async fn dead_letters(path: &Path) -> Vec<(String, serde_json::Value)> {
    let dead = csv(
        path,
        "SELECT reason, \"row\" FROM dead_letter ORDER BY _lsn, _seq",
    )
    .await;
    dead.lines()
        .skip(1)
        .map(|line| {
            let (reason, row) = line.split_once(',').unwrap();
            let row = row.trim_matches('"').replace("\"\"", "\"");
            (reason.to_owned(), serde_json::from_str(&row).unwrap())
        })
        .collect()
}

/// Runs `query` over the filesystem sinks of the job SQL at `path` (the job
/// is named after the file) and renders it as CSV, header first; a failure
/// fails the test.
pub async fn csv(path: &Path, query: &str) -> String {
    let job = path.file_stem().unwrap().to_str().unwrap();
    let spec = query::parse_for_outputs(job, &std::fs::read_to_string(path).unwrap()).unwrap();
    query::run(&spec, query, query::OutputFormat::Csv)
        .await
        .unwrap_or_else(|e| panic!("`{query}` failed: {e}"))
}

/// The Python the tests run (pyarrow, prometheus_client): `$ENGAGE_PYTHON`,
/// else the virtualenv scripts/install-deps.sh --test makes (`$ENGAGE_VENV`,
/// default `$HOME/.cache/engage/venv`).
pub fn test_python() -> PathBuf {
    std::env::var_os("ENGAGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("ENGAGE_VENV")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/engage/venv")
                })
                .join("bin/python")
        })
}
