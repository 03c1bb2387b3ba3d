//! The gateway's own overhead with the fal engine, against the loopback stand-in
//! provider answering at once (COMPLETED at the first status request). Prints figures,
//! asserts nothing:
//! - per task, the time from the stand-in answering COMPLETED to the task's
//!   `completeTime` in remixd (reading the result, downloading and storing the images,
//!   the final update): p50, p99, max;
//! - tasks per second end to end (createTask → success, inputs fetched from a loopback
//!   image server) with 64 tasks in flight, and as a baseline from the same run the same
//!   harness with the preview engine composing at 512² (the cheapest local engine).
//!
//! `cargo bench -p remixd --bench upstream [-- TASKS]` (default 300).

use std::time::{Duration, Instant};

use remixd::settings::{Secret, Settings};
use remixd_testkit::providers::StandIn;
use remixd_testkit::{Api, ImageServer};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let tasks: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    println!("remixd bench upstream: {tasks} tasks, 64 in flight, images square (512²)");
    let fal = run(tasks, true).await;
    let preview = run(tasks, false).await;
    println!(
        "fal (stand-in answering at once) / preview engine, tasks per second: {fal:.1} / {preview:.1} = {:.2}",
        fal / preview
    );
}

/// One server, `tasks` tasks through it; returns tasks per second.
async fn run(tasks: usize, upstream: bool) -> f64 {
    let fal = StandIn::start().await;
    fal.script(|s| s.fal_sequence = vec!["COMPLETED".into()]);
    let img = ImageServer::start().await;
    // On the build's disk, not /tmp (often a tmpfs): SQLite's fsyncs count.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut s = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    s.fetch.allow = vec!["127.0.0.1/32".into()];
    s.limits.create_per_10s = 1_000_000;
    s.limits.query_per_s = 1_000_000;
    s.storage.min_free_mb = 0;
    s.worker.poll_ms = 20;
    s.worker.fetch_concurrency = 16;
    s.worker.fetch_per_account = Some(16);
    s.engine.concurrency = 64;
    if upstream {
        s.engine.kind = "fal".into();
        s.engine.fal.key = Some(Secret("bench-key".into()));
        s.engine.fal.base_url = Some(fal.base.clone());
        s.engine.fal.concurrency = 64;
        s.engine.fal.poll_ms = 20;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let store = remixd::open_store(&s).await.unwrap();
    let server = tokio::spawn(remixd::launch_with_listener(
        s,
        listener,
        remixd::Role::All,
        shutdown.clone(),
    ));
    Api::new(&base, "")
        .wait_ready(Duration::from_secs(30))
        .await;
    let key = std::fs::read_to_string(dir.path().join("default.key")).unwrap();
    let api = Api::new(&base, key.trim());
    // Enough credits for every task.
    store
        .add_credits("default", 18 * tasks as i64)
        .await
        .unwrap();

    let started = Instant::now();
    let mut ids = Vec::with_capacity(tasks);
    let mut in_flight = Vec::new();
    for i in 0..tasks {
        let body = img.sample_task(json!({"prompt": format!("bench {i}"), "image_size": "square"}));
        ids.push(api.create_ok(&body).await);
        in_flight.push(ids[i].clone());
        while in_flight.len() >= 64 {
            in_flight = still_running(&api, in_flight).await;
        }
    }
    while !in_flight.is_empty() {
        in_flight = still_running(&api, in_flight).await;
    }
    let wall = started.elapsed();
    let rate = tasks as f64 / wall.as_secs_f64();
    let engine = if upstream { "fal" } else { "preview" };
    println!(
        "{engine}: {tasks} tasks end to end in {:.2} s = {rate:.1} tasks/s",
        wall.as_secs_f64()
    );

    if upstream {
        let mut overhead = Vec::new();
        let requests = fal.fal_requests();
        for (i, id) in ids.iter().enumerate() {
            let rec = api.record(id).await.body["data"].clone();
            assert_eq!(rec["state"], "success", "{rec}");
            let done = rec["completeTime"].as_i64().unwrap();
            let prompt = format!("bench {i}");
            let completed = requests
                .iter()
                .find(|(_, body, _)| body["prompt"] == prompt.as_str())
                .and_then(|(_, _, t)| *t)
                .expect("the stand-in answered COMPLETED");
            overhead.push(done - completed);
        }
        overhead.sort_unstable();
        let pct = |p: f64| overhead[((overhead.len() - 1) as f64 * p).round() as usize];
        println!(
            "fal: COMPLETED upstream → success in remixd (ms clocks): p50 {} ms, p99 {} ms, max {} ms",
            pct(0.5),
            pct(0.99),
            overhead[overhead.len() - 1]
        );
    }
    shutdown.cancel();
    let _ = server.await;
    rate
}

/// The ids among `ids` not yet terminal (polled once each).
async fn still_running(api: &Api, ids: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        let state = api.record(&id).await.body["data"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if state != "success" && state != "fail" {
            out.push(id);
        }
    }
    if !out.is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}
