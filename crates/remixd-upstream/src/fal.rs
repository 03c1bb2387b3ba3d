//! fal's queue API for `fal-ai/ideogram/character/remix`.
//!
//! Submit (`POST <base>/fal-ai/ideogram/character/remix`, `Authorization: Key …`) answers
//! a request id and the status, response and cancel URLs to follow; they are checked to
//! be on the base URL's origin, checkpointed, then polled (`?logs=1`) until COMPLETED,
//! with progress from the queue position and state. The result's images are copied
//! into remixd's storage by the worker; this module downloads them.
//!
//! Inputs are URLs the provider can read ([`remixd_engine::Source::url`]): the client's
//! own, or signed links to this server's files on `server.public_url`; with
//! `engine.fal.inline_inputs` every input goes as a `data:` URI of its bytes instead.

use remixd_engine::{EngineError, EngineImage, InputRole, ProviderImage};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::http::{provider_message, CallError, Caller};
use crate::{download_result, same_origin, GatewayConfig, Handle, Kind, ProviderConfig, Run};

/// The model's path on the queue.
pub const ENDPOINT: &str = "fal-ai/ideogram/character/remix";

pub struct Fal {
    caller: Caller,
    fetcher: remixd_fetch::Fetcher,
    max_result_bytes: u64,
}

impl Fal {
    pub fn new(cfg: ProviderConfig, gw: &GatewayConfig) -> Result<Self, String> {
        Ok(Self {
            caller: Caller::new("fal", cfg)?,
            fetcher: gw.fetcher.clone(),
            max_result_bytes: gw.max_result_bytes,
        })
    }

    fn base(&self) -> &str {
        self.caller.cfg.base_url.trim_end_matches('/')
    }

    fn auth(&self) -> String {
        format!("Key {}", self.caller.cfg.key)
    }

    /// The model input, with the differences from the hosted contract: `num_images` an
    /// integer, `reference_mask_urls` a list.
    pub fn input(&self, run: &Run<'_>) -> Result<Value, EngineError> {
        let url = |s: &remixd_engine::Source| {
            if self.caller.cfg.inline_inputs {
                crate::data_uri(&s.bytes)
            } else {
                s.url.clone()
            }
        };
        let job = run.job;
        let mut input = json!({
            "prompt": job.prompt,
            "image_url": url(run.source(InputRole::Base)?),
            "reference_image_urls": [url(run.source(InputRole::Character)?)],
            "image_size": job.size.as_str(),
            "style": job.style.as_str(),
            "expand_prompt": job.expand_prompt,
            "rendering_speed": job.rendering_speed.as_str(),
            "num_images": job.num_images.get(),
            "seed": job.seed.get(),
            "strength": job.strength.get(),
            "sync_mode": false,
        });
        if let Some(mask) = run.sources(InputRole::Mask).next() {
            input["reference_mask_urls"] = json!([url(mask)]);
        }
        let styles: Vec<String> = run.sources(InputRole::Style).map(url).collect();
        if !styles.is_empty() {
            input["image_urls"] = json!(styles);
        }
        if !job.negative_prompt.is_empty() {
            input["negative_prompt"] = json!(job.negative_prompt);
        }
        Ok(input)
    }

    fn unavailable(&self, e: CallError, what: &str) -> EngineError {
        match e {
            CallError::Unavailable(m) => EngineError::Unavailable(format!("fal: {m}")),
            CallError::Cancelled => EngineError::Cancelled,
            CallError::Deadline => EngineError::GenerationFailed(format!(
                "fal did not finish the task within {} s (engine.fal.task_timeout_s) while {what}",
                self.caller.cfg.task_timeout.as_secs()
            )),
        }
    }

    /// An answer that is neither success nor retryable, in the task's terms: 422 is the
    /// task's input, 401/403 a key the provider refuses (unavailable: another provider
    /// may serve), anything else a failed generation.
    fn refused(&self, what: &str, status: reqwest::StatusCode, body: &[u8]) -> EngineError {
        let msg = provider_message(body).unwrap_or_else(|| status.to_string());
        let msg = self.caller.redact(&msg);
        match status.as_u16() {
            422 | 400 => EngineError::BadInput(format!("fal refused the task: {msg}")),
            401 | 403 => EngineError::Unavailable(format!(
                "fal refused the key while {what} (HTTP {}): check engine.fal.key",
                status.as_u16()
            )),
            _ => EngineError::GenerationFailed(format!(
                "fal answered HTTP {} while {what}: {msg}",
                status.as_u16()
            )),
        }
    }

    async fn submit(&self, run: &mut Run<'_>) -> Result<Handle, EngineError> {
        let body = self.input(run)?;
        let url = format!("{}/{ENDPOINT}", self.base());
        let a = self
            .caller
            .call(
                "submit",
                || {
                    self.caller
                        .client
                        .post(&url)
                        .header("Authorization", self.auth())
                        .json(&body)
                },
                run.deadline,
                run.cancel,
            )
            .await
            .map_err(|e| self.unavailable(e, "submitting"))?;
        if !a.status.is_success() {
            return Err(self.refused("submitting", a.status, &a.body));
        }
        let v = a.json().unwrap_or(Value::Null);
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(request_id), Some(status_url), Some(response_url)) =
            (text("request_id"), text("status_url"), text("response_url"))
        else {
            return Err(EngineError::GenerationFailed(
                "fal's submit answer lacks request_id, status_url or response_url".into(),
            ));
        };
        let cancel_url = text("cancel_url");
        for u in [Some(&status_url), Some(&response_url), cancel_url.as_ref()]
            .into_iter()
            .flatten()
        {
            if !same_origin(self.base(), u) {
                return Err(EngineError::GenerationFailed(
                    "fal's submit answer points outside engine.fal.base_url; not followed".into(),
                ));
            }
        }
        Ok(Handle {
            provider: Kind::Fal,
            request_id,
            status_url,
            response_url,
            cancel_url,
        })
    }

    async fn wait(&self, run: &Run<'_>, h: &Handle) -> Result<(), EngineError> {
        let url = if h.status_url.contains('?') {
            format!("{}&logs=1", h.status_url)
        } else {
            format!("{}?logs=1", h.status_url)
        };
        let mut progress = 5u8;
        let mut first_position: Option<u64> = None;
        loop {
            let a = self
                .caller
                .call(
                    "status",
                    || {
                        self.caller
                            .client
                            .get(&url)
                            .header("Authorization", self.auth())
                    },
                    run.deadline,
                    run.cancel,
                )
                .await
                .map_err(|e| self.unavailable(e, "waiting in fal's queue"))?;
            if !a.status.is_success() {
                return Err(self.refused("asking for the status", a.status, &a.body));
            }
            let v = a.json().unwrap_or(Value::Null);
            match v.get("status").and_then(Value::as_str) {
                Some("COMPLETED") => {
                    if let Some(err) = v.get("error").and_then(Value::as_str) {
                        let msg = self.caller.redact(err);
                        return Err(EngineError::GenerationFailed(format!("fal: {msg}")));
                    }
                    (run.progress)(90);
                    return Ok(());
                }
                Some("IN_QUEUE") => {
                    // 5..=25 as the queue position falls towards 0.
                    if let Some(pos) = v.get("queue_position").and_then(Value::as_u64) {
                        let first = *first_position.get_or_insert(pos.max(1));
                        let moved = first.saturating_sub(pos) as f64 / first as f64;
                        progress = progress.max(5 + (20.0 * moved) as u8);
                    }
                }
                Some("IN_PROGRESS") => {
                    // 30, then creeping towards 85 with each log line.
                    let logs = v.get("logs").and_then(Value::as_array).map_or(0, Vec::len);
                    progress = progress.max(30 + (55 - 55 / (1 + logs as u32)) as u8);
                }
                _ => {}
            }
            (run.progress)(progress);
            tokio::select! {
                () = run.cancel.cancelled() => return Err(EngineError::Cancelled),
                () = tokio::time::sleep_until(run.deadline) => {
                    return Err(self.unavailable(CallError::Deadline, "waiting in fal's queue"))
                }
                () = tokio::time::sleep(self.caller.cfg.poll_interval) => {}
            }
        }
    }

    async fn result(&self, run: &Run<'_>, h: &Handle) -> Result<Vec<EngineImage>, EngineError> {
        let a = self
            .caller
            .call(
                "result",
                || {
                    self.caller
                        .client
                        .get(&h.response_url)
                        .header("Authorization", self.auth())
                },
                run.deadline,
                run.cancel,
            )
            .await
            .map_err(|e| self.unavailable(e, "reading the result"))?;
        if !a.status.is_success() {
            return Err(self.refused("reading the result", a.status, &a.body));
        }
        let v = a.json().unwrap_or(Value::Null);
        let seed = v.get("seed").and_then(Value::as_u64);
        let urls: Vec<String> = v
            .get("images")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(|i| i.get("url").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let want = run.job.num_images.get() as usize;
        if urls.len() != want {
            return Err(EngineError::GenerationFailed(format!(
                "fal returned {} images, {want} were asked for",
                urls.len()
            )));
        }
        let mut out = Vec::with_capacity(want);
        for (i, u) in urls.iter().enumerate() {
            let img = download_result(
                &self.fetcher,
                "fal",
                u,
                self.max_result_bytes,
                i,
                run.cancel,
                run.deadline,
            )
            .await?;
            (run.progress)(90 + (9 * (i + 1) / want) as u8);
            out.push(EngineImage {
                content_type: img.kind.mime().to_string(),
                width: img.width,
                height: img.height,
                bytes: img.bytes,
                provider: Some(ProviderImage {
                    provider: "fal".into(),
                    width: img.width,
                    height: img.height,
                    seed,
                }),
            });
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl crate::Provider for Fal {
    fn kind(&self) -> Kind {
        Kind::Fal
    }

    async fn run(
        &self,
        run: &mut Run<'_>,
        resume: Option<Handle>,
    ) -> Result<Vec<EngineImage>, EngineError> {
        let h = match resume {
            Some(h) => h,
            None => {
                (run.progress)(2);
                let h = self.submit(run).await?;
                tracing::info!(task = %run.job.task_id, request = %h.request_id, "submitted to fal");
                if let Err(e) = run.checkpoint(&h).await {
                    // Not recorded: no later attempt could resume it, so it must not run.
                    self.cancel(&h).await;
                    return Err(EngineError::Unavailable(format!(
                        "could not record fal's request id: {e}"
                    )));
                }
                h
            }
        };
        match self.wait(run, &h).await {
            Ok(()) => {}
            Err(e @ EngineError::GenerationFailed(_)) if Instant::now() >= run.deadline => {
                self.cancel(&h).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        }
        self.result(run, &h).await
    }

    async fn cancel(&self, h: &Handle) {
        let Some(url) = h
            .cancel_url
            .as_deref()
            .filter(|u| same_origin(self.base(), u))
        else {
            return;
        };
        let sent = self
            .caller
            .client
            .put(url)
            .header("Authorization", self.auth())
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await;
        match sent {
            Ok(r) => {
                tracing::info!(request = %h.request_id, status = r.status().as_u16(), "asked fal to cancel")
            }
            Err(e) => {
                tracing::warn!(request = %h.request_id, error = %self.caller.redact(&e.without_url().to_string()), "could not ask fal to cancel")
            }
        }
    }

    async fn check(&self) -> Result<String, String> {
        // The status of a request that does not exist: authenticated, free, and an
        // answer other than 401/403 means the key was accepted.
        let url = format!(
            "{}/fal-ai/ideogram/requests/00000000-0000-0000-0000-000000000000/status",
            self.base()
        );
        let req = self
            .caller
            .client
            .get(&url)
            .header("Authorization", self.auth());
        self.caller.check(req, "a made-up request id").await
    }
}
