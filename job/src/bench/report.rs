//! The figures of `engage bench`: the JSON report's types, freshness
//! percentiles, and the one line per figure printed at the end.

use std::time::Duration;

use serde::Serialize;

use super::BenchOptions;

/// Every figure of a run, as written to the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub options: BenchOptions,
    /// `release` or `debug` (whose figures mean little).
    pub build: &'static str,
    pub cores: usize,
    pub content_items: usize,
    pub phases: Vec<PhaseReport>,
    /// Single markers on an otherwise idle stream (`--idle-markers`).
    pub idle: Option<IdleReport>,
    pub burst: BurstReport,
    /// The same drain over a few very large transactions (`--large-transactions`).
    pub large_transactions: Option<BurstReport>,
    /// The streaming job of the freshness phases, from start to stop.
    pub live_job: Usage,
    /// Rows its `late_events` output got: events the wall clock declared
    /// late, as the generator stamps every event with its batch's time.
    pub live_late_events: Option<u64>,
    /// Both job processes: the higher peak RSS, the sum of CPU seconds.
    pub job_overall: Usage,
    /// The newest checkpoint, after the burst.
    pub state: StateReport,
}

/// One steady-rate phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub rate: u64,
    pub seconds: f64,
    /// Generated and marker events per second.
    pub generated_per_sec: f64,
    /// Changes the job read per second (`None`: too few `--progress` lines).
    pub processed_per_sec: Option<f64>,
    /// Job CPU seconds per second (1.0 = one core busy).
    pub job_cpu_cores: f64,
    pub job_rss_kb: u64,
    pub top_content: Percentiles,
    pub recent: Percentiles,
    /// Commit to a `read_committed` consumer of `engage.enriched_events`.
    pub kafka: Percentiles,
}

/// Freshness of single events on an idle stream.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub top_content: Percentiles,
    pub recent: Percentiles,
    pub kafka: Percentiles,
}

/// Freshness in milliseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    /// Markers whose effect was not seen within `RESOLVE_GRACE` (30 s) of the phase end.
    pub unresolved: usize,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Meaningful from 1,000 samples on (20 markers a second: `--phase-secs 55`);
    /// below that it is the maximum.
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// The backlog drained by `pg_recvlogical` and by `engage run --end-lsn`.
#[derive(Debug, Clone, Serialize)]
pub struct BurstReport {
    pub events: u64,
    pub generate_secs: f64,
    pub wal_bytes: i64,
    pub end_lsn: String,
    pub pg_recvlogical_secs: f64,
    pub pg_recvlogical_per_sec: f64,
    pub engage_secs: f64,
    pub engage_per_sec: f64,
    /// engage / pg_recvlogical, in events per second.
    pub ratio: f64,
    pub job: Usage,
    /// The same drain with every sink a blackhole, unless skipped.
    pub blackhole: Option<TwinDrain>,
    /// The blackhole drain over TLS to Postgres (`sslmode=require`), with
    /// `--postgres-tls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TwinDrain>,
}

/// A drain of the same backlog by a twin of the job (every sink a
/// blackhole, or over TLS), in a directory and slot of its own.
#[derive(Debug, Clone, Serialize)]
pub struct TwinDrain {
    pub engage_secs: f64,
    pub engage_per_sec: f64,
    /// engage / pg_recvlogical, in events per second.
    pub ratio: f64,
    pub job: Usage,
}

/// Memory and CPU of a job process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// `VmHWM`: the highest resident set so far.
    pub peak_rss_kb: u64,
    /// `VmRSS` when last read (at the end of a phase, or just before exit).
    pub rss_kb: u64,
    /// User plus system CPU seconds since the process started.
    pub cpu_secs: f64,
}

/// Sizes from the newest checkpoint manifest.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StateReport {
    pub epoch: u64,
    /// Distinct group keys (content ids) in the `top_content` window state.
    pub top_content_distinct_content: usize,
    /// Window state as a restore reads it: whole snapshots and the layers of
    /// changes over them.
    pub window_rows: u64,
    pub window_bytes: u64,
    /// Window state the checkpoint itself wrote (its layers of changes).
    pub window_written_bytes: u64,
    pub dimension_rows: u64,
    pub dimension_bytes: u64,
    pub capture_rows: u64,
    pub capture_bytes: u64,
    /// Every file of the checkpoint (the manifest's `state_bytes`).
    pub checkpoint_bytes: u64,
}

impl Percentiles {
    pub(super) fn of(seen: impl Iterator<Item = Option<Duration>>) -> Percentiles {
        let (mut resolved, mut unresolved) = (Vec::new(), 0);
        for sample in seen {
            match sample {
                Some(d) => resolved.push(d.as_secs_f64() * 1000.0),
                None => unresolved += 1,
            }
        }
        resolved.sort_by(f64::total_cmp);
        let n = resolved.len();
        let rank = |p: f64| {
            // Less a hair, so a rank that is whole in decimal (99.9% of
            // 2,000) is not pushed up by binary rounding.
            let index = ((p / 100.0) * n as f64 - 1e-9).ceil() as usize;
            (n > 0).then(|| (resolved[index.clamp(1, n) - 1] * 10.0).round() / 10.0)
        };
        Percentiles {
            samples: n + unresolved,
            unresolved,
            p50_ms: rank(50.0),
            p95_ms: rank(95.0),
            p99_ms: rank(99.0),
            p999_ms: rank(99.9),
            max_ms: rank(100.0),
        }
    }
}

/// Prints one line per figure to stdout.
pub(super) fn print_figures(report: &BenchReport) {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ms"));
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / 1_048_576.0);
    println!(
        "build {}, {} cores, {} content items",
        report.build, report.cores, report.content_items
    );
    for phase in &report.phases {
        let rate = phase.rate;
        for (name, p) in [
            ("top_content", &phase.top_content),
            ("recent", &phase.recent),
            ("kafka", &phase.kafka),
        ] {
            println!(
                "freshness {name} @{rate}/s: p50 {}, p95 {}, p99 {}, p99.9 {}, max {} (n={}, {} not seen)",
                ms(p.p50_ms),
                ms(p.p95_ms),
                ms(p.p99_ms),
                ms(p.p999_ms),
                ms(p.max_ms),
                p.samples,
                p.unresolved
            );
        }
        println!(
            "rates @{rate}/s: generated {:.0} events/s, job processed {} events/s, \
             job CPU {:.2} cores, job RSS {}",
            phase.generated_per_sec,
            phase
                .processed_per_sec
                .map_or("-".into(), |v| format!("{v:.0}")),
            phase.job_cpu_cores,
            mib(phase.job_rss_kb * 1024)
        );
    }
    if let Some(idle) = &report.idle {
        for (name, p) in [
            ("top_content", &idle.top_content),
            ("recent", &idle.recent),
            ("kafka", &idle.kafka),
        ] {
            println!(
                "freshness {name} idle stream: p50 {}, p95 {}, p99 {}, max {} (n={}, {} not seen)",
                ms(p.p50_ms),
                ms(p.p95_ms),
                ms(p.p99_ms),
                ms(p.max_ms),
                p.samples,
                p.unresolved
            );
        }
    }
    if let Some(late) = report.live_late_events {
        println!("late events while streaming (the generator makes none): {late}");
    }
    print_burst("burst", &report.burst);
    if let Some(large) = &report.large_transactions {
        print_burst("large transactions", large);
        println!(
            "large transactions job: peak RSS {}, CPU {:.1} s",
            mib(large.job.peak_rss_kb * 1024),
            large.job.cpu_secs
        );
    }
    for (name, usage) in [
        ("burst", &report.burst.job),
        ("live", &report.live_job),
        ("overall", &report.job_overall),
    ] {
        let peak = mib(usage.peak_rss_kb * 1024);
        println!("job {name}: peak RSS {peak}, CPU {:.1} s", usage.cpu_secs);
    }
    let s = &report.state;
    println!(
        "state: {} distinct content ids in the top_content window (checkpoint {})",
        s.top_content_distinct_content, s.epoch
    );
    println!(
        "state: windows {} rows, {} ({} written by that checkpoint); dimension {} rows, {}; \
         capture {} rows, {}; checkpoint {}",
        s.window_rows,
        mib(s.window_bytes),
        mib(s.window_written_bytes),
        s.dimension_rows,
        mib(s.dimension_bytes),
        s.capture_rows,
        mib(s.capture_bytes),
        mib(s.checkpoint_bytes)
    );
}

/// The lines of one drain: backlog, both readers' rates and their ratio.
fn print_burst(name: &str, b: &BurstReport) {
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / 1_048_576.0);
    println!(
        "{name} backlog: {} events generated in {:.1} s, {} of WAL",
        b.events,
        b.generate_secs,
        mib(b.wal_bytes.max(0) as u64)
    );
    println!(
        "{name} pg_recvlogical: {:.0} events/s ({:.1} s)",
        b.pg_recvlogical_per_sec, b.pg_recvlogical_secs
    );
    println!(
        "{name} engage run --end-lsn: {:.0} events/s ({:.1} s)",
        b.engage_per_sec, b.engage_secs
    );
    println!("{name} engage / pg_recvlogical: {:.2}", b.ratio);
    if let Some(blackhole) = &b.blackhole {
        println!(
            "{name} engage, every sink a blackhole: {:.0} events/s ({:.1} s), {:.2} of pg_recvlogical, \
             CPU {:.1} s, peak RSS {:.1} MiB",
            blackhole.engage_per_sec,
            blackhole.engage_secs,
            blackhole.ratio,
            blackhole.job.cpu_secs,
            blackhole.job.peak_rss_kb as f64 / 1024.0
        );
    }
    if let Some(tls) = &b.tls {
        let plain = b.blackhole.as_ref().map_or(String::new(), |blackhole| {
            format!(
                " (without TLS: {:.2}, CPU {:.1} s)",
                blackhole.ratio, blackhole.job.cpu_secs
            )
        });
        println!(
            "{name} engage, every sink a blackhole, over TLS to postgres (sslmode=require): {:.0} events/s \
             ({:.1} s), {:.2} of pg_recvlogical, CPU {:.1} s{plain}",
            tls.engage_per_sec,
            tls.engage_secs,
            tls.ratio,
            tls.job.cpu_secs
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_count_unseen_markers() {
        let seen = (1..=100).map(|ms| Some(Duration::from_millis(ms)));
        let p = Percentiles::of(seen.chain([None]));
        assert_eq!((p.samples, p.unresolved), (101, 1));
        let figures = (p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms);
        assert_eq!(figures, (Some(50.0), Some(95.0), Some(99.0), Some(100.0)));
        let seen = (1..=2000).map(|ms| Some(Duration::from_millis(ms)));
        assert_eq!(Percentiles::of(seen).p999_ms, Some(1998.0));
        assert_eq!(Percentiles::of(std::iter::empty()).p50_ms, None);
    }
}
