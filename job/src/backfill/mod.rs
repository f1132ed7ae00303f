//! Backfill: rows already in the driving table, read by event-time range and
//! pushed through the job's SQL while the live stream keeps flowing
//! (`engage backfill`).
//!
//! # Which rows, and what they become
//!
//! A backfill of table T over `[since, until)` reads every row of T whose
//! watermark column (event time) is in the range (and matches `--where`), as
//! it stands when read, and hands it to the job as a change with
//! `_op = 'r'`, enriched with the dimension tables as they stand then.
//!
//! A row the live stream already delivered is not read again for the
//! change-log sinks (Parquet, Kafka, webhooks, Redis lists): a row version
//! whose inserting transaction is not visible in the snapshot the job's
//! slot exported at its creation ([`crate::checkpoint::StreamOrigin`])
//! reached every sink as a `c` or `u` already. So each row of the range is in
//! a change-log sink once: as `r` if the stream never carried it, else as the
//! stream delivered it (a row deleted since is absent, or marked `d` as the
//! live path marks it). A job whose checkpoints predate the origin snapshot
//! treats every row as never streamed, and says so.
//!
//! # No gap, no duplicate: watermarked chunks
//!
//! Rows are read in chunks, in primary-key order, with the algorithm of
//! DBLog (also Flink CDC's incremental snapshot, Debezium's and Sequin's):
//!
//! 1. a *low watermark* is written to the WAL
//!    (`pg_logical_emit_message(true, 'engage.backfill', ...)`); when the
//!    stream reaches it, the chunk's window opens: from then on, every
//!    streamed change of T removes its primary key from the chunk;
//! 2. on a connection of its own, the chunk is read:
//!    `SELECT ... WHERE pk > cursor AND <range> ORDER BY pk LIMIT n`;
//! 3. a *high watermark* message is written;
//! 4. when the stream reaches it, the chunk's surviving rows go through the
//!    job at the high watermark's position (its commit LSN, rows numbered
//!    from 0), the window closes and the cursor moves past the chunk.
//!
//! A change committed before the low watermark is visible to the SELECT and
//! was streamed before the window opened: the row read is its result. A
//! change committed after the high watermark is not visible to the SELECT,
//! and reaches the job after the chunk's rows. A change committed in
//! between may or may not be visible: its row is dropped from the chunk (the
//! stream carries it, in its place), counted as *superseded*.
//!
//! The cursor, the counts and the phase are part of the job's checkpoint
//! (`Manifest::backfill`), written atomically with the stream position, and
//! no checkpoint is taken while a chunk's window is open (between its low
//! watermark and the processing of its high one), nor just before a low
//! one: the replication reader hands a watermark's commit to the engine
//! only with the watermark itself, never with the changes sent ahead of it
//! (a checkpoint there would resume past a low watermark the engine never
//! saw). So a crash loses at most
//! the chunks emitted since the newest checkpoint, and the restarted job
//! streams their watermarks again, in place. A watermark names its chunk
//! (backfill id, cursor, limit, a random nonce), and a chunk's rows are
//! saved beside the checkpoints before they are emitted
//! (`engine/backfill/saved.rs`): a high watermark streamed again emits
//! exactly the rows it did the first time, at the same positions, and each
//! sink drops those it holds (Parquet never held them: its files commit with
//! the checkpoint; Kafka and Redis keep positions, `sink/mod.rs`). A chunk
//! that was never emitted is read again, at its watermark. Reading it again
//! would not do for one that was: a row updated since counts as streamed
//! now, so the sinks that held the first emission would disagree with those
//! that did not.
//!
//! # Windows
//!
//! Backfilled rows on time for a window the live job still holds open (the
//! live 10-minute and 24-hour windows) are added to it. A row behind the live
//! watermark is not late: historical windows are computed apart, once the
//! whole range is read (chunks follow the key, not time, so a historical
//! window is complete only then), from every row of the range, streamed or
//! not, and written once to the windowed sinks that append (the `kpi`
//! Parquet table): those that lie wholly inside `[since, until)` and end
//! before the job's stream began (later ones were written by the live path).
//! Sinks that keep only the latest window (Redis) never get a historical one,
//! so they never move backwards.
//!
//! # Hand-off
//!
//! `engage backfill` writes a request next to the job's checkpoints
//! (`<job>/backfill-request.json`). A running job picks it up at its next
//! checkpoint; a stopped one is started by the command itself, which stops it
//! once the backfill is checkpointed. Either way the command returns when a
//! checkpoint records the backfill complete. `--cancel` writes
//! `<job>/backfill-cancel.json`, applied the same way.

pub mod chunk;
pub mod command;

use serde::{Deserialize, Serialize};

/// Prefix of the logical messages that carry the watermarks.
pub const MARKER_PREFIX: &str = "engage.backfill";

/// Name of the request file beside the job's checkpoints.
pub const REQUEST_FILE: &str = "backfill-request.json";
/// Name of the cancel file beside the job's checkpoints.
pub const CANCEL_FILE: &str = "backfill-cancel.json";

/// Finished backfills a checkpoint remembers (the oldest are forgotten).
pub const HISTORY: usize = 100;

/// What `engage backfill` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `bf_` and a hash of table, range and filter: the same range asked
    /// again resumes (or is refused once complete).
    pub id: String,
    /// The driving table, by its name in the job SQL.
    pub table: String,
    /// Event-time range, Unix µs: `since` inclusive, `until` exclusive.
    pub since: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// A SQL condition on the table's columns (`--where`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Rows per second at most (`--max-rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<u64>,
    /// RFC 3339.
    pub requested_at: String,
}

impl Request {
    /// The id of a backfill of `table` over the range, with `filter`.
    pub fn id_for(table: &str, since: i64, until: Option<i64>, filter: Option<&str>) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(format!("{table}\n{since}\n{until:?}\n{filter:?}"));
        let digest = hash.finalize();
        let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("bf_{hex}")
    }

    /// Whether the ranges of `self` and `other` (same table) overlap.
    pub fn overlaps(&self, other: &Request) -> bool {
        let end = |r: &Request| r.until.unwrap_or(i64::MAX);
        self.table == other.table && self.since < end(other) && other.since < end(self)
    }

    /// `[since, until)` in RFC 3339, for messages.
    pub fn range(&self) -> String {
        format!(
            "[{}, {})",
            rfc3339(self.since),
            self.until.map_or("∞".to_string(), rfc3339)
        )
    }
}

/// Unix µs as RFC 3339 UTC.
pub fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| micros.to_string())
}

/// Where a backfill is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading chunks under watermarks.
    Snapshot,
    /// Every chunk is read: computing the historical windows.
    Windows,
}

impl Phase {
    /// As `--status`, the progress and `engage_backfill_phase{phase}` say it.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Snapshot => "snapshot",
            Phase::Windows => "windows",
        }
    }
}

/// What a backfill has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Rows the chunks read.
    pub read: u64,
    /// Rows pushed through the job as `r`.
    pub emitted: u64,
    /// Rows dropped because the live stream changed them while their chunk
    /// was read (the stream carries them).
    pub superseded: u64,
    /// Rows not emitted because the live stream delivered them already.
    pub streamed: u64,
    /// Historical windows written.
    pub windows: u64,
    /// Chunks read.
    pub chunks: u64,
    /// Rows of backfilled input sent to dead_letter (a CHECK failed, or a
    /// value the declared types cannot hold).
    #[serde(default)]
    pub dead_lettered: u64,
    /// Rows written per sink (its name), historical windows' rows included.
    #[serde(default)]
    pub sinks: std::collections::BTreeMap<String, u64>,
}

/// A backfill under way, as a checkpoint records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub request: Request,
    pub phase: Phase,
    /// The last primary key read (text), `None` before the first chunk.
    pub cursor: Option<String>,
    /// Rows of the range when the backfill began (`count(*)`).
    pub estimate: u64,
    pub counts: Counts,
    /// RFC 3339.
    pub started_at: String,
    /// Seconds spent so far, over every run that worked on it.
    pub seconds: f64,
}

/// How a backfill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Cancelled,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A backfill that ended, as checkpoints remember it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub request: Request,
    pub outcome: Outcome,
    pub counts: Counts,
    pub seconds: f64,
    /// RFC 3339.
    pub finished_at: String,
    /// Where a cancelled backfill stopped: the same backfill asked again
    /// resumes there, so the rows it emitted are not emitted twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// The content of a watermark message: which chunk it bounds. A chunk is
/// named by where it starts and how many rows it asks for, so a high
/// watermark streamed again after a restart says which rows it covered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The job writing it: jobs reading the same database see each other's.
    pub job: String,
    /// The backfill's id.
    pub id: String,
    /// Random per chunk attempt: pairs a high watermark with its low one.
    pub nonce: u64,
    pub high: bool,
    /// The chunk reads keys after this one (`None`: from the first).
    pub cursor: Option<String>,
    pub limit: usize,
}

impl Marker {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("marker serialises")
    }

    pub fn decode(content: &[u8]) -> Option<Marker> {
        serde_json::from_slice(content).ok()
    }
}

/// One line about a backfill: phase, rows, progress.
pub fn describe(progress: &Progress) -> String {
    let c = &progress.counts;
    let done = c.read.max(c.emitted + c.superseded + c.streamed);
    let ratio = if progress.estimate > 0 {
        format!(
            " ({:.1}%)",
            100.0 * done as f64 / progress.estimate.max(done) as f64
        )
    } else {
        String::new()
    };
    format!(
        "backfill {} of {} {}: {}, {done} of ~{} rows read{ratio}; {} emitted, {} superseded by the live \
         stream, {} already streamed; {} chunks, {} historical windows; {:.1} s",
        progress.request.id,
        progress.request.table,
        progress.request.range(),
        progress.phase.label(),
        progress.estimate,
        c.emitted,
        c.superseded,
        c.streamed,
        c.chunks,
        c.windows,
        progress.seconds,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(since: i64, until: Option<i64>) -> Request {
        Request {
            id: Request::id_for("t", since, until, None),
            table: "t".into(),
            since,
            until,
            filter: None,
            max_rate: None,
            requested_at: String::new(),
        }
    }

    #[test]
    fn ids_follow_the_range_and_filter() {
        assert_eq!(
            Request::id_for("t", 1, Some(2), None),
            Request::id_for("t", 1, Some(2), None)
        );
        assert_ne!(
            Request::id_for("t", 1, Some(2), None),
            Request::id_for("t", 1, Some(3), None)
        );
        assert_ne!(
            Request::id_for("t", 1, Some(2), None),
            Request::id_for("t", 1, Some(2), Some("device = 'ios'"))
        );
    }

    #[test]
    fn ranges_overlap_when_they_share_an_instant() {
        assert!(request(0, Some(10)).overlaps(&request(5, None)));
        assert!(!request(0, Some(10)).overlaps(&request(10, Some(20))));
        assert!(request(0, None).overlaps(&request(100, Some(200))));
    }

    #[test]
    fn markers_round_trip() {
        let marker = Marker {
            job: "engagement".into(),
            id: "bf_1".into(),
            nonce: 42,
            high: true,
            cursor: Some("17".into()),
            limit: 2000,
        };
        assert_eq!(Marker::decode(marker.encode().as_bytes()), Some(marker));
        assert_eq!(Marker::decode(b"not json"), None);
    }
}
