//! Parsers for the text form of Postgres values, as the replication session
//! pins it (see [`SESSION_SETTINGS`]).
//!
//! Hand-written so the hot loop neither allocates nor goes through a general
//! date library: dates become days with civil-calendar arithmetic. Errors are
//! static reasons that never quote the value.

use arrow::datatypes::{IntervalMonthDayNano, TimeUnit};

/// The settings every session that reads values for the decoder runs with
/// (the replication stream and the snapshot's `COPY`), as `(name, value)`:
/// the parsers below read exactly these formats.
pub const SESSION_SETTINGS: [(&str, &str); 5] = [
    ("datestyle", "ISO"),
    ("timezone", "UTC"),
    ("extra_float_digits", "3"),
    ("intervalstyle", "iso_8601"),
    ("bytea_output", "hex"),
];

/// A decimal integer within `[min, max]`.
pub(super) fn parse_int(text: &[u8], min: i64, max: i64) -> Result<i64, &'static str> {
    const OUT_OF_RANGE: &str = "integer out of range for the declared type";
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err("not a decimal integer");
    }
    let mut value: i64 = 0;
    for &digit in digits {
        let digit = i64::from(digit - b'0');
        value = value
            .checked_mul(10)
            .and_then(|v| {
                if negative {
                    v.checked_sub(digit)
                } else {
                    v.checked_add(digit)
                }
            })
            .ok_or(OUT_OF_RANGE)?;
    }
    if value < min || value > max {
        return Err(OUT_OF_RANGE);
    }
    Ok(value)
}

/// A float in Postgres' output form, including `NaN`, `Infinity`, `-Infinity`.
pub(super) fn parse_float<F: std::str::FromStr>(text: &[u8]) -> Result<F, &'static str> {
    const NOT_FLOAT: &str = "not a floating-point number";
    let text = std::str::from_utf8(text).map_err(|_| NOT_FLOAT)?;
    // Rust's parser also reads `NaN` and `[-]Infinity`, case-insensitively.
    text.parse().map_err(|_| NOT_FLOAT)
}

const NOT_DATE: &str = "not an ISO date";
const NOT_TIMESTAMP: &str = "not an ISO timestamp";
const INFINITE: &str = "infinite dates and timestamps are not supported";
const BEFORE_COMMON_ERA: &str = "dates before the common era are not supported";

/// `YYYY-MM-DD` as days since the Unix epoch.
pub(super) fn parse_date(text: &[u8]) -> Result<i32, &'static str> {
    reject_special(text)?;
    let mut c = Cursor { text, pos: 0 };
    let days = c.date().ok_or(NOT_DATE)?;
    if !c.done() {
        return Err(NOT_DATE);
    }
    i32::try_from(days).map_err(|_| NOT_DATE)
}

/// `YYYY-MM-DD[ HH:MM:SS[.f{1,9}][(+|-)HH[:MM[:SS]]]]` as seconds since the
/// Unix epoch (UTC) and nanoseconds; no offset means UTC.
pub(super) fn parse_timestamp(text: &[u8]) -> Result<(i64, u32), &'static str> {
    reject_special(text)?;
    let mut c = Cursor { text, pos: 0 };
    let mut seconds = c.date().ok_or(NOT_TIMESTAMP)? * 86_400;
    let mut nanos = 0;
    if c.eat(b' ') {
        let (h, m, s) = c.time().ok_or(NOT_TIMESTAMP)?;
        seconds += i64::from(h * 3600 + m * 60 + s);
        if c.eat(b'.') {
            let (fraction, digits) = c.number(1, 9).ok_or(NOT_TIMESTAMP)?;
            nanos = fraction * 10u32.pow(9 - digits as u32);
        }
        let sign = if c.eat(b'+') {
            -1
        } else if c.eat(b'-') {
            1
        } else {
            0
        };
        if sign != 0 {
            let (h, _) = c.number(2, 2).ok_or(NOT_TIMESTAMP)?;
            let m = if c.eat(b':') {
                c.number(2, 2).ok_or(NOT_TIMESTAMP)?.0
            } else {
                0
            };
            let s = if c.eat(b':') {
                c.number(2, 2).ok_or(NOT_TIMESTAMP)?.0
            } else {
                0
            };
            if h >= 24 || m >= 60 || s >= 60 {
                return Err(NOT_TIMESTAMP);
            }
            seconds += sign * i64::from(h * 3600 + m * 60 + s);
        }
    }
    if !c.done() {
        return Err(NOT_TIMESTAMP);
    }
    Ok((seconds, nanos))
}

fn reject_special(text: &[u8]) -> Result<(), &'static str> {
    if text == b"infinity" || text == b"-infinity" {
        Err(INFINITE)
    } else if text.ends_with(b" BC") {
        Err(BEFORE_COMMON_ERA)
    } else {
        Ok(())
    }
}

/// Seconds and nanoseconds since the epoch in `unit`, truncating finer digits.
pub(super) fn to_unit(seconds: i64, nanos: u32, unit: TimeUnit) -> Result<i64, &'static str> {
    let (per_second, nanos_per_tick) = match unit {
        TimeUnit::Second => (1, 1_000_000_000),
        TimeUnit::Millisecond => (1_000, 1_000_000),
        TimeUnit::Microsecond => (1_000_000, 1_000),
        TimeUnit::Nanosecond => (1_000_000_000, 1),
    };
    seconds
        .checked_mul(per_second)
        .and_then(|v| v.checked_add(i64::from(nanos / nanos_per_tick)))
        .ok_or("timestamp out of range for the declared unit")
}

/// A cursor over ASCII date and time text.
struct Cursor<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.pos == self.text.len()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let hit = self.text.get(self.pos) == Some(&byte);
        self.pos += usize::from(hit);
        hit
    }

    /// Between `min` and `max` digits: their value and how many there were.
    fn number(&mut self, min: usize, max: usize) -> Option<(u32, usize)> {
        let digits = self.text[self.pos..]
            .iter()
            .take(max)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits < min {
            return None;
        }
        let value = self.text[self.pos..self.pos + digits]
            .iter()
            .fold(0, |v, d| v * 10 + u32::from(d - b'0'));
        self.pos += digits;
        Some((value, digits))
    }

    /// Up to 18 digits as an i64 (interval parts can be large).
    fn wide_number(&mut self) -> Option<i64> {
        let digits = self.text[self.pos..]
            .iter()
            .take(18)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        let value = self.text[self.pos..self.pos + digits]
            .iter()
            .fold(0, |v, d| v * 10 + i64::from(d - b'0'));
        self.pos += digits;
        Some(value)
    }

    /// `YYYY-MM-DD` (4 to 6 year digits) as days since the Unix epoch.
    fn date(&mut self) -> Option<i64> {
        let (year, _) = self.number(4, 6)?;
        let (month, _) = self.eat(b'-').then(|| self.number(2, 2))??;
        let (day, _) = self.eat(b'-').then(|| self.number(2, 2))??;
        let leap =
            year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
        let month_days = match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            1..=12 => 31,
            _ => return None,
        };
        (1..=month_days)
            .contains(&day)
            .then(|| days_from_civil(year.into(), month.into(), day.into()))
    }

    /// `HH:MM:SS`.
    fn time(&mut self) -> Option<(u32, u32, u32)> {
        let (h, _) = self.number(2, 2)?;
        let (m, _) = self.eat(b':').then(|| self.number(2, 2))??;
        let (s, _) = self.eat(b':').then(|| self.number(2, 2))??;
        (h < 24 && m < 60 && s < 60).then_some((h, m, s))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `[-]digits[.digits]` as a Decimal128 of `precision` and `scale`: the
/// integer part may have at most `precision - scale` digits, and fractional
/// digits beyond `scale` must be zeros (a value is never rounded).
pub(super) fn parse_decimal(text: &[u8], precision: u8, scale: i8) -> Result<i128, &'static str> {
    const NOT_DECIMAL: &str = "not a decimal number";
    match text {
        b"NaN" => return Err("NaN has no decimal value"),
        b"Infinity" | b"-Infinity" => return Err("infinite numbers have no decimal value"),
        _ => {}
    }
    let scale = usize::try_from(scale).map_err(|_| "negative decimal scales are not supported")?;
    let (negative, rest) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    let (whole, fraction) = match rest.iter().position(|&b| b == b'.') {
        Some(dot) => (&rest[..dot], &rest[dot + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    let digits = |part: &[u8]| part.iter().all(u8::is_ascii_digit);
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return Err(NOT_DECIMAL);
    }
    let significant = whole.iter().skip_while(|&&b| b == b'0').count();
    if significant > usize::from(precision).saturating_sub(scale) {
        return Err("decimal value does not fit the declared precision");
    }
    if fraction.iter().skip(scale).any(|&b| b != b'0') {
        return Err("decimal value has more fractional digits than the declared scale");
    }
    let mut value: i128 = 0;
    let fraction_digits = fraction.iter().chain(std::iter::repeat(&b'0')).take(scale);
    for &digit in whole.iter().chain(fraction_digits) {
        // At most 38 significant digits: never overflows an i128.
        value = value * 10 + i128::from(digit - b'0');
    }
    Ok(if negative { -value } else { value })
}

/// `HH:MM:SS[.f{1,6}]` as microseconds since midnight.
pub(super) fn parse_time(text: &[u8]) -> Result<i64, &'static str> {
    const NOT_TIME: &str = "not a time of day (HH:MM:SS)";
    if text.starts_with(b"24:00:00") {
        return Err("24:00:00 has no Arrow time-of-day value");
    }
    let mut c = Cursor { text, pos: 0 };
    let (h, m, s) = c.time().ok_or(NOT_TIME)?;
    let mut micros = i64::from(h * 3600 + m * 60 + s) * 1_000_000;
    if c.eat(b'.') {
        let (fraction, digits) = c.number(1, 6).ok_or(NOT_TIME)?;
        micros += i64::from(fraction * 10u32.pow(6 - digits as u32));
    }
    if !c.done() {
        return Err(NOT_TIME);
    }
    Ok(micros)
}

/// An interval in ISO 8601 form as Postgres writes it with
/// `intervalstyle=iso_8601` (`P1Y2M3DT4H5M6.5S`, every part with its own
/// sign, `PT0S` for zero) as months, days and nanoseconds.
pub(super) fn parse_interval(text: &[u8]) -> Result<IntervalMonthDayNano, &'static str> {
    const NOT_INTERVAL: &str = "not an ISO 8601 interval";
    const OUT_OF_RANGE: &str = "interval out of range for months, days and nanoseconds";
    if text == b"infinity" || text == b"-infinity" {
        return Err("infinite intervals are not supported");
    }
    let [b'P', rest @ ..] = text else {
        return Err(NOT_INTERVAL);
    };
    let (mut months, mut days, mut nanos) = (0i32, 0i32, 0i64);
    let mut in_time = false;
    let mut c = Cursor { text: rest, pos: 0 };
    if c.done() {
        return Err(NOT_INTERVAL);
    }
    while !c.done() {
        if c.eat(b'T') {
            if in_time {
                return Err(NOT_INTERVAL);
            }
            in_time = true;
            continue;
        }
        let negative = c.eat(b'-');
        let whole = c.wide_number().ok_or(NOT_INTERVAL)?;
        let whole = if negative { -whole } else { whole };
        let fraction = if c.eat(b'.') {
            let (value, digits) = c.number(1, 9).ok_or(NOT_INTERVAL)?;
            let value = i64::from(value) * 10i64.pow(9 - digits as u32);
            Some(if negative { -value } else { value })
        } else {
            None
        };
        let unit = c.text.get(c.pos).copied().ok_or(NOT_INTERVAL)?;
        c.pos += 1;
        if fraction.is_some() && !(in_time && unit == b'S') {
            return Err(NOT_INTERVAL);
        }
        let add_months = |months: i32, per: i64| {
            whole
                .checked_mul(per)
                .and_then(|v| i32::try_from(v).ok())
                .and_then(|v| months.checked_add(v))
                .ok_or(OUT_OF_RANGE)
        };
        let add_nanos = |nanos: i64, per: i64| {
            whole
                .checked_mul(per)
                .and_then(|v| v.checked_add(fraction.unwrap_or(0)))
                .and_then(|v| nanos.checked_add(v))
                .ok_or(OUT_OF_RANGE)
        };
        match (in_time, unit) {
            (false, b'Y') => months = add_months(months, 12)?,
            (false, b'M') => months = add_months(months, 1)?,
            (false, b'W') => {
                days = whole
                    .checked_mul(7)
                    .and_then(|v| i32::try_from(v).ok())
                    .and_then(|v| days.checked_add(v))
                    .ok_or(OUT_OF_RANGE)?
            }
            (false, b'D') => {
                days = i32::try_from(whole)
                    .ok()
                    .and_then(|v| days.checked_add(v))
                    .ok_or(OUT_OF_RANGE)?
            }
            (true, b'H') => nanos = add_nanos(nanos, 3_600_000_000_000)?,
            (true, b'M') => nanos = add_nanos(nanos, 60_000_000_000)?,
            (true, b'S') => nanos = add_nanos(nanos, 1_000_000_000)?,
            _ => return Err(NOT_INTERVAL),
        }
    }
    Ok(IntervalMonthDayNano::new(months, days, nanos))
}

/// Checks the hex form of a bytea (`\x` then pairs of hex digits) and
/// returns the digits.
pub(super) fn bytea_hex(text: &[u8]) -> Result<&[u8], &'static str> {
    match text {
        [b'\\', b'x', hex @ ..] if hex.len() % 2 == 0 && hex.iter().all(u8::is_ascii_hexdigit) => {
            Ok(hex)
        }
        _ => Err("not a bytea in hex form (\\x...)"),
    }
}

/// Appends the bytes of hex digits checked by [`bytea_hex`] to `out`.
pub(super) fn decode_hex(hex: &[u8], out: &mut Vec<u8>) {
    let nibble = |b: u8| match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    };
    out.extend(
        hex.chunks_exact(2)
            .map(|p| nibble(p[0]) << 4 | nibble(p[1])),
    );
}

/// One element of a one-dimensional array's text form.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(super) enum Element<'a> {
    Null,
    /// The element's text, with no escapes to undo.
    Plain(&'a [u8]),
    /// A quoted element's text between the quotes, with backslash escapes;
    /// see [`unescape_element`].
    Escaped(&'a [u8]),
}

/// The elements of a one-dimensional array in Postgres' text form
/// (`{1,NULL,"a \"b\""}`, optionally after dimension bounds `[0:2]=`),
/// handed one at a time to `each`; stops at the first error either returns.
pub(super) fn array_elements<'a>(
    text: &'a [u8],
    mut each: impl FnMut(Element<'a>) -> Result<(), &'static str>,
) -> Result<(), &'static str> {
    const NOT_ARRAY: &str = "not an array literal";
    let mut text = text;
    if text.first() == Some(&b'[') {
        let equals = text.iter().position(|&b| b == b'=').ok_or(NOT_ARRAY)?;
        if text[..equals].iter().filter(|&&b| b == b'[').count() > 1 {
            return Err("multi-dimensional arrays are not supported");
        }
        text = &text[equals + 1..];
    }
    let [b'{', inner @ .., b'}'] = text else {
        return Err(NOT_ARRAY);
    };
    if inner.is_empty() {
        return Ok(());
    }
    if inner.first() == Some(&b'{') {
        return Err("multi-dimensional arrays are not supported");
    }
    let mut at = 0;
    loop {
        let element = if inner.get(at) == Some(&b'"') {
            let start = at + 1;
            let mut end = start;
            let mut escaped = false;
            loop {
                match inner.get(end) {
                    None => return Err(NOT_ARRAY),
                    Some(b'"') => break,
                    Some(b'\\') => {
                        escaped = true;
                        end += 2;
                    }
                    Some(_) => end += 1,
                }
            }
            at = end + 1;
            let body = &inner[start..end];
            if escaped {
                Element::Escaped(body)
            } else {
                Element::Plain(body)
            }
        } else {
            let end = inner[at..]
                .iter()
                .position(|&b| b == b',')
                .map_or(inner.len(), |p| at + p);
            let body = &inner[at..end];
            at = end;
            if body.is_empty()
                || body
                    .iter()
                    .any(|&b| matches!(b, b'"' | b'{' | b'}' | b'\\'))
            {
                return Err(NOT_ARRAY);
            }
            if body.eq_ignore_ascii_case(b"NULL") {
                Element::Null
            } else {
                Element::Plain(body)
            }
        };
        each(element)?;
        match inner.get(at) {
            None => return Ok(()),
            Some(b',') => at += 1,
            Some(_) => return Err(NOT_ARRAY),
        }
    }
}

/// The text of an [`Element::Escaped`], backslashes undone, into `out`
/// (cleared first).
pub(super) fn unescape_element<'o>(body: &[u8], out: &'o mut Vec<u8>) -> &'o [u8] {
    out.clear();
    let mut bytes = body.iter();
    while let Some(&b) = bytes.next() {
        if b == b'\\' {
            if let Some(&next) = bytes.next() {
                out.push(next);
            }
        } else {
            out.push(b);
        }
    }
    out
}
