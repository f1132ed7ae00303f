//! `engage backfill`: checks a request, hands it to the job (see the module
//! docs of `crate::backfill`), follows it with a progress bar, and prints
//! the summary; `--status` and `--cancel`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{chunk, describe, Finished, Outcome, Phase, Request, CANCEL_FILE, REQUEST_FILE};
use crate::checkpoint::CheckpointStore;
use crate::engine::stats::JobStats;
use crate::source::setup::SlotNames;
use crate::sql::plan::JobPlan;
use crate::sql::JobSpec;

/// What to backfill, as the command line says it.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub since: String,
    pub until: Option<String>,
    pub table: Option<String>,
    pub filter: Option<String>,
    pub max_rate: Option<u64>,
    /// Run a range that overlaps a completed backfill again.
    pub force: bool,
}

/// A span like `90s`, `15m`, `24h` or `7d`.
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` needs a unit: s, m, h or d (e.g. 24h)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a span like 24h, 90m or 7d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        _ => return Err(format!("`{text}`: the unit is s, m, h or d (e.g. 24h)")),
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// A span as [`parse_span`] reads it: `1d`, `6h`, `90m`, `45s`.
pub fn format_span(span: Duration) -> String {
    let seconds = span.as_secs();
    match seconds {
        0 => "0".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A point in time (Unix µs, UTC): RFC 3339 (`2026-11-15T12:00:00Z`), a
/// date (`2026-11-01`, its midnight UTC), a date and time without zone
/// (UTC), `now`, or `now-<span>` (`now-24h`).
pub fn parse_time(text: &str, now_micros: i64) -> Result<i64, String> {
    let text = text.trim();
    if text == "now" {
        return Ok(now_micros);
    }
    if let Some(span) = text.strip_prefix("now-") {
        let span = parse_span(span)?;
        return Ok(now_micros - span.as_micros() as i64);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_micros());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc().timestamp_micros());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp_micros());
    }
    Err(format!(
        "`{text}` is not a time: use 2026-11-01, 2026-11-15T12:00:00Z, now or now-24h"
    ))
}

/// Checks `options` against the job and its database and builds the
/// request; nothing is written. Errors say what to change.
pub async fn request(spec: &JobSpec, options: &Options) -> Result<Request, String> {
    let now = chrono::Utc::now().timestamp_micros();
    let since = parse_time(&options.since, now).map_err(|e| format!("--since: {e}"))?;
    let until = options
        .until
        .as_deref()
        .map(|u| parse_time(u, now).map_err(|e| format!("--until: {e}")))
        .transpose()?;
    if let Some(until) = until {
        if since >= until {
            return Err(format!(
                "--since ({}) is not before --until ({}): the range [since, until) would be empty",
                super::rfc3339(since),
                super::rfc3339(until)
            ));
        }
    }
    if options.max_rate == Some(0) {
        return Err("--max-rate must be at least 1 row per second".into());
    }
    let plan = JobPlan::new(spec).await.map_err(|e| e.to_string())?;
    let table = chunk::table_for(&plan.sources, options.table.as_deref())?;
    let filter = options
        .filter
        .as_deref()
        .map(str::trim)
        .filter(|f| !f.is_empty());
    if let Some(filter) = filter {
        if filter.contains(';') {
            return Err(format!(
                "--where \"{filter}\" holds a `;`: give one condition on the table's columns"
            ));
        }
    }
    let mut request = Request {
        id: Request::id_for(&table.name, since, until, filter),
        table: table.name.clone(),
        since,
        until,
        filter: filter.map(str::to_string),
        max_rate: options.max_rate,
        requested_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let client = table.connect().await.map_err(|e| e.to_string())?;
    chunk::check(&client, &table, &request).await?;
    if options.force {
        // A forced run is a new backfill, not the completed one again.
        request.id = format!("{}_{}", request.id, now / 1_000_000);
    }
    Ok(request)
}

/// Writes `request` beside the job's checkpoints, unless another backfill
/// is under way or a completed one covers part of its range (without
/// `force`). Returns the id to follow: `request`'s, or that of the same
/// backfill already under way (run again after an interruption; a forced
/// one has a new id each time, and resumes the forced one under way).
pub async fn submit(
    store: &CheckpointStore,
    request: &Request,
    force: bool,
) -> Result<String, String> {
    let latest = store.latest().await.map_err(|e| e.to_string())?;
    let pending: Option<Request> = store
        .get_control(REQUEST_FILE)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let active = latest.as_ref().and_then(|m| m.backfill.as_ref());
    let finished = latest.as_ref().map_or(&[][..], |m| &m.backfills[..]);
    let under_way = active
        .map(|p| &p.request)
        .or(pending.as_ref())
        .filter(|r| !finished.iter().any(|f| f.request.id == r.id));
    if let Some(other) = under_way {
        let base = Request::id_for(
            &request.table,
            request.since,
            request.until,
            request.filter.as_deref(),
        );
        let forced_again = force && other.id.starts_with(&format!("{base}_"));
        if other.id == request.id || forced_again {
            // Asking again withdraws a cancel no job has taken up yet.
            let cancel = store
                .get_control(CANCEL_FILE)
                .await
                .map_err(|e| e.to_string())?;
            if cancel.is_some_and(|bytes| String::from_utf8_lossy(&bytes).trim() == other.id) {
                store
                    .delete_control(CANCEL_FILE)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            return Ok(other.id.clone());
        }
        return Err(format!(
            "backfill {} of {} {} is under way: wait for it (engage backfill --status), or end it with \
             engage backfill --cancel",
            other.id,
            other.table,
            other.range()
        ));
    }
    if !force {
        let done = finished
            .iter()
            .filter(|f| f.outcome == Outcome::Completed)
            .find(|f| f.request.overlaps(request));
        if let Some(done) = done {
            let same = done.request.id == request.id;
            return Err(format!(
                "{} backfill {} of {} {} completed at {}{}: its rows are in the sinks already, and running it \
                 again would add them a second time. Pass --force to run it anyway",
                if same { "this" } else { "an overlapping" },
                done.request.id,
                done.request.table,
                done.request.range(),
                done.finished_at,
                if same {
                    String::new()
                } else {
                    " (its range overlaps this one)".to_string()
                }
            ));
        }
    }
    let json = serde_json::to_vec_pretty(request).expect("request serialises");
    store
        .put_control(REQUEST_FILE, json)
        .await
        .map_err(|e| e.to_string())?;
    Ok(request.id.clone())
}

/// How long a job followed elsewhere may leave its slot unused before the
/// command runs it itself: longer than the job's own restart delays (see
/// `engine::supervise`), so a job retrying a failed run is not raced.
const TAKE_OVER_AFTER: Duration = Duration::from_secs(30);

/// How long Postgres may not answer while the command follows a job before
/// it gives up (as the job itself does, see `engine::supervise`).
const UNANSWERED_FOR: Duration = crate::engine::supervise::GIVE_UP_AFTER;

/// The job's replication slot, which is in use while the job runs.
struct JobSlot {
    table: chunk::Table,
    /// Connected again after an error (Postgres restarted).
    client: Option<tokio_postgres::Client>,
    slot: String,
}

impl JobSlot {
    async fn open(spec: &JobSpec) -> Result<JobSlot, String> {
        let plan = JobPlan::new(spec).await.map_err(|e| e.to_string())?;
        let table = chunk::table_for(&plan.sources, None).or_else(|_| {
            plan.sources
                .iter()
                .find_map(|s| chunk::table_for(&plan.sources, Some(&s.def.name)).ok())
                .ok_or_else(|| "this job has no table a backfill can read".to_string())
        })?;
        let slot = SlotNames::for_job(&spec.name, &plan.sources).slot;
        Ok(JobSlot {
            table,
            client: None,
            slot,
        })
    }

    /// Whether the job runs: its slot is in use.
    async fn in_use(&mut self) -> Result<bool, String> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(self.table.connect().await.map_err(|e| e.to_string())?);
        }
        let client = self.client.as_ref().expect("connected above");
        let row = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(|e| format!("failed to look up replication slot {}: {e}", self.slot))?;
        Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
    }

    /// Returns once the slot has been out of use for [`TAKE_OVER_AFTER`]:
    /// the job stopped and nothing restarted it. While Postgres does not
    /// answer (it restarts), the job is taken to run, for at most
    /// [`UNANSWERED_FOR`].
    async fn released(&mut self) -> Result<(), String> {
        let mut free_since: Option<Instant> = None;
        let mut answered = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let in_use = match self.in_use().await {
                Ok(in_use) => {
                    answered = Instant::now();
                    in_use
                }
                Err(error) if answered.elapsed() >= UNANSWERED_FOR => {
                    return Err(format!(
                        "{error} (for {} s); the job goes on with the backfill when it runs again \
                         (engage backfill --status)",
                        UNANSWERED_FOR.as_secs()
                    ))
                }
                Err(_) => {
                    self.client = None;
                    true
                }
            };
            if in_use {
                free_since = None;
            } else if free_since.get_or_insert_with(Instant::now).elapsed() >= TAKE_OVER_AFTER {
                return Ok(());
            }
        }
    }
}

/// `engage backfill --status`: the backfill under way, one waiting to be
/// taken up, and those that ended.
pub async fn status(store: &CheckpointStore) -> Result<String, String> {
    let latest = store.latest().await.map_err(|e| e.to_string())?;
    let mut lines = Vec::new();
    let pending: Option<Request> = store
        .get_control(REQUEST_FILE)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    match latest.as_ref().and_then(|m| m.backfill.as_ref()) {
        Some(progress) => lines.push(format!(
            "under way (as of checkpoint {}): {}",
            latest.as_ref().map_or(0, |m| m.epoch),
            describe(progress)
        )),
        None => match &pending {
            Some(request)
                if !latest
                    .as_ref()
                    .is_some_and(|m| m.backfills.iter().any(|f| f.request.id == request.id)) =>
            {
                lines.push(format!(
                    "requested, not yet taken up (the job takes it at its next checkpoint, or run \
                     engage backfill to start it): {} of {} {}",
                    request.id,
                    request.table,
                    request.range()
                ))
            }
            _ => lines.push("no backfill under way".into()),
        },
    }
    if store
        .get_control(CANCEL_FILE)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        lines.push("a cancel is waiting for the job to take it up".into());
    }
    if let Some(latest) = &latest {
        for done in latest.backfills.iter().rev().take(10) {
            lines.push(summary(done));
        }
    }
    Ok(lines.join("\n"))
}

/// `engage backfill --cancel`: asks the job to end the backfill under way
/// (or withdraws one not yet taken up).
pub async fn cancel(store: &CheckpointStore) -> Result<String, String> {
    let latest = store.latest().await.map_err(|e| e.to_string())?;
    if let Some(progress) = latest.as_ref().and_then(|m| m.backfill.as_ref()) {
        store
            .put_control(CANCEL_FILE, progress.request.id.clone().into_bytes())
            .await
            .map_err(|e| e.to_string())?;
        return Ok(format!(
            "asked the job to cancel backfill {}: a running job ends it at its next checkpoint (a stopped one \
             when it starts); rows it already emitted stay in the sinks",
            progress.request.id
        ));
    }
    if let Some(bytes) = store
        .get_control(REQUEST_FILE)
        .await
        .map_err(|e| e.to_string())?
    {
        store
            .delete_control(REQUEST_FILE)
            .await
            .map_err(|e| e.to_string())?;
        let id = serde_json::from_slice::<Request>(&bytes)
            .map(|r| r.id)
            .unwrap_or_default();
        return Ok(format!(
            "withdrew backfill request {id}, which no job had taken up"
        ));
    }
    Err("no backfill is under way".into())
}

/// One line on a backfill that ended.
pub fn summary(done: &Finished) -> String {
    let c = &done.counts;
    let sinks: Vec<String> = c.sinks.iter().map(|(s, n)| format!("{s} {n}")).collect();
    format!(
        "{}: {} of {} {} at {}: {} rows read, {} emitted ({} superseded by the live stream, {} already \
         streamed), {} dead-lettered, {} historical windows, {:.1} s; rows per sink: {}",
        done.outcome.label(),
        done.request.id,
        done.request.table,
        done.request.range(),
        done.finished_at,
        c.read,
        c.emitted,
        c.superseded,
        c.streamed,
        c.dead_lettered,
        c.windows,
        done.seconds,
        if sinks.is_empty() {
            "none".to_string()
        } else {
            sinks.join(", ")
        }
    )
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressStyle {
    /// A progress bar (the default on a terminal).
    Bar,
    /// A line every few seconds, for logs and CI (the default otherwise).
    Plain,
}

/// Follows backfill `id` until a checkpoint records it ended, showing
/// progress: from `stats` when the job runs in this process, else from the
/// newest checkpoint. Returns how it ended.
pub async fn follow(
    store: &CheckpointStore,
    id: &str,
    stats: Option<Arc<JobStats>>,
    style: ProgressStyle,
) -> Result<Finished, String> {
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let since = since.as_str();
    let bar = (style == ProgressStyle::Bar).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} rows ({per_sec}, eta {eta}) {msg}",
            )
            .expect("valid template"),
        );
        bar
    });
    let started = Instant::now();
    let mut last_line = Instant::now();
    loop {
        let latest = store.latest().await.map_err(|e| e.to_string())?;
        // An earlier end of the same backfill (cancelled, then asked again)
        // is not this one's.
        if let Some(done) = latest.as_ref().and_then(|m| {
            m.backfills
                .iter()
                .find(|f| f.request.id == id && f.finished_at.as_str() >= since)
        }) {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Ok(done.clone());
        }
        let from_checkpoint = latest
            .as_ref()
            .and_then(|m| m.backfill.as_ref())
            .filter(|p| p.request.id == id);
        let (done, total, phase) = match (&stats, from_checkpoint) {
            (Some(stats), _) if stats.backfill.active.load(Ordering::Relaxed) => {
                let b = &stats.backfill;
                (
                    b.read.load(Ordering::Relaxed),
                    b.estimate.load(Ordering::Relaxed),
                    if b.windows_phase.load(Ordering::Relaxed) {
                        Phase::Windows.label()
                    } else {
                        Phase::Snapshot.label()
                    },
                )
            }
            (_, Some(p)) => (p.counts.read, p.estimate, p.phase.label()),
            _ => (0, 0, "waiting for the job to take it up"),
        };
        match &bar {
            Some(bar) => {
                bar.set_length(total.max(done));
                bar.set_position(done);
                bar.set_message(phase.to_string());
            }
            None if last_line.elapsed() >= Duration::from_secs(5) => {
                last_line = Instant::now();
                eprintln!(
                    "backfill {id}: {phase}, {done}/{total} rows, {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A request as `engage backfill` submits it.
pub struct Submission {
    pub request: Request,
    /// See [`Options::force`].
    pub force: bool,
    pub style: ProgressStyle,
}

/// Submits `request` and follows it to its end: handed to the job if it
/// runs elsewhere, else run here (`run` options) until a checkpoint records
/// the backfill ended, or until `shutdown`.
pub async fn run(
    spec: &JobSpec,
    script: &str,
    run: crate::engine::RunOptions,
    submission: &Submission,
    stats: Arc<JobStats>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<Finished, String> {
    let Submission {
        request,
        force,
        style,
    } = submission;
    let (force, style) = (*force, *style);
    let store =
        CheckpointStore::open(&run.checkpoint_dir, &spec.name).map_err(|e| e.to_string())?;
    let id = submit(&store, request, force).await?;
    let following = id != request.id || store_has_progress(&store, &id).await;
    eprintln!(
        "backfill {} of {} {}{}{}",
        id,
        request.table,
        request.range(),
        request
            .filter
            .as_deref()
            .map(|f| format!(" where {f}"))
            .unwrap_or_default(),
        if following {
            " (under way: following it)"
        } else {
            ""
        }
    );
    tokio::pin!(shutdown);
    let mut slot = JobSlot::open(spec).await?;
    if slot.in_use().await? {
        eprintln!("the job is running: it takes the backfill up at its next checkpoint");
        tokio::select! {
            finished = follow(&store, &id, None, style) => return finished,
            released = slot.released() => {
                released?;
                eprintln!(
                    "the job stopped ({} s without it) before backfill {id} ended: running it here",
                    TAKE_OVER_AFTER.as_secs()
                );
            }
            _ = &mut shutdown => return Err(format!(
                "stopped following; the job goes on with backfill {id} (engage backfill --status)"
            )),
        }
    } else {
        eprintln!("the job is not running: running it here until the backfill is checkpointed");
    }
    drop(slot);
    let (done, stop) = tokio::sync::oneshot::channel::<()>();
    let stop_job = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stop => {}
        }
    };
    let job = crate::engine::run(spec, script, run, stats.clone(), stop_job);
    let followed = follow(&store, &id, Some(stats), style);
    tokio::pin!(job);
    tokio::pin!(followed);
    tokio::select! {
        result = &mut job => {
            result.map_err(|e| e.to_string())?;
            Err(format!(
                "the job stopped before backfill {id} ended; run the same command again to resume it"
            ))
        }
        finished = &mut followed => {
            let _ = done.send(());
            job.await.map_err(|e| e.to_string())?;
            finished
        }
    }
}

/// Whether the newest checkpoint has backfill `id` under way.
async fn store_has_progress(store: &CheckpointStore, id: &str) -> bool {
    matches!(
        store.latest().await,
        Ok(Some(m)) if m.backfill.as_ref().is_some_and(|p| p.request.id == id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_format_as_they_parse() {
        for text in ["1d", "6h", "90m", "45s"] {
            assert_eq!(format_span(parse_span(text).unwrap()), text);
        }
    }

    #[test]
    fn times_parse_in_every_documented_form() {
        let now = 1_800_000_000_000_000;
        assert_eq!(parse_time("now", now), Ok(now));
        assert_eq!(parse_time("now-24h", now), Ok(now - 86_400_000_000));
        let day = parse_time("2026-11-01", now).unwrap();
        assert_eq!(super::super::rfc3339(day), "2026-11-01T00:00:00Z");
        assert_eq!(
            parse_time("2026-11-15T12:00:00Z", now),
            parse_time("2026-11-15T12:00:00", now)
        );
        assert_eq!(
            parse_time("2026-11-15T13:00:00+01:00", now),
            parse_time("2026-11-15 12:00:00", now)
        );
        assert!(parse_time("yesterday", now)
            .unwrap_err()
            .contains("now-24h"));
        assert!(parse_time("now-24", now).is_err());
    }
}
