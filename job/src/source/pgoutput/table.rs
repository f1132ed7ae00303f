//! [`TableDecoder`]: appends one source table's changes into Arrow builders.
//!
//! It owns the mapping from a relation's columns to the job's declared columns
//! (by name, redone at every Relation message), the unchanged-TOAST
//! resolution, and the metadata columns. Each row is parsed into a reused
//! scratch row before anything is appended, so a bad value leaves the builders
//! as they were and no row allocates.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, IntervalMonthDayNanoBuilder,
    ListArray, NullBufferBuilder, StringBuilder, Time64MicrosecondBuilder,
    TimestampMicrosecondBuilder, TimestampMillisecondBuilder, TimestampNanosecondBuilder,
    TimestampSecondBuilder,
};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{
    DataType, Field, FieldRef, IntervalMonthDayNano, IntervalUnit, Schema, SchemaRef, TimeUnit,
};
use arrow::record_batch::RecordBatch;

use super::text::{
    array_elements, bytea_hex, decode_hex, parse_date, parse_decimal, parse_float, parse_int,
    parse_interval, parse_time, parse_timestamp, to_unit, unescape_element, Element,
};
use super::{DecodeError, Relation, Tuple, Value};
use crate::change::{metadata_fields, Op, Position};
use crate::source::RejectedChange;

/// Microseconds from the Unix epoch to Postgres' epoch, 2000-01-01 00:00:00 UTC.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800 * 1_000_000;

/// Appends tuples of one source table into Arrow builders whose schema is the
/// job's declared columns (by name) plus the metadata columns from
/// [`metadata_fields`].
pub struct TableDecoder {
    table: String,
    declared: SchemaRef,
    schema: SchemaRef,
    columns: Vec<ColumnBuilder>,
    op: StringBuilder,
    lsn: Int64Builder,
    seq: Int64Builder,
    commit_ts: TimestampMicrosecondBuilder,
    relation: Option<Mapping>,
    /// One parsed row, reused between rows (see [`recycle`]).
    scratch: Vec<Cell<'static>>,
    rows: usize,
    unresolved_toast: u64,
}

/// Where each relation column goes.
struct Mapping {
    /// `namespace.name`, for errors.
    name: String,
    /// Declared column index for each relation column; `None` for ignored columns.
    targets: Vec<Option<usize>>,
    /// The relation's column names.
    columns: Vec<String>,
}

impl TableDecoder {
    /// `table` is the job table name (for errors); `declared` the declared
    /// columns only (no metadata).
    pub fn new(table: &str, declared: SchemaRef) -> Result<Self, DecodeError> {
        let metadata = metadata_fields();
        let mut columns = Vec::with_capacity(declared.fields().len());
        for field in declared.fields() {
            if metadata.iter().any(|m| m.name() == field.name()) {
                return Err(DecodeError::ReservedColumn {
                    table: table.to_owned(),
                    column: field.name().clone(),
                });
            }
            columns.push(ColumnBuilder::new(field.data_type()).ok_or_else(|| {
                DecodeError::UnsupportedType {
                    table: table.to_owned(),
                    column: field.name().clone(),
                    data_type: field.data_type().clone(),
                }
            })?);
        }
        let fields: Vec<Field> = declared
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .chain(metadata)
            .collect();
        Ok(TableDecoder {
            table: table.to_owned(),
            schema: Arc::new(Schema::new_with_metadata(
                fields,
                declared.metadata().clone(),
            )),
            declared,
            columns,
            op: StringBuilder::new(),
            lsn: Int64Builder::new(),
            seq: Int64Builder::new(),
            commit_ts: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            relation: None,
            scratch: Vec::new(),
            rows: 0,
            unresolved_toast: 0,
        })
    }

    /// Full output schema: declared columns (all nullable) then metadata columns.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// (Re)maps relation columns to declared columns by name (exact, case
    /// sensitive). Extra relation columns are ignored. On error the previous
    /// mapping is dropped, so later appends fail instead of using a stale one.
    pub fn set_relation(&mut self, relation: &Relation) -> Result<(), DecodeError> {
        self.relation = None;
        let name = format!("{}.{}", relation.namespace, relation.name);
        let mut targets = vec![None; relation.columns.len()];
        for (index, field) in self.declared.fields().iter().enumerate() {
            let Some(at) = relation
                .columns
                .iter()
                .position(|c| c.name == *field.name())
            else {
                return Err(DecodeError::MissingColumn {
                    table: self.table.clone(),
                    relation: name,
                    column: field.name().clone(),
                });
            };
            targets[at] = Some(index);
        }
        let columns = relation.columns.iter().map(|c| c.name.clone()).collect();
        self.relation = Some(Mapping {
            name,
            targets,
            columns,
        });
        Ok(())
    }

    pub fn has_relation(&self) -> bool {
        self.relation.is_some()
    }

    /// Appends one change. For Insert/Update `tuple` is the new tuple; for
    /// Delete the old (key or full) one, whose missing non-key columns arrive as
    /// Null. A value that is unchanged TOAST in `tuple` is taken from `old`
    /// when that carries it, else appended as NULL and counted. On error nothing
    /// is appended. `commit_time_micros` counts from 2000-01-01 (Postgres' epoch).
    pub fn append(
        &mut self,
        op: Op,
        tuple: &Tuple<'_>,
        old: Option<&Tuple<'_>>,
        position: Position,
        commit_time_micros: i64,
    ) -> Result<(), DecodeError> {
        let (mut row, toast_misses) = self.parse(tuple, old, position)?;
        for (builder, cell) in self.columns.iter_mut().zip(row.drain(..)) {
            builder.append(cell);
        }
        self.scratch = recycle(row);
        self.op.append_value(op.letter());
        self.lsn.append_value(position.lsn as i64);
        self.seq.append_value(position.seq as i64);
        self.commit_ts
            .append_value(commit_time_micros.saturating_add(PG_EPOCH_OFFSET_MICROS));
        self.unresolved_toast += toast_misses;
        self.rows += 1;
        Ok(())
    }

    /// Whether [`append`](Self::append) would take `tuple`, without
    /// appending: for a change that spans two decoders (an update and its
    /// old row), so that either both take it or neither does.
    pub fn check(
        &mut self,
        tuple: &Tuple<'_>,
        old: Option<&Tuple<'_>>,
        position: Position,
    ) -> Result<(), DecodeError> {
        let (row, _) = self.parse(tuple, old, position)?;
        self.scratch = recycle(row);
        Ok(())
    }

    /// `error`, from appending or checking `tuple`, as the dead letter of that
    /// change when it is a value the declared type cannot hold; any other
    /// error is handed back. `commit_ts_micros` counts from the Unix epoch.
    pub fn reject(
        &self,
        error: DecodeError,
        tuple: &Tuple<'_>,
        position: Position,
        commit_ts_micros: i64,
    ) -> Result<RejectedChange, DecodeError> {
        match error {
            DecodeError::BadValue {
                column,
                reason,
                data_type,
                ..
            } => Ok(RejectedChange {
                reason: format!("decode_error:{column}"),
                detail: format!("{reason} ({data_type})"),
                position,
                commit_ts_micros,
                row: self.row_text(tuple),
            }),
            other => Err(other),
        }
    }

    /// The relation's columns of `tuple` as one JSON object of their text
    /// (NULL as null; bytes that are not UTF-8 replaced): what a dead letter
    /// keeps of a change that cannot be decoded.
    pub fn row_text(&self, tuple: &Tuple<'_>) -> String {
        let mut row = serde_json::Map::new();
        let names = self
            .relation
            .as_ref()
            .map(|m| m.columns.as_slice())
            .unwrap_or_default();
        for (name, value) in names.iter().zip(tuple.values()) {
            let value = match value {
                Ok(Value::Text(text)) => {
                    serde_json::Value::String(String::from_utf8_lossy(text).into_owned())
                }
                Ok(Value::Binary(_)) => serde_json::Value::String("<binary>".into()),
                Ok(Value::UnchangedToast) => serde_json::Value::String("<unchanged toast>".into()),
                Ok(Value::Null) | Err(_) => serde_json::Value::Null,
            };
            row.insert(name.clone(), value);
        }
        serde_json::Value::Object(row).to_string()
    }

    /// Parses `tuple` into the scratch row (returned, with the number of
    /// unchanged TOAST values it could not resolve); on error the scratch row
    /// is kept for the next call.
    fn parse<'t>(
        &mut self,
        tuple: &Tuple<'t>,
        old: Option<&Tuple<'t>>,
        position: Position,
    ) -> Result<(Vec<Cell<'t>>, u64), DecodeError> {
        let Some(mapping) = &self.relation else {
            return Err(DecodeError::NoRelation {
                table: self.table.clone(),
            });
        };
        for actual in std::iter::once(tuple).chain(old).map(Tuple::len) {
            if actual != mapping.targets.len() {
                return Err(DecodeError::WrongColumnCount {
                    table: self.table.clone(),
                    relation: mapping.name.clone(),
                    expected: mapping.targets.len(),
                    actual,
                });
            }
        }

        let mut row = recycle(std::mem::take(&mut self.scratch));
        row.resize(self.columns.len(), Cell::Null);
        let mut old_values = old.map(Tuple::values);
        let mut toast_misses = 0;
        for (value, target) in tuple.values().zip(&mapping.targets) {
            let old_value = match old_values.as_mut() {
                Some(values) => values.next().transpose()?,
                None => None,
            };
            let Some(index) = *target else { continue };
            let value = match value? {
                Value::UnchangedToast => match old_value {
                    Some(resolved @ (Value::Text(_) | Value::Binary(_))) => resolved,
                    _ => {
                        toast_misses += 1;
                        Value::Null
                    }
                },
                value => value,
            };
            let parsed = match value {
                Value::Null | Value::UnchangedToast => Ok(Cell::Null),
                Value::Text(text) => self.columns[index].parse(text),
                Value::Binary(_) => Err("binary-format values are not supported"),
            };
            match parsed {
                Ok(cell) => row[index] = cell,
                Err(reason) => {
                    self.scratch = recycle(row);
                    let field = self.declared.field(index);
                    return Err(DecodeError::BadValue {
                        table: self.table.clone(),
                        column: field.name().clone(),
                        data_type: field.data_type().clone(),
                        position,
                        reason,
                    });
                }
            }
        }
        Ok((row, toast_misses))
    }

    /// Rows appended since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Builds the batch of everything appended since the last finish and
    /// resets the builders for the next one.
    pub fn finish(&mut self) -> RecordBatch {
        let mut arrays: Vec<ArrayRef> =
            self.columns.iter_mut().map(ColumnBuilder::finish).collect();
        arrays.push(Arc::new(self.op.finish()));
        arrays.push(Arc::new(self.lsn.finish()));
        arrays.push(Arc::new(self.seq.finish()));
        arrays.push(Arc::new(self.commit_ts.finish()));
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), arrays)
            .expect("every builder holds one value per appended row, typed as the schema")
    }

    /// How many unchanged-TOAST values could not be resolved from an old tuple
    /// (appended as NULL) since creation.
    pub fn unresolved_toast(&self) -> u64 {
        self.unresolved_toast
    }
}

/// One parsed value of the scratch row, typed by the builder that parsed it.
/// 24 bytes (checked by a test): every cell of every row is moved twice.
#[derive(Clone, Copy)]
pub(super) enum Cell<'a> {
    Null,
    Int(i64),
    Float32(f32),
    Float64(f64),
    Bool(bool),
    Text(&'a str),
    /// An i128 as its little-endian bytes: an `i128` would align the cell
    /// to 16 bytes and make every cell of every row a third larger.
    Decimal([u8; 16]),
    Interval(IntervalMonthDayNano),
    /// The hex digits of a bytea, checked.
    Hex(&'a [u8]),
    /// An array's text form, every element checked.
    Array(&'a [u8]),
}

/// Empties the scratch row and hands its allocation to a new lifetime: the
/// collect of a `vec::IntoIter` into a same-sized type reuses the buffer.
pub(super) fn recycle<'b>(mut row: Vec<Cell<'_>>) -> Vec<Cell<'b>> {
    row.clear();
    row.into_iter().map(|_| Cell::Null).collect()
}

/// The builder of one declared column.
enum ColumnBuilder {
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    Utf8(StringBuilder),
    Date32(Date32Builder),
    TimestampSecond(TimestampSecondBuilder),
    TimestampMillisecond(TimestampMillisecondBuilder),
    TimestampMicrosecond(TimestampMicrosecondBuilder),
    TimestampNanosecond(TimestampNanosecondBuilder),
    Decimal128(Decimal128Builder, u8, i8),
    Time64(Time64MicrosecondBuilder),
    Interval(IntervalMonthDayNanoBuilder),
    /// With a buffer the hex digits are decoded into.
    Binary(BinaryBuilder, Vec<u8>),
    List(Box<ListColumn>),
}

/// A one-dimensional array column: its elements go to `values`.
struct ListColumn {
    field: FieldRef,
    values: ColumnBuilder,
    offsets: Vec<i32>,
    nulls: NullBufferBuilder,
    /// An escaped element's text, unescaped.
    unescaped: Vec<u8>,
}

/// One array element parsed by the element builder `values` (an escaped one
/// is unescaped into `unescaped` first).
fn parse_element<'a>(
    values: &ColumnBuilder,
    element: Element<'a>,
    unescaped: &'a mut Vec<u8>,
) -> Result<Cell<'a>, &'static str> {
    match element {
        Element::Null => Ok(Cell::Null),
        Element::Plain(body) => values.parse_scalar(body),
        Element::Escaped(body) => values.parse_scalar(unescape_element(body, unescaped)),
    }
}

impl ListColumn {
    /// Checks every element of `text` with the element builder, and that
    /// the batch's element offsets (i32) can take them.
    fn check(&mut self, text: &[u8]) -> Result<(), &'static str> {
        let (values, unescaped) = (&mut self.values, &mut self.unescaped);
        let mut room = i32::MAX - *self.offsets.last().expect("offsets start with 0");
        array_elements(text, |element| {
            room = room
                .checked_sub(1)
                .ok_or("more array elements than one batch can hold")?;
            parse_element(values, element, unescaped).map(drop)
        })
    }

    /// Appends an array checked by [`check`](Self::check).
    fn append(&mut self, text: &[u8]) {
        let (values, unescaped) = (&mut self.values, &mut self.unescaped);
        let mut count = 0;
        array_elements(text, |element| {
            let cell = parse_element(values, element, unescaped).expect("elements were checked");
            values.append_scalar(cell);
            count += 1;
            Ok(())
        })
        .expect("the array was checked");
        let last = *self.offsets.last().expect("offsets start with 0");
        self.offsets.push(last + count);
        self.nulls.append_non_null();
    }

    fn append_null(&mut self) {
        let last = *self.offsets.last().expect("offsets start with 0");
        self.offsets.push(last);
        self.nulls.append_null();
    }

    fn finish(&mut self) -> ArrayRef {
        let offsets = std::mem::replace(&mut self.offsets, vec![0]);
        Arc::new(ListArray::new(
            self.field.clone(),
            OffsetBuffer::new(ScalarBuffer::from(offsets)),
            self.values.finish(),
            self.nulls.finish(),
        ))
    }
}

/// Runs `$body` with `$b` bound to whichever builder `$column` holds, or
/// runs `$list` with the list column.
macro_rules! with_builder {
    ($column:expr, $b:ident => $body:expr, $l:ident => $list:expr) => {
        match $column {
            ColumnBuilder::Int16($b) => $body,
            ColumnBuilder::Int32($b) => $body,
            ColumnBuilder::Int64($b) => $body,
            ColumnBuilder::Float32($b) => $body,
            ColumnBuilder::Float64($b) => $body,
            ColumnBuilder::Boolean($b) => $body,
            ColumnBuilder::Utf8($b) => $body,
            ColumnBuilder::Date32($b) => $body,
            ColumnBuilder::TimestampSecond($b) => $body,
            ColumnBuilder::TimestampMillisecond($b) => $body,
            ColumnBuilder::TimestampMicrosecond($b) => $body,
            ColumnBuilder::TimestampNanosecond($b) => $body,
            ColumnBuilder::Decimal128($b, _, _) => $body,
            ColumnBuilder::Time64($b) => $body,
            ColumnBuilder::Interval($b) => $body,
            ColumnBuilder::Binary($b, _) => $body,
            ColumnBuilder::List($l) => $list,
        }
    };
}

impl ColumnBuilder {
    fn new(data_type: &DataType) -> Option<Self> {
        Some(match data_type {
            DataType::Int16 => Self::Int16(Int16Builder::new()),
            DataType::Int32 => Self::Int32(Int32Builder::new()),
            DataType::Int64 => Self::Int64(Int64Builder::new()),
            DataType::Float32 => Self::Float32(Float32Builder::new()),
            DataType::Float64 => Self::Float64(Float64Builder::new()),
            DataType::Boolean => Self::Boolean(BooleanBuilder::new()),
            DataType::Utf8 => Self::Utf8(StringBuilder::new()),
            DataType::Date32 => Self::Date32(Date32Builder::new()),
            DataType::Timestamp(unit, tz) => match unit {
                TimeUnit::Second => Self::TimestampSecond(
                    TimestampSecondBuilder::new().with_timezone_opt(tz.clone()),
                ),
                TimeUnit::Millisecond => Self::TimestampMillisecond(
                    TimestampMillisecondBuilder::new().with_timezone_opt(tz.clone()),
                ),
                TimeUnit::Microsecond => Self::TimestampMicrosecond(
                    TimestampMicrosecondBuilder::new().with_timezone_opt(tz.clone()),
                ),
                TimeUnit::Nanosecond => Self::TimestampNanosecond(
                    TimestampNanosecondBuilder::new().with_timezone_opt(tz.clone()),
                ),
            },
            &DataType::Decimal128(precision, scale) => Self::Decimal128(
                Decimal128Builder::new()
                    .with_precision_and_scale(precision, scale)
                    .ok()?,
                precision,
                scale,
            ),
            DataType::Time64(TimeUnit::Microsecond) => {
                Self::Time64(Time64MicrosecondBuilder::new())
            }
            DataType::Interval(IntervalUnit::MonthDayNano) => {
                Self::Interval(IntervalMonthDayNanoBuilder::new())
            }
            DataType::Binary => Self::Binary(BinaryBuilder::new(), Vec::new()),
            // Elements may be NULL in any Postgres array, so the item field must allow it.
            DataType::List(field) if field.is_nullable() => {
                let values = Self::new(field.data_type())?;
                if matches!(values, Self::List(_)) {
                    return None;
                }
                Self::List(Box::new(ListColumn {
                    field: field.clone(),
                    values,
                    offsets: vec![0],
                    nulls: NullBufferBuilder::new(0),
                    unescaped: Vec::new(),
                }))
            }
            _ => return None,
        })
    }

    /// Parses a text value into a cell this builder accepts; the error is a
    /// reason that never quotes the value.
    fn parse<'a>(&mut self, text: &'a [u8]) -> Result<Cell<'a>, &'static str> {
        match self {
            Self::List(list) => {
                list.check(text)?;
                Ok(Cell::Array(text))
            }
            scalar => scalar.parse_scalar(text),
        }
    }

    /// [`parse`](Self::parse) of every builder but a list's. Kept apart so
    /// that neither is recursive and the common types' parsing can inline
    /// into the row loop.
    #[inline(always)]
    fn parse_scalar<'a>(&self, text: &'a [u8]) -> Result<Cell<'a>, &'static str> {
        let timestamp = |unit| parse_timestamp(text).and_then(|(s, n)| to_unit(s, n, unit));
        Ok(match self {
            Self::Int16(_) => Cell::Int(parse_int(text, i16::MIN.into(), i16::MAX.into())?),
            Self::Int32(_) => Cell::Int(parse_int(text, i32::MIN.into(), i32::MAX.into())?),
            Self::Int64(_) => Cell::Int(parse_int(text, i64::MIN, i64::MAX)?),
            Self::Float32(_) => Cell::Float32(parse_float(text)?),
            Self::Float64(_) => Cell::Float64(parse_float(text)?),
            Self::Boolean(_) => Cell::Bool(match text {
                b"t" => true,
                b"f" => false,
                _ => return Err("not a boolean (expected t or f)"),
            }),
            Self::Utf8(_) => Cell::Text(std::str::from_utf8(text).map_err(|_| "not valid utf-8")?),
            Self::Date32(_) => Cell::Int(parse_date(text)?.into()),
            Self::TimestampSecond(_) => Cell::Int(timestamp(TimeUnit::Second)?),
            Self::TimestampMillisecond(_) => Cell::Int(timestamp(TimeUnit::Millisecond)?),
            Self::TimestampMicrosecond(_) => Cell::Int(timestamp(TimeUnit::Microsecond)?),
            Self::TimestampNanosecond(_) => Cell::Int(timestamp(TimeUnit::Nanosecond)?),
            Self::Decimal128(_, precision, scale) => {
                Cell::Decimal(parse_decimal(text, *precision, *scale)?.to_le_bytes())
            }
            Self::Time64(_) => Cell::Int(parse_time(text)?),
            Self::Interval(_) => Cell::Interval(parse_interval(text)?),
            Self::Binary(_, _) => Cell::Hex(bytea_hex(text)?),
            Self::List(_) => unreachable!("list elements are scalars"),
        })
    }

    /// Appends a cell produced by [`parse`](Self::parse) on this builder.
    fn append(&mut self, cell: Cell<'_>) {
        match (self, cell) {
            (Self::List(list), Cell::Null) => list.append_null(),
            (Self::List(list), Cell::Array(text)) => list.append(text),
            (scalar, cell) => scalar.append_scalar(cell),
        }
    }

    /// [`append`](Self::append) of every builder but a list's.
    #[inline(always)]
    fn append_scalar(&mut self, cell: Cell<'_>) {
        // Ranges were checked by `parse`, so the narrowing casts are exact.
        match (self, cell) {
            (builder, Cell::Null) => {
                with_builder!(builder, b => b.append_null(), _list => unreachable!("a scalar"))
            }
            (Self::Int16(b), Cell::Int(v)) => b.append_value(v as i16),
            (Self::Int32(b), Cell::Int(v)) => b.append_value(v as i32),
            (Self::Int64(b), Cell::Int(v)) => b.append_value(v),
            (Self::Float32(b), Cell::Float32(v)) => b.append_value(v),
            (Self::Float64(b), Cell::Float64(v)) => b.append_value(v),
            (Self::Boolean(b), Cell::Bool(v)) => b.append_value(v),
            (Self::Utf8(b), Cell::Text(v)) => b.append_value(v),
            (Self::Date32(b), Cell::Int(v)) => b.append_value(v as i32),
            (Self::TimestampSecond(b), Cell::Int(v)) => b.append_value(v),
            (Self::TimestampMillisecond(b), Cell::Int(v)) => b.append_value(v),
            (Self::TimestampMicrosecond(b), Cell::Int(v)) => b.append_value(v),
            (Self::TimestampNanosecond(b), Cell::Int(v)) => b.append_value(v),
            (Self::Decimal128(b, _, _), Cell::Decimal(v)) => b.append_value(i128::from_le_bytes(v)),
            (Self::Time64(b), Cell::Int(v)) => b.append_value(v),
            (Self::Interval(b), Cell::Interval(v)) => b.append_value(v),
            (Self::Binary(b, bytes), Cell::Hex(hex)) => {
                bytes.clear();
                decode_hex(hex, bytes);
                b.append_value(bytes.as_slice());
            }
            _ => unreachable!("a cell is appended by the builder that parsed it"),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        with_builder!(self, b => Arc::new(b.finish()) as ArrayRef, list => list.finish())
    }
}
