//! The remixd binary's library: settings, wiring and the CLI commands, importable by
//! the integration tests so they start the real server in-process on port 0.
//!
//! [`launch_with_listener`] is the one entry point that turns settings into a running
//! service: it opens the store and file storage, creates the default account on an
//! empty database, builds the engine, starts the workers and serves the API through
//! [`serve`] (connection cap and timeouts) until the shutdown token fires, then drains
//! everything in order (stop accepting, end streams, finish requests within the drain
//! deadline, finish or release work in hand).

pub mod bench;
pub mod cli;
pub mod demo;
pub mod generate;
pub mod membench;
pub mod serve;
pub mod settings;
pub mod submit;
pub mod telemetry;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use remixd_api::{ApiConfig, AppState};
use remixd_domain::{now_millis, KeyLimits};
use remixd_engine::{Engine, PreviewEngine};
use remixd_fetch::{FetchConfig, Fetcher};
use remixd_store::{Blobs, PostgresStore, SqliteStore, Store};
use remixd_worker::callbacks::{CallbackConfig, Deliverer, PayloadFn};
use remixd_worker::{Wakeup, Worker, WorkerConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use settings::Settings;

/// Which parts of remixd a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Role {
    /// The API, the workers and the background loops.
    #[default]
    All,
    /// Only the HTTP API.
    Api,
    /// Only the workers (with /healthz and /readyz on the listener).
    Worker,
}

/// Credits of the account made on first start.
pub const DEFAULT_ACCOUNT_CREDITS: i64 = 1000;

/// Opens the configured database and applies migrations.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    let url = settings.database_url();
    let store: Arc<dyn Store> = if url.starts_with("sqlite:") {
        Arc::new(
            SqliteStore::open(&url)
                .await
                .with_context(|| format!("opening database {url}"))?,
        )
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Arc::new(
            PostgresStore::open(&url, settings.database.max_connections)
                .await
                .with_context(|| {
                    format!(
                        "connecting to database {}",
                        crate::settings::redact_url(&url)
                    )
                })?,
        )
    } else {
        anyhow::bail!(
            "database.url {:?}: remixd stores its data in sqlite://PATH or postgres://… databases",
            crate::settings::redact_url(&url)
        );
    };
    store
        .migrate()
        .await
        .context("applying database migrations")?;
    Ok(store)
}

/// The upstream gateway for `engine.kind` and `engine.fallback`; `None` when the
/// engine runs here.
pub fn build_gateway(
    settings: &Settings,
    fetcher: &Fetcher,
) -> anyhow::Result<Option<remixd_upstream::Gateway>> {
    let e = &settings.engine;
    let Some(first) = remixd_upstream::Kind::parse(&e.kind) else {
        return Ok(None);
    };
    let mut providers = Vec::new();
    for kind in std::iter::once(first).chain(
        e.fallback
            .iter()
            .filter_map(|f| remixd_upstream::Kind::parse(f)),
    ) {
        let p = match kind {
            remixd_upstream::Kind::Fal => &e.fal,
            remixd_upstream::Kind::Ideogram => &e.ideogram,
        };
        providers.push((kind, p.to_config(kind)));
    }
    let gw = remixd_upstream::Gateway::new(remixd_upstream::GatewayConfig {
        providers,
        fetcher: fetcher.clone(),
        // Provider results are about a megapixel; leave room for lossless ones.
        max_result_bytes: settings.fetch.max_image_bytes.max(64 << 20),
    })
    .map_err(|e| anyhow::anyhow!("engine: {e}"))?;
    Ok(Some(gw))
}

/// The fetcher for `settings`; `origin` is this server when it is serving.
pub fn build_fetcher(
    settings: &Settings,
    origin: Option<remixd_domain::ServerOrigin>,
) -> anyhow::Result<Fetcher> {
    Fetcher::new(FetchConfig {
        allow: settings.fetch.allow.clone(),
        timeout: Duration::from_secs(settings.fetch.timeout_s),
        task_timeout: Duration::from_secs(settings.fetch.task_timeout_s),
        origin,
        max_image_bytes: settings.fetch.max_image_bytes,
        max_pixels: settings.fetch.max_pixels,
        max_task_pixels: settings.fetch.max_task_pixels,
        decode_concurrency: settings.worker.decode_concurrency,
        ..FetchConfig::default()
    })
    .context("fetch settings")
}

/// Builds the configured engine; upstream engines download their results with `fetcher`.
pub fn build_engine(settings: &Settings, fetcher: &Fetcher) -> anyhow::Result<Arc<dyn Engine>> {
    if let Some(gw) = build_gateway(settings, fetcher)? {
        return Ok(Arc::new(gw));
    }
    match settings.engine.kind.as_str() {
        "preview" => Ok(Arc::new(PreviewEngine::new(
            remixd_engine::preview::PreviewConfig {
                delay_per_image: Duration::from_millis(settings.engine.preview.delay_ms),
            },
        ))),
        "local" => {
            let cfg = settings.engine.local.to_config()?;
            let dir = cfg.model_dir.display().to_string();
            let engine = remixd_diffusion::engine::LocalEngine::load(cfg)
                .with_context(|| format!("loading the local engine's model from {dir}"))?;
            Ok(Arc::new(engine))
        }
        other => {
            anyhow::bail!("engine.kind = {other:?} is unknown (preview, local, fal, ideogram)")
        }
    }
}

/// The free-space check over the database's directory and, for storage on the local
/// disk, the files' directory (`storage.min_free_mb`).
fn space_guard(settings: &Settings, blobs: &Blobs) -> remixd_store::SpaceGuard {
    let mut dirs = Vec::new();
    let db = settings.database_url();
    if let Some(path) = db
        .strip_prefix("sqlite://")
        .or_else(|| db.strip_prefix("sqlite:"))
    {
        let parent = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        dirs.push(("database", parent.to_path_buf()));
    }
    if let Some(files) = blobs.local_dir() {
        dirs.push(("files", files.to_path_buf()));
    }
    remixd_store::SpaceGuard::new(dirs, settings.storage.min_free_mb.saturating_mul(1_000_000))
}

/// On an empty database: the `default` account with its key, written to
/// `<data_dir>/default.key` (mode 0600). Returns the key when one was made; of several
/// nodes starting at once on one empty database, one makes it.
pub async fn first_start(store: &dyn Store, data_dir: &Path) -> anyhow::Result<Option<String>> {
    if store.count_accounts().await? > 0 {
        return Ok(None);
    }
    let id = uuid_like();
    match store
        .create_account(&id, "default", DEFAULT_ACCOUNT_CREDITS, now_millis())
        .await
    {
        Ok(_) => {}
        // Another node sharing the database made it first: its data dir has the key.
        Err(remixd_store::StoreError::Conflict(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (token, record) =
        remixd_api::auth::generate_key("default", "default", KeyLimits::default());
    store.create_key(record, now_millis()).await?;
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("default.key");
    write_private(&path, &format!("{}\n", token.0))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(token.0))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // The mode above applies only when the file is created; an older file is narrowed too.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents.as_bytes())
}

/// A fresh time-ordered id for accounts.
pub fn uuid_like() -> String {
    remixd_domain::TaskId::new().to_string()
}

/// Runs remixd on an already-bound listener until `shutdown` fires.
pub async fn launch_with_listener(
    settings: Settings,
    listener: TcpListener,
    role: Role,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    settings.check()?;
    let addr = listener.local_addr()?;
    let public_url = settings
        .server
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));

    let store = open_store(&settings).await?;
    if let Some(key) = first_start(&*store, &settings.data_dir).await? {
        let path = settings.data_dir.join("default.key");
        println!("Created account \"default\" with {DEFAULT_ACCOUNT_CREDITS} credits.");
        println!("Its API key (also written to {}):", path.display());
        println!("{key}");
    }
    let blobs = Blobs::open_with(&settings.storage_url(), &settings.s3_options())
        .context("opening file storage")?;
    let space = space_guard(&settings, &blobs);
    let mut origin = remixd_domain::ServerOrigin::new(&public_url, Some(addr))
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut bucket_origin = None;
    // The bucket's own URLs of its files (presigned links handed out by any node) name
    // this server's files too: read from storage under the ownership rule, never fetched.
    match blobs.presigned_base().await {
        Ok(Some(base)) => {
            bucket_origin = Some(base.origin().ascii_serialization());
            origin = origin.with_bucket(base);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "cannot sign bucket URLs; presigned links will not be recognised as this server's files"
        ),
    }
    let fetcher = build_fetcher(&settings, Some(origin.clone()))?;
    let engine = build_engine(&settings, &fetcher)?;

    let tracker = TaskTracker::new();
    let serve_cfg = serve::ServeConfig::from_settings(&settings, serve::raise_nofile_limit());
    if let Some(addr) = &settings.server.metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("server.metrics_listen: cannot listen on {addr}"))?;
        tracing::info!(listen = %l.local_addr()?, "metrics on /metrics");
        // The same timeouts; a handful of scrapers need few connections.
        let cfg = serve::ServeConfig {
            max_connections: 32,
            ..serve_cfg.clone()
        };
        telemetry::serve(l, store.clone(), cfg, &tracker, shutdown.clone());
    }
    // Wake-ups go to this process's loops and, where the store has a channel between
    // processes (PostgreSQL's LISTEN/NOTIFY), to every other node's.
    let mut wake = Wakeup::default();
    if let Some(mut signals) = store
        .subscribe()
        .await
        .context("listening for other nodes' signals")?
    {
        wake = wake.publishing_to(store.clone());
        let (wake, shutdown) = (wake.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    s = signals.recv() => match s {
                        Some(s) => wake.on_signal(s),
                        None => return,
                    },
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }
    if role != Role::Api {
        let w = &settings.worker;
        let cfg = WorkerConfig {
            lease: Duration::from_millis(w.lease_ms),
            poll_interval: Duration::from_millis(w.poll_ms),
            fetch_concurrency: w.fetch_concurrency,
            fetch_per_account: w.fetch_per_account() as u32,
            engine_concurrency: settings.engine_loops(),
            max_attempts: settings.limits.max_attempts,
            retry_delay: Duration::from_millis(w.retry_delay_ms),
            shutdown_grace: Duration::from_millis(w.shutdown_grace_ms),
            public_url: public_url.clone(),
            source_link: Duration::from_secs(w.source_link_s),
            ..WorkerConfig::default()
        };
        let owner = cfg.owner.clone();
        Worker::new(
            store.clone(),
            blobs.clone(),
            fetcher.clone(),
            engine.clone(),
            cfg,
            wake.clone(),
        )
        .with_space(space.clone())
        .spawn(&tracker, shutdown.clone());
        let c = &settings.callbacks;
        let cb = CallbackConfig {
            timeout: Duration::from_secs_f64(c.timeout_s),
            schedule: c
                .retry_schedule_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            concurrency: c.concurrency,
            poll_interval: Duration::from_millis(w.poll_ms),
            ..CallbackConfig::default()
        };
        let r = &settings.retention;
        let retention = remixd_worker::retention::RetentionConfig {
            results: Duration::from_secs_f64(r.results_days * 86_400.0),
            tasks: Duration::from_secs_f64(r.tasks_days * 86_400.0),
            every: Duration::from_secs_f64(r.sweep_interval_s),
            orphans_every: Duration::from_secs_f64(r.orphans_interval_s),
        };
        remixd_worker::retention::spawn(
            store.clone(),
            blobs.clone(),
            retention,
            &tracker,
            shutdown.clone(),
        );
        let payload = callback_payload(&settings, &*store, &blobs, &origin, &public_url).await?;
        Deliverer::new(
            store.clone(),
            fetcher.clone(),
            cb,
            payload,
            owner,
            wake.deliveries(),
        )
        .spawn(&tracker, shutdown.clone());
    }

    let api_cfg = ApiConfig {
        presigned_links: settings.storage.public == settings::PublicFiles::Presigned,
        presigned_origin: bucket_origin
            .filter(|_| settings.storage.public == settings::PublicFiles::Presigned),
        playground: settings.server.playground,
        error_http_status: settings.api.error_http_status,
        maintenance: settings.api.maintenance,
        disabled: settings.api.disabled.clone(),
        create_per_10s: settings.limits.create_per_10s,
        query_per_s: settings.limits.query_per_s,
        prices: settings.credits,
        public_url: public_url.clone(),
        max_upload_bytes: settings.fetch.max_image_bytes,
        uploads_ttl_ms: (settings.retention.uploads_hours * 3_600_000.0) as i64,
        private_files: settings.storage.private_files,
        streams_per_key: settings.limits.streams_per_key,
        uploads_per_10s: settings.limits.uploads_per_10s,
        upload_quota_bytes: settings.limits.upload_quota_bytes,
        uploads_in_flight_per_account: settings.limits.uploads_in_flight_per_account,
        uploads_in_flight: settings.limits.uploads_in_flight,
        ..ApiConfig::default()
    };
    let hooks = {
        let (w1, w2) = (wake.clone(), wake.clone());
        remixd_api::Hooks {
            created: Arc::new(move || w1.task_created()),
            cancelled: Arc::new(move |id| w2.task_cancelled(id)),
        }
    };
    let state = Arc::new(
        AppState::new(
            store.clone(),
            blobs,
            engine.clone(),
            fetcher.clone(),
            api_cfg,
            hooks,
        )
        .with_space(space)
        .with_shutdown(shutdown.clone()),
    );
    let app = match role {
        Role::Worker => remixd_api::health_router(state.clone()),
        _ => remixd_api::router(state.clone()),
    };
    {
        // Forget idle rate-limit keys now and then.
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => state.limits.prune().await,
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }

    tracing::info!(
        listen = %addr, public_url = %public_url, engine = engine.name(), role = ?role,
        database = %crate::settings::redact_url(&settings.database_url()), storage = %settings.storage_url(),
        max_connections = serve_cfg.max_connections,
        "remixd started (engine: {})", engine.name()
    );
    serve::serve(listener, app, serve_cfg, shutdown.clone())
        .await
        .context("serving HTTP")?;
    tracing::info!("HTTP stopped; draining workers");
    tracker.close();
    tracker.wait().await;
    tracing::info!("remixd stopped");
    Ok(())
}

/// How callback bodies show result URLs: as stored; signed by this server under
/// `storage.private_files`; presigned by the bucket under `storage.public = "presigned"`.
/// Their links outlive the ~16 h of retries (`CALLBACK_LINK_MS`): the body is fixed at
/// the first attempt.
async fn callback_payload(
    settings: &Settings,
    store: &dyn Store,
    blobs: &Blobs,
    origin: &remixd_domain::ServerOrigin,
    public_url: &str,
) -> anyhow::Result<PayloadFn> {
    use remixd_api::links::{AnswerLinks, LinkSigner, CALLBACK_LINK_MS};
    let private = settings.storage.private_files;
    let presigned = settings.storage.public == settings::PublicFiles::Presigned;
    if !private && !presigned {
        return Ok(Arc::new(|task, remained| {
            Box::pin(async move { remixd_api::wire::callback_body(&task, remained).await })
        }));
    }
    let signer = match private {
        true => Some(LinkSigner::load(store).await?),
        false => None,
    };
    let (origin, base, blobs) = (origin.clone(), public_url.to_string(), blobs.clone());
    Ok(Arc::new(move |task, remained| {
        let expires = remixd_domain::now_millis() + CALLBACK_LINK_MS;
        let mut links = match &signer {
            Some(s) => AnswerLinks::signed(s.clone(), origin.clone(), &base, expires),
            None => AnswerLinks::plain(),
        };
        if presigned {
            let lasting = Duration::from_millis(CALLBACK_LINK_MS as u64);
            links = links.presigned_by(blobs.clone(), origin.clone(), lasting);
        }
        Box::pin(async move { remixd_api::wire::callback_body_with(&task, remained, &links).await })
    }))
}

/// A shutdown token that fires on SIGTERM or Ctrl-C.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
        }
        t.cancel();
    });
    token
}
