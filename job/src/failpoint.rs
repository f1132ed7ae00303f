//! Crash points for the fault suite (`engage chaos`): named places in the
//! checkpoint protocol where a test can make the job die as abruptly as
//! `kill -9` would.
//!
//! A failpoint is armed by the environment variable [`FAILPOINT_ENV`] as
//! `name:n` (die the `n`-th time `name` is reached, `n` ≥ 1). The process then
//! sends itself SIGKILL: no destructor runs, no buffer is flushed, open
//! connections are dropped by the kernel, exactly as with an outside
//! `kill -9`. Unarmed, [`hit`] costs one atomic load of a parsed-once value.
//!
//! The points, in the order a change batch meets them:
//!
//! | name | where the job dies |
//! | --- | --- |
//! | `after_sink_write` | a sink has applied a batch; no checkpoint covers it yet |
//! | `redis_in_flight` | a Redis write was sent; its reply was never read |
//! | `kafka_in_flight` | a Kafka sink queued a batch's messages; none is known to be acknowledged |
//! | `kafka_acked` | the broker acknowledged every message of the epoch; no manifest holds it yet |
//! | `before_sink_commit` | the manifest is durable; the sinks have not committed |
//! | `parquet_commit` | a Parquet sink published one staged file of several |
//! | `before_slot_confirm` | the checkpoint is complete; the slot is not confirmed |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// `name:n`: die the `n`-th time failpoint `name` is reached.
pub const FAILPOINT_ENV: &str = "ENGAGE_FAILPOINT";

/// Every failpoint, for `--help` texts and the fault suite.
pub const POINTS: [&str; 7] = [
    "after_sink_write",
    "redis_in_flight",
    "kafka_in_flight",
    "kafka_acked",
    "before_sink_commit",
    "parquet_commit",
    "before_slot_confirm",
];

static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn armed() -> Option<&'static (String, u64)> {
    ARMED
        .get_or_init(|| {
            let value = std::env::var(FAILPOINT_ENV).ok()?;
            let parsed = parse(&value);
            if parsed.is_none() {
                tracing::warn!(
                    value = %value,
                    "{FAILPOINT_ENV} is not `name:n` with a known name and n >= 1; no failpoint is armed"
                );
            }
            parsed
        })
        .as_ref()
}

fn parse(value: &str) -> Option<(String, u64)> {
    let (name, n) = value.split_once(':')?;
    let n: u64 = n.parse().ok().filter(|&n| n >= 1)?;
    POINTS.contains(&name).then(|| (name.to_string(), n))
}

/// Reaches failpoint `name`: kills the process if it is armed for this hit.
pub fn hit(name: &str) {
    if reached(name) {
        die(name);
    }
}

/// Reaches failpoint `name` and tells whether this is the armed hit, without
/// dying yet: for points that must set something up first (send a request),
/// then call [`die`].
pub fn reached(name: &str) -> bool {
    match armed() {
        Some((armed, n)) if armed == name => HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n,
        _ => false,
    }
}

/// Kills the process with SIGKILL.
pub fn die(name: &str) {
    eprintln!("failpoint {name} reached: killing the job with SIGKILL");
    // SAFETY: kill(2) with our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; this is never reached.
    std::process::abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_points_with_a_positive_count_arm() {
        assert_eq!(
            parse("parquet_commit:3"),
            Some(("parquet_commit".into(), 3))
        );
        assert_eq!(parse("parquet_commit:0"), None);
        assert_eq!(parse("nowhere:1"), None);
        assert_eq!(parse("after_sink_write"), None);
    }
}
