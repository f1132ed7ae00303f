//! How values leave engage as text and JSON, the same way in every output
//! (Redis values and JSON rows, dead letters, `engage query --format json`):
//!
//! | Arrow type                | text / JSON                                        |
//! |---------------------------|----------------------------------------------------|
//! | Decimal128                | exact digits (`12.50`); a JSON number, never a float |
//! | Binary (`BYTEA`)          | base64 (standard alphabet, padded); a JSON string  |
//! | Interval (`INTERVAL`)     | ISO 8601 as Postgres writes it (`P1Y2M3DT-4H5.5S`) |
//! | List (`TEXT[]`, ...)      | a JSON array (also as the text of a Redis value)   |
//! | Time64 (`TIME`)           | `HH:MM:SS[.ffffff]`                                 |
//! | everything else           | Arrow's own text and JSON forms                    |
//!
//! Parquet keeps the Arrow types themselves, except intervals, which Parquet
//! cannot hold with negative parts or nanoseconds: see [`parquet_schema`].

use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, IntervalMonthDayNanoArray, RecordBatch, StringArray, StringBuilder,
    StructArray,
};
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Field, FieldRef, Fields, IntervalMonthDayNano, IntervalUnit, Schema, SchemaRef,
};
use arrow::error::ArrowError;
use arrow::json::writer::{
    make_encoder, Encoder, EncoderFactory, EncoderOptions, LineDelimited, NullableEncoder,
};
use arrow::json::{Writer, WriterBuilder};
use base64::Engine as _;

/// A JSON lines writer with engage's value forms and NULLs written out.
pub fn json_writer<W: std::io::Write>(out: W) -> Writer<W, LineDelimited> {
    WriterBuilder::new()
        .with_explicit_nulls(true)
        .with_encoder_factory(Arc::new(EngageJson))
        .build(out)
}

/// engage's JSON value forms, for JSON encoders built outside [`json_writer`].
pub fn json_encoder_factory() -> Arc<dyn EncoderFactory> {
    Arc::new(EngageJson)
}

/// Every value of `array` as text (NULL stays NULL).
pub fn text_column(array: &dyn Array) -> Result<StringArray, ArrowError> {
    let mut out = StringBuilder::with_capacity(array.len(), array.len() * 8);
    match array.data_type() {
        scalar if has_own_text(scalar) => {
            let mut text = String::new();
            for row in 0..array.len() {
                if array.is_null(row) {
                    out.append_null();
                    continue;
                }
                text.clear();
                own_text(array, row, &mut text);
                out.append_value(&text);
            }
        }
        nested if has_json_text(nested) => {
            let field: FieldRef = Arc::new(Field::new("value", array.data_type().clone(), true));
            let options = EncoderOptions::default()
                .with_explicit_nulls(true)
                .with_encoder_factory(Arc::new(EngageJson));
            let mut encoder = make_encoder(&field, array, &options)?;
            let mut json = Vec::new();
            for row in 0..array.len() {
                if array.is_null(row) {
                    out.append_null();
                    continue;
                }
                json.clear();
                encoder.encode(row, &mut json);
                out.append_value(std::str::from_utf8(&json).map_err(|e| {
                    ArrowError::JsonError(format!("a JSON value is not UTF-8: {e}"))
                })?);
            }
        }
        _ => {
            let text = cast(array, &DataType::Utf8)?;
            return Ok(text.as_string::<i32>().clone());
        }
    }
    Ok(out.finish())
}

/// Whether [`text_column`] can write values of `data_type`.
pub fn has_text(data_type: &DataType) -> bool {
    has_own_text(data_type)
        || has_json_text(data_type)
        || arrow::compute::can_cast_types(data_type, &DataType::Utf8)
}

/// The nested types whose text is their JSON.
fn has_json_text(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(_, _)
            | DataType::Struct(_)
            | DataType::Map(_, _)
    )
}

/// The scalar types whose text engage writes itself (see [`own_text`]),
/// in text and inside JSON alike.
fn has_own_text(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::Interval(IntervalUnit::MonthDayNano)
    )
}

/// Row `row` of `array`, of a type [`has_own_text`] takes, appended to
/// `out`: bytes as base64, an interval as ISO 8601.
fn own_text(array: &dyn Array, row: usize, out: &mut String) {
    match array.data_type() {
        DataType::Binary => base64_into(array.as_binary::<i32>().value(row), out),
        DataType::LargeBinary => base64_into(array.as_binary::<i64>().value(row), out),
        DataType::BinaryView => base64_into(array.as_binary_view().value(row), out),
        _ => iso_interval(interval_array(array).value(row), out),
    }
}

/// `batch` with every column a flat text format cannot write (lists,
/// structs, maps, bytes, intervals) replaced by its [`text_column`]: for CSV.
pub fn flat_batch(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let nested =
        |t: &DataType| has_own_text(t) || t.is_nested() || matches!(t, DataType::Interval(_));
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| nested(f.data_type()))
    {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if nested(field.data_type()) {
            fields.push(Field::new(field.name(), DataType::Utf8, true));
            columns.push(Arc::new(text_column(column.as_ref())?) as ArrayRef);
        } else {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// The schema Parquet files get for rows of `schema`: intervals become
/// `struct<months: int32, days: int32, nanoseconds: int64>` (Parquet's own
/// INTERVAL has unsigned parts and milliseconds), everything else is kept.
pub fn parquet_schema(schema: &SchemaRef) -> SchemaRef {
    if !schema.fields().iter().any(|f| is_interval(f.data_type())) {
        return schema.clone();
    }
    let fields: Vec<FieldRef> = schema
        .fields()
        .iter()
        .map(|f| {
            if is_interval(f.data_type()) {
                Arc::new(f.as_ref().clone().with_data_type(interval_struct_type()))
            } else {
                f.clone()
            }
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// `batch` with its columns converted to `parquet`, a schema from
/// [`parquet_schema`] (a no-op when it has no interval).
pub fn parquet_batch(batch: &RecordBatch, parquet: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| is_interval(f.data_type()))
    {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .map(|c| {
            if is_interval(c.data_type()) {
                Ok(interval_struct(interval_array(c.as_ref())))
            } else {
                Ok(c.clone())
            }
        })
        .collect::<Result<Vec<_>, ArrowError>>()?;
    RecordBatch::try_new(parquet.clone(), columns)
}

fn is_interval(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Interval(IntervalUnit::MonthDayNano))
}

fn interval_fields() -> Fields {
    Fields::from(vec![
        Field::new("months", DataType::Int32, false),
        Field::new("days", DataType::Int32, false),
        Field::new("nanoseconds", DataType::Int64, false),
    ])
}

fn interval_struct_type() -> DataType {
    DataType::Struct(interval_fields())
}

fn interval_array(array: &dyn Array) -> &IntervalMonthDayNanoArray {
    array
        .as_any()
        .downcast_ref::<IntervalMonthDayNanoArray>()
        .expect("an Interval(MonthDayNano) column")
}

fn interval_struct(array: &IntervalMonthDayNanoArray) -> ArrayRef {
    let values = array.values();
    let months = arrow::array::Int32Array::from_iter_values(values.iter().map(|v| v.months));
    let days = arrow::array::Int32Array::from_iter_values(values.iter().map(|v| v.days));
    let nanos = arrow::array::Int64Array::from_iter_values(values.iter().map(|v| v.nanoseconds));
    Arc::new(StructArray::new(
        interval_fields(),
        vec![Arc::new(months), Arc::new(days), Arc::new(nanos)],
        array.nulls().cloned(),
    ))
}

fn base64_into(bytes: &[u8], out: &mut String) {
    base64::engine::general_purpose::STANDARD.encode_string(bytes, out);
}

/// An interval in ISO 8601 as Postgres' `intervalstyle=iso_8601` writes it:
/// years and months from the months, days, then hours, minutes and seconds
/// (with up to nine fractional digits) from the nanoseconds; `PT0S` for zero.
pub fn iso_interval(value: IntervalMonthDayNano, out: &mut String) {
    out.push('P');
    let (years, months) = (value.months / 12, value.months % 12);
    for (amount, unit) in [(years, 'Y'), (months, 'M'), (value.days, 'D')] {
        if amount != 0 {
            let _ = write!(out, "{amount}{unit}");
        }
    }
    let nanos = value.nanoseconds;
    if nanos != 0 {
        out.push('T');
        let hours = nanos / 3_600_000_000_000;
        let minutes = nanos / 60_000_000_000 % 60;
        let seconds = nanos / 1_000_000_000 % 60;
        let fraction = (nanos % 1_000_000_000).unsigned_abs();
        if hours != 0 {
            let _ = write!(out, "{hours}H");
        }
        if minutes != 0 {
            let _ = write!(out, "{minutes}M");
        }
        if seconds != 0 || fraction != 0 {
            if nanos < 0 && seconds == 0 {
                out.push('-');
            }
            let _ = write!(out, "{seconds}");
            if fraction != 0 {
                let digits = format!("{fraction:09}");
                let _ = write!(out, ".{}", digits.trim_end_matches('0'));
            }
            out.push('S');
        }
    } else if value.months == 0 && value.days == 0 {
        out.push_str("T0S");
    }
}

/// Encodes binary values as base64 strings and intervals as ISO 8601
/// strings, at any depth (inside lists and structs too).
#[derive(Debug)]
struct EngageJson;

impl EncoderFactory for EngageJson {
    fn make_default_encoder<'a>(
        &self,
        _field: &'a FieldRef,
        array: &'a dyn Array,
        _options: &'a EncoderOptions,
    ) -> Result<Option<NullableEncoder<'a>>, ArrowError> {
        if !has_own_text(array.data_type()) {
            return Ok(None);
        }
        let encoder: Box<dyn Encoder + 'a> = Box::new(TextEncoder {
            array,
            text: String::new(),
        });
        Ok(Some(NullableEncoder::new(encoder, array.nulls().cloned())))
    }
}

/// One of the types [`EngageJson`] takes, as a JSON string.
struct TextEncoder<'a> {
    array: &'a dyn Array,
    text: String,
}

impl Encoder for TextEncoder<'_> {
    fn encode(&mut self, row: usize, out: &mut Vec<u8>) {
        self.text.clear();
        own_text(self.array, row, &mut self.text);
        // Neither base64 nor ISO 8601 has a character JSON must escape.
        out.push(b'"');
        out.extend_from_slice(self.text.as_bytes());
        out.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryArray, Decimal128Array, ListArray};
    use arrow::datatypes::Int32Type;

    fn iso(months: i32, days: i32, nanos: i64) -> String {
        let mut out = String::new();
        iso_interval(IntervalMonthDayNano::new(months, days, nanos), &mut out);
        out
    }

    #[test]
    fn intervals_are_written_as_postgres_writes_iso_8601() {
        assert_eq!(iso(0, 0, 0), "PT0S");
        assert_eq!(iso(14, 3, 0), "P1Y2M3D");
        assert_eq!(iso(-14, -3, 0), "P-1Y-2M-3D");
        assert_eq!(iso(0, 1, -7_200_000_000_000), "P1DT-2H");
        assert_eq!(iso(0, 0, 3_723_500_000_000), "PT1H2M3.5S");
        assert_eq!(iso(0, 0, -500_000_000), "PT-0.5S");
        assert_eq!(iso(0, 0, -1_000_001_000), "PT-1.000001S");
        assert_eq!(iso(0, 0, 1), "PT0.000000001S");
    }

    #[test]
    fn text_of_bytes_decimals_lists_and_intervals() {
        let bytes = BinaryArray::from_opt_vec(vec![Some(b"\x00\xffhi"), None, Some(b"")]);
        let text = text_column(&bytes).unwrap();
        assert_eq!(text.value(0), "AP9oaQ==");
        assert!(text.is_null(1));
        assert_eq!(text.value(2), "");
        // DataFusion reads Parquet bytes as views.
        let views = arrow::array::BinaryViewArray::from(vec![&b"\x00\xffhi"[..]]);
        assert_eq!(text_column(&views).unwrap().value(0), "AP9oaQ==");

        let decimals = Decimal128Array::from(vec![Some(1250), Some(-5), None])
            .with_precision_and_scale(10, 2)
            .unwrap();
        let text = text_column(&decimals).unwrap();
        assert_eq!((text.value(0), text.value(1)), ("12.50", "-0.05"));

        let lists = ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
            Some(vec![Some(1), None]),
            Some(vec![]),
            None,
        ]);
        let text = text_column(&lists).unwrap();
        assert_eq!((text.value(0), text.value(1)), ("[1,null]", "[]"));
        assert!(text.is_null(2));
    }

    #[test]
    fn json_rows_write_decimals_as_numbers_bytes_as_base64_and_intervals_as_iso() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("d", DataType::Decimal128(20, 3), true),
            Field::new("b", DataType::Binary, true),
            Field::new("i", DataType::Interval(IntervalUnit::MonthDayNano), true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(
                    Decimal128Array::from(vec![Some(123_456_789_012_345_678)])
                        .with_precision_and_scale(20, 3)
                        .unwrap(),
                ),
                Arc::new(BinaryArray::from_vec(vec![b"ok"])),
                Arc::new(IntervalMonthDayNanoArray::from(vec![
                    IntervalMonthDayNano::new(1, -2, 0),
                ])),
            ],
        )
        .unwrap();
        let mut out = Vec::new();
        let mut writer = json_writer(&mut out);
        writer.write(&batch).unwrap();
        writer.finish().unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"d\":123456789012345.678,\"b\":\"b2s=\",\"i\":\"P1M-2D\"}\n"
        );
    }

    #[test]
    fn parquet_batches_carry_intervals_as_structs_with_their_nulls() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "i",
            DataType::Interval(IntervalUnit::MonthDayNano),
            true,
        )]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(IntervalMonthDayNanoArray::from(vec![
                Some(IntervalMonthDayNano::new(-1, 2, -3)),
                None,
            ]))],
        )
        .unwrap();
        let parquet = parquet_schema(&schema);
        let converted = parquet_batch(&batch, &parquet).unwrap();
        let intervals = converted.column(0).as_struct();
        assert!(intervals.is_null(1));
        let months = intervals.column(0).as_primitive::<Int32Type>();
        assert_eq!(months.value(0), -1);
    }
}
