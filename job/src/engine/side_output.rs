//! Side outputs: Parquet tables the engine writes itself, beside the job's queries.
//!
//! `late_events` ([`super::late`]) and `dead_letter` ([`super::dead_letter`]) hold
//! change rows the queries do not take, each with why, its position and the
//! whole original row as JSON. A side output exists when the job SQL declares
//! a `filesystem` table of that name that no `INSERT` writes; it is staged
//! and committed with checkpoints like any Parquet sink.

use arrow::array::{ArrayRef, StringArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::error::ArrowError;
use arrow::json::writer::LineDelimited;
use arrow::json::WriterBuilder;
use arrow::record_batch::RecordBatch;

use crate::sink::parquet::ParquetSink;
use crate::sink::{Sink, SinkError, SinkState};
use crate::sql::{Connector, JobSpec};

/// Opens side output `table` if the job declares it (and nothing inserts into it).
/// `time_column` partitions it when the table has a time pattern.
pub async fn open(
    spec: &JobSpec,
    table: &str,
    schema: SchemaRef,
    time_column: usize,
    restored: Option<&SinkState>,
) -> Result<Option<Sink>, SinkError> {
    let Some(def) = spec.tables.iter().find(|t| t.name == table) else {
        return Ok(None);
    };
    if spec.inserts.iter().any(|i| i.sink == table) {
        return Ok(None);
    }
    let Connector::Filesystem(options) = &def.connector else {
        return Ok(None);
    };
    let time_column = options.time_pattern.as_ref().map(|_| time_column);
    let sink = ParquetSink::open_for_schema(table, options, schema, time_column, restored).await?;
    Ok(Some(Sink::Parquet(Box::new(sink))))
}

/// Each row of `batch` as one JSON object (NULLs written out).
pub fn json_rows(batch: &RecordBatch) -> Result<ArrayRef, ArrowError> {
    let mut json = Vec::new();
    {
        let mut writer = WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, LineDelimited>(&mut json);
        writer.write(batch)?;
        writer.finish()?;
    }
    let lines: Vec<&str> = std::str::from_utf8(&json)
        .map_err(|e| ArrowError::ExternalError(Box::new(e)))?
        .lines()
        .collect();
    Ok(std::sync::Arc::new(StringArray::from(lines)))
}

/// Column `name` of `batch` cast to `data_type`, or all NULL if it is absent.
pub fn column_or_null(
    batch: &RecordBatch,
    name: &str,
    data_type: &DataType,
) -> Result<ArrayRef, ArrowError> {
    match batch.column_by_name(name) {
        Some(c) => arrow::compute::cast(c, data_type),
        None => Ok(arrow::array::new_null_array(data_type, batch.num_rows())),
    }
}
