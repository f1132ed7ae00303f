//! Throwaway PostgreSQL and Redis servers for the demo, the tests and the benchmarks.
//!
//! [`EmbeddedPostgres`] initialises a private cluster under a directory the caller owns
//! (`wal_level=logical`, trust authentication, superuser `postgres`) and starts it on a free
//! loopback port; [`EmbeddedRedis`] starts a Redis server (in `redis.rs`). Both run
//! the machine's own binaries (`scripts/install-deps.sh` installs them; our machines have no
//! containers) and both stop their server when dropped, so a failing test leaves nothing
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

mod redis;

pub use redis::{EmbeddedRedis, RedisOptions};

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
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
/// Unix socket paths hold at most 107 bytes and Postgres appends `/.s.PGSQL.<port>.lock`:
/// a longer root puts the socket in `/tmp` instead.
const MAX_SOCKET_DIR_LEN: usize = 80;
/// The system user that owns clusters when we run as root (`chown` uses its group too).
const POSTGRES_USER: &str = "postgres";
/// The file in the data directory holding our settings, included from `postgresql.conf`.
const SETTINGS_FILE: &str = "engage.conf";

const POSTGRES_BINARIES: &str = "postgresql server binaries (initdb, pg_ctl)";
const POSTGRES_INSTALL_HINT: &str = "install them with `sudo apt-get install -y postgresql`";

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

/// How to initialise and configure an [`EmbeddedPostgres`]. The default suits tests.
#[derive(Debug, Clone, Default)]
pub struct PostgresOptions {
    /// Whether the server syncs to disk. `false` (the default) also turns off
    /// `synchronous_commit`: throwaway servers trade durability across an OS crash for
    /// speed. Killing the server (see [`EmbeddedPostgres::restart_immediate`]) still
    /// behaves like a crash: the last commits that were not yet written may be lost.
    pub fsync: bool,
    /// WAL segment size in MB (`initdb --wal-segsize`, a power of two); `None` keeps 16.
    pub wal_segsize_mb: Option<u32>,
    /// Further `postgresql.conf` settings, applied after (so overriding) ours.
    pub extra_settings: Vec<(String, String)>,
}

/// A private PostgreSQL server with logical replication enabled, stopped on drop.
///
/// Its data lives in `root/pgdata` and its log in `root/postgres.log`. Starting on a root
/// that already holds a cluster starts that cluster again (without `initdb`, so
/// `wal_segsize_mb` does not apply), with the settings of the new options.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    tools: PgTools,
    root: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    /// Whether we started the server and have not stopped it since.
    running: bool,
    /// The postmaster, once started.
    postmaster: Option<ServerProcess>,
}

impl EmbeddedPostgres {
    /// Initialises (if needed) and starts a cluster under `root`, and waits until it accepts
    /// connections.
    pub async fn start(root: &Path, options: PostgresOptions) -> Result<Self, EmbeddedError> {
        let is_name = |name: &str| {
            let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
            !name.is_empty() && name.chars().all(allowed)
        };
        if let Some((name, _)) = options
            .extra_settings
            .iter()
            .find(|(name, _)| !is_name(name))
        {
            return Err(EmbeddedError::InvalidSetting(name.clone()));
        }
        let tools = PgTools {
            bindir: find_postgres_bindir().await?,
            as_postgres_user: running_as_root(),
        };
        let root = prepare_root(root)?;
        if tools.as_postgres_user {
            hand_root_to_postgres_user(&root).await?;
        }
        let data_dir = root.join("pgdata");
        let log_path = root.join("postgres.log");
        if data_dir.join("PG_VERSION").is_file() {
            if tools.as_postgres_user {
                run(chown(&data_dir, true)).await?;
            }
        } else {
            let mut initdb = tools.command(&root, "initdb");
            initdb.arg("--pgdata").arg(&data_dir).args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
            ]);
            if !options.fsync {
                initdb.arg("--no-sync");
            }
            if let Some(size) = options.wal_segsize_mb {
                initdb.arg(format!("--wal-segsize={size}"));
            }
            run(initdb).await?;
        }
        if tools.as_postgres_user && log_path.exists() {
            run(chown(&log_path, false)).await?;
        }
        include_settings_file(&data_dir)?;

        let socket_dir = if root.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
            root.clone()
        } else {
            PathBuf::from("/tmp")
        };
        let mut postgres = Self {
            tools,
            root,
            data_dir,
            log_path,
            port: 0,
            running: false,
            postmaster: None,
        };
        let mut attempts_left = 2;
        loop {
            attempts_left -= 1;
            postgres.port = free_port()?;
            write_settings(&postgres.data_dir, postgres.port, &socket_dir, &options)?;
            let log_offset = file_len(&postgres.log_path);
            // Set before starting so that a timed-out start is still stopped on drop.
            postgres.running = true;
            let started = run(postgres.pg_ctl_start()).await;
            match postgres.finish_start(started, log_offset) {
                Ok(()) => return Ok(postgres),
                Err(EmbeddedError::StartFailed { log_tail, .. })
                    if attempts_left > 0 && log_tail.contains("Address already in use") => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// The port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as the superuser `postgres` (no password). The name
    /// is not percent-encoded.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, EmbeddedError> {
        let error = |source| EmbeddedError::CreateDatabase {
            name: name.to_owned(),
            port: self.port,
            source,
        };
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .map_err(error)?;
        let connection = tokio::spawn(connection);
        let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        let created = client.batch_execute(&statement).await.map_err(error);
        drop(client);
        // The connection task ends once the client is gone; its result adds nothing.
        let _ = connection.await;
        created?;
        Ok(self.url(name))
    }

    /// Stops the server (`pg_ctl stop -m fast`), waiting until it has exited. Idempotent.
    pub fn stop(&mut self) -> Result<(), EmbeddedError> {
        self.shut_down(Shutdown::Fast)
    }

    /// Kills the server as a crash would (`pg_ctl stop -m immediate`: no checkpoint, so it
    /// recovers from the WAL), then starts it again on the same port and waits until it
    /// accepts connections. Starts a stopped server.
    pub fn restart_immediate(&mut self) -> Result<(), EmbeddedError> {
        self.shut_down(Shutdown::Immediate)?;
        let log_offset = file_len(&self.log_path);
        self.running = true;
        let started = run_blocking(self.pg_ctl_start());
        self.finish_start(started, log_offset)
    }

    /// The server log, which every start appends to.
    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }

    fn pg_ctl_start(&self) -> Command {
        let mut command = self.tools.command(&self.root, "pg_ctl");
        command
            .arg("start")
            .arg("--pgdata")
            .arg(&self.data_dir)
            .arg("--log")
            .arg(&self.log_path)
            .args(["--wait", "--timeout"])
            .arg(READY_TIMEOUT.as_secs().to_string())
            .arg("--silent");
        command
    }

    /// After `pg_ctl start` returned: follows the postmaster named in `postmaster.pid`, and
    /// on failure stops whatever did start and quotes the log written since `log_offset`.
    fn finish_start(
        &mut self,
        started: Result<Output, EmbeddedError>,
        log_offset: u64,
    ) -> Result<(), EmbeddedError> {
        let pid_file = fs::read_to_string(self.data_dir.join("postmaster.pid")).unwrap_or_default();
        let pid = pid_file
            .lines()
            .next()
            .and_then(|line| line.trim().parse().ok());
        self.postmaster = pid.map(|pid| ServerProcess::track(pid, "postgres", "QUIT"));
        let Err(error) = started else {
            return Ok(());
        };
        // Best effort: nothing runs when the postmaster exited by itself.
        let _ = self.shut_down(Shutdown::Immediate);
        Err(EmbeddedError::StartFailed {
            server: "postgres",
            port: self.port,
            reason: error.to_string(),
            log: self.log_path.clone(),
            log_tail: tail(&read_from(&self.log_path, log_offset)),
        })
    }

    /// Stops the server with `pg_ctl stop` and waits until it has exited. When that fails,
    /// for instance because the data directory was deleted under the server (pg_ctl then
    /// finds no pid file), the postmaster is signalled directly.
    fn shut_down(&mut self, mode: Shutdown) -> Result<(), EmbeddedError> {
        if !self.running {
            return Ok(());
        }
        let (mode_name, signal) = match mode {
            Shutdown::Fast => ("fast", "INT"),
            Shutdown::Immediate => ("immediate", "QUIT"),
        };
        let mut command = self.tools.command(&self.root, "pg_ctl");
        command
            .arg("stop")
            .arg("--pgdata")
            .arg(&self.data_dir)
            .args(["--mode", mode_name, "--wait", "--silent"]);
        let stopped = match run_blocking(command) {
            Ok(_) => Ok(()),
            Err(error) => match &self.postmaster {
                Some(postmaster) if postmaster.signal_and_wait(signal) => Ok(()),
                None if error.to_string().contains("Is server running?") => Ok(()),
                _ => Err(error),
            },
        };
        if stopped.is_ok() {
            self.running = false;
            self.postmaster = None;
        }
        stopped
    }
}

#[derive(Debug, Clone, Copy)]
enum Shutdown {
    /// Disconnect clients, write a checkpoint, exit.
    Fast,
    /// Exit at once, as a crash would: the next start recovers from the WAL.
    Immediate,
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Err(error) = self.shut_down(Shutdown::Immediate) {
            tracing::warn!(error = %error, port = self.port, "failed to stop embedded postgres");
            // Its watchdog stops the server when this process exits.
            std::mem::forget(self.postmaster.take());
        }
    }
}

/// Runs the cluster's tools: directly, or as the `postgres` user when we are root.
#[derive(Debug, Clone)]
struct PgTools {
    bindir: PathBuf,
    as_postgres_user: bool,
}

impl PgTools {
    /// A command for `tool`, run in `cwd` (which the `postgres` user must be able to enter).
    fn command(&self, cwd: &Path, tool: &str) -> Command {
        let program = self.bindir.join(tool);
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", POSTGRES_USER, "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.current_dir(cwd);
        command
    }
}

/// The directory holding `initdb` and `pg_ctl`: `pg_config --bindir` when it has them, else
/// the newest `/usr/lib/postgresql/<version>/bin` (Debian's layout).
async fn find_postgres_bindir() -> Result<PathBuf, EmbeddedError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(output) = tokio::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .await
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let newest = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let dir = entry.path().join("bin");
            has_server(&dir).then_some((version, dir))
        })
        .max();
    newest
        .map(|(_, dir)| dir)
        .ok_or(EmbeddedError::MissingBinary {
            what: POSTGRES_BINARIES,
            install_hint: POSTGRES_INSTALL_HINT,
        })
}

/// Gives the root directory itself (not its contents) to the `postgres` user, and checks
/// that the user can reach it.
async fn hand_root_to_postgres_user(root: &Path) -> Result<(), EmbeddedError> {
    let mut id = Command::new("id");
    id.args(["-u", POSTGRES_USER]);
    run(id).await.map_err(|_| EmbeddedError::NoPostgresUser)?;
    run(chown(root, false)).await?;
    let mut check = Command::new("runuser");
    // Fails only when a parent directory is closed to the user: it owns `root` itself now.
    check
        .args(["-u", POSTGRES_USER, "--", "test", "-w"])
        .arg(root);
    run(check)
        .await
        .map_err(|_| EmbeddedError::RootNotAccessible(root.to_path_buf()))?;
    Ok(())
}

fn chown(path: &Path, recursive: bool) -> Command {
    let mut command = Command::new("chown");
    if recursive {
        command.arg("-R");
    }
    command.arg("postgres:postgres").arg(path);
    command
}

/// Makes `postgresql.conf` include our settings file (once).
fn include_settings_file(data_dir: &Path) -> Result<(), EmbeddedError> {
    let path = data_dir.join("postgresql.conf");
    let conf = fs::read_to_string(&path).map_err(io_error("read", &path))?;
    let include = format!("include_if_exists = '{SETTINGS_FILE}'");
    if !conf.lines().any(|line| line.trim() == include) {
        let conf = format!(
            "{}\n# Settings of engage's embedded server.\n{include}\n",
            conf.trim_end()
        );
        fs::write(&path, conf).map_err(io_error("write", &path))?;
    }
    Ok(())
}

/// Writes our settings file; later lines win, so `extra_settings` override ours.
fn write_settings(
    data_dir: &Path,
    port: u16,
    socket_dir: &Path,
    options: &PostgresOptions,
) -> Result<(), EmbeddedError> {
    let mut settings: Vec<(&str, String)> = vec![
        ("listen_addresses", "127.0.0.1".into()),
        ("port", port.to_string()),
        ("unix_socket_directories", socket_dir.display().to_string()),
        ("wal_level", "logical".into()),
        ("max_replication_slots", "20".into()),
        ("max_wal_senders", "20".into()),
        ("wal_sender_timeout", "10s".into()),
    ];
    if !options.fsync {
        settings.push(("fsync", "off".into()));
        settings.push(("synchronous_commit", "off".into()));
    }
    settings.extend(
        options
            .extra_settings
            .iter()
            .map(|(name, value)| (name.as_str(), value.clone())),
    );
    let mut text = String::from("# Written by engage at every start of its embedded server.\n");
    for (name, value) in settings {
        let value = value.replace('\\', "\\\\").replace('\'', "''");
        text.push_str(&format!("{name} = '{value}'\n"));
    }
    let path = data_dir.join(SETTINGS_FILE);
    fs::write(&path, text).map_err(io_error("write", &path))?;
    // Readable by the server's user whatever our umask (we may be root writing for postgres).
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(io_error("chmod", &path))
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
            _watchdog: Watchdog::spawn(pid, dying_signal),
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
/// kills us does not kill it too.
#[derive(Debug)]
struct Watchdog(std::process::Child);

impl Watchdog {
    fn spawn(pid: u32, signal: &str) -> Option<Self> {
        let script = r#"read _ignored; kill -s "$1" "$2" 2>/dev/null"#;
        Command::new("sh")
            .args(["-c", script, "engage-watchdog", signal, &pid.to_string()])
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
fn free_port() -> Result<u16, EmbeddedError> {
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

    #[test]
    fn settings_are_quoted_for_postgresql_conf() {
        let dir = tempfile::tempdir().unwrap();
        let options = PostgresOptions {
            fsync: true,
            wal_segsize_mb: None,
            extra_settings: vec![("cluster_name".into(), r"a'b\c".into())],
        };
        write_settings(dir.path(), 5433, Path::new("/tmp"), &options).unwrap();
        let text = fs::read_to_string(dir.path().join(SETTINGS_FILE)).unwrap();
        assert!(text.contains("port = '5433'\n"));
        assert!(text.contains("wal_level = 'logical'\n"));
        assert!(text.contains(r"cluster_name = 'a''b\\c'"));
        assert!(!text.contains("fsync"));
    }
}
