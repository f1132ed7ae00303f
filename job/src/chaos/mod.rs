//! `engage chaos`: the fault suite. It runs a seeded workload through the
//! mission SQL against real Postgres, Redis and a Kafka-protocol broker
//! (Tansu) on private ports, injects
//! faults, and then compares every sink with an oracle (see [`oracle`]).
//!
//! # Scenarios
//!
//! Each scenario gets fresh servers, directories and slot, so one scenario's
//! damage cannot hide another's. The job always runs as a child process
//! (this binary's `run`, checkpoint interval 1 s, every checkpoint kept), so it
//! can be killed like a real deployment would be:
//!
//! 1. `kill-storm`: SIGKILL at seeded points of the workload, plus
//!    two clean restarts; each restart is timed to the first change applied.
//! 2. `crash-points`: the job dies (SIGKILL to itself) at each failpoint of
//!    [`crate::failpoint::POINTS`], several times each.
//! 3. `postgres-restart`: `pg_ctl -m immediate` while the job streams; the job
//!    restarts itself from its checkpoint and counts what it suppressed.
//! 4. `redis-outage`: Redis down for `--outage-secs`, then restarted
//!    (append-only, `appendfsync always`); then restarted again *without*
//!    its data, which the job must detect and rebuild.
//! 5. `bad-input`: ~1% bad events of every kind the mission SQL checks.
//! 6. `kafka-outage`: the Kafka broker hangs (SIGSTOP) for `--outage-secs`,
//!    then resumes with its data; then it restarts *without* its data, which
//!    the job must detect and rebuild (`chaos/scenarios/kafka.rs`).
//!
//! Every scenario runs the same seeded workload ([`workload`]): inserts,
//! updates, deletes, content changes, out-of-order and late events (and bad
//! events in `bad-input`), so every kind of change meets every fault. Each
//! fault is checked to have hit work in flight: a kill waits until the sinks
//! hold changes no checkpoint covers, and the line says how many changes the
//! restarted jobs read again.
//!
//! # The end of a scenario
//!
//! The workload stops after its quiet tail. Kill storm, crash points and bad
//! input then stop the running job with SIGTERM and drain the stream in a
//! fresh `engage run --end-lsn END`. The Postgres restart and the Redis and
//! Kafka outage scenarios end *in place*: the job that restarted itself or rebuilt a sink
//! runs until its slot is confirmed past END, and is checked as it is. Then
//! the oracle ([`oracle`]) runs. A scenario passes when every output matches
//! it: lost = 0, duplicated = 0, no wrong value or window.
//!
//! # Limits
//!
//! - The oracle is Postgres itself: the rows it holds at the end, and the
//!   history its triggers kept, are the changes that happened. An immediate
//!   Postgres restart can lose commits acknowledged to the workload
//!   (`synchronous_commit = off`), but never one the job saw: walsenders
//!   send only flushed WAL.
//! - Kill moments are seeded; what the job is doing at that moment depends on
//!   timing, so two runs with one seed inject the same faults, not the same
//!   interleavings.

pub mod oracle;
mod scenarios;
pub mod workload;
mod world;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use oracle::SinkCheck;

/// `engage chaos` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosOptions {
    /// Events per scenario [default: 200000; 1000000 with --full; 20000 with --quick].
    #[arg(long)]
    pub events: Option<u64>,
    /// The full run: 1,000,000 events per scenario.
    #[arg(long, conflicts_with = "quick")]
    pub full: bool,
    /// The reduced form CI runs: 20,000 events, 3 kills, 1 repeat per crash
    /// point, 1 Postgres restart, a 5 s Redis outage.
    #[arg(long)]
    pub quick: bool,
    /// SIGKILLs in the kill storm [default: 10; 3 with --quick].
    #[arg(long)]
    pub kills: Option<u32>,
    /// Crashes per failpoint [default: 3; 1 with --quick].
    #[arg(long)]
    pub crash_repeats: Option<u32>,
    /// Immediate Postgres restarts [default: 3; 1 with --quick].
    #[arg(long)]
    pub postgres_restarts: Option<u32>,
    /// Seconds Redis stays down [default: 30; 5 with --quick].
    #[arg(long)]
    pub outage_secs: Option<u64>,
    /// Ordinary inserts per second the workload commits [default: 10000; 4000 with --quick].
    #[arg(long)]
    pub rate: Option<u64>,
    /// Seed of the workload and of every fault moment.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Scenarios to run, comma-separated [default: all]: kill-storm,
    /// crash-points, postgres-restart, redis-outage, bad-input, kafka-outage.
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "chaos-report.json")]
    pub report: PathBuf,
    /// Keep the servers' and job's directories of every scenario (printed).
    #[arg(long)]
    pub keep: bool,
}

/// Every scenario, in the order they run.
pub const SCENARIOS: [&str; 6] = [
    "kill-storm",
    "crash-points",
    "postgres-restart",
    "redis-outage",
    "bad-input",
    "kafka-outage",
];

/// Options with every default filled in.
#[derive(Debug, Clone)]
struct Settings {
    events: u64,
    kills: u32,
    crash_repeats: u32,
    postgres_restarts: u32,
    outage: Duration,
    rate: u64,
    seed: u64,
    keep: bool,
}

impl ChaosOptions {
    fn settings(&self) -> Settings {
        let quick = self.quick;
        let events = self.events.unwrap_or(if self.full {
            1_000_000
        } else if quick {
            20_000
        } else {
            200_000
        });
        Settings {
            events,
            kills: self.kills.unwrap_or(if quick { 3 } else { 10 }),
            crash_repeats: self.crash_repeats.unwrap_or(if quick { 1 } else { 3 }),
            postgres_restarts: self.postgres_restarts.unwrap_or(if quick { 1 } else { 3 }),
            outage: Duration::from_secs(self.outage_secs.unwrap_or(if quick { 5 } else { 30 })),
            rate: self.rate.unwrap_or(if quick { 4_000 } else { 10_000 }),
            seed: self.seed,
            keep: self.keep,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("{0}")]
    Failed(String),
    #[error("unknown scenario `{0}`; the scenarios are {list}", list = SCENARIOS.join(", "))]
    UnknownScenario(String),
    #[error("{failed} of {run} scenarios failed; see the lines above and {report}")]
    ScenariosFailed {
        failed: usize,
        run: usize,
        report: String,
    },
}

/// Wraps an error, and the errors it wraps, with what was being done.
fn context<E: std::error::Error>(what: impl Into<String>) -> impl FnOnce(E) -> ChaosError {
    let what = what.into();
    move |error| {
        let mut message = format!("{what}: {error}");
        let mut source = error.source();
        while let Some(inner) = source {
            message.push_str(&format!(": {inner}"));
            source = inner.source();
        }
        ChaosError::Failed(message)
    }
}

/// What one scenario did and found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ScenarioReport {
    pub scenario: String,
    pub passed: bool,
    /// Events committed to Postgres (the oracle's input).
    pub events: u64,
    pub elapsed_secs: f64,
    /// What was injected, e.g. "10 SIGKILL + 2 SIGTERM".
    pub faults: String,
    /// Figures particular to the scenario (name, value).
    pub figures: Vec<(String, f64)>,
    pub sinks: Vec<SinkCheck>,
    /// Why the scenario failed, if it did.
    pub problems: Vec<String>,
    /// The scenario's directory, when kept.
    pub dir: Option<String>,
}

impl ScenarioReport {
    fn figure(&mut self, name: &str, value: f64) {
        self.figures.push((name.to_string(), value));
    }

    /// The one line printed for the scenario.
    fn line(&self) -> String {
        let lost: u64 = self.sinks.iter().map(|s| s.lost).sum();
        let duplicated: u64 = self.sinks.iter().map(|s| s.duplicated).sum();
        let figures: Vec<String> = self
            .figures
            .iter()
            .map(|(name, value)| format!("{name}={}", trim(*value)))
            .collect();
        format!(
            "{:<17} {} events={} faults=[{}] sinks={} lost={} duplicated={} {} ({:.0} s)",
            self.scenario,
            if self.passed { "PASS" } else { "FAIL" },
            self.events,
            self.faults,
            self.sinks.len(),
            lost,
            duplicated,
            figures.join(" "),
            self.elapsed_secs
        )
    }
}

fn trim(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value:.3}")
    }
}

/// The JSON report.
#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub events_per_scenario: u64,
    pub build: &'static str,
    pub scenarios: Vec<ScenarioReport>,
}

/// Runs the chosen scenarios, prints one line each, writes the JSON report,
/// and fails if any scenario failed.
pub async fn run(options: ChaosOptions) -> Result<ChaosReport, ChaosError> {
    let chosen: Vec<String> = if options.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        options.scenarios.clone()
    };
    if let Some(unknown) = chosen.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        return Err(ChaosError::UnknownScenario(unknown.clone()));
    }
    let settings = options.settings();
    let mut report = ChaosReport {
        seed: settings.seed,
        events_per_scenario: settings.events,
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        scenarios: Vec::new(),
    };
    for name in &chosen {
        eprintln!("[chaos] {name}: starting");
        let scenario = scenarios::run(name, &settings).await;
        println!("{}", scenario.line());
        for problem in &scenario.problems {
            println!("    {problem}");
        }
        report.scenarios.push(scenario);
        let json = serde_json::to_string_pretty(&report).expect("report serialises") + "\n";
        std::fs::write(&options.report, json).map_err(context(format!(
            "failed to write {}",
            options.report.display()
        )))?;
    }
    println!("report: {}", options.report.display());
    let failed = report.scenarios.iter().filter(|s| !s.passed).count();
    if failed > 0 {
        return Err(ChaosError::ScenariosFailed {
            failed,
            run: report.scenarios.len(),
            report: options.report.display().to_string(),
        });
    }
    Ok(report)
}
