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
//! store small integer ids and flat accumulator columns. Distinct values
//! (`count(DISTINCT ..)`, and UDAF arguments wider than 64 bits) are ids of a
//! dictionary all states of a job share (`distinct.rs`).
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
//!
//! # Files
//!
//! This file holds the state, its accumulation and which windows close;
//! `build.rs` a closed window's rows; `partials.rs` the accumulators of a
//! bucket; `distinct.rs` the shared distinct values; `snapshot.rs` the
//! checkpoint encoding.

use std::collections::{BTreeMap, BTreeSet};

// Group keys, entry indexes and distinct values are hashed for every input
// row of every window: foldhash (seeded per process, as DataFusion's own hash
// tables are) costs a fraction of std's SipHash on such short keys.
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BooleanArray, Decimal128Array, Float64Array, TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::Decimal128Type;
use arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};

mod build;
mod distinct;
mod partials;
mod snapshot;

pub use distinct::DistinctValues;

use crate::sql::window::{AggKind, AggSpec, WindowKind, WindowedAggregate};
use partials::{compact, merge_into, Column, Keys, Partials, RowValues};

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
    distinct: DistinctValues,
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
    #[cfg(test)]
    pub fn new(plan: &WindowedAggregate, pre_schema: &Schema) -> Result<WindowState, ArrowError> {
        WindowState::sharing(plan, pre_schema, DistinctValues::default())
    }

    /// A state whose distinct values are ids of `distinct`, which the
    /// caller shares among its states and collects
    /// ([`WindowState::mark_distinct`]).
    pub fn sharing(
        plan: &WindowedAggregate,
        pre_schema: &Schema,
        distinct: DistinctValues,
    ) -> Result<WindowState, ArrowError> {
        let key_fields = (0..plan.key_count)
            .map(|i| SortField::new(pre_schema.field(i).data_type().clone()))
            .collect();
        let distinct_converters = plan
            .aggregates
            .iter()
            .map(|a| match (a.kind, a.argument) {
                (AggKind::Udaf, _) if partials::fixed_width(a).is_some() => Ok(None),
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
            distinct,
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
        self.accumulate_above(batch, sign, late_before, None)
    }

    /// [`WindowState::accumulate`], where rows of either sign before `floor`
    /// that would open a bucket count as closed (late, or expired
    /// retractions): for a state that has emitted nothing yet, which has no
    /// closed windows to tell it so. An update of a days-old row would
    /// otherwise open buckets that days of windows would then be emitted
    /// from; a retraction of a row the state holds still takes it back.
    pub fn accumulate_above(
        &mut self,
        batch: &RecordBatch,
        sign: i64,
        late_before: Option<i64>,
        floor: Option<i64>,
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
        let distinct: Vec<Option<Arc<[u32]>>> = {
            let mut dictionary = self.distinct.lock();
            self.aggregates
                .iter()
                .zip(&self.distinct_converters)
                .map(|(a, converter)| match (converter, a.argument) {
                    (Some(converter), Some(arg)) => {
                        let keep_nulls = a.kind == AggKind::Udaf;
                        let array = batch.column(arg);
                        dictionary.ids(converter, array, keep_nulls).map(Some)
                    }
                    _ => Ok(None),
                })
                .collect::<Result<_, ArrowError>>()?
        };
        let bits: Vec<Option<arrow::array::UInt64Array>> = self
            .aggregates
            .iter()
            .map(|a| match (partials::fixed_width(a), a.argument) {
                (Some(data_type), Some(arg)) => cast(batch.column(arg), &data_type)
                    .and_then(|c| partials::to_bits(&c))
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
        // A global aggregate (grouped by the window only) has one empty key.
        let global_key = (self.key_count == 0).then(|| self.keys.intern(&[]));
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
            if self.last_end.is_some_and(|end| bucket + width <= end)
                || floor.is_some_and(|floor| time < floor && !self.buckets.contains_key(&bucket))
            {
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
            let key = match global_key {
                Some(key) => key,
                None => self.keys.intern(keys.row(row).data()),
            };
            let values = RowValues {
                numbers: &numbers,
                decimals: &decimals,
                distinct: &distinct,
                bits: &bits,
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

    /// Reports every distinct-value id the state holds, for a collection
    /// of its dictionary.
    pub fn mark_distinct(&self, mark: &mut dyn FnMut(u32)) {
        for partials in self.buckets.values().chain([&self.totals]) {
            for column in &partials.columns {
                if let Column::Distinct(maps) = column {
                    maps.iter().flat_map(|m| m.keys()).for_each(|&id| mark(id));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
