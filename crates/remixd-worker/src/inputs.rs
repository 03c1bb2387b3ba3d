//! The fetch stage: download a `waiting` task's input images, check them, keep their
//! bytes in file storage, and move the task to `queuing`.
//!
//! Any fetch failure is the client's input (failCode `422`), with a message naming the
//! field; a storage failure is ours, and the task is released to be tried again.
//!
//! Fetch slots are shared between accounts: the claim takes the least-served account
//! first and never more than `worker.fetch_per_account` tasks of one account, so tasks
//! pointing at URLs that never answer cannot hold every slot. A task's downloads run in
//! parallel (at most [`PARALLEL_DOWNLOADS`]) under one deadline for all of them
//! (`fetch.task_timeout_s`), so a task with many slow URLs holds its slot for at most
//! that long. The style images share one byte budget, taken chunk by chunk.
//!
//! A URL that designates this server (any spelling: see
//! [`remixd_store::blobs::classify_url`]) is never fetched: a result or upload file is
//! read from storage, and only by tasks of the account it belongs to.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use remixd_domain::{now_millis, FailCode, TaskId, TaskInput};
use remixd_fetch::{FetchError, FetchedImage, SharedBudget};
use remixd_store::blobs::{classify_url, result_task, FileUrl};
use remixd_store::TaskRecord;
use tokio_util::sync::CancellationToken;

use crate::lease::{lease_until, spawn_heartbeat};
use crate::Ctx;

/// Downloads of one task in flight at once. The inputs are at most 13 URLs; four at a
/// time keeps one task's connections modest while a slow URL no longer delays the rest.
pub(crate) const PARALLEL_DOWNLOADS: usize = 4;

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
        .claim_fetch(
            &ctx.cfg.owner,
            now_millis(),
            lease_until(ctx),
            ctx.cfg.fetch_per_account,
        )
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
        None => {
            drop_inputs_if_terminal(ctx, &id).await;
        }
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
                let later = crate::backoff::retry_at(
                    now_millis(),
                    ctx.cfg.retry_delay,
                    task.fetch_attempts,
                );
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

// What became of each input so far, for the deadline's message.
const QUEUED: u8 = 0;
const DOWNLOADING: u8 = 1;
const DONE: u8 = 2;

async fn fetch_all(ctx: &Ctx, task: &TaskRecord) -> Result<(), FetchFailure> {
    let cfg = ctx.fetcher.config();
    let cap = cfg.max_image_bytes;
    let styles = SharedBudget::new(cap); // style images share one budget, as the contract says
                                         // All images together, from their headers (`fetch.max_task_pixels`).
    let pixels = std::sync::Mutex::new(remixd_fetch::TaskPixels::new(cfg.max_task_pixels));
    let roles = roles(&task.input);
    let task_id = task.id.to_string();
    let progress: Vec<AtomicU8> = roles.iter().map(|_| AtomicU8::new(QUEUED)).collect();
    // The futures are made up front (they start only when first polled) and not in a
    // stream closure, whose higher-ranked lifetimes the spawned loop's `Send` check
    // cannot see through.
    let each: Vec<_> = roles
        .iter()
        .enumerate()
        .map(|(i, (role, url))| {
            let shared = matches!(role, Role::Style(_)).then_some(&styles);
            let (pixels, task_id, progress) = (&pixels, &task_id, &progress[i]);
            async move {
                let img = fetch_one(ctx, task, role, url, cap, shared, progress).await?;
                pixels
                    .lock()
                    .expect("pixel budget")
                    .add(img.width, img.height)
                    .map_err(|e| FetchFailure::Input(format!("{} {e}", role.field())))?;
                // Stored at once: a task holds no more than its downloads in flight.
                store_input(ctx, &role.key(task_id), img.bytes)
                    .await
                    .map_err(FetchFailure::Ours)
            }
        })
        .collect();
    let downloads = futures::stream::iter(each).buffer_unordered(PARALLEL_DOWNLOADS);
    // The first failure ends the task at once; the other downloads are dropped with it.
    let all = async {
        futures::pin_mut!(downloads);
        while let Some(r) = downloads.next().await {
            r?;
        }
        Ok::<_, FetchFailure>(())
    };
    match tokio::time::timeout(cfg.task_timeout, all).await {
        Ok(r) => r,
        Err(_) => {
            let state = |i: &usize| progress[*i].load(Ordering::Relaxed);
            let slow = (0..roles.len())
                .find(|i| state(i) == DOWNLOADING)
                .or_else(|| (0..roles.len()).find(|i| state(i) == QUEUED))
                .unwrap_or(0);
            let e = FetchError::TaskTimeout {
                secs: cfg.task_timeout.as_secs().max(1),
            };
            Err(FetchFailure::Input(format!(
                "{} {e}",
                roles[slow].0.field()
            )))
        }
    }
}

/// One input: from storage when it is this server's file, else over HTTP.
async fn fetch_one(
    ctx: &Ctx,
    task: &TaskRecord,
    role: &Role,
    url: &str,
    cap: u64,
    shared: Option<&SharedBudget>,
    progress: &AtomicU8,
) -> Result<FetchedImage, FetchFailure> {
    progress.store(DOWNLOADING, Ordering::Relaxed);
    let got = match own_file(ctx, task, url, cap, shared).await {
        Some(r) => r,
        None => ctx
            .fetcher
            .fetch_image_shared(url, cap, shared)
            .await
            .map_err(|e| e.to_string()),
    };
    progress.store(DONE, Ordering::Relaxed);
    got.map_err(|e| FetchFailure::Input(format!("{} {e}", role.field())))
}

async fn store_input(ctx: &Ctx, key: &str, bytes: Bytes) -> Result<(), String> {
    ctx.blobs.put(key, bytes).await.map_err(|e| e.to_string())
}

/// Deletes a task's fetched inputs once it is terminal (after a cancellation, say); a
/// task that went back to the queue keeps them.
/// Returns the task's record when it is terminal.
pub(crate) async fn drop_inputs_if_terminal(
    ctx: &Ctx,
    id: &remixd_domain::TaskId,
) -> Option<TaskRecord> {
    let t = ctx.store.task(id).await.ok()??;
    if !t.state.is_terminal() {
        return None;
    }
    let _ = ctx.blobs.delete_prefix(&format!("inputs/{id}")).await;
    Some(t)
}

/// An input URL that designates this server is read from storage, never over HTTP, and
/// only when the task's account may use the file: an upload of that account, or a result
/// of one of its tasks. `None`: another server's URL, to be fetched. The error is a
/// phrase that follows the field name.
async fn own_file(
    ctx: &Ctx,
    task: &TaskRecord,
    url: &str,
    cap: u64,
    shared: Option<&SharedBudget>,
) -> Option<Result<FetchedImage, String>> {
    let key = match classify_url(ctx.origin.as_ref()?, url) {
        FileUrl::Foreign => return None,
        FileUrl::NotAFile => {
            return Some(Err(
                "points to this server but not to one of its result or upload files".into(),
            ))
        }
        FileUrl::File(key) => key,
    };
    Some(read_own_file(ctx, task, &key, cap, shared).await)
}

async fn read_own_file(
    ctx: &Ctx,
    task: &TaskRecord,
    key: &str,
    cap: u64,
    shared: Option<&SharedBudget>,
) -> Result<FetchedImage, String> {
    // One message for unknown, expired and another account's files: it must not tell
    // which of them a guessed URL is.
    let refused = || {
        "is not usable by this account: the file does not exist or has expired, or belongs to another account".to_string()
    };
    let storage = |e: &dyn std::fmt::Display| format!("could not be read from storage: {e}");
    let allowed = if key.starts_with("uploads/") {
        match ctx.store.upload(key).await {
            Ok(Some(up)) => up.expire_time >= now_millis() && up.account_id == task.account_id,
            Ok(None) => false,
            Err(e) => return Err(storage(&e)),
        }
    } else {
        match result_task(key).and_then(|t| t.parse::<TaskId>().ok()) {
            Some(owner_task) => match ctx.store.task(&owner_task).await {
                Ok(Some(t)) => t.account_id == task.account_id,
                Ok(None) => false,
                Err(e) => return Err(storage(&e)),
            },
            None => false,
        }
    };
    if !allowed {
        return Err(refused());
    }
    let bytes = match ctx.blobs.get(key).await {
        Ok(b) => b,
        Err(remixd_store::BlobError::NotFound) => return Err(refused()),
        Err(e) => return Err(storage(&e)),
    };
    let len = bytes.len() as u64;
    if len > cap {
        return Err(FetchError::TooLarge { limit: cap }.to_string());
    }
    if let Some(b) = shared {
        b.take(len).map_err(|e| e.to_string())?;
    }
    let (kind, width, height) =
        remixd_fetch::probe(&bytes, ctx.fetcher.config().max_pixels).map_err(|e| e.to_string())?;
    Ok(FetchedImage {
        bytes,
        kind,
        width,
        height,
    })
}
