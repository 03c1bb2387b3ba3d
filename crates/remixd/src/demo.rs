//! `remixd demo`.
//!
//! The demo is a real client run against a real server: it starts remixd on a free
//! loopback port with a throw-away data directory, serves the bundled sample images
//! from a second loopback listener (allowed through `fetch.allow`), creates a task over
//! HTTP, follows it with a progress bar, downloads the images and prints the record.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::routing::get;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
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
    let http = reqwest::Client::new();
    // Ready when /readyz says so (the first start also wrote the key file).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the embedded server did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = std::fs::read_to_string(settings.data_dir.join("default.key"))?
        .trim()
        .to_string();

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
    let created: Value = http
        .post(format!("{base}/api/v1/jobs/createTask"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(created["code"] == 200, "createTask answered {created}");
    let task_id = created["data"]["taskId"]
        .as_str()
        .context("no taskId")?
        .to_string();
    println!("created task {task_id}");

    let bar = ProgressBar::new(100);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {pos:>3}% {msg}",
    )?);
    let record = loop {
        let r: Value = http
            .get(format!("{base}/api/v1/jobs/recordInfo"))
            .query(&[("taskId", &task_id)])
            .bearer_auth(&key)
            .send()
            .await?
            .json()
            .await?;
        let data = r["data"].clone();
        let state = data["state"].as_str().unwrap_or("?").to_string();
        bar.set_position(data["progress"].as_u64().unwrap_or(0));
        bar.set_message(state.clone());
        if state == "success" || state == "fail" {
            bar.finish_with_message(state);
            break data;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    if record["state"] == "success" {
        let result: Value = serde_json::from_str(record["resultJson"].as_str().unwrap_or("{}"))?;
        std::fs::create_dir_all(out)?;
        for (i, url) in result["resultUrls"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let url = url.as_str().context("result URL")?;
            let bytes = http
                .get(url)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            let path = out.join(format!("{task_id}-{i}.png"));
            std::fs::write(&path, &bytes)?;
            println!("wrote {} ({} bytes)", path.display(), bytes.len());
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
