//! The oracle's model of the mission pipeline: what every output must hold,
//! computed from Postgres alone (the tables as they end, and the history the
//! workload's triggers kept; see [`crate::chaos::workload`]), never from
//! anything engage wrote.
//!
//! The model replays every change in commit order: inserts by id, and each
//! logged update, delete and content change after the inserts whose ids were
//! allocated before it. Along the way it keeps `content` as it stood, so each
//! change joins the content row as of its own commit, and the watermark
//! (newest on-time event time so far minus the 200 ms delay), so it decides
//! by itself which inserts are late and when each window closes.
//!
//! The job's semantics it encodes (documented in `engine/windowed.rs`): an
//! update retracts its old image and adds its new one, a delete retracts its
//! old image, both joined with content as of the retracting change; a window
//! holds the changes processed before the watermark passed its end; `CHECK`s
//! are tried in declaration order on new row images.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::Value;
use tokio_postgres::Client;

use crate::chaos::{context, ChaosError};

/// The mission's watermark delay.
pub const DELAY_MICROS: i64 = 200_000;
/// Entries of each recent list.
pub const RECENT_LENGTH: usize = 50;
/// An insert late by less than this is too close to call (batch boundaries).
const AMBIGUOUS_MICROS: i64 = 5_000_000;

/// One row of `engagement_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub id: i64,
    pub content_id: Option<String>,
    pub user_id: Option<String>,
    pub event_type: Option<String>,
    /// Microseconds since the epoch.
    pub event_ts: i64,
    pub duration_ms: Option<i64>,
    pub device: Option<String>,
    /// `raw_payload` as Postgres prints jsonb (what the job decodes).
    pub payload: Option<String>,
}

/// One row of `content`, the columns the pipeline reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContentRow {
    pub content_type: Option<String>,
    pub length_seconds: Option<i64>,
}

/// A change of the `enriched` view: an event row joined with content.
#[derive(Debug, Clone, PartialEq)]
pub struct Enriched {
    pub op: &'static str,
    pub id: i64,
    pub content_id: Option<String>,
    pub user_id: Option<String>,
    pub event_type: Option<String>,
    pub event_ts: i64,
    pub duration_ms: Option<i64>,
    pub device: Option<String>,
    pub content_type: Option<String>,
    pub length_seconds: Option<i64>,
    pub engagement_seconds: Option<f64>,
    pub engagement_pct: Option<f64>,
}

impl Enriched {
    fn new(op: &'static str, row: &EventRow, content: Option<&ContentRow>) -> Enriched {
        let length = content.and_then(|c| c.length_seconds);
        let seconds = row.duration_ms.map(|d| d as f64 / 1000.0);
        Enriched {
            op,
            id: row.id,
            content_id: row.content_id.clone(),
            user_id: row.user_id.clone(),
            event_type: row.event_type.clone(),
            event_ts: row.event_ts,
            duration_ms: row.duration_ms,
            device: row.device.clone(),
            content_type: content.and_then(|c| c.content_type.clone()),
            length_seconds: length,
            engagement_seconds: seconds,
            engagement_pct: match (seconds, length) {
                (Some(s), Some(l)) if l != 0 => {
                    Some(((s / l as f64 * 100.0) * 100.0).round() / 100.0)
                }
                _ => None,
            },
        }
    }
}

/// One input row of the windowed queries: `+1` or `-1`, and when (its index
/// in commit order).
#[derive(Debug, Clone)]
pub struct Contribution {
    pub at: usize,
    pub sign: i64,
    pub row: Enriched,
}

/// Everything the outputs must hold.
#[derive(Debug, Default)]
pub struct Expected {
    /// Every good change, in commit order (`enriched_events`).
    pub enriched: Vec<Enriched>,
    /// Input of the windowed queries.
    pub contributions: Vec<Contribution>,
    /// Watermark after each change (by index in commit order).
    pub watermarks: Vec<Option<i64>>,
    /// Late inserts: id → event time.
    pub late: BTreeMap<i64, i64>,
    /// Bad changes: id → the CHECK they fail.
    pub dead_letter: BTreeMap<i64, String>,
    /// Per content item, its recent list as `engage:recent:{id}` must hold
    /// it: each good insert pushed to the front (at most [`RECENT_LENGTH`]
    /// kept), each delete taken out.
    pub recent: HashMap<String, VecDeque<Enriched>>,
    /// Events in Postgres at the end.
    pub events: u64,
    pub updates: u64,
    pub deletes: u64,
    pub content_changes: u64,
    /// Broken promises of the workload (a change too close to call).
    pub ambiguous: Vec<String>,
}

impl Expected {
    /// The watermark after every change.
    pub fn final_watermark(&self) -> Option<i64> {
        self.watermarks.last().copied().flatten()
    }

    /// Index of the change after which the watermark first reached `end`
    /// (the window ending there closed), if it did.
    pub fn closed_at(&self, end: i64) -> Option<usize> {
        let at = self
            .watermarks
            .partition_point(|w| w.is_none_or(|w| w < end));
        (at < self.watermarks.len()).then_some(at)
    }

    /// The contributions a window `[start, end)` holds: those with event
    /// time inside it, processed up to its close (all, if it closed only by
    /// the wall clock). Records a problem for a retraction or update after
    /// the close, which the workload promises never to make.
    pub fn window(&mut self, start: i64, end: i64) -> Vec<&Contribution> {
        let close = self.closed_at(end).unwrap_or(usize::MAX);
        let mut broken = 0;
        for c in &self.contributions {
            if c.row.event_ts >= start && c.row.event_ts < end && c.at > close && c.row.op != "c" {
                broken += 1;
            }
        }
        if broken > 0 {
            self.ambiguous.push(format!(
                "{broken} updates or deletes of window [{start}, {end}) came after it closed"
            ));
        }
        self.contributions
            .iter()
            .filter(|c| c.row.event_ts >= start && c.row.event_ts < end && c.at <= close)
            .collect()
    }
}

/// A change as the model replays it.
enum Change {
    Insert(EventRow),
    Update { old: EventRow, new: EventRow },
    Delete(EventRow),
    Content { id: String, row: Option<ContentRow> },
}

/// Reads the tables and the history, and replays them.
pub async fn expected(db: &Client) -> Result<Expected, ChaosError> {
    let rows = db
        .query(
            "SELECT id, content_id::text, user_id::text, event_type, \
                    (extract(epoch FROM event_ts) * 1000000)::int8, duration_ms, device, raw_payload::text \
             FROM engagement_events ORDER BY id",
            &[],
        )
        .await
        .map_err(context("failed to read engagement_events"))?;
    let mut current: BTreeMap<i64, EventRow> = rows
        .iter()
        .map(|r| {
            let row = EventRow {
                id: r.get(0),
                content_id: r.get(1),
                user_id: r.get(2),
                event_type: r.get(3),
                event_ts: r.get(4),
                duration_ms: r.get::<_, Option<i32>>(5).map(i64::from),
                device: r.get(6),
                payload: r.get(7),
            };
            (row.id, row)
        })
        .collect();
    let history = db
        .query(
            "SELECT table_name, op, events_before, old_row::text, new_row::text \
             FROM engage_oracle_history ORDER BY seq",
            &[],
        )
        .await
        .map_err(context("failed to read the oracle's history table"))?;
    let mut expected = Expected {
        events: current.len() as u64,
        ..Expected::default()
    };

    // Logged changes, each after the inserts with ids up to `events_before`;
    // the first old image of an event is the row it was inserted as.
    let mut logged: Vec<(i64, Change)> = Vec::new();
    let mut inserted_as: BTreeMap<i64, EventRow> = BTreeMap::new();
    for row in &history {
        let table: String = row.get(0);
        let op: String = row.get(1);
        let before: i64 = row.get(2);
        let old = row
            .get::<_, Option<String>>(3)
            .map(|t| parse_json(&t))
            .transpose()?;
        let new = row
            .get::<_, Option<String>>(4)
            .map(|t| parse_json(&t))
            .transpose()?;
        let change = if table == "content" {
            let image = new
                .as_ref()
                .or(old.as_ref())
                .expect("a logged row has an image");
            let id = text(image, "id").unwrap_or_default();
            // Changes of what events join (not of a title, say).
            if op != "c" && old.as_ref().map(content_row) != new.as_ref().map(content_row) {
                expected.content_changes += 1;
            }
            Change::Content {
                id,
                row: new.as_ref().map(content_row),
            }
        } else {
            let old = event_row(old.as_ref().expect("updates and deletes log the old row"))?;
            inserted_as.entry(old.id).or_insert_with(|| old.clone());
            match new {
                Some(new) => {
                    expected.updates += 1;
                    Change::Update {
                        old,
                        new: event_row(&new)?,
                    }
                }
                None => {
                    expected.deletes += 1;
                    Change::Delete(old)
                }
            }
        };
        logged.push((before, change));
    }
    for (id, row) in inserted_as {
        current.insert(id, row);
    }

    let mut replay = Replay::default();
    let mut logged = logged.into_iter().peekable();
    for (id, insert) in current {
        while let Some((_, change)) = logged.next_if(|(before, _)| *before < id) {
            replay.apply(change, &mut expected);
        }
        replay.apply(Change::Insert(insert), &mut expected);
    }
    for (_, change) in logged {
        replay.apply(change, &mut expected);
    }
    Ok(expected)
}

/// The model's running state.
#[derive(Default)]
struct Replay {
    content: HashMap<String, ContentRow>,
    /// Newest event time of an on-time window input.
    newest: Option<i64>,
    at: usize,
}

impl Replay {
    fn watermark(&self) -> Option<i64> {
        self.newest.map(|t| t - DELAY_MICROS)
    }

    fn apply(&mut self, change: Change, out: &mut Expected) {
        let watermark = self.watermark();
        match change {
            Change::Content { id, row } => match row {
                Some(row) => {
                    self.content.insert(id, row);
                }
                None => {
                    self.content.remove(&id);
                }
            },
            Change::Insert(row) => {
                if let Some(reason) = self.check(&row) {
                    out.dead_letter.insert(row.id, reason.to_string());
                } else {
                    let enriched = self.enrich("c", &row);
                    if let Some(content) = &row.content_id {
                        let list = out.recent.entry(content.clone()).or_default();
                        list.push_front(enriched.clone());
                        list.truncate(RECENT_LENGTH);
                    }
                    out.enriched.push(enriched.clone());
                    match watermark {
                        Some(w) if row.event_ts < w => {
                            if row.event_ts >= w - AMBIGUOUS_MICROS {
                                out.ambiguous.push(format!(
                                    "event {} is late by only {} ms",
                                    row.id,
                                    (w - row.event_ts) / 1000
                                ));
                            }
                            out.late.insert(row.id, row.event_ts);
                        }
                        _ => self.add(1, enriched, out),
                    }
                }
            }
            Change::Update { old, new } => {
                if let Some(reason) = self.check(&new) {
                    out.ambiguous.push(format!(
                        "the workload updated event {} to a row failing {reason}",
                        new.id
                    ));
                }
                let enriched = self.enrich("u", &new);
                out.enriched.push(enriched.clone());
                let retracted = self.enrich("u", &old);
                self.add(1, enriched, out);
                self.add(-1, retracted, out);
            }
            Change::Delete(old) => {
                if let Some(list) = old.content_id.as_ref().and_then(|c| out.recent.get_mut(c)) {
                    list.retain(|e| e.id != old.id);
                }
                let enriched = self.enrich("d", &old);
                out.enriched.push(enriched.clone());
                self.add(-1, enriched, out);
            }
        }
        self.at += 1;
        out.watermarks.push(self.watermark());
    }

    fn enrich(&self, op: &'static str, row: &EventRow) -> Enriched {
        let content = row.content_id.as_ref().and_then(|id| self.content.get(id));
        Enriched::new(op, row, content)
    }

    fn add(&mut self, sign: i64, row: Enriched, out: &mut Expected) {
        if sign > 0 {
            self.newest = Some(self.newest.map_or(row.event_ts, |n| n.max(row.event_ts)));
        }
        out.contributions.push(Contribution {
            at: self.at,
            sign,
            row,
        });
    }

    /// The first CHECK of `sql/engagement.sql` that `row` fails.
    fn check(&self, row: &EventRow) -> Option<&'static str> {
        let Some(content) = &row.content_id else {
            return Some("content_missing");
        };
        if let Some(kind) = &row.event_type {
            if !["play", "pause", "finish", "click"].contains(&kind.as_str()) {
                return Some("unknown_event_type");
            }
        }
        if row
            .duration_ms
            .is_some_and(|d| !(0..=86_400_000).contains(&d))
        {
            return Some("bad_duration");
        }
        if let Some(payload) = &row.payload {
            if !payload.trim_start().starts_with('{') {
                return Some("payload_not_object");
            }
            if payload.len() > 1_048_576 {
                return Some("payload_too_large");
            }
        }
        if !self.content.contains_key(content) {
            return Some("unknown_content");
        }
        None
    }
}

fn parse_json(text: &str) -> Result<Value, ChaosError> {
    serde_json::from_str(text).map_err(context("the history table holds a row that is not JSON"))
}

fn text(row: &Value, name: &str) -> Option<String> {
    row.get(name)?.as_str().map(str::to_string)
}

fn content_row(row: &Value) -> ContentRow {
    ContentRow {
        content_type: text(row, "content_type"),
        length_seconds: row.get("length_seconds").and_then(Value::as_i64),
    }
}

/// An `engagement_events` row from its `to_jsonb` image.
fn event_row(row: &Value) -> Result<EventRow, ChaosError> {
    let ts = text(row, "event_ts").unwrap_or_default();
    let event_ts = chrono::DateTime::parse_from_rfc3339(&ts)
        .map_err(context(format!("history row with event_ts `{ts}`")))?
        .timestamp_micros();
    Ok(EventRow {
        id: row.get("id").and_then(Value::as_i64).unwrap_or_default(),
        content_id: text(row, "content_id"),
        user_id: text(row, "user_id"),
        event_type: text(row, "event_type"),
        event_ts,
        duration_ms: row.get("duration_ms").and_then(Value::as_i64),
        device: text(row, "device"),
        // Only bad inserts need the payload, and those are never logged.
        payload: row
            .get("raw_payload")
            .filter(|p| !p.is_null())
            .map(Value::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, content: &str, ts: i64, duration: Option<i64>) -> EventRow {
        EventRow {
            id,
            content_id: Some(content.into()),
            user_id: Some("u".into()),
            event_type: Some("play".into()),
            event_ts: ts,
            duration_ms: duration,
            device: Some("ios".into()),
            payload: Some("{}".into()),
        }
    }

    fn content(kind: &str, length: Option<i64>) -> Change {
        Change::Content {
            id: "a".into(),
            row: Some(ContentRow {
                content_type: Some(kind.into()),
                length_seconds: length,
            }),
        }
    }

    #[test]
    fn changes_join_content_as_of_their_commit_and_late_inserts_are_decided_in_order() {
        let mut out = Expected::default();
        let mut replay = Replay::default();
        replay.apply(content("podcast", Some(100)), &mut out);
        replay.apply(
            Change::Insert(event(1, "a", 10_000_000, Some(50_000))),
            &mut out,
        );
        replay.apply(content("video", Some(0)), &mut out);
        replay.apply(
            Change::Update {
                old: event(1, "a", 10_000_000, Some(50_000)),
                new: event(1, "a", 10_000_000, Some(20_000)),
            },
            &mut out,
        );
        // 100 ms behind the newest: on time; 30 s behind: late.
        replay.apply(Change::Insert(event(2, "a", 9_900_000, None)), &mut out);
        replay.apply(Change::Insert(event(3, "a", 40_000_000, None)), &mut out);
        replay.apply(Change::Insert(event(4, "a", 10_000_000, None)), &mut out);
        // A bad event neither counts nor moves the watermark.
        replay.apply(Change::Insert(event(5, "b", 90_000_000, None)), &mut out);

        assert_eq!(out.enriched[0].content_type.as_deref(), Some("podcast"));
        assert_eq!(out.enriched[0].engagement_pct, Some(50.0));
        assert_eq!(out.enriched[1].op, "u");
        assert_eq!(out.enriched[1].content_type.as_deref(), Some("video"));
        assert_eq!(out.enriched[1].engagement_pct, None, "length 0");
        assert_eq!(
            out.dead_letter.get(&5).map(String::as_str),
            Some("unknown_content")
        );
        assert_eq!(out.late.keys().copied().collect::<Vec<_>>(), vec![4]);
        assert!(out.ambiguous.is_empty(), "{:?}", out.ambiguous);
        // +c, +u new, -u old (joined as of the update), +c of events 2 and 3.
        let signs: Vec<(i64, i64)> = out
            .contributions
            .iter()
            .map(|c| (c.row.id, c.sign))
            .collect();
        assert_eq!(signs, vec![(1, 1), (1, 1), (1, -1), (2, 1), (3, 1)]);
        assert_eq!(
            out.contributions[2].row.content_type.as_deref(),
            Some("video")
        );
        assert_eq!(out.final_watermark(), Some(40_000_000 - DELAY_MICROS));
    }

    #[test]
    fn a_window_holds_what_came_before_its_close() {
        let mut out = Expected::default();
        let mut replay = Replay::default();
        replay.apply(content("podcast", Some(100)), &mut out);
        replay.apply(Change::Insert(event(1, "a", 1_000_000, Some(1))), &mut out);
        replay.apply(Change::Insert(event(2, "a", 2_500_000, Some(1))), &mut out);
        // The window [0, 2 s) closed with event 2; a later delete of event 1 is broken.
        replay.apply(Change::Delete(event(1, "a", 1_000_000, Some(1))), &mut out);
        assert_eq!(out.closed_at(2_000_000), Some(2));
        let ids: Vec<(i64, i64)> = out
            .window(0, 2_000_000)
            .iter()
            .map(|c| (c.row.id, c.sign))
            .collect();
        assert_eq!(ids, vec![(1, 1)]);
        assert_eq!(out.ambiguous.len(), 1, "{:?}", out.ambiguous);
        assert_eq!(out.closed_at(10_000_000), None);
    }
}
