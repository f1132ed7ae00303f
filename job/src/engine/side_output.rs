//! Side outputs: Parquet tables the engine writes itself, beside the job's queries.
//!
//! `late_events` ([`super::late`]) and `dead_letter` ([`super::dead_letter`]) hold
//! change rows the queries do not take, each with why, its position and the
//! whole original row as JSON. A side output exists when the job SQL declares
//! a `filesystem` table of that name that no `INSERT` writes; it is staged
//! and committed with checkpoints like any Parquet sink, and like any sink
//! it takes only rows after the position it holds ([`unheld`]): `engage
//! replay` re-reads changes whose side rows it already has.

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, StringArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use crate::change::{Position, LSN_COLUMN, SEQ_COLUMN};
use crate::sink::parquet::ParquetSink;
use crate::sink::{Sink, SinkError, SinkState};
use crate::sql::{FilesystemOptions, JobSpec};

/// Opens side output `table` if the job declares it (and nothing inserts into it).
/// `time_column` partitions it when the table has a time pattern.
pub async fn open(
    spec: &JobSpec,
    table: &str,
    schema: SchemaRef,
    time_column: usize,
    restored: Option<&SinkState>,
) -> Result<Option<Sink>, SinkError> {
    let Some(options) = declared(spec, table) else {
        return Ok(None);
    };
    let time_column = options.time_pattern.as_ref().map(|_| time_column);
    let sink = ParquetSink::open_for_schema(table, options, schema, time_column, restored).await?;
    Ok(Some(Sink::Parquet(Box::new(sink))))
}

/// The options of side output `table`, if the job declares it: a
/// `filesystem` table of that name that no `INSERT` writes.
pub fn declared<'a>(spec: &'a JobSpec, table: &str) -> Option<&'a FilesystemOptions> {
    let def = spec.tables.iter().find(|t| t.name == table)?;
    if spec.inserts.iter().any(|i| i.sink == table) {
        return None;
    }
    def.connector.filesystem()
}

/// The side-output rows (with `_lsn`, `_seq`) after `held`, in any order;
/// rows without a position are kept.
pub fn unheld(rows: &RecordBatch, held: Position) -> Result<RecordBatch, ArrowError> {
    let column = |name: &str| {
        rows.column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .cloned()
    };
    let (Some(lsn), Some(seq)) = (column(LSN_COLUMN), column(SEQ_COLUMN)) else {
        return Ok(rows.clone());
    };
    let keep: BooleanArray = (0..rows.num_rows())
        .map(|i| {
            Some(
                lsn.is_null(i)
                    || seq.is_null(i)
                    || Position::new(lsn.value(i) as u64, seq.value(i) as u64) > held,
            )
        })
        .collect();
    arrow::compute::filter_record_batch(rows, &keep)
}

/// Each row of `batch` as one JSON object (NULLs written out).
pub fn json_rows(batch: &RecordBatch) -> Result<ArrayRef, ArrowError> {
    let mut json = Vec::new();
    {
        let mut writer = crate::values::json_writer(&mut json);
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    #[test]
    fn only_rows_after_the_held_position_are_kept_in_any_order() {
        let schema = Arc::new(Schema::new(vec![
            Field::new(LSN_COLUMN, DataType::Int64, true),
            Field::new(SEQ_COLUMN, DataType::Int64, true),
        ]));
        let rows = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(9), Some(5), None, Some(5)])),
                Arc::new(Int64Array::from(vec![Some(0), Some(2), Some(0), Some(3)])),
            ],
        )
        .unwrap();
        let kept = unheld(&rows, Position::new(5, 2)).unwrap();
        let lsn = kept
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let seq = kept
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let kept: Vec<(Option<i64>, Option<i64>)> = (0..kept.num_rows())
            .map(|i| (lsn.is_valid(i).then(|| lsn.value(i)), Some(seq.value(i))))
            .collect();
        assert_eq!(
            kept,
            vec![(Some(9), Some(0)), (None, Some(0)), (Some(5), Some(3))]
        );
    }
}
