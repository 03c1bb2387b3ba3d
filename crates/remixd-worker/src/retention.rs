//! The retention sweeper (API.md §7): deletes result files after `results_days`, uploads
//! when they expire, task records (with their deliveries and idempotency keys) after
//! `tasks_days`, and idempotency keys after their 24 h.
//!
//! Files go first and the database rows after, so a crash in between leaves a row
//! pointing at nothing (a 404, as promised) rather than a file nobody can find to delete.
//! Every node may run it: each step is idempotent.

use std::sync::Arc;
use std::time::Duration;

use remixd_domain::now_millis;
use remixd_store::{Blobs, Store, IDEMPOTENCY_WINDOW_MS};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long things are kept.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    pub results: Duration,
    pub tasks: Duration,
    /// Pause between sweeps.
    pub every: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            results: Duration::from_secs(14 * 86_400),
            tasks: Duration::from_secs(60 * 86_400),
            every: Duration::from_secs(300),
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
        let gone = store
            .delete_old_tasks(now - cfg.tasks.as_millis() as i64, BATCH)
            .await
            .map_err(|e| err(&e))?;
        for id in &gone {
            // Normally swept long ago (results_days < tasks_days); make sure.
            blobs
                .delete_prefix(&format!("results/{id}"))
                .await
                .map_err(|e| err(&e))?;
            blobs
                .delete_prefix(&format!("inputs/{id}"))
                .await
                .map_err(|e| err(&e))?;
        }
        out.tasks += gone.len();
        if (gone.len() as i64) < BATCH {
            break;
        }
    }
    out.idempotency_keys = store
        .delete_old_idempotency_keys(now - IDEMPOTENCY_WINDOW_MS)
        .await
        .map_err(|e| err(&e))?;
    Ok(out)
}

/// Runs [`sweep`] every `cfg.every` until shutdown.
pub fn spawn(
    store: Arc<dyn Store>,
    blobs: Blobs,
    cfg: RetentionConfig,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    tracker.spawn(async move {
        loop {
            match sweep(&*store, &blobs, &cfg).await {
                Ok(s) if s != Swept::default() => tracing::info!(
                    results = s.results,
                    uploads = s.uploads,
                    tasks = s.tasks,
                    idempotency_keys = s.idempotency_keys,
                    "retention sweep"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention sweep failed; will try again"),
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.every) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
}
