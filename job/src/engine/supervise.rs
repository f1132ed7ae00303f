//! Restarting the job in-process after a failure a restart can cure.
//!
//! Some failures end a run but not the job: Postgres restarted (the
//! replication connection dropped, or the server refuses connections while it
//! recovers), Redis stayed down longer than a sink's retry budget, or Redis
//! came back without the data the job had applied ([`SinkError::Lost`]). For
//! those the engine does what an operator would: it starts the run again from
//! the newest checkpoint, exactly as after `kill -9`, with a capped
//! exponential backoff and jitter between attempts. Every sink then skips
//! what it already holds, a Redis sink that lost its keys is rebuilt from the
//! checkpoints, and windows are restored from the checkpoint.
//!
//! Anything else (bad SQL, a failed pre-flight check, an invalidated slot, a
//! permanent sink error) stops the job at once with its error. So does any
//! failure before the process first streamed (a wrong address, a server down
//! at start-up), and a run of restarts that makes no progress (no new
//! checkpoint) for [`GIVE_UP_AFTER`].

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use rand::Rng;

use super::{JobError, RunSummary};
use crate::engine::stats::JobStats;
use crate::sink::SinkError;
use crate::source::replication::SourceError;

/// Restarts without a new checkpoint in between stop after this long.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(10);

/// Whether a fresh run from the newest checkpoint can cure `error`.
pub fn is_restartable(error: &JobError) -> bool {
    matches!(
        error,
        JobError::Source(SourceError::Connect { .. } | SourceError::Stream { .. })
            | JobError::Sink(SinkError::Transient { .. } | SinkError::Lost { .. })
            | JobError::UdfPanicked { .. }
    )
}

/// Runs `attempt` until it succeeds, fails for good, or `shutdown` resolves.
/// Each attempt gets its own copy of the shutdown signal.
pub(super) async fn supervise<'a, A, F>(
    stats: &JobStats,
    shutdown: impl Future<Output = ()> + Send + 'a,
    mut attempt: A,
) -> Result<RunSummary, JobError>
where
    A: FnMut(Shared<BoxFuture<'a, ()>>) -> F,
    F: Future<Output = Result<RunSummary, JobError>>,
{
    let stop = shutdown.boxed().shared();
    // Poll it once now, so a signal handler inside it is installed before
    // the first attempt's start-up (which does not poll it).
    let _ = stop.clone().now_or_never();

    let mut delay = FIRST_DELAY;
    let mut failing_since: Option<(Instant, u64)> = None;
    let mut restarts = 0u64;
    loop {
        let outcome = attempt(stop.clone()).await;
        let error = match outcome {
            Ok(mut summary) => {
                summary.restarts = restarts;
                return Ok(summary);
            }
            // A failure before this process ever streamed (the checkpoint
            // epoch is set once streaming starts) is reported at once: a wrong
            // address or a server down at start-up is the operator's to see.
            Err(error)
                if is_restartable(&error) && stats.checkpoint_epoch.load(Ordering::Relaxed) > 0 =>
            {
                error
            }
            Err(error) => return Err(error),
        };
        if stop.clone().now_or_never().is_some() {
            return Err(error);
        }
        let epoch = stats.checkpoint_epoch.load(Ordering::Relaxed);
        match failing_since {
            Some((_, at_epoch)) if at_epoch != epoch => {
                failing_since = Some((Instant::now(), epoch));
                delay = FIRST_DELAY;
            }
            Some((since, _)) if since.elapsed() > GIVE_UP_AFTER => {
                tracing::error!(error = %error, "giving up: restarts made no progress for {GIVE_UP_AFTER:?}");
                return Err(error);
            }
            Some(_) => {}
            None => failing_since = Some((Instant::now(), epoch)),
        }
        let jitter = rand::rng().random_range(0..=delay.as_millis() as u64 / 2);
        let wait = delay + Duration::from_millis(jitter);
        restarts += 1;
        stats.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            error = %error,
            restart_in_ms = wait.as_millis() as u64,
            "the run failed in a way a restart can cure; restarting from the newest checkpoint"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.clone() => return Err(error),
        }
        delay = (delay * 2).min(MAX_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_and_lost_sink_failures_restart_others_stop() {
        let connect = JobError::Source(SourceError::Connect {
            target: "pg".into(),
            message: "refused".into(),
        });
        let lost = JobError::Sink(SinkError::Lost {
            sink: "recent".into(),
            message: "gone".into(),
        });
        let check = JobError::Source(SourceError::Check {
            target: "pg".into(),
            message: "wal_level".into(),
        });
        let permanent = JobError::Sink(SinkError::Permanent {
            sink: "recent".into(),
            message: "another writer".into(),
        });
        assert!(is_restartable(&connect));
        assert!(is_restartable(&lost));
        assert!(!is_restartable(&check));
        assert!(!is_restartable(&permanent));
        assert!(!is_restartable(&JobError::BadInput("bad".into())));
    }
}
