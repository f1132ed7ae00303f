//! Readers of what the job wrote: its Parquet tables through DataFusion, and
//! columns cast to plain Rust values. Every failure is an error: a table that
//! cannot be read never passes as an empty one. Only a table without a
//! committed Parquet file (the job never published one) reads as empty.

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::chaos::{context, ChaosError};

/// DataFusion over the job's filesystem outputs.
pub struct Outputs {
    ctx: datafusion::prelude::SessionContext,
    /// Tables without a committed file.
    absent: Vec<String>,
}

impl Outputs {
    /// Registers every filesystem table of the mission SQL under `data_dir`.
    pub async fn open(data_dir: &std::path::Path) -> Result<Outputs, ChaosError> {
        let spec =
            crate::query::parse_outputs_under("engagement", crate::demo::ENGAGEMENT_SQL, data_dir)
                .map_err(context("failed to parse the mission SQL"))?;
        let (ctx, unavailable) = crate::query::session_for(&spec).await;
        let mut absent = Vec::new();
        for table in &spec.tables {
            if let Some(options) = table.connector.filesystem() {
                if !crate::sink::parquet::has_committed_files(std::path::Path::new(&options.path)) {
                    absent.push(table.name.clone());
                }
            }
        }
        for problem in unavailable {
            let table = problem.split('`').nth(1).unwrap_or_default();
            if !absent.iter().any(|t| t == table) {
                return Err(ChaosError::Failed(format!(
                    "an output table cannot be read: {problem}"
                )));
            }
        }
        Ok(Outputs { ctx, absent })
    }

    /// Rows of `sql` over `table`; empty only if the table has no committed file.
    pub async fn rows(&self, table: &str, sql: &str) -> Result<Vec<RecordBatch>, ChaosError> {
        if self.absent.iter().any(|t| t == table) {
            return Ok(Vec::new());
        }
        self.ctx
            .sql(sql)
            .await
            .map_err(context(format!("failed to plan `{sql}`")))?
            .collect()
            .await
            .map_err(context(format!("failed to run `{sql}`")))
    }
}

/// A column of a batch, by name, as plain values.
pub struct Columns<'a>(pub &'a RecordBatch);

impl Columns<'_> {
    fn column(&self, name: &str, data_type: &DataType) -> Result<ArrayRef, ChaosError> {
        let column = self
            .0
            .column_by_name(name)
            .ok_or_else(|| ChaosError::Failed(format!("an output has no column `{name}`")))?;
        cast(column, data_type).map_err(context(format!("column `{name}` as {data_type}")))
    }

    pub fn ints(&self, name: &str) -> Result<Vec<Option<i64>>, ChaosError> {
        let column = self.column(name, &DataType::Int64)?;
        let array = column.as_any().downcast_ref::<Int64Array>().expect("cast");
        Ok(array.iter().collect())
    }

    pub fn floats(&self, name: &str) -> Result<Vec<Option<f64>>, ChaosError> {
        let column = self.column(name, &DataType::Float64)?;
        let array = column
            .as_any()
            .downcast_ref::<Float64Array>()
            .expect("cast");
        Ok(array.iter().collect())
    }

    pub fn strings(&self, name: &str) -> Result<Vec<Option<String>>, ChaosError> {
        let column = self.column(name, &DataType::Utf8)?;
        let array = column.as_any().downcast_ref::<StringArray>().expect("cast");
        Ok(array.iter().map(|v| v.map(str::to_string)).collect())
    }

    /// A timestamp column in microseconds since the epoch.
    pub fn micros(&self, name: &str) -> Result<Vec<Option<i64>>, ChaosError> {
        let column = self.column(
            name,
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )?;
        let column =
            cast(&column, &DataType::Int64).map_err(context(format!("column `{name}`")))?;
        let array = column.as_any().downcast_ref::<Int64Array>().expect("cast");
        Ok(array.iter().collect())
    }
}

/// The `id` of a JSON row.
pub fn json_id(row: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(row)
        .ok()?
        .get("id")?
        .as_i64()
}

/// Two numbers equal up to float noise.
pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// Two optional numbers equal up to float noise.
pub fn close_opt(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => close(a, b),
        (None, None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_json_rows() {
        assert_eq!(json_id(r#"{"id":42,"content_id":"x"}"#), Some(42));
        assert_eq!(json_id("not json"), None);
    }

    #[test]
    fn numbers_compare_up_to_float_noise_and_null_only_equals_null() {
        assert!(close(0.1 + 0.2, 0.3));
        assert!(!close(100.0, 100.01));
        assert!(close_opt(None, None));
        assert!(!close_opt(Some(0.0), None));
    }
}
