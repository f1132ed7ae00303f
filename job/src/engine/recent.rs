//! The newest outputs the JSON API shows: dead letters (per reason, and the
//! newest few with their rows) and the last windows each windowed sink was
//! written. Kept in memory, bounded, filled by the engine as it writes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use serde::Serialize;

use crate::change::Position;

/// One dead letter, as the JSON API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// When the job diverted it (RFC 3339).
    pub at: String,
    pub table: String,
    pub reason: String,
    /// The change's source position (`LSN/seq`), if known.
    pub position: Option<String>,
    /// The original row as JSON (cut at [`DeadLetterLog::ROW_LIMIT`] bytes).
    pub row: String,
}

/// Dead letters per reason since the job started, and the newest
/// [`DeadLetterLog::KEEP`] of them.
#[derive(Debug, Default)]
pub struct DeadLetterLog {
    inner: Mutex<DeadLetterInner>,
}

#[derive(Debug, Default)]
struct DeadLetterInner {
    by_reason: BTreeMap<String, u64>,
    newest: VecDeque<DeadLetter>,
}

impl DeadLetterLog {
    pub const KEEP: usize = 100;
    pub const ROW_LIMIT: usize = 2048;

    /// Records the rows of a dead-letter batch (the `dead_letter` schema:
    /// `table`, `reason`, `_lsn`, `_seq`, `_commit_ts`, `row`).
    pub fn record(&self, rows: &RecordBatch) {
        let text = |name: &str| {
            rows.column_by_name(name)
                .and_then(|c| c.as_string_opt::<i32>().cloned())
        };
        let int = |name: &str| {
            rows.column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int64Type>().cloned())
        };
        let (Some(tables), Some(reasons), Some(row_texts)) =
            (text("table"), text("reason"), text("row"))
        else {
            return;
        };
        let (lsns, seqs) = (
            int(crate::change::LSN_COLUMN),
            int(crate::change::SEQ_COLUMN),
        );
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let first_kept = rows.num_rows().saturating_sub(Self::KEEP);
        for row in 0..rows.num_rows() {
            let reason = reasons.value(row);
            match inner.by_reason.get_mut(reason) {
                Some(count) => *count += 1,
                None => {
                    inner.by_reason.insert(reason.to_string(), 1);
                }
            }
            if row < first_kept {
                continue;
            }
            let position = match (&lsns, &seqs) {
                (Some(l), Some(s)) if l.is_valid(row) && s.is_valid(row) => {
                    Some(Position::new(l.value(row) as u64, s.value(row) as u64).to_string())
                }
                _ => None,
            };
            let mut text = row_texts.value(row);
            if text.len() > Self::ROW_LIMIT {
                let mut cut = Self::ROW_LIMIT;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text = &text[..cut];
            }
            if inner.newest.len() == Self::KEEP {
                inner.newest.pop_front();
            }
            inner.newest.push_back(DeadLetter {
                at: at.clone(),
                table: tables.value(row).to_string(),
                reason: reason.to_string(),
                position,
                row: text.to_string(),
            });
        }
    }

    /// Dead letters per reason.
    pub fn by_reason(&self) -> Vec<(String, u64)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .by_reason
            .iter()
            .map(|(r, c)| (r.clone(), *c))
            .collect()
    }

    /// The newest `limit` dead letters, newest first.
    pub fn newest(&self, limit: usize) -> Vec<DeadLetter> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.newest.iter().rev().take(limit).cloned().collect()
    }
}

/// The newest windows written to each windowed sink, kept in memory for the
/// JSON API and the dashboard (the last [`RecentWindows::KEEP`] per sink).
#[derive(Debug, Default)]
pub struct RecentWindows {
    inner: Mutex<BTreeMap<String, VecDeque<WindowRows>>>,
}

/// The output of one closed window.
#[derive(Debug, Clone)]
pub struct WindowRows {
    /// Window start and end, Unix microseconds.
    pub start_micros: i64,
    pub end_micros: i64,
    pub batches: Vec<RecordBatch>,
}

impl RecentWindows {
    pub const KEEP: usize = 120;

    /// Records the output of the window `[start_micros, end_micros)` for `sink`.
    pub fn record(&self, sink: &str, start_micros: i64, end_micros: i64, batches: &[RecordBatch]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let windows = inner.entry(sink.to_string()).or_default();
        if windows.back().is_some_and(|w| w.end_micros >= end_micros) {
            return; // a replayed window, or one already recorded
        }
        if windows.len() == Self::KEEP {
            windows.pop_front();
        }
        windows.push_back(WindowRows {
            start_micros,
            end_micros,
            batches: batches.to_vec(),
        });
    }

    /// The newest window of `sink`, if it has written one since the job started.
    pub fn latest(&self, sink: &str) -> Option<WindowRows> {
        self.newest(sink, 1).and_then(|mut windows| windows.pop())
    }

    /// The newest `limit` windows of `sink`, newest first (`None`: the sink
    /// has written no window since the job started).
    pub fn newest(&self, sink: &str, limit: usize) -> Option<Vec<WindowRows>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let windows = inner.get(sink)?;
        Some(windows.iter().rev().take(limit).cloned().collect())
    }
}
