//! The column types job SQL declares, and the Arrow types sources produce
//! for them.

use arrow::datatypes::{DataType, IntervalUnit, TimeUnit};

/// The types a source column may be declared with, for error messages.
pub const SUPPORTED_TYPES: &str = "BIGINT, INT, SMALLINT, DOUBLE, REAL, BOOLEAN, \
    NUMERIC(p, s) / DECIMAL(p, s), TEXT (also VARCHAR, CHAR, UUID, JSON, JSONB), TIMESTAMP, \
    TIMESTAMPTZ, DATE, TIME, INTERVAL, BYTEA, and one-dimensional arrays of these (`TEXT[]`)";

/// Scale of an unconstrained `NUMERIC`: Decimal128(38, 10), so values keep up
/// to 28 integer and 10 fractional digits; others are decode errors.
pub const UNCONSTRAINED_NUMERIC_SCALE: i8 = 10;

/// Maps a declared SQL type name (upper case, words joined by one space) and
/// its parenthesised numbers to the Arrow type sources produce; the error says
/// what is wrong.
pub fn declared_type(sql_type: &str, args: &[String]) -> Result<DataType, String> {
    let numbers = args
        .iter()
        .map(|a| a.parse::<u32>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("`{sql_type}` takes whole numbers in parentheses"))?;
    if matches!(sql_type, "NUMERIC" | "DECIMAL" | "DEC") {
        let (precision, scale) = match numbers[..] {
            [] => (38, UNCONSTRAINED_NUMERIC_SCALE as u32),
            [p] => (p, 0),
            [p, s] => (p, s),
            _ => return Err(format!("`{sql_type}` takes (precision[, scale])")),
        };
        if !(1..=38).contains(&precision) || scale > precision {
            return Err(format!(
                "`{sql_type}({precision}, {scale})` is out of range: engage reads decimals as \
                 Arrow Decimal128, with a precision of 1 to 38 and a scale from 0 to the \
                 precision"
            ));
        }
        return Ok(DataType::Decimal128(precision as u8, scale as i8));
    }
    // Other numbers (VARCHAR(255), TIMESTAMP(3)) do not change the Arrow type:
    // text has no length, and times keep Postgres' microseconds.
    sql_type_to_arrow(sql_type)
        .ok_or_else(|| format!("unsupported type `{sql_type}`; supported: {SUPPORTED_TYPES}"))
}

/// Maps a declared SQL type to the Arrow type sources produce. Timestamps are
/// microseconds in UTC (Postgres' own precision), whatever the declaration says.
pub fn sql_type_to_arrow(sql_type: &str) -> Option<DataType> {
    let utc_micros = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Some(match sql_type {
        "BIGINT" | "INT8" | "BIGSERIAL" => DataType::Int64,
        "INT" | "INTEGER" | "INT4" | "SERIAL" => DataType::Int32,
        "SMALLINT" | "INT2" => DataType::Int16,
        "DOUBLE" | "DOUBLE PRECISION" | "FLOAT8" | "FLOAT" => DataType::Float64,
        "REAL" | "FLOAT4" => DataType::Float32,
        "BOOLEAN" | "BOOL" => DataType::Boolean,
        "TEXT" | "VARCHAR" | "STRING" | "CHAR" | "CHARACTER VARYING" | "UUID" | "JSON"
        | "JSONB" => DataType::Utf8,
        "TIMESTAMP"
        | "TIMESTAMPTZ"
        | "TIMESTAMP WITH TIME ZONE"
        | "TIMESTAMP WITHOUT TIME ZONE" => utc_micros,
        "DATE" => DataType::Date32,
        "TIME" | "TIME WITHOUT TIME ZONE" => DataType::Time64(TimeUnit::Microsecond),
        "INTERVAL" => DataType::Interval(IntervalUnit::MonthDayNano),
        "BYTEA" => DataType::Binary,
        _ => return None,
    })
}
