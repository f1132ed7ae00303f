//! Window state in checkpoints: a snapshot is one row per (bucket, key)
//! with each accumulator as (value, count, bytes); see the module docs of
//! [`super`] for how layers of changed buckets restore.

use std::collections::BTreeSet;
use std::sync::Arc;

use foldhash::HashMap;

use arrow::array::{Array, ArrayRef, BinaryArray, BinaryBuilder, Float64Array, Int64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use super::distinct::Dictionary;
use super::partials::{compact, merge_into, Column, Partials};
use super::WindowState;
use crate::checkpoint::WindowMeta;
use crate::sql::window::WindowKind;

/// Rows per batch of a snapshot at most. A checkpoint encodes each batch
/// as it is built, so a large state is never held twice over (once as
/// partials, once as one batch of all its rows) while its file is written.
const SNAPSHOT_ROWS: usize = 16 * 1024;
/// Bytes of keys and encoded accumulators per batch of a snapshot at most
/// (a `count(DISTINCT ..)` of a popular key holds every value it counts).
const SNAPSHOT_BYTES: usize = 4 << 20;

impl WindowState {
    /// The whole state in one batch (bucket, key, rows, then accumulators).
    pub fn snapshot(&self) -> Result<(RecordBatch, WindowMeta), ArrowError> {
        in_one_batch(self.snapshot_schema(), |write| {
            self.snapshot_of(self.buckets.iter(), write)
        })
    }

    /// The whole state, or only the buckets changed since the last call (a
    /// layer over the snapshots before it; see the module docs), in one
    /// batch. Either way, changes are counted afresh from here.
    pub fn snapshot_changes(
        &mut self,
        whole: bool,
    ) -> Result<(RecordBatch, WindowMeta), ArrowError> {
        in_one_batch(self.snapshot_schema(), |write| {
            self.snapshot_changes_into(whole, write)
        })
    }

    /// [`Self::snapshot_changes`] for a checkpoint: `write` gets batches (of
    /// [`Self::snapshot_schema`]) of at most [`SNAPSHOT_ROWS`] rows or about
    /// [`SNAPSHOT_BYTES`], as they are built.
    pub fn snapshot_changes_into(
        &mut self,
        whole: bool,
        write: &mut dyn FnMut(RecordBatch) -> Result<(), ArrowError>,
    ) -> Result<WindowMeta, ArrowError> {
        let meta = if whole {
            self.snapshot_of(self.buckets.iter(), write)
        } else {
            let changed = self
                .changed
                .iter()
                .filter_map(|b| self.buckets.get_key_value(b));
            self.snapshot_of(changed, write)
        };
        self.changed.clear();
        self.last_changed = None;
        meta
    }

    /// The columns of a snapshot: bucket, key, rows, then (value, count,
    /// bytes) per accumulator.
    pub fn snapshot_schema(&self) -> arrow::datatypes::SchemaRef {
        let mut fields = vec![
            Field::new("bucket", DataType::Int64, false),
            Field::new("key", DataType::Binary, false),
            Field::new("rows", DataType::Int64, false),
        ];
        for a in 0..self.aggregates.len() {
            fields.push(Field::new(format!("v{a}"), DataType::Float64, false));
            fields.push(Field::new(format!("n{a}"), DataType::Int64, false));
            fields.push(Field::new(format!("d{a}"), DataType::Binary, false));
        }
        Arc::new(Schema::new(fields))
    }

    fn snapshot_of<'a>(
        &self,
        selected: impl Iterator<Item = (&'a i64, &'a Partials)>,
        write: &mut dyn FnMut(RecordBatch) -> Result<(), ArrowError>,
    ) -> Result<WindowMeta, ArrowError> {
        let schema = self.snapshot_schema();
        let dictionary = self.distinct.lock();
        let mut chunk = SnapshotChunk::new(self.aggregates.len());
        let mut scratch = Vec::new();
        for (bucket, partials) in selected {
            for i in 0..partials.len() {
                chunk.buckets.push(*bucket);
                chunk
                    .keys
                    .append_value(&self.keys.bytes[partials.keys[i] as usize]);
                chunk.rows.push(partials.rows[i]);
                for (column, (v, n, d)) in partials.columns.iter().zip(&mut chunk.accumulators) {
                    scratch.clear();
                    let (value, count) = match column {
                        Column::Count(c) => (0.0, c[i]),
                        Column::Sum(s, c) | Column::Extreme(s, c) => (s[i], c[i]),
                        Column::DecimalSum(s, c) => {
                            scratch.extend_from_slice(&s[i].to_le_bytes());
                            (0.0, c[i])
                        }
                        Column::Distinct(maps) => {
                            encode_distinct(&maps[i], &dictionary, &mut scratch);
                            (0.0, 0)
                        }
                        Column::Values(maps, nulls) => {
                            encode_values(&maps[i], &mut scratch);
                            (0.0, nulls[i])
                        }
                    };
                    v.push(value);
                    n.push(count);
                    d.append_value(&scratch);
                    if scratch.capacity() > SNAPSHOT_BYTES {
                        // A global count(DISTINCT ..) holds every value of
                        // its window: not kept a third time while the
                        // batch holding it is compressed.
                        scratch = Vec::new();
                    }
                }
                if chunk.buckets.len() == SNAPSHOT_ROWS || chunk.bytes() >= SNAPSHOT_BYTES {
                    write(chunk.finish(&schema)?)?;
                }
            }
        }
        if !chunk.buckets.is_empty() {
            write(chunk.finish(&schema)?)?;
        }
        Ok(WindowMeta {
            last_end: self.last_end,
            last_emission_empty: self.last_emission_empty,
            max_event_time: self.max_event_time,
        })
    }

    /// Restores what [`WindowState::snapshot`] (the first layer) and
    /// [`WindowState::snapshot_changes`] (the layers after it) wrote, oldest
    /// first; `meta` is the newest layer's.
    pub fn restore(
        &mut self,
        layers: &[Vec<RecordBatch>],
        meta: &WindowMeta,
    ) -> Result<(), ArrowError> {
        self.last_end = meta.last_end;
        self.last_emission_empty = meta.last_emission_empty;
        self.max_event_time = meta.max_event_time;
        self.changed.clear();
        self.last_changed = None;
        for layer in layers {
            // A bucket in this layer replaces what the layers before held.
            let mut replaced = BTreeSet::new();
            for batch in layer {
                self.restore_batch(batch, &mut replaced)?;
            }
        }
        // Buckets dropped once every window holding them was emitted.
        if let Some(end) = self.last_end {
            let first_kept = match self.kind {
                WindowKind::Tumble { .. } => end,
                WindowKind::Hop { width, .. } => end - width,
            };
            self.buckets = self.buckets.split_off(&first_kept);
        }
        // The running totals are those of the window ending at `last_end`.
        if let (WindowKind::Hop { width, .. }, Some(end)) = (self.kind, self.last_end) {
            let mut totals = Partials::new(&self.aggregates);
            for (_, partials) in self.buckets.range(end - width..end) {
                merge_into(&mut totals, partials, 1);
            }
            compact(&mut totals);
            self.totals = totals;
        }
        Ok(())
    }

    fn restore_batch(
        &mut self,
        batch: &RecordBatch,
        replaced: &mut BTreeSet<i64>,
    ) -> Result<(), ArrowError> {
        let column = |i: usize| batch.column(i).clone();
        let buckets = column(0);
        let buckets = buckets
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("bucket column");
        let keys = column(1);
        let keys = keys
            .as_any()
            .downcast_ref::<BinaryArray>()
            .expect("key column");
        let rows = column(2);
        let rows = rows
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("rows column");
        let mut dictionary = self.distinct.lock();
        for r in 0..batch.num_rows() {
            let key = self.keys.intern(keys.value(r));
            let aggregates = &self.aggregates;
            let bucket = buckets.value(r);
            if replaced.insert(bucket) {
                self.buckets.insert(bucket, Partials::new(aggregates));
            }
            let partials = self
                .buckets
                .entry(bucket)
                .or_insert_with(|| Partials::new(aggregates));
            let (i, _) = partials.entry(key);
            partials.rows[i] = rows.value(r);
            for (a, column) in partials.columns.iter_mut().enumerate() {
                let base = 3 + 3 * a;
                let v = batch
                    .column(base)
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .expect("v")
                    .value(r);
                let n = batch
                    .column(base + 1)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("n")
                    .value(r);
                let d = batch
                    .column(base + 2)
                    .as_any()
                    .downcast_ref::<BinaryArray>()
                    .expect("d")
                    .value(r);
                match column {
                    Column::Count(c) => c[i] = n,
                    Column::Sum(s, c) | Column::Extreme(s, c) => {
                        s[i] = v;
                        c[i] = n;
                    }
                    Column::DecimalSum(s, c) => {
                        s[i] = d.try_into().map(i128::from_le_bytes).map_err(|_| {
                            ArrowError::InvalidArgumentError(format!(
                                "checkpointed decimal sum has {} bytes, not 16",
                                d.len()
                            ))
                        })?;
                        c[i] = n;
                    }
                    Column::Distinct(maps) => maps[i] = decode_distinct(d, &mut dictionary),
                    Column::Values(maps, nulls) => {
                        maps[i] = decode_values(d);
                        nulls[i] = n;
                    }
                }
            }
        }
        Ok(())
    }
}

/// What `snapshot` hands its `write` callback, as one batch of `schema`.
fn in_one_batch(
    schema: arrow::datatypes::SchemaRef,
    snapshot: impl FnOnce(
        &mut dyn FnMut(RecordBatch) -> Result<(), ArrowError>,
    ) -> Result<WindowMeta, ArrowError>,
) -> Result<(RecordBatch, WindowMeta), ArrowError> {
    let mut batches = Vec::new();
    let meta = snapshot(&mut |batch| {
        batches.push(batch);
        Ok(())
    })?;
    Ok((arrow::compute::concat_batches(&schema, &batches)?, meta))
}

/// The columns of one snapshot batch, being built.
struct SnapshotChunk {
    buckets: Vec<i64>,
    keys: BinaryBuilder,
    rows: Vec<i64>,
    /// Per accumulator: values, counts, bytes.
    accumulators: Vec<(Vec<f64>, Vec<i64>, BinaryBuilder)>,
}

impl SnapshotChunk {
    fn new(aggregates: usize) -> Self {
        SnapshotChunk {
            buckets: Vec::with_capacity(SNAPSHOT_ROWS),
            keys: BinaryBuilder::new(),
            rows: Vec::with_capacity(SNAPSHOT_ROWS),
            accumulators: (0..aggregates)
                .map(|_| {
                    (
                        Vec::with_capacity(SNAPSHOT_ROWS),
                        Vec::with_capacity(SNAPSHOT_ROWS),
                        BinaryBuilder::new(),
                    )
                })
                .collect(),
        }
    }

    /// Bytes of the binary columns so far.
    fn bytes(&self) -> usize {
        self.keys.values_slice().len()
            + self
                .accumulators
                .iter()
                .map(|(_, _, d)| d.values_slice().len())
                .sum::<usize>()
    }

    /// The batch of the rows so far; the chunk is empty after.
    fn finish(&mut self, schema: &arrow::datatypes::SchemaRef) -> Result<RecordBatch, ArrowError> {
        fn take<T>(v: &mut Vec<T>) -> Vec<T> {
            std::mem::replace(v, Vec::with_capacity(SNAPSHOT_ROWS))
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(take(&mut self.buckets))),
            Arc::new(self.keys.finish()),
            Arc::new(Int64Array::from(take(&mut self.rows))),
        ];
        for (v, n, d) in &mut self.accumulators {
            columns.push(Arc::new(Float64Array::from(take(v))));
            columns.push(Arc::new(Int64Array::from(take(n))));
            columns.push(Arc::new(d.finish()));
        }
        RecordBatch::try_new(schema.clone(), columns)
    }
}

/// Appends `map`'s distinct values to `out` as `len:u32 bytes count:i64`
/// repeated: the values' row encodings, so a checkpoint does not depend on
/// one process's ids.
fn encode_distinct(map: &HashMap<u32, i64>, dictionary: &Dictionary, out: &mut Vec<u8>) {
    for (id, count) in map {
        let value = dictionary.value(*id);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
        out.extend_from_slice(&count.to_le_bytes());
    }
}

fn decode_distinct(mut bytes: &[u8], dictionary: &mut Dictionary) -> HashMap<u32, i64> {
    let mut map = HashMap::default();
    while bytes.len() >= 4 {
        let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        if bytes.len() < 4 + len + 8 {
            break;
        }
        let id = dictionary.intern(&bytes[4..4 + len]);
        let count = i64::from_le_bytes(bytes[4 + len..12 + len].try_into().expect("8 bytes"));
        map.insert(id, count);
        bytes = &bytes[12 + len..];
    }
    map
}

/// `bits:u64 count:i64` repeated.
/// Appends `map`'s values and counts to `out`.
fn encode_values(map: &HashMap<u64, i64>, out: &mut Vec<u8>) {
    out.reserve(map.len() * 16);
    for (value, count) in map {
        out.extend_from_slice(&value.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
    }
}

fn decode_values(bytes: &[u8]) -> HashMap<u64, i64> {
    bytes
        .chunks_exact(16)
        .map(|pair| {
            let value = u64::from_le_bytes(pair[..8].try_into().expect("8 bytes"));
            let count = i64::from_le_bytes(pair[8..].try_into().expect("8 bytes"));
            (value, count)
        })
        .collect()
}
