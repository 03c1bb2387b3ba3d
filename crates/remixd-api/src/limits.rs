//! Rate limits: creates and uploads per account per 10 s, queries per key per second;
//! and caps on uploads in flight, per account and in all.
//!
//! GCRA limiters keyed by account or key id. Where the store keeps shared counters
//! (PostgreSQL: [`Store::rate_check`]), the rate limits are counted there, so N API nodes
//! enforce the same limits as one; otherwise, and whenever the database cannot answer,
//! `governor`'s limiters in this process's memory count them. Over the limit the request
//! is answered 429 at once with `Retry-After`; nothing is queued. The caps on uploads in
//! flight bound this process's memory, so they stay per process.
//!
//! An upload holds up to two copies of a 10 MB file while it is read and checked, so
//! the number in flight is what bounds the memory uploads take: an [`UploadSlot`] is
//! taken before the body is read and given back when the handler ends.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use remixd_store::{RateDecision, Store};

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// One rate limit: this process's limiter, and the same limit for the shared counters.
struct Limiter {
    /// Names the limit in the shared counters' keys.
    name: &'static str,
    local: Keyed,
    /// Microseconds between requests on average.
    interval_us: i64,
    burst: i64,
}

/// The limiters of the API.
pub struct Limits {
    create: Option<Limiter>,
    query: Option<Limiter>,
    upload: Option<Limiter>,
    clock: DefaultClock,
    uploads: Arc<Mutex<InFlight>>,
    shared: Option<Arc<dyn Store>>,
    /// When the last warning about unavailable shared counters was logged (Unix ms),
    /// and how many failures went unlogged since: one warning per
    /// [`OUTAGE_WARNING_EVERY_MS`], not one per request, while the database is down.
    outage: Mutex<(i64, u64)>,
}

/// How often an outage of the shared counters is logged.
const OUTAGE_WARNING_EVERY_MS: i64 = 30_000;

/// Uploads being handled now.
#[derive(Debug, Default)]
struct InFlight {
    /// At most this many per account; 0: no cap.
    per_account: usize,
    /// At most this many in all; 0: no cap.
    total: usize,
    now_total: usize,
    now: HashMap<String, usize>,
}

/// Why an upload slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefused {
    /// The account has `limit` uploads in flight already.
    Account { limit: usize },
    /// The server has `limit` uploads in flight already.
    Server { limit: usize },
}

/// One upload in flight; dropping it gives the slot back.
#[derive(Debug)]
pub struct UploadSlot {
    account: String,
    uploads: Arc<Mutex<InFlight>>,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut f = self.uploads.lock().expect("upload slots");
        f.now_total -= 1;
        if let Some(n) = f.now.get_mut(&self.account) {
            *n -= 1;
            if *n == 0 {
                f.now.remove(&self.account);
            }
        }
    }
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").finish_non_exhaustive()
    }
}

/// `n` requests per `period`, all of them usable in a burst. `0` turns the limit off.
fn limiter(name: &'static str, n: u32, period: Duration) -> Option<Limiter> {
    let burst = NonZeroU32::new(n)?;
    let quota = Quota::with_period(period / n)?.allow_burst(burst);
    Some(Limiter {
        name,
        local: RateLimiter::keyed(quota),
        interval_us: ((period / n).as_micros() as i64).max(1),
        burst: i64::from(n),
    })
}

impl Limits {
    /// Create and query limits; uploads unlimited until [`Limits::with_uploads`].
    pub fn new(create_per_10s: u32, query_per_s: u32) -> Self {
        Self {
            create: limiter("create", create_per_10s, Duration::from_secs(10)),
            query: limiter("query", query_per_s, Duration::from_secs(1)),
            upload: None,
            clock: DefaultClock::default(),
            uploads: Arc::default(),
            shared: None,
            outage: Mutex::new((i64::MIN, 0)),
        }
    }

    /// Counts the rate limits in `store`'s shared counters when it keeps them.
    pub fn shared_through(mut self, store: Arc<dyn Store>) -> Self {
        self.shared = Some(store);
        self
    }

    /// Upload limits: `per_10s` per account (0: none), and at most `per_account` and
    /// `total` uploads in flight (0: no cap).
    pub fn with_uploads(mut self, per_10s: u32, per_account: usize, total: usize) -> Self {
        self.upload = limiter("upload", per_10s, Duration::from_secs(10));
        {
            let mut f = self.uploads.lock().expect("upload slots");
            f.per_account = per_account;
            f.total = total;
        }
        self
    }

    async fn check(&self, limiter: &Option<Limiter>, key: &str) -> Result<(), u64> {
        let Some(l) = limiter else { return Ok(()) };
        if let Some(store) = &self.shared {
            let counter = format!("{} {key}", l.name);
            match store.rate_check(&counter, l.interval_us, l.burst).await {
                Ok(Some(RateDecision::Allowed)) => return Ok(()),
                Ok(Some(RateDecision::Wait { us })) => {
                    return Err((us.max(0) as u64).div_ceil(1_000_000).max(1))
                }
                Ok(None) => {}
                Err(e) => self.outage_seen(&e),
            }
        }
        l.local.check_key(&key.to_string()).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    /// Logs an outage of the shared counters, at most once per
    /// [`OUTAGE_WARNING_EVERY_MS`], with the number of failures since the last warning.
    fn outage_seen(&self, e: &remixd_store::StoreError) {
        let now = remixd_domain::now_millis();
        let mut o = self.outage.lock().expect("outage");
        o.1 += 1;
        if now.saturating_sub(o.0) >= OUTAGE_WARNING_EVERY_MS {
            tracing::warn!(
                error = %e,
                failures = o.1,
                "shared rate limits unavailable; this node limits on its own meanwhile"
            );
            *o = (now, 0);
        }
    }

    /// A createTask by this account; `Err(seconds to wait)` when over the limit.
    pub async fn check_create(&self, account_id: &str) -> Result<(), u64> {
        self.check(&self.create, account_id).await
    }

    /// A query by this key; `Err(seconds to wait)` when over the limit.
    pub async fn check_query(&self, key_id: &str) -> Result<(), u64> {
        self.check(&self.query, key_id).await
    }

    /// An upload by this account; `Err(seconds to wait)` when over the limit.
    pub async fn check_upload(&self, account_id: &str) -> Result<(), u64> {
        self.check(&self.upload, account_id).await
    }

    /// A slot for one upload of this account, held while it is handled.
    pub fn upload_slot(&self, account_id: &str) -> Result<UploadSlot, SlotRefused> {
        let mut f = self.uploads.lock().expect("upload slots");
        if f.total > 0 && f.now_total >= f.total {
            return Err(SlotRefused::Server { limit: f.total });
        }
        let mine = f.now.get(account_id).copied().unwrap_or(0);
        if f.per_account > 0 && mine >= f.per_account {
            return Err(SlotRefused::Account {
                limit: f.per_account,
            });
        }
        f.now_total += 1;
        *f.now.entry(account_id.to_string()).or_default() += 1;
        Ok(UploadSlot {
            account: account_id.to_string(),
            uploads: self.uploads.clone(),
        })
    }

    /// Forgets idle keys, so the maps (and the shared counters) do not grow without bound.
    pub async fn prune(&self) {
        for l in [&self.create, &self.query, &self.upload]
            .into_iter()
            .flatten()
        {
            l.local.retain_recent();
            l.local.shrink_to_fit();
        }
        if let Some(store) = &self.shared {
            if let Err(e) = store.prune_rates().await {
                tracing::debug!(error = %e, "could not prune the shared rate counters");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_logged_once_per_interval_with_its_count() {
        let l = Limits::new(1, 1);
        let e = remixd_store::StoreError::Full("test".into());
        l.outage_seen(&e);
        let (logged_at, unlogged) = *l.outage.lock().unwrap();
        assert!(
            logged_at > 0 && unlogged == 0,
            "the first failure is logged"
        );
        for _ in 0..5 {
            l.outage_seen(&e);
        }
        assert_eq!(
            *l.outage.lock().unwrap(),
            (logged_at, 5),
            "later ones are counted, not logged"
        );
        l.outage.lock().unwrap().0 -= OUTAGE_WARNING_EVERY_MS;
        l.outage_seen(&e);
        assert_eq!(
            l.outage.lock().unwrap().1,
            0,
            "logged again after the interval"
        );
    }

    #[tokio::test]
    async fn burst_then_refuse_per_key() {
        let l = Limits::new(3, 2);
        for _ in 0..3 {
            assert!(l.check_create("a").await.is_ok());
        }
        let wait = l.check_create("a").await.unwrap_err();
        assert!((1..=4).contains(&wait), "{wait}");
        assert!(l.check_create("b").await.is_ok(), "limits are per account");
        assert!(l.check_query("k").await.is_ok() && l.check_query("k").await.is_ok());
        assert!(l.check_query("k").await.is_err());
        let off = Limits::new(0, 0);
        for _ in 0..100 {
            assert!(off.check_create("a").await.is_ok());
            assert!(
                off.check_upload("a").await.is_ok(),
                "no upload limit unless set"
            );
        }
    }

    #[tokio::test]
    async fn uploads_are_rate_limited_per_account() {
        let l = Limits::new(0, 0).with_uploads(2, 0, 0);
        assert!(l.check_upload("a").await.is_ok() && l.check_upload("a").await.is_ok());
        let wait = l.check_upload("a").await.unwrap_err();
        assert!((1..=5).contains(&wait), "{wait}");
        assert!(l.check_upload("b").await.is_ok());
        assert!(
            l.check_create("a").await.is_ok(),
            "creates have their own limiter"
        );
    }

    #[test]
    fn upload_slots_cap_each_account_and_the_server() {
        let l = Limits::new(0, 0).with_uploads(0, 2, 3);
        let a1 = l.upload_slot("a").unwrap();
        let a2 = l.upload_slot("a").unwrap();
        assert_eq!(
            l.upload_slot("a").unwrap_err(),
            SlotRefused::Account { limit: 2 }
        );
        let b1 = l.upload_slot("b").unwrap();
        assert_eq!(
            l.upload_slot("c").unwrap_err(),
            SlotRefused::Server { limit: 3 }
        );
        drop(a1);
        // The freed slot is usable by anyone, the account's own cap still holds.
        let c1 = l.upload_slot("c").unwrap();
        assert_eq!(
            l.upload_slot("b").unwrap_err(),
            SlotRefused::Server { limit: 3 }
        );
        drop((a2, b1, c1));
        assert!(
            l.uploads.lock().unwrap().now.is_empty(),
            "no idle entries kept"
        );
        let _all: Vec<_> = (0..3)
            .map(|i| l.upload_slot(&i.to_string()).unwrap())
            .collect();
        let off = Limits::new(0, 0);
        let _many: Vec<_> = (0..100).map(|_| off.upload_slot("a").unwrap()).collect();
    }
}
