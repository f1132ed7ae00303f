//! One scenario's world: private Postgres and durable Redis, the job as a
//! child process, the workload (see [`super::workload`]), and the two ways a
//! scenario ends: a drain in a fresh process, or the running job reaching the
//! end by itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

use super::workload::{self, Workload, WorkloadOptions};
use super::{context, ChaosError, Settings};
use crate::change::Position;
use crate::embedded::{
    EmbeddedKafka, EmbeddedPostgres, EmbeddedRedis, PostgresOptions, RedisOptions,
};
use crate::generate;
use crate::harness;

/// Content items seeded: enough for long-tail rankings, small enough that
/// the oracle reads every recent list.
pub const CONTENT_ITEMS: usize = 1_000;
pub const JOB: &str = "engagement";
/// Position key of the `recent_events` sink: moves with every applied batch.
pub const RECENT_POSITION_KEY: &str = "engage:job:engagement:position:recent_events";
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1800);
/// One commit after END, so the stream is seen to pass it.
const PAST_END_SQL: &str =
    "UPDATE content SET title = title WHERE id = (SELECT id FROM content ORDER BY id LIMIT 1)";

pub struct World {
    pub root: PathBuf,
    sql: PathBuf,
    pub postgres: EmbeddedPostgres,
    pub redis: EmbeddedRedis,
    pub kafka: EmbeddedKafka,
    pub postgres_url: String,
    /// Every job process of the scenario appends its stderr here.
    pub log: PathBuf,
    /// Kept alive for the world's life; deleted on drop unless kept.
    _dir: Option<tempfile::TempDir>,
}

impl World {
    pub async fn start(scenario: &str, settings: &Settings) -> Result<World, ChaosError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("engage-chaos-{scenario}-"))
            .tempdir()
            .map_err(context("failed to create a temporary directory"))?;
        let root = dir.path().to_path_buf();
        let postgres = EmbeddedPostgres::start(&root.join("postgres"), PostgresOptions::default())
            .await
            .map_err(context("failed to start postgres"))?;
        let postgres_url = postgres
            .create_database("app")
            .await
            .map_err(context("failed to create the database"))?;
        let redis = EmbeddedRedis::start_with(
            &root.join("redis"),
            RedisOptions {
                durable: true,
                ..RedisOptions::default()
            },
        )
        .await
        .map_err(context("failed to start redis"))?;
        let kafka = EmbeddedKafka::start(&root.join("kafka"))
            .await
            .map_err(context("failed to start the kafka broker (tansu)"))?;
        let sql = root.join("engagement.sql");
        std::fs::write(&sql, crate::demo::ENGAGEMENT_SQL)
            .map_err(context(format!("failed to write {}", sql.display())))?;
        let world = World {
            log: root.join("job.log"),
            sql,
            postgres,
            redis,
            kafka,
            postgres_url,
            _dir: if settings.keep {
                let _ = dir.keep();
                None
            } else {
                Some(dir)
            },
            root,
        };
        let db = world.db().await?;
        generate::ensure_schema(&db)
            .await
            .map_err(context("failed to create the source tables"))?;
        // Before the content exists: the oracle replays content from its history.
        workload::install_history(&db)
            .await
            .map_err(context("failed to install the oracle's history triggers"))?;
        generate::seed_content(&db, CONTENT_ITEMS, settings.seed)
            .await
            .map_err(context("failed to seed content"))?;
        Ok(world)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub async fn db(&self) -> Result<Client, ChaosError> {
        let (client, connection) = tokio_postgres::connect(&self.postgres_url, NoTls)
            .await
            .map_err(context("failed to connect to postgres"))?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub async fn redis(&self) -> Result<redis::aio::MultiplexedConnection, ChaosError> {
        redis::Client::open(self.redis.url())
            .map_err(context("bad redis url"))?
            .get_multiplexed_async_connection()
            .await
            .map_err(context("failed to connect to redis"))
    }

    /// Starts `engage run` on the mission SQL; `failpoint` arms a crash point.
    pub fn spawn_job(
        &self,
        failpoint: Option<&str>,
        end_lsn: Option<&str>,
    ) -> Result<JobChild, ChaosError> {
        let exe = std::env::current_exe().map_err(context("failed to locate this binary"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(context(format!("failed to open {}", self.log.display())))?;
        let services = harness::Services {
            postgres_url: self.postgres_url.clone(),
            redis_url: self.redis.url(),
            kafka_brokers: self.kafka.bootstrap(),
            data_dir: self.data_dir(),
        };
        let checkpoints = self.root.join("checkpoints");
        let mut command = harness::job_command(&exe, &["run"], &self.sql, &checkpoints, &services);
        command.args([
            "--checkpoint-interval",
            "1",
            "--keep-checkpoints",
            "1000000",
        ]);
        if let Some(lsn) = end_lsn {
            command.args(["--end-lsn", lsn]);
        }
        command.env_remove(crate::failpoint::FAILPOINT_ENV);
        if let Some(point) = failpoint {
            command.env(crate::failpoint::FAILPOINT_ENV, point);
        }
        let child = Command::from(command)
            .env(
                "RUST_LOG",
                std::env::var("ENGAGE_CHAOS_JOB_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(context("failed to start the job (engage run)"))?;
        Ok(JobChild {
            child,
            log: self.log.clone(),
        })
    }

    /// Starts the workload: `count` inserts (or until stopped) at `rate`,
    /// with every other kind of change mixed in.
    pub fn workload(&self, count: Option<u64>, rate: u64, seed: u64) -> Workload {
        self.workload_with(WorkloadOptions::mixed(count, rate, seed, CONTENT_ITEMS))
    }

    pub fn workload_with(&self, options: WorkloadOptions) -> Workload {
        Workload::start(&self.postgres_url, options)
    }

    /// The WAL insert position now (past every commit so far).
    pub async fn wal_position(&self) -> Result<String, ChaosError> {
        Ok(self
            .db()
            .await?
            // With `synchronous_commit = off` the last commits may not be
            // written yet, and pg_current_wal_lsn() is where WAL is written up to.
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(context("failed to read the WAL position"))?
            .get(0))
    }

    /// What a fault finds in flight: the newest checkpoint's position, and
    /// how far the `recent_events` sink has applied changes.
    pub async fn in_flight(&self) -> Result<InFlight, ChaosError> {
        let dir = self.root.join("checkpoints").display().to_string();
        let store = crate::checkpoint::CheckpointStore::open(&dir, JOB)
            .map_err(context("failed to open the checkpoints"))?;
        let checkpoint = store
            .latest()
            .await
            .map_err(context("failed to read the newest checkpoint"))?
            .map(|m| (m.source.position, m.source.resume_lsn))
            .unwrap_or((Position::ZERO, 0));
        let mut redis = self.redis().await?;
        let applied: Option<String> = redis::cmd("GET")
            .arg(RECENT_POSITION_KEY)
            .query_async(&mut redis)
            .await
            .map_err(context("failed to read the applied position"))?;
        Ok(InFlight {
            checkpoint: checkpoint.0,
            resume_lsn: checkpoint.1,
            applied: applied.as_deref().and_then(Position::from_sortable),
        })
    }

    /// The WAL position after the last change, and one more commit past it,
    /// so a job's stream is seen to pass it.
    async fn mark_end(&self) -> Result<String, ChaosError> {
        let end = self.wal_position().await?;
        self.db()
            .await?
            .batch_execute(PAST_END_SQL)
            .await
            .map_err(context("failed to commit past the end"))?;
        Ok(end)
    }

    /// Ends a scenario: stops `job` (SIGTERM), then drains the stream up to
    /// the WAL position after the last event with `engage run --end-lsn`.
    /// Returns the stopped job's summary line, if it printed one.
    pub async fn drain(&self, job: Option<JobChild>) -> Result<Option<String>, ChaosError> {
        let end = self.mark_end().await?;
        let summary = match job {
            Some(job) => Some(job.terminate().await?),
            None => None,
        };
        let drain = self.spawn_job(None, Some(&end))?;
        drain.wait_success(DRAIN_TIMEOUT).await?;
        Ok(summary.flatten())
    }

    /// Ends a scenario without a fresh process: waits until the running job
    /// has made everything up to the last change durable in every sink (its
    /// slot is confirmed past it), then stops it (SIGTERM). Whatever restart
    /// or rebuild path the job took is what the oracle then sees.
    pub async fn finish_in_place(&self, mut job: JobChild) -> Result<Option<String>, ChaosError> {
        let end = self.mark_end().await?;
        self.wait_slot_past(&mut job, &end, DRAIN_TIMEOUT, "reach the end by itself")
            .await?;
        job.terminate().await
    }

    /// Waits until the running `job` has made durable in every sink all that
    /// Postgres holds now (its slot confirmed past the current WAL position),
    /// within 300 s; returns how long that took (`what`: for the message).
    pub async fn wait_drained(
        &self,
        job: &mut JobChild,
        what: &str,
    ) -> Result<Duration, ChaosError> {
        let from = Instant::now();
        let behind = self.wal_position().await?;
        self.wait_slot_past(job, &behind, Duration::from_secs(300), what)
            .await?;
        Ok(from.elapsed())
    }

    /// Waits until the job's slot is confirmed past `lsn` (every sink holds
    /// what came before it durably); fails if `job` stops first or `timeout`
    /// passes (`what` the job was to do, for the message).
    pub async fn wait_slot_past(
        &self,
        job: &mut JobChild,
        lsn: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<(), ChaosError> {
        let db = self.db().await?;
        let started = Instant::now();
        loop {
            let done: bool = db
                .query_one(
                    "SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false) FROM pg_replication_slots",
                    &[&lsn],
                )
                .await
                .map_err(context("failed to read the slot"))?
                .get(0);
            if done {
                return Ok(());
            }
            if !job.running() || started.elapsed() > timeout {
                return Err(ChaosError::Failed(format!(
                    "the job did not {what} (its slot is not confirmed past {lsn}); the end of its log:\n{}",
                    log_tail(&self.log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a fault found in flight (see [`World::in_flight`]).
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    /// Position of the last change the newest checkpoint covers.
    pub checkpoint: Position,
    /// Where a restarted job resumes reading.
    pub resume_lsn: u64,
    /// The last change the `recent_events` sink applied.
    pub applied: Option<Position>,
}

impl InFlight {
    /// Sinks hold changes that no checkpoint covers: a crash now makes the
    /// restarted job read them again, and it must not apply them twice.
    pub fn uncheckpointed(&self) -> bool {
        self.applied.is_some_and(|a| a > self.checkpoint)
    }
}

/// The job child process.
pub struct JobChild {
    child: Child,
    log: PathBuf,
}

impl JobChild {
    /// SIGKILL, and reap.
    pub async fn kill_9(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit; its exit status, or
    /// `None` if it still runs.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// SIGTERM (final checkpoint), then waits for a successful exit; returns
    /// the job's last `stopped after ...` line.
    pub async fn terminate(self) -> Result<Option<String>, ChaosError> {
        if let Some(pid) = self.child.id() {
            harness::sigterm(pid).map_err(context("failed to signal the job"))?;
        }
        let log = self.log.clone();
        self.wait_success(STOP_TIMEOUT).await?;
        Ok(last_summary(&log))
    }

    async fn wait_success(mut self, timeout: Duration) -> Result<(), ChaosError> {
        match self.wait_exit(timeout).await {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(ChaosError::Failed(format!(
                "the job failed ({status}); the end of {}:\n{}",
                self.log.display(),
                log_tail(&self.log)
            ))),
            None => Err(ChaosError::Failed(format!(
                "the job did not exit within {timeout:?}; the end of {}:\n{}",
                self.log.display(),
                log_tail(&self.log)
            ))),
        }
    }
}

/// The last lines of a job log.
pub fn log_tail(log: &Path) -> String {
    harness::log_tail(log, 20)
}

fn last_summary(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find(|l| l.starts_with("stopped after "))
        .map(str::to_string)
}

/// A figure `N <label>` from a job's summary line, e.g. `re-sent changes suppressed`.
pub fn summary_figure(summary: &str, label: &str) -> Option<u64> {
    let at = summary.find(label)?;
    summary[..at].split_whitespace().last()?.parse().ok()
}

/// Polls `key` in Redis every 5 ms until it differs from `from`; the wait.
pub async fn time_until_changed(
    redis: &mut redis::aio::MultiplexedConnection,
    key: &str,
    from: Option<String>,
    started: Instant,
    timeout: Duration,
) -> Option<Duration> {
    while started.elapsed() < timeout {
        let now: Option<String> = redis::cmd("GET").arg(key).query_async(redis).await.ok()?;
        if now != from {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}
