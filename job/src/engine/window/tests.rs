//! Unit tests of window state: sliding totals, expiry, retraction, restore.
use super::*;
use crate::sql::plan::BatchTable;
use crate::sql::window::window_type;
use arrow::array::StringArray;
use datafusion::logical_expr::{EmptyRelation, LogicalPlan};

const SECOND: i64 = 1_000_000;

/// key (Utf8), time, value (Float64) -> sum(value) per key, over `kind`.
fn state(kind: WindowKind) -> (WindowState, SchemaRef) {
    let pre = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, true),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("value", DataType::Float64, true),
    ]));
    let output = Arc::new(Schema::new(vec![
        Field::new("c0", DataType::Utf8, true),
        Field::new("c1", window_type(), true),
        Field::new("c2", DataType::Float64, true),
    ]));
    let plan = WindowedAggregate {
        kind,
        pre_plan: LogicalPlan::EmptyRelation(EmptyRelation {
            produce_one_row: false,
            schema: Arc::new(datafusion::common::DFSchema::empty()),
        }),
        key_count: 1,
        time_column: 1,
        window_position: 1,
        aggregates: vec![AggSpec {
            kind: AggKind::Sum,
            argument: Some(2),
            filter: None,
            output_type: DataType::Float64,
        }],
        output_schema: output.clone(),
        table: Arc::new(BatchTable::new(output.clone())),
    };
    (WindowState::new(&plan, &pre).unwrap(), pre)
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

#[test]
fn a_restored_snapshot_emits_what_the_original_would() {
    let (mut original, schema) = state(WindowKind::Hop {
        slide: SECOND,
        width: 4 * SECOND,
    });
    original
        .accumulate(
            &rows(
                &schema,
                &[("a", 0, 1.0), ("b", SECOND, 2.0), ("a", 3 * SECOND, 3.0)],
            ),
            1,
            None,
        )
        .unwrap();
    original.emit_until(2 * SECOND).unwrap();
    let (snapshot, meta) = original.snapshot().unwrap();
    let (mut restored, _) = state(WindowKind::Hop {
        slide: SECOND,
        width: 4 * SECOND,
    });
    restored.restore(&[snapshot], &meta).unwrap();
    let more = rows(&schema, &[("b", 4 * SECOND, 5.0)]);
    original.accumulate(&more, 1, None).unwrap();
    restored.accumulate(&more, 1, None).unwrap();
    assert_eq!(
        sums(restored.emit_until(9 * SECOND).unwrap()),
        sums(original.emit_until(9 * SECOND).unwrap())
    );
}
