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
use arrow::json::writer::LineDelimited;
use arrow::json::WriterBuilder;
use arrow::record_batch::RecordBatch;

use crate::sink::parquet::ParquetSink;
use crate::sink::{Sink, SinkState};
use crate::source::{COMMIT_TS_COLUMN, LSN_COLUMN, SEQ_COLUMN};
use crate::sql::{Connector, JobSpec};

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
    let Some(table) = spec.tables.iter().find(|t| t.name == LATE_EVENTS_TABLE) else {
        return Ok(None);
    };
    if spec.inserts.iter().any(|i| i.sink == LATE_EVENTS_TABLE) {
        return Ok(None);
    }
    let Connector::Filesystem(options) = &table.connector else {
        return Ok(None);
    };
    let time_column = options.time_pattern.as_ref().map(|_| 2); // partition by the watermark missed
    let sink =
        ParquetSink::open_for_schema(LATE_EVENTS_TABLE, options, schema(), time_column, restored)
            .await?;
    Ok(Some(Sink::Parquet(Box::new(sink))))
}

/// Builds late-event rows from late change rows of `table`.
pub fn rows(
    table: &str,
    watermark: i64,
    time_column: &str,
    late: &RecordBatch,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = late.num_rows();
    let mut json = Vec::new();
    {
        let mut writer = WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, LineDelimited>(&mut json);
        writer.write(late)?;
        writer.finish()?;
    }
    let lines: Vec<&str> = std::str::from_utf8(&json)
        .map_err(|e| arrow::error::ArrowError::ExternalError(Box::new(e)))?
        .lines()
        .collect();
    let column = |name: &str, data_type: &DataType| -> Result<ArrayRef, arrow::error::ArrowError> {
        match late.column_by_name(name) {
            Some(c) => arrow::compute::cast(c, data_type),
            None => Ok(arrow::array::new_null_array(data_type, n)),
        }
    };
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![table; n])),
        column(time_column, &time)?,
        Arc::new(TimestampMicrosecondArray::from(vec![watermark; n]).with_timezone("UTC")),
        column(LSN_COLUMN, &DataType::Int64)?,
        column(SEQ_COLUMN, &DataType::Int64)?,
        column(COMMIT_TS_COLUMN, &time)?,
        Arc::new(StringArray::from(lines)),
    ];
    RecordBatch::try_new(schema(), columns)
}
