//! Processing one change batch: the queries it drives (views computed once
//! and shared, dimension tables as of the batch), their sinks, the windows,
//! then the batch's own dimension table; and the position helpers every
//! step filters by.

use std::sync::atomic::Ordering;

use arrow::array::{Array, BooleanArray, Int64Array};
use arrow::compute::filter_record_batch;
use arrow::record_batch::RecordBatch;

use super::udf_errors::Step;
use super::{Engine, JobError};
use crate::change::{Position, LSN_COLUMN, SEQ_COLUMN};

impl Engine {
    /// Runs the queries driven by `source` over `batch`, then updates its dimension.
    pub(super) async fn process(
        &mut self,
        source: usize,
        batch: RecordBatch,
        before: Option<RecordBatch>,
    ) -> Result<(), JobError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let last = last_position(&batch);
        let read = batch.num_rows() as u64;
        let ops = crate::engine::stats::JobStats::op_counts(&batch);
        // Commit times for the commit → visible histograms; not while a
        // rebuild replays old changes (their latency is the outage's).
        let commits = if self.rebuilding.is_none() {
            crate::engine::latency::CommitTimes::of(&batch)
        } else {
            None
        };
        let (batch, before) = self.divert_bad_rows(source, batch, before).await?;
        self.dead_letter_poisoned(source, &batch).await?;
        let views = self.compute_views(source, &batch, before.as_ref()).await?;
        for (index, query) in self.plan.queries.iter().enumerate() {
            if query.driving != source || query.is_windowed() {
                continue;
            }
            if self
                .rebuilding
                .as_ref()
                .is_some_and(|r| !r.contains(&index))
            {
                continue;
            }
            let full = match query.view {
                Some(v) => {
                    &views[v]
                        .as_ref()
                        .expect("computed for its driving source")
                        .0
                }
                None => &batch,
            };
            if full.num_rows() == 0 {
                continue;
            }
            let dimensions = self.dimension_contents(&query.dimensions);
            let input = after(full, self.sinks[index].position()).map_err(JobError::Arrow)?;
            if input.num_rows() == 0 {
                continue;
            }
            // Re-sent changes the sink held were dropped: they were visible long ago.
            let commits = commits
                .clone()
                .filter(|_| input.num_rows() == full.num_rows());
            let step = Step::Query(index);
            let input = self.unpoisoned(step, input)?;
            let result = self.plan.execute(index, input.clone(), &dimensions).await;
            let sink_name = self.sinks[index].name().to_string();
            let output = self
                .checked(step, &input, &dimensions, result, |e| JobError::Query {
                    sink: sink_name,
                    message: e.to_string(),
                })
                .await?;
            let sink = &mut self.sinks[index];
            let rows: u64 = output.iter().map(|b| b.num_rows() as u64).sum();
            sink.write(output, last, commits).await?;
            self.stats
                .record_write(index, rows, last.lsn, sink.detached());
        }
        if self.rebuilding.is_some() {
            if let Some(dimension) = &mut self.dimensions[source] {
                dimension.apply(&batch).map_err(JobError::Arrow)?;
            }
            return Ok(());
        }
        self.position = self.position.max(last);
        if let Some(commits) = &commits {
            for (q, query) in self.plan.queries.iter().enumerate() {
                if query.driving == source && query.is_windowed() {
                    self.window_commits[q].absorb(commits);
                }
            }
        }
        self.process_windowed(source, &batch, before.as_ref(), &views)
            .await?;
        if let Some(dimension) = &mut self.dimensions[source] {
            dimension.apply(&batch).map_err(JobError::Arrow)?;
        }
        self.dirty = true;
        self.stats.changes_in.fetch_add(read, Ordering::Relaxed);
        self.stats.add_ops(source, ops);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The current contents of the dimension sources `indexes`, for a query.
    pub(super) fn dimension_contents(&self, indexes: &[usize]) -> Vec<(usize, RecordBatch)> {
        indexes
            .iter()
            .map(|&d| {
                (
                    d,
                    self.dimensions[d]
                        .as_ref()
                        .expect("planned dimension")
                        .contents()
                        .clone(),
                )
            })
            .collect()
    }

    /// Computes the shared views driven by `source` over `batch` (and over the
    /// old images in `before`), by view index.
    pub(super) async fn compute_views(
        &mut self,
        source: usize,
        batch: &RecordBatch,
        before: Option<&RecordBatch>,
    ) -> Result<ViewOutputs, JobError> {
        let mut outputs = vec![None; self.plan.views.len()];
        for (v, view) in self.plan.views.iter().enumerate() {
            let used = self.plan.queries.iter().any(|q| q.view == Some(v));
            if view.driving != source || !used {
                continue;
            }
            let dimensions = self.dimension_contents(&view.dimensions);
            let error = |e: datafusion::error::DataFusionError| JobError::Query {
                sink: format!("view {}", view.name),
                message: e.to_string(),
            };
            let step = Step::View(v);
            let input = self.unpoisoned(step, batch.clone())?;
            let result = self.plan.execute_view(v, input.clone(), &dimensions).await;
            let rows = self
                .checked(step, &input, &dimensions, result, error)
                .await?;
            let old = match before {
                Some(before) => {
                    let input = self.unpoisoned(step, before.clone())?;
                    let result = self.plan.execute_view(v, input.clone(), &dimensions).await;
                    Some(
                        self.checked(step, &input, &dimensions, result, error)
                            .await?,
                    )
                }
                None => None,
            };
            outputs[v] = Some((rows, old));
        }
        Ok(outputs)
    }
}

/// Per shared view: its rows for the current batch, and for the batch's old images.
pub(super) type ViewOutputs = Vec<Option<(RecordBatch, Option<RecordBatch>)>>;

/// Capture log entries of update old images are named `<table>` + this.
pub(super) const BEFORE_SUFFIX: &str = "#before";

/// Position of the last row of a change batch.
pub(super) fn last_position(batch: &RecordBatch) -> Position {
    let (lsn, seq) = position_columns(batch);
    let last = batch.num_rows() - 1;
    Position::new(lsn.value(last) as u64, seq.value(last) as u64)
}

pub(super) fn position_columns(batch: &RecordBatch) -> (&Int64Array, &Int64Array) {
    let column = |name| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .expect("change batches carry _lsn and _seq")
    };
    (column(LSN_COLUMN), column(SEQ_COLUMN))
}

/// The rows of `batch` strictly after `position`.
pub(super) fn after(
    batch: &RecordBatch,
    position: Position,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let (lsn, seq) = position_columns(batch);
    let at = |row: usize| Position::new(lsn.value(row) as u64, seq.value(row) as u64);
    if at(0) > position {
        return Ok(batch.clone());
    }
    if at(batch.num_rows() - 1) <= position {
        return Ok(batch.slice(0, 0));
    }
    let keep: BooleanArray = (0..batch.num_rows())
        .map(|row| Some(at(row) > position))
        .collect();
    filter_record_batch(batch, &keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn changes(positions: &[(i64, i64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(LSN_COLUMN, DataType::Int64, false),
            Field::new(SEQ_COLUMN, DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(
                    positions.iter().map(|p| p.0).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    positions.iter().map(|p| p.1).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    #[test]
    fn input_at_or_below_a_sink_position_is_dropped() {
        let batch = changes(&[(10, 0), (10, 1), (20, 0), (20, 1)]);
        assert_eq!(after(&batch, Position::new(10, 1)).unwrap().num_rows(), 2);
        assert_eq!(after(&batch, Position::new(5, 9)).unwrap().num_rows(), 4);
        assert_eq!(after(&batch, Position::new(20, 1)).unwrap().num_rows(), 0);
        assert_eq!(last_position(&batch), Position::new(20, 1));
    }
}
