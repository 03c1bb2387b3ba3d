//! remixd on a real filesystem that runs full (a tmpfs of a few MB, so the tests run as
//! root). Reproduces what a hostile run saw: after "database or disk is full" the single
//! writer stayed inside its transaction and every later write failed with a 500 until a
//! restart, `/readyz` still said ready, a task retried storing its inputs about 1,100
//! times a second, and orphaned files stayed behind.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::TestServer;
use remixd_testkit::tmpfs::Tmpfs;
use remixd_testkit::ImageServer;
use serde_json::{json, Value};

/// Every regular file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The default account's balance plus the credits held by its tasks is what it started
/// with: nothing charged twice, nothing refunded twice. Read from the database.
async fn assert_credits_exact(srv: &TestServer) {
    let store = srv.store().await;
    let acct = store.account_by_name("default").await.unwrap().unwrap();
    let in_tasks = store.credits_in_tasks(&acct.id).await.unwrap();
    assert_eq!(
        acct.credits + in_tasks,
        remixd::DEFAULT_ACCOUNT_CREDITS,
        "balance {} + held by tasks {in_tasks}",
        acct.credits
    );
}

async fn readyz(base: &str) -> (u16, String) {
    let r = reqwest::get(format!("{base}/readyz")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Result files on disk are exactly those of the successful tasks' `resultUrls`.
fn assert_results_match(files: &Path, records: &[Value]) {
    let mut want: Vec<String> = records
        .iter()
        .filter(|r| r["state"] == "success")
        .flat_map(|r| {
            let doc: Value = serde_json::from_str(r["resultJson"].as_str().unwrap()).unwrap();
            doc["resultUrls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| {
                    let u = u.as_str().unwrap();
                    u[u.find("/files/").unwrap() + "/files/".len()..].to_string()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    want.sort();
    let have: Vec<String> = files_under(&files.join("results"))
        .into_iter()
        .map(|f| format!("results/{f}"))
        .collect();
    assert_eq!(have, want, "result files on disk");
    assert_eq!(
        files_under(&files.join("inputs")),
        Vec::<String>::new(),
        "no inputs are kept for finished tasks"
    );
}

/// With the free-space guard on: new work is refused with a clear envelope while the
/// disk is full, `/readyz` says why, accepted tasks wait instead of failing, and all of
/// it resumes by itself once space is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_work_keeps_accepted_work_and_recovers() {
    let fs = Tmpfs::mount(24 << 20);
    let data = fs.path().join("data");
    let srv = TestServer::start_with(|s| {
        s.data_dir = data.clone();
        s.storage.min_free_mb = 1;
        s.limits.max_attempts = 5;
        s.engine.preview.delay_ms = 200;
        s.retention.orphans_interval_s = 0.2;
    })
    .await;
    let img = ImageServer::start().await;
    let body = img.sample_task(json!({}));
    let first = srv.api.create_ok(&body).await;
    assert_eq!(
        srv.api.wait_done(&first, Duration::from_secs(30)).await["state"],
        "success"
    );

    // Accepted just before the disk fills.
    let mut ids = vec![first];
    for _ in 0..3 {
        ids.push(srv.api.create_ok(&body).await);
    }
    fs.fill();

    let a = srv.api.create(&body).await;
    assert_eq!(a.code(), 455, "{:?}", a.body);
    assert!(a.msg().contains("storage is full"), "{}", a.msg());
    assert_eq!(a.status, 503);
    assert!(a.retry_after() >= 1);
    let up = srv
        .api
        .http
        .post(format!("{}/api/file-base64-upload", srv.api.base))
        .bearer_auth(&srv.api.key)
        .json(
            &json!({"base64Data": base64::engine::general_purpose::STANDARD
            .encode(remixd_testkit::samples::png(8, 8, [1, 2, 3])), "uploadPath": "x"}),
        )
        .send()
        .await
        .unwrap();
    assert!(up.headers().contains_key("retry-after"));
    let up: Value = up.json().await.unwrap();
    assert_eq!(
        (up["success"].as_bool(), up["code"].as_i64()),
        (Some(false), Some(500))
    );
    assert!(
        up["msg"].as_str().unwrap().contains("storage is full"),
        "{up}"
    );
    let (status, text) = readyz(&srv.api.base).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("free"), "{text}");
    assert!(
        !text.contains(&*fs.path().to_string_lossy()),
        "no paths: {text}"
    );

    // Workers pause instead of failing the accepted tasks.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &ids {
        let r = srv.api.record(id).await;
        assert_ne!(r.body["data"]["state"], "fail", "{:?}", r.body);
    }

    fs.free();
    srv.api.wait_ready(Duration::from_secs(10)).await;
    ids.push(srv.api.create_ok(&body).await);
    let mut records = Vec::new();
    for id in &ids {
        let r = srv.api.wait_done(id, Duration::from_secs(60)).await;
        assert_eq!(r["state"], "success", "{r}");
        records.push(r);
    }
    assert_credits_exact(&srv).await;

    // Files of tasks that did not succeed are swept: plant what a crash between writing
    // files and finishing a task leaves behind, restart, and the orphan sweep removes it.
    let files = data.join("files");
    let failed = {
        let t = srv
            .api
            .create_ok(&img.sample_task(json!({"image_url": img.url("status/404")})))
            .await;
        srv.api.wait_done(&t, Duration::from_secs(30)).await;
        t
    };
    let plant = |rel: &str| {
        let p = files.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"orphan").unwrap();
    };
    plant(&format!(
        "results/{failed}/00112233445566778899aabbccddeeff/0.png"
    ));
    plant(&format!("inputs/{}/base", ids[0]));
    plant(&format!(
        "results/{}/00112233445566778899aabbccddeeff/0.png",
        remixd_domain::TaskId::new()
    ));
    let srv = srv.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let orphans = files_under(&files.join("inputs")).len()
            + files_under(&files.join(format!("results/{failed}"))).len();
        if orphans == 0 && files_under(&files.join("results")).len() == records.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orphans left: {:?}",
            files_under(&files)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    records.push(srv.api.record(&failed).await.body["data"].clone());
    assert_results_match(&files, &records);
    srv.stop().await;
}

/// With the guard off, the database itself runs out of space: createTask answers the
/// storage-full envelope (never a 500), the writer recovers without a restart once
/// space is back, every accepted task ends, retries stay bounded, credits stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_running_full_recovers_without_a_restart() {
    let fs = Tmpfs::mount(24 << 20);
    let data = fs.path().join("data");
    let srv = TestServer::start_with(|s| {
        s.data_dir = data.clone();
        s.storage.min_free_mb = 0;
        s.limits.create_per_10s = 100_000;
        s.engine.preview.delay_ms = 300;
    })
    .await;
    let img = ImageServer::start().await;
    // Long prompts make each insert grow the database by several pages.
    let body =
        img.sample_task(json!({"prompt": "p".repeat(5000), "negative_prompt": "n".repeat(500)}));
    // Work in flight when the disk fills: fetching, storing inputs, generating.
    let mut ids = vec![];
    for _ in 0..4 {
        ids.push(srv.api.create_ok(&body).await);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    fs.fill();
    let mut full = None;
    for _ in 0..3000 {
        let a = srv.api.create(&body).await;
        match a.code() {
            200 => ids.push(a.body["data"]["taskId"].as_str().unwrap().to_string()),
            455 => {
                full = Some(a);
                break;
            }
            _ => panic!("createTask on a full disk answered {:?}", a.body),
        }
    }
    let a = full.expect("the database must run full");
    assert!(a.msg().contains("storage is full"), "{}", a.msg());
    // Still full, for a while: the same clean answer, never a wedged writer's 500,
    // while the workers keep meeting the full disk.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let a = srv.api.create(&body).await;
        assert!(matches!(a.code(), 200 | 455), "{:?}", a.body);
        if a.code() == 200 {
            ids.push(a.body["data"]["taskId"].as_str().unwrap().to_string());
        }
    }
    let (status, _) = readyz(&srv.api.base).await;
    assert_eq!(status, 503, "not ready while nothing can be written");

    fs.free();
    // No restart: writes work again.
    srv.api.wait_ready(Duration::from_secs(10)).await;
    ids.push(srv.api.create_ok(&img.sample_task(json!({}))).await);
    let mut records = Vec::new();
    for id in &ids {
        records.push(srv.api.wait_done(id, Duration::from_secs(120)).await);
    }
    assert_eq!(records.last().unwrap()["state"], "success");
    let store = srv.store().await;
    for id in &ids {
        let t = store.task(&id.parse().unwrap()).await.unwrap().unwrap();
        assert!(
            t.fetch_attempts <= srv.settings.limits.max_attempts
                && t.attempts <= srv.settings.limits.max_attempts,
            "retries are bounded: {t:?}"
        );
    }
    assert_credits_exact(&srv).await;
    assert_results_match(&data.join("files"), &records);
    srv.stop().await;
}
