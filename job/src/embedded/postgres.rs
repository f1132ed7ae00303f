//! The throwaway PostgreSQL server (see the module docs of `embedded`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{
    file_len, free_port, io_error, prepare_root, read_from, run, run_blocking, running_as_root,
    tail, EmbeddedError, ServerProcess, READY_TIMEOUT,
};

/// Unix socket paths hold at most 107 bytes and Postgres appends `/.s.PGSQL.<port>.lock`:
/// a longer root puts the socket in `/tmp` instead.
const MAX_SOCKET_DIR_LEN: usize = 80;
/// The system user that owns clusters when we run as root (`chown` uses its group too).
const POSTGRES_USER: &str = "postgres";
/// The file in the data directory holding our settings, included from `postgresql.conf`.
const SETTINGS_FILE: &str = "engage.conf";

const POSTGRES_BINARIES: &str = "postgresql server binaries (initdb, pg_ctl)";
const POSTGRES_INSTALL_HINT: &str = "install them with `sudo apt-get install -y postgresql`";

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

#[cfg(test)]
mod tests {
    use super::*;

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
