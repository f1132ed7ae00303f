//! Encoding a Redis sink's rows into the keys and arguments of one call of
//! its apply script, per target (list, hash, sorted set, string).

use std::collections::HashMap;
use std::io::Write as _;

use arrow::array::{Array, Float64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;

use crate::change::OP_COLUMN;
use crate::sql::options::{RedisOptions, RedisTarget};
use crate::values;

/// Marks a row that is not written in [`Encoder::row_keys`].
const SKIPPED: u32 = u32::MAX;

/// Turns batches into the keys and row values of one script call. Buffers are
/// kept between calls, so encoding allocates per batch and per distinct key,
/// never per row.
pub(super) struct Encoder {
    target: RedisTarget,
    key_prefix: String,
    /// List with `target.id_column`: the `_op` and id columns, and the
    /// columns written as JSON (all but `_op`).
    change_columns: Option<ChangeColumns>,
    key_column: Option<usize>,
    field_column: Option<usize>,
    value_column: Option<usize>,
    member_column: Option<usize>,
    score_column: Option<usize>,
    /// The output columns' names: the fields of a row written as a hash.
    column_names: Vec<String>,
    pub(super) null_keys: u64,
    pub(super) null_values: u64,
    /// The call's distinct keys and their index (0-based) among its data keys.
    pub(super) key_index: HashMap<Vec<u8>, u32>,
    /// Per row of the call, its key's index, or [`SKIPPED`].
    row_keys: Vec<u32>,
    json: Vec<u8>,
    key: Vec<u8>,
    number: Vec<u8>,
}

/// Where a list target with `target.id_column` finds what a row does.
#[derive(Debug, Clone)]
struct ChangeColumns {
    op: usize,
    id: usize,
    json: Vec<usize>,
}

/// The columns of one batch that the target reads, as text (scores as Float64).
pub(super) struct BatchColumns {
    /// `_op` and the id, for a list target with `target.id_column`.
    op: Option<StringArray>,
    id: Option<StringArray>,
    key: Option<StringArray>,
    field: Option<StringArray>,
    value: Option<StringArray>,
    member: Option<StringArray>,
    score: Option<Float64Array>,
    /// A row written as a hash: every column.
    all: Vec<StringArray>,
}

impl Encoder {
    pub(super) fn new(options: &RedisOptions, schema: &Schema) -> Encoder {
        let column =
            |option: &Option<String>| option.as_ref().and_then(|c| schema.index_of(c).ok());
        let change_columns = options.id_column.as_ref().and_then(|id| {
            let op = schema.index_of(OP_COLUMN).ok()?;
            Some(ChangeColumns {
                op,
                id: schema.index_of(id).ok()?,
                json: (0..schema.fields().len()).filter(|&i| i != op).collect(),
            })
        });
        Encoder {
            target: options.target,
            key_prefix: options.key_prefix.clone(),
            change_columns,
            key_column: column(&options.key_column),
            field_column: column(&options.field_column),
            value_column: column(&options.value_column),
            member_column: column(&options.member_column),
            score_column: column(&options.score_column),
            column_names: schema.fields().iter().map(|f| f.name().clone()).collect(),
            null_keys: 0,
            null_values: 0,
            key_index: HashMap::new(),
            row_keys: Vec::new(),
            json: Vec::new(),
            key: Vec::new(),
            number: Vec::new(),
        }
    }

    /// Whether rows are written as hashes with one field per column.
    fn row_as_fields(&self) -> bool {
        self.target == RedisTarget::Hash && self.field_column.is_none()
    }

    /// Whether the value written is the row as JSON.
    fn writes_json(&self) -> bool {
        match self.target {
            RedisTarget::String | RedisTarget::List => true,
            RedisTarget::Hash => self.field_column.is_some() && self.value_column.is_none(),
            RedisTarget::SortedSet => false,
        }
    }

    /// First pass: decides which rows are written and gives each its key;
    /// counts the rows that are not.
    pub(super) fn resolve_keys(
        &mut self,
        batches: &[RecordBatch],
    ) -> Result<Vec<BatchColumns>, String> {
        self.key_index.clear();
        self.row_keys.clear();
        let mut all_columns = Vec::with_capacity(batches.len());
        for batch in batches {
            let columns = self.columns(batch)?;
            for row in 0..batch.num_rows() {
                if columns.key.as_ref().is_some_and(|k| k.is_null(row)) {
                    self.null_keys += 1;
                    self.row_keys.push(SKIPPED);
                    continue;
                }
                let has_value = match self.target {
                    RedisTarget::SortedSet => {
                        columns.member.as_ref().is_some_and(|m| m.is_valid(row))
                            && columns
                                .score
                                .as_ref()
                                .is_some_and(|s| s.is_valid(row) && !s.value(row).is_nan())
                    }
                    RedisTarget::Hash if self.row_as_fields() => {
                        columns.all.iter().any(|c| c.is_valid(row))
                    }
                    RedisTarget::List if is_delete(&columns, row) => {
                        columns.id.as_ref().is_some_and(|id| id.is_valid(row))
                    }
                    _ => columns.value.as_ref().is_none_or(|v| v.is_valid(row)),
                };
                if !has_value {
                    self.null_values += 1;
                    self.row_keys.push(SKIPPED);
                    continue;
                }
                self.key.clear();
                self.key.extend_from_slice(self.key_prefix.as_bytes());
                if let Some(key) = &columns.key {
                    self.key.extend_from_slice(key.value(row).as_bytes());
                }
                let index = match self.key_index.get(&self.key[..]) {
                    Some(index) => *index,
                    None => {
                        let index = self.key_index.len() as u32;
                        self.key_index.insert(self.key.clone(), index);
                        index
                    }
                };
                self.row_keys.push(index);
            }
            all_columns.push(columns);
        }
        Ok(all_columns)
    }

    /// Appends the call's distinct keys, in index order.
    pub(super) fn write_keys(&self, command: &mut redis::Cmd) {
        let mut ordered: Vec<&[u8]> = vec![&[]; self.key_index.len()];
        for (key, index) in &self.key_index {
            ordered[*index as usize] = key;
        }
        for key in ordered {
            command.arg(key);
        }
    }

    /// Second pass: appends each written row's key index and values; returns
    /// the number of rows written.
    pub(super) fn write_rows(
        &mut self,
        batches: &[RecordBatch],
        columns: &[BatchColumns],
        command: &mut redis::Cmd,
    ) -> Result<u64, String> {
        let json = self.writes_json();
        let row_as_fields = self.row_as_fields();
        let Encoder {
            target,
            change_columns,
            column_names,
            row_keys,
            json: buffer,
            number,
            ..
        } = self;
        let mut rows = 0u64;
        let mut next = 0usize;
        for (batch, columns) in batches.iter().zip(columns) {
            let row_keys = &row_keys[next..next + batch.num_rows()];
            next += batch.num_rows();
            buffer.clear();
            if json {
                let written = match change_columns {
                    Some(change) => batch
                        .project(&change.json)
                        .map_err(|e| format!("failed to encode rows as JSON: {e}"))?,
                    None => batch.clone(),
                };
                let mut writer = values::json_writer(&mut *buffer);
                writer
                    .write(&written)
                    .and_then(|()| writer.finish())
                    .map_err(|e| format!("failed to encode rows as JSON: {e}"))?;
            }
            // JSON escapes newlines inside strings, so each line is one row.
            let mut lines = buffer.split(|b| *b == b'\n');
            for (row, &index) in row_keys.iter().enumerate() {
                let line = if json { lines.next() } else { None };
                if index == SKIPPED {
                    continue;
                }
                command.arg(index + 1);
                match target {
                    RedisTarget::SortedSet => {
                        let score = columns.score.as_ref().expect("sorted set has a score");
                        let member = columns.member.as_ref().expect("sorted set has a member");
                        number.clear();
                        write!(number, "{}", score.value(row)).expect("write to a Vec");
                        command.arg(2).arg(&number[..]).arg(member.value(row));
                    }
                    RedisTarget::Hash if row_as_fields => {
                        let fields = columns.all.iter().filter(|c| c.is_valid(row)).count();
                        command.arg(2 * fields);
                        for (name, column) in column_names.iter().zip(&columns.all) {
                            if column.is_valid(row) {
                                command.arg(name).arg(column.value(row));
                            }
                        }
                    }
                    RedisTarget::Hash => {
                        let field = columns.field.as_ref().expect("hash has a field column");
                        command.arg(2).arg(if field.is_null(row) {
                            ""
                        } else {
                            field.value(row)
                        });
                        match &columns.value {
                            Some(value) => command.arg(value.value(row)),
                            None => command.arg(line.unwrap_or_default()),
                        };
                    }
                    RedisTarget::List if change_columns.is_some() => {
                        if is_delete(columns, row) {
                            let id = columns.id.as_ref().expect("id column");
                            command.arg(2).arg("-").arg(id.value(row));
                        } else {
                            command.arg(2).arg("+").arg(line.unwrap_or_default());
                        }
                    }
                    RedisTarget::String | RedisTarget::List => {
                        command.arg(1).arg(line.unwrap_or_default());
                    }
                }
                rows += 1;
            }
        }
        Ok(rows)
    }

    /// The columns `batch` contributes, cast to what the script writes.
    fn columns(&self, batch: &RecordBatch) -> Result<BatchColumns, String> {
        let text = |index: Option<usize>| index.map(|i| text_column(batch, i)).transpose();
        let change = self.change_columns.as_ref();
        Ok(BatchColumns {
            op: text(change.map(|c| c.op))?,
            id: text(change.map(|c| c.id))?,
            key: text(self.key_column)?,
            field: text(self.field_column)?,
            value: text(self.value_column)?,
            member: text(self.member_column)?,
            score: self
                .score_column
                .map(|index| {
                    let column = cast(batch.column(index), &DataType::Float64).map_err(|e| {
                        format!(
                            "score column `{}` cannot be used as a number: {e}",
                            batch.schema().field(index).name()
                        )
                    })?;
                    Ok::<_, String>(
                        column
                            .as_any()
                            .downcast_ref::<Float64Array>()
                            .expect("cast to Float64")
                            .clone(),
                    )
                })
                .transpose()?,
            all: if self.row_as_fields() {
                (0..batch.num_columns())
                    .map(|i| text_column(batch, i))
                    .collect::<Result<_, _>>()?
            } else {
                Vec::new()
            },
        })
    }
}

/// Whether `row` is a delete (`_op = 'd'`) of a list with `target.id_column`.
fn is_delete(columns: &BatchColumns, row: usize) -> bool {
    columns
        .op
        .as_ref()
        .is_some_and(|op| op.is_valid(row) && op.value(row) == "d")
}

/// Column `index` of `batch` as text.
fn text_column(batch: &RecordBatch, index: usize) -> Result<StringArray, String> {
    values::text_column(batch.column(index)).map_err(|e| {
        format!(
            "column `{}` cannot be used as text: {e}",
            batch.schema().field(index).name()
        )
    })
}
