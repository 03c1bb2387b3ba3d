//! One provider call with the retry rules both providers share: connection failures,
//! 429 and 5xx are retried with exponential backoff and full jitter (a `Retry-After`
//! in seconds is honoured, capped), within the task's deadline; any other answer is
//! returned to the caller to interpret. Every message that could quote a provider's
//! answer passes through [`Caller::redact`], so a key echoed back never reaches a log,
//! a task record or an error.

use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use reqwest::{RequestBuilder, StatusCode};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ProviderConfig;

/// The most of a provider's answer read (JSON documents; images are downloaded by the
/// fetcher).
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// A provider's answer that was not retried away.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Why a call gave no answer to interpret.
#[derive(Debug)]
pub enum CallError {
    /// Connection failures, 429 or 5xx, through every retry (the last reason).
    Unavailable(String),
    /// The task's deadline came first.
    Deadline,
    Cancelled,
}

pub struct Caller {
    pub name: &'static str,
    pub client: reqwest::Client,
    pub cfg: ProviderConfig,
}

impl Caller {
    pub fn new(name: &'static str, cfg: ProviderConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            // Provider APIs do not redirect; a redirect would carry the key elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("remixd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("{name} HTTP client: {e}"))?;
        Ok(Self { name, client, cfg })
    }

    /// `text` with the provider key replaced by `<redacted>`.
    pub fn redact(&self, text: &str) -> String {
        if self.cfg.key.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.cfg.key, "<redacted>")
        }
    }

    /// `remixd engines check`'s one call: sends `req` once and says what its answer
    /// means; `accepted` describes a non-refusal (what the call asked for).
    pub async fn check(&self, req: RequestBuilder, accepted: &str) -> Result<String, String> {
        let r = req
            .timeout(crate::CHECK_TIMEOUT)
            .send()
            .await
            .map_err(|e| {
                self.redact(&format!(
                    "unreachable at {}: {}",
                    self.cfg.base_url,
                    describe(e)
                ))
            })?;
        match r.status().as_u16() {
            s @ (401 | 403) => Err(format!("reachable, but the key was refused (HTTP {s})")),
            s if s >= 500 => Err(format!("reachable, but answered HTTP {s}")),
            s => Ok(format!("reachable, key accepted (HTTP {s} for {accepted})")),
        }
    }

    /// Sends the request `make` builds (once per attempt), retrying as the module says.
    pub async fn call(
        &self,
        what: &str,
        make: impl Fn() -> RequestBuilder,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Answer, CallError> {
        let mut attempt = 0u32;
        loop {
            let outcome = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(CallError::Cancelled),
                () = tokio::time::sleep_until(deadline) => return Err(CallError::Deadline),
                r = send(make()) => r,
            };
            let (reason, retry_after) = match outcome {
                Ok((a, after))
                    if a.status == StatusCode::TOO_MANY_REQUESTS || a.status.is_server_error() =>
                {
                    count(self.name, a.status.as_str());
                    (
                        format!("{what} answered {}{}", a.status, detail(&a.body)),
                        after,
                    )
                }
                Ok((a, _)) => {
                    count(self.name, a.status.as_str());
                    return Ok(a);
                }
                Err(e) => {
                    count(self.name, "error");
                    (format!("{what} failed: {e}"), None)
                }
            };
            let reason = self.redact(&reason);
            if attempt >= self.cfg.retries {
                return Err(CallError::Unavailable(reason));
            }
            let pause = retry_after
                .map(|d| d.min(self.cfg.retry_max))
                .unwrap_or_else(|| jittered(self.cfg.retry_base, self.cfg.retry_max, attempt));
            if Instant::now() + pause >= deadline {
                return Err(CallError::Unavailable(reason));
            }
            tracing::debug!(provider = self.name, attempt, pause_ms = pause.as_millis() as u64, reason = %reason, "retrying");
            attempt += 1;
            tokio::select! {
                () = cancel.cancelled() => return Err(CallError::Cancelled),
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// One exchange: the answer, and its `Retry-After` in seconds when it has one.
async fn send(req: RequestBuilder) -> Result<(Answer, Option<Duration>), String> {
    let mut resp = req.send().await.map_err(describe)?;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!("answer over {MAX_ANSWER_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((
        Answer {
            status,
            body: body.into(),
        },
        retry_after,
    ))
}

/// A transport error in words, without the URL (which may hold a signed query).
fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "broken answer"
    } else {
        "request error"
    };
    let mut source = std::error::Error::source(&e);
    let mut cause = String::new();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} ({cause})")
    }
}

/// `base × 2^attempt`, capped, then drawn uniformly from its upper half: spread out,
/// but never much shorter than the schedule.
pub fn jittered(base: Duration, max: Duration, attempt: u32) -> Duration {
    let full = base.saturating_mul(1u32 << attempt.min(16)).min(max);
    let half = full / 2;
    half + full
        .saturating_sub(half)
        .mul_f64(rand::thread_rng().gen::<f64>())
}

/// ": <the provider's message>" when its answer carries one, short.
pub fn detail(body: &[u8]) -> String {
    match provider_message(body) {
        Some(m) => format!(": {m}"),
        None => String::new(),
    }
}

/// The human message in a provider's error answer: fal's `detail` (a string, or a list
/// of `{loc, msg}`), Ideogram's `error` or `message`; else a short text body.
pub fn provider_message(body: &[u8]) -> Option<String> {
    let msg = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            if let Some(list) = v.get("detail").and_then(|d| d.as_array()) {
                let parts: Vec<String> = list
                    .iter()
                    .filter_map(|d| {
                        let msg = d.get("msg").and_then(|m| m.as_str())?;
                        let loc: Vec<String> = d
                            .get("loc")
                            .and_then(|l| l.as_array())
                            .map(|l| {
                                l.iter()
                                    .filter(|p| p.as_str() != Some("body"))
                                    .map(|p| match p.as_str() {
                                        Some(s) => s.to_string(),
                                        None => p.to_string(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        Some(if loc.is_empty() {
                            msg.to_string()
                        } else {
                            format!("{}: {msg}", loc.join("."))
                        })
                    })
                    .collect();
                (!parts.is_empty()).then(|| parts.join("; "))
            } else {
                ["detail", "error", "message"]
                    .iter()
                    .find_map(|k| v.get(*k).and_then(|m| m.as_str()).map(str::to_string))
            }
        }
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            (!text.is_empty() && !text.starts_with('<')).then(|| text.to_string())
        }
    }?;
    let msg: String = msg.chars().take(300).collect();
    Some(msg)
}

fn count(provider: &'static str, status: &str) {
    metrics::counter!("remixd_upstream_requests_total", "provider" => provider, "status" => status.to_string())
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_messages_are_read_from_either_shape() {
        let fal = br#"{"detail":[{"loc":["body","num_images"],"msg":"value is not a valid integer","type":"type_error"}]}"#;
        assert_eq!(
            provider_message(fal).unwrap(),
            "num_images: value is not a valid integer"
        );
        assert_eq!(
            provider_message(br#"{"detail":"Request timed out","error_type":"request_timeout"}"#)
                .unwrap(),
            "Request timed out"
        );
        assert_eq!(
            provider_message(br#"{"error":"Prompt failed the safety checks"}"#).unwrap(),
            "Prompt failed the safety checks"
        );
        assert_eq!(
            provider_message(b"upstream busy\n").unwrap(),
            "upstream busy"
        );
        assert_eq!(provider_message(b"<html>502</html>"), None);
        assert_eq!(provider_message(b""), None);
        assert_eq!(provider_message(&[b'x'; 1000]).unwrap().len(), 300);
    }

    #[test]
    fn backoff_doubles_within_its_cap_and_jitters_in_the_upper_half() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..8 {
            let full = (base * (1 << attempt)).min(max);
            for _ in 0..50 {
                let d = jittered(base, max, attempt);
                assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
            }
        }
    }
}
