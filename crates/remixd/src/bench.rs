//! `remixd bench …`: measurements that print figures and assert nothing.
//!
//! - `bench preview`: the preview engine's time per image, render and PNG encoding apart.
//! - `bench callbacks`: callback latency from task completion to receipt (p50/p99), and
//!   the deliveries per second the deliverer sustains, against a receiver on loopback.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::demo::{serve_samples, BASE, CHARACTER, MASK};
use crate::settings::Settings;
use crate::Role;

/// Prints the preview engine's time per image (render, and PNG encoding apart).
pub fn preview(size: &str, iterations: u32) -> anyhow::Result<()> {
    use remixd_domain::{ImageSize, NumImages, RenderingSpeed, Seed, Strength, Style};
    let size = ImageSize::parse(size).map_err(|e| anyhow::anyhow!("--size {e}"))?;
    let decode =
        |b: &[u8]| remixd_fetch::decode_rgb(b, 40_000_000).map_err(|e| anyhow::anyhow!("{e}"));
    for speed in [
        RenderingSpeed::Turbo,
        RenderingSpeed::Balanced,
        RenderingSpeed::Quality,
    ] {
        let job = remixd_engine::Job {
            task_id: "bench".into(),
            base: decode(BASE)?,
            character: decode(CHARACTER)?,
            mask: Some(
                remixd_fetch::decode_luma(MASK, 40_000_000).map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            style_images: vec![],
            prompt: "bench".into(),
            negative_prompt: String::new(),
            expand_prompt: false,
            size,
            num_images: NumImages::new(1).expect("1 is valid"),
            seed: Seed::new(1).expect("1 is valid"),
            strength: Strength::new(0.8).expect("0.8 is valid"),
            style: Style::Auto,
            rendering_speed: speed,
        };
        let _ = remixd_engine::preview::render(&job, 0); // warm-up
        let t = Instant::now();
        let mut img = None;
        for i in 0..iterations {
            img = Some(remixd_engine::preview::render(&job, i));
        }
        let render_ms = t.elapsed().as_secs_f64() * 1000.0 / iterations as f64;
        let img = img.context("at least one iteration")?;
        let t = Instant::now();
        for _ in 0..iterations {
            std::hint::black_box(remixd_engine::preview::encode_png(&img));
        }
        let encode_ms = t.elapsed().as_secs_f64() * 1000.0 / iterations as f64;
        let (w, h) = size.dimensions();
        println!(
            "preview {w}x{h} {:<8} render {render_ms:7.2} ms/image   png encode {encode_ms:7.2} ms/image   ({iterations} iterations, one core)",
            speed.as_str()
        );
    }
    Ok(())
}

/// What the loopback receiver saw: (arrival ms, completeTime ms, webhook-id, attempt was answered 200).
type Seen = Arc<Mutex<Vec<(i64, i64, String, bool)>>>;

async fn receiver(shutdown: CancellationToken) -> anyhow::Result<(String, Seen)> {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    let seen: Seen = Arc::default();
    let first_failed: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/{mode}",
            axum::routing::post(
                |State((seen, failed)): State<(
                    Seen,
                    Arc<Mutex<std::collections::HashSet<String>>>,
                )>,
                 Path(mode): Path<String>,
                 headers: HeaderMap,
                 body: bytes::Bytes| async move {
                    let now = remixd_domain::now_millis();
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let complete = v["data"]["completeTime"].as_i64().unwrap_or(0);
                    let id = headers
                        .get("webhook-id")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    // "flaky": the first attempt of each delivery fails, so all retries fall due together.
                    let ok = mode != "flaky" || !failed.lock().expect("lock").insert(id.clone());
                    seen.lock().expect("lock").push((now, complete, id, ok));
                    if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                },
            ),
        )
        .with_state((seen.clone(), first_failed));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", l.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(l, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((url, seen))
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Measures callback latency and the deliverer's sustained rate.
pub async fn callbacks(mut settings: Settings, tasks: usize) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    settings.data_dir = data.path().to_path_buf();
    settings.database.url = None;
    settings.storage.url = None;
    settings.server.public_url = None;
    settings.fetch.allow = vec!["127.0.0.1/32".into()];
    settings.limits.create_per_10s = 1_000_000;
    settings.limits.query_per_s = 1_000_000;
    settings.worker.poll_ms = 100;
    // One retry, long after the first attempt (phase 2 makes them due by hand).
    settings.callbacks.retry_schedule_ms = vec![3_600_000];
    let shutdown = CancellationToken::new();
    let samples = serve_samples(shutdown.clone()).await?;
    let (rx, seen) = receiver(shutdown.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(crate::launch_with_listener(
        settings.clone(),
        listener,
        Role::All,
        server_stop.clone(),
    ));
    crate::submit::Client::new(&base, "")?
        .wait_ready(Duration::from_secs(30))
        .await?;
    let store = crate::open_store(&settings).await?;
    store.add_credits("default", 100_000_000).await?;
    let key = std::fs::read_to_string(settings.data_dir.join("default.key"))?
        .trim()
        .to_string();
    let client = crate::submit::Client::new(&base, &key)?;
    let create = |body: Value| {
        let client = &client;
        async move { client.create(&body).await.map(drop) }
    };
    let wait_for = |n: usize, secs: u64| {
        let seen = seen.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            while seen.lock().expect("lock").len() < n {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "only {} of {n} callbacks arrived",
                    seen.lock().expect("lock").len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(())
        }
    };

    // Phase 1: latency from completion to receipt, on real preview tasks.
    for _ in 0..tasks {
        create(json!({
            "model": "ideogram/character-remix",
            "callBackUrl": format!("{rx}/ok"),
            "input": {"prompt": "bench", "image_url": format!("{samples}/coffee.webp"),
                      "reference_image_urls": [format!("{samples}/astronaut.webp")],
                      "image_size": "square", "rendering_speed": "TURBO"}
        }))
        .await?;
    }
    wait_for(tasks, 600).await?;
    let mut lat: Vec<i64> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|(at, done, _, _)| at - done)
        .collect();
    lat.sort_unstable();
    println!(
        "callback latency, completion to receipt, {tasks} tasks: p50 {} ms, p99 {} ms, max {} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0)
    );

    // Phase 2: throughput on a backlog. Every first attempt is refused and its retry is
    // scheduled far away; the server stops, an operator redelivers them all, and a new
    // server starts with the whole backlog due at once.
    seen.lock().expect("lock").clear();
    let burst = tasks * 4;
    for _ in 0..burst {
        create(json!({
            "model": "ideogram/character-remix",
            "callBackUrl": format!("{rx}/flaky"),
            "input": {"prompt": "bench", "image_url": "http://127.0.0.1:9/unreachable.png",
                      "reference_image_urls": [format!("{samples}/astronaut.webp")]}
        }))
        .await?;
    }
    wait_for(burst, 600).await?;
    server_stop.cancel();
    server.await.context("server task")??;
    let pending = store
        .list_deliveries(Some(remixd_store::DeliveryState::Pending), i64::MAX)
        .await?;
    anyhow::ensure!(
        pending.len() == burst,
        "{} of {burst} deliveries pending",
        pending.len()
    );
    for d in &pending {
        store.redeliver(&d.id, remixd_domain::now_millis()).await?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(crate::launch_with_listener(
        settings.clone(),
        listener,
        Role::All,
        server_stop.clone(),
    ));
    wait_for(burst * 2, 600).await?;
    let seen = seen.lock().expect("lock").clone();
    let retries: Vec<i64> = seen.iter().filter(|s| s.3).map(|s| s.0).collect();
    let (first, last) = (
        retries.iter().min().copied().unwrap_or(0),
        retries.iter().max().copied().unwrap_or(0),
    );
    let span = (last - first).max(1) as f64 / 1000.0;
    println!(
        "deliverer throughput on a due backlog: {} deliveries in {:.3} s = {:.0} deliveries/s (concurrency {})",
        retries.len(),
        span,
        retries.len() as f64 / span,
        settings.callbacks.concurrency
    );
    server_stop.cancel();
    server.await.context("server task")??;
    shutdown.cancel();
    Ok(())
}
