//! The generate stage: run the engine on a `queuing` task and finish it.
//!
//! Results are written to file storage *before* the task is marked `success`, so a
//! successful task always has its files; when the final update finds the lease gone
//! (the reaper gave the task to another worker), the files are deleted again.

use std::sync::Arc;

use bytes::Bytes;
use rand::RngCore;
use remixd_domain::{now_millis, FailCode, Seed};
use remixd_engine::{EngineError, EngineImage, InputRole, Job, Progress, WorkingSize};
use remixd_store::{Finish, Stage, StoreError, TaskRecord};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::inputs::{roles, Role};
use crate::lease::{lease_until, spawn_heartbeat};
use crate::Ctx;

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
                // Cancelled (terminal: its inputs can go) or taken by the reaper (kept).
                crate::inputs::drop_inputs_if_terminal(ctx, &id).await;
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

/// The engine's working size for an input, as the decoder's bound.
fn reduce_for(ctx: &Ctx, role: &Role, output: (u32, u32)) -> remixd_fetch::Reduce {
    let role = match role {
        Role::Base => InputRole::Base,
        Role::Character => InputRole::Character,
        Role::Mask => InputRole::Mask,
        Role::Style(_) => InputRole::Style,
    };
    match ctx.engine.working_size(role, output) {
        WorkingSize::Full => remixd_fetch::Reduce::Keep,
        WorkingSize::Cover(w, h) => remixd_fetch::Reduce::Cover(w, h),
        WorkingSize::Fit(w, h) => remixd_fetch::Reduce::Fit(w, h),
    }
}

/// Reads the fetched inputs back and decodes them one at a time, each through the
/// process's decode gate (off the async threads, at most `worker.decode_concurrency`
/// at once in the process) and reduced to the engine's working size right away, so a
/// task never holds more than one full-size canvas.
async fn load_job(ctx: &Ctx, task: &TaskRecord) -> Result<Job, EngineError> {
    let task_id = task.id.to_string();
    let max_pixels = ctx.fetcher.config().max_pixels;
    let gate = ctx.fetcher.decoder();
    let output = task.input.image_size.dimensions();
    let mut base = None;
    let mut character = None;
    let mut mask = None;
    let mut style_images = Vec::new();
    for (role, _) in roles(&task.input) {
        let bytes = ctx.blobs.get(&role.key(&task_id)).await.map_err(|e| {
            EngineError::Internal(format!("input {} missing from storage: {e}", role.field()))
        })?;
        let reduce = reduce_for(ctx, &role, output);
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
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResultDoc<'a> {
    result_urls: Vec<&'a str>,
    seed: u32,
    images: Vec<ResultImage<'a>>,
}

/// The `resultJson` string of a successful task.
pub fn result_json(urls: &[String], seed: Seed, images: &[(u32, u32, String, usize)]) -> String {
    let doc = ResultDoc {
        result_urls: urls.iter().map(String::as_str).collect(),
        seed: seed.get(),
        images: urls
            .iter()
            .zip(images)
            .map(|(url, (w, h, ct, size))| ResultImage {
                url,
                width: *w,
                height: *h,
                content_type: ct,
                file_size: *size,
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
        meta.push((img.width, img.height, img.content_type, size));
        keys.push(key);
    }
    let json = result_json(&urls, task.input.seed, &meta);
    Ok((keys, json))
}
