//! Tests for the pgoutput decoder: messages are built with a small encoder that
//! follows the protocol documentation, then decoded and appended to batches.

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BooleanArray, Date32Array, Float64Array, Int64Array, StringArray,
    TimestampMicrosecondArray, TimestampNanosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, FixedOffset};
use proptest::prelude::*;

use super::table::{recycle, Cell};
use super::text::{parse_float, parse_int, parse_timestamp, to_unit};
use super::*;
use crate::change::Op;

mod types;

/// One value of a tuple to encode: null, unchanged TOAST, or text.
#[derive(Clone, Copy)]
enum V<'a> {
    N,
    U,
    T(&'a str),
    /// Text bytes that need not be UTF-8.
    B(&'a [u8]),
}

fn push_tuple(out: &mut Vec<u8>, values: &[V]) {
    out.extend((values.len() as i16).to_be_bytes());
    for value in values {
        match value {
            V::N => out.push(b'n'),
            V::U => out.push(b'u'),
            V::T(text) => {
                out.push(b't');
                out.extend((text.len() as i32).to_be_bytes());
                out.extend(text.as_bytes());
            }
            V::B(bytes) => {
                out.push(b't');
                out.extend((bytes.len() as i32).to_be_bytes());
                out.extend(*bytes);
            }
        }
    }
}

const REL: u32 = 16_384;

fn relation_message(columns: &[(&str, bool)]) -> Vec<u8> {
    let mut out = vec![b'R'];
    out.extend(REL.to_be_bytes());
    out.extend(b"public\0events\0d");
    out.extend((columns.len() as i16).to_be_bytes());
    for (name, key) in columns {
        out.push(u8::from(*key));
        out.extend(name.as_bytes());
        out.push(0);
        out.extend(25u32.to_be_bytes());
        out.extend((-1i32).to_be_bytes());
    }
    out
}

fn insert_message(new: &[V]) -> Vec<u8> {
    let mut out = vec![b'I'];
    out.extend(REL.to_be_bytes());
    out.push(b'N');
    push_tuple(&mut out, new);
    out
}

fn update_message(old: Option<(u8, &[V])>, new: &[V]) -> Vec<u8> {
    let mut out = vec![b'U'];
    out.extend(REL.to_be_bytes());
    if let Some((kind, old)) = old {
        out.push(kind);
        push_tuple(&mut out, old);
    }
    out.push(b'N');
    push_tuple(&mut out, new);
    out
}

fn delete_message(kind: u8, old: &[V]) -> Vec<u8> {
    let mut out = vec![b'D'];
    out.extend(REL.to_be_bytes());
    out.push(kind);
    push_tuple(&mut out, old);
    out
}

fn truncate_message(ids: &[u32], options: u8) -> Vec<u8> {
    let mut out = vec![b'T'];
    out.extend((ids.len() as u32).to_be_bytes());
    out.push(options);
    ids.iter().for_each(|id| out.extend(id.to_be_bytes()));
    out
}

fn relation(columns: &[(&str, bool)]) -> Relation {
    match decode(&relation_message(columns)).unwrap() {
        Message::Relation(relation) => relation,
        other => panic!("expected a relation, got {other:?}"),
    }
}

const COLUMNS: &[(&str, bool)] = &[("id", true), ("name", false), ("score", false)];

fn declared() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("score", DataType::Float64, true),
    ]))
}

fn decoder() -> TableDecoder {
    let mut decoder = TableDecoder::new("events", declared()).unwrap();
    decoder.set_relation(&relation(COLUMNS)).unwrap();
    decoder
}

/// Decodes a change message and appends it the way the replication loop does.
fn apply(decoder: &mut TableDecoder, bytes: &[u8], seq: u64) -> Result<(), DecodeError> {
    let position = Position::new(0x10, seq);
    match decode(bytes)? {
        Message::Insert { new, .. } => decoder.append(Op::Insert, &new, None, position, 0),
        Message::Update { old, new, .. } => {
            let old = old.as_ref().map(OldTuple::tuple);
            decoder.append(Op::Update, &new, old, position, 0)
        }
        Message::Delete { old, .. } => decoder.append(Op::Delete, old.tuple(), None, position, 0),
        other => panic!("expected a change, got {other:?}"),
    }
}

fn strings(batch: &RecordBatch, column: &str) -> Vec<Option<String>> {
    let array = batch.column_by_name(column).unwrap().as_string::<i32>();
    array.iter().map(|v| v.map(str::to_owned)).collect()
}

#[test]
fn relation_message_decodes_names_key_flags_and_types() {
    let relation = relation(COLUMNS);
    assert_eq!((relation.id, relation.namespace.as_str()), (REL, "public"));
    assert_eq!(
        (relation.name.as_str(), relation.replica_identity),
        ("events", b'd')
    );
    let names: Vec<_> = relation
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.is_key))
        .collect();
    assert_eq!(names, COLUMNS);
    assert_eq!(
        (
            relation.columns[0].type_oid,
            relation.columns[0].type_modifier
        ),
        (25, -1)
    );
}

#[test]
fn insert_with_nulls_appends_nulls_and_change_metadata() {
    let mut decoder = decoder();
    apply(&mut decoder, &insert_message(&[V::T("7"), V::N, V::N]), 3).unwrap();
    assert_eq!(decoder.len(), 1);
    let batch = decoder.finish();
    assert_eq!(batch.schema(), decoder.schema());
    assert_eq!(
        batch
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0),
        7
    );
    assert!(batch.column(1).is_null(0) && batch.column(2).is_null(0));
    assert_eq!(strings(&batch, "_op"), [Some("c".to_owned())]);
    let lsn = batch.column_by_name("_lsn").unwrap();
    let seq = batch.column_by_name("_seq").unwrap();
    let lsn = lsn.as_any().downcast_ref::<Int64Array>().unwrap();
    let seq = seq.as_any().downcast_ref::<Int64Array>().unwrap();
    assert_eq!((lsn.value(0), seq.value(0)), (0x10, 3));
    let commit = batch.column_by_name("_commit_ts").unwrap();
    let commit = commit
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .unwrap();
    let pg_epoch = DateTime::parse_from_rfc3339("2000-01-01T00:00:00Z").unwrap();
    assert_eq!(commit.value(0), pg_epoch.timestamp_micros());
}

#[test]
fn update_takes_unchanged_toast_value_from_full_old_tuple() {
    let mut decoder = decoder();
    let old = [V::T("1"), V::T("a long toasted name"), V::T("1.5")];
    let message = update_message(Some((b'O', &old)), &[V::T("1"), V::U, V::T("2.5")]);
    apply(&mut decoder, &message, 0).unwrap();
    let batch = decoder.finish();
    assert_eq!(
        strings(&batch, "name"),
        [Some("a long toasted name".to_owned())]
    );
    assert_eq!(strings(&batch, "_op"), [Some("u".to_owned())]);
    assert_eq!(decoder.unresolved_toast(), 0);
}

#[test]
fn update_without_old_tuple_appends_null_for_unchanged_toast_and_counts_it() {
    let mut decoder = decoder();
    apply(
        &mut decoder,
        &update_message(None, &[V::T("1"), V::U, V::T("2")]),
        0,
    )
    .unwrap();
    let batch = decoder.finish();
    assert_eq!(strings(&batch, "name"), [None]);
    assert_eq!(decoder.unresolved_toast(), 1);
}

#[test]
fn delete_with_key_tuple_leaves_non_key_columns_null() {
    let mut decoder = decoder();
    apply(
        &mut decoder,
        &delete_message(b'K', &[V::T("9"), V::N, V::N]),
        0,
    )
    .unwrap();
    let batch = decoder.finish();
    assert_eq!(strings(&batch, "_op"), [Some("d".to_owned())]);
    assert!(batch.column(0).is_valid(0));
    assert_eq!(
        batch.column(1).null_count() + batch.column(2).null_count(),
        2
    );
}

#[test]
fn truncate_decodes_relation_ids_and_options() {
    match decode(&truncate_message(&[1, 2], 3)).unwrap() {
        Message::Truncate {
            relation_ids,
            cascade,
            restart_identity,
        } => assert_eq!(
            (relation_ids, cascade, restart_identity),
            (vec![1, 2], true, true)
        ),
        other => panic!("expected a truncate, got {other:?}"),
    }
}

#[test]
fn relation_remap_follows_names_after_reorder_and_added_column() {
    let mut decoder = decoder();
    apply(
        &mut decoder,
        &insert_message(&[V::T("1"), V::T("a"), V::T("1")]),
        0,
    )
    .unwrap();
    let reordered = [
        ("extra", false),
        ("score", false),
        ("name", false),
        ("id", true),
    ];
    decoder.set_relation(&relation(&reordered)).unwrap();
    apply(
        &mut decoder,
        &insert_message(&[V::T("x"), V::T("2"), V::T("b"), V::T("2")]),
        1,
    )
    .unwrap();
    let batch = decoder.finish();
    assert_eq!(
        strings(&batch, "name"),
        [Some("a".to_owned()), Some("b".to_owned())]
    );
    let ids = batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    let scores = batch
        .column(2)
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    assert_eq!((ids.value(1), scores.value(1)), (2, 2.0));
    assert_eq!(
        batch.num_columns(),
        3 + crate::change::metadata_fields().len()
    );
}

#[test]
fn missing_declared_column_is_an_error_naming_column_and_relation() {
    let mut decoder = decoder();
    let error = decoder
        .set_relation(&relation(&[("id", true), ("name", false)]))
        .unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, DecodeError::MissingColumn { .. }),
        "{message}"
    );
    assert!(
        message.contains("score") && message.contains("public.events"),
        "{message}"
    );
    assert!(!decoder.has_relation());
}

#[test]
fn bad_integer_is_a_bad_value_that_does_not_quote_the_text_and_appends_nothing() {
    let mut decoder = decoder();
    let secret = "12345678901234567890123";
    let error = apply(
        &mut decoder,
        &insert_message(&[V::T(secret), V::T("a"), V::N]),
        4,
    );
    let error = error.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, DecodeError::BadValue { .. }), "{message}");
    assert!(
        message.contains("id") && message.contains("events"),
        "{message}"
    );
    assert!(!message.contains(secret), "{message}");
    assert_eq!(decoder.len(), 0);
    apply(
        &mut decoder,
        &insert_message(&[V::T("1"), V::T("ok"), V::N]),
        5,
    )
    .unwrap();
    assert_eq!(decoder.finish().num_rows(), 1);
}

#[test]
fn change_before_relation_or_with_wrong_column_count_is_an_error() {
    let mut decoder = TableDecoder::new("events", declared()).unwrap();
    let error = apply(&mut decoder, &insert_message(&[V::N, V::N, V::N]), 0).unwrap_err();
    assert!(matches!(error, DecodeError::NoRelation { .. }), "{error}");
    decoder.set_relation(&relation(COLUMNS)).unwrap();
    let error = apply(&mut decoder, &insert_message(&[V::N, V::N]), 0).unwrap_err();
    assert!(
        matches!(error, DecodeError::WrongColumnCount { .. }),
        "{error}"
    );
}

#[test]
fn unsupported_declared_type_names_the_column_and_the_supported_types() {
    let schema = Schema::new(vec![Field::new(
        "amount",
        DataType::Duration(TimeUnit::Second),
        true,
    )]);
    let error = TableDecoder::new("orders", Arc::new(schema)).err().unwrap();
    let message = error.to_string();
    assert!(
        message.contains("amount") && message.contains("orders"),
        "{message}"
    );
    assert!(
        message.contains("Int64") && message.contains("Timestamp"),
        "{message}"
    );
}

fn micros(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_micros()
}

fn parsed_micros(text: &str) -> Result<i64, &'static str> {
    parse_timestamp(text.as_bytes()).and_then(|(s, n)| to_unit(s, n, TimeUnit::Microsecond))
}

#[test]
fn timestamps_with_offsets_and_fractions_match_chrono() {
    let cases = [
        ("2026-11-21 13:10:00.5+00", "2026-11-21T13:10:00.5+00:00"),
        ("2026-11-21 13:10:00+05:30", "2026-11-21T13:10:00+05:30"),
        ("2026-11-21 13:10:00", "2026-11-21T13:10:00Z"),
        (
            "1969-12-31 23:59:59.999999-08",
            "1969-12-31T23:59:59.999999-08:00",
        ),
        ("0001-01-01 00:00:00+00", "0001-01-01T00:00:00Z"),
        (
            "2024-02-29 00:00:00.000001+14",
            "2024-02-29T00:00:00.000001+14:00",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(parsed_micros(text), Ok(micros(expected)), "{text}");
    }
    assert_eq!(
        parsed_micros("2026-11-21 13:10:00+05:30:15"),
        Ok(micros("2026-11-21T07:39:45Z"))
    );
}

#[test]
fn timestamps_are_built_in_the_declared_unit_and_zone() {
    let nanos_tz = DataType::Timestamp(TimeUnit::Nanosecond, Some("Europe/Paris".into()));
    let schema = Schema::new(vec![Field::new("at", nanos_tz.clone(), true)]);
    let mut decoder = TableDecoder::new("events", Arc::new(schema)).unwrap();
    decoder.set_relation(&relation(&[("at", false)])).unwrap();
    apply(
        &mut decoder,
        &insert_message(&[V::T("2026-11-21 13:10:00.5+01")]),
        0,
    )
    .unwrap();
    let batch = decoder.finish();
    assert_eq!(batch.column(0).data_type(), &nanos_tz);
    let at = batch
        .column(0)
        .as_any()
        .downcast_ref::<TimestampNanosecondArray>()
        .unwrap();
    assert_eq!(at.value(0), micros("2026-11-21T12:10:00.5Z") * 1_000);
}

#[test]
fn floats_booleans_and_dates_parse_postgres_text() {
    let schema = Schema::new(vec![
        Field::new("f", DataType::Float64, true),
        Field::new("b", DataType::Boolean, true),
        Field::new("d", DataType::Date32, true),
    ]);
    let mut decoder = TableDecoder::new("t", Arc::new(schema)).unwrap();
    decoder
        .set_relation(&relation(&[("f", false), ("b", false), ("d", false)]))
        .unwrap();
    let rows = [
        ["NaN", "t", "1970-01-02"],
        ["Infinity", "f", "1969-12-31"],
        ["-Infinity", "t", "2000-03-01"],
        ["1.5e-05", "f", "2026-11-21"],
    ];
    for (seq, [f, b, d]) in rows.into_iter().enumerate() {
        apply(
            &mut decoder,
            &insert_message(&[V::T(f), V::T(b), V::T(d)]),
            seq as u64,
        )
        .unwrap();
    }
    let batch = decoder.finish();
    let f = batch
        .column(0)
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    assert!(f.value(0).is_nan());
    assert_eq!(
        (f.value(1), f.value(2), f.value(3)),
        (f64::INFINITY, f64::NEG_INFINITY, 1.5e-5)
    );
    let b = batch
        .column(1)
        .as_any()
        .downcast_ref::<BooleanArray>()
        .unwrap();
    assert_eq!(
        b.iter().collect::<Vec<_>>(),
        [Some(true), Some(false), Some(true), Some(false)]
    );
    let d = batch
        .column(2)
        .as_any()
        .downcast_ref::<Date32Array>()
        .unwrap();
    assert_eq!((d.value(0), d.value(1), d.value(2)), (1, -1, 11_017));
    assert_eq!(d.value(3), 20_778);
}

#[test]
fn infinite_and_bc_timestamps_are_rejected() {
    for text in [
        "infinity",
        "-infinity",
        "0044-03-15 12:00:00+00 BC",
        "2026-13-01 00:00:00",
    ] {
        assert!(parsed_micros(text).is_err(), "{text}");
    }
    assert!(parsed_micros("2026-02-29 00:00:00").is_err());
    assert!(parsed_micros("2026-11-21 13:10:00.5+00 trailing").is_err());
}

#[test]
fn finish_resets_the_builders_between_batches() {
    let mut decoder = decoder();
    for seq in 0..3 {
        apply(
            &mut decoder,
            &insert_message(&[V::T("1"), V::T("a"), V::N]),
            seq,
        )
        .unwrap();
    }
    assert_eq!(decoder.finish().num_rows(), 3);
    assert!(decoder.is_empty());
    apply(
        &mut decoder,
        &insert_message(&[V::T("2"), V::T("b"), V::N]),
        3,
    )
    .unwrap();
    let batch = decoder.finish();
    assert_eq!(strings(&batch, "name"), [Some("b".to_owned())]);
    assert_eq!(decoder.finish().num_rows(), 0);
}

#[test]
fn transaction_and_other_messages_decode_as_other_and_unknown_tags_fail() {
    for tag in [b'B', b'C', b'Y', b'O', b'M'] {
        assert!(matches!(decode(&[tag, 0, 0]), Ok(Message::Other(t)) if t == tag));
    }
    assert!(matches!(
        decode(b"x"),
        Err(DecodeError::UnknownTag { tag: b'x' })
    ));
    assert!(matches!(decode(&[]), Err(DecodeError::Empty)));
}

#[test]
fn truncated_messages_are_errors_not_panics() {
    let messages = [
        relation_message(COLUMNS),
        insert_message(&[V::T("1"), V::N, V::U]),
        update_message(
            Some((b'K', &[V::T("1"), V::N, V::N])),
            &[V::T("2"), V::T("a"), V::N],
        ),
        delete_message(b'O', &[V::T("1"), V::T("a"), V::T("2")]),
        truncate_message(&[1, 2, 3], 0),
    ];
    for message in messages {
        for len in 1..message.len() {
            let error = decode(&message[..len]).unwrap_err();
            assert!(
                matches!(error, DecodeError::Truncated { .. }),
                "{len}: {error}"
            );
        }
        let mut longer = message.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer),
            Err(DecodeError::Malformed { .. })
        ));
    }
}

#[test]
fn tuple_and_value_debug_output_shows_sizes_not_values() {
    let message = insert_message(&[V::T("secret"), V::N, V::U]);
    let Message::Insert { new, .. } = decode(&message).unwrap() else {
        unreachable!()
    };
    let shown = format!("{new:?} {:?}", new.values().collect::<Vec<_>>());
    assert!(!shown.contains("secret"), "{shown}");
    let values: Vec<_> = new.values().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        values,
        [Value::Text(b"secret"), Value::Null, Value::UnchangedToast]
    );
}

/// Postgres' float8 output with `extra_float_digits` > 0: shortest digits, `e+NN`.
fn pg_float_text(value: f64) -> String {
    let text = format!("{value:e}");
    match text.split_once('e') {
        Some((mantissa, exponent)) => {
            format!("{mantissa}e{:+03}", exponent.parse::<i32>().unwrap())
        }
        None => text,
    }
}

/// Postgres' timestamptz output in a session whose zone has `offset` seconds.
fn pg_timestamp_text(micros: i64, offset: i32) -> String {
    let zone = FixedOffset::east_opt(offset).unwrap();
    let local = DateTime::from_timestamp_micros(micros)
        .unwrap()
        .with_timezone(&zone);
    let mut text = local.format("%Y-%m-%d %H:%M:%S").to_string();
    let fraction = micros.rem_euclid(1_000_000);
    if fraction != 0 {
        text.push_str(format!(".{fraction:06}").trim_end_matches('0'));
    }
    let abs = offset.unsigned_abs();
    text.push_str(&format!(
        "{}{:02}",
        if offset < 0 { '-' } else { '+' },
        abs / 3600
    ));
    if !abs.is_multiple_of(3600) {
        text.push_str(&format!(":{:02}", abs / 60 % 60));
        if !abs.is_multiple_of(60) {
            text.push_str(&format!(":{:02}", abs % 60));
        }
    }
    text
}

proptest! {
    #[test]
    fn integers_round_trip_through_the_parser(n in any::<i64>()) {
        prop_assert_eq!(parse_int(n.to_string().as_bytes(), i64::MIN, i64::MAX), Ok(n));
    }

    #[test]
    fn floats_round_trip_through_the_parser(v in any::<f64>()) {
        for text in [v.to_string(), pg_float_text(v)] {
            let parsed: f64 = parse_float(text.as_bytes()).unwrap();
            prop_assert!(parsed.to_bits() == v.to_bits() || (v.is_nan() && parsed.is_nan()));
        }
    }

    #[test]
    fn timestamps_round_trip_through_the_parser(
        micros in -62_135_596_800_000_000i64..253_402_300_799_999_999,
        offset in -15 * 3600..=15 * 3600,
    ) {
        let text = pg_timestamp_text(micros, offset);
        prop_assert_eq!(parsed_micros(&text), Ok(micros), "{}", text);
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(
        tag in prop::sample::select(b"RIUDTBCx".to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..48),
    ) {
        let mut data = vec![tag];
        data.extend(body);
        if let Ok(Message::Insert { new, .. }) = decode(&data) {
            new.values().for_each(drop);
        }
    }

    #[test]
    fn corrupted_changes_never_panic_the_decoder(index in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut message = update_message(
            Some((b'O', &[V::T("1"), V::T("2026-11-21"), V::T("1.5")])),
            &[V::T("-7"), V::U, V::T("NaN")],
        );
        let at = index.index(message.len());
        message[at] = byte;
        let mut decoder = decoder();
        let _ = apply_if_change(&mut decoder, &message);
        decoder.finish();
    }
}

/// Like [`apply`], but tolerates non-change messages.
fn apply_if_change(decoder: &mut TableDecoder, bytes: &[u8]) -> Result<(), DecodeError> {
    match decode(bytes)? {
        Message::Insert { .. } | Message::Update { .. } | Message::Delete { .. } => {
            apply(decoder, bytes, 0)
        }
        _ => Ok(()),
    }
}

#[test]
fn text_that_is_not_utf8_is_a_bad_value_and_the_row_text_keeps_what_it_can() {
    let mut decoder = decoder();
    let message = insert_message(&[V::T("1"), V::B(b"caf\xe9"), V::N]);
    let error = apply(&mut decoder, &message, 0).unwrap_err();
    assert!(
        matches!(&error, DecodeError::BadValue { column, .. } if column == "name"),
        "{error}"
    );
    assert_eq!(decoder.len(), 0);
    let Message::Insert { new, .. } = decode(&message).unwrap() else {
        panic!("an insert");
    };
    let row: serde_json::Value = serde_json::from_str(&decoder.row_text(&new)).unwrap();
    assert_eq!(row["id"], "1");
    assert_eq!(row["name"], "caf\u{fffd}");
    assert!(row["score"].is_null());
}

#[test]
fn a_check_appends_nothing() {
    let mut decoder = decoder();
    let message = insert_message(&[V::T("1"), V::T("ok"), V::N]);
    let Message::Insert { new, .. } = decode(&message).unwrap() else {
        panic!("an insert");
    };
    decoder.check(&new, None, Position::new(1, 0)).unwrap();
    assert_eq!(decoder.len(), 0);
    let bad = insert_message(&[V::T("x"), V::T("ok"), V::N]);
    let Message::Insert { new, .. } = decode(&bad).unwrap() else {
        panic!("an insert");
    };
    assert!(decoder.check(&new, None, Position::new(1, 1)).is_err());
}

#[test]
fn string_column_keeps_exact_bytes_of_utf8_text() {
    let mut decoder = decoder();
    apply(
        &mut decoder,
        &insert_message(&[V::T("1"), V::T("héllo ✓"), V::N]),
        0,
    )
    .unwrap();
    let batch = decoder.finish();
    let names = batch
        .column(1)
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    assert_eq!(names.value(0), "héllo ✓");
}

#[test]
fn cells_stay_small() {
    assert_eq!(std::mem::size_of::<Cell<'_>>(), 24);
}

#[test]
fn scratch_row_keeps_its_allocation_across_rows() {
    let text = String::from("borrowed");
    let row = vec![Cell::Text(&text); 16];
    let capacity = row.capacity();
    let row: Vec<Cell<'static>> = recycle(row);
    assert!(row.is_empty());
    assert_eq!(row.capacity(), capacity);
}
