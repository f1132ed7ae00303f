//! Unit tests of window state: sliding totals, expiry, retraction, restore.
use super::*;
use crate::checkpoint::WindowMeta;
use crate::sql::plan::BatchTable;
use crate::sql::window::window_type;
use arrow::array::StringArray;
use arrow::datatypes::Field;
use datafusion::logical_expr::{EmptyRelation, LogicalPlan};

const SECOND: i64 = 1_000_000;

/// Window state over `kind`, grouped by a key: the pre-plan's columns are
/// `key` (Utf8), `time`, then `values`; the output is the key, the window,
/// then one column per aggregate (`outputs`).
fn window_state(
    kind: WindowKind,
    values: Vec<Field>,
    aggregates: Vec<AggSpec>,
    outputs: Vec<Field>,
) -> (WindowState, SchemaRef) {
    window_state_sharing(kind, values, aggregates, outputs, DistinctValues::default())
}

/// [`window_state`], with distinct values kept in `distinct`.
fn window_state_sharing(
    kind: WindowKind,
    values: Vec<Field>,
    aggregates: Vec<AggSpec>,
    outputs: Vec<Field>,
    distinct: DistinctValues,
) -> (WindowState, SchemaRef) {
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut pre = vec![
        Field::new("key", DataType::Utf8, true),
        Field::new("time", time, true),
    ];
    pre.extend(values);
    let pre = Arc::new(Schema::new(pre));
    let mut output = vec![
        Field::new("c0", DataType::Utf8, true),
        Field::new("c1", window_type(), true),
    ];
    output.extend(outputs);
    let output = Arc::new(Schema::new(output));
    let plan = WindowedAggregate {
        kind,
        pre_plan: LogicalPlan::EmptyRelation(EmptyRelation {
            produce_one_row: false,
            schema: Arc::new(datafusion::common::DFSchema::empty()),
        }),
        key_count: 1,
        time_column: 1,
        window_position: 1,
        aggregates,
        output_schema: output.clone(),
        table: Arc::new(BatchTable::new(output.clone())),
    };
    (WindowState::sharing(&plan, &pre, distinct).unwrap(), pre)
}

fn aggregate(kind: AggKind, argument: Option<usize>, output_type: DataType) -> AggSpec {
    AggSpec {
        udaf: None,
        decimal_scale: None,
        kind,
        argument,
        filter: None,
        output_type,
    }
}

/// key (Utf8), time, value (Float64) -> sum(value) per key, over `kind`.
fn state(kind: WindowKind) -> (WindowState, SchemaRef) {
    window_state(
        kind,
        vec![Field::new("value", DataType::Float64, true)],
        vec![aggregate(AggKind::Sum, Some(2), DataType::Float64)],
        vec![Field::new("c2", DataType::Float64, true)],
    )
}

fn rows(schema: &SchemaRef, rows: &[(&str, i64, f64)]) -> RecordBatch {
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(
                TimestampMicrosecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap()
}

/// (window end, key -> sum) of every emission.
fn sums(emitted: Vec<(i64, RecordBatch)>) -> Vec<(i64, Vec<(String, f64)>)> {
    emitted
        .into_iter()
        .map(|(end, batch)| {
            let keys = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            let values = batch
                .column(2)
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap();
            let mut out: Vec<_> = (0..batch.num_rows())
                .map(|i| (keys.value(i).to_string(), values.value(i)))
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            (end / SECOND, out)
        })
        .collect()
}

#[test]
fn hop_windows_slide_add_and_expire_buckets() {
    let (mut state, schema) = state(WindowKind::Hop {
        slide: SECOND,
        width: 3 * SECOND,
    });
    state
        .accumulate(
            &rows(
                &schema,
                &[
                    ("a", 0, 1.0),
                    ("b", SECOND, 2.0),
                    ("a", 2 * SECOND + 1, 4.0),
                ],
            ),
            1,
            None,
        )
        .unwrap();
    let emitted = sums(state.emit_until(5 * SECOND).unwrap());
    let a = |v: f64| ("a".to_string(), v);
    let b = |v: f64| ("b".to_string(), v);
    assert_eq!(
        emitted,
        vec![
            (1, vec![a(1.0)]),
            (2, vec![a(1.0), b(2.0)]),
            (3, vec![a(5.0), b(2.0)]),
            (4, vec![a(4.0), b(2.0)]),
            (5, vec![a(4.0)]),
        ]
    );
    // The last bucket leaves at 6; the empty window is emitted once, then nothing.
    assert_eq!(
        sums(state.emit_until(9 * SECOND).unwrap()),
        vec![(6, vec![])]
    );
}

#[test]
fn retractions_take_contributions_back_from_open_windows() {
    let (mut state, schema) = state(WindowKind::Hop {
        slide: SECOND,
        width: 3 * SECOND,
    });
    state
        .accumulate(
            &rows(&schema, &[("a", 0, 1.0), ("a", SECOND, 2.0)]),
            1,
            None,
        )
        .unwrap();
    state.emit_until(2 * SECOND).unwrap();
    state
        .accumulate(&rows(&schema, &[("a", 0, 1.0)]), -1, None)
        .unwrap();
    assert_eq!(
        sums(state.emit_until(3 * SECOND).unwrap()),
        vec![(3, vec![("a".into(), 2.0)])]
    );
}

#[test]
fn tumbling_windows_emit_once_and_skip_windows_without_data() {
    let (mut state, schema) = state(WindowKind::Tumble { width: 2 * SECOND });
    state
        .accumulate(
            &rows(&schema, &[("a", 0, 1.0), ("a", 7 * SECOND, 3.0)]),
            1,
            None,
        )
        .unwrap();
    let emitted = sums(state.emit_until(10 * SECOND).unwrap());
    assert_eq!(
        emitted,
        vec![(2, vec![("a".into(), 1.0)]), (8, vec![("a".into(), 3.0)])]
    );
    let late = state
        .accumulate(&rows(&schema, &[("a", SECOND, 1.0)]), 1, None)
        .unwrap();
    assert_eq!(late.late, 1, "a row for an emitted window is late");
}

/// A row of the four-aggregate state: key, time, value, user.
type Row<'a> = (&'a str, i64, Option<f64>, &'a str);

/// key, time, value, user -> count(*), count(DISTINCT user), sum(value),
/// avg(value) per key, over `kind`.
fn four_aggregates(kind: WindowKind) -> (WindowState, SchemaRef) {
    four_aggregates_sharing(kind, DistinctValues::default())
}

fn four_aggregates_sharing(kind: WindowKind, distinct: DistinctValues) -> (WindowState, SchemaRef) {
    window_state_sharing(
        kind,
        vec![
            Field::new("value", DataType::Float64, true),
            Field::new("user", DataType::Utf8, true),
        ],
        vec![
            aggregate(AggKind::Count, None, DataType::Int64),
            aggregate(AggKind::CountDistinct, Some(3), DataType::Int64),
            aggregate(AggKind::Sum, Some(2), DataType::Float64),
            aggregate(AggKind::Avg, Some(2), DataType::Float64),
        ],
        vec![
            Field::new("c2", DataType::Int64, true),
            Field::new("c3", DataType::Int64, true),
            Field::new("c4", DataType::Float64, true),
            Field::new("c5", DataType::Float64, true),
        ],
        distinct,
    )
}

fn four_rows(schema: &SchemaRef, rows: &[Row<'_>]) -> RecordBatch {
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(
                TimestampMicrosecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.3).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap()
}

/// Per key: count, distinct users, sum, avg.
type Figures = Vec<(String, i64, i64, Option<f64>, Option<f64>)>;

/// What the state emitted, as (window end in seconds, figures).
fn figures(emitted: Vec<(i64, RecordBatch)>) -> Vec<(i64, Figures)> {
    emitted
        .into_iter()
        .map(|(end, batch)| {
            use arrow::array::AsArray;
            use arrow::datatypes::{Float64Type, Int64Type};
            let column = |i: usize| batch.column(i).clone();
            let text = |i: usize| column(i).as_string::<i32>().clone();
            let int = |i: usize| column(i).as_primitive::<Int64Type>().clone();
            let float = |i: usize| column(i).as_primitive::<Float64Type>().clone();
            let (keys, count, distinct, sum, avg) = (text(0), int(2), int(3), float(4), float(5));
            let mut out: Figures = (0..batch.num_rows())
                .map(|i| {
                    let value = |a: &Float64Array| a.is_valid(i).then(|| a.value(i));
                    (
                        keys.value(i).to_string(),
                        count.value(i),
                        distinct.value(i),
                        value(&sum),
                        value(&avg),
                    )
                })
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            (end / SECOND, out)
        })
        .collect()
}

/// The reference: the figures of window `[end - width, end)` recomputed from
/// scratch over the rows still standing (every insert minus its retraction).
fn reference(standing: &[Row<'_>], end: i64, width: i64) -> Figures {
    let mut keys: Vec<&str> = standing.iter().map(|r| r.0).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|key| {
            let rows: Vec<&Row<'_>> = standing
                .iter()
                .filter(|r| r.0 == key && r.1 >= end - width && r.1 < end)
                .collect();
            if rows.is_empty() {
                return None;
            }
            let mut users: Vec<&str> = rows.iter().map(|r| r.3).collect();
            users.sort();
            users.dedup();
            let values: Vec<f64> = rows.iter().filter_map(|r| r.2).collect();
            let sum = (!values.is_empty()).then(|| values.iter().sum::<f64>());
            let avg = sum.map(|s| s / values.len() as f64);
            Some((
                key.to_string(),
                rows.len() as i64,
                users.len() as i64,
                sum,
                avg,
            ))
        })
        .collect()
}

#[test]
fn retractions_take_back_count_distinct_sum_and_avg() {
    let width = 3 * SECOND;
    let (mut state, schema) = four_aggregates(WindowKind::Hop {
        slide: SECOND,
        width,
    });
    let inserted: Vec<Row<'_>> = vec![
        ("a", 0, Some(1.0), "u1"),
        ("a", SECOND, Some(2.0), "u1"),
        ("a", SECOND, Some(4.0), "u2"),
        ("a", 2 * SECOND, None, "u3"),
        ("b", SECOND, Some(8.0), "u1"),
    ];
    state
        .accumulate(&four_rows(&schema, &inserted), 1, None)
        .unwrap();
    state.emit_until(2 * SECOND).unwrap();
    // u2's only row (its user leaves the distinct count), one of u1's two
    // rows (u1 stays), the NULL value (count drops, avg does not move), and
    // b's only row (b leaves the window).
    let retracted: Vec<Row<'_>> = vec![
        ("a", SECOND, Some(4.0), "u2"),
        ("a", 0, Some(1.0), "u1"),
        ("a", 2 * SECOND, None, "u3"),
        ("b", SECOND, Some(8.0), "u1"),
    ];
    state
        .accumulate(&four_rows(&schema, &retracted), -1, None)
        .unwrap();
    let standing: Vec<Row<'_>> = inserted
        .iter()
        .filter(|r| !retracted.contains(r))
        .copied()
        .collect();
    let emitted = figures(state.emit_until(4 * SECOND).unwrap());
    let expected: Vec<(i64, Figures)> = [3, 4]
        .into_iter()
        .map(|end| (end, reference(&standing, end * SECOND, width)))
        .collect();
    assert_eq!(emitted, expected);
    assert_eq!(
        expected[0].1,
        vec![("a".to_string(), 1, 1, Some(2.0), Some(2.0))]
    );
}

#[test]
fn a_restored_snapshot_emits_what_the_rows_say() {
    let kind = WindowKind::Hop {
        slide: SECOND,
        width: 4 * SECOND,
    };
    let (mut original, schema) = four_aggregates(kind);
    let before: Vec<Row<'_>> = vec![
        ("a", 0, Some(1.0), "u1"),
        ("b", SECOND, Some(2.0), "u2"),
        ("a", 3 * SECOND, Some(3.0), "u1"),
        ("a", 3 * SECOND, Some(5.0), "u3"),
    ];
    original
        .accumulate(&four_rows(&schema, &before), 1, None)
        .unwrap();
    original.emit_until(2 * SECOND).unwrap();
    let (snapshot, meta) = original.snapshot().unwrap();
    let (mut restored, _) = four_aggregates(kind);
    restored.restore(&[vec![snapshot]], &meta).unwrap();
    assert_eq!(restored.max_event_time(), Some(3 * SECOND));
    // After the restore: an insert, and a retraction of a row from before it.
    let after: Vec<Row<'_>> = vec![("b", 4 * SECOND, Some(5.0), "u2")];
    let retracted: Vec<Row<'_>> = vec![("a", 3 * SECOND, Some(5.0), "u3")];
    restored
        .accumulate(&four_rows(&schema, &after), 1, None)
        .unwrap();
    restored
        .accumulate(&four_rows(&schema, &retracted), -1, None)
        .unwrap();
    let standing: Vec<Row<'_>> = before
        .iter()
        .chain(&after)
        .filter(|r| !retracted.contains(r))
        .copied()
        .collect();
    // Windows ending 3..=9 s (empty windows compare as absent).
    let expected: Vec<(i64, Figures)> = (3..=9)
        .map(|end| (end, reference(&standing, end * SECOND, 4 * SECOND)))
        .collect();
    let emitted = figures(restored.emit_until(9 * SECOND).unwrap());
    let nonempty: Vec<&(i64, Figures)> = emitted.iter().filter(|(_, f)| !f.is_empty()).collect();
    let expected_nonempty: Vec<&(i64, Figures)> =
        expected.iter().filter(|(_, f)| !f.is_empty()).collect();
    assert_eq!(nonempty, expected_nonempty);
    assert_eq!(
        expected_nonempty.last().map(|(end, _)| *end),
        Some(8),
        "b's row at 4 s leaves after the window ending 8 s"
    );
}

/// key, time, price (Decimal128(12, 2)) -> sum(price), avg(price), tumbling 10 s.
fn decimal_state() -> (WindowState, SchemaRef) {
    let mut sum = aggregate(AggKind::Sum, Some(2), DataType::Decimal128(22, 2));
    sum.decimal_scale = Some(2);
    let mut avg = aggregate(AggKind::Avg, Some(2), DataType::Decimal128(16, 6));
    avg.decimal_scale = Some(2);
    window_state(
        WindowKind::Tumble { width: 10 * SECOND },
        vec![Field::new("price", DataType::Decimal128(12, 2), true)],
        vec![sum, avg],
        vec![
            Field::new("c2", DataType::Decimal128(22, 2), true),
            Field::new("c3", DataType::Decimal128(16, 6), true),
        ],
    )
}

#[test]
fn decimal_sums_and_averages_are_exact_through_retraction_and_restore() {
    let (mut state, schema) = decimal_state();
    let batch = |prices: &[Option<i128>]| {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a"; prices.len()])),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![SECOND; prices.len()])
                        .with_timezone("UTC"),
                ),
                Arc::new(
                    Decimal128Array::from(prices.to_vec())
                        .with_precision_and_scale(12, 2)
                        .unwrap(),
                ),
            ],
        )
        .unwrap()
    };
    // 0.10 three times and 9999999999.99: a double would not keep the cents.
    let prices = [Some(10), Some(10), Some(10), Some(999_999_999_999), None];
    state.accumulate(&batch(&prices), 1, None).unwrap();
    state.accumulate(&batch(&[Some(10)]), -1, None).unwrap();

    let (snapshot, meta) = state.snapshot().unwrap();
    let (mut restored, _) = decimal_state();
    restored.restore(&[vec![snapshot]], &meta).unwrap();

    for mut state in [state, restored] {
        let emitted = state.emit_until(10 * SECOND).unwrap();
        let window = &emitted[0].1;
        let sum = window.column(2).as_primitive::<Decimal128Type>();
        let avg = window.column(3).as_primitive::<Decimal128Type>();
        assert_eq!(sum.value_as_string(0), "10000000000.19");
        // (10000000000.19 / 3), truncated at scale 6 as DataFusion's avg does.
        assert_eq!(avg.value_as_string(0), "3333333333.396666");
    }
}

/// The state after `rows` went in, one batch at a time, each followed by
/// emission up to `watermarks` and a checkpoint: whole at the first, only
/// the changed buckets after. Restoring the layers gives the same state as
/// one whole snapshot of the original, and the two emit the same windows.
#[test]
fn layers_of_changed_buckets_restore_the_whole_state() {
    let hop = WindowKind::Hop {
        slide: SECOND,
        width: 4 * SECOND,
    };
    let tumble = WindowKind::Tumble { width: 2 * SECOND };
    for kind in [hop, tumble] {
        let (mut original, schema) = four_aggregates(kind);
        let steps: Vec<(Vec<Row<'_>>, i64, i64)> = vec![
            (
                vec![("a", 0, Some(1.0), "u1"), ("b", SECOND, Some(2.0), "u2")],
                1,
                0,
            ),
            (
                vec![
                    ("a", 2 * SECOND, Some(3.0), "u1"),
                    ("c", 3 * SECOND, Some(4.0), "u3"),
                ],
                1,
                2,
            ),
            // A retraction of an older row, then rows past the next windows.
            (vec![("b", SECOND, Some(2.0), "u2")], -1, 2),
            (
                vec![
                    ("a", 6 * SECOND, Some(5.0), "u1"),
                    ("d", 7 * SECOND, Some(6.0), "u4"),
                ],
                1,
                6,
            ),
            (vec![("d", 8 * SECOND, Some(7.0), "u4")], 1, 8),
        ];
        let mut layers = Vec::new();
        let mut meta = WindowMeta::default();
        for (i, (rows, sign, watermark)) in steps.iter().enumerate() {
            original
                .accumulate(&four_rows(&schema, rows), *sign, None)
                .unwrap();
            original.emit_until(watermark * SECOND).unwrap();
            let (layer, m) = original.snapshot_changes(i == 0).unwrap();
            layers.push(vec![layer]);
            meta = m;
        }
        // Later layers hold only what changed: fewer rows than the whole state.
        let (whole, _) = original.snapshot().unwrap();
        assert!(layers.last().unwrap()[0].num_rows() < whole.num_rows() || whole.num_rows() <= 1);
        let (mut restored, _) = four_aggregates(kind);
        restored.restore(&layers, &meta).unwrap();
        let (again, _) = restored.snapshot().unwrap();
        assert_eq!(again, whole, "{kind:?}");
        assert_eq!(
            figures(restored.emit_until(20 * SECOND).unwrap()),
            figures(original.emit_until(20 * SECOND).unwrap()),
            "{kind:?}"
        );
    }
}

/// Rows of [`four_aggregates`] with the users given as they are (NULL allowed),
/// all with value 1.0.
fn users_at(schema: &SchemaRef, key: &str, time: i64, users: &[Option<String>]) -> RecordBatch {
    let n = users.len();
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec![key; n])),
            Arc::new(TimestampMicrosecondArray::from(vec![time; n]).with_timezone("UTC")),
            Arc::new(Float64Array::from(vec![1.0; n])),
            Arc::new(StringArray::from(users.to_vec())),
        ],
    )
    .unwrap()
}

#[test]
fn count_distinct_does_not_count_null() {
    let (mut state, schema) = four_aggregates(WindowKind::Tumble { width: SECOND });
    let users = [Some("u1".to_string()), None, None, Some("u1".to_string())];
    state
        .accumulate(&users_at(&schema, "a", 0, &users), 1, None)
        .unwrap();
    let emitted = figures(state.emit_until(SECOND).unwrap());
    assert_eq!(
        emitted,
        vec![(1, vec![("a".to_string(), 4, 1, Some(4.0), Some(1.0))])]
    );
}

#[test]
fn states_sharing_distinct_values_count_right_across_a_collection() {
    let distinct = DistinctValues::default();
    let (mut minute, schema) =
        four_aggregates_sharing(WindowKind::Tumble { width: SECOND }, distinct.clone());
    let (mut ten, _) =
        four_aggregates_sharing(WindowKind::Tumble { width: 10 * SECOND }, distinct.clone());
    let user = |i: usize| Some(format!("user-{i:06}"));
    // 80,000 users in the first second (enough to make a collection pay),
    // fed to both states as one array, as two pre-plans projecting the
    // same column hand it over.
    let first = users_at(&schema, "a", 0, &(0..80_000).map(user).collect::<Vec<_>>());
    minute.accumulate(&first, 1, None).unwrap();
    ten.accumulate(&first, 1, None).unwrap();
    // The first second closes for `minute`: its bucket goes, but `ten` still
    // holds every one of those users, until half of them are retracted.
    assert_eq!(
        figures(minute.emit_until(SECOND).unwrap())[0].1[0].2,
        80_000
    );
    let retracted = users_at(&schema, "a", 0, &(0..40_000).map(user).collect::<Vec<_>>());
    ten.accumulate(&retracted, -1, None).unwrap();
    distinct.collect_unused([&minute, &ten]);
    assert_eq!(
        distinct.lock().len(),
        40_000,
        "the retracted users are freed"
    );
    // 40,000 new users (on the freed ids) and 20,000 old ones, later.
    let later: Vec<Option<String>> = (80_000..120_000).chain(60_000..80_000).map(user).collect();
    ten.accumulate(&users_at(&schema, "a", 5 * SECOND, &later), 1, None)
        .unwrap();
    // Standing: users 40,000..120,000, each once.
    let (snapshot, meta) = ten.snapshot().unwrap();
    let emitted = figures(ten.emit_until(10 * SECOND).unwrap());
    assert_eq!(emitted[0].1[0].1, 80_000 + 60_000 - 40_000);
    assert_eq!(emitted[0].1[0].2, 80_000);
    // The snapshot holds values, not ids: a state with its own dictionary
    // restores the same count.
    let (mut restored, _) = four_aggregates(WindowKind::Tumble { width: 10 * SECOND });
    restored.restore(&[vec![snapshot]], &meta).unwrap();
    assert_eq!(figures(restored.emit_until(10 * SECOND).unwrap()), emitted);
}

/// A checkpoint gets a large state in batches of at most 16,384 rows (or 4 MiB),
/// each encoded as it is built; restored from them, the state is the same.
#[test]
fn a_large_snapshot_comes_in_batches_that_restore_the_same_state() {
    let kind = WindowKind::Tumble { width: SECOND };
    let (mut original, schema) = four_aggregates(kind);
    let keys: Vec<String> = (0..40_000).map(|i| format!("k{i}")).collect();
    let rows: Vec<Row<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| (key.as_str(), (i % 2) as i64 * SECOND, Some(i as f64), "u"))
        .collect();
    original
        .accumulate(&four_rows(&schema, &rows), 1, None)
        .unwrap();
    assert_eq!(snapshot_in_batches(original, kind), [16_384, 16_384, 7_232]);
}

/// A batch of a snapshot also ends at 4 MiB of keys and encoded
/// accumulators: a `count(DISTINCT ..)` of a popular key holds every value
/// it counts, so few rows can be many bytes.
#[test]
fn a_snapshot_of_large_distinct_sets_comes_in_batches_of_bounded_bytes() {
    let kind = WindowKind::Tumble { width: SECOND };
    let (mut original, schema) = four_aggregates(kind);
    let users: Vec<String> = (0..150_000).map(|i| format!("u{i:06}")).collect();
    for key in ["a", "b", "c", "d"] {
        let rows: Vec<Row<'_>> = users
            .iter()
            .map(|user| (key, 0, Some(1.0), user.as_str()))
            .collect();
        original
            .accumulate(&four_rows(&schema, &rows), 1, None)
            .unwrap();
    }
    // About 2.7 MiB of distinct users per key: two keys pass 4 MiB.
    assert_eq!(snapshot_in_batches(original, kind), [2, 2]);
}

/// Snapshots `original` (of [`four_aggregates`] over `kind`) whole, a batch
/// at a time; checks that a state restored from those batches holds as
/// many entries and closes the same windows; returns the batches' sizes.
fn snapshot_in_batches(mut original: WindowState, kind: WindowKind) -> Vec<usize> {
    let mut batches = Vec::new();
    let meta = original
        .snapshot_changes_into(true, &mut |batch| {
            batches.push(batch);
            Ok(())
        })
        .unwrap();
    let sizes = batches.iter().map(RecordBatch::num_rows).collect();
    let (mut restored, _) = four_aggregates(kind);
    restored.restore(&[batches], &meta).unwrap();
    // Not the snapshots' bytes: a distinct set is encoded in its map's order.
    assert_eq!(restored.entries(), original.entries());
    assert_eq!(
        figures(restored.emit_until(3 * SECOND).unwrap()),
        figures(original.emit_until(3 * SECOND).unwrap()),
    );
    sizes
}
