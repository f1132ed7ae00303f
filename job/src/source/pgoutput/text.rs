//! Parsers for the text form of Postgres values, as the replication session
//! pins it (`datestyle=ISO`, `timezone=UTC`, `extra_float_digits=3`).
//!
//! Hand-written so the hot loop neither allocates nor goes through a general
//! date library: dates become days with civil-calendar arithmetic. Errors are
//! static reasons that never quote the value.

use arrow::datatypes::TimeUnit;

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
