//! The lease heartbeat: while a worker holds a task, it extends the lease every third
//! of its length. When an extension fails (the reaper took the task back, or the
//! database is unreachable for longer than the lease), the heartbeat cancels the work:
//! another worker may already own the task, and two engines must not finish it.

use std::sync::Arc;

use remixd_domain::{now_millis, TaskId};
use tokio_util::sync::CancellationToken;

use crate::Ctx;

/// Runs until `done` fires; cancels `lost` if the lease cannot be kept.
pub(crate) fn spawn_heartbeat(
    ctx: &Arc<Ctx>,
    id: TaskId,
    done: CancellationToken,
    lost: CancellationToken,
) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        // At least every 2 s, so a cancellation made on another node stops the work soon.
        let every = (ctx.cfg.lease / 3).min(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = now_millis();
            let until = now + ctx.cfg.lease.as_millis() as i64;
            match ctx
                .store
                .extend_lease(&id, &ctx.cfg.owner, until, now)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(task = %id, "lease lost; stopping work on the task");
                    lost.cancel();
                    return;
                }
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "could not extend lease; will retry")
                }
            }
        }
    });
}

/// The lease end for a claim made now.
pub(crate) fn lease_until(ctx: &Ctx) -> i64 {
    now_millis() + ctx.cfg.lease.as_millis() as i64
}
