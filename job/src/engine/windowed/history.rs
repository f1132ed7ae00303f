//! Historical windows of a backfill: window state kept apart from the live
//! one, fed with every row of the backfilled range, and written once, whole,
//! to the windowed sinks that append (see `crate::backfill`, "Windows").

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use arrow::array::BooleanArray;
use arrow::compute::filter_record_batch;
use arrow::record_batch::RecordBatch;

use super::WindowStates;

/// A closed historical window: query, aggregate, end (Unix µs), its rows.
pub(in crate::engine) type ClosedWindow = (usize, usize, i64, RecordBatch);
use crate::engine::udf_errors::Step;
use crate::engine::{Engine, JobError};

impl Engine {
    /// Feeds `rows` of `source` (read from the table, `_op = 'r'`) to the
    /// states of `history` that an appending sink reads. Rows failing a
    /// CHECK are left out, as the live path leaves them out of windows.
    pub(in crate::engine) async fn feed_windows_apart(
        &mut self,
        history: &mut WindowStates,
        source: usize,
        rows: &RecordBatch,
    ) -> Result<(), JobError> {
        let rows = self.passing_checks(source, rows).await?;
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let views = self.compute_views(source, &rows, None).await?;
        for s in 0..history.states.len() {
            let appends = history.readers[s]
                .iter()
                .any(|&(q, _)| !self.sinks[q].is_redis());
            let (q, w) = history.readers[s][0];
            let query = &self.plan.queries[q];
            if !appends || query.driving != source {
                continue;
            }
            let input = match query.view {
                Some(v) => views[v]
                    .as_ref()
                    .expect("computed for its driving source")
                    .0
                    .clone(),
                None => rows.clone(),
            };
            if input.num_rows() == 0 {
                continue;
            }
            let dimensions = self.dimension_contents(&query.dimensions);
            let step = Step::Pre(q, w);
            let input = self.unpoisoned(step, input)?;
            let result = self
                .plan
                .execute_pre(q, w, input.clone(), &dimensions)
                .await;
            let output = self
                .checked(step, &input, &dimensions, result, |e| {
                    self.query_error(q, e)
                })
                .await?;
            for batch in output {
                history.states[s]
                    .accumulate(&batch, 1, None)
                    .map_err(JobError::Arrow)?;
            }
        }
        Ok(())
    }

    /// Closes every window of query `q` in `history`; returns those inside
    /// `[since, until)` if the query's sink appends, as (query, aggregate,
    /// end, rows), oldest first.
    pub(in crate::engine) fn close_windows_apart(
        &mut self,
        history: &mut WindowStates,
        q: usize,
        since: i64,
        until: i64,
    ) -> Result<Vec<ClosedWindow>, JobError> {
        let query = &self.plan.queries[q];
        let mut windows = Vec::new();
        if !query.is_windowed() || self.sinks[q].is_redis() {
            return Ok(windows);
        }
        for w in 0..history.slots[q].len() {
            let width = query.windows[w].kind.width();
            for (end, rows) in history.emit(q, w, i64::MAX)? {
                if end - width >= since && end <= until {
                    windows.push((q, w, end, rows));
                }
            }
        }
        windows.sort_by_key(|(_, w, end, _)| (*end, *w));
        Ok(windows)
    }

    /// Writes closed historical windows from the front of `closed` until
    /// `budget` has passed (the live stream waits meanwhile); returns how
    /// many were written.
    pub(in crate::engine) async fn write_windows_apart(
        &mut self,
        closed: &mut VecDeque<ClosedWindow>,
        budget: Duration,
    ) -> Result<u64, JobError> {
        let started = Instant::now();
        let mut written = 0;
        while started.elapsed() < budget {
            let Some((q, w, end, rows)) = closed.pop_front() else {
                break;
            };
            self.write_closed_window(q, w, end, rows, None).await?;
            written += 1;
        }
        Ok(written)
    }

    /// The rows of `batch` (of `source`) that pass its CHECK constraints.
    async fn passing_checks(
        &self,
        source: usize,
        batch: &RecordBatch,
    ) -> Result<RecordBatch, JobError> {
        let Some(check) = &self.plan.checks[source] else {
            return Ok(batch.clone());
        };
        let dimensions = self.dimension_contents(&check.dimensions);
        let failed = self
            .plan
            .failing_checks(source, batch, &dimensions)
            .await
            .map_err(|e| JobError::Query {
                sink: format!(
                    "CHECK constraints of {}",
                    self.plan.sources[source].def.name
                ),
                message: e.to_string(),
            })?;
        match failed {
            None => Ok(batch.clone()),
            Some(failed) => {
                let keep: BooleanArray = failed.iter().map(|f| Some(f.is_none())).collect();
                filter_record_batch(batch, &keep).map_err(JobError::Arrow)
            }
        }
    }
}
