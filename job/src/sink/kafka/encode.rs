//! A Kafka sink's rows as messages: the value (`json` or `debezium_json`), the
//! key, the partition, the timestamp and the position header.
//!
//! Values use engage's JSON forms (`values.rs`: decimals as numbers, bytes as
//! base64, intervals as ISO 8601) with timestamps in RFC 3339, UTC (`Z`).
//! Each row is encoded into one reused buffer: no allocation per row on our
//! side (librdkafka copies the bytes into its queue).

use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type, TimeUnit};
use arrow::error::ArrowError;
use arrow::json::writer::{make_encoder, EncoderOptions, NullableEncoder};

use crate::change::{Position, COMMIT_TS_COLUMN, LSN_COLUMN, OP_COLUMN, SEQ_COLUMN};
use crate::sql::options::KafkaFormat;
use crate::values;

/// The header every message carries: its change's position, as
/// [`Position::to_sortable`] text. A restarted sink reads it back from the
/// newest message of each partition.
pub const POSITION_HEADER: &str = "engage.position";

/// What the Debezium envelope's `source` block says about the change's origin.
#[derive(Debug, Clone, Default)]
pub struct SourceInfo {
    /// The job's name (Debezium's `source.name`, the logical server name).
    pub name: String,
    pub schema: String,
    pub table: String,
}

/// The columns of a sink's output that the messages are built from.
#[derive(Debug, Clone, Copy)]
pub struct Columns {
    pub lsn: usize,
    pub seq: usize,
    pub op: Option<usize>,
    pub commit_ts: Option<usize>,
    pub key: Option<usize>,
    pub timestamp: Option<usize>,
}

impl Columns {
    /// Finds the columns in `schema` (checked when the job was planned).
    pub fn find(
        schema: &arrow::datatypes::Schema,
        key: Option<&str>,
        timestamp: Option<usize>,
    ) -> Result<Columns, String> {
        let index = |name: &str| schema.index_of(name).ok();
        Ok(Columns {
            lsn: index(LSN_COLUMN)
                .ok_or_else(|| format!("the query must output `{LSN_COLUMN}`"))?,
            seq: index(SEQ_COLUMN)
                .ok_or_else(|| format!("the query must output `{SEQ_COLUMN}`"))?,
            op: index(OP_COLUMN),
            commit_ts: index(COMMIT_TS_COLUMN),
            key: match key {
                Some(key) => Some(index(key).ok_or_else(|| format!("no output column `{key}`"))?),
                None => None,
            },
            timestamp,
        })
    }
}

/// One batch, ready to be turned into messages row by row.
pub struct EncodedBatch<'a> {
    lsn: &'a Int64Array,
    seq: &'a Int64Array,
    op: Option<&'a StringArray>,
    commit_micros:
        Option<&'a arrow::array::PrimitiveArray<arrow::datatypes::TimestampMicrosecondType>>,
    keys: Option<StringArray>,
    timestamps: Option<Vec<Option<i64>>>,
    row: NullableEncoder<'a>,
    format: KafkaFormat,
    source: &'a SourceInfo,
}

/// `batch` with every timestamp column in UTC, so the JSON encoder writes
/// RFC 3339 with `Z` (a timestamp without a zone would be written without one).
pub fn utc_timestamps(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let needs =
        |t: &DataType| matches!(t, DataType::Timestamp(_, tz) if tz.as_deref() != Some("UTC"));
    if !batch.schema().fields().iter().any(|f| needs(f.data_type())) {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        match field.data_type() {
            DataType::Timestamp(unit, tz) if tz.as_deref() != Some("UTC") => {
                let utc = DataType::Timestamp(*unit, Some("UTC".into()));
                // A zone-less timestamp is taken as UTC (engage's convention).
                columns.push(arrow::compute::cast(column, &utc)?);
                fields.push(field.as_ref().clone().with_data_type(utc));
            }
            _ => {
                columns.push(column.clone());
                fields.push(field.as_ref().clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)
}

/// The field and options a row encoder over `rows` is made with (they must
/// outlive the encoder, so the caller holds them).
pub fn row_encoder_parts(rows: &StructArray) -> (FieldRef, EncoderOptions) {
    let field: FieldRef = Arc::new(Field::new("row", rows.data_type().clone(), false));
    let options = EncoderOptions::default()
        .with_explicit_nulls(true)
        .with_encoder_factory(values::json_encoder_factory());
    (field, options)
}

/// The JSON encoder of `rows` (see [`row_struct`] and [`row_encoder_parts`]).
pub fn row_encoder<'a>(
    rows: &'a StructArray,
    field: &'a FieldRef,
    options: &'a EncoderOptions,
) -> Result<NullableEncoder<'a>, ArrowError> {
    make_encoder(field, rows, options)
}

impl<'a> EncodedBatch<'a> {
    /// Prepares `batch` (already through [`utc_timestamps`]) with `row`, the
    /// encoder of the row's own columns ([`row_encoder`]).
    pub fn new(
        batch: &'a RecordBatch,
        row: NullableEncoder<'a>,
        columns: Columns,
        format: KafkaFormat,
        source: &'a SourceInfo,
    ) -> Result<EncodedBatch<'a>, ArrowError> {
        let int64 = |index: usize| batch.column(index).as_primitive_opt::<Int64Type>();
        let (Some(lsn), Some(seq)) = (int64(columns.lsn), int64(columns.seq)) else {
            return Err(ArrowError::SchemaError(format!(
                "`{LSN_COLUMN}` and `{SEQ_COLUMN}` must be BIGINT"
            )));
        };
        let op = columns
            .op
            .and_then(|i| batch.column(i).as_string_opt::<i32>());
        let commit_micros = columns.commit_ts.and_then(|i| {
            batch
                .column(i)
                .as_primitive_opt::<arrow::datatypes::TimestampMicrosecondType>()
        });
        let keys = match columns.key {
            Some(index) => Some(values::text_column(batch.column(index))?),
            None => None,
        };
        let timestamps = match columns.timestamp {
            Some(index) => Some(millis(batch.column(index))?),
            None => None,
        };
        Ok(EncodedBatch {
            lsn,
            seq,
            op,
            commit_micros,
            keys,
            timestamps,
            row,
            format,
            source,
        })
    }

    pub fn position(&self, row: usize) -> Position {
        Position::new(self.lsn.value(row) as u64, self.seq.value(row) as u64)
    }

    /// The message keys (the key column as text), if the sink has a key.
    pub fn keys(&self) -> Option<&StringArray> {
        self.keys.as_ref()
    }

    /// The message key of `row`, if the sink has one and the value is not NULL.
    pub fn key(&self, row: usize) -> Option<&str> {
        key_of(self.keys.as_ref(), row)
    }

    /// The message timestamp of `row` (Unix milliseconds), if any.
    pub fn timestamp(&self, row: usize) -> Option<i64> {
        self.timestamps.as_ref().and_then(|t| t[row])
    }

    /// Writes the value of `row` into `out` (cleared first).
    pub fn value(&mut self, row: usize, out: &mut Vec<u8>) {
        out.clear();
        match self.format {
            KafkaFormat::Json => self.row.encode(row, out),
            KafkaFormat::DebeziumJson => self.envelope(row, out),
        }
    }

    /// Debezium's envelope. An insert has `after`; a delete has `before`
    /// (holding what the delete carried: the key, and the whole row under
    /// `REPLICA IDENTITY FULL`); an update has `after` and, as Debezium
    /// writes it under the default replica identity, no `before`.
    fn envelope(&mut self, row: usize, out: &mut Vec<u8>) {
        let op = match self.op {
            Some(op) if !op.is_null(row) => op.value(row),
            _ => "c",
        };
        out.extend_from_slice(b"{\"before\":");
        if op == "d" {
            self.row.encode(row, out);
        } else {
            out.extend_from_slice(b"null");
        }
        out.extend_from_slice(b",\"after\":");
        if op == "d" {
            out.extend_from_slice(b"null");
        } else {
            self.row.encode(row, out);
        }
        let commit_ms = self
            .commit_micros
            .filter(|c| !c.is_null(row))
            .map(|c| c.value(row).div_euclid(1000));
        let ts_ms = commit_ms.unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
        use std::io::Write as _;
        let _ = write!(
            out,
            ",\"op\":\"{op}\",\"ts_ms\":{ts_ms},\"source\":{{\"version\":\"engage-"
        );
        out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
        out.extend_from_slice(b"\",\"connector\":\"postgresql\",\"name\":");
        json_string(&self.source.name, out);
        let _ = write!(
            out,
            ",\"ts_ms\":{ts_ms},\"snapshot\":\"false\",\"db\":null,\"schema\":"
        );
        json_string(&self.source.schema, out);
        out.extend_from_slice(b",\"table\":");
        json_string(&self.source.table, out);
        // Debezium's `lsn` is the change's own LSN; engage's position is its
        // transaction's commit LSN, the same for every change of it.
        let _ = write!(
            out,
            ",\"txId\":null,\"lsn\":{},\"sequence\":\"[\\\"{}\\\",\\\"{}\\\"]\"}},\"transaction\":null}}",
            self.lsn.value(row),
            self.lsn.value(row),
            self.seq.value(row)
        );
    }
}

/// Row `row` of `keys`, unless there are no keys or it is NULL.
pub fn key_of(keys: Option<&StringArray>, row: usize) -> Option<&str> {
    let keys = keys?;
    (!keys.is_null(row)).then(|| keys.value(row))
}

/// A timestamp column as Unix milliseconds.
fn millis(column: &dyn Array) -> Result<Vec<Option<i64>>, ArrowError> {
    let ms = arrow::compute::cast(column, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
    let ms = ms.as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    Ok(ms.iter().collect())
}

/// `text` as a JSON string (quoted and escaped).
fn json_string(text: &str, out: &mut Vec<u8>) {
    // serde_json escapes exactly as JSON requires; a String cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// The struct of `batch`'s columns a message's row object holds: every
/// column for `json`; for `debezium_json` all but the metadata columns,
/// which the envelope carries instead.
pub fn row_struct(batch: &RecordBatch, format: KafkaFormat) -> StructArray {
    let metadata = [OP_COLUMN, LSN_COLUMN, SEQ_COLUMN, COMMIT_TS_COLUMN];
    let schema = batch.schema();
    let (fields, columns): (Vec<FieldRef>, Vec<_>) = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(f, _)| format == KafkaFormat::Json || !metadata.contains(&f.name().as_str()))
        .map(|(f, c)| (f.clone(), c.clone()))
        .unzip();
    StructArray::new(fields.into(), columns, None)
}

/// The partition of a message: by its key as Kafka's Java client chooses it
/// (murmur2, so engage's partitions match other producers'); a message
/// without a key goes by its transaction's commit LSN, so one transaction's
/// changes stay together.
pub fn partition(key: Option<&str>, position: Position, partitions: i32) -> i32 {
    let hash = match key {
        Some(key) => murmur2(key.as_bytes()),
        None => murmur2(&position.lsn.to_be_bytes()),
    };
    ((hash & 0x7fff_ffff) as i64 % partitions as i64) as i32
}

/// Kafka's `Utils.murmur2` (the Java client's default partitioner hash).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Decimal128Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::Schema;

    #[test]
    fn murmur2_matches_kafkas_java_client() {
        // Values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58897971
        );
        assert_eq!(murmur2(b"abc"), 479470107);
        // The same key always lands in the same partition.
        let p = partition(Some("content-7"), Position::new(1, 0), 6);
        assert_eq!(p, partition(Some("content-7"), Position::new(99, 3), 6));
        assert!((0..6).contains(&p));
    }

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("content_id", DataType::Utf8, true),
            Field::new(
                "event_ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true,
            ),
            Field::new("seconds", DataType::Decimal128(10, 3), true),
            Field::new(OP_COLUMN, DataType::Utf8, true),
            Field::new(LSN_COLUMN, DataType::Int64, true),
            Field::new(SEQ_COLUMN, DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![Some("c-1"), None])),
                Arc::new(TimestampMicrosecondArray::from(vec![
                    1_764_417_600_123_456,
                    0,
                ])),
                Arc::new(
                    Decimal128Array::from(vec![Some(12_500), None])
                        .with_precision_and_scale(10, 3)
                        .unwrap(),
                ),
                Arc::new(StringArray::from(vec!["c", "d"])),
                Arc::new(Int64Array::from(vec![0x1_0000_0000, 0x1_0000_0000])),
                Arc::new(Int64Array::from(vec![0, 1])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn json_rows_carry_rfc3339_utc_times_decimal_numbers_and_positions() {
        let batch = utc_timestamps(&batch()).unwrap();
        let rows = row_struct(&batch, KafkaFormat::Json);
        let columns = Columns::find(&batch.schema(), Some("content_id"), Some(2)).unwrap();
        let source = SourceInfo::default();
        let (field, options) = row_encoder_parts(&rows);
        let encoder = row_encoder(&rows, &field, &options).unwrap();
        let mut encoded =
            EncodedBatch::new(&batch, encoder, columns, KafkaFormat::Json, &source).unwrap();
        let mut out = Vec::new();
        encoded.value(0, &mut out);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "{\"id\":1,\"content_id\":\"c-1\",\"event_ts\":\"2025-11-29T12:00:00.123456Z\",\
             \"seconds\":12.500,\"_op\":\"c\",\"_lsn\":4294967296,\"_seq\":0}"
        );
        assert_eq!(encoded.key(0), Some("c-1"));
        assert_eq!(encoded.key(1), None);
        assert_eq!(encoded.timestamp(0), Some(1_764_417_600_123));
        assert_eq!(encoded.position(1), Position::new(0x1_0000_0000, 1));
    }

    #[test]
    fn debezium_envelopes_put_inserts_after_and_deletes_before() {
        let batch = utc_timestamps(&batch()).unwrap();
        let rows = row_struct(&batch, KafkaFormat::DebeziumJson);
        let columns = Columns::find(&batch.schema(), None, None).unwrap();
        let source = SourceInfo {
            name: "engagement".into(),
            schema: "public".into(),
            table: "engagement_events".into(),
        };
        let (field, options) = row_encoder_parts(&rows);
        let encoder = row_encoder(&rows, &field, &options).unwrap();
        let mut encoded =
            EncodedBatch::new(&batch, encoder, columns, KafkaFormat::DebeziumJson, &source)
                .unwrap();
        let mut out = Vec::new();
        for (row, op) in [(0, "c"), (1, "d")] {
            encoded.value(row, &mut out);
            let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(value["op"], op);
            assert_eq!(value["source"]["table"], "engagement_events");
            assert_eq!(value["source"]["lsn"], 0x1_0000_0000_i64);
            let (present, absent) = if op == "d" {
                ("before", "after")
            } else {
                ("after", "before")
            };
            assert_eq!(value[present]["id"], row as i64 + 1);
            assert!(value[present].get("_op").is_none());
            assert!(value[absent].is_null());
        }
    }
}
