//! `remixd demo`.
//!
//! The demo is a real client run against a real server: it starts remixd on a free
//! loopback port with a throw-away data directory, serves the bundled sample images
//! from a second loopback listener (allowed through `fetch.allow`), creates a task over
//! HTTP, follows it with a progress bar, downloads the images and prints the record.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::Role;

pub(crate) const BASE: &[u8] = include_bytes!("../../../assets/coffee.webp");
pub(crate) const CHARACTER: &[u8] = include_bytes!("../../../assets/astronaut.webp");
pub(crate) const MASK: &[u8] = include_bytes!("../../../assets/astronaut_mask.png");

/// Serves the bundled samples on 127.0.0.1; returns the base URL.
pub(crate) async fn serve_samples(shutdown: CancellationToken) -> anyhow::Result<String> {
    let app = axum::Router::new()
        .route(
            "/coffee.webp",
            get(|| async { ([("content-type", "image/webp")], BASE) }),
        )
        .route(
            "/astronaut.webp",
            get(|| async { ([("content-type", "image/webp")], CHARACTER) }),
        )
        .route(
            "/astronaut_mask.png",
            get(|| async { ([("content-type", "image/png")], MASK) }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", l.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(l, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(url)
}

pub async fn run(mut settings: Settings, out: &Path) -> anyhow::Result<()> {
    let data = tempfile::tempdir().context("creating a temporary data directory")?;
    settings.data_dir = data.path().to_path_buf();
    settings.database.url = None;
    settings.storage.url = None;
    settings.server.public_url = None;
    settings.server.metrics_listen = None;
    settings.fetch.allow = vec!["127.0.0.1/32".into()];

    let shutdown = CancellationToken::new();
    let samples = serve_samples(shutdown.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!(
        "remixd demo: server on {base}, engine {}",
        settings.engine.kind
    );
    let server = tokio::spawn(crate::launch_with_listener(
        settings.clone(),
        listener,
        Role::All,
        shutdown.clone(),
    ));

    let result = drive(&base, &samples, &settings, out).await;
    shutdown.cancel();
    let served = server.await.context("server task")?;
    result.and(served)
}

async fn drive(base: &str, samples: &str, settings: &Settings, out: &Path) -> anyhow::Result<()> {
    // Ready when /readyz says so (the first start has also written the key file).
    crate::submit::Client::new(base, "")?
        .wait_ready(Duration::from_secs(30))
        .await?;
    let key = std::fs::read_to_string(settings.data_dir.join("default.key"))?
        .trim()
        .to_string();
    let client = crate::submit::Client::new(base, &key)?;
    let body = json!({
        "model": "ideogram/character-remix",
        "input": {
            "prompt": "an astronaut enjoying a cup of coffee",
            "image_url": format!("{samples}/coffee.webp"),
            "reference_image_urls": [format!("{samples}/astronaut.webp")],
            "reference_mask_urls": format!("{samples}/astronaut_mask.png"),
            "image_size": "landscape_4_3",
            "num_images": "2",
            "seed": 7,
            "strength": 0.9,
            "style": "AUTO"
        }
    });
    let task_id = client.create(&body).await?;
    println!("created task {task_id}");
    let record = client.follow(&task_id).await?;
    if record["state"] == "success" {
        for path in client.download(&task_id, &record, out).await? {
            println!(
                "wrote {} ({} bytes)",
                path.display(),
                std::fs::metadata(&path)?.len()
            );
        }
    }
    println!("{}", serde_json::to_string_pretty(&record)?);
    anyhow::ensure!(
        record["state"] == "success",
        "the task failed: {}",
        record["failMsg"]
    );
    Ok(())
}
