//! The oracle: what every output of the mission pipeline must hold, computed
//! from Postgres alone ([`model`]), compared with what the outputs hold.
//!
//! Nothing expected is taken from engage: not which events are late, not
//! which window is current, not a sink's bookkeeping. The one thing read from
//! engage's keys is *which* window a Redis sink says it holds, and that is
//! checked against the data: it must be the window the newest event time
//! closes (newest on-time event time minus the 200 ms delay, floored to the
//! slide), or a later one only as far as the wall clock can have advanced an
//! idle job's watermark by the time it stopped.
//!
//! | output | what must hold |
//! | --- | --- |
//! | `enriched_events` | every change (`c`, `u`, `d`) exactly once, every column equal, joined with content as of the change's commit |
//! | `enriched_events_topic` (Kafka) | the same, read `read_committed`; each content item's changes in commit order, keyed by its id |
//! | `recent_events` | per content item, its 50 newest inserts less the deleted ones, newest first, with their joined columns |
//! | `top_content`, `top_devices`, `top_device_families`, `content_type_engagement` | the aggregate of the window they hold, from the contributions the model derives |
//! | `kpi` (Parquet) | every closed tumbling window of every timeframe exactly once, every figure equal |
//! | `kpi_*_latest` (Redis) | the latest closed window of each timeframe |
//! | `late_events`, `dead_letter` | exactly the late inserts, and the bad ones with their reasons |
//!
//! A difference counts as *lost* (the output holds less), *duplicated* (more,
//! or something twice) or *other* (a wrong value, order or window).
//!
//! [`model`] computes the expectation, [`outputs`] reads Parquet, this file
//! checks the per-change outputs and [`windows`] the windowed ones.

mod kafka;
mod model;
mod outputs;
mod windows;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::{context, ChaosError};
use model::{Enriched, Expected, DELAY_MICROS};
use outputs::{close_opt, json_id, Columns, Outputs};

pub(super) const JOB: &str = "engagement";
pub(super) const MINUTE: i64 = 60 * 1_000_000;
pub(super) const WINDOW_MICROS: i64 = 10 * MINUTE;
pub(super) const SLIDE_MICROS: i64 = 500_000;
/// The least an idle job's wall clock trails behind now, beyond the delay.
const CLOCK_MIN_MICROS: i64 = crate::engine::MIN_ALLOWANCE.as_micros() as i64;
pub(super) const TOP_N: usize = 100;

/// How one output compares with the oracle.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SinkCheck {
    pub sink: String,
    /// Rows, entries or members the oracle expects.
    pub expected: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Anything else that differs (a value, the order of a list, the window).
    pub other: u64,
    pub note: String,
}

impl SinkCheck {
    fn new(sink: &str) -> SinkCheck {
        SinkCheck {
            sink: sink.to_string(),
            ..SinkCheck::default()
        }
    }

    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.other == 0
    }

    /// Counts a wrong value, keeping the first one's description.
    pub(super) fn wrong(&mut self, what: impl FnOnce() -> String) {
        self.other += 1;
        if self.note.is_empty() {
            self.note = what();
        }
    }
}

/// Where the outputs of one run are.
pub struct Target {
    pub postgres_url: String,
    pub redis_url: String,
    /// The brokers of the mission's Kafka sink.
    pub kafka_brokers: String,
    pub data_dir: std::path::PathBuf,
    /// When the last job process stopped (µs since the epoch): bounds how far
    /// an idle job's wall clock can have moved its watermark.
    pub stopped_at_micros: i64,
}

/// What the oracle found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub sinks: Vec<SinkCheck>,
    /// Events in Postgres at the end, good and bad.
    pub events: u64,
    /// Changes the outputs had to reflect.
    pub updates: u64,
    pub deletes: u64,
    pub content_changes: u64,
    pub late: u64,
    pub dead_lettered: u64,
    /// Problems of the oracle or the workload itself (not of engage).
    pub problems: Vec<String>,
}

/// Compares every output with the oracle. `injected` is the workload's own
/// log of bad events (id → the CHECK it should fail), which must agree with
/// what the oracle derives from the rows.
pub async fn check(
    target: &Target,
    injected: &BTreeMap<i64, String>,
) -> Result<Verdict, ChaosError> {
    let (db, connection) = tokio_postgres::connect(&target.postgres_url, tokio_postgres::NoTls)
        .await
        .map_err(context("failed to connect to postgres"))?;
    tokio::spawn(connection);
    let mut expected = model::expected(&db).await?;
    let outputs = Outputs::open(&target.data_dir).await?;
    let mut redis = redis::Client::open(target.redis_url.as_str())
        .map_err(context("bad redis url"))?
        .get_multiplexed_async_connection()
        .await
        .map_err(context("failed to connect to redis"))?;

    let mut verdict = Verdict {
        events: expected.events,
        updates: expected.updates,
        deletes: expected.deletes,
        content_changes: expected.content_changes,
        late: expected.late.len() as u64,
        dead_lettered: expected.dead_letter.len() as u64,
        ..Verdict::default()
    };
    if &expected.dead_letter != injected {
        let differ = expected
            .dead_letter
            .iter()
            .find(|(id, reason)| injected.get(id) != Some(reason))
            .map(|(id, reason)| format!("event {id}: oracle says {reason}, workload {:?}", injected.get(id)))
            .or_else(|| {
                injected
                    .iter()
                    .find(|(id, _)| !expected.dead_letter.contains_key(id))
                    .map(|(id, reason)| format!("event {id}: the workload made it fail {reason}, the oracle finds it good"))
            })
            .unwrap_or_default();
        verdict.problems.push(format!(
            "the oracle's bad events ({}) differ from the workload's log ({}): {differ}",
            expected.dead_letter.len(),
            injected.len()
        ));
    }

    verdict
        .sinks
        .push(enriched_events(&outputs, &expected).await?);
    verdict
        .sinks
        .push(kafka::enriched_topic(&target.kafka_brokers, &expected).await?);
    verdict.sinks.push(late_events(&outputs, &expected).await?);
    verdict.sinks.push(dead_letter(&outputs, &expected).await?);
    verdict
        .sinks
        .push(recent_lists(&mut redis, &expected).await?);

    let bounds = Bounds::new(&expected, target.stopped_at_micros);
    for spec in windows::HOP_SINKS {
        let check = windows::hop_window(&mut redis, &mut expected, &bounds, &spec).await?;
        verdict.sinks.push(check);
    }
    let closed = windows::closed_kpi_windows(&mut expected, &bounds);
    verdict
        .sinks
        .push(windows::kpi_table(&outputs, &closed).await?);
    for ((timeframe, sink, key, width), windows) in windows::TIMEFRAMES.into_iter().zip(&closed) {
        let check = windows::kpi_latest(&mut redis, windows, timeframe, sink, key, width).await?;
        verdict.sinks.push(check);
    }
    verdict.problems.append(&mut expected.ambiguous);
    Ok(verdict)
}

/// The range the final watermark of the job can be in.
pub(super) struct Bounds {
    /// From the data: the newest on-time event time minus the delay.
    pub(super) data: Option<i64>,
    /// From the wall clock of an idle job when it stopped.
    wall: i64,
}

impl Bounds {
    fn new(expected: &Expected, stopped_at: i64) -> Bounds {
        Bounds {
            data: expected.final_watermark(),
            wall: stopped_at - DELAY_MICROS - CLOCK_MIN_MICROS,
        }
    }

    /// The newest watermark the job can have reached.
    pub(super) fn highest(&self) -> Option<i64> {
        self.data.map(|d| d.max(self.wall))
    }
}

pub(super) fn floor_to(value: i64, step: i64) -> i64 {
    value.div_euclid(step) * step
}

pub(super) fn opt_text<T: std::fmt::Debug>(value: &Option<T>) -> String {
    match value {
        Some(v) => format!("{v:?}"),
        None => "NULL".into(),
    }
}

/// The columns of `enriched` that two changes must agree on.
fn same(a: &Enriched, b: &Enriched) -> Result<(), String> {
    let equal = [
        ("content_id", a.content_id == b.content_id),
        ("user_id", a.user_id == b.user_id),
        ("event_type", a.event_type == b.event_type),
        ("event_ts", a.event_ts == b.event_ts),
        ("duration_ms", a.duration_ms == b.duration_ms),
        ("device", a.device == b.device),
        ("content_type", a.content_type == b.content_type),
        ("length_seconds", a.length_seconds == b.length_seconds),
        (
            "engagement_seconds",
            close_opt(a.engagement_seconds, b.engagement_seconds),
        ),
        (
            "engagement_pct",
            close_opt(a.engagement_pct, b.engagement_pct),
        ),
    ];
    let differ: Vec<&str> = equal
        .iter()
        .filter(|(_, equal)| !equal)
        .map(|(column, _)| *column)
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(format!(
        "event {} ({}): {} differ (content_type {} vs expected {}, length_seconds {} vs {})",
        a.id,
        a.op,
        differ.join(", "),
        opt_text(&a.content_type),
        opt_text(&b.content_type),
        opt_text(&a.length_seconds),
        opt_text(&b.length_seconds)
    ))
}

/// `enriched_events`: every change exactly once with every column equal.
async fn enriched_events(outputs: &Outputs, expected: &Expected) -> Result<SinkCheck, ChaosError> {
    let batches = outputs
        .rows(
            "enriched_events",
            "SELECT id, _op, _lsn, _seq, content_id, user_id, event_type, event_ts, duration_ms, device, \
                    content_type, length_seconds, engagement_seconds, engagement_pct FROM enriched_events",
        )
        .await?;
    // id → op → changes in stream order.
    let mut found: HashMap<i64, Vec<(i64, i64, Enriched)>> = HashMap::new();
    for batch in &batches {
        let c = Columns(batch);
        let (ids, ops, lsns, seqs) = (
            c.ints("id")?,
            c.strings("_op")?,
            c.ints("_lsn")?,
            c.ints("_seq")?,
        );
        let (contents, users, types) = (
            c.strings("content_id")?,
            c.strings("user_id")?,
            c.strings("event_type")?,
        );
        let (times, durations, devices) = (
            c.micros("event_ts")?,
            c.ints("duration_ms")?,
            c.strings("device")?,
        );
        let (content_types, lengths) = (c.strings("content_type")?, c.ints("length_seconds")?);
        let (seconds, pcts) = (c.floats("engagement_seconds")?, c.floats("engagement_pct")?);
        for row in 0..batch.num_rows() {
            let op = match ops[row].as_deref() {
                Some("c") => "c",
                Some("u") => "u",
                Some("d") => "d",
                _ => "?",
            };
            let id = ids[row].unwrap_or_default();
            found.entry(id).or_default().push((
                lsns[row].unwrap_or_default(),
                seqs[row].unwrap_or_default(),
                Enriched {
                    op,
                    id,
                    content_id: contents[row].clone(),
                    user_id: users[row].clone(),
                    event_type: types[row].clone(),
                    event_ts: times[row].unwrap_or_default(),
                    duration_ms: durations[row],
                    device: devices[row].clone(),
                    content_type: content_types[row].clone(),
                    length_seconds: lengths[row],
                    engagement_seconds: seconds[row],
                    engagement_pct: pcts[row],
                },
            ));
        }
    }
    Ok(compare_changes("enriched_events", found, expected))
}

/// Compares the changes an output holds (`found`: id → `(lsn, seq, change)`)
/// with the oracle's: every change exactly once, every column equal.
pub(super) fn compare_changes(
    sink: &str,
    mut found: HashMap<i64, Vec<(i64, i64, Enriched)>>,
    expected: &Expected,
) -> SinkCheck {
    let mut check = SinkCheck::new(sink);
    check.expected = expected.enriched.len() as u64;
    let mut wanted: HashMap<i64, Vec<&Enriched>> = HashMap::new();
    for change in &expected.enriched {
        wanted.entry(change.id).or_default().push(change);
    }
    let mut lost_ids = Vec::new();
    for (id, changes) in &wanted {
        let mut held = found.remove(id).unwrap_or_default();
        held.sort_by_key(|(lsn, seq, _)| (*lsn, *seq));
        for op in ["c", "u", "d"] {
            let want: Vec<&&Enriched> = changes.iter().filter(|c| c.op == op).collect();
            let have: Vec<&Enriched> = held
                .iter()
                .map(|(_, _, e)| e)
                .filter(|e| e.op == op)
                .collect();
            for (w, h) in want.iter().zip(&have) {
                if let Err(difference) = same(h, w) {
                    check.wrong(|| difference);
                }
            }
            if want.len() > have.len() {
                check.lost += (want.len() - have.len()) as u64;
                lost_ids.push(*id);
            }
            check.duplicated += have.len().saturating_sub(want.len()) as u64;
        }
    }
    // Rows of events that should have none (bad events, unknown ids).
    check.duplicated += found.values().map(|v| v.len() as u64).sum::<u64>();
    if let (Some(first), Some(last)) = (lost_ids.iter().min(), lost_ids.iter().max()) {
        check.note = format!(
            "lost changes of ids between {first} and {last}; {}",
            check.note
        );
    }
    check
}

/// `(id of the JSON row, text column)` of a side output.
async fn side_rows(
    outputs: &Outputs,
    table: &str,
    sql: &str,
) -> Result<Vec<(i64, String)>, ChaosError> {
    let mut out = Vec::new();
    for batch in outputs.rows(table, sql).await? {
        let c = Columns(&batch);
        let rows = c.strings("row")?;
        let reasons = if batch.schema().column_with_name("reason").is_some() {
            c.strings("reason")?
        } else {
            vec![None; batch.num_rows()]
        };
        for (row, reason) in rows.iter().zip(reasons) {
            let row = row.as_deref().unwrap_or_default();
            let id = json_id(row)
                .ok_or_else(|| ChaosError::Failed(format!("a {table} row has no id: {row}")))?;
            out.push((id, reason.unwrap_or_default()));
        }
    }
    Ok(out)
}

/// `late_events`: exactly the inserts the oracle finds late, once each.
async fn late_events(outputs: &Outputs, expected: &Expected) -> Result<SinkCheck, ChaosError> {
    let mut check = SinkCheck::new("late_events");
    check.expected = expected.late.len() as u64;
    let found = side_rows(outputs, "late_events", "SELECT \"row\" FROM late_events").await?;
    let mut seen = HashSet::new();
    for (id, _) in &found {
        if !seen.insert(*id) || !expected.late.contains_key(id) {
            check.duplicated += 1;
            if check.note.is_empty() && !expected.late.contains_key(id) {
                check.note = format!("event {id} was written as late but is on time");
            }
        }
    }
    let missing: Vec<&i64> = expected
        .late
        .keys()
        .filter(|id| !seen.contains(id))
        .collect();
    check.lost = missing.len() as u64;
    if let Some(id) = missing.first() {
        check.note = format!("late event {id} is missing; {}", check.note);
    }
    Ok(check)
}

/// `dead_letter`: exactly the bad events, each with the CHECK it fails.
async fn dead_letter(outputs: &Outputs, expected: &Expected) -> Result<SinkCheck, ChaosError> {
    let mut check = SinkCheck::new("dead_letter");
    check.expected = expected.dead_letter.len() as u64;
    let found = side_rows(
        outputs,
        "dead_letter",
        "SELECT \"row\", reason FROM dead_letter",
    )
    .await?;
    let mut seen = HashSet::new();
    for (id, reason) in &found {
        if !seen.insert(*id) {
            check.duplicated += 1;
            continue;
        }
        match expected.dead_letter.get(id) {
            None => check.duplicated += 1,
            Some(want) if want != reason => {
                check.wrong(|| format!("event {id}: reason {reason}, expected {want}"));
            }
            Some(_) => {}
        }
    }
    check.lost = expected
        .dead_letter
        .keys()
        .filter(|id| !seen.contains(id))
        .count() as u64;
    Ok(check)
}

/// `engage:recent:{content_id}`: the 50 newest inserts of each item, newest
/// first, each with the columns it joined.
async fn recent_lists(
    redis: &mut redis::aio::MultiplexedConnection,
    expected: &Expected,
) -> Result<SinkCheck, ChaosError> {
    let mut check = SinkCheck::new("recent_events");
    let oracle: Vec<(&String, Vec<&Enriched>)> = expected
        .recent
        .iter()
        .map(|(content, list)| (content, list.iter().collect()))
        .collect();
    let mut pipe = redis::pipe();
    for (content, _) in &oracle {
        pipe.cmd("LRANGE")
            .arg(format!("engage:recent:{content}"))
            .arg(0)
            .arg(-1);
    }
    let lists: Vec<Vec<String>> = pipe
        .query_async(redis)
        .await
        .map_err(context("failed to read the recent lists"))?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("engage:recent:*")
        .query_async(redis)
        .await
        .map_err(context("failed to list the recent lists"))?;
    check.duplicated += keys.len().saturating_sub(oracle.len()) as u64;
    for ((content, want), entries) in oracle.iter().zip(lists) {
        check.expected += want.len() as u64;
        let rows: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| serde_json::from_str(e))
            .collect::<Result<_, _>>()
            .map_err(context(format!(
                "engage:recent:{content} holds an entry that is not JSON"
            )))?;
        let found: Vec<i64> = rows.iter().filter_map(|r| r["id"].as_i64()).collect();
        let distinct: HashSet<i64> = found.iter().copied().collect();
        check.duplicated += (found.len() - distinct.len()) as u64;
        let want_ids: Vec<i64> = want.iter().map(|e| e.id).collect();
        let want_set: HashSet<i64> = want_ids.iter().copied().collect();
        check.lost += want_set.difference(&distinct).count() as u64;
        check.duplicated += distinct.difference(&want_set).count() as u64;
        if found.len() == want_ids.len() && found != want_ids && distinct == want_set {
            check.wrong(|| format!("engage:recent:{content} is out of order"));
        }
        let by_id: HashMap<i64, &&Enriched> = want.iter().map(|e| (e.id, e)).collect();
        for row in &rows {
            let Some(want) = row["id"].as_i64().and_then(|id| by_id.get(&id)) else {
                continue;
            };
            let content_type = row["content_type"].as_str().map(str::to_string);
            let length = row["length_seconds"].as_i64();
            let pct = row["engagement_pct"].as_f64();
            if content_type != want.content_type
                || length != want.length_seconds
                || !close_opt(pct, want.engagement_pct)
            {
                check.wrong(|| {
                    format!(
                        "engage:recent:{content}: event {} joined content_type {} length {}, expected {} {}",
                        want.id,
                        opt_text(&content_type),
                        opt_text(&length),
                        opt_text(&want.content_type),
                        opt_text(&want.length_seconds)
                    )
                });
            }
        }
    }
    Ok(check)
}
