//! The job under measurement, as a child process: started with this binary's
//! `run`, its stderr copied to a log file (and its `--progress` totals kept),
//! its memory and CPU read from `/proc/<pid>`, stopped with SIGTERM, and
//! killed with SIGKILL if dropped before it exited.
//!
//! An exited child stays a zombie until it is reaped, and `/proc/<pid>/stat`
//! of a zombie still holds its final CPU times (its memory lines are gone),
//! so [`JobProcess::wait_exit`] polls for the zombie before reaping it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::task::JoinHandle;

use super::{context, lock, BenchError, Usage, World};
use crate::harness;

/// Units of the times in `/proc/<pid>/stat` (`USER_HZ`, 100 on every Linux ABI).
const CLOCK_TICKS: f64 = 100.0;

/// What the job's stderr said: `--progress` totals and the last lines.
#[derive(Default)]
struct JobLog {
    /// (when read, changes read so far), one per `--progress` line.
    progress: Vec<(Instant, u64)>,
    tail: VecDeque<String>,
}

/// A job child process; killed if dropped before it exited.
pub(super) struct JobProcess {
    child: Child,
    pid: u32,
    log_path: PathBuf,
    usage: Usage,
    log: Arc<Mutex<JobLog>>,
    reader: Option<JoinHandle<()>>,
    reaped: bool,
}

impl JobProcess {
    pub(super) fn spawn(
        world: &World,
        end_lsn: Option<&str>,
        log_name: &str,
    ) -> Result<JobProcess, BenchError> {
        let mut command = world.command(&["run"])?;
        command.arg("--progress");
        if let Some(lsn) = end_lsn {
            command.args(["--end-lsn", lsn]);
            if let Ok(wrapper) = std::env::var(DRAIN_WRAPPER) {
                if !wrapper.trim().is_empty() {
                    command = wrapped(&wrapper, &command);
                }
            }
        }
        let mut child = Command::from(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(context("failed to start the job (engage run)"))?;
        let log_path = world.root.join(log_name);
        let log = Arc::new(Mutex::new(JobLog::default()));
        let reader = child.stderr.take().map(|stderr| {
            let copy = read_log(stderr, log_path.clone(), log.clone());
            tokio::spawn(copy)
        });
        let mut job = JobProcess {
            pid: child.id().unwrap_or(0),
            child,
            log_path,
            usage: Usage::default(),
            log,
            reader,
            reaped: false,
        };
        job.check_running()?;
        Ok(job)
    }

    /// Reads `/proc/<pid>/stat` (and `status` while it runs) into `usage`;
    /// returns the state letter (`Z`: exited, not yet reaped) or `None` once gone.
    fn sample(&mut self) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // The fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let state = fields.first()?.chars().next()?;
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
            self.usage.cpu_secs = (user + system) as f64 / CLOCK_TICKS;
        }
        if state != 'Z' {
            let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid));
            for line in status.unwrap_or_default().lines() {
                let kb = || line.split_whitespace().nth(1).and_then(|v| v.parse().ok());
                if line.starts_with("VmHWM:") {
                    self.usage.peak_rss_kb = kb().unwrap_or(self.usage.peak_rss_kb);
                } else if line.starts_with("VmRSS:") {
                    self.usage.rss_kb = kb().unwrap_or(self.usage.rss_kb);
                }
            }
        }
        Some(state)
    }

    pub(super) fn sample_usage(&mut self) -> Usage {
        self.sample();
        self.usage
    }

    /// Changes per second between the first and last `--progress` line since `from`.
    pub(super) fn processed_per_sec(&self, from: Instant) -> Option<f64> {
        let log = lock(&self.log);
        let mut lines = log.progress.iter().filter(|(at, _)| *at >= from);
        let (t0, n0) = *lines.next()?;
        let (t1, n1) = *lines.next_back()?;
        Some(n1.saturating_sub(n0) as f64 / t1.duration_since(t0).as_secs_f64())
    }

    pub(super) fn check_running(&mut self) -> Result<(), BenchError> {
        match self.sample() {
            Some(state) if state != 'Z' => Ok(()),
            _ => Err(self.failure("exited unexpectedly")),
        }
    }

    /// An error naming what went wrong, with the end of the job's log.
    pub(super) fn failure(&self, what: &str) -> BenchError {
        let tail = Vec::from(lock(&self.log).tail.clone()).join("\n");
        let log = self.log_path.display();
        BenchError::Failed(format!("the job {what}; the end of its log {log}:\n{tail}"))
    }

    /// Sends SIGTERM (a graceful stop with a final checkpoint) and waits for the exit.
    pub(super) async fn terminate(&mut self, timeout: Duration) -> Result<Usage, BenchError> {
        harness::sigterm(self.pid).map_err(context("failed to signal the job"))?;
        self.wait_exit(timeout).await
    }

    /// Waits until the job exits, reading its usage to the end, then reaps it.
    pub(super) async fn wait_exit(&mut self, timeout: Duration) -> Result<Usage, BenchError> {
        let deadline = Instant::now() + timeout;
        while matches!(self.sample(), Some(state) if state != 'Z') {
            if Instant::now() > deadline {
                return Err(self.failure(&format!("did not exit within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = self.child.wait().await;
        let status = status.map_err(context("failed to wait for the job"))?;
        self.reaped = true;
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        if !status.success() {
            return Err(self.failure(&format!("failed ({status})")));
        }
        Ok(self.usage)
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        if !self.reaped {
            // SIGKILL; tokio reaps the orphan.
            let _ = self.child.start_kill();
        }
    }
}

/// Copies the job's stderr to its log file, keeping the last lines and the
/// `--progress` totals (`N changes/s | TOTAL total | ...`).
async fn read_log(stderr: ChildStderr, path: PathBuf, log: Arc<Mutex<JobLog>>) {
    let mut file = tokio::fs::File::create(&path).await.ok();
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(file) = file.as_mut() {
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
        }
        let mut log = lock(&log);
        if let Some(total) = progress_total(&line) {
            log.progress.push((Instant::now(), total));
        }
        if log.tail.len() == 20 {
            log.tail.pop_front();
        }
        log.tail.push_back(line);
    }
}

fn progress_total(line: &str) -> Option<u64> {
    let total = line.split(" | ").nth(1)?.strip_suffix(" total")?;
    total.trim().parse().ok()
}

/// A command the drains (`engage run --end-lsn`, which end by themselves)
/// run under, as `heaptrack -o /tmp/drain` or `perf record -g -o
/// /tmp/perf.data`: the drain runs as its last arguments. For profiling
/// only: the bench then samples the wrapper's memory and CPU, not the job's.
const DRAIN_WRAPPER: &str = "ENGAGE_BENCH_DRAIN_WRAPPER";

/// `command` run by `wrapper` (words split at spaces), with its environment.
fn wrapped(wrapper: &str, command: &std::process::Command) -> std::process::Command {
    let mut words = wrapper.split_whitespace();
    let mut outer = std::process::Command::new(words.next().expect("not empty"));
    outer
        .args(words)
        .arg(command.get_program())
        .args(command.get_args());
    for (name, value) in command.get_envs() {
        if let Some(value) = value {
            outer.env(name, value);
        }
    }
    outer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_give_the_total() {
        let line = "5012 changes/s | 120345 total | behind 12 KiB | checkpoint 4";
        assert_eq!(progress_total(line), Some(120_345));
        assert_eq!(progress_total("INFO engage: started"), None);
    }
}
