//! Commit → visible latency: the commit times a write carries to its sink's
//! task ([`CommitTimes`]), and the newest latencies each sink observed
//! ([`RecentLatencies`]), from which the JSON API gives p50 and p99. The
//! task observes them once the sink made the write visible (`sink/task.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampMicrosecondType;

use super::histogram::RunHistogram;

use crate::change::COMMIT_TS_COLUMN;

/// Commit times of the changes one write carries, for the commit → visible
/// histogram: runs of (commit time in Unix milliseconds, changes), in stream
/// order. Changes committed in the same millisecond share a run, so the
/// list stays short however many changes a batch holds.
#[derive(Debug, Default)]
pub struct CommitTimes {
    runs: Vec<(i64, u32)>,
}

impl CommitTimes {
    /// The commit times of the changes of `batch` (a change batch, with
    /// `_commit_ts`); `None` if it has none.
    pub fn of(batch: &RecordBatch) -> Option<Arc<CommitTimes>> {
        let column = batch.column_by_name(COMMIT_TS_COLUMN)?;
        let times = column.as_primitive_opt::<TimestampMicrosecondType>()?;
        let mut commits = CommitTimes::default();
        for micros in times.iter().flatten() {
            commits.push(micros.div_euclid(1000), 1);
        }
        (!commits.runs.is_empty()).then(|| Arc::new(commits))
    }

    /// Most runs a [`CommitTimes`] that accumulates (a window's pending
    /// changes) keeps: past it, neighbouring runs merge (a 24-hour window's
    /// commit times are kept to about 20 s).
    pub const MAX_RUNS: usize = 4096;

    /// Appends `other`'s runs (later commits), merging neighbours past [`Self::MAX_RUNS`].
    pub fn absorb(&mut self, other: &CommitTimes) {
        for &(millis, changes) in &other.runs {
            self.push(millis, changes);
        }
        if self.runs.len() > Self::MAX_RUNS {
            let merged: Vec<(i64, u32)> = self
                .runs
                .chunks(2)
                .map(|pair| {
                    let changes: u64 = pair.iter().map(|(_, n)| u64::from(*n)).sum();
                    let weighted: i128 = pair
                        .iter()
                        .map(|(ms, n)| i128::from(*ms) * i128::from(*n))
                        .sum();
                    let mean = (weighted / i128::from(changes.max(1))) as i64;
                    (mean, changes.min(u64::from(u32::MAX)) as u32)
                })
                .collect();
            self.runs = merged;
        }
    }

    /// Takes the runs committed before `end_micros` (Unix µs), leaving the rest.
    pub fn take_before(&mut self, end_micros: i64) -> Option<Arc<CommitTimes>> {
        let end_ms = end_micros.div_euclid(1000);
        let split = self.runs.partition_point(|(ms, _)| *ms < end_ms);
        if split == 0 {
            return None;
        }
        let rest = self.runs.split_off(split);
        let taken = std::mem::replace(&mut self.runs, rest);
        Some(Arc::new(CommitTimes { runs: taken }))
    }

    fn push(&mut self, millis: i64, changes: u32) {
        match self.runs.last_mut() {
            Some((last, count)) if *last == millis => *count = count.saturating_add(changes),
            _ => self.runs.push((millis, changes)),
        }
    }

    /// Observes, in `histogram` and `recent`, the seconds from each
    /// change's commit to `now_ms` (Unix milliseconds).
    pub fn observe(&self, histogram: &RunHistogram, recent: &RecentLatencies, now_ms: i64) {
        let mut newest = recent.inner.lock().unwrap_or_else(|e| e.into_inner());
        for &(millis, changes) in &self.runs {
            let seconds = (now_ms - millis).max(0) as f64 / 1000.0;
            histogram.observe_n(seconds, u64::from(changes));
            if newest.len() == RecentLatencies::KEEP {
                newest.pop_front();
            }
            newest.push_back((seconds, changes));
        }
    }
}

/// The latencies of the newest changes a sink made visible, as runs of
/// (seconds, changes): the newest [`RecentLatencies::KEEP`] runs.
#[derive(Debug, Default)]
pub struct RecentLatencies {
    inner: Mutex<VecDeque<(f64, u32)>>,
}

impl RecentLatencies {
    pub const KEEP: usize = 4096;

    /// The quantiles `qs` (each 0..=1) of the newest latencies, in
    /// seconds, from one sorted copy; `None` before any change was made visible.
    pub fn quantiles<const N: usize>(&self, qs: [f64; N]) -> [Option<f64>; N] {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut runs: Vec<(f64, u32)> = inner.iter().copied().collect();
        drop(inner);
        let total: u64 = runs.iter().map(|(_, n)| u64::from(*n)).sum();
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        qs.map(|q| {
            if total == 0 {
                return None;
            }
            let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            runs.iter().find_map(|&(seconds, changes)| {
                seen += u64::from(changes);
                (seen >= rank).then_some(seconds)
            })
        })
    }
}

/// Unix milliseconds now.
pub fn unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::stats::latency_buckets;

    #[test]
    fn commit_times_split_at_a_window_end_and_stay_bounded() {
        let mut pending = CommitTimes::default();
        let batch = CommitTimes {
            runs: vec![(1_000, 2), (1_500, 1), (2_000, 3)],
        };
        pending.absorb(&batch);
        let taken = pending.take_before(1_600_000).unwrap();
        assert_eq!(taken.runs, vec![(1_000, 2), (1_500, 1)]);
        assert_eq!(pending.runs, vec![(2_000, 3)]);
        assert!(pending.take_before(1_000_000).is_none());
        let histogram = latency_buckets();
        let recent = RecentLatencies::default();
        taken.observe(&histogram, &recent, 3_000);
        // 2 s twice, 1.5 s once.
        assert_eq!(recent.quantiles([0.5, 0.01]), [Some(2.0), Some(1.5)]);
        // A day of one change per millisecond stays within MAX_RUNS runs,
        // and keeps its count.
        let mut day = CommitTimes::default();
        for second in 0..200 {
            let runs = (0..1000).map(|ms| (second * 1000 + ms, 1)).collect();
            day.absorb(&CommitTimes { runs });
        }
        assert!(day.runs.len() <= CommitTimes::MAX_RUNS);
        assert_eq!(
            day.runs.iter().map(|(_, n)| u64::from(*n)).sum::<u64>(),
            200_000
        );
        assert!(day.runs.windows(2).all(|w| w[0].0 <= w[1].0));
    }
}
