//! `engage udf bench`: rows/s of `device_family` through the plugin ABI
//! beside the same logic written as a SQL `CASE`, on one batch in one run.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use datafusion::prelude::SessionContext;

use super::{discover, functions};

/// The shipped `device_family` as SQL (see udfs/device_family/src/lib.rs).
pub const FAMILY_CASE: &str = "CASE
    WHEN device IS NULL THEN NULL
    WHEN split_part(lower(trim(device)), '-', 1) IN ('ios', 'android', 'iphone', 'ipad') THEN 'mobile'
    WHEN split_part(lower(trim(device)), '-', 1) = 'web' THEN 'web'
    WHEN split_part(lower(trim(device)), '-', 1) IN ('tv', 'roku', 'firetv', 'appletv', 'chromecast', 'smarttv') THEN 'tv'
    ELSE 'other' END";

/// Times both over `rows` device names (in batches of 8,192, as the engine
/// sees them), best of `runs`; returns (plugin rows/s, CASE rows/s).
pub async fn device_family(
    rows: usize,
    runs: usize,
    options: &discover::UdfOptions,
) -> Result<(f64, f64), String> {
    let udfs = discover::prepare("device_family()", options)?;
    let ctx = SessionContext::new();
    functions::register(&ctx, &udfs);
    let names = [
        "ios",
        "android",
        "web-chrome",
        "web-safari",
        "roku",
        "tv",
        "fridge",
        "IPAD",
    ];
    let batches: Vec<RecordBatch> = (0..rows.div_ceil(8192))
        .map(|b| {
            let n = 8192.min(rows - b * 8192);
            let devices: ArrayRef = Arc::new(StringArray::from_iter(
                (0..n).map(|i| (i % 11 != 0).then(|| names[(b + i) % names.len()])),
            ));
            RecordBatch::try_from_iter([("device", devices)]).expect("one column")
        })
        .collect();
    ctx.register_batch("events", batches[0].clone())
        .map_err(|e| e.to_string())?;
    let table = datafusion::datasource::MemTable::try_new(batches[0].schema(), vec![batches])
        .map_err(|e| e.to_string())?;
    ctx.deregister_table("events").map_err(|e| e.to_string())?;
    ctx.register_table("events", Arc::new(table))
        .map_err(|e| e.to_string())?;
    let mut rates = Vec::new();
    for expr in ["device_family(device)", FAMILY_CASE] {
        let sql = format!("SELECT count({expr}) AS n, max({expr}) AS m FROM events");
        let mut best = f64::MAX;
        for _ in 0..runs.max(1) + 1 {
            let started = Instant::now();
            ctx.sql(&sql)
                .await
                .map_err(|e| e.to_string())?
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            best = best.min(started.elapsed().as_secs_f64());
        }
        rates.push(rows as f64 / best);
    }
    Ok((rates[0], rates[1]))
}
