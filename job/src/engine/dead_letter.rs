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
//! [`RejectedChange`](crate::source::RejectedChange)) goes there too, with
//! reason `decode_error:<column>` and the row as Postgres sent it.
//!
//! Dead letters are staged and committed with checkpoints like any Parquet
//! sink, so a replayed row is dead-lettered exactly once.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use super::side_output;
use crate::sink::{Sink, SinkState};
use crate::source::{RejectedChange, COMMIT_TS_COLUMN, LSN_COLUMN, SEQ_COLUMN};
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
