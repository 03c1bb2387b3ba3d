//! The fetch stage: download a `waiting` task's input images, check them, keep their
//! bytes in file storage, and move the task to `queuing`.
//!
//! Any fetch failure is the client's input (failCode `422`), with a message naming the
//! field; a storage failure is ours, and the task is released to be tried again.

use std::sync::Arc;

use bytes::Bytes;
use remixd_domain::{now_millis, FailCode, TaskInput};
use remixd_store::{Stage, TaskRecord};
use tokio_util::sync::CancellationToken;

use crate::lease::{lease_until, spawn_heartbeat};
use crate::Ctx;

/// The role of one input image, which names both its storage key and its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Role {
    Base,
    Character,
    Mask,
    Style(usize),
}

impl Role {
    /// The contract's name of the field, for messages.
    pub fn field(&self) -> String {
        match self {
            Role::Base => "input.image_url".into(),
            Role::Character => "input.reference_image_urls[0]".into(),
            Role::Mask => "input.reference_mask_urls".into(),
            Role::Style(i) => format!("input.image_urls[{i}]"),
        }
    }

    /// The storage key of the fetched bytes.
    pub fn key(&self, task: &str) -> String {
        match self {
            Role::Base => format!("inputs/{task}/base"),
            Role::Character => format!("inputs/{task}/character"),
            Role::Mask => format!("inputs/{task}/mask"),
            Role::Style(i) => format!("inputs/{task}/style-{i}"),
        }
    }
}

/// Every input of a task with its role, in fetch order.
pub(crate) fn roles(input: &TaskInput) -> Vec<(Role, &str)> {
    let mut v = vec![
        (Role::Base, input.image_url.as_str()),
        (Role::Character, input.reference_image_url.as_str()),
    ];
    if let Some(m) = &input.reference_mask_url {
        v.push((Role::Mask, m.as_str()));
    }
    for (i, u) in input.style_image_urls.iter().enumerate() {
        v.push((Role::Style(i), u.as_str()));
    }
    v
}

/// Claims one `waiting` task and fetches its inputs. `Ok(false)` when there was none.
pub(crate) async fn run_one(ctx: &Arc<Ctx>) -> Result<bool, remixd_store::StoreError> {
    let Some(task) = ctx
        .store
        .claim(Stage::Fetch, &ctx.cfg.owner, now_millis(), lease_until(ctx))
        .await?
    else {
        return Ok(false);
    };
    let done = CancellationToken::new();
    let lost = CancellationToken::new();
    spawn_heartbeat(ctx, task.id, done.clone(), lost.clone());
    // A cancellation marks the task failed in the store; to this worker it is a lost lease.
    let _tracked = ctx.wake.track(task.id, lost.clone());
    let outcome = tokio::select! {
        r = fetch_all(ctx, &task) => Some(r),
        _ = lost.cancelled() => None,
        _ = ctx.hard_stop.cancelled() => {
            // Shutdown ran out of grace: give the task back, uncharged.
            let _ = ctx.store.release(&task.id, &ctx.cfg.owner, 0, false, now_millis()).await;
            None
        }
    };
    done.cancel();
    let id = task.id;
    match outcome {
        None => drop_inputs_if_terminal(ctx, &id).await,
        Some(Ok(())) => {
            let moved = ctx
                .store
                .inputs_ready(&id, &ctx.cfg.owner, now_millis())
                .await?;
            if moved {
                tracing::debug!(task = %id, "inputs ready");
                ctx.wake.inputs_ready();
            }
        }
        Some(Err(FetchFailure::Input(msg))) => {
            tracing::info!(task = %id, reason = %msg, "task failed: bad input");
            ctx.store
                .fail(
                    &id,
                    Some(&ctx.cfg.owner),
                    FailCode::BadInput,
                    &msg,
                    now_millis(),
                )
                .await?;
            ctx.wake.task_finished();
            metrics::counter!("remixd_tasks_finished_total", "state" => "fail", "fail_code" => "422").increment(1);
            let _ = ctx.blobs.delete_prefix(&format!("inputs/{id}")).await;
        }
        Some(Err(FetchFailure::Ours(msg))) => {
            tracing::warn!(task = %id, error = %msg, "could not keep inputs; will retry");
            if task.fetch_attempts >= ctx.cfg.max_attempts {
                let msg = format!("could not store the input images: {msg}");
                ctx.store
                    .fail(
                        &id,
                        Some(&ctx.cfg.owner),
                        FailCode::Internal,
                        &msg,
                        now_millis(),
                    )
                    .await?;
                ctx.wake.task_finished();
            } else {
                let later = now_millis() + ctx.cfg.retry_delay.as_millis() as i64;
                ctx.store
                    .release(&id, &ctx.cfg.owner, later, true, now_millis())
                    .await?;
            }
        }
    }
    Ok(true)
}

enum FetchFailure {
    /// The client's input is at fault; the message names the field.
    Input(String),
    /// Storage failed; not the client's fault.
    Ours(String),
}

async fn fetch_all(ctx: &Ctx, task: &TaskRecord) -> Result<(), FetchFailure> {
    let cap = ctx.fetcher.config().max_image_bytes;
    let mut style_budget = cap; // style images share one budget, as the contract says
                                // All images together, from their headers (`fetch.max_task_pixels`).
    let mut pixels = remixd_fetch::TaskPixels::new(ctx.fetcher.config().max_task_pixels);
    let task_id = task.id.to_string();
    for (role, url) in roles(&task.input) {
        let limit = if matches!(role, Role::Style(_)) {
            style_budget
        } else {
            cap
        };
        let img = match own_upload(ctx, task, url).await {
            Some(found) => found,
            None => ctx.fetcher.fetch_image(url, limit).await,
        }
        .map_err(|e| FetchFailure::Input(format!("{} {e}", role.field())))?;
        pixels
            .add(img.width, img.height)
            .map_err(|e| FetchFailure::Input(format!("{} {e}", role.field())))?;
        if matches!(role, Role::Style(_)) {
            style_budget = style_budget.saturating_sub(img.bytes.len() as u64);
        }
        store_input(ctx, &role.key(&task_id), img.bytes)
            .await
            .map_err(FetchFailure::Ours)?;
    }
    Ok(())
}

async fn store_input(ctx: &Ctx, key: &str, bytes: Bytes) -> Result<(), String> {
    ctx.blobs.put(key, bytes).await.map_err(|e| e.to_string())
}

/// Deletes a task's fetched inputs once it is terminal (after a cancellation, say); a
/// task that went back to the queue keeps them.
pub(crate) async fn drop_inputs_if_terminal(ctx: &Ctx, id: &remixd_domain::TaskId) {
    if let Ok(Some(t)) = ctx.store.task(id).await {
        if t.state.is_terminal() {
            let _ = ctx.blobs.delete_prefix(&format!("inputs/{id}")).await;
        }
    }
}

/// An input that is a file uploaded to this server (or one of its results) is read from
/// storage, without an HTTP round trip. `None`: not one of ours, fetch it over HTTP.
async fn own_upload(
    ctx: &Ctx,
    task: &TaskRecord,
    url: &str,
) -> Option<Result<remixd_fetch::FetchedImage, remixd_fetch::FetchError>> {
    let key = remixd_store::blobs::key_of_public_url(&ctx.cfg.public_url, url)?;
    let gone = || {
        Some(Err(remixd_fetch::FetchError::Unreachable(
            "the file does not exist or has expired".into(),
        )))
    };
    if key.starts_with("uploads/") {
        match ctx.store.upload(&key).await {
            Ok(Some(up)) if up.expire_time >= now_millis() && up.account_id == task.account_id => {}
            Ok(_) => return gone(),
            Err(e) => {
                return Some(Err(remixd_fetch::FetchError::Unreachable(format!(
                    "storage: {e}"
                ))))
            }
        }
    }
    let bytes = match ctx.blobs.get(&key).await {
        Ok(b) => b,
        Err(_) => return gone(),
    };
    if bytes.len() as u64 > ctx.fetcher.config().max_image_bytes {
        return Some(Err(remixd_fetch::FetchError::TooLarge {
            limit: ctx.fetcher.config().max_image_bytes,
        }));
    }
    Some(
        remixd_fetch::probe(&bytes, ctx.fetcher.config().max_pixels).map(
            |(kind, width, height)| remixd_fetch::FetchedImage {
                bytes,
                kind,
                width,
                height,
            },
        ),
    )
}
