//! Partial aggregates: the accumulators of one bucket (or of the running
//! totals) per group key, and how rows and other partials add into them.

// Group keys, entry indexes and distinct values are hashed for every input
// row of every window: foldhash (seeded per process, as DataFusion's own hash
// tables are) costs a fraction of std's SipHash on such short keys.
use foldhash::HashMap;

use arrow::array::{Array, BooleanArray, Decimal128Array, Float64Array};

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
    Distinct(Vec<HashMap<Box<[u8]>, i64>>),
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
                    // A UDAF keeps its values as count(DISTINCT) does: a multiset.
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
    pub(super) distinct: &'a [Option<arrow::row::Rows>],
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
