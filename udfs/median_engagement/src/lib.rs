//! `median_engagement(engagement_seconds)`: the median of a group's values,
//! an aggregate (UDAF): a `Vec` argument receives every value of the group.
//!
//! NULLs are left out (the element type is not an `Option`), and a group
//! without values has no median (NULL). With an even count the median is the
//! mean of the two middle values, as Postgres'
//! `percentile_cont(0.5) WITHIN GROUP (ORDER BY x)` computes it.

use arroyo_udf_plugin::udf;

#[udf]
fn median_engagement(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    })
}
