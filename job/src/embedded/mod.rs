//! Throwaway PostgreSQL, Redis and Kafka-protocol servers for the demo, the tests and the
//! benchmarks.
//!
//! [`EmbeddedPostgres`] initialises a private cluster under a directory the caller owns
//! (`wal_level=logical`, trust authentication, superuser `postgres`) and starts it on a free
//! loopback port (in `postgres.rs`); [`EmbeddedRedis`] starts a Redis server (in `redis.rs`);
//! [`EmbeddedKafka`] a Tansu broker (in `kafka.rs`). They run
//! the machine's own binaries (`scripts/install-deps.sh` installs them; our machines have no
//! containers) and each stops its server when dropped, so a failing test leaves nothing
//! running. A missing binary is an error naming the package to install, never a skip: CI
//! installs them, and a test that silently skips proves nothing.
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When we are root, the cluster belongs to the `postgres`
//! system user (created by Debian's `postgresql` package): `initdb` and `pg_ctl` run through
//! `runuser -u postgres --`, and the root directory is handed to that user with `chown`. Every
//! parent of that directory must be searchable by `postgres`, which holds for the temporary
//! directories tests use but not under `/root`.
//!
//! # Ports and readiness
//!
//! A free port comes from binding port 0 and releasing it, so another process can take it in
//! between; a start that fails with "address in use" is retried once on a new port. Starting
//! waits on the server's own readiness (`pg_ctl start -w`, a Redis `PING`), within
//! [`READY_TIMEOUT`], and a server that does not come up is reported with the tail of its log.
//!
//! # Never leaving a server behind
//!
//! Both servers daemonise, so nothing stops them but us. `Drop` stops them (and signals the
//! process directly when `pg_ctl` cannot, say because the directory was deleted first), and
//! each server has a watchdog process that signals it if this process dies without dropping
//! it: a test killed at its timeout, SIGKILL, Ctrl-C.
//!
//! `start` and `create_database` are async. `stop`, `restart_immediate` and `Drop` are
//! blocking: they run `pg_ctl` or `redis-cli`, which take a fraction of a second.

mod kafka;
mod postgres;
mod redis;

pub use kafka::{find_tansu, EmbeddedKafka};
pub use postgres::{EmbeddedPostgres, PostgresOptions};
pub use redis::{EmbeddedRedis, RedisOptions};

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections once started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit once asked to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How many trailing lines of a server log an error quotes.
const LOG_TAIL_LINES: usize = 25;

/// Why a throwaway server could not be started or stopped. None of these are retryable:
/// they mean the machine lacks something, or the server itself failed (see its log).
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// A server binary is not installed.
    #[error("{what} not found: {install_hint}")]
    MissingBinary {
        what: &'static str,
        install_hint: &'static str,
    },
    /// We are root and there is no `postgres` user to run the cluster as.
    #[error(
        "running as root needs a `postgres` system user to run the postgresql server as \
         (it refuses root): install the `postgresql` package, which creates it"
    )]
    NoPostgresUser,
    /// We are root and the `postgres` user cannot reach the root directory.
    #[error(
        "the postgres user cannot write to {0}: every parent directory must be searchable \
         by it (use a directory under /tmp)"
    )]
    RootNotAccessible(PathBuf),
    /// A setting name in [`PostgresOptions::extra_settings`] is not a plain identifier.
    #[error("invalid postgresql setting name {0:?}")]
    InvalidSetting(String),
    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no free port on 127.0.0.1")]
    NoFreePort(#[source] io::Error),
    #[error("failed to run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {output}")]
    CommandFailed {
        command: String,
        status: ExitStatus,
        output: String,
    },
    /// The server exited, or did not accept connections within [`READY_TIMEOUT`].
    #[error(
        "{server} did not start on 127.0.0.1:{port}: {reason}\n--- tail of {} ---\n{log_tail}",
        log.display()
    )]
    StartFailed {
        server: &'static str,
        port: u16,
        reason: String,
        log: PathBuf,
        log_tail: String,
    },
    #[error("failed to create database {name} on postgres at 127.0.0.1:{port}")]
    CreateDatabase {
        name: String,
        port: u16,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{server} on 127.0.0.1:{port} still runs after it was asked to stop")]
    StillRunning { server: &'static str, port: u16 },
}

/// A server process we started, and a watchdog that signals it if this process dies
/// without stopping it (a test killed at its timeout, Ctrl-C, a panic that aborts): the
/// servers daemonise, so nothing else would ever stop them.
#[derive(Debug)]
struct ServerProcess {
    pid: u32,
    /// The process name (`/proc/<pid>/comm`), so that a recycled pid is never signalled.
    name: &'static str,
    _watchdog: Option<Watchdog>,
}

impl ServerProcess {
    /// Follows `pid`, which the watchdog sends `dying_signal` should we die first.
    fn track(pid: u32, name: &'static str, dying_signal: &str) -> Self {
        Self {
            pid,
            name,
            _watchdog: Watchdog::spawn(pid, name, dying_signal),
        }
    }

    /// Whether the process still runs (exited processes whose parent has not reaped them
    /// yet count as gone).
    fn is_alive(&self) -> bool {
        let Ok(stat) = fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        // "<pid> (<name>) <state> ...": the name may itself contain parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            return false;
        };
        let state = stat[close + 1..].trim_start().chars().next();
        &stat[open + 1..close] == self.name && state != Some('Z') && state != Some('X')
    }

    /// Waits up to [`STOP_TIMEOUT`] for the process to exit; whether it did.
    fn wait_gone(&self) -> bool {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.is_alive() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Sends `signal` (unless the process is gone already) and waits for it to exit.
    fn signal_and_wait(&self, signal: &str) -> bool {
        if self.is_alive() {
            let mut kill = Command::new("kill");
            kill.args(["-s", signal, &self.pid.to_string()]);
            let _ = run_blocking(kill);
        }
        self.wait_gone()
    }
}

/// A `sh` that blocks reading a pipe whose only writer is this process, then signals a
/// server: the read ends when this process exits, however it exits. Dropping the watchdog
/// kills it without signalling. It runs in its own process group, so that the Ctrl-C that
/// kills us does not kill it too. It signals the pid only while the process there still
/// bears the server's name: a server that exited on its own may have left its pid to
/// another process (pids wrap at 32,768 here, and a test run forks many more).
#[derive(Debug)]
struct Watchdog(std::process::Child);

impl Watchdog {
    fn spawn(pid: u32, name: &str, signal: &str) -> Option<Self> {
        let script = r#"read _ignored; [ "$(cat /proc/$2/comm 2>/dev/null)" = "$3" ] && kill -s "$1" "$2" 2>/dev/null"#;
        Command::new("sh")
            .args([
                "-c",
                script,
                "engage-watchdog",
                signal,
                &pid.to_string(),
                name,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .inspect_err(
                |error| tracing::warn!(error = %error, pid, "no watchdog for embedded server"),
            )
            .ok()
            .map(Self)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Creates `root` if needed and returns its absolute path.
fn prepare_root(root: &Path) -> Result<PathBuf, EmbeddedError> {
    fs::create_dir_all(root).map_err(io_error("create directory", root))?;
    root.canonicalize()
        .map_err(io_error("resolve directory", root))
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EmbeddedError {
    let path = path.to_path_buf();
    move |source| EmbeddedError::Io {
        action,
        path,
        source,
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, EmbeddedError> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(EmbeddedError::NoFreePort)?;
    let address = listener.local_addr().map_err(EmbeddedError::NoFreePort)?;
    Ok(address.port())
}

/// Whether this process runs with effective user id 0.
fn running_as_root() -> bool {
    // "Uid:" is followed by the real, effective, saved and filesystem ids.
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|line| line.strip_prefix("Uid:"));
    uid.and_then(|ids| ids.split_whitespace().nth(1)) == Some("0")
}

/// The first executable called `name` on PATH, then in the sbin directories root's PATH has.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

async fn run(command: Command) -> Result<Output, EmbeddedError> {
    let description = describe(&command);
    let output = tokio::process::Command::from(command).output().await;
    check_status(description, output)
}

fn run_blocking(mut command: Command) -> Result<Output, EmbeddedError> {
    let description = describe(&command);
    let output = command.output();
    check_status(description, output)
}

fn check_status(command: String, output: io::Result<Output>) -> Result<Output, EmbeddedError> {
    let output = output.map_err(|source| EmbeddedError::Spawn {
        command: command.clone(),
        source,
    })?;
    if output.status.success() {
        return Ok(output);
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    Err(EmbeddedError::CommandFailed {
        command,
        status: output.status,
        output: text.trim().to_owned(),
    })
}

/// The command line, for error messages.
fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |metadata| metadata.len())
}

/// What a log holds from byte `offset` on (what one start wrote).
fn read_from(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).map_or(bytes.len(), |offset| offset.min(bytes.len()));
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The last [`LOG_TAIL_LINES`] lines of `text`.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {

    /// The watchdog fires when its pipe closes (as when this process dies):
    /// it signals the server, but not a process that took over its pid.
    #[test]
    fn the_watchdog_signals_only_the_process_it_was_set_for() {
        use std::os::unix::process::ExitStatusExt;
        for (name, signalled) in [("sleep", true), ("redis-server", false)] {
            let mut server = Command::new("sleep").arg("30").spawn().unwrap();
            let mut watchdog = Watchdog::spawn(server.id(), name, "TERM").unwrap();
            drop(watchdog.0.stdin.take());
            // The watchdog has sent its signal, if any, by the time it exits.
            let _ = watchdog.0.wait();
            if signalled {
                let status = server.wait().unwrap();
                assert_eq!(
                    status.signal(),
                    Some(libc::SIGTERM),
                    "watchdog for `{name}`"
                );
            } else {
                assert!(
                    server.try_wait().unwrap().is_none(),
                    "watchdog for `{name}`"
                );
                let _ = server.kill();
                let _ = server.wait();
            }
        }
    }
    use std::net::TcpStream;

    use super::*;

    async fn connect(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
        client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test]
    async fn postgres_starts_with_logical_replication_and_creates_databases() {
        let dir = tempfile::tempdir().unwrap();
        let mut postgres = EmbeddedPostgres::start(dir.path(), PostgresOptions::default())
            .await
            .unwrap();
        let url = postgres.create_database("engage_test").await.unwrap();
        assert_eq!(
            url,
            format!(
                "postgres://postgres@127.0.0.1:{}/engage_test",
                postgres.port()
            )
        );

        let client = connect(&url).await;
        assert_eq!(show(&client, "wal_level").await, "logical");
        assert_eq!(show(&client, "fsync").await, "off");
        drop(client);

        postgres.stop().unwrap();
        postgres.stop().unwrap();
        assert!(TcpStream::connect(("127.0.0.1", postgres.port())).is_err());
    }

    #[tokio::test]
    async fn postgres_restarts_after_immediate_stop_on_the_same_port_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let options = PostgresOptions {
            extra_settings: vec![("application_name".into(), "it's engage".into())],
            ..PostgresOptions::default()
        };
        let mut postgres = EmbeddedPostgres::start(dir.path(), options).await.unwrap();
        let (port, url) = (postgres.port(), postgres.url("postgres"));
        let client = connect(&url).await;
        let setup = "CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)";
        client.batch_execute(setup).await.unwrap();
        // With synchronous_commit off, a commit survives a crash once a later flush covers it.
        client.batch_execute("CHECKPOINT").await.unwrap();

        postgres.restart_immediate().unwrap();

        assert_eq!(postgres.port(), port);
        let client = connect(&url).await;
        let id: i32 = client
            .query_one("SELECT id FROM kept", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(id, 7);
        assert_eq!(show(&client, "application_name").await, "it's engage");
        let log = fs::read_to_string(postgres.log_path()).unwrap();
        assert!(log.contains("database system was interrupted"));
    }

    #[tokio::test]
    async fn redis_starts_answers_ping_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut redis = EmbeddedRedis::start(dir.path()).await.unwrap();
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));

        let client = ::redis::Client::open(redis.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let pong: String = ::redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(pong, "PONG");
        drop(connection);

        redis.stop().unwrap();
        redis.stop().unwrap();
        assert!(TcpStream::connect(("127.0.0.1", redis.port())).is_err());
    }
}
