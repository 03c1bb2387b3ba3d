//! The upstream engines inside the whole service: a task created on remixd runs on the
//! (stand-in) provider, its images land in remixd's storage, uploaded inputs reach the
//! provider as signed links, a cancelled task cancels the provider's request, and a
//! worker killed while waiting on the provider resumes the same request after restart.
//! No traffic leaves loopback.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use remixd_testkit::providers::StandIn;
use remixd_testkit::{samples, task_body, ImageServer};
use serde_json::{json, Value};

const FAL_KEY: &str = "fal-e2e-key-5f2b9c0d7e1a";

fn use_fal(s: &mut remixd::settings::Settings, base: &str) {
    s.engine.kind = "fal".into();
    s.engine.fal.key = Some(remixd::settings::Secret(FAL_KEY.into()));
    s.engine.fal.base_url = Some(base.into());
    s.engine.fal.poll_ms = 20;
    s.engine.fal.retry_base_ms = 20;
    s.engine.concurrency = 4;
}

#[tokio::test]
async fn a_task_runs_on_fal_and_its_images_land_in_remixd_storage() {
    let fal = StandIn::start().await;
    fal.script(|s| s.fetch_inputs = true);
    let metrics_port = common::free_port();
    let srv = TestServer::start_with(|s| {
        use_fal(s, &fal.base);
        s.server.metrics_listen = Some(format!("127.0.0.1:{metrics_port}"));
    })
    .await;
    let img = ImageServer::start().await;
    let uploaded = srv.api.upload_ok(samples::COFFEE_WEBP, "base.webp").await;
    let body = task_body(
        &uploaded,
        &img.url("astronaut.webp"),
        json!({"num_images": "2", "reference_mask_urls": [img.url("mask.png")]}),
    );
    let before = srv.api.balance().await;
    let id = srv.api.create_ok(&body).await;
    let rec = srv.api.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(rec["state"], "success", "{rec}");
    assert_eq!(srv.api.balance().await, before - 2 * 18);

    let result: Value = serde_json::from_str(rec["resultJson"].as_str().unwrap()).unwrap();
    assert_eq!(result["provider"], "fal");
    let urls = result["resultUrls"].as_array().unwrap();
    assert_eq!(urls.len(), 2);
    for (i, u) in urls.iter().enumerate() {
        let u = u.as_str().unwrap();
        assert!(
            u.starts_with(&format!("{}/files/results/", srv.api.base)),
            "{u}"
        );
        let ours = reqwest::get(u).await.unwrap().bytes().await.unwrap();
        let theirs = reqwest::get(format!("{}/files/req-0/{i}.png", fal.base))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(ours, theirs, "result {i} copied into remixd's storage");
        assert_eq!(result["images"][i]["providerSeed"], 4242);
    }

    // The upload went to the provider as a signed link it could read; the client's
    // own URLs as they were.
    let sent = fal.fal_submits()[0].json.clone().unwrap();
    let base_url = sent["image_url"].as_str().unwrap();
    assert!(
        base_url.starts_with(&uploaded) && base_url.contains("&signature="),
        "{base_url}"
    );
    assert_eq!(
        sent["reference_image_urls"],
        json!([img.url("astronaut.webp")])
    );
    assert_eq!(sent["reference_mask_urls"], json!([img.url("mask.png")]));
    assert_eq!(sent["num_images"], json!(2));
    let fetched = fal.input_fetches();
    assert_eq!(fetched.len(), 3);
    assert!(fetched.iter().all(|(_, s)| *s == 200), "{fetched:?}");

    // Which provider served the task is in the metrics too.
    let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines()
            .any(|l| l
                .starts_with(r#"remixd_upstream_tasks_total{provider="fal",outcome="success"}"#)),
        "{text}"
    );
    assert!(
        text.contains(r#"remixd_upstream_requests_total{provider="fal",status="200"}"#),
        "{text}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_task_runs_on_ideogram_with_the_fetched_bytes_and_lands_at_the_presets_size() {
    let ideo = StandIn::start().await;
    ideo.script(|s| s.result_size = (1152, 864));
    let srv = TestServer::start_with(|s| {
        s.engine.kind = "ideogram".into();
        s.engine.ideogram.key = Some(remixd::settings::Secret("ideo-e2e-key".into()));
        s.engine.ideogram.base_url = Some(ideo.base.clone());
    })
    .await;
    let img = ImageServer::start().await;
    let uploaded = srv.api.upload_ok(samples::COFFEE_WEBP, "base.webp").await;
    let body = task_body(
        &uploaded,
        &img.url("astronaut.webp"),
        json!({
            "image_size": "landscape_4_3",
            "reference_mask_urls": [img.url("mask.png")],
            "image_urls": [img.url("coffee.webp")],
            "strength": 0.3,
        }),
    );
    let id = srv.api.create_ok(&body).await;
    let rec = srv.api.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(rec["state"], "success", "{rec}");
    let result: Value = serde_json::from_str(rec["resultJson"].as_str().unwrap()).unwrap();
    assert_eq!(result["provider"], "ideogram");
    let image = &result["images"][0];
    assert_eq!(
        (image["width"].as_u64(), image["height"].as_u64()),
        (Some(1024), Some(768))
    );
    assert_eq!(
        (
            image["providerWidth"].as_u64(),
            image["providerHeight"].as_u64()
        ),
        (Some(1152), Some(864))
    );
    let stored = reqwest::get(result["resultUrls"][0].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let shown = image::load_from_memory(&stored).unwrap();
    assert_eq!((shown.width(), shown.height()), (1024, 768));

    // What Ideogram got: the bytes remixd fetched and stored, as files.
    let r = &ideo.ideogram_requests()[0];
    assert_eq!(r.header("api-key").as_deref(), Some("ideo-e2e-key"));
    assert_eq!(&r.part("image").unwrap().bytes[..], samples::COFFEE_WEBP);
    assert_eq!(
        &r.part("character_reference_images").unwrap().bytes[..],
        samples::ASTRONAUT_WEBP
    );
    assert_eq!(
        &r.parts_named("style_reference_images")[0].bytes[..],
        samples::COFFEE_WEBP
    );
    assert!(r.part("character_reference_images_mask").is_some());
    assert_eq!(r.part("image_weight").unwrap().text(), "30");
    assert_eq!(r.part("aspect_ratio").unwrap().text(), "4x3");
    srv.stop().await;
}

#[tokio::test]
async fn cancelling_a_queued_task_cancels_the_providers_request() {
    let fal = StandIn::start().await;
    fal.script(|s| s.fal_sequence = vec!["IN_QUEUE:3".into()]);
    let srv = TestServer::start_with(|s| use_fal(s, &fal.base)).await;
    let img = ImageServer::start().await;
    let before = srv.api.balance().await;
    let id = srv.api.create_ok(&img.sample_task(json!({}))).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while fal.status_polls("req-0") < 2 {
        assert!(Instant::now() < deadline, "never polled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = srv.api.cancel(&id).await;
    assert_eq!(a.code(), 200, "{:?}", a.body);
    let rec = srv.api.wait_done(&id, Duration::from_secs(10)).await;
    assert_eq!(
        (rec["state"].as_str(), rec["failCode"].as_str()),
        (Some("fail"), Some("499"))
    );
    while fal.fal_cancels().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the provider's request was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = &fal.fal_cancels()[0];
    assert_eq!(c.path, "/fal-ai/ideogram/requests/req-0/cancel");
    assert_eq!(c.header("authorization").unwrap(), format!("Key {FAL_KEY}"));
    assert_eq!(srv.api.balance().await, before, "refunded");
    srv.stop().await;
}

#[tokio::test]
async fn a_task_that_fails_for_good_cancels_the_request_it_left_at_the_provider() {
    let fal = StandIn::start().await;
    // Accepted, then every status request fails: unavailable after submission.
    fal.script(|s| {
        for _ in 0..1000 {
            s.fal_status
                .push_back(remixd_testkit::providers::Reply::Status(
                    503,
                    json!({"detail": "down"}),
                    Some(0),
                ));
        }
    });
    let srv = TestServer::start_with(|s| {
        use_fal(s, &fal.base);
        s.engine.fal.retries = 1;
        s.limits.max_attempts = 2;
    })
    .await;
    let img = ImageServer::start().await;
    let before = srv.api.balance().await;
    let id = srv.api.create_ok(&img.sample_task(json!({}))).await;
    let rec = srv.api.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(rec["state"], "fail", "{rec}");
    assert!(
        rec["failMsg"]
            .as_str()
            .unwrap()
            .contains("after 2 attempts"),
        "{rec}"
    );
    assert_eq!(
        fal.fal_submits().len(),
        1,
        "the retry resumed the same request"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while fal.fal_cancels().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the provider's request was left running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(srv.api.balance().await, before, "refunded");
    srv.stop().await;
}

fn spawn(dir: &Path, port: u16, provider: &str, log: &Path) -> Child {
    let cfg = format!(
        r#"data_dir = "{dir}"
[server]
listen = "127.0.0.1:{port}"
[fetch]
allow = ["127.0.0.1/32"]
[engine]
kind = "fal"
[engine.fal]
base_url = "{provider}"
poll_ms = 20
[worker]
lease_ms = 1000
poll_ms = 50
[storage]
min_free_mb = 0
"#,
        dir = dir.display()
    );
    std::fs::write(dir.join("remixd.toml"), cfg).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args(["serve", "--config"])
        .arg(dir.join("remixd.toml"))
        // The key from the provider's usual variable; debug logs, to show none holds it.
        .env("FAL_KEY", FAL_KEY)
        .env("RUST_LOG", "debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start remixd")
}

#[tokio::test]
async fn a_worker_killed_while_waiting_on_the_provider_resumes_the_same_request() {
    let fal = StandIn::start().await;
    fal.script(|s| s.hold = true);
    let img = ImageServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("remixd.log");
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn(dir.path(), port, &fal.base, &log);
    let api = common::ready_client(&base, dir.path()).await;
    let before = api.balance().await;
    let id = api.create_ok(&img.sample_task(json!({}))).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fal.status_polls("req-0") < 2 {
        assert!(Instant::now() < deadline, "never polled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = spawn(dir.path(), port, &fal.base, &log);
    let api = common::ready_client(&base, dir.path()).await;
    // The new process takes the task over once the dead one's lease lapses, and asks
    // the provider about the same request.
    let polls = fal.status_polls("req-0");
    while fal.status_polls("req-0") <= polls {
        assert!(Instant::now() < deadline, "not resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fal.script(|s| s.hold = false);
    let rec = api.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(rec["state"], "success", "{rec}");
    assert_eq!(
        fal.fal_submits().len(),
        1,
        "submitted once across the crash"
    );
    assert_eq!(api.balance().await, before - 18, "charged once");
    let record = api.record(&id).await.body.to_string();
    child.kill().unwrap();
    child.wait().unwrap();

    // The key is in no log line, no task record, no file of the data directory.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("submitted to fal"),
        "debug logs were written"
    );
    assert!(!logged.contains(FAL_KEY), "the key is in the logs");
    assert!(!record.contains(FAL_KEY));
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes
                .windows(FAL_KEY.len())
                .any(|w| w == FAL_KEY.as_bytes()),
            "the key is in {}",
            entry.display()
        );
    }
    // The provider got it in its header, as documented.
    assert_eq!(
        fal.fal_submits()[0].header("authorization").unwrap(),
        format!("Key {FAL_KEY}")
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.file_name().is_some_and(|n| n != "remixd.log") {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn config_show_redacts_the_provider_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args(["config", "show"])
        .current_dir(dir.path())
        .env("REMIXD__ENGINE__KIND", "ideogram")
        .env("REMIXD__ENGINE__IDEOGRAM__KEY", "ideo-secret-123456")
        .env("REMIXD__ENGINE__FAL__KEY", "fal-secret-654321")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(!shown.contains("secret-"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(
        shown.contains("# effective: engine.fal.key = <redacted> (from the configuration)"),
        "{shown}"
    );
    // A key from the provider's usual variable is said to be there, not shown.
    let out = Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args(["config", "show"])
        .current_dir(dir.path())
        .env("IDEOGRAM_API_KEY", "ideo-env-secret-777")
        .output()
        .unwrap();
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(!shown.contains("ideo-env-secret"), "{shown}");
    assert!(
        shown.contains("# effective: engine.ideogram.key = <redacted> (from IDEOGRAM_API_KEY)"),
        "{shown}"
    );
}

// Multi-threaded: the stand-in answers while the test waits on the child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_check_says_what_works() {
    let fal = StandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let run = |key: &str| {
        Command::new(env!("CARGO_BIN_EXE_remixd"))
            .args(["engines", "check"])
            .current_dir(dir.path())
            .env("REMIXD__ENGINE__KIND", "fal")
            .env("REMIXD__ENGINE__FAL__BASE_URL", &fal.base)
            .env("FAL_KEY", key)
            .output()
            .unwrap()
    };
    let out = run("good-key");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("fal: ok: reachable, key accepted"),
        "{stdout}"
    );
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args(["engines", "check"])
        .current_dir(dir.path())
        .env("REMIXD__ENGINE__KIND", "fal")
        .env("REMIXD__ENGINE__FAL__BASE_URL", &dead)
        .env("FAL_KEY", "k")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("fal: FAILED: unreachable"), "{stdout}");
    // No key at all: refused at start with the setting's name.
    let out = Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args(["engines", "check"])
        .current_dir(dir.path())
        .env("REMIXD__ENGINE__KIND", "fal")
        .env_remove("FAL_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("engine.fal.key is not set"), "{stderr}");
}
