//! Built-in SQL functions of the job dialect, registered with every job's
//! DataFusion session.
//!
//! - `engagement_pct(duration_ms, length_seconds)`: share of the content that
//!   an event covered, in percent with 2 decimals. NULL when either input is
//!   NULL or `length_seconds` is 0 — never an error, never infinity.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{create_udf, ColumnarValue, ScalarUDF, Volatility};

/// `engagement_pct` as a DataFusion scalar function (vectorised over Arrow arrays).
pub fn engagement_pct_udf() -> ScalarUDF {
    create_udf(
        "engagement_pct",
        vec![DataType::Int64, DataType::Int64],
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(engagement_pct),
    )
}

fn engagement_pct(args: &[ColumnarValue]) -> Result<ColumnarValue> {
    let arrays = ColumnarValue::values_to_arrays(args)?;
    let duration = cast(&arrays[0], &DataType::Float64)?;
    let length = cast(&arrays[1], &DataType::Float64)?;
    Ok(ColumnarValue::Array(engagement_pct_arrays(
        &duration, &length,
    )))
}

/// The kernel: both inputs already Float64.
fn engagement_pct_arrays(duration_ms: &ArrayRef, length_seconds: &ArrayRef) -> ArrayRef {
    let duration = duration_ms
        .as_any()
        .downcast_ref::<Float64Array>()
        .expect("cast to Float64");
    let length = length_seconds
        .as_any()
        .downcast_ref::<Float64Array>()
        .expect("cast to Float64");
    let result: Float64Array = duration
        .iter()
        .zip(length.iter())
        .map(|(d, l)| match (d, l) {
            (Some(d), Some(l)) if l != 0.0 => Some(round2(d / 1000.0 / l * 100.0)),
            _ => None,
        })
        .collect();
    Arc::new(result)
}

/// Rounds half away from zero to 2 decimals, like Postgres' `round(x, 2)`.
fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int32Array;

    fn pct(d: Option<i32>, l: Option<i32>) -> Option<f64> {
        let d: ArrayRef = Arc::new(Int32Array::from(vec![d]));
        let l: ArrayRef = Arc::new(Int32Array::from(vec![l]));
        let out = engagement_pct(&[ColumnarValue::Array(d), ColumnarValue::Array(l)]).unwrap();
        let ColumnarValue::Array(array) = out else {
            unreachable!()
        };
        let array = array
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .clone();
        array.is_valid(0).then(|| array.value(0))
    }

    #[test]
    fn engagement_pct_is_rounded_to_two_decimals() {
        assert_eq!(pct(Some(30_000), Some(120)), Some(25.0));
        assert_eq!(pct(Some(1_000), Some(3)), Some(33.33));
        assert_eq!(pct(Some(2_000), Some(3)), Some(66.67));
    }

    #[test]
    fn engagement_pct_is_null_for_null_inputs_or_zero_length() {
        assert_eq!(pct(None, Some(100)), None);
        assert_eq!(pct(Some(1_000), None), None);
        assert_eq!(pct(Some(1_000), Some(0)), None);
    }
}
