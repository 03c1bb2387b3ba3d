//! Prometheus metrics on their own listener (`server.metrics_listen`), off unless set.
//!
//! Counters and histograms are recorded where things happen (the worker crate, through
//! the `metrics` facade); the task gauges are read from the database at each scrape, so
//! every node reports the cluster's queue as it is.

use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use remixd_domain::TaskState;
use remixd_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The process's recorder: installed once, shared by every server the process starts.
fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ])
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; then ours renders nothing new.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Serves `GET /metrics` on `listener` until shutdown.
pub fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    cfg: crate::serve::ServeConfig,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    let handle = handle().clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (handle, store) = (handle.clone(), store.clone());
            async move {
                if let Ok(counts) = store.count_by_state().await {
                    for state in TaskState::ALL {
                        let n = counts
                            .iter()
                            .find(|(s, _)| *s == state)
                            .map(|(_, n)| *n)
                            .unwrap_or(0);
                        metrics::gauge!("remixd_tasks", "state" => state.as_str()).set(n as f64);
                    }
                }
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    handle.render(),
                )
            }
        }),
    );
    // The API's serving loop: connection cap, head/body/idle timeouts, drain deadline.
    tracker.spawn(async move {
        if let Err(e) = crate::serve::serve(listener, app, cfg, shutdown).await {
            tracing::warn!(error = %e, "metrics listener stopped");
        }
    });
}
