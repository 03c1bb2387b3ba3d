//! remixd's workers: everything that moves a task after the API accepted it.
//!
//! Three kinds of loop run under one [`TaskTracker`]:
//! - **fetch** loops claim `waiting` tasks, download and check their input images
//!   (through `remixd-fetch`, the only code that opens sockets to user URLs), keep the
//!   raw bytes in file storage under `inputs/<task>/`, and move the task to `queuing`;
//! - **generate** loops (as many as `engine.concurrency`) claim `queuing` tasks, decode
//!   their inputs, run the engine, store the images under unguessable keys and finish
//!   the task;
//! - the **reaper** returns tasks whose lease lapsed (a dead worker's) to their queue,
//!   or fails them once `limits.max_attempts` is spent.
//!
//! Every claim carries a lease that a heartbeat extends while the work runs; a worker
//! that loses its lease stops and touches the task no more. All state changes go
//! through the store's conditional updates, so a task is finished exactly once and
//! refunded at most once, whatever the crashes.
//!
//! Shutdown: the loops stop claiming at once; work in hand gets `shutdown_grace` to
//! finish, after which the engine is cancelled and the task released, uncharged, for
//! the next worker.

mod backoff;
pub mod callbacks;
mod generate;
mod inputs;
mod lease;
pub mod retention;

use std::sync::Arc;
use std::time::Duration;

use remixd_domain::{now_millis, TaskId};
use remixd_engine::Engine;
use remixd_fetch::Fetcher;
use remixd_store::{Blobs, Signal, SpaceGuard, Store};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use backoff::{Backoff, MAX_LOOP_PAUSE};
pub use generate::result_json;

/// How a worker process behaves. Defaults suit production; tests shorten the times.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This process's lease owner name; unique per process.
    pub owner: String,
    /// How long a claim is valid without a heartbeat.
    pub lease: Duration,
    /// How often idle loops look for work when nothing woke them.
    pub poll_interval: Duration,
    /// How many tasks fetch their inputs at once.
    pub fetch_concurrency: usize,
    /// How many of those one account may hold (`worker.fetch_per_account`).
    pub fetch_per_account: u32,
    /// How many tasks generate at once (`engine.concurrency`).
    pub engine_concurrency: usize,
    /// Claims of a stage before the task fails (`limits.max_attempts`).
    pub max_attempts: i64,
    /// Wait before retrying a task whose engine was temporarily unavailable (times the attempt).
    pub retry_delay: Duration,
    /// Time that work in hand gets to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// Base of result URLs (`server.public_url`).
    pub public_url: String,
    /// How long the signed links to this server's files that an upstream engine hands
    /// its provider stay valid (`worker.source_link_s`).
    pub source_link: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            owner: format!(
                "worker-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            ),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            fetch_concurrency: 4,
            fetch_per_account: 2,
            engine_concurrency: 1,
            max_attempts: 3,
            retry_delay: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(20),
            public_url: "http://127.0.0.1:8080".into(),
            source_link: Duration::from_secs(2 * 3600),
        }
    }
}

/// Wakes idle loops when there is new work, so a task does not wait a poll interval.
/// With [`Wakeup::publishing_to`], every wake-up is also published through the store to
/// other nodes, whose listeners hand it to [`Wakeup::on_signal`]; without, or when a
/// signal is lost, other nodes find the work by polling.
#[derive(Default, Clone)]
pub struct Wakeup {
    fetch: Arc<Notify>,
    generate: Arc<Notify>,
    deliveries: Arc<Notify>,
    running: Arc<std::sync::Mutex<std::collections::HashMap<TaskId, CancellationToken>>>,
    publish: Option<Arc<dyn Store>>,
}

impl std::fmt::Debug for Wakeup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakeup")
            .field("publishing", &self.publish.is_some())
            .finish_non_exhaustive()
    }
}

impl Wakeup {
    /// Also tells other nodes, through `store`'s channel ([`Store::publish`]).
    pub fn publishing_to(mut self, store: Arc<dyn Store>) -> Self {
        self.publish = Some(store);
        self
    }

    /// A task was created.
    pub fn task_created(&self) {
        self.on_signal(Signal::Created);
        self.publish(Signal::Created);
    }
    fn inputs_ready(&self) {
        self.on_signal(Signal::InputsReady);
        self.publish(Signal::InputsReady);
    }
    /// A task became terminal (its callback, if any, is due).
    pub fn task_finished(&self) {
        self.on_signal(Signal::Finished);
        self.publish(Signal::Finished);
    }
    /// A task was cancelled (already failed in the store): stop the work on it at once,
    /// here and, through the store's channel, on other nodes (which otherwise notice at
    /// their next heartbeat).
    pub fn task_cancelled(&self, id: &TaskId) {
        self.on_signal(Signal::Cancelled(*id));
        self.publish(Signal::Cancelled(*id));
    }

    /// Acts on a signal, from this process or another node, without passing it on.
    pub fn on_signal(&self, signal: Signal) {
        match signal {
            Signal::Created => self.fetch.notify_one(),
            Signal::InputsReady => self.generate.notify_one(),
            Signal::Finished => self.deliveries.notify_one(),
            Signal::Cancelled(id) => {
                if let Some(t) = self.running.lock().expect("running map").get(&id) {
                    t.cancel();
                }
                self.deliveries.notify_one();
            }
        }
    }

    fn publish(&self, signal: Signal) {
        let Some(store) = self.publish.clone() else {
            return;
        };
        // Off the caller's path: a slow or failed publish only delays other nodes
        // until their next poll.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.publish(signal).await {
                    tracing::debug!(error = %e, ?signal, "could not publish a wake-up");
                }
            });
        }
    }
    /// Registers work on a task; `stop` fires if the task is cancelled meanwhile.
    pub(crate) fn track(&self, id: TaskId, stop: CancellationToken) -> Tracked {
        self.running.lock().expect("running map").insert(id, stop);
        Tracked {
            id,
            running: self.running.clone(),
        }
    }
    /// What the callback deliverer waits on.
    pub fn deliveries(&self) -> Arc<Notify> {
        self.deliveries.clone()
    }
}

/// Removes a task from the running map when its work ends.
pub(crate) struct Tracked {
    id: TaskId,
    running: Arc<std::sync::Mutex<std::collections::HashMap<TaskId, CancellationToken>>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.running.lock().expect("running map").remove(&self.id);
    }
}

/// What every loop shares.
pub(crate) struct Ctx {
    pub store: Arc<dyn Store>,
    pub blobs: Blobs,
    pub fetcher: Fetcher,
    pub engine: Arc<dyn Engine>,
    pub cfg: WorkerConfig,
    pub wake: Wakeup,
    /// This server, to recognise its own file URLs among the inputs: the fetcher's, or
    /// one made from `public_url` alone.
    pub origin: Option<remixd_domain::ServerOrigin>,
    /// Fires `shutdown_grace` after shutdown began: work in hand must stop now.
    pub hard_stop: CancellationToken,
    /// While storage is under its free-space minimum, no new work is claimed: it would
    /// only fail to store its inputs or results. Queued tasks wait, nothing is lost.
    pub space: SpaceGuard,
    /// Signs links to this server's files for providers; loaded on first use.
    pub signer: tokio::sync::OnceCell<remixd_store::links::LinkSigner>,
}

/// The worker side of a remixd process.
pub struct Worker {
    ctx: Arc<Ctx>,
}

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Blobs,
        fetcher: Fetcher,
        engine: Arc<dyn Engine>,
        cfg: WorkerConfig,
        wake: Wakeup,
    ) -> Self {
        let origin = fetcher
            .config()
            .origin
            .clone()
            .or_else(|| remixd_domain::ServerOrigin::new(&cfg.public_url, None).ok());
        let ctx = Ctx {
            origin,
            store,
            blobs,
            fetcher,
            engine,
            cfg,
            wake,
            hard_stop: CancellationToken::new(),
            space: SpaceGuard::default(),
            signer: tokio::sync::OnceCell::new(),
        };
        Self { ctx: Arc::new(ctx) }
    }

    /// Pauses claiming while storage is under its free-space minimum.
    pub fn with_space(mut self, space: SpaceGuard) -> Self {
        Arc::get_mut(&mut self.ctx)
            .expect("the worker is not started yet")
            .space = space;
        self
    }

    /// Starts every loop on `tracker`. They stop claiming when `shutdown` fires and
    /// finish (or release) what they hold within the grace period.
    pub fn spawn(self, tracker: &TaskTracker, shutdown: CancellationToken) {
        let ctx = self.ctx;
        tracing::info!(owner = %ctx.cfg.owner, engine = ctx.engine.name(), "worker starting");
        for _ in 0..ctx.cfg.fetch_concurrency.max(1) {
            tracker.spawn(stage_loop(ctx.clone(), Stage::Fetch, shutdown.clone()));
        }
        for _ in 0..ctx.cfg.engine_concurrency.max(1) {
            tracker.spawn(stage_loop(ctx.clone(), Stage::Generate, shutdown.clone()));
        }
        tracker.spawn(reaper(ctx.clone(), shutdown.clone()));
        let (grace, hard) = (ctx.cfg.shutdown_grace, ctx.hard_stop.clone());
        // Not on the tracker: the tracker's wait must end as soon as the loops have,
        // not when the grace period runs out.
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            hard.cancel();
        });
    }
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Fetch,
    Generate,
}

async fn stage_loop(ctx: Arc<Ctx>, stage: Stage, shutdown: CancellationToken) {
    let notify = match stage {
        Stage::Fetch => ctx.wake.fetch.clone(),
        Stage::Generate => ctx.wake.generate.clone(),
    };
    let mut backoff = Backoff::new(ctx.cfg.poll_interval, MAX_LOOP_PAUSE);
    while !shutdown.is_cancelled() {
        let worked = match ctx.space.check() {
            Err(e) => Err(format!("not claiming work: {e}")),
            Ok(()) => match stage {
                Stage::Fetch => inputs::run_one(&ctx).await,
                Stage::Generate => generate::run_one(&ctx).await,
            }
            .map_err(|e| e.to_string()),
        };
        let pause = match worked {
            Ok(true) => {
                backoff.reset();
                continue;
            }
            Ok(false) => {
                backoff.reset();
                ctx.cfg.poll_interval
            }
            Err(e) => {
                let pause = backoff.fail();
                // Once when the trouble starts, then at every tenth failure.
                if backoff.failures() % 10 == 1 {
                    tracing::warn!(?stage, error = %e, failures = backoff.failures(), pause_ms = pause.as_millis() as u64, "backing off");
                }
                pause
            }
        };
        tokio::select! {
            // A wake-up is only worth taking when the last round went well.
            _ = notify.notified(), if backoff.failures() == 0 => {}
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

async fn reaper(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let every = (ctx.cfg.lease / 3).max(Duration::from_millis(50));
    let mut backoff = Backoff::new(every, MAX_LOOP_PAUSE.max(every));
    loop {
        let pause = match ctx.store.reap(now_millis(), ctx.cfg.max_attempts).await {
            Ok(r) => {
                backoff.reset();
                for id in &r.requeued {
                    tracing::warn!(task = %id, "lease lapsed; task returned to its queue");
                }
                for (id, e) in &r.skipped {
                    tracing::error!(task = %id, error = %e, "reaper skipped a task row it cannot handle");
                }
                if !r.failed.is_empty() {
                    ctx.wake.task_finished();
                    metrics::counter!("remixd_tasks_finished_total", "state" => "fail", "fail_code" => "500")
                        .increment(r.failed.len() as u64);
                }
                metrics::counter!("remixd_tasks_requeued_total").increment(r.requeued.len() as u64);
                for id in &r.failed {
                    tracing::warn!(task = %id, "lease lapsed with no attempts left; task failed");
                    if let Err(e) = ctx.blobs.delete_prefix(&format!("inputs/{id}")).await {
                        tracing::warn!(task = %id, error = %e, "could not delete inputs");
                    }
                }
                if !r.requeued.is_empty() {
                    ctx.wake.task_created();
                    ctx.wake.inputs_ready();
                }
                every
            }
            Err(e) => {
                let pause = backoff.fail();
                tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "reaper pass failed; backing off");
                pause
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
