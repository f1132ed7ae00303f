//! [`EmbeddedRedis`]: a private Redis server on a free loopback port.
//!
//! By default it keeps nothing on disk. With [`RedisOptions::durable`] it
//! logs every write to an append-only file fsynced before the reply
//! (`appendfsync always`), so a restart ([`EmbeddedRedis::restart`]) keeps
//! every acknowledged write; [`EmbeddedRedis::restart_empty`] restarts it
//! with its files deleted, as a lost disk would. Both restarts reuse the port,
//! so clients reconnect to the same address.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    file_len, find_on_path, free_port, io_error, prepare_root, read_from, run, run_blocking, tail,
    EmbeddedError, ServerProcess, READY_TIMEOUT,
};

const REDIS_BINARY: &str = "redis-server";
const REDIS_INSTALL_HINT: &str = "install it with `sudo apt-get install -y redis-server`";
/// Where a durable server keeps its append-only files, under its root.
const DATA_DIR: &str = "data";

/// How an [`EmbeddedRedis`] keeps its data.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `appendonly yes`, `appendfsync always`: every acknowledged write survives a restart.
    pub durable: bool,
    /// Further `redis-server` arguments (e.g. `--tls-port` and its files).
    pub extra_args: Vec<String>,
}

/// A private Redis server, stopped on drop.
///
/// Its pid file and log are `root/redis.pid` and `root/redis.log`: one server per root.
#[derive(Debug)]
pub struct EmbeddedRedis {
    server: PathBuf,
    root: PathBuf,
    options: RedisOptions,
    port: u16,
    pid_path: PathBuf,
    log_path: PathBuf,
    /// Whether we started the server and have not stopped it since.
    running: bool,
    /// The server process, once it answered.
    process: Option<ServerProcess>,
}

impl EmbeddedRedis {
    /// Starts a server that keeps nothing on disk under `root` and waits until it answers `PING`.
    pub async fn start(root: &Path) -> Result<Self, EmbeddedError> {
        Self::start_with(root, RedisOptions::default()).await
    }

    /// Starts a server under `root` with `options` and waits until it answers `PING`.
    pub async fn start_with(root: &Path, options: RedisOptions) -> Result<Self, EmbeddedError> {
        let server = find_on_path(REDIS_BINARY).ok_or(EmbeddedError::MissingBinary {
            what: REDIS_BINARY,
            install_hint: REDIS_INSTALL_HINT,
        })?;
        let root = prepare_root(root)?;
        let mut redis = Self {
            server,
            options,
            port: 0,
            pid_path: root.join("redis.pid"),
            log_path: root.join("redis.log"),
            root,
            running: false,
            process: None,
        };
        let mut attempts_left = 2;
        loop {
            attempts_left -= 1;
            let port = free_port()?;
            match redis.launch(port).await {
                Err(EmbeddedError::StartFailed { log_tail, .. })
                    if attempts_left > 0 && log_tail.contains("Address already in use") =>
                {
                    continue
                }
                outcome => return outcome.map(|()| redis),
            }
        }
    }

    /// Starts the server process on `port` and waits until it answers.
    async fn launch(&mut self, port: u16) -> Result<(), EmbeddedError> {
        self.port = port;
        let data_dir = self.root.join(DATA_DIR);
        fs::create_dir_all(&data_dir).map_err(io_error("create directory", &data_dir))?;
        let log_offset = file_len(&self.log_path);
        // A pid file left by an earlier server must not be taken for this one's.
        let _ = fs::remove_file(&self.pid_path);
        let mut command = Command::new(&self.server);
        command.arg("--port").arg(self.port.to_string()).args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]);
        if self.options.durable {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        command.args(&self.options.extra_args);
        command
            .args(["--daemonize", "yes", "--pidfile"])
            .arg(&self.pid_path)
            .arg("--logfile")
            .arg(&self.log_path)
            .arg("--dir")
            .arg(&data_dir)
            .current_dir(&self.root);
        run(command).await?;
        self.running = true;
        let ready = self.wait_ready(log_offset).await;
        let pid = fs::read_to_string(&self.pid_path).unwrap_or_default();
        self.process = pid
            .trim()
            .parse()
            .ok()
            .map(|pid| ServerProcess::track(pid, "redis-server", "TERM"));
        let Err(reason) = ready else {
            return Ok(());
        };
        let _ = self.stop();
        let log = read_from(&self.log_path, log_offset);
        Err(EmbeddedError::StartFailed {
            server: "redis",
            port: self.port,
            reason,
            log: self.log_path.clone(),
            log_tail: tail(&log),
        })
    }

    /// Starts a stopped server again on the same port, with the data it kept
    /// (all acknowledged writes if durable, nothing otherwise).
    pub async fn restart(&mut self) -> Result<(), EmbeddedError> {
        self.stop()?;
        self.launch(self.port).await
    }

    /// Stops the server, deletes its data files, and starts it again on the
    /// same port: Redis comes back empty, as after a lost disk.
    pub async fn restart_empty(&mut self) -> Result<(), EmbeddedError> {
        self.stop()?;
        let data_dir = self.root.join(DATA_DIR);
        match fs::remove_dir_all(&data_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove directory", &data_dir)(e)),
        }
        self.launch(self.port).await
    }

    /// The port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's URL, `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }

    /// Shuts the server down without an RDB save (`redis-cli shutdown nosave`,
    /// else SIGTERM) and waits until it has exited. A durable server's
    /// append-only file already holds every acknowledged write. Idempotent.
    pub fn stop(&mut self) -> Result<(), EmbeddedError> {
        if !self.running {
            return Ok(());
        }
        let mut shutdown = Command::new("redis-cli");
        shutdown
            .arg("-p")
            .arg(self.port.to_string())
            .args(["shutdown", "nosave"]);
        let asked = run_blocking(shutdown).is_ok();
        let stopped = match &self.process {
            Some(process) => (asked && process.wait_gone()) || process.signal_and_wait("TERM"),
            None => asked,
        };
        if !stopped {
            return Err(EmbeddedError::StillRunning {
                server: "redis",
                port: self.port,
            });
        }
        self.running = false;
        self.process = None;
        Ok(())
    }

    /// Polls `PING` until it answers, the log shows that the server gave up, or
    /// [`READY_TIMEOUT`] passes; the error is the reason.
    async fn wait_ready(&self, log_offset: u64) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if answers_ping(self.port).await {
                return Ok(());
            }
            let log = read_from(&self.log_path, log_offset);
            if log.contains("aborting") || log.contains("Fatal") {
                return Err("the server exited".into());
            }
            if Instant::now() > deadline {
                return Err(format!("no answer to PING within {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for EmbeddedRedis {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::warn!(error = %error, port = self.port, "failed to stop embedded redis");
            // Its watchdog stops the server when this process exits.
            std::mem::forget(self.process.take());
        }
    }
}

/// Whether a Redis server on `port` answers `PING` with `PONG`.
async fn answers_ping(port: u16) -> bool {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0u8; 16];
        let read = stream.read(&mut reply).await?;
        io::Result::Ok(reply[..read].starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), exchange).await,
        Ok(Ok(true))
    )
}
