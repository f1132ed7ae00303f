//! The decimal, time, interval, bytea and array parsers, and the decoder's
//! builders for them.

use arrow::array::{Decimal128Array, IntervalMonthDayNanoArray, ListArray};
use arrow::datatypes::{IntervalMonthDayNano, IntervalUnit};

use super::super::text::{
    array_elements, bytea_hex, decode_hex, parse_decimal, parse_interval, parse_time,
    unescape_element, Element,
};
use super::*;
use crate::values::iso_interval;

#[test]
fn decimals_keep_their_digits_and_reject_what_does_not_fit() {
    assert_eq!(parse_decimal(b"12.50", 10, 2), Ok(1250));
    assert_eq!(parse_decimal(b"-0.05", 10, 2), Ok(-5));
    assert_eq!(parse_decimal(b"7", 10, 2), Ok(700));
    assert_eq!(parse_decimal(b"7.1", 10, 2), Ok(710));
    assert_eq!(
        parse_decimal(b"7.100000", 10, 2),
        Ok(710),
        "zeros past the scale"
    );
    assert_eq!(parse_decimal(b"-0.00", 10, 2), Ok(0));
    assert_eq!(parse_decimal(b"00012345678.90", 10, 2), Ok(1_234_567_890));
    let max = "9".repeat(38);
    assert_eq!(
        parse_decimal(max.as_bytes(), 38, 0),
        Ok(99_999_999_999_999_999_999_999_999_999_999_999_999)
    );
    let min = format!("-0.{}", "9".repeat(38));
    assert_eq!(
        parse_decimal(min.as_bytes(), 38, 38),
        Ok(-99_999_999_999_999_999_999_999_999_999_999_999_999)
    );
    for (text, reason) in [
        ("123456789.00", "precision"),
        ("1.234", "scale"),
        ("NaN", "NaN"),
        ("Infinity", "infinite"),
        ("-Infinity", "infinite"),
        ("1e5", "not a decimal"),
        ("", "not a decimal"),
        ("-", "not a decimal"),
        ("1.2.3", "not a decimal"),
        (" 1", "not a decimal"),
    ] {
        let error = parse_decimal(text.as_bytes(), 10, 2).unwrap_err();
        assert!(error.contains(reason), "{text:?}: {error}");
    }
}

#[test]
fn times_of_day_are_microseconds_since_midnight() {
    assert_eq!(parse_time(b"00:00:00"), Ok(0));
    assert_eq!(parse_time(b"23:59:59.999999"), Ok(86_399_999_999));
    assert_eq!(parse_time(b"12:34:56.5"), Ok(45_296_500_000));
    assert!(parse_time(b"24:00:00").unwrap_err().contains("24:00:00"));
    for bad in [
        "25:00:00",
        "12:00",
        "12:00:00.1234567",
        "12:00:00+01",
        "noon",
    ] {
        assert!(parse_time(bad.as_bytes()).is_err(), "{bad}");
    }
}

fn interval(months: i32, days: i32, nanos: i64) -> IntervalMonthDayNano {
    IntervalMonthDayNano::new(months, days, nanos)
}

#[test]
fn intervals_read_postgres_iso_8601_with_a_sign_per_part() {
    let hour = 3_600_000_000_000;
    for (text, expected) in [
        ("PT0S", interval(0, 0, 0)),
        (
            "P1Y2M3DT4H5M6S",
            interval(14, 3, 4 * hour + 306_000_000_000),
        ),
        (
            "P-1Y-2M3DT-4H-5M-6.5S",
            interval(-14, 3, -4 * hour - 306_500_000_000),
        ),
        ("P1DT-2H", interval(0, 1, -2 * hour)),
        ("PT-0.000001S", interval(0, 0, -1_000)),
        ("P2W", interval(0, 14, 0)),
        ("PT2562047H", interval(0, 0, 2_562_047 * hour)),
    ] {
        assert_eq!(parse_interval(text.as_bytes()), Ok(expected), "{text}");
    }
    for bad in [
        "", "P", "1Y", "PT1.5H", "P1S", "PTT1S", "P1Y2", "P1.5D", "1 day", "PT--1S",
    ] {
        assert!(parse_interval(bad.as_bytes()).is_err(), "{bad:?}");
    }
    assert!(parse_interval(b"infinity")
        .unwrap_err()
        .contains("infinite"));
    assert!(parse_interval(b"P999999999999Y")
        .unwrap_err()
        .contains("range"));
    assert!(parse_interval(b"PT2562048H").unwrap_err().contains("range"));
}

#[test]
fn bytea_hex_decodes_and_rejects_other_forms() {
    let hex = bytea_hex(br"\x00ffA0").unwrap();
    let mut out = Vec::new();
    decode_hex(hex, &mut out);
    assert_eq!(out, [0x00, 0xff, 0xa0]);
    assert_eq!(bytea_hex(br"\x"), Ok(&b""[..]));
    for bad in [&br"\x0"[..], br"\xzz", b"00ff", br"\000"] {
        assert!(bytea_hex(bad).is_err(), "{bad:?}");
    }
}

fn elements(text: &str) -> Result<Vec<Option<String>>, &'static str> {
    let mut out = Vec::new();
    let mut buffer = Vec::new();
    array_elements(text.as_bytes(), |element| {
        out.push(match element {
            Element::Null => None,
            Element::Plain(body) => Some(String::from_utf8(body.to_vec()).unwrap()),
            Element::Escaped(body) => {
                Some(String::from_utf8(unescape_element(body, &mut buffer).to_vec()).unwrap())
            }
        });
        Ok(())
    })?;
    Ok(out)
}

#[test]
fn array_text_splits_into_elements_with_quotes_escapes_and_nulls() {
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(elements("{}"), Ok(vec![]));
    assert_eq!(elements("{1,2,NULL}"), Ok(vec![s("1"), s("2"), None]));
    assert_eq!(
        elements(r#"{"a b","c\"d","e\\f","NULL",null,"",x}"#),
        Ok(vec![
            s("a b"),
            s("c\"d"),
            s("e\\f"),
            s("NULL"),
            None,
            s(""),
            s("x")
        ])
    );
    assert_eq!(elements("[0:1]={7,8}"), Ok(vec![s("7"), s("8")]));
    assert_eq!(elements(r#"{"{}",","}"#), Ok(vec![s("{}"), s(",")]));
    for bad in ["{1,2", "1,2}", "{1,,2}", "{1,}", r#"{"a}"#, r#"{a"b}"#, ""] {
        assert!(elements(bad).is_err(), "{bad:?}");
    }
    for nested in ["{{1,2},{3,4}}", "[1:2][1:1]={{1},{2}}"] {
        assert!(elements(nested).unwrap_err().contains("multi-dimensional"));
    }
}

fn typed_decoder(columns: Vec<Field>) -> TableDecoder {
    let names: Vec<(&str, bool)> = columns.iter().map(|f| (f.name().as_str(), false)).collect();
    let relation = relation(&names);
    let mut decoder = TableDecoder::new("t", Arc::new(Schema::new(columns.clone()))).unwrap();
    decoder.set_relation(&relation).unwrap();
    decoder
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

#[test]
fn every_new_type_lands_in_its_arrow_builder() {
    let mut decoder = typed_decoder(vec![
        Field::new("price", DataType::Decimal128(12, 3), true),
        Field::new("at", DataType::Time64(TimeUnit::Microsecond), true),
        Field::new("span", DataType::Interval(IntervalUnit::MonthDayNano), true),
        Field::new("blob", DataType::Binary, true),
        Field::new("tags", list_of(DataType::Utf8), true),
        Field::new("ids", list_of(DataType::Int64), true),
    ]);
    let rows: [&[V]; 3] = [
        &[
            V::T("-1234.500"),
            V::T("13:05:00.25"),
            V::T("P1M-2DT3H"),
            V::T(r"\x6869"),
            V::T(r#"{a,"b c",NULL,"q\"uote",""}"#),
            V::T("{1,NULL,-3}"),
        ],
        &[V::N, V::N, V::N, V::N, V::N, V::N],
        &[
            V::T("0"),
            V::T("00:00:00"),
            V::T("PT0S"),
            V::T(r"\x"),
            V::T("{}"),
            V::T("{}"),
        ],
    ];
    for (seq, row) in rows.iter().enumerate() {
        apply(&mut decoder, &insert_message(row), seq as u64).unwrap();
    }
    let batch = decoder.finish();

    let price = batch
        .column(0)
        .as_any()
        .downcast_ref::<Decimal128Array>()
        .unwrap();
    assert_eq!((price.precision(), price.scale()), (12, 3));
    assert_eq!(price.value(0), -1_234_500);
    assert!(price.is_null(1));
    let at = batch
        .column(1)
        .as_primitive::<arrow::datatypes::Time64MicrosecondType>();
    assert_eq!(at.value(0), 47_100_250_000);
    let span = batch
        .column(2)
        .as_any()
        .downcast_ref::<IntervalMonthDayNanoArray>()
        .unwrap();
    assert_eq!(span.value(0), interval(1, -2, 3 * 3_600_000_000_000));
    assert_eq!(span.value(2), interval(0, 0, 0));
    let blob = batch.column(3).as_binary::<i32>();
    assert_eq!((blob.value(0), blob.value(2)), (&b"hi"[..], &b""[..]));
    assert!(blob.is_null(1));

    let tags = batch
        .column(4)
        .as_any()
        .downcast_ref::<ListArray>()
        .unwrap();
    assert!(tags.is_null(1) && tags.is_valid(2));
    let first = tags.value(0);
    let first: Vec<Option<&str>> = first.as_string::<i32>().iter().collect();
    assert_eq!(
        first,
        [Some("a"), Some("b c"), None, Some("q\"uote"), Some("")]
    );
    assert_eq!(tags.value(2).len(), 0);
    let ids = batch
        .column(5)
        .as_any()
        .downcast_ref::<ListArray>()
        .unwrap();
    let ids: Vec<Option<i64>> = ids
        .value(0)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .iter()
        .collect();
    assert_eq!(ids, [Some(1), None, Some(-3)]);
}

#[test]
fn a_bad_element_rejects_the_whole_row_and_names_the_column() {
    let mut decoder = typed_decoder(vec![
        Field::new("ids", list_of(DataType::Int32), true),
        Field::new("price", DataType::Decimal128(5, 2), true),
    ]);
    let bad_element = insert_message(&[V::T("{1,x}"), V::T("1.00")]);
    let error = apply(&mut decoder, &bad_element, 0)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("ids") && error.contains("not a decimal integer"),
        "{error}"
    );
    let nan = insert_message(&[V::T("{1}"), V::T("NaN")]);
    let error = apply(&mut decoder, &nan, 1).unwrap_err().to_string();
    assert!(error.contains("price") && error.contains("NaN"), "{error}");
    assert_eq!(decoder.len(), 0);
    apply(
        &mut decoder,
        &insert_message(&[V::T("{1}"), V::T("1.00")]),
        2,
    )
    .unwrap();
    let batch = decoder.finish();
    assert_eq!(batch.num_rows(), 1);
    let ids = batch
        .column(0)
        .as_any()
        .downcast_ref::<ListArray>()
        .unwrap();
    assert_eq!(
        ids.value(0).len(),
        1,
        "the rejected rows left no element behind"
    );
}

#[test]
fn nested_lists_and_lists_without_null_elements_are_not_decoder_types() {
    let nested = list_of(list_of(DataType::Int64));
    let strict = DataType::List(Arc::new(Field::new("item", DataType::Int64, false)));
    for data_type in [nested, strict] {
        let schema = Schema::new(vec![Field::new("m", data_type, true)]);
        assert!(TableDecoder::new("t", Arc::new(schema)).is_err());
    }
}

/// Postgres' text of an array element: quoted (with `"` and `\` escaped) when
/// it is empty, `NULL`, or holds a character the array syntax uses.
fn pg_array_element(value: &str) -> String {
    let plain = !value.is_empty()
        && !value.eq_ignore_ascii_case("NULL")
        && !value
            .chars()
            .any(|c| matches!(c, '{' | '}' | ',' | '"' | '\\') || c.is_ascii_whitespace());
    if plain {
        value.to_owned()
    } else {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

proptest! {
    #[test]
    fn decimals_round_trip(value in any::<i64>(), scale in 0i8..=18) {
        let digits = value.unsigned_abs().to_string();
        let scale_digits = scale as usize;
        let padded = format!("{digits:0>width$}", width = scale_digits + 1);
        let (whole, fraction) = padded.split_at(padded.len() - scale_digits);
        let sign = if value < 0 { "-" } else { "" };
        let text = if scale == 0 { format!("{sign}{whole}") } else { format!("{sign}{whole}.{fraction}") };
        prop_assert_eq!(parse_decimal(text.as_bytes(), 38, scale), Ok(i128::from(value)), "{}", text);
    }

    #[test]
    fn times_round_trip(micros in 0i64..86_400_000_000) {
        let seconds = micros / 1_000_000;
        let mut text = format!("{:02}:{:02}:{:02}", seconds / 3600, seconds / 60 % 60, seconds % 60);
        if micros % 1_000_000 != 0 {
            text.push_str(format!(".{:06}", micros % 1_000_000).trim_end_matches('0'));
        }
        prop_assert_eq!(parse_time(text.as_bytes()), Ok(micros));
    }

    #[test]
    fn intervals_round_trip_through_the_iso_writer(
        months in any::<i32>(),
        days in any::<i32>(),
        nanos in any::<i64>(),
    ) {
        let value = interval(months, days, nanos);
        let mut text = String::new();
        iso_interval(value, &mut text);
        prop_assert_eq!(parse_interval(text.as_bytes()), Ok(value), "{}", text);
    }

    #[test]
    fn text_arrays_round_trip(values in prop::collection::vec(prop::option::of(".{0,8}"), 0..6)) {
        let body: Vec<String> = values
            .iter()
            .map(|v| v.as_deref().map_or("NULL".to_owned(), pg_array_element))
            .collect();
        let text = format!("{{{}}}", body.join(","));
        prop_assert_eq!(elements(&text), Ok(values), "{}", text);
    }

    #[test]
    fn array_parsing_never_panics(text in "[{}\",\\\\a1 N]{0,16}") {
        let _ = elements(&text);
    }
}

#[test]
fn arrays_of_timestamps_and_bytea_undo_their_quoting() {
    let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut decoder = typed_decoder(vec![
        Field::new("times", list_of(utc), true),
        Field::new("blobs", list_of(DataType::Binary), true),
    ]);
    // Postgres quotes timestamps (they hold a space) and bytea elements
    // (their backslash, escaped as `\\`).
    let row = [
        V::T(r#"{"2026-11-29 10:00:00.5+00",NULL}"#),
        V::T(r#"{"\\x00ff","\\x",NULL}"#),
    ];
    apply(&mut decoder, &insert_message(&row), 0).unwrap();
    let batch = decoder.finish();
    let times = batch
        .column(0)
        .as_any()
        .downcast_ref::<ListArray>()
        .unwrap();
    let times = times.value(0);
    let times = times.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    assert_eq!(times.value(0), micros("2026-11-29T10:00:00.5Z"));
    assert!(times.is_null(1));
    let blobs = batch
        .column(1)
        .as_any()
        .downcast_ref::<ListArray>()
        .unwrap();
    let blobs = blobs.value(0);
    let blobs = blobs.as_binary::<i32>();
    assert_eq!(
        (blobs.value(0), blobs.value(1)),
        (&[0x00, 0xff][..], &b""[..])
    );
    assert!(blobs.is_null(2));
}
