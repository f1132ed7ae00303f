//! Window state: per-slide partial aggregates and running totals.
//!
//! Every input row lands in the *bucket* of its event time (buckets are one
//! slide wide; for `tumble` the slide is the width). A bucket holds, per group
//! key, partial accumulators. For `hop(slide, width)` the state also keeps the
//! *running totals* of the last emitted window: moving to the next window adds
//! the bucket that enters and subtracts the one that leaves, so the work per
//! slide is proportional to the keys in those two buckets, never to
//! width/slide (Arroyo's two-phase sliding windows).
//!
//! Rows carry a sign: `+1` for inserts and the new image of updates, `-1` for
//! deletes and the old image of updates. A retraction subtracts from its
//! bucket, and from the running totals if the bucket is inside the current
//! window. `min`/`max` cannot be taken back: retractions leave them as they are
//! (the planner warns about this).
//!
//! Inserts whose event time is below the watermark are *late*: they are not
//! aggregated, and the caller counts them.
//!
//! Group keys are interned once (Arrow row format bytes -> `u32`), so buckets
//! store small integer ids and flat accumulator columns.
//!
//! # Checkpoints
//!
//! A snapshot is one row per (bucket, key). Buckets change only where events
//! land, which on a live stream is the newest few, so the state remembers
//! which buckets changed since its last snapshot and can write just those
//! ([`WindowState::snapshot_changes`]). A restore reads such layers oldest
//! first (a whole snapshot, then the changes): a bucket in a layer replaces
//! what earlier layers held for it, and buckets every window of which was
//! emitted by then (they were dropped, not rewritten) are left out.

use std::collections::{BTreeMap, BTreeSet};

// Group keys, entry indexes and distinct values are hashed for every input
// row of every window: foldhash (seeded per process, as DataFusion's own hash
// tables are) costs a fraction of std's SipHash on such short keys.
use foldhash::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, BooleanArray, Decimal128Array,
    Float64Array, Int64Array, StructArray, TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::Decimal128Type;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};

use crate::checkpoint::WindowMeta;
use crate::sql::window::{AggKind, AggSpec, WindowKind, WindowedAggregate};

/// Accumulators of one aggregate for all entries of a bucket (or the totals).
#[derive(Debug, Clone)]
enum Column {
    Count(Vec<i64>),
    /// Sum (also for avg) and the number of non-NULL values.
    Sum(Vec<f64>, Vec<i64>),
    /// Sum (also for avg) of a decimal argument, exact, as integers of the
    /// argument's scale, and the number of non-NULL values.
    DecimalSum(Vec<i128>, Vec<i64>),
    /// Min or max, and the number of values seen.
    Extreme(Vec<f64>, Vec<i64>),
    Distinct(Vec<HashMap<Box<[u8]>, i64>>),
}

/// Entries (one per key) of a bucket or of the running totals.
#[derive(Debug, Clone, Default)]
struct Partials {
    index: HashMap<u32, usize>,
    keys: Vec<u32>,
    /// Rows contributing to each entry (inserts minus retractions).
    rows: Vec<i64>,
    columns: Vec<Column>,
}

impl Partials {
    fn new(aggregates: &[AggSpec]) -> Partials {
        Partials {
            columns: aggregates
                .iter()
                .map(|a| match a.kind {
                    AggKind::Count => Column::Count(Vec::new()),
                    AggKind::Sum | AggKind::Avg if a.decimal_scale.is_some() => {
                        Column::DecimalSum(Vec::new(), Vec::new())
                    }
                    AggKind::Sum | AggKind::Avg => Column::Sum(Vec::new(), Vec::new()),
                    AggKind::Min | AggKind::Max => Column::Extreme(Vec::new(), Vec::new()),
                    // A UDAF keeps its values as count(DISTINCT) does: a multiset.
                    AggKind::CountDistinct | AggKind::Udaf => Column::Distinct(Vec::new()),
                })
                .collect(),
            ..Partials::default()
        }
    }

    /// The entry of `key`, created empty if missing; the bool says whether it is new.
    fn entry(&mut self, key: u32) -> (usize, bool) {
        if let Some(&i) = self.index.get(&key) {
            return (i, false);
        }
        let i = self.keys.len();
        self.index.insert(key, i);
        self.keys.push(key);
        self.rows.push(0);
        for column in &mut self.columns {
            match column {
                Column::Count(v) => v.push(0),
                Column::Sum(s, n) | Column::Extreme(s, n) => {
                    s.push(0.0);
                    n.push(0);
                }
                Column::DecimalSum(s, n) => {
                    s.push(0);
                    n.push(0);
                }
                Column::Distinct(v) => v.push(HashMap::default()),
            }
        }
        (i, true)
    }

    fn len(&self) -> usize {
        self.keys.len()
    }
}

/// Where one input row's values are, for [`Partials::add`].
struct RowValues<'a> {
    numbers: &'a [Option<Float64Array>],
    /// Decimal arguments of sums, at their own scale.
    decimals: &'a [Option<Decimal128Array>],
    distinct: &'a [Option<arrow::row::Rows>],
    filters: &'a [Option<BooleanArray>],
    row: usize,
}

impl Partials {
    /// Adds (sign +1) or retracts (sign -1) one row into entry `i`.
    fn add(&mut self, i: usize, sign: i64, aggregates: &[AggSpec], values: &RowValues<'_>) {
        self.rows[i] += sign;
        for (a, (spec, column)) in aggregates.iter().zip(&mut self.columns).enumerate() {
            if let Some(filter) = &values.filters[a] {
                if !(filter.is_valid(values.row) && filter.value(values.row)) {
                    continue;
                }
            }
            let number = values.numbers[a]
                .as_ref()
                .map(|n| n.is_valid(values.row).then(|| n.value(values.row)));
            match column {
                Column::Count(v) => {
                    if !matches!(number, Some(None)) {
                        v[i] += sign;
                    }
                }
                Column::Sum(s, n) => {
                    if let Some(Some(x)) = number {
                        s[i] += sign as f64 * x;
                        n[i] += sign;
                    }
                }
                Column::DecimalSum(s, n) => {
                    if let Some(d) = &values.decimals[a] {
                        if d.is_valid(values.row) {
                            s[i] += i128::from(sign) * d.value(values.row);
                            n[i] += sign;
                        }
                    }
                }
                Column::Extreme(v, n) => {
                    if let (Some(Some(x)), true) = (number, sign > 0) {
                        let better = match spec.kind {
                            AggKind::Min => x < v[i],
                            _ => x > v[i],
                        };
                        if n[i] == 0 || better {
                            v[i] = x;
                        }
                        n[i] += 1;
                    }
                }
                Column::Distinct(maps) => {
                    if let Some(rows) = &values.distinct[a] {
                        let bytes = rows.row(values.row);
                        let counts = &mut maps[i];
                        match counts.get_mut(bytes.data()) {
                            Some(count) => {
                                *count += sign;
                                if *count <= 0 {
                                    counts.remove(bytes.data());
                                }
                            }
                            None if sign > 0 => {
                                counts.insert(bytes.data().into(), sign);
                            }
                            None => {}
                        }
                    }
                }
            }
        }
    }

    /// Adds (sign +1) or subtracts (sign -1) entry `j` of `other` into entry `i`.
    fn merge(&mut self, i: usize, other: &Partials, j: usize, sign: i64) {
        self.rows[i] += sign * other.rows[j];
        for (column, theirs) in self.columns.iter_mut().zip(&other.columns) {
            match (column, theirs) {
                (Column::Count(v), Column::Count(w)) => v[i] += sign * w[j],
                (Column::Sum(s, n), Column::Sum(t, m)) => {
                    s[i] += sign as f64 * t[j];
                    n[i] += sign * m[j];
                }
                (Column::DecimalSum(s, n), Column::DecimalSum(t, m)) => {
                    s[i] += i128::from(sign) * t[j];
                    n[i] += sign * m[j];
                }
                (Column::Extreme(_, n), Column::Extreme(_, m)) => {
                    // Recomputed from the buckets at emission; only counts move here.
                    n[i] += sign * m[j];
                }
                (Column::Distinct(maps), Column::Distinct(theirs)) => {
                    for (value, count) in &theirs[j] {
                        let entry = maps[i].entry(value.clone()).or_insert(0);
                        *entry += sign * count;
                        if *entry <= 0 {
                            maps[i].remove(value);
                        }
                    }
                }
                _ => unreachable!("same aggregates"),
            }
        }
    }
}

/// Interned group keys.
#[derive(Debug, Default)]
struct Keys {
    ids: HashMap<Box<[u8]>, u32>,
    bytes: Vec<Box<[u8]>>,
}

impl Keys {
    fn intern(&mut self, key: &[u8]) -> u32 {
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        let id = self.bytes.len() as u32;
        self.bytes.push(key.into());
        self.ids.insert(key.into(), id);
        id
    }
}

/// What one call to [`WindowState::accumulate`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Accumulated {
    pub rows: u64,
    pub late: u64,
    /// Retractions whose window had already closed (nothing left to take back).
    pub expired: u64,
}

/// The state of one windowed aggregate.
pub struct WindowState {
    kind: WindowKind,
    aggregates: Vec<AggSpec>,
    key_count: usize,
    time_column: usize,
    window_position: usize,
    output_schema: SchemaRef,
    key_converter: RowConverter,
    distinct_converters: Vec<Option<RowConverter>>,
    keys: Keys,
    buckets: BTreeMap<i64, Partials>,
    /// Buckets changed since the last snapshot, and the last one added (rows
    /// mostly land in the same bucket as the row before).
    changed: BTreeSet<i64>,
    last_changed: Option<i64>,
    /// Hop only: the aggregates of the window ending at `last_end`.
    totals: Partials,
    /// End of the last emitted window.
    last_end: Option<i64>,
    last_emission_empty: bool,
    max_event_time: Option<i64>,
}

impl WindowState {
    /// `pre_schema` is the schema of the pre-plan's output.
    pub fn new(plan: &WindowedAggregate, pre_schema: &Schema) -> Result<WindowState, ArrowError> {
        let key_fields = (0..plan.key_count)
            .map(|i| SortField::new(pre_schema.field(i).data_type().clone()))
            .collect();
        let distinct_converters = plan
            .aggregates
            .iter()
            .map(|a| match (a.kind, a.argument) {
                (AggKind::CountDistinct | AggKind::Udaf, Some(arg)) => {
                    RowConverter::new(vec![SortField::new(
                        pre_schema.field(arg).data_type().clone(),
                    )])
                    .map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        Ok(WindowState {
            kind: plan.kind,
            totals: Partials::new(&plan.aggregates),
            aggregates: plan.aggregates.clone(),
            key_count: plan.key_count,
            time_column: plan.time_column,
            window_position: plan.window_position,
            output_schema: plan.output_schema.clone(),
            key_converter: RowConverter::new(key_fields)?,
            distinct_converters,
            keys: Keys::default(),
            buckets: BTreeMap::new(),
            changed: BTreeSet::new(),
            last_changed: None,
            last_end: None,
            last_emission_empty: true,
            max_event_time: None,
        })
    }

    pub fn kind(&self) -> WindowKind {
        self.kind
    }

    pub fn max_event_time(&self) -> Option<i64> {
        self.max_event_time
    }

    /// End of the last emitted window: the watermark had reached it.
    pub fn last_end(&self) -> Option<i64> {
        self.last_end
    }

    /// Entries held in buckets and totals (a measure of state size).
    pub fn entries(&self) -> usize {
        self.buckets.values().map(Partials::len).sum::<usize>() + self.totals.len()
    }

    /// Adds a pre-plan output batch with `sign`; inserts below `late_before` are late.
    pub fn accumulate(
        &mut self,
        batch: &RecordBatch,
        sign: i64,
        late_before: Option<i64>,
    ) -> Result<Accumulated, ArrowError> {
        let mut done = Accumulated::default();
        if batch.num_rows() == 0 {
            return Ok(done);
        }
        let keys = self
            .key_converter
            .convert_columns(&batch.columns()[..self.key_count])?;
        let times = cast(
            batch.column(self.time_column),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )?;
        let times = times
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("cast to timestamps");
        let numbers: Vec<Option<Float64Array>> = self
            .aggregates
            .iter()
            .map(|a| match (a.kind, a.argument) {
                (AggKind::CountDistinct | AggKind::Udaf, _) | (_, None) => Ok(None),
                _ if a.decimal_scale.is_some() => Ok(None),
                (_, Some(arg)) => cast(batch.column(arg), &DataType::Float64).map(|c| {
                    Some(
                        c.as_any()
                            .downcast_ref::<Float64Array>()
                            .expect("cast")
                            .clone(),
                    )
                }),
            })
            .collect::<Result<_, ArrowError>>()?;
        let decimals: Vec<Option<Decimal128Array>> = self
            .aggregates
            .iter()
            .map(|a| match (a.decimal_scale, a.argument) {
                (Some(scale), Some(arg)) => {
                    cast(batch.column(arg), &DataType::Decimal128(38, scale))
                        .map(|c| Some(c.as_primitive::<Decimal128Type>().clone()))
                }
                _ => Ok(None),
            })
            .collect::<Result<_, ArrowError>>()?;
        let distinct: Vec<Option<arrow::row::Rows>> = self
            .aggregates
            .iter()
            .zip(&self.distinct_converters)
            .map(|(a, converter)| match (converter, a.argument) {
                (Some(converter), Some(arg)) => converter
                    .convert_columns(&[batch.column(arg).clone()])
                    .map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_, ArrowError>>()?;
        let filters: Vec<Option<BooleanArray>> = self
            .aggregates
            .iter()
            .map(|a| {
                a.filter.map(|f| {
                    batch
                        .column(f)
                        .as_any()
                        .downcast_ref::<BooleanArray>()
                        .cloned()
                        .unwrap_or_else(|| BooleanArray::from(vec![false; batch.num_rows()]))
                })
            })
            .collect();
        let slide = self.kind.slide();
        let width = self.kind.width();
        for row in 0..batch.num_rows() {
            if times.is_null(row) {
                done.late += 1; // no event time: it can belong to no window
                continue;
            }
            let time = times.value(row);
            if sign > 0 && late_before.is_some_and(|w| time < w) {
                done.late += 1;
                continue;
            }
            let bucket = time.div_euclid(slide) * slide;
            // A bucket whose every window has been emitted is gone.
            if self.last_end.is_some_and(|end| bucket + width <= end) {
                if sign < 0 {
                    done.expired += 1;
                } else {
                    done.late += 1;
                }
                continue;
            }
            if sign > 0 {
                self.max_event_time = Some(self.max_event_time.map_or(time, |m| m.max(time)));
            }
            // A global aggregate (grouped by the window only) has one empty key.
            let key = if self.key_count == 0 {
                self.keys.intern(&[])
            } else {
                self.keys.intern(keys.row(row).data())
            };
            let values = RowValues {
                numbers: &numbers,
                decimals: &decimals,
                distinct: &distinct,
                filters: &filters,
                row,
            };
            if self.last_changed != Some(bucket) {
                self.changed.insert(bucket);
                self.last_changed = Some(bucket);
            }
            let aggregates = &self.aggregates;
            let partials = self
                .buckets
                .entry(bucket)
                .or_insert_with(|| Partials::new(aggregates));
            let (i, _) = partials.entry(key);
            partials.add(i, sign, aggregates, &values);
            if matches!(self.kind, WindowKind::Hop { .. })
                && self
                    .last_end
                    .is_some_and(|end| bucket < end && bucket >= end - width)
            {
                let (t, _) = self.totals.entry(key);
                self.totals.add(t, sign, aggregates, &values);
            }
            done.rows += 1;
        }
        Ok(done)
    }

    /// Emits every window that ends at or before `watermark`, oldest first,
    /// as batches in the aggregate's output schema.
    pub fn emit_until(&mut self, watermark: i64) -> Result<Vec<(i64, RecordBatch)>, ArrowError> {
        let slide = self.kind.slide();
        let width = self.kind.width();
        let mut out = Vec::new();
        loop {
            let Some(first) = self.buckets.keys().next().copied() else {
                let sliding = matches!(self.kind, WindowKind::Hop { .. });
                if sliding && !self.last_emission_empty && self.totals.len() == 0 {
                    // Nothing left anywhere: settle at the watermark.
                    if let Some(end) = self.last_end {
                        let next = end + slide;
                        if next <= watermark {
                            out.push((next, self.empty_batch()));
                            self.last_end = Some(next);
                            self.last_emission_empty = true;
                            continue;
                        }
                    }
                }
                break;
            };
            let mut next = match self.last_end {
                Some(end) => end + slide,
                None => first + slide,
            };
            // Skip idle stretches: with an empty window just emitted and no data
            // before `first`, the next window with data ends at `first + slide`.
            if self.last_emission_empty && self.totals.len() == 0 {
                next = next.max(first + slide);
            }
            if next > watermark {
                break;
            }
            let batch = match self.kind {
                WindowKind::Tumble { .. } => {
                    let start = next - width;
                    let rows = self
                        .buckets
                        .remove(&start)
                        .unwrap_or_else(|| Partials::new(&self.aggregates));
                    self.build(&rows, start, next, None)?
                }
                WindowKind::Hop { .. } => {
                    if let Some(entering) = self.buckets.get(&(next - slide)) {
                        merge_into(&mut self.totals, entering, 1);
                    }
                    if let Some(leaving) = self.buckets.get(&(next - width - slide)) {
                        merge_into(&mut self.totals, leaving, -1);
                    }
                    let stale: Vec<i64> = self
                        .buckets
                        .range(..next - width)
                        .map(|(b, _)| *b)
                        .collect();
                    for bucket in stale {
                        self.buckets.remove(&bucket);
                    }
                    compact(&mut self.totals);
                    let extremes = self.extremes(next - width, next);
                    self.build(&self.totals, next - width, next, Some(&extremes))?
                }
            };
            self.last_end = Some(next);
            let empty = batch.num_rows() == 0;
            // A tumbling window without data does not exist. A sliding window
            // that became empty is emitted once, so rankings lose stale rows.
            let sliding = matches!(self.kind, WindowKind::Hop { .. });
            if !empty || (sliding && !self.last_emission_empty) {
                out.push((next, batch));
            }
            self.last_emission_empty = empty;
        }
        Ok(out)
    }

    /// Min/max over the buckets of a window, per key (they cannot be kept as running totals).
    fn extremes(&self, start: i64, end: i64) -> HashMap<(u32, usize), f64> {
        let mut out = HashMap::default();
        for (a, spec) in self.aggregates.iter().enumerate() {
            if !matches!(spec.kind, AggKind::Min | AggKind::Max) {
                continue;
            }
            for partials in self.buckets.range(start..end).map(|(_, p)| p) {
                let Column::Extreme(v, n) = &partials.columns[a] else {
                    continue;
                };
                for (i, key) in partials.keys.iter().enumerate() {
                    if n[i] == 0 {
                        continue;
                    }
                    let slot = out.entry((*key, a)).or_insert(v[i]);
                    if (spec.kind == AggKind::Min && v[i] < *slot)
                        || (spec.kind == AggKind::Max && v[i] > *slot)
                    {
                        *slot = v[i];
                    }
                }
            }
        }
        out
    }

    fn empty_batch(&self) -> RecordBatch {
        RecordBatch::new_empty(self.output_schema.clone())
    }

    /// One window's rows: keys, the window struct, then the aggregates.
    fn build(
        &self,
        partials: &Partials,
        start: i64,
        end: i64,
        extremes: Option<&HashMap<(u32, usize), f64>>,
    ) -> Result<RecordBatch, ArrowError> {
        let live: Vec<usize> = (0..partials.len())
            .filter(|&i| partials.rows[i] > 0)
            .collect();
        let parser = self.key_converter.parser();
        let rows = live
            .iter()
            .map(|&i| parser.parse(&self.keys.bytes[partials.keys[i] as usize]));
        let key_columns = self.key_converter.convert_rows(rows)?;
        let n = live.len();
        let time_field = |name: &str| {
            Field::new(
                name,
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            )
        };
        let window: ArrayRef = Arc::new(StructArray::from(vec![
            (
                Arc::new(time_field("start")),
                Arc::new(TimestampMicrosecondArray::from(vec![start; n]).with_timezone("UTC"))
                    as ArrayRef,
            ),
            (
                Arc::new(time_field("end")),
                Arc::new(TimestampMicrosecondArray::from(vec![end; n]).with_timezone("UTC"))
                    as ArrayRef,
            ),
        ]));
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.output_schema.fields().len());
        let mut keys = key_columns.into_iter();
        for position in 0..self.key_count + 1 {
            if position == self.window_position {
                columns.push(window.clone());
            } else {
                columns.push(keys.next().expect("one column per key"));
            }
        }
        for (a, spec) in self.aggregates.iter().enumerate() {
            let values: ArrayRef =
                match &partials.columns[a] {
                    Column::Count(v) => {
                        Arc::new(Int64Array::from_iter_values(live.iter().map(|&i| v[i])))
                    }
                    Column::Sum(s, c) => Arc::new(Float64Array::from_iter(live.iter().map(|&i| {
                        (c[i] > 0).then(|| {
                            if spec.kind == AggKind::Avg {
                                s[i] / c[i] as f64
                            } else {
                                s[i]
                            }
                        })
                    }))),
                    Column::DecimalSum(s, c) => {
                        decimal_result(spec, live.iter().map(|&i| (s[i], c[i])))?
                    }
                    Column::Extreme(v, c) => Arc::new(Float64Array::from_iter(live.iter().map(
                        |&i| match extremes {
                            Some(map) => map.get(&(partials.keys[i], a)).copied(),
                            None => (c[i] > 0).then_some(v[i]),
                        },
                    ))),
                    Column::Distinct(maps) if spec.kind == AggKind::Udaf => {
                        self.udaf_results(a, spec, maps, &live, start, end)?
                    }
                    Column::Distinct(maps) => Arc::new(Int64Array::from_iter_values(
                        live.iter().map(|&i| maps[i].len() as i64),
                    )),
                };
            columns.push(cast(&values, &spec.output_type)?);
        }
        let columns = columns
            .into_iter()
            .zip(self.output_schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c)
                } else {
                    cast(&c, f.data_type())
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(self.output_schema.clone(), columns)
    }

    /// A UDAF's result per entry in `live`: one call per entry over its
    /// values, in the order of their row encoding (so a restored state gives
    /// the same result). A call that panics gives NULL, with a warning.
    fn udaf_results(
        &self,
        a: usize,
        spec: &AggSpec,
        maps: &[HashMap<Box<[u8]>, i64>],
        live: &[usize],
        start: i64,
        end: i64,
    ) -> Result<ArrayRef, ArrowError> {
        let udf = &spec.udaf.as_ref().expect("a UDAF spec names its UDAF").0;
        let converter = self.distinct_converters[a]
            .as_ref()
            .expect("a UDAF has a value converter");
        let parser = converter.parser();
        let mut results = Vec::with_capacity(live.len());
        for &i in live {
            let mut values: Vec<(&[u8], i64)> =
                maps[i].iter().map(|(v, n)| (v.as_ref(), *n)).collect();
            values.sort_unstable();
            let rows = values.iter().flat_map(|(bytes, count)| {
                std::iter::repeat_n(parser.parse(bytes), (*count).max(0) as usize)
            });
            let column = converter.convert_rows(rows)?.remove(0);
            match crate::udf::functions::call_aggregate(udf, column) {
                Ok(result) => results.push(result),
                Err(e) if crate::udf::UdfPanicked::find(&e).is_some() => {
                    tracing::warn!(
                        udf = udf.name(),
                        window_start = start,
                        window_end = end,
                        "a UDAF panicked on one group of a window: its result is NULL"
                    );
                    results.push(arrow::array::new_null_array(&spec.output_type, 1));
                }
                Err(e) => return Err(ArrowError::ExternalError(Box::new(e))),
            }
        }
        if results.is_empty() {
            return Ok(arrow::array::new_empty_array(&spec.output_type));
        }
        let results = results
            .iter()
            .map(|r| cast(r, &spec.output_type))
            .collect::<Result<Vec<_>, _>>()?;
        let parts: Vec<&dyn Array> = results.iter().map(|r| r.as_ref()).collect();
        arrow::compute::concat(&parts)
    }

    /// The state as a batch (bucket, key, rows, then accumulators), for checkpoints.
    pub fn snapshot(&self) -> Result<(RecordBatch, WindowMeta), ArrowError> {
        self.snapshot_of(self.buckets.iter())
    }

    /// For a checkpoint: the whole state, or only the buckets changed since
    /// the last call (a layer over the snapshots before it; see the module
    /// docs). Either way, changes are counted afresh from here.
    pub fn snapshot_changes(
        &mut self,
        whole: bool,
    ) -> Result<(RecordBatch, WindowMeta), ArrowError> {
        let snapshot = if whole {
            self.snapshot()
        } else {
            let changed = self
                .changed
                .iter()
                .filter_map(|b| self.buckets.get_key_value(b));
            self.snapshot_of(changed)
        };
        self.changed.clear();
        self.last_changed = None;
        snapshot
    }

    fn snapshot_of<'a>(
        &self,
        selected: impl Iterator<Item = (&'a i64, &'a Partials)>,
    ) -> Result<(RecordBatch, WindowMeta), ArrowError> {
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
        let mut buckets = Vec::new();
        let mut keys = BinaryBuilder::new();
        let mut rows = Vec::new();
        let mut accumulators: Vec<(Vec<f64>, Vec<i64>, BinaryBuilder)> = self
            .aggregates
            .iter()
            .map(|_| (Vec::new(), Vec::new(), BinaryBuilder::new()))
            .collect();
        for (bucket, partials) in selected {
            for i in 0..partials.len() {
                buckets.push(*bucket);
                keys.append_value(&self.keys.bytes[partials.keys[i] as usize]);
                rows.push(partials.rows[i]);
                for (column, (v, n, d)) in partials.columns.iter().zip(&mut accumulators) {
                    let (value, count, distinct) = match column {
                        Column::Count(c) => (0.0, c[i], Vec::new()),
                        Column::Sum(s, c) | Column::Extreme(s, c) => (s[i], c[i], Vec::new()),
                        Column::DecimalSum(s, c) => (0.0, c[i], s[i].to_le_bytes().to_vec()),
                        Column::Distinct(maps) => (0.0, 0, encode_distinct(&maps[i])),
                    };
                    v.push(value);
                    n.push(count);
                    d.append_value(distinct);
                }
            }
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(buckets)),
            Arc::new(keys.finish()),
            Arc::new(Int64Array::from(rows)),
        ];
        for (v, n, mut d) in accumulators {
            columns.push(Arc::new(Float64Array::from(v)));
            columns.push(Arc::new(Int64Array::from(n)));
            columns.push(Arc::new(d.finish()));
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        let meta = WindowMeta {
            last_end: self.last_end,
            last_emission_empty: self.last_emission_empty,
            max_event_time: self.max_event_time,
        };
        Ok((batch, meta))
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
                    Column::Distinct(maps) => maps[i] = decode_distinct(d),
                }
            }
        }
        Ok(())
    }
}

fn merge_into(totals: &mut Partials, bucket: &Partials, sign: i64) {
    for j in 0..bucket.len() {
        let (i, _) = totals.entry(bucket.keys[j]);
        totals.merge(i, bucket, j, sign);
    }
}

/// Drops entries no row contributes to any more.
fn compact(partials: &mut Partials) {
    if partials.rows.iter().all(|&r| r > 0) {
        return;
    }
    let keep: Vec<usize> = (0..partials.len())
        .filter(|&i| partials.rows[i] > 0)
        .collect();
    let mut next = Partials {
        columns: partials
            .columns
            .iter()
            .map(|c| match c {
                Column::Count(_) => Column::Count(Vec::new()),
                Column::Sum(_, _) => Column::Sum(Vec::new(), Vec::new()),
                Column::DecimalSum(_, _) => Column::DecimalSum(Vec::new(), Vec::new()),
                Column::Extreme(_, _) => Column::Extreme(Vec::new(), Vec::new()),
                Column::Distinct(_) => Column::Distinct(Vec::new()),
            })
            .collect(),
        ..Partials::default()
    };
    for i in keep {
        let (k, _) = next.entry(partials.keys[i]);
        next.rows[k] = partials.rows[i];
        for (mine, theirs) in next.columns.iter_mut().zip(&mut partials.columns) {
            match (mine, theirs) {
                (Column::Count(a), Column::Count(b)) => a[k] = b[i],
                (Column::Sum(a, c), Column::Sum(b, d))
                | (Column::Extreme(a, c), Column::Extreme(b, d)) => {
                    a[k] = b[i];
                    c[k] = d[i];
                }
                (Column::DecimalSum(a, c), Column::DecimalSum(b, d)) => {
                    a[k] = b[i];
                    c[k] = d[i];
                }
                (Column::Distinct(a), Column::Distinct(b)) => a[k] = std::mem::take(&mut b[i]),
                _ => unreachable!("same aggregates"),
            }
        }
    }
    *partials = next;
}

/// A decimal sum or average per entry, from exact sums at the argument's
/// scale and counts: an average is truncated at the output's scale, as
/// DataFusion's own `avg` of decimals does.
fn decimal_result(
    spec: &AggSpec,
    entries: impl Iterator<Item = (i128, i64)>,
) -> Result<ArrayRef, ArrowError> {
    let scale = spec.decimal_scale.expect("a decimal sum");
    let (out_scale, average) = match (&spec.output_type, spec.kind) {
        (&DataType::Decimal128(_, out), AggKind::Avg) => (out.max(scale), true),
        _ => (scale, false),
    };
    let factor = 10i128.pow(u32::try_from(out_scale - scale).unwrap_or(0));
    let values = entries
        .map(|(sum, count)| {
            if count <= 0 {
                return Ok(None);
            }
            if !average {
                return Ok(Some(sum));
            }
            sum.checked_mul(factor)
                .map(|scaled| Some(scaled / i128::from(count)))
                .ok_or_else(|| {
                    ArrowError::ComputeError("decimal average overflows 38 digits".into())
                })
        })
        .collect::<Result<Decimal128Array, ArrowError>>()?;
    Ok(Arc::new(values.with_precision_and_scale(38, out_scale)?))
}

/// `len:u32 bytes count:i64` repeated.
fn encode_distinct(map: &HashMap<Box<[u8]>, i64>) -> Vec<u8> {
    let mut out = Vec::new();
    for (value, count) in map {
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
        out.extend_from_slice(&count.to_le_bytes());
    }
    out
}

fn decode_distinct(mut bytes: &[u8]) -> HashMap<Box<[u8]>, i64> {
    let mut map = HashMap::default();
    while bytes.len() >= 4 {
        let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        if bytes.len() < 4 + len + 8 {
            break;
        }
        let value: Box<[u8]> = bytes[4..4 + len].into();
        let count = i64::from_le_bytes(bytes[4 + len..12 + len].try_into().expect("8 bytes"));
        map.insert(value, count);
        bytes = &bytes[12 + len..];
    }
    map
}

#[cfg(test)]
mod tests;
