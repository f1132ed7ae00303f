//! The dead-letter output: change rows that fail a source table's CHECK.
//!
//! Bad input never stops the job and is never dropped silently: each row
//! that fails a `CONSTRAINT name CHECK (...)` of its table is written to the
//! `filesystem` table `dead_letter` (when the job declares one that no
//! `INSERT` writes) with the constraint's name as reason code, its source
//! position and the original row as JSON, and the good rows of the batch go
//! on. A job that declares checks but no `dead_letter` table stops with an
//! error naming the failed check instead, rather than losing the row.
//!
//! A change the source cannot decode (see
//! [`RejectedChange`]) goes there too, with
//! reason `decode_error:<column>` and the row as Postgres sent it.
//!
//! Dead letters are staged and committed with checkpoints like any Parquet
//! sink, so a replayed row is dead-lettered exactly once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Int64Array, StringArray, TimestampMicrosecondArray,
};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use super::{last_position, side_output, JobError};
use crate::change::{Op, COMMIT_TS_COLUMN, LSN_COLUMN, OP_COLUMN, SEQ_COLUMN};
use crate::sink::{Sink, SinkState};
use crate::source::RejectedChange;
use crate::sql::JobSpec;

/// The table name that receives dead letters.
pub const DEAD_LETTER_TABLE: &str = "dead_letter";

/// Columns of the dead-letter output.
pub fn schema() -> SchemaRef {
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("table", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new(LSN_COLUMN, DataType::Int64, true),
        Field::new(SEQ_COLUMN, DataType::Int64, true),
        Field::new(COMMIT_TS_COLUMN, time, true),
        Field::new("row", DataType::Utf8, false),
    ]))
}

/// Opens the dead-letter sink if the job declares one (and nothing inserts into it).
pub async fn open(
    spec: &JobSpec,
    restored: Option<&SinkState>,
) -> Result<Option<Sink>, crate::sink::SinkError> {
    // Partitioned by commit time, when the table has a time pattern.
    side_output::open(spec, DEAD_LETTER_TABLE, schema(), 4, restored).await
}

/// Dead-letter rows for `bad` (rows of `table`), each with its reason.
pub fn rows(
    table: &str,
    reasons: &[&str],
    bad: &RecordBatch,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = bad.num_rows();
    let column =
        |name: &str, data_type: &DataType| side_output::column_or_null(bad, name, data_type);
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![table; n])),
        Arc::new(StringArray::from(reasons.to_vec())),
        column(LSN_COLUMN, &DataType::Int64)?,
        column(SEQ_COLUMN, &DataType::Int64)?,
        column(COMMIT_TS_COLUMN, &time)?,
        side_output::json_rows(bad)?,
    ];
    RecordBatch::try_new(schema(), columns)
}

/// Dead-letter rows for changes of `table` the source could not decode: the
/// reason `decode_error:<column>` and the row as Postgres sent it.
pub fn rejected_rows(
    table: &str,
    rejected: &[RejectedChange],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![table; rejected.len()])),
        Arc::new(StringArray::from_iter_values(
            rejected.iter().map(|r| r.reason.as_str()),
        )),
        Arc::new(Int64Array::from_iter_values(
            rejected.iter().map(|r| r.position.lsn as i64),
        )),
        Arc::new(Int64Array::from_iter_values(
            rejected.iter().map(|r| r.position.seq as i64),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                rejected.iter().map(|r| r.commit_ts_micros),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            rejected.iter().map(|r| r.row.as_str()),
        )),
    ];
    RecordBatch::try_new(schema(), columns)
}

impl super::Engine {
    /// Sends the changes of `source` that could not be decoded to the
    /// dead-letter output; without one, the job stops naming the change.
    pub(super) async fn divert_rejected(
        &mut self,
        source: usize,
        rejected: &[RejectedChange],
    ) -> Result<(), JobError> {
        let Some(first) = rejected.first() else {
            return Ok(());
        };
        let table = self.plan.sources[source].def.name.clone();
        match &mut self.dead_letter_sink {
            // A rebuild replays captured changes: rejected ones never were.
            Some(_) if self.rebuilding.is_some() => {}
            Some(sink) => {
                let rows = rejected_rows(&table, rejected)
                    .and_then(|rows| side_output::unheld(&rows, sink.position()))
                    .map_err(JobError::Arrow)?;
                if rows.num_rows() > 0 {
                    tracing::warn!(
                        table = %table,
                        rows = rows.num_rows(),
                        reason = %first.reason,
                        detail = %first.detail,
                        "changes that cannot be decoded went to dead_letter"
                    );
                    self.stats
                        .dead_lettered
                        .fetch_add(rows.num_rows() as u64, Ordering::Relaxed);
                    self.stats.dead_letters.record(&rows);
                    sink.write_window(vec![rows], 0, self.position, None).await?;
                    self.dirty = true;
                }
            }
            None => {
                return Err(JobError::BadInput(format!(
                    "a change of `{table}` at {} cannot be decoded: column {} holds a value engage cannot \
                     represent ({}); declare a filesystem table `{}` to divert such rows there instead of stopping",
                    first.position,
                    first.reason.trim_start_matches("decode_error:"),
                    first.detail,
                    DEAD_LETTER_TABLE
                )))
            }
        }
        Ok(())
    }

    /// Writes rows of source `table` (`bad`, one reason each) to the
    /// dead-letter output, if the job has one; the sink skips what it holds.
    pub(super) async fn write_dead_letters(
        &mut self,
        table: &str,
        reasons: &[&str],
        bad: &RecordBatch,
    ) -> Result<(), JobError> {
        // A rebuild re-reads changes the dead-letter output already holds.
        if self.rebuilding.is_some() {
            return Ok(());
        }
        let Some(sink) = &mut self.dead_letter_sink else {
            return Ok(());
        };
        let rows = rows(table, reasons, bad)
            .and_then(|rows| side_output::unheld(&rows, sink.position()))
            .map_err(JobError::Arrow)?;
        self.stats.dead_letters.record(&rows);
        sink.write_window(vec![rows], 0, self.position, None)
            .await?;
        self.stats
            .dead_lettered
            .fetch_add(bad.num_rows() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sends the rows of `batch` that fail a CHECK of `source` to the
    /// dead-letter output and returns the rest (old images of updates that
    /// fail are dropped too: their rows were never counted). As in SQL, a
    /// CHECK validates new row images: a delete has none, so deletes always
    /// pass (under the default replica identity they carry only the key).
    pub(super) async fn divert_bad_rows(
        &mut self,
        source: usize,
        batch: RecordBatch,
        before: Option<RecordBatch>,
    ) -> Result<(RecordBatch, Option<RecordBatch>), JobError> {
        let Some(check) = &self.plan.checks[source] else {
            return Ok((batch, before));
        };
        let dimensions = self.dimension_contents(&check.dimensions);
        let table = self.plan.sources[source].def.name.clone();
        let error = |e: datafusion::error::DataFusionError| JobError::Query {
            sink: format!("CHECK constraints of {table}"),
            message: e.to_string(),
        };
        let Some(mut failed) = self
            .plan
            .failing_checks(source, &batch, &dimensions)
            .await
            .map_err(error)?
        else {
            return Ok((batch, before));
        };
        if let Some(ops) = batch
            .column_by_name(OP_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>())
        {
            for (row, failed) in failed.iter_mut().enumerate() {
                if ops.is_valid(row) && ops.value(row) == Op::Delete.letter() {
                    *failed = None;
                }
            }
        }
        if failed.iter().all(Option::is_none) {
            return Ok((batch, before));
        }
        let keep: BooleanArray = failed.iter().map(|f| Some(f.is_none())).collect();
        let bad_mask = arrow::compute::not(&keep).map_err(JobError::Arrow)?;
        let bad = filter_record_batch(&batch, &bad_mask).map_err(JobError::Arrow)?;
        let reasons: Vec<String> = failed
            .iter()
            .flatten()
            .map(|&i| check.names[i].clone())
            .collect();
        match &self.dead_letter_sink {
            Some(_) => {
                let reasons: Vec<&str> = reasons.iter().map(String::as_str).collect();
                self.write_dead_letters(&table, &reasons, &bad).await?
            }
            None => {
                let position = last_position(&bad);
                return Err(JobError::BadInput(format!(
                    "a change of `{table}` at {position} fails CHECK `{}`; declare a filesystem table `{}` to divert \
                     such rows there instead of stopping",
                    reasons[0],
                    DEAD_LETTER_TABLE
                )));
            }
        }
        let good = filter_record_batch(&batch, &keep).map_err(JobError::Arrow)?;
        let before = match before {
            Some(before) => match self
                .plan
                .failing_checks(source, &before, &dimensions)
                .await
                .map_err(error)?
            {
                Some(failed) => {
                    let keep: BooleanArray = failed.iter().map(|f| Some(f.is_none())).collect();
                    Some(filter_record_batch(&before, &keep).map_err(JobError::Arrow)?)
                }
                None => Some(before),
            },
            None => None,
        };
        Ok((good, before))
    }
}
