//! Exponential backoff with jitter for every retry in the workers.
//!
//! A loop whose store call fails (the database is locked, the disk is full) must not spin:
//! each consecutive failure doubles its pause up to a ceiling, and one success resets it.
//! Tasks released for a later attempt wait `retry_delay × 2^(attempt − 1)`, capped. The
//! jitter (±20 %) keeps several workers that failed together from retrying in lockstep.

use std::time::Duration;

use rand::Rng;

/// The longest pause of a failing loop.
pub const MAX_LOOP_PAUSE: Duration = Duration::from_secs(30);
/// The longest wait before a released task is tried again.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);

/// `base × 2^(n − 1)` for the n-th consecutive failure (n ≥ 1), capped at `max`.
pub fn exponential(base: Duration, n: u32, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

/// When a task released after its `attempt`-th try (1-based) may be claimed again:
/// `base × 2^(attempt − 1)` with jitter, capped at [`MAX_RETRY_DELAY`].
pub fn retry_at(now: remixd_domain::Millis, base: Duration, attempt: i64) -> remixd_domain::Millis {
    let n = attempt.clamp(1, 64) as u32;
    now + jitter(exponential(base, n, MAX_RETRY_DELAY)).as_millis() as i64
}

/// `d` scaled by a random factor in [0.8, 1.2].
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.8..=1.2))
}

/// The pause of a loop, growing with consecutive failures.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base: base.max(Duration::from_millis(10)),
            max,
            failures: 0,
        }
    }

    /// Records a failure; returns how long to pause before the next try.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        jitter(exponential(self.base, self.failures, self.max))
    }

    /// A success: the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_resets() {
        let s = Duration::from_secs;
        assert_eq!(exponential(s(1), 1, s(30)), s(1));
        assert_eq!(exponential(s(1), 2, s(30)), s(2));
        assert_eq!(exponential(s(1), 5, s(30)), s(16));
        assert_eq!(exponential(s(1), 6, s(30)), s(30));
        assert_eq!(exponential(s(1), 200, s(30)), s(30), "no overflow");
        let mut b = Backoff::new(Duration::from_millis(100), s(30));
        let pauses: Vec<_> = (0..4).map(|_| b.fail()).collect();
        for (i, p) in pauses.iter().enumerate() {
            let want = 100.0 * 2f64.powi(i as i32);
            let got = p.as_secs_f64() * 1000.0;
            assert!(got >= want * 0.79 && got <= want * 1.21, "{i}: {got} ms");
        }
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(b.fail() <= Duration::from_millis(121));
    }
}
