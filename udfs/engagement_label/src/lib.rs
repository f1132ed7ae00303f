//! `engagement_label(duration_ms)`: an **async** UDF, the shape a lookup in
//! an outside service takes (a model server, a CRM): `async fn`, with the
//! results kept in input order (`ordered`), a timeout per call, and at most
//! 64 calls in flight. Here the "service" is a local rule, so the example
//! runs anywhere:
//!
//! - under 10 s: `bounce`; under 60 s: `short`; under 10 min: `engaged`;
//!   else `deep`. NULL in (the argument is not an `Option`): NULL out.

use arroyo_udf_plugin::async_udf::tokio;
use arroyo_udf_plugin::udf;

#[udf(ordered, timeout = "5s", allowed_in_flight = 64)]
async fn engagement_label(duration_ms: i64) -> String {
    // Where a real UDF would await its service's answer.
    tokio::task::yield_now().await;
    let label = match duration_ms {
        d if d < 10_000 => "bounce",
        d if d < 60_000 => "short",
        d if d < 600_000 => "engaged",
        _ => "deep",
    };
    label.to_string()
}
