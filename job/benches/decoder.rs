//! Pure decoder throughput: pgoutput Insert messages decoded and appended to
//! Arrow builders (batches of 8192 rows), no network, no job SQL. Prints rows
//! per second (min / median / max of 7 runs) for a row of the mission's shape
//! and for a row with a decimal, an interval and a 10-element text array.
//!
//!     cargo bench -p engage --bench decoder
//!
//! It uses only the decoder's public API, so the same file measures an older
//! commit too (for the mission row, whose types every version has).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use engage::change::Op;
use engage::change::Position;
use engage::source::pgoutput::{decode, Message, TableDecoder};

const ROWS: usize = 1_000_000;
const BATCH_ROWS: usize = 8192;
const RUNS: usize = 7;

fn relation_message(columns: &[&str]) -> Vec<u8> {
    let mut out = vec![b'R'];
    out.extend(1u32.to_be_bytes());
    out.extend(b"public\0t\0f");
    out.extend((columns.len() as i16).to_be_bytes());
    for name in columns {
        out.push(0);
        out.extend(name.as_bytes());
        out.push(0);
        out.extend(25u32.to_be_bytes());
        out.extend((-1i32).to_be_bytes());
    }
    out
}

fn insert_message(values: &[String]) -> Vec<u8> {
    let mut out = vec![b'I'];
    out.extend(1u32.to_be_bytes());
    out.push(b'N');
    out.extend((values.len() as i16).to_be_bytes());
    for value in values {
        out.push(b't');
        out.extend((value.len() as i32).to_be_bytes());
        out.extend(value.as_bytes());
    }
    out
}

/// 1024 distinct messages, cycled: the decoder sees varied values without
/// the benchmark spending its time building them.
struct Case {
    name: &'static str,
    schema: Schema,
    messages: Vec<Vec<u8>>,
}

fn mission_case() -> Case {
    let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("content_id", DataType::Utf8, true),
        Field::new("user_id", DataType::Utf8, true),
        Field::new("event_type", DataType::Utf8, true),
        Field::new("event_ts", utc, true),
        Field::new("duration_ms", DataType::Int32, true),
        Field::new("device", DataType::Utf8, true),
        Field::new("raw_payload", DataType::Utf8, true),
    ]);
    let messages = (0..1024)
        .map(|i: u64| {
            insert_message(&[
                (1_000_000 + i).to_string(),
                format!("6f1c2d3e-4b5a-4c6d-8e7f-{:012x}", i * 7919),
                format!("user-{}", i % 5000),
                ["play", "pause", "finish", "click"][i as usize % 4].to_string(),
                format!(
                    "2026-11-29 10:{:02}:{:02}.{:06}+00",
                    i % 60,
                    (i * 7) % 60,
                    i * 997 % 1_000_000
                ),
                (i * 1237 % 600_000).to_string(),
                ["ios", "android", "web-chrome", "tv"][i as usize % 4].to_string(),
                format!("{{\"session\": \"s-{i}\", \"position_ms\": {}}}", i * 31),
            ])
        })
        .collect();
    Case {
        name: "mission row (8 columns)",
        schema,
        messages,
    }
}

fn new_types_case() -> Case {
    let list = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("price", DataType::Decimal128(12, 2), true),
        Field::new(
            "span",
            DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
            true,
        ),
        Field::new("tags", list, true),
    ]);
    let messages = (0..1024)
        .map(|i: u64| {
            let tags: Vec<String> = (0..10)
                .map(|t| {
                    if t % 3 == 0 {
                        format!("\"tag {i}-{t}\"")
                    } else {
                        format!("tag{t}")
                    }
                })
                .collect();
            insert_message(&[
                (1_000_000 + i).to_string(),
                format!("{}.{:02}", i * 37, i % 100),
                format!(
                    "P{}DT{}H{}M{}.{:06}S",
                    i % 30,
                    i % 24,
                    i % 60,
                    i % 60,
                    i * 31 % 1_000_000
                ),
                format!("{{{}}}", tags.join(",")),
            ])
        })
        .collect();
    Case {
        name: "id + decimal + interval + 10-element text array",
        schema,
        messages,
    }
}

/// Rows per second of one run over `ROWS` rows.
fn run(case: &Case) -> f64 {
    let names: Vec<&str> = case
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    let mut decoder = TableDecoder::new("t", Arc::new(case.schema.clone())).unwrap();
    let relation = relation_message(&names);
    let Message::Relation(relation) = decode(&relation).unwrap() else {
        panic!("a relation message");
    };
    decoder.set_relation(&relation).unwrap();
    let start = Instant::now();
    for row in 0..ROWS {
        let message = &case.messages[row % case.messages.len()];
        let Message::Insert { new, .. } = decode(message).unwrap() else {
            panic!("an insert message");
        };
        decoder
            .append(Op::Insert, &new, None, Position::new(1, row as u64), 0)
            .unwrap();
        if decoder.len() == BATCH_ROWS {
            black_box(decoder.finish());
        }
    }
    black_box(decoder.finish());
    ROWS as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    for case in [mission_case(), new_types_case()] {
        if only.as_deref().is_some_and(|o| !case.name.contains(o)) {
            continue;
        }
        run(&case); // warm-up
        let mut rates: Vec<f64> = (0..RUNS).map(|_| run(&case)).collect();
        rates.sort_by(f64::total_cmp);
        println!(
            "decoder: {:<48} rows/s min {:>10.0}  median {:>10.0}  max {:>10.0}  ({RUNS} runs of {ROWS} rows)",
            case.name,
            rates[0],
            rates[RUNS / 2],
            rates[RUNS - 1]
        );
    }
}
