//! Dimension tables: CDC tables that queries look up by key (such as `content`).
//!
//! A dimension holds the table's current rows as one Arrow batch. Change
//! batches are applied in commit order: for each key the last change of the
//! batch wins; `d` removes the row, `c`/`u` replace it. The engine applies a
//! dimension's changes exactly between the fact batches that surround them in
//! the stream, which is what makes joins point-in-time correct.
//!
//! Applying rebuilds the batch (filter the untouched rows, append the new
//! ones): linear in the dimension's size, cheap for tables of content items
//! whose changes are rare next to the events that read them.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, StringArray, UInt32Array};
use arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};

use crate::change::{Op, OP_COLUMN};

pub struct Dimension {
    schema: SchemaRef,
    key_columns: Vec<usize>,
    converter: RowConverter,
    rows: RecordBatch,
}

impl Dimension {
    /// An empty dimension with `schema` (declared columns and metadata), keyed by `key_columns`.
    pub fn new(schema: SchemaRef, key_columns: Vec<usize>) -> Result<Dimension, ArrowError> {
        let converter = RowConverter::new(
            key_columns
                .iter()
                .map(|&i| SortField::new(schema.field(i).data_type().clone()))
                .collect(),
        )?;
        Ok(Dimension {
            rows: RecordBatch::new_empty(schema.clone()),
            schema,
            key_columns,
            converter,
        })
    }

    /// The current rows.
    pub fn contents(&self) -> &RecordBatch {
        &self.rows
    }

    pub fn len(&self) -> usize {
        self.rows.num_rows()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.num_rows() == 0
    }

    /// Empties the table (a `TRUNCATE`).
    pub fn clear(&mut self) {
        self.rows = RecordBatch::new_empty(self.schema.clone());
    }

    /// Puts back `rows`, contents taken earlier with [`Dimension::contents`].
    pub fn restore_contents(&mut self, rows: RecordBatch) {
        self.rows = rows;
    }

    /// Applies a batch of changes (with the `_op` column), in order.
    pub fn apply(&mut self, changes: &RecordBatch) -> Result<(), ArrowError> {
        if changes.num_rows() == 0 {
            return Ok(());
        }
        let ops = changes
            .column_by_name(OP_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| {
                ArrowError::SchemaError("dimension changes lack the `_op` column".into())
            })?;
        let change_keys = self.converter.convert_columns(&self.key_columns(changes))?;
        // Last change per key wins.
        let mut latest: HashMap<&[u8], usize> = HashMap::with_capacity(changes.num_rows());
        for row in 0..changes.num_rows() {
            latest.insert(change_keys.row(row).data(), row);
        }
        let current_keys = self
            .converter
            .convert_columns(&self.key_columns(&self.rows))?;
        let keep: BooleanArray = (0..self.rows.num_rows())
            .map(|row| Some(!latest.contains_key(current_keys.row(row).data())))
            .collect();
        let mut upserts: Vec<u32> = latest
            .values()
            .copied()
            .filter(|&row| ops.is_valid(row) && ops.value(row) != Op::Delete.letter())
            .map(|row| row as u32)
            .collect();
        upserts.sort_unstable();
        let kept = filter_record_batch(&self.rows, &keep)?;
        let added = take_record_batch(changes, &UInt32Array::from(upserts))?;
        self.rows = concat_batches(&self.schema, [&kept, &added])?;
        Ok(())
    }

    fn key_columns(&self, batch: &RecordBatch) -> Vec<Arc<dyn Array>> {
        self.key_columns
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int32Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("length", DataType::Int32, true),
            Field::new("_op", DataType::Utf8, false),
        ]))
    }

    fn changes(rows: &[(&str, i32, &str)]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(Int32Array::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn lengths(dimension: &Dimension) -> Vec<(String, i32)> {
        let rows = dimension.contents();
        let ids = rows
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let lengths = rows
            .column(1)
            .as_any()
            .downcast_ref::<Int32Array>()
            .unwrap();
        let mut out: Vec<_> = (0..rows.num_rows())
            .map(|i| (ids.value(i).to_string(), lengths.value(i)))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn last_change_per_key_wins_and_deletes_remove() {
        let mut dimension = Dimension::new(schema(), vec![0]).unwrap();
        dimension
            .apply(&changes(&[("a", 1, "c"), ("b", 2, "c"), ("c", 3, "c")]))
            .unwrap();
        dimension
            .apply(&changes(&[
                ("a", 10, "u"),
                ("a", 11, "u"),
                ("b", 2, "d"),
                ("d", 4, "c"),
            ]))
            .unwrap();
        assert_eq!(
            lengths(&dimension),
            vec![("a".into(), 11), ("c".into(), 3), ("d".into(), 4)]
        );
    }

    #[test]
    fn delete_then_reinsert_in_one_batch_keeps_the_row() {
        let mut dimension = Dimension::new(schema(), vec![0]).unwrap();
        dimension.apply(&changes(&[("a", 1, "c")])).unwrap();
        dimension
            .apply(&changes(&[("a", 1, "d"), ("a", 5, "c")]))
            .unwrap();
        assert_eq!(lengths(&dimension), vec![("a".into(), 5)]);
    }
}
