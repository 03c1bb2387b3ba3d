//! Durability: SIGKILL the real binary at arbitrary moments, restart it, and every
//! accepted task still ends in `success` or `fail` with credits consistent. SIGTERM
//! drains: the process exits cleanly and nothing is left behind.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use remixd_testkit::{Api, ImageServer};
use serde_json::{json, Value};

fn write_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let cfg = format!(
        r#"data_dir = "{dir}"
[server]
listen = "127.0.0.1:{port}"
[fetch]
allow = ["127.0.0.1/32"]
[limits]
create_per_10s = 10000
query_per_s = 10000
max_attempts = 5
[engine.preview]
delay_ms = 150
[worker]
lease_ms = 1000
poll_ms = 50
shutdown_grace_ms = 5000
[storage]
min_free_mb = 0
"#,
        dir = dir.display()
    );
    let path = dir.join("remixd.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn spawn(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start remixd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_any_moment_loses_no_task_and_no_credit() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let config = write_config(dir.path(), port);
    let img = ImageServer::start().await;
    let base = format!("http://127.0.0.1:{port}");

    let mut child = spawn(&config);
    let probe = Api::new(&base, "");
    let api = common::ready_client(&base, dir.path()).await;
    // Enough credits that the bursts are never refused for money; the operator's CLI
    // writes to the same database while the server runs.
    assert_eq!(common::add_default_credits(&config, 99000), 100000);
    let body = img.sample_task(json!({"num_images": 2, "rendering_speed": "TURBO"}));

    let mut accepted: Vec<String> = Vec::new();
    // Three kills: during a create burst, mid-generation, and right after a restart.
    // Each lands `kill_after_ms` after the round's first accepted task, so every round
    // kills a server that has work in hand, however slow the machine is today.
    for (round, kill_after_ms) in [(0u32, 250u64), (1, 700), (2, 60)].into_iter() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let creator = {
            let (api, body, seen, stop) = (api.clone(), body.clone(), seen.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    match api
                        .http
                        .post(format!("{}/api/v1/jobs/createTask", api.base))
                        .bearer_auth(&api.key)
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(r) => {
                            if let Ok(v) = r.json::<Value>().await {
                                if v["code"] == 200 {
                                    let id = v["data"]["taskId"].as_str().unwrap().to_string();
                                    seen.lock().unwrap().push(id);
                                }
                            }
                        }
                        // The server is gone (or a pooled connection was): keep trying.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                    // Paced, so the kill lands mid-burst without queueing minutes of work.
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "round {round}: no task accepted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        common::signal(&child, "-KILL");
        child.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
        creator.await.unwrap();
        let ids = std::mem::take(&mut *seen.lock().unwrap());
        accepted.extend(ids);
        child = spawn(&config);
        probe.wait_ready(Duration::from_secs(30)).await;
    }

    // After the last restart every accepted task reaches a terminal state.
    let done = common::wait_all_done(&api, &accepted, Duration::from_secs(120)).await;
    // Credits from the database itself: a task accepted just before a kill whose
    // answer never arrived is charged too, and must be counted.
    let settings = remixd::Settings::load(Some(&config)).unwrap();
    let store = remixd::open_store(&settings).await.unwrap();
    let acct = store.account_by_name("default").await.unwrap().unwrap();
    // Including tasks whose createTask answer was lost: wait for every task the
    // database holds, not only those the client heard of.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (all, successes) = loop {
        let states = store.count_by_state().await.unwrap();
        let count = |s: remixd_domain::TaskState| {
            states
                .iter()
                .find(|(st, _)| *st == s)
                .map_or(0, |(_, n)| *n)
        };
        let all: i64 = states.iter().map(|(_, n)| n).sum();
        let successes = count(remixd_domain::TaskState::Success);
        if successes + count(remixd_domain::TaskState::Fail) == all {
            break (all, successes);
        }
        assert!(Instant::now() < deadline, "tasks stuck: {states:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(all >= accepted.len() as i64);
    let consumed = store.credits_in_tasks(&acct.id).await.unwrap();
    assert_eq!(acct.credits + consumed, 100_000, "credits are consistent");
    assert_eq!(
        consumed,
        successes * 24,
        "each success keeps its 24 credits"
    );
    let successes = done.iter().filter(|d| d["state"] == "success").count();
    for d in done.iter().filter(|d| d["state"] == "success") {
        let r: Value = serde_json::from_str(d["resultJson"].as_str().unwrap()).unwrap();
        for u in r["resultUrls"].as_array().unwrap() {
            assert_eq!(
                reqwest::get(u.as_str().unwrap()).await.unwrap().status(),
                200
            );
        }
    }
    common::signal(&child, "-KILL");
    child.wait().unwrap();
    eprintln!(
        "{} tasks accepted across 3 kills; {successes} succeeded",
        accepted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let config = write_config(dir.path(), port);
    let img = ImageServer::start().await;
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn(&config);
    let api = common::ready_client(&base, dir.path()).await;
    let body = img.sample_task(json!({"num_images": 3}));
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(api.create_ok(&body).await);
    }
    // Wait until something is generating, then ask politely.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::records(&api, &ids)
        .await
        .iter()
        .any(|d| d["state"] == "generating")
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common::signal(&child, "-TERM");
    let started = Instant::now();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "drained within the grace period"
    );

    // Nothing was left holding a lease: a restart finishes the rest at once.
    let mut child = spawn(&config);
    api.wait_ready(Duration::from_secs(30)).await;
    for id in &ids {
        let d = api.wait_done(id, Duration::from_secs(30)).await;
        assert_eq!(d["state"], "success", "{d}");
    }
    assert_eq!(api.balance().await, 1000 - 4 * 54);
    common::signal(&child, "-KILL");
    child.wait().unwrap();
}
