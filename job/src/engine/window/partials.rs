//! Partial aggregates: the accumulators of one bucket (or of the running
//! totals) per group key, and how rows and other partials add into them.

// Group keys, entry indexes and distinct values are hashed for every input
// row of every window: foldhash (seeded per process, as DataFusion's own hash
// tables are) costs a fraction of std's SipHash on such short keys.
use foldhash::HashMap;

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Decimal128Array, Float64Array, UInt64Array,
};
use arrow::datatypes::DataType;
use arrow::error::ArrowError;

use crate::sql::window::{AggKind, AggSpec};

/// Accumulators of one aggregate for all entries of a bucket (or the totals).
#[derive(Debug, Clone)]
pub(super) enum Column {
    Count(Vec<i64>),
    /// Sum (also for avg) and the number of non-NULL values.
    Sum(Vec<f64>, Vec<i64>),
    /// Sum (also for avg) of a decimal argument, exact, as integers of the
    /// argument's scale, and the number of non-NULL values.
    DecimalSum(Vec<i128>, Vec<i64>),
    /// Min or max, and the number of values seen.
    Extreme(Vec<f64>, Vec<i64>),
    /// The multiset of distinct values, as ids of the job's
    /// [`DistinctValues`](super::distinct::DistinctValues), with their counts.
    Distinct(Vec<HashMap<u32, i64>>),
    /// A UDAF's values when its argument has a fixed width: the multiset of
    /// their bits (see [`to_bits`]), and the number of NULLs. A third of the
    /// memory of a [`Column::Distinct`] of the same values.
    Values(Vec<HashMap<u64, i64>>, Vec<i64>),
}

/// The argument type of a UDAF whose values fit in 64 bits (numbers,
/// booleans): kept as [`Column::Values`].
pub(super) fn fixed_width(spec: &AggSpec) -> Option<DataType> {
    let udf = &spec.udaf.as_ref()?.0;
    let data_type = udf.signature.args.first()?.data_type.to_arrow();
    (data_type.is_numeric() || data_type == DataType::Boolean).then_some(data_type)
}

/// `array` (of a [`fixed_width`] type) as the bits [`Column::Values`] keeps.
pub(super) fn to_bits(array: &ArrayRef) -> Result<UInt64Array, ArrowError> {
    use arrow::datatypes::*;
    Ok(match array.data_type() {
        DataType::Float64 => array.as_primitive::<Float64Type>().unary(|v| v.to_bits()),
        DataType::Float32 => array
            .as_primitive::<Float32Type>()
            .unary(|v| u64::from(v.to_bits())),
        DataType::Int8 => array.as_primitive::<Int8Type>().unary(|v| v as i64 as u64),
        DataType::Int16 => array.as_primitive::<Int16Type>().unary(|v| v as i64 as u64),
        DataType::Int32 => array.as_primitive::<Int32Type>().unary(|v| v as i64 as u64),
        DataType::Int64 => array.as_primitive::<Int64Type>().unary(|v| v as u64),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().unary(u64::from),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().unary(u64::from),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().unary(u64::from),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().clone(),
        DataType::Boolean => array
            .as_boolean()
            .iter()
            .map(|b| b.map(u64::from))
            .collect(),
        other => {
            return Err(ArrowError::InvalidArgumentError(format!(
                "a UDAF's values of type {other} are not kept as bits"
            )))
        }
    })
}

/// The values [`to_bits`] made, as an array of `data_type`, then `nulls` NULLs.
pub(super) fn from_bits(
    bits: &[u64],
    nulls: usize,
    data_type: &DataType,
) -> Result<ArrayRef, ArrowError> {
    use arrow::array::*;
    macro_rules! build {
        ($array:ty, $convert:expr) => {
            Arc::new(
                bits.iter()
                    .map(|&b| Some($convert(b)))
                    .chain(std::iter::repeat_n(None, nulls))
                    .collect::<$array>(),
            ) as ArrayRef
        };
    }
    Ok(match data_type {
        DataType::Float64 => build!(Float64Array, f64::from_bits),
        DataType::Float32 => build!(Float32Array, |b: u64| f32::from_bits(b as u32)),
        DataType::Int8 => build!(Int8Array, |b: u64| b as i64 as i8),
        DataType::Int16 => build!(Int16Array, |b: u64| b as i64 as i16),
        DataType::Int32 => build!(Int32Array, |b: u64| b as i64 as i32),
        DataType::Int64 => build!(Int64Array, |b: u64| b as i64),
        DataType::UInt8 => build!(UInt8Array, |b: u64| b as u8),
        DataType::UInt16 => build!(UInt16Array, |b: u64| b as u16),
        DataType::UInt32 => build!(UInt32Array, |b: u64| b as u32),
        DataType::UInt64 => build!(UInt64Array, |b: u64| b),
        DataType::Boolean => build!(BooleanArray, |b: u64| b != 0),
        other => {
            return Err(ArrowError::InvalidArgumentError(format!(
                "a UDAF's values of type {other} are not kept as bits"
            )))
        }
    })
}

/// Entries (one per key) of a bucket or of the running totals.
#[derive(Debug, Clone, Default)]
pub(super) struct Partials {
    pub(super) index: HashMap<u32, usize>,
    pub(super) keys: Vec<u32>,
    /// Rows contributing to each entry (inserts minus retractions).
    pub(super) rows: Vec<i64>,
    pub(super) columns: Vec<Column>,
}

impl Partials {
    pub(super) fn new(aggregates: &[AggSpec]) -> Partials {
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
                    AggKind::Udaf if fixed_width(a).is_some() => {
                        Column::Values(Vec::new(), Vec::new())
                    }
                    // Other UDAFs keep their values as count(DISTINCT) does:
                    // a multiset of interned row encodings.
                    AggKind::CountDistinct | AggKind::Udaf => Column::Distinct(Vec::new()),
                })
                .collect(),
            ..Partials::default()
        }
    }

    /// The entry of `key`, created empty if missing; the bool says whether it is new.
    pub(super) fn entry(&mut self, key: u32) -> (usize, bool) {
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
                Column::Values(v, n) => {
                    v.push(HashMap::default());
                    n.push(0);
                }
            }
        }
        (i, true)
    }

    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// Where one input row's values are, for [`Partials::add`].
pub(super) struct RowValues<'a> {
    pub(super) numbers: &'a [Option<Float64Array>],
    /// Decimal arguments of sums, at their own scale.
    pub(super) decimals: &'a [Option<Decimal128Array>],
    /// Distinct-value ids of the argument ([`super::distinct::NULL_ID`]
    /// for a NULL that is not counted).
    pub(super) distinct: &'a [Option<Arc<[u32]>>],
    /// A fixed-width UDAF argument's values as bits ([`to_bits`]).
    pub(super) bits: &'a [Option<UInt64Array>],
    pub(super) filters: &'a [Option<BooleanArray>],
    pub(super) row: usize,
}

impl Partials {
    /// Adds (sign +1) or retracts (sign -1) one row into entry `i`.
    pub(super) fn add(
        &mut self,
        i: usize,
        sign: i64,
        aggregates: &[AggSpec],
        values: &RowValues<'_>,
    ) {
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
                    if let Some(ids) = &values.distinct[a] {
                        let id = ids[values.row];
                        if id == super::distinct::NULL_ID {
                            continue;
                        }
                        let counts = &mut maps[i];
                        match counts.get_mut(&id) {
                            Some(count) => {
                                *count += sign;
                                if *count <= 0 {
                                    counts.remove(&id);
                                }
                            }
                            None if sign > 0 => {
                                counts.insert(id, sign);
                            }
                            None => {}
                        }
                    }
                }
                Column::Values(maps, nulls) => {
                    if let Some(bits) = &values.bits[a] {
                        if bits.is_null(values.row) {
                            nulls[i] += sign;
                            continue;
                        }
                        let value = bits.value(values.row);
                        let counts = &mut maps[i];
                        match counts.get_mut(&value) {
                            Some(count) => {
                                *count += sign;
                                if *count <= 0 {
                                    counts.remove(&value);
                                }
                            }
                            None if sign > 0 => {
                                counts.insert(value, sign);
                            }
                            None => {}
                        }
                    }
                }
            }
        }
    }

    /// Adds (sign +1) or subtracts (sign -1) entry `j` of `other` into entry `i`.
    pub(super) fn merge(&mut self, i: usize, other: &Partials, j: usize, sign: i64) {
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
                (Column::Values(maps, nulls), Column::Values(theirs, their_nulls)) => {
                    merge_counts(&mut maps[i], &theirs[j], sign);
                    nulls[i] += sign * their_nulls[j];
                }
                (Column::Distinct(maps), Column::Distinct(theirs)) => {
                    merge_counts(&mut maps[i], &theirs[j], sign);
                }
                _ => unreachable!("same aggregates"),
            }
        }
    }
}

/// Adds (sign +1) or subtracts (sign -1) the multiset `theirs` into `mine`.
fn merge_counts<K: Copy + Eq + std::hash::Hash>(
    mine: &mut HashMap<K, i64>,
    theirs: &HashMap<K, i64>,
    sign: i64,
) {
    for (value, count) in theirs {
        let entry = mine.entry(*value).or_insert(0);
        *entry += sign * count;
        if *entry <= 0 {
            mine.remove(value);
        }
    }
}

/// Interned group keys.
#[derive(Debug, Default)]
pub(super) struct Keys {
    pub(super) ids: HashMap<Box<[u8]>, u32>,
    pub(super) bytes: Vec<Box<[u8]>>,
}

impl Keys {
    pub(super) fn intern(&mut self, key: &[u8]) -> u32 {
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        let id = self.bytes.len() as u32;
        self.bytes.push(key.into());
        self.ids.insert(key.into(), id);
        id
    }
}

pub(super) fn merge_into(totals: &mut Partials, bucket: &Partials, sign: i64) {
    for j in 0..bucket.len() {
        let (i, _) = totals.entry(bucket.keys[j]);
        totals.merge(i, bucket, j, sign);
    }
}

/// Drops entries no row contributes to any more.
pub(super) fn compact(partials: &mut Partials) {
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
                Column::Values(_, _) => Column::Values(Vec::new(), Vec::new()),
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
                (Column::Values(a, c), Column::Values(b, d)) => {
                    a[k] = std::mem::take(&mut b[i]);
                    c[k] = d[i];
                }
                _ => unreachable!("same aggregates"),
            }
        }
    }
    *partials = next;
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int32Array};

    #[test]
    fn values_kept_as_bits_come_back_with_their_nulls_last() {
        let floats: ArrayRef = Arc::new(Float64Array::from(vec![Some(-1.5), None, Some(0.25)]));
        let bits = to_bits(&floats).unwrap();
        assert_eq!(bits.null_count(), 1);
        let kept: Vec<u64> = bits.iter().flatten().collect();
        let back = from_bits(&kept, 1, &DataType::Float64).unwrap();
        let want: ArrayRef = Arc::new(Float64Array::from(vec![Some(-1.5), Some(0.25), None]));
        assert_eq!(&back, &want);

        let ints: ArrayRef = Arc::new(Int32Array::from(vec![-7, 0, i32::MAX]));
        let kept: Vec<u64> = to_bits(&ints).unwrap().values().to_vec();
        assert_eq!(&from_bits(&kept, 0, &DataType::Int32).unwrap(), &ints);
    }
}
