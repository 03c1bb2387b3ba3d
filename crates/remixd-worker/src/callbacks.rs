//! The callback deliverer: sends the outbox's deliveries, signs them, retries them.
//!
//! Deliveries are rows written in the transaction that made their task terminal, so a
//! callback is never lost and never blocks generation: this loop is the only reader. It
//! claims due rows with a lease (a deliverer that dies mid-attempt leaves a row that
//! another claims when the lease lapses), runs each attempt as its own task under a
//! semaphore (a receiver that hangs holds one permit for at most the timeout; the rest
//! flow), and records the outcome: 2xx delivered, 410 given up, anything else retried
//! on the schedule with ±10% jitter until it runs out.
//!
//! Signatures (API.md §4): Standard Webhooks v1 over `id.timestamp.body` with the
//! base64-decoded secret, and the hosted service's older scheme over `taskId.timestamp`
//! with the whole secret string. Both are HMAC-SHA256 from the `hmac` crate.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::Rng;
use remixd_domain::now_millis;
use remixd_fetch::{FetchError, Fetcher};
use remixd_store::{AttemptOutcome, DeliveryRecord, Store, TaskRecord};
use sha2::Sha256;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Builds a callback body from a terminal task and the balance left (the api crate's wire
/// format); asynchronous, as its links may be presigned by the bucket.
pub type PayloadFn =
    Arc<dyn Fn(TaskRecord, i64) -> futures::future::BoxFuture<'static, String> + Send + Sync>;

/// The retry delays of API.md §4: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, 8 h.
pub const DEFAULT_SCHEDULE_S: [u64; 9] = [5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800];

/// How the deliverer behaves.
#[derive(Debug, Clone)]
pub struct CallbackConfig {
    /// Limit of one attempt (`callbacks.timeout_s`).
    pub timeout: Duration,
    /// Delays before each retry; after the last, the delivery is given up.
    pub schedule: Vec<Duration>,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// How often to look for due deliveries when nothing woke the loop.
    pub poll_interval: Duration,
    /// `User-Agent` of callbacks.
    pub user_agent: String,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(15),
            schedule: DEFAULT_SCHEDULE_S
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            concurrency: 32,
            poll_interval: Duration::from_secs(1),
            user_agent: concat!("remixd/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac_b64(key: &[u8], msg: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A fresh signing secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::thread_rng().fill(&mut key);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The Standard Webhooks v1 signature header value, `v1,<base64>`.
pub fn standard_signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_")?)
        .ok()?;
    let mut msg = format!("{id}.{timestamp}.").into_bytes();
    msg.extend_from_slice(body);
    Some(format!("v1,{}", hmac_b64(&key, &msg)))
}

/// The hosted service's signature: HMAC over `taskId.timestamp` keyed by the whole secret.
pub fn legacy_signature(secret: &str, task_id: &str, timestamp: i64) -> String {
    hmac_b64(
        secret.as_bytes(),
        format!("{task_id}.{timestamp}").as_bytes(),
    )
}

/// The next attempt's time after `attempts_done` failed attempts, or `None` to give up.
pub fn next_attempt(schedule: &[Duration], attempts_done: i64, now: i64) -> Option<i64> {
    let delay = schedule.get(usize::try_from(attempts_done).ok()?.checked_sub(1)?)?;
    let ms = delay.as_millis() as f64;
    let jitter = rand::thread_rng().gen_range(-0.1..=0.1) * ms;
    Some(now + (ms + jitter).round().max(0.0) as i64)
}

/// The deliverer.
pub struct Deliverer {
    store: Arc<dyn Store>,
    fetcher: Fetcher,
    http: reqwest::Client,
    cfg: CallbackConfig,
    payload: PayloadFn,
    owner: String,
    wake: Arc<Notify>,
}

impl Deliverer {
    pub fn new(
        store: Arc<dyn Store>,
        fetcher: Fetcher,
        cfg: CallbackConfig,
        payload: PayloadFn,
        owner: String,
        wake: Arc<Notify>,
    ) -> Self {
        let http = fetcher.guarded_client();
        Self {
            store,
            fetcher,
            http,
            cfg,
            payload,
            owner,
            wake,
        }
    }

    /// Runs until `shutdown`; attempts in flight finish (they are bounded by the timeout).
    pub fn spawn(self, tracker: &TaskTracker, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let inner = tracker.clone();
        tracker.spawn(async move {
            let permits = Arc::new(Semaphore::new(me.cfg.concurrency.max(1)));
            let mut backoff = crate::backoff::Backoff::new(
                me.cfg.poll_interval,
                crate::backoff::MAX_LOOP_PAUSE,
            );
            while !shutdown.is_cancelled() {
                let free = permits.available_permits() as i64;
                let mut claimed = 0;
                if free > 0 {
                    let now = now_millis();
                    let lease = now + me.cfg.timeout.as_millis() as i64 + 30_000;
                    match me.store.claim_deliveries(&me.owner, now, lease, free).await {
                        Ok(batch) => {
                            backoff.reset();
                            claimed = batch.len();
                            for d in batch {
                                let permit =
                                    permits.clone().acquire_owned().await.expect("never closed");
                                let me = me.clone();
                                inner.spawn(async move {
                                    me.attempt(d).await;
                                    drop(permit);
                                });
                            }
                        }
                        Err(e) => {
                            let pause = backoff.fail();
                            tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "claiming deliveries failed; backing off");
                            tokio::select! {
                                _ = tokio::time::sleep(pause) => {}
                                _ = shutdown.cancelled() => {}
                            }
                            continue;
                        }
                    }
                }
                if claimed > 0 && claimed as i64 == free {
                    // Possibly more due. Claim again once a quarter of the permits are
                    // free: batches keep the claim queries few, and a few hanging
                    // receivers (each holding one permit) cannot stall the rest.
                    let quarter = (me.cfg.concurrency / 4).max(1) as u32;
                    let _ = permits.acquire_many(quarter).await.map(drop);
                    continue;
                }
                tokio::select! {
                    _ = me.wake.notified() => {}
                    _ = tokio::time::sleep(me.cfg.poll_interval) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        });
    }

    async fn attempt(&self, d: DeliveryRecord) {
        let payload = match &d.payload {
            Some(p) => p.clone(),
            None => match self.store.task(&d.task_id).await {
                Ok(Some(task)) => (self.payload)(task, d.remained_credits).await,
                Ok(None) => {
                    let outcome = AttemptOutcome::GiveUp {
                        status: None,
                        error: "the task no longer exists".into(),
                    };
                    let _ = self
                        .store
                        .record_attempt(&d.id, &self.owner, "", &outcome, now_millis())
                        .await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(delivery = %d.id, error = %e, "cannot read the task; the lease will lapse and it is retried");
                    return;
                }
            },
        };
        let outcome = self.send(&d, &payload).await;
        let label = match &outcome {
            AttemptOutcome::Delivered { .. } => "delivered",
            AttemptOutcome::Retry { .. } => "retry",
            AttemptOutcome::GiveUp { .. } => "given_up",
        };
        metrics::counter!("remixd_callback_attempts_total", "outcome" => label).increment(1);
        match &outcome {
            AttemptOutcome::Delivered { status } => {
                tracing::info!(delivery = %d.id, task = %d.task_id, status, "callback delivered")
            }
            AttemptOutcome::Retry { error, .. } => {
                tracing::info!(delivery = %d.id, task = %d.task_id, error = %error, "callback failed; will retry")
            }
            AttemptOutcome::GiveUp { error, .. } => {
                tracing::warn!(delivery = %d.id, task = %d.task_id, error = %error, "callback given up")
            }
        }
        if let Err(e) = self
            .store
            .record_attempt(&d.id, &self.owner, &payload, &outcome, now_millis())
            .await
        {
            tracing::warn!(delivery = %d.id, error = %e, "could not record the attempt; it will be repeated");
        }
    }

    async fn send(&self, d: &DeliveryRecord, payload: &str) -> AttemptOutcome {
        let retry_or_give_up = |status: Option<u16>, error: String| match next_attempt(
            &self.cfg.schedule,
            d.attempts + 1,
            now_millis(),
        ) {
            Some(next_attempt) => AttemptOutcome::Retry {
                status,
                error,
                next_attempt,
            },
            None => AttemptOutcome::GiveUp {
                status,
                error: format!("{error}; no attempts left"),
            },
        };
        let url = match url::Url::parse(&d.url) {
            Ok(u) => u,
            Err(e) => {
                return AttemptOutcome::GiveUp {
                    status: None,
                    error: format!("callBackUrl is not a URL: {e}"),
                }
            }
        };
        if let Err(e) = self.fetcher.check_url(&url) {
            return AttemptOutcome::GiveUp {
                status: None,
                error: format!("callBackUrl {e}"),
            };
        }
        let secret = match self.store.webhook_secret(&d.account_id).await {
            Ok(s) => s,
            Err(e) => {
                return retry_or_give_up(None, format!("cannot read the signing secret: {e}"))
            }
        };
        let ts = now_millis() / 1000;
        let mut req = self
            .http
            .post(url)
            .timeout(self.cfg.timeout)
            .header("content-type", "application/json")
            .header("user-agent", &self.cfg.user_agent)
            .header("webhook-id", &d.id)
            .header("webhook-timestamp", ts.to_string());
        if let Some(secret) = &secret {
            if let Some(sig) = standard_signature(secret, &d.id, ts, payload.as_bytes()) {
                req = req.header("webhook-signature", sig);
            }
            req = req.header("x-webhook-timestamp", ts.to_string()).header(
                "x-webhook-signature",
                legacy_signature(secret, &d.task_id.to_string(), ts),
            );
        }
        match req.body(payload.to_string()).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if resp.status().is_success() {
                    AttemptOutcome::Delivered { status }
                } else if status == 410 {
                    AttemptOutcome::GiveUp {
                        status: Some(410),
                        error: "the receiver answered 410 Gone".into(),
                    }
                } else {
                    retry_or_give_up(Some(status), format!("the receiver answered HTTP {status}"))
                }
            }
            Err(e) => {
                if let Some(blocked) = find_blocked(&e) {
                    return AttemptOutcome::GiveUp {
                        status: None,
                        error: format!("callBackUrl {blocked}"),
                    };
                }
                let what = if e.is_timeout() {
                    format!("timed out after {} s", self.cfg.timeout.as_secs_f64())
                } else {
                    format!("could not connect: {}", innermost(&e))
                };
                retry_or_give_up(None, what)
            }
        }
    }
}

/// A policy refusal from the guarded resolver, if that is what failed.
fn find_blocked(e: &reqwest::Error) -> Option<FetchError> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(f @ FetchError::Blocked { .. }) = s.downcast_ref::<FetchError>() {
            return Some(f.clone());
        }
        src = s.source();
    }
    None
}

fn innermost(e: &reqwest::Error) -> String {
    let mut last = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        last = s.to_string();
        src = s.source();
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_test_vector() {
        // The example of the Standard Webhooks specification.
        let sig = standard_signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        assert_eq!(standard_signature("no-prefix", "id", 1, b""), None);
    }

    #[test]
    fn the_schedule_grows_then_gives_up() {
        // API.md §4, written out here rather than read from the constant under test.
        const CONTRACT_S: [u64; 9] = [5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800];
        assert_eq!(DEFAULT_SCHEDULE_S, CONTRACT_S);
        let s: Vec<_> = DEFAULT_SCHEDULE_S
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect();
        for (done, want_s) in CONTRACT_S.iter().enumerate() {
            let at = next_attempt(&s, done as i64 + 1, 0).unwrap() as f64 / 1000.0;
            let want = *want_s as f64;
            assert!(
                (want * 0.9..=want * 1.1).contains(&at),
                "after failure {}: {at} s",
                done + 1
            );
        }
        assert_eq!(
            next_attempt(&s, 10, 0),
            None,
            "ten attempts in all, then give up"
        );
        let total: u64 = CONTRACT_S.iter().sum();
        assert!((15 * 3600..17 * 3600).contains(&total), "about 16 h in all");
    }

    #[test]
    fn secrets_are_whsec_and_32_bytes() {
        let s = new_secret();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s.strip_prefix("whsec_").unwrap())
            .unwrap();
        assert_eq!(raw.len(), 32);
        assert_ne!(s, new_secret());
    }
}
