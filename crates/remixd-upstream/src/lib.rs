//! The upstream engines: a task runs on a provider's copy of the real model, and its
//! images land in remixd's own storage.
//!
//! - [`fal`]: fal's queue API for `fal-ai/ideogram/character/remix`: submit, follow the
//!   status/response/cancel URLs the submit answer gave, copy the result images.
//! - [`ideogram`]: Ideogram's synchronous multipart remix request, the inputs sent as
//!   files; results resized to the size preset's pixels.
//!
//! [`Gateway`] is the [`Engine`]: it tries the configured providers in order
//! (`engine.kind`, then `engine.fallback`), skipping one whose circuit is open
//! ([`breaker`]), and moves to the next when one is unavailable (connection failure,
//! 429 or 5xx after its retries) *before it accepted the task*. Once a provider has a
//! request for the task, its handle is checkpointed into the task's row (never a key),
//! and every later attempt (another worker after a crash, a retry) resumes that request
//! on that provider: a task is never submitted twice where the provider gives an id.
//!
//! Invariants: provider keys never leave [`ProviderConfig`] except in the auth header
//! (messages pass through [`http::Caller::redact`]); status, result and cancel URLs are
//! followed only on the origin of the configured base URL, so a forged answer cannot
//! send the key elsewhere; result images are downloaded through the fetcher, under the
//! address policy and size limits, like any other URL from outside.

use std::time::Duration;

use async_trait::async_trait;
use remixd_engine::{
    Engine, EngineError, EngineImage, InputRole, Job, Progress, Source, WorkingSize,
};
use remixd_fetch::Fetcher;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub mod breaker;
pub mod fal;
pub mod http;
pub mod ideogram;

use breaker::{Admit, Breaker};

/// The bound on `remixd engines check`'s one call per provider.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// The providers remixd can send a task to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Fal,
    Ideogram,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fal" => Some(Self::Fal),
            "ideogram" => Some(Self::Ideogram),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Fal => "fal",
            Self::Ideogram => "ideogram",
        }
    }
    /// The provider's real API, the default `base_url`.
    pub fn default_base_url(self) -> &'static str {
        match self {
            Self::Fal => "https://queue.fal.run",
            Self::Ideogram => "https://api.ideogram.ai",
        }
    }
}

/// One provider's settings (`engine.fal.*`, `engine.ideogram.*`).
#[derive(Clone)]
pub struct ProviderConfig {
    pub key: String,
    pub base_url: String,
    /// Requests this process has open at the provider at once.
    pub concurrency: usize,
    pub connect_timeout: Duration,
    /// One HTTP exchange, answer included (Ideogram's is the whole generation).
    pub request_timeout: Duration,
    /// Everything for one task on this provider: submit, wait, results.
    pub task_timeout: Duration,
    /// Retries of one call on connection failures, 429 and 5xx.
    pub retries: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How often a queued request's status is asked (fal).
    pub poll_interval: Duration,
    /// Unavailable outcomes in a row that open the circuit, and its cool-down.
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    /// fal: send every input as a `data:` URI of its bytes instead of a URL (for
    /// servers the provider cannot reach on `server.public_url`).
    pub inline_inputs: bool,
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("key", &"<redacted>")
            .field("base_url", &self.base_url)
            .field("concurrency", &self.concurrency)
            .field("task_timeout", &self.task_timeout)
            .finish_non_exhaustive()
    }
}

impl ProviderConfig {
    /// The defaults for `kind`, with `key`.
    pub fn new(kind: Kind, key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            base_url: kind.default_base_url().to_string(),
            concurrency: 8,
            connect_timeout: Duration::from_secs(10),
            request_timeout: match kind {
                Kind::Fal => Duration::from_secs(60),
                Kind::Ideogram => Duration::from_secs(180),
            },
            task_timeout: Duration::from_secs(900),
            retries: 4,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            poll_interval: Duration::from_millis(500),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            inline_inputs: false,
        }
    }
}

/// Everything the gateway needs.
#[derive(Clone)]
pub struct GatewayConfig {
    /// Providers in the order they are tried: `engine.kind`, then `engine.fallback`.
    pub providers: Vec<(Kind, ProviderConfig)>,
    /// Downloads result images under the address policy.
    pub fetcher: Fetcher,
    /// The largest result image accepted, in bytes.
    pub max_result_bytes: u64,
}

/// A provider's handle on one task's request, checkpointed into the task's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Handle {
    pub provider: Kind,
    pub request_id: String,
    pub status_url: String,
    pub response_url: String,
    pub cancel_url: Option<String>,
}

/// What one run of a provider has to work with.
pub struct Run<'a> {
    pub job: &'a Job,
    pub progress: &'a Progress,
    pub cancel: &'a CancellationToken,
    /// The task's deadline on this provider.
    pub deadline: Instant,
    /// Set once the provider holds a request for the task: from then on the task may
    /// not move to another provider.
    pub submitted: bool,
}

impl Run<'_> {
    /// Records `handle` in the task's row before waiting on the provider.
    pub async fn checkpoint(&mut self, handle: &Handle) -> Result<(), String> {
        self.submitted = true;
        let Some(save) = &self.job.upstream.checkpoint else {
            return Ok(());
        };
        save(serde_json::to_string(handle).expect("handle serialises")).await
    }

    /// The inputs in `role`, in order.
    pub fn sources(&self, role: InputRole) -> impl Iterator<Item = &Source> {
        self.job
            .upstream
            .sources
            .iter()
            .filter(move |s| s.role == role)
    }

    pub fn source(&self, role: InputRole) -> Result<&Source, EngineError> {
        self.sources(role)
            .next()
            .ok_or_else(|| EngineError::Internal(format!("the job carries no {role:?} input")))
    }
}

/// One provider's protocol.
#[async_trait]
pub trait Provider: Send + Sync {
    fn kind(&self) -> Kind;
    /// Runs the task on the provider, resuming `resume` when an earlier attempt left it.
    async fn run(
        &self,
        run: &mut Run<'_>,
        resume: Option<Handle>,
    ) -> Result<Vec<EngineImage>, EngineError>;
    /// Cancels the provider's request, best effort.
    async fn cancel(&self, handle: &Handle);
    /// One cheap authenticated call: what works, in a sentence.
    async fn check(&self) -> Result<String, String>;
}

struct Slot {
    provider: Box<dyn Provider>,
    breaker: Breaker,
    permits: Semaphore,
    task_timeout: Duration,
}

/// The upstream [`Engine`]: providers in order, with failover.
pub struct Gateway {
    name: String,
    slots: Vec<Slot>,
    /// The decoders' pixel limit, for inputs turned upright.
    max_pixels: u64,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig) -> Result<Self, String> {
        if cfg.providers.is_empty() {
            return Err("no provider configured".into());
        }
        let mut slots = Vec::new();
        for (kind, p) in &cfg.providers {
            if p.key.trim().is_empty() {
                return Err(format!(
                    "engine.{0}.key is not set (or the {1} environment variable)",
                    kind.name(),
                    key_env(*kind)
                ));
            }
            if slots.iter().any(|s: &Slot| s.provider.kind() == *kind) {
                return Err(format!("{} is listed twice", kind.name()));
            }
            let provider: Box<dyn Provider> = match kind {
                Kind::Fal => Box::new(fal::Fal::new(p.clone(), &cfg)?),
                Kind::Ideogram => Box::new(ideogram::Ideogram::new(p.clone(), &cfg)?),
            };
            slots.push(Slot {
                provider,
                breaker: Breaker::new(p.breaker_failures, p.breaker_cooldown),
                permits: Semaphore::new(p.concurrency.max(1)),
                task_timeout: p.task_timeout,
            });
        }
        let name = cfg.providers[0].0.name().to_string();
        Ok(Self {
            name,
            slots,
            max_pixels: cfg.fetcher.config().max_pixels,
        })
    }

    /// The providers, in order.
    pub fn providers(&self) -> Vec<Kind> {
        self.slots.iter().map(|s| s.provider.kind()).collect()
    }

    /// One cheap authenticated call to each provider.
    pub async fn check(&self) -> Vec<(Kind, Result<String, String>)> {
        let mut out = Vec::new();
        for s in &self.slots {
            out.push((s.provider.kind(), s.provider.check().await));
        }
        out
    }

    /// Whether a provider's circuit is open now.
    pub fn circuit_open(&self, kind: Kind) -> bool {
        self.slot(kind).is_some_and(|s| s.breaker.is_open())
    }

    fn slot(&self, kind: Kind) -> Option<&Slot> {
        self.slots.iter().find(|s| s.provider.kind() == kind)
    }

    async fn run_on(
        &self,
        slot: &Slot,
        job: &Job,
        progress: &Progress,
        cancel: &CancellationToken,
        resume: Option<Handle>,
    ) -> (Result<Vec<EngineImage>, EngineError>, bool) {
        let kind = slot.provider.kind().name();
        let _permit = tokio::select! {
            p = slot.permits.acquire() => p.expect("never closed"),
            () = cancel.cancelled() => return (Err(EngineError::Cancelled), false),
        };
        let mut run = Run {
            job,
            progress,
            cancel,
            deadline: Instant::now() + slot.task_timeout,
            submitted: resume.is_some(),
        };
        let out = slot.provider.run(&mut run, resume).await;
        let outcome = match &out {
            Ok(_) => "success",
            Err(EngineError::BadInput(_)) => "bad_input",
            Err(EngineError::GenerationFailed(_)) => "failed",
            Err(EngineError::Unavailable(_)) => "unavailable",
            Err(EngineError::Internal(_)) => "internal",
            Err(EngineError::Cancelled) => "cancelled",
        };
        metrics::counter!("remixd_upstream_tasks_total", "provider" => kind, "outcome" => outcome)
            .increment(1);
        (out, run.submitted)
    }
}

/// The environment variable a provider's key may come from.
pub fn key_env(kind: Kind) -> &'static str {
    match kind {
        Kind::Fal => "FAL_KEY",
        Kind::Ideogram => "IDEOGRAM_API_KEY",
    }
}

#[async_trait]
impl Engine for Gateway {
    fn name(&self) -> &str {
        &self.name
    }

    /// Configured is ready: the providers are not called on every probe.
    async fn ready(&self) -> Result<(), EngineError> {
        Ok(())
    }

    fn working_size(&self, _role: InputRole, _output: (u32, u32)) -> WorkingSize {
        WorkingSize::Unused
    }

    fn wants_sources(&self) -> bool {
        true
    }

    async fn abandon(&self, handle: &str) {
        let Ok(h) = serde_json::from_str::<Handle>(handle) else {
            return;
        };
        if let Some(slot) = self.slot(h.provider) {
            slot.provider.cancel(&h).await;
        }
    }

    async fn generate(
        &self,
        job: Job,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Vec<EngineImage>, EngineError> {
        if let Some(stored) = &job.upstream.resume {
            let h: Handle = serde_json::from_str(stored).map_err(|e| {
                EngineError::Internal(format!("the task's provider handle is unreadable: {e}"))
            })?;
            let Some(slot) = self.slot(h.provider) else {
                return Err(EngineError::GenerationFailed(format!(
                    "the task was sent to {} by an earlier attempt, and {} is no longer configured",
                    h.provider.name(),
                    h.provider.name()
                )));
            };
            tracing::info!(task = %job.task_id, provider = h.provider.name(), "resuming the provider's request");
            let (out, _) = self.run_on(slot, &job, &progress, &cancel, Some(h)).await;
            return out;
        }
        let mut job = job;
        upright_sources(&mut job, self.max_pixels).await?;
        let mut reasons = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let kind = slot.provider.kind().name();
            let admit = slot.breaker.admit(std::time::Instant::now());
            if admit == Admit::No {
                reasons.push(format!("{kind}: circuit open"));
                continue;
            }
            let (out, submitted) = self.run_on(slot, &job, &progress, &cancel, None).await;
            match &out {
                Err(EngineError::Unavailable(msg)) => {
                    if slot.breaker.failure(std::time::Instant::now()) {
                        tracing::warn!(
                            provider = kind,
                            "circuit opened: the provider is skipped for its cool-down"
                        );
                        metrics::gauge!("remixd_upstream_circuit_open", "provider" => kind)
                            .set(1.0);
                    }
                    if submitted {
                        // The provider holds a request: a retry resumes it there.
                        return out;
                    }
                    // The provider's messages name it already.
                    reasons.push(msg.clone());
                    if let Some(next) = self.slots.get(i + 1) {
                        tracing::warn!(task = %job.task_id, from = kind, to = next.provider.kind().name(), reason = %msg, "failing over");
                        metrics::counter!("remixd_upstream_failovers_total", "from" => kind, "to" => next.provider.kind().name())
                            .increment(1);
                    }
                }
                Err(EngineError::Cancelled) => {
                    if admit == Admit::Probe {
                        slot.breaker.probe_abandoned(std::time::Instant::now());
                    }
                    return out;
                }
                _ => {
                    slot.breaker.success();
                    metrics::gauge!("remixd_upstream_circuit_open", "provider" => kind).set(0.0);
                    return out;
                }
            }
        }
        Err(EngineError::Unavailable(reasons.join("; ")))
    }
}

/// Inputs whose EXIF orientation asks for a rotation or flip go to the provider
/// upright, as remixd's own engines see them: decoded with the orientation applied,
/// re-encoded as PNG, and passed as a `data:` URI (the client's URL still serves the
/// stored orientation, and providers differ in whether they read EXIF).
pub async fn upright_sources(job: &mut Job, max_pixels: u64) -> Result<(), EngineError> {
    for s in &mut job.upstream.sources {
        if !remixd_fetch::needs_orientation(&s.bytes) {
            continue;
        }
        let (bytes, role) = (s.bytes.clone(), s.role);
        let png = tokio::task::spawn_blocking(move || {
            let img: image::DynamicImage = if role == InputRole::Mask {
                remixd_fetch::decode_luma(&bytes, max_pixels)?.into()
            } else {
                remixd_fetch::decode_rgb(&bytes, max_pixels)?.into()
            };
            let mut out = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
                .map_err(|e| remixd_fetch::FetchError::Decode(e.to_string()))?;
            Ok::<_, remixd_fetch::FetchError>(out)
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?
        .map_err(|e| EngineError::BadInput(format!("{} {e}", s.field)))?;
        s.url = data_uri(&png);
        s.bytes = png.into();
    }
    Ok(())
}

/// A `data:` URI of an image's bytes, its type taken from the bytes.
pub(crate) fn data_uri(bytes: &[u8]) -> String {
    use base64::Engine as _;
    let mime = remixd_fetch::sniff(bytes).map_or("image/png", |k| k.mime());
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Whether `url` is on the origin (scheme, host, port) of `base`: the only URLs a
/// provider's answer may send the key to.
pub(crate) fn same_origin(base: &str, url: &str) -> bool {
    match (url::Url::parse(base), url::Url::parse(url)) {
        (Ok(b), Ok(u)) => b.origin() == u.origin(),
        _ => false,
    }
}

/// Downloads one result image through the fetcher, retrying a failed download a few
/// times: result URLs are short-lived copies on the provider's file servers.
pub(crate) async fn download_result(
    fetcher: &Fetcher,
    provider: &str,
    url: &str,
    max_bytes: u64,
    index: usize,
    cancel: &CancellationToken,
    deadline: Instant,
) -> Result<remixd_fetch::FetchedImage, EngineError> {
    const TRIES: u32 = 3;
    let mut last = String::new();
    for attempt in 0..TRIES {
        let got = tokio::select! {
            () = cancel.cancelled() => return Err(EngineError::Cancelled),
            () = tokio::time::sleep_until(deadline) => break,
            r = fetcher.fetch_image(url, max_bytes) => r,
        };
        match got {
            Ok(img) => return Ok(img),
            Err(e) => {
                last = e.to_string();
                tracing::warn!(provider, index, attempt, error = %last, "result download failed");
            }
        }
        if attempt + 1 < TRIES {
            let pause = http::jittered(Duration::from_millis(500), Duration::from_secs(5), attempt);
            tokio::select! {
                () = cancel.cancelled() => return Err(EngineError::Cancelled),
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
    Err(EngineError::GenerationFailed(format!(
        "{provider} made the images, but result image {index} could not be downloaded: it {last}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_urls_on_the_base_origin_are_followed() {
        let base = "https://queue.fal.run";
        assert!(same_origin(
            base,
            "https://queue.fal.run/fal-ai/ideogram/requests/1/status"
        ));
        assert!(same_origin("http://127.0.0.1:9/x", "http://127.0.0.1:9/y"));
        for other in [
            "http://queue.fal.run/x",
            "https://queue.fal.run:444/x",
            "https://evil.example/x",
            "https://queue.fal.run.evil.example/x",
            "not a url",
        ] {
            assert!(!same_origin(base, other), "{other}");
        }
    }

    #[test]
    fn handles_round_trip_and_hold_no_key() {
        let h = Handle {
            provider: Kind::Fal,
            request_id: "r1".into(),
            status_url: "s".into(),
            response_url: "r".into(),
            cancel_url: None,
        };
        let text = serde_json::to_string(&h).unwrap();
        assert_eq!(
            text,
            r#"{"provider":"fal","requestId":"r1","statusUrl":"s","responseUrl":"r","cancelUrl":null}"#
        );
        assert_eq!(serde_json::from_str::<Handle>(&text).unwrap(), h);
    }
}
