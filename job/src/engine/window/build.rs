//! A window's rows at emission: keys, the window struct, then each
//! aggregate's value (UDAFs called over their values in a fixed order).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Decimal128Array, Float64Array, Int64Array, StructArray,
    TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use foldhash::HashMap;

use super::partials::{self, Column, Partials};
use super::WindowState;
use crate::sql::window::{AggKind, AggSpec};

impl WindowState {
    /// Min/max over the buckets of a window, per key (they cannot be kept as running totals).
    pub(super) fn extremes(&self, start: i64, end: i64) -> HashMap<(u32, usize), f64> {
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

    pub(super) fn empty_batch(&self) -> RecordBatch {
        RecordBatch::new_empty(self.output_schema.clone())
    }

    /// One window's rows: keys, the window struct, then the aggregates.
    pub(super) fn build(
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
                        let converter = self.distinct_converters[a]
                            .as_ref()
                            .expect("a UDAF has a value converter");
                        let parser = converter.parser();
                        let dictionary = self.distinct.lock();
                        self.udaf_results(spec, &live, start, end, |i| {
                            let mut values: Vec<(&[u8], i64)> = maps[i]
                                .iter()
                                .map(|(id, n)| (dictionary.value(*id), *n))
                                .collect();
                            values.sort_unstable();
                            let rows = values.iter().flat_map(|(bytes, count)| {
                                std::iter::repeat_n(parser.parse(bytes), (*count).max(0) as usize)
                            });
                            Ok(converter.convert_rows(rows)?.remove(0))
                        })?
                    }
                    Column::Values(maps, nulls) => {
                        let data_type = partials::fixed_width(spec).expect("kept as bits");
                        self.udaf_results(spec, &live, start, end, |i| {
                            let mut values: Vec<(u64, i64)> =
                                maps[i].iter().map(|(v, n)| (*v, *n)).collect();
                            values.sort_unstable();
                            let bits: Vec<u64> = values
                                .iter()
                                .flat_map(|(v, n)| std::iter::repeat_n(*v, (*n).max(0) as usize))
                                .collect();
                            partials::from_bits(&bits, nulls[i].max(0) as usize, &data_type)
                        })?
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
    /// values (`values_of(entry)`, in a fixed order, so a restored state
    /// gives the same result). A call that panics gives NULL, with a warning.
    fn udaf_results(
        &self,
        spec: &AggSpec,
        live: &[usize],
        start: i64,
        end: i64,
        values_of: impl Fn(usize) -> Result<ArrayRef, ArrowError>,
    ) -> Result<ArrayRef, ArrowError> {
        let udf = &spec.udaf.as_ref().expect("a UDAF spec names its UDAF").0;
        let mut results = Vec::with_capacity(live.len());
        for &i in live {
            let column = values_of(i)?;
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
