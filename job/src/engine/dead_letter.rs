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
//! Dead letters are staged and committed with checkpoints like any Parquet
//! sink, so a replayed row is dead-lettered exactly once.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::json::writer::LineDelimited;
use arrow::json::WriterBuilder;
use arrow::record_batch::RecordBatch;

use crate::sink::parquet::ParquetSink;
use crate::sink::{Sink, SinkState};
use crate::source::{COMMIT_TS_COLUMN, LSN_COLUMN, SEQ_COLUMN};
use crate::sql::{Connector, JobSpec};

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
    let Some(table) = spec.tables.iter().find(|t| t.name == DEAD_LETTER_TABLE) else {
        return Ok(None);
    };
    if spec.inserts.iter().any(|i| i.sink == DEAD_LETTER_TABLE) {
        return Ok(None);
    }
    let Connector::Filesystem(options) = &table.connector else {
        return Ok(None);
    };
    let time_column = options.time_pattern.as_ref().map(|_| 4); // partition by commit time
    let sink =
        ParquetSink::open_for_schema(DEAD_LETTER_TABLE, options, schema(), time_column, restored)
            .await?;
    Ok(Some(Sink::Parquet(Box::new(sink))))
}

/// Dead-letter rows for `bad` (rows of `table`), each with its reason.
pub fn rows(
    table: &str,
    reasons: &[&str],
    bad: &RecordBatch,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = bad.num_rows();
    let mut json = Vec::new();
    {
        let mut writer = WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, LineDelimited>(&mut json);
        writer.write(bad)?;
        writer.finish()?;
    }
    let lines: Vec<&str> = std::str::from_utf8(&json)
        .map_err(|e| arrow::error::ArrowError::ExternalError(Box::new(e)))?
        .lines()
        .collect();
    let column = |name: &str, data_type: &DataType| -> Result<ArrayRef, arrow::error::ArrowError> {
        match bad.column_by_name(name) {
            Some(c) => arrow::compute::cast(c, data_type),
            None => Ok(arrow::array::new_null_array(data_type, n)),
        }
    };
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![table; n])),
        Arc::new(StringArray::from(reasons.to_vec())),
        column(LSN_COLUMN, &DataType::Int64)?,
        column(SEQ_COLUMN, &DataType::Int64)?,
        column(COMMIT_TS_COLUMN, &time)?,
        Arc::new(StringArray::from(lines)),
    ];
    RecordBatch::try_new(schema(), columns)
}
