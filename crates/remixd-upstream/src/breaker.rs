//! A small circuit breaker per provider: after `failures` unavailable outcomes in a row
//! the provider is skipped for `cooldown`; then one probe is let through, and its
//! outcome closes the circuit or opens it for another cool-down.
//!
//! Written here rather than taken from a crate: the few breaker crates either wrap a
//! whole service stack or count failure rates over windows; this needs three states,
//! an injectable clock for its tests, and "one probe" exactly.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The cool-down ended and one request was let through; the rest wait for it.
    Probing,
}

/// What the breaker says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead (the circuit is closed).
    Yes,
    /// Go ahead as the one probe: report its outcome.
    Probe,
    /// Skip this provider for now.
    No,
}

#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Self {
            failures: failures.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    pub fn admit(&self, now: Instant) -> Admit {
        let mut s = self.state.lock().expect("breaker");
        match *s {
            State::Closed { .. } => Admit::Yes,
            State::Open { until } if now >= until => {
                *s = State::Probing;
                Admit::Probe
            }
            State::Open { .. } | State::Probing => Admit::No,
        }
    }

    /// The provider answered (whatever it said about the task itself).
    pub fn success(&self) {
        *self.state.lock().expect("breaker") = State::Closed { failures: 0 };
    }

    /// The provider was unavailable: connection failure, or 429/5xx after the retries.
    /// `true` when this opened the circuit.
    pub fn failure(&self, now: Instant) -> bool {
        let mut s = self.state.lock().expect("breaker");
        match *s {
            State::Closed { failures } if failures + 1 < self.failures => {
                *s = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::Closed { .. } | State::Probing => {
                *s = State::Open {
                    until: now + self.cooldown,
                };
                true
            }
            // Requests admitted before it opened report late: the cool-down stands.
            State::Open { .. } => false,
        }
    }

    /// A probe that ended without telling (the task was cancelled): the next request
    /// may probe again.
    pub fn probe_abandoned(&self, now: Instant) {
        let mut s = self.state.lock().expect("breaker");
        if *s == State::Probing {
            *s = State::Open { until: now };
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(*self.state.lock().expect("breaker"), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_lets_one_probe_through() {
        let b = Breaker::new(3, Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(b.admit(t0), Admit::Yes);
        assert!(!b.failure(t0));
        b.success();
        // The count is of failures in a row: a success starts it again.
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert!(b.failure(t0), "the third in a row opens it");
        assert!(b.is_open());
        assert_eq!(b.admit(t0 + Duration::from_secs(29)), Admit::No);
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1), Admit::Probe);
        assert_eq!(b.admit(t1), Admit::No, "one probe at a time");
        // The probe fails: another full cool-down.
        assert!(b.failure(t1));
        assert_eq!(b.admit(t1 + Duration::from_secs(29)), Admit::No);
        let t2 = t1 + Duration::from_secs(30);
        assert_eq!(b.admit(t2), Admit::Probe);
        b.success();
        assert!(!b.is_open());
        assert_eq!(b.admit(t2), Admit::Yes);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let b = Breaker::new(1, Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(b.failure(t0));
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(b.admit(t1), Admit::Probe);
        b.probe_abandoned(t1);
        assert_eq!(b.admit(t1), Admit::Probe);
        // A late failure of a request admitted before the circuit opened changes nothing.
        let b = Breaker::new(1, Duration::from_secs(5));
        assert!(b.failure(t0));
        assert!(!b.failure(t0 + Duration::from_secs(4)));
        assert_eq!(b.admit(t0 + Duration::from_secs(5)), Admit::Probe);
    }
}
