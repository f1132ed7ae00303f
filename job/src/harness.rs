//! Running `engage` as a child process: what the benchmark (`bench/process.rs`),
//! the fault suite (`chaos/world.rs`) and the integration tests
//! (`tests/support`) share.
//!
//! Each of them starts a job against its own Postgres, Redis and directories,
//! stops it with SIGTERM (a graceful stop: the job takes a final checkpoint),
//! kills it with SIGKILL to simulate a crash, and shows the end of its log
//! when something goes wrong. They differ in what they watch while it runs
//! (the benchmark reads `/proc` and `--progress`, the tests wait
//! synchronously), so this module holds the parts that must not differ: the
//! command line and environment of a job, the signal, and the log's tail.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a job's outside services and outputs are.
#[derive(Debug, Clone)]
pub struct Services {
    pub postgres_url: String,
    pub redis_url: String,
    /// `ENGAGE_KAFKA_BROKERS`: the brokers of the mission SQL's Kafka sink.
    pub kafka_brokers: String,
    /// `ENGAGE_DATA_DIR`: where the filesystem sinks of the mission SQL write.
    pub data_dir: PathBuf,
}

impl Services {
    /// Puts the services in `command`'s environment, where job SQL's
    /// `${ENGAGE_POSTGRES_URL}`, `${ENGAGE_REDIS_URL}`, `${ENGAGE_KAFKA_BROKERS}`
    /// and `${ENGAGE_DATA_DIR}` find them.
    pub fn apply<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command
            .env("ENGAGE_POSTGRES_URL", &self.postgres_url)
            .env("ENGAGE_REDIS_URL", &self.redis_url)
            .env("ENGAGE_KAFKA_BROKERS", &self.kafka_brokers)
            .env("ENGAGE_DATA_DIR", &self.data_dir)
    }
}

/// `engage <subcommand...> <sql> --checkpoint-dir <dir>` with `services` in
/// its environment, ready for more arguments and its stdio. `exe` is the
/// `engage` binary (the benchmark and the fault suite run their own).
pub fn job_command(
    exe: &Path,
    subcommand: &[&str],
    sql: &Path,
    checkpoint_dir: &Path,
    services: &Services,
) -> Command {
    let mut command = Command::new(exe);
    command
        .args(subcommand)
        .arg(sql)
        .arg("--checkpoint-dir")
        .arg(checkpoint_dir);
    services.apply(&mut command);
    command
}

/// Asks process `pid` to stop gracefully (SIGTERM): a job takes its final
/// checkpoint and exits. A process that is gone already is not an error.
pub fn sigterm(pid: u32) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) with a pid and a signal number has no memory-safety
    // preconditions.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    if sent == 0 {
        return Ok(());
    }
    match std::io::Error::last_os_error() {
        error if error.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        error => Err(error),
    }
}

/// The last `lines` lines of a job's log file (empty if it cannot be read).
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigterm_stops_a_child_and_a_gone_one_is_fine() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        sigterm(child.id()).unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        // No process has this pid (it is above any pid_max).
        sigterm(i32::MAX as u32).unwrap();
    }

    #[test]
    fn the_tail_is_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("job.log");
        std::fs::write(&log, "a\nb\nc\n").unwrap();
        assert_eq!(log_tail(&log, 2), "b\nc");
        assert_eq!(log_tail(&dir.path().join("none.log"), 2), "");
    }
}
