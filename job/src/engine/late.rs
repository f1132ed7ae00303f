//! The late-events output: inserts that arrive behind the watermark.
//!
//! A windowed query aggregates an insert only if its event time is at or
//! above the query's watermark; an older insert belongs to windows that have
//! been emitted already. Such events are counted (`engage_late_events_total`)
//! and, when the job SQL declares a `filesystem` table named `late_events`
//! that no `INSERT` writes, written there once each: the source table, the
//! event time, the watermark it missed, its source position and the whole
//! original row as JSON. Nothing is dropped silently. The watermark belongs to
//! the source (the newest of its windowed queries'), as in Flink and Arroyo.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use super::side_output;
use crate::change::{COMMIT_TS_COLUMN, LSN_COLUMN, SEQ_COLUMN};
use crate::sink::{Sink, SinkState};
use crate::sql::JobSpec;

/// The table name that receives late events.
pub const LATE_EVENTS_TABLE: &str = "late_events";

/// Columns of the late-events output.
pub fn schema() -> SchemaRef {
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("table", DataType::Utf8, false),
        Field::new("event_time", time.clone(), true),
        Field::new("watermark", time.clone(), false),
        Field::new(LSN_COLUMN, DataType::Int64, true),
        Field::new(SEQ_COLUMN, DataType::Int64, true),
        Field::new(COMMIT_TS_COLUMN, time, true),
        Field::new("row", DataType::Utf8, false),
    ]))
}

/// Opens the late-events sink if the job declares one (and nothing inserts into it).
pub async fn open(
    spec: &JobSpec,
    restored: Option<&SinkState>,
) -> Result<Option<Sink>, crate::sink::SinkError> {
    // Partitioned by the watermark missed, when the table has a time pattern.
    side_output::open(spec, LATE_EVENTS_TABLE, schema(), 2, restored).await
}

/// Builds late-event rows from late change rows of `table`, each with the
/// watermark it missed.
pub fn rows(
    table: &str,
    watermarks: &[i64],
    time_column: &str,
    late: &RecordBatch,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = late.num_rows();
    let column =
        |name: &str, data_type: &DataType| side_output::column_or_null(late, name, data_type);
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![table; n])),
        column(time_column, &time)?,
        Arc::new(TimestampMicrosecondArray::from(watermarks.to_vec()).with_timezone("UTC")),
        column(LSN_COLUMN, &DataType::Int64)?,
        column(SEQ_COLUMN, &DataType::Int64)?,
        column(COMMIT_TS_COLUMN, &time)?,
        side_output::json_rows(late)?,
    ];
    RecordBatch::try_new(schema(), columns)
}
