//! Rate limits: creates per account per 10 s, queries per key per second.
//!
//! GCRA limiters from `governor`, keyed by account or key id, in this process's
//! memory: each API node enforces them on its own. Over the limit the request is
//! answered 429 at once with `Retry-After`; nothing is queued.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// The two limiters of the API.
pub struct Limits {
    create: Option<Keyed>,
    query: Option<Keyed>,
    clock: DefaultClock,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").finish_non_exhaustive()
    }
}

/// `n` requests per `period`, all of them usable in a burst. `0` turns the limit off.
fn quota(n: u32, period: Duration) -> Option<Quota> {
    let burst = NonZeroU32::new(n)?;
    Quota::with_period(period / n).map(|q| q.allow_burst(burst))
}

impl Limits {
    pub fn new(create_per_10s: u32, query_per_s: u32) -> Self {
        Self {
            create: quota(create_per_10s, Duration::from_secs(10)).map(RateLimiter::keyed),
            query: quota(query_per_s, Duration::from_secs(1)).map(RateLimiter::keyed),
            clock: DefaultClock::default(),
        }
    }

    fn check(&self, limiter: &Option<Keyed>, key: &str) -> Result<(), u64> {
        let Some(l) = limiter else { return Ok(()) };
        l.check_key(&key.to_string()).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    /// A createTask by this account; `Err(seconds to wait)` when over the limit.
    pub fn check_create(&self, account_id: &str) -> Result<(), u64> {
        self.check(&self.create, account_id)
    }

    /// A query by this key; `Err(seconds to wait)` when over the limit.
    pub fn check_query(&self, key_id: &str) -> Result<(), u64> {
        self.check(&self.query, key_id)
    }

    /// Forgets idle keys, so the maps do not grow without bound.
    pub fn prune(&self) {
        for l in [&self.create, &self.query].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_per_key() {
        let l = Limits::new(3, 2);
        for _ in 0..3 {
            assert!(l.check_create("a").is_ok());
        }
        let wait = l.check_create("a").unwrap_err();
        assert!((1..=4).contains(&wait), "{wait}");
        assert!(l.check_create("b").is_ok(), "limits are per account");
        assert!(l.check_query("k").is_ok() && l.check_query("k").is_ok());
        assert!(l.check_query("k").is_err());
        let off = Limits::new(0, 0);
        for _ in 0..100 {
            assert!(off.check_create("a").is_ok());
        }
    }
}
