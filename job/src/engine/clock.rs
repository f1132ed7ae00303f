//! When the wall clock may stand in for event time.
//!
//! A window closes when the watermark (newest event time minus the declared
//! delay) passes its end. On a quiet stream no newer event comes to push it,
//! so once the source has caught up, the wall clock does: the watermark
//! becomes `now - delay - allowance`. The allowance is what keeps the clock
//! from declaring late an event that events alone would have let in: an event
//! is stamped, committed and decoded before engage sees it, and may be a
//! little out of order within the delay.
//!
//! [`ArrivalLag`] learns that margin from the stream itself. Every on-time
//! change that arrives while the job was caught up (a backlog says nothing
//! about live latency) is measured: how far behind the wall clock its event
//! time is on arrival. The allowance is [`MARGIN`] times the largest such lag, decaying
//! by half every [`HALF_LIFE`], and never below [`MIN_ALLOWANCE`]. An idle
//! stream of prompt single events closes windows within a few hundred
//! milliseconds of the delay; a stream whose events arrive late or out of
//! order makes the clock hold back accordingly. A job starts cautious
//! ([`START_LAG`]) until it has seen its stream.
//!
//! The clock is a heuristic bound on what can still arrive, as every idle
//! rule is: an event delayed by more than three times anything seen recently (a
//! transaction held open for seconds, say) can be judged late, and then goes
//! to the late-events output, never silently into a closed window.

use std::time::{Duration, Instant};

/// The least the clock trails the newest possible event time beyond the
/// delay: an event stamped by a client that then stalls (a busy machine, a
/// slow commit) may arrive this much later without being judged late.
pub const MIN_ALLOWANCE: Duration = Duration::from_millis(150);
/// How many times the largest recent arrival lag the allowance is: room for
/// a stall well beyond what the stream has shown.
pub const MARGIN: f64 = 3.0;
/// The lag a job assumes before it has measured any (an allowance of 1.5 s).
pub const START_LAG: Duration = Duration::from_millis(500);
/// A measured lag counts half as much this much later: a steady stream
/// refreshes the peak with every batch, and the lag of a burst that has ended
/// says little about the next lone event.
pub const HALF_LIFE: Duration = Duration::from_secs(3);
/// The source must also have been silent this long: a keepalive between two
/// transactions of a backlog is not idleness.
pub const QUIET: Duration = Duration::from_millis(100);

/// The largest recent arrival lag, decaying (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct ArrivalLag {
    /// Microseconds, as of `at`.
    peak: f64,
    at: Instant,
}

impl ArrivalLag {
    pub fn new(now: Instant) -> ArrivalLag {
        ArrivalLag {
            peak: START_LAG.as_micros() as f64,
            at: now,
        }
    }

    /// The decayed peak at `now`, in microseconds.
    fn current(&self, now: Instant) -> f64 {
        let halves = now.saturating_duration_since(self.at).as_secs_f64() / HALF_LIFE.as_secs_f64();
        self.peak * 0.5f64.powf(halves)
    }

    /// Records the largest lag of a batch that arrived while caught up.
    pub fn observe(&mut self, lag_micros: i64, now: Instant) {
        self.peak = self.current(now).max(lag_micros.max(0) as f64);
        self.at = now;
    }

    /// How far behind `now - delay` the clock puts the watermark (µs).
    pub fn allowance_micros(&self, now: Instant) -> i64 {
        let min = MIN_ALLOWANCE.as_micros() as f64;
        (MARGIN * self.current(now)).max(min) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1000;

    #[test]
    fn starts_cautious_and_learns_a_prompt_stream() {
        let start = Instant::now();
        let mut lag = ArrivalLag::new(start);
        assert_eq!(lag.allowance_micros(start), 1500 * MS);
        // Prompt events: after a few half-lives only the floor is left.
        for s in 1..=60 {
            lag.observe(10 * MS, start + Duration::from_secs(s));
        }
        assert_eq!(
            lag.allowance_micros(start + Duration::from_secs(60)),
            MIN_ALLOWANCE.as_micros() as i64
        );
    }

    #[test]
    fn a_slow_arrival_widens_the_allowance_at_once_then_decays() {
        let start = Instant::now();
        let mut lag = ArrivalLag::new(start);
        let later = start + Duration::from_secs(120);
        lag.observe(0, later);
        lag.observe(300 * MS, later);
        assert_eq!(lag.allowance_micros(later), 900 * MS);
        let one_half_life = later + HALF_LIFE;
        assert!((lag.allowance_micros(one_half_life) - 450 * MS).abs() < MS);
        // A smaller lag does not shrink it faster than the decay.
        lag.observe(5 * MS, one_half_life);
        assert!((lag.allowance_micros(one_half_life) - 450 * MS).abs() < MS);
    }
}
