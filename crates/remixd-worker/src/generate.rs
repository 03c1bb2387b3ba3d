//! The generate stage: run the engine on a `queuing` task and finish it.
//!
//! Results are written to file storage *before* the task is marked `success`, so a
//! successful task always has its files; when the final update finds the lease gone
//! (the reaper gave the task to another worker), the files are deleted again.

use std::sync::Arc;

use bytes::Bytes;
use rand::RngCore;
use remixd_domain::{now_millis, FailCode, Seed};
use remixd_engine::{
    Checkpoint, EngineError, EngineImage, InputRole, Job, Progress, ProviderImage, Source,
    UpstreamJob, WorkingSize,
};
use remixd_store::{Finish, Stage, StoreError, TaskRecord};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::inputs::{roles, Role};
use crate::lease::{lease_until, spawn_heartbeat};
use crate::Ctx;
use remixd_store::blobs::{classify_url, FileUrl};

/// Claims one `queuing` task and runs it. `Ok(false)` when there was none.
pub(crate) async fn run_one(ctx: &Arc<Ctx>) -> Result<bool, StoreError> {
    let Some(task) = ctx
        .store
        .claim(
            Stage::Generate,
            &ctx.cfg.owner,
            now_millis(),
            lease_until(ctx),
        )
        .await?
    else {
        return Ok(false);
    };
    let id = task.id;
    let owner = ctx.cfg.owner.clone();
    tracing::info!(task = %id, attempt = task.attempts, engine = ctx.engine.name(), "generating");

    let lost = CancellationToken::new();
    // The lease is kept until this function returns, past the engine: storing the
    // results can take a while (a slow disk or bucket), and a task whose lease lapsed
    // meanwhile would be handed to another worker while this one still writes.
    let holding = CancellationToken::new();
    let _heartbeat = holding.clone().drop_guard();
    spawn_heartbeat(ctx, id, holding, lost.clone());
    // Ends with the engine's run: the stopper and the progress writer.
    let done = CancellationToken::new();
    // A cancellation marks the task failed in the store; to this worker it is a lost lease.
    let _tracked = ctx.wake.track(task.id, lost.clone());
    // The engine stops when the lease is lost or shutdown runs out of grace.
    let cancel = CancellationToken::new();
    let stopper = {
        let (cancel, lost, hard) = (cancel.clone(), lost.clone(), ctx.hard_stop.clone());
        let done = done.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => cancel.cancel(),
                _ = hard.cancelled() => cancel.cancel(),
                _ = done.cancelled() => {}
            }
        })
    };
    let progress = progress_writer(ctx, &task, done.clone());

    let generation_started = std::time::Instant::now();
    let loaded = tokio::select! {
        job = load_job(ctx, &task) => job,
        // A cancelled (or lost) task stops waiting for its turn to decode.
        () = cancel.cancelled() => Err(EngineError::Cancelled),
    };
    let outcome = match loaded {
        Ok(job) => ctx.engine.generate(job, progress, cancel.clone()).await,
        Err(e) => Err(e),
    };
    done.cancel();
    let _ = stopper.await;

    let now = now_millis();
    match outcome {
        Ok(images) => match store_results(ctx, &task, images).await {
            Ok((keys, json)) => {
                if ctx.store.succeed(&id, &owner, &json, now_millis()).await? == Finish::NotOwner {
                    tracing::warn!(task = %id, "lease lost before completion; discarding results");
                    for k in keys {
                        let _ = ctx.blobs.delete(&k).await;
                    }
                    return Ok(true);
                }
                tracing::info!(task = %id, "task succeeded");
                metrics::counter!("remixd_tasks_finished_total", "state" => "success", "fail_code" => "").increment(1);
                metrics::histogram!("remixd_generation_seconds", "engine" => ctx.engine.name().to_string())
                    .record(generation_started.elapsed().as_secs_f64());
                ctx.wake.task_finished();
            }
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "could not store results");
                retry_or_fail(
                    ctx,
                    &task,
                    FailCode::Internal,
                    format!("could not store the results: {e}"),
                )
                .await?;
                return Ok(true);
            }
        },
        Err(EngineError::Cancelled) => {
            if lost.is_cancelled() {
                // Cancelled (terminal: its inputs can go, and a provider's request is
                // cancelled too) or taken by the reaper (kept: the next claim resumes it).
                if let Some(t) = crate::inputs::drop_inputs_if_terminal(ctx, &id).await {
                    if let Some(handle) = t.upstream {
                        ctx.engine.abandon(&handle).await;
                    }
                }
                return Ok(true);
            }
            // Shutdown: give the task back without spending the attempt.
            ctx.store.release(&id, &owner, 0, false, now).await?;
            tracing::info!(task = %id, "released at shutdown");
            return Ok(true);
        }
        Err(EngineError::Unavailable(msg)) => {
            tracing::warn!(task = %id, reason = %msg, "engine unavailable");
            retry_or_fail(
                ctx,
                &task,
                FailCode::GenerationFailed,
                format!("the engine is unavailable: {msg}"),
            )
            .await?;
            return Ok(true);
        }
        Err(EngineError::BadInput(msg)) => {
            finish_fail(ctx, &task, FailCode::BadInput, &msg).await?
        }
        Err(EngineError::GenerationFailed(msg)) => {
            finish_fail(ctx, &task, FailCode::GenerationFailed, &msg).await?
        }
        Err(EngineError::Internal(msg)) => {
            tracing::error!(task = %id, error = %msg, "engine internal error");
            finish_fail(
                ctx,
                &task,
                FailCode::Internal,
                "internal error while generating",
            )
            .await?
        }
    }
    let _ = ctx.blobs.delete_prefix(&format!("inputs/{id}")).await;
    Ok(true)
}

async fn finish_fail(
    ctx: &Ctx,
    task: &TaskRecord,
    code: FailCode,
    msg: &str,
) -> Result<(), StoreError> {
    tracing::info!(task = %task.id, code = %code, reason = %msg, "task failed");
    ctx.store
        .fail(&task.id, Some(&ctx.cfg.owner), code, msg, now_millis())
        .await?;
    // A provider may still be working on a request this task recorded: nobody will
    // collect it now.
    if ctx.engine.wants_sources() {
        if let Ok(Some(handle)) = ctx
            .store
            .task(&task.id)
            .await
            .map(|t| t.and_then(|t| t.upstream))
        {
            ctx.engine.abandon(&handle).await;
        }
    }
    ctx.wake.task_finished();
    metrics::counter!("remixd_tasks_finished_total", "state" => "fail", "fail_code" => code.as_str()).increment(1);
    Ok(())
}

/// A temporary failure: retry later, or fail once the attempts are spent.
async fn retry_or_fail(
    ctx: &Ctx,
    task: &TaskRecord,
    code: FailCode,
    msg: String,
) -> Result<(), StoreError> {
    if task.attempts >= ctx.cfg.max_attempts {
        let msg = format!("{msg} (after {} attempts)", task.attempts);
        finish_fail(ctx, task, code, &msg).await?;
        let _ = ctx
            .blobs
            .delete_prefix(&format!("inputs/{}", task.id))
            .await;
    } else {
        let later = crate::backoff::retry_at(now_millis(), ctx.cfg.retry_delay, task.attempts);
        ctx.store
            .release(&task.id, &ctx.cfg.owner, later, true, now_millis())
            .await?;
    }
    Ok(())
}

fn input_role(role: &Role) -> InputRole {
    match role {
        Role::Base => InputRole::Base,
        Role::Character => InputRole::Character,
        Role::Mask => InputRole::Mask,
        Role::Style(_) => InputRole::Style,
    }
}

/// The engine's working size for an input, as the decoder's bound; `None` when the
/// engine does not read the pixels.
fn reduce_for(ctx: &Ctx, role: &Role, output: (u32, u32)) -> Option<remixd_fetch::Reduce> {
    Some(match ctx.engine.working_size(input_role(role), output) {
        WorkingSize::Full => remixd_fetch::Reduce::Keep,
        WorkingSize::Cover(w, h) => remixd_fetch::Reduce::Cover(w, h),
        WorkingSize::Fit(w, h) => remixd_fetch::Reduce::Fit(w, h),
        WorkingSize::Unused => return None,
    })
}

/// A URL a provider can read for an input given as `url`: the client's own URL, or
/// for a file of this server a signed link on `server.public_url` that outlives the
/// provider's work on the task (`worker.source_link_s`).
async fn reachable_url(ctx: &Ctx, url: &str) -> Result<String, EngineError> {
    let Some(origin) = ctx.origin.as_ref() else {
        return Ok(url.to_string());
    };
    match classify_url(origin, url) {
        FileUrl::File(key) => {
            let signer = ctx
                .signer
                .get_or_try_init(|| remixd_store::links::LinkSigner::load(&*ctx.store))
                .await
                .map_err(|e| {
                    EngineError::Unavailable(format!("could not sign input links: {e}"))
                })?;
            let expires = now_millis() + ctx.cfg.source_link.as_millis() as i64;
            Ok(signer.link(&ctx.cfg.public_url, &key, expires))
        }
        // The fetch stage accepted the task, so the URL was usable then.
        FileUrl::Foreign | FileUrl::NotAFile => Ok(url.to_string()),
    }
}

/// Records an upstream engine's handle on its provider request in the task's row,
/// while this worker holds the lease.
fn checkpoint(ctx: &Arc<Ctx>, task: &TaskRecord) -> Checkpoint {
    let (store, owner, id) = (ctx.store.clone(), ctx.cfg.owner.clone(), task.id);
    Arc::new(move |handle: String| {
        let (store, owner) = (store.clone(), owner.clone());
        Box::pin(async move {
            match store.set_upstream(&id, &owner, &handle, now_millis()).await {
                Ok(true) => Ok(()),
                Ok(false) => Err("the task is no longer this worker's".to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
    })
}

/// Reads the fetched inputs back and decodes them one at a time, each through the
/// process's decode gate (off the async threads, at most `worker.decode_concurrency`
/// at once in the process) and reduced to the engine's working size right away, so a
/// task never holds more than one full-size canvas.
async fn load_job(ctx: &Arc<Ctx>, task: &TaskRecord) -> Result<Job, EngineError> {
    let task_id = task.id.to_string();
    let max_pixels = ctx.fetcher.config().max_pixels;
    let gate = ctx.fetcher.decoder();
    let output = task.input.image_size.dimensions();
    let mut base = None;
    let mut character = None;
    let mut mask = None;
    let mut style_images = Vec::new();
    let mut upstream = UpstreamJob::default();
    if ctx.engine.wants_sources() {
        upstream.resume = task.upstream.clone();
        upstream.checkpoint = Some(checkpoint(ctx, task));
    }
    for (role, url) in roles(&task.input) {
        let bytes = ctx.blobs.get(&role.key(&task_id)).await.map_err(|e| {
            EngineError::Internal(format!("input {} missing from storage: {e}", role.field()))
        })?;
        if ctx.engine.wants_sources() {
            upstream.sources.push(Source {
                role: input_role(&role),
                field: role.field(),
                url: reachable_url(ctx, url).await?,
                bytes: bytes.clone(),
            });
        }
        let Some(reduce) = reduce_for(ctx, &role, output) else {
            // Not read by the engine: an empty image stands in (WorkingSize::Unused).
            match role {
                Role::Base => base = Some(image::RgbImage::new(0, 0)),
                Role::Character => character = Some(image::RgbImage::new(0, 0)),
                Role::Mask => mask = Some(image::GrayImage::new(0, 0)),
                Role::Style(_) => style_images.push(image::RgbImage::new(0, 0)),
            }
            continue;
        };
        let bad =
            |e: remixd_fetch::FetchError| EngineError::BadInput(format!("{} {e}", role.field()));
        match role {
            Role::Base => base = Some(gate.rgb(bytes, max_pixels, reduce).await.map_err(bad)?),
            Role::Character => {
                character = Some(gate.rgb(bytes, max_pixels, reduce).await.map_err(bad)?)
            }
            Role::Mask => mask = Some(gate.luma(bytes, max_pixels, reduce).await.map_err(bad)?),
            Role::Style(_) => {
                style_images.push(gate.rgb(bytes, max_pixels, reduce).await.map_err(bad)?)
            }
        }
    }
    let input = task.input.clone();
    Ok(Job {
        task_id,
        base: base.ok_or_else(|| EngineError::Internal("no base image".into()))?,
        character: character.ok_or_else(|| EngineError::Internal("no character image".into()))?,
        mask,
        style_images,
        prompt: input.prompt,
        negative_prompt: input.negative_prompt,
        expand_prompt: input.expand_prompt,
        size: input.image_size,
        num_images: input.num_images,
        seed: input.seed,
        strength: input.strength,
        style: input.style,
        rendering_speed: input.rendering_speed,
        upstream,
    })
}

/// Forwards engine progress to the store, at most a few writes a second.
fn progress_writer(ctx: &Arc<Ctx>, task: &TaskRecord, done: CancellationToken) -> Progress {
    let (tx, mut rx) = tokio::sync::watch::channel(0u8);
    let ctx = ctx.clone();
    let id = task.id;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = done.cancelled() => return,
            }
            let p = *rx.borrow_and_update();
            // The engine's 100 is written by the success update itself.
            let p = p.min(99);
            let _ = ctx
                .store
                .set_progress(&id, &ctx.cfg.owner, p, now_millis())
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    Arc::new(move |p: u8| {
        let _ = tx.send(p);
    })
}

#[derive(Serialize)]
struct ResultImage<'a> {
    url: &'a str,
    width: u32,
    height: u32,
    content_type: &'a str,
    file_size: usize,
    /// The size the provider made the image at, when remixd resized it, and the
    /// provider's seed for it.
    #[serde(rename = "providerWidth", skip_serializing_if = "Option::is_none")]
    provider_width: Option<u32>,
    #[serde(rename = "providerHeight", skip_serializing_if = "Option::is_none")]
    provider_height: Option<u32>,
    #[serde(rename = "providerSeed", skip_serializing_if = "Option::is_none")]
    provider_seed: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResultDoc<'a> {
    result_urls: Vec<&'a str>,
    seed: u32,
    /// The upstream engine that served the task (`fal`, `ideogram`); absent for the
    /// engines that run here.
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    images: Vec<ResultImage<'a>>,
}

/// One stored result image, for [`result_json`].
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub width: u32,
    pub height: u32,
    pub content_type: String,
    pub file_size: usize,
    pub provider: Option<ProviderImage>,
}

/// The `resultJson` string of a successful task.
pub fn result_json(urls: &[String], seed: Seed, images: &[StoredImage]) -> String {
    let doc = ResultDoc {
        result_urls: urls.iter().map(String::as_str).collect(),
        seed: seed.get(),
        provider: images
            .iter()
            .find_map(|i| i.provider.as_ref().map(|p| p.provider.as_str())),
        images: urls
            .iter()
            .zip(images)
            .map(|(url, i)| ResultImage {
                url,
                width: i.width,
                height: i.height,
                content_type: &i.content_type,
                file_size: i.file_size,
                provider_width: i.provider.as_ref().map(|p| p.width),
                provider_height: i.provider.as_ref().map(|p| p.height),
                provider_seed: i.provider.as_ref().and_then(|p| p.seed),
            })
            .collect(),
    };
    serde_json::to_string(&doc).expect("result JSON serialises")
}

/// Writes the images under `results/<task>/<128 random bits>/<i>.<ext>`; returns the keys and `resultJson`.
async fn store_results(
    ctx: &Ctx,
    task: &TaskRecord,
    images: Vec<EngineImage>,
) -> Result<(Vec<String>, String), String> {
    let want = task.input.num_images.get() as usize;
    if images.len() != want {
        return Err(format!(
            "the engine returned {} images, {want} were asked for",
            images.len()
        ));
    }
    let mut token = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut token);
    let token = hex::encode(token);
    let base = ctx.cfg.public_url.trim_end_matches('/');
    let mut keys = Vec::new();
    let mut urls = Vec::new();
    let mut meta = Vec::new();
    for (i, img) in images.into_iter().enumerate() {
        let key = format!("results/{}/{token}/{i}.{}", task.id, img.extension());
        let size = img.bytes.len();
        let bytes: Bytes = img.bytes;
        if let Err(e) = ctx.blobs.put(&key, bytes).await {
            // Leave no half-written result set behind.
            let _ = ctx
                .blobs
                .delete_prefix(&format!("results/{}/{token}", task.id))
                .await;
            return Err(e.to_string());
        }
        urls.push(format!("{base}/files/{key}"));
        meta.push(StoredImage {
            width: img.width,
            height: img.height,
            content_type: img.content_type,
            file_size: size,
            provider: img.provider,
        });
        keys.push(key);
    }
    let json = result_json(&urls, task.input.seed, &meta);
    Ok((keys, json))
}
