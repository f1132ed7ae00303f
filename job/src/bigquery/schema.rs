//! The BigQuery schema of a filesystem sink's Parquet files, in the JSON
//! form `bq mk --table` and `tables.insert` take.

use arrow::datatypes::{DataType, Field, Schema};
use serde_json::{json, Value};

/// The table schema for files of `parquet` (the schema as written, see
/// `values::parquet_schema`), plus the hive partition column of
/// `time_pattern` (`name=%Y-%m-%d` gives a DATE `name`, any other pattern a
/// STRING), which BigQuery reads from the directory names.
pub fn table_schema(parquet: &Schema, time_pattern: Option<&str>) -> Result<Value, String> {
    let mut fields = parquet
        .fields()
        .iter()
        .map(|f| field(f))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some((name, format)) = time_pattern.and_then(|p| p.split_once('=')) {
        if !name.contains('%') && !name.contains('/') {
            let kind = if format == "%Y-%m-%d" {
                "DATE"
            } else {
                "STRING"
            };
            fields.push(json!({"name": name, "type": kind, "mode": "NULLABLE"}));
        }
    }
    Ok(Value::Array(fields))
}

fn field(field: &Field) -> Result<Value, String> {
    let mode = if field.is_nullable() {
        "NULLABLE"
    } else {
        "REQUIRED"
    };
    let (kind, inner): (&str, Option<Vec<Value>>) = match field.data_type() {
        DataType::Boolean => ("BOOL", None),
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => ("INTEGER", None),
        DataType::Float16 | DataType::Float32 | DataType::Float64 => ("FLOAT", None),
        DataType::Decimal128(precision, scale)
            if *precision <= 38 && *scale <= 9 && (*precision as i16 - *scale as i16) <= 29 =>
        {
            ("NUMERIC", None)
        }
        DataType::Decimal128(_, _) | DataType::Decimal256(_, _) => ("BIGNUMERIC", None),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ("STRING", None),
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => ("BYTES", None),
        DataType::Date32 | DataType::Date64 => ("DATE", None),
        DataType::Time32(_) | DataType::Time64(_) => ("TIME", None),
        DataType::Timestamp(_, Some(_)) => ("TIMESTAMP", None),
        DataType::Timestamp(_, None) => ("DATETIME", None),
        DataType::Struct(children) => (
            "RECORD",
            Some(
                children
                    .iter()
                    .map(|c| self::field(c))
                    .collect::<Result<_, _>>()?,
            ),
        ),
        DataType::List(item) | DataType::LargeList(item) => {
            let mut repeated = self::field(&item.as_ref().clone().with_name(field.name()))?;
            repeated["mode"] = json!("REPEATED");
            return Ok(repeated);
        }
        other => {
            return Err(format!(
                "column `{}` is of type {other}, which has no BigQuery type",
                field.name()
            ))
        }
    };
    let mut value = json!({"name": field.name(), "type": kind, "mode": mode});
    if let Some(inner) = inner {
        value["fields"] = Value::Array(inner);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::TimeUnit;

    #[test]
    fn arrow_types_map_to_bigquery_types() {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("title", DataType::Utf8, true),
            Field::new(
                "event_ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("pct", DataType::Decimal128(10, 4), true),
            Field::new(
                "tags",
                DataType::List(Field::new("item", DataType::Utf8, true).into()),
                true,
            ),
        ]);
        let value = table_schema(&schema, Some("event_date=%Y-%m-%d")).unwrap();
        let kinds: Vec<(&str, &str, &str)> = value
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap(),
                    f["type"].as_str().unwrap(),
                    f["mode"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("id", "INTEGER", "REQUIRED"),
                ("title", "STRING", "NULLABLE"),
                ("event_ts", "TIMESTAMP", "NULLABLE"),
                ("pct", "NUMERIC", "NULLABLE"),
                ("tags", "STRING", "REPEATED"),
                ("event_date", "DATE", "NULLABLE"),
            ]
        );
    }
}
