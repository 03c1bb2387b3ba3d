//! The retention sweeper (API.md §7): deletes result files after `results_days`, uploads
//! when they expire, task records (with their deliveries and idempotency keys) after
//! `tasks_days`, and idempotency keys after their 24 h.
//!
//! Files go first and the database rows after, so a crash in between leaves a row
//! pointing at nothing (a 404, as promised) rather than a file nobody can find to delete.
//! Every node may run it: each step is idempotent.
//!
//! The orphan sweep (at start, then every `orphans_every`) removes files that belong to
//! no successful task: the inputs of tasks that ended (or no longer exist), the results
//! of failed or deleted tasks, and the results of an earlier attempt of a task that then
//! succeeded with others (a worker that lost its lease and died before cleaning up). A
//! task still in flight is never touched.

use std::sync::Arc;
use std::time::Duration;

use remixd_domain::{now_millis, TaskId, TaskState};
use remixd_store::{Blobs, Store, IDEMPOTENCY_WINDOW_MS};

use crate::backoff::Backoff;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long things are kept.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    pub results: Duration,
    pub tasks: Duration,
    /// Pause between sweeps.
    pub every: Duration,
    /// Pause between orphan sweeps (the first runs at start).
    pub orphans_every: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            results: Duration::from_secs(14 * 86_400),
            tasks: Duration::from_secs(60 * 86_400),
            every: Duration::from_secs(300),
            orphans_every: Duration::from_secs(3600),
        }
    }
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub results: usize,
    pub uploads: usize,
    pub tasks: usize,
    pub idempotency_keys: u64,
}

const BATCH: i64 = 500;

/// One pass over everything that is due.
pub async fn sweep(
    store: &dyn Store,
    blobs: &Blobs,
    cfg: &RetentionConfig,
) -> Result<Swept, String> {
    let now = now_millis();
    let mut out = Swept::default();
    let err = |e: &dyn std::fmt::Display| e.to_string();
    loop {
        let due = store
            .results_due(now - cfg.results.as_millis() as i64, BATCH)
            .await
            .map_err(|e| err(&e))?;
        for id in &due {
            blobs
                .delete_prefix(&format!("results/{id}"))
                .await
                .map_err(|e| err(&e))?;
        }
        store.mark_results_swept(&due).await.map_err(|e| err(&e))?;
        out.results += due.len();
        if (due.len() as i64) < BATCH {
            break;
        }
    }
    loop {
        let due = store.uploads_due(now, BATCH).await.map_err(|e| err(&e))?;
        for key in &due {
            blobs.delete(key).await.map_err(|e| err(&e))?;
        }
        store.delete_uploads(&due).await.map_err(|e| err(&e))?;
        out.uploads += due.len();
        if (due.len() as i64) < BATCH {
            break;
        }
    }
    loop {
        // Files first, then rows.
        let old = store
            .old_tasks(now - cfg.tasks.as_millis() as i64, BATCH)
            .await
            .map_err(|e| err(&e))?;
        for id in &old {
            // Normally swept long ago (results_days < tasks_days); make sure.
            for top in ["results", "inputs"] {
                blobs
                    .delete_prefix(&format!("{top}/{id}"))
                    .await
                    .map_err(|e| err(&e))?;
            }
        }
        store.delete_tasks(&old).await.map_err(|e| err(&e))?;
        out.tasks += old.len();
        if (old.len() as i64) < BATCH {
            break;
        }
    }
    out.idempotency_keys = store
        .delete_old_idempotency_keys(now - IDEMPOTENCY_WINDOW_MS)
        .await
        .map_err(|e| err(&e))?;
    Ok(out)
}

/// What one orphan sweep removed: directories of task files.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Orphans {
    pub inputs: usize,
    pub results: usize,
}

/// Removes task files that no successful task refers to (see the module's text).
pub async fn sweep_orphans(store: &dyn Store, blobs: &Blobs) -> Result<Orphans, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mut out = Orphans::default();
    for top in ["inputs", "results"] {
        let names = blobs.list_dirs(top).await.map_err(|e| err(&e))?;
        let ids: Vec<TaskId> = names
            .iter()
            .filter_map(|n| match n.parse() {
                Ok(id) => Some(id),
                Err(_) => {
                    tracing::warn!(dir = %format!("{top}/{n}"), "not a task's directory; left alone");
                    None
                }
            })
            .collect();
        for chunk in ids.chunks(BATCH as usize) {
            let tasks = store.tasks_by_ids(chunk).await.map_err(|e| err(&e))?;
            for id in chunk {
                let task = tasks.iter().find(|t| t.id == *id);
                let prefix = format!("{top}/{id}");
                let whole_dir = match (top, task.map(|t| t.state)) {
                    (_, None) => true,
                    (_, Some(s)) if !s.is_terminal() => false,
                    ("inputs", Some(_)) => true,
                    (_, Some(TaskState::Fail)) => true,
                    _ => false,
                };
                if whole_dir {
                    blobs.delete_prefix(&prefix).await.map_err(|e| err(&e))?;
                    if top == "inputs" {
                        out.inputs += 1;
                    } else {
                        out.results += 1;
                    }
                    continue;
                }
                // A successful task: only an earlier attempt can have left other sets.
                let Some(t) = task.filter(|t| top == "results" && t.attempts > 1) else {
                    continue;
                };
                for token in blobs.list_dirs(&prefix).await.map_err(|e| err(&e))? {
                    let set = format!("{prefix}/{token}");
                    if !t.result_json.contains(&format!("/files/{set}/")) {
                        blobs.delete_prefix(&set).await.map_err(|e| err(&e))?;
                        out.results += 1;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Runs [`sweep`] every `cfg.every` and [`sweep_orphans`] at start and every
/// `cfg.orphans_every`, until shutdown. A failed sweep is retried with a growing pause.
pub fn spawn(
    store: Arc<dyn Store>,
    blobs: Blobs,
    cfg: RetentionConfig,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    tracker.spawn(async move {
        let mut backoff = Backoff::new(Duration::from_secs(1), cfg.every);
        let mut next_orphans = tokio::time::Instant::now();
        loop {
            let mut ok = true;
            match sweep(&*store, &blobs, &cfg).await {
                Ok(s) if s != Swept::default() => tracing::info!(
                    results = s.results,
                    uploads = s.uploads,
                    tasks = s.tasks,
                    idempotency_keys = s.idempotency_keys,
                    "retention sweep"
                ),
                Ok(_) => {}
                Err(e) => {
                    ok = false;
                    tracing::warn!(error = %e, "retention sweep failed; will try again")
                }
            }
            if tokio::time::Instant::now() >= next_orphans {
                match sweep_orphans(&*store, &blobs).await {
                    Ok(o) => {
                        if o != Orphans::default() {
                            tracing::info!(
                                inputs = o.inputs,
                                results = o.results,
                                "removed orphaned task files"
                            );
                        }
                        next_orphans = tokio::time::Instant::now() + cfg.orphans_every;
                    }
                    Err(e) => {
                        ok = false;
                        tracing::warn!(error = %e, "orphan sweep failed; will try again")
                    }
                }
            }
            let pause = if ok {
                backoff.reset();
                cfg.every
            } else {
                backoff.fail()
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
}
