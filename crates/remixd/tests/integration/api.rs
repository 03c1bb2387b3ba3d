//! The task API over HTTP against the real server: the happy path, every error code,
//! the envelope on framework-level failures, and the address policy end to end.

use crate::common;

use std::time::Duration;

use common::TestServer;
use remixd_domain::KeyLimits;
use remixd_testkit::{samples, task_body, ImageServer};
use serde_json::{json, Value};

const DONE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn happy_path_from_create_to_downloaded_images() {
    let srv = TestServer::start().await;
    let img = ImageServer::start().await;
    let before = srv.api.balance().await;
    assert_eq!(
        before, 1000,
        "the first start gives the default account 1000 credits"
    );

    let body = img.sample_task(json!({"num_images": "2", "seed": 99, "reference_mask_urls": img.url("mask.png"), "rendering_speed": "TURBO"}));
    let created = srv.api.create(&body).await;
    assert_eq!(
        (created.status, created.code(), created.msg()),
        (200, 200, "success")
    );
    let id = created.body["data"]["taskId"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));

    let first = srv.api.record(&id).await;
    let state = first.body["data"]["state"].as_str().unwrap().to_string();
    assert!(
        ["waiting", "queuing", "generating", "success"].contains(&state.as_str()),
        "{state}"
    );
    assert_eq!(
        srv.api.balance().await,
        before - 24,
        "2 TURBO images cost 24, reserved at once"
    );

    let data = srv.api.wait_done(&id, DONE).await;
    assert_eq!(data["state"], "success", "{data}");
    assert_eq!(data["taskId"], id);
    assert_eq!(data["model"], "ideogram/character-remix");
    assert_eq!(data["failCode"], "");
    assert_eq!(data["failMsg"], "");
    assert_eq!(data["progress"], 100);
    assert_eq!(data["creditsConsumed"], 24);
    assert!(data["param"].is_string(), "param is a JSON string");
    let param: Value = serde_json::from_str(data["param"].as_str().unwrap()).unwrap();
    assert_eq!(param, body, "param is the request as received");
    let ct = data["createTime"].as_i64().unwrap();
    assert!(ct > 1_600_000_000_000, "milliseconds");
    assert!(data["completeTime"].as_i64().unwrap() >= ct);
    assert!(data["updateTime"].as_i64().unwrap() >= ct);
    assert!(data["costTime"].as_i64().unwrap() >= 0);

    assert!(data["resultJson"].is_string());
    let result: Value = serde_json::from_str(data["resultJson"].as_str().unwrap()).unwrap();
    assert_eq!(result["seed"], 99);
    let urls = result["resultUrls"].as_array().unwrap();
    assert_eq!(urls.len(), 2);
    let mut pngs = Vec::new();
    for (i, u) in urls.iter().enumerate() {
        let u = u.as_str().unwrap();
        assert!(
            u.starts_with(&srv.api.base),
            "served on the public URL: {u}"
        );
        let meta = &result["images"][i];
        assert_eq!(meta["url"], *u);
        assert_eq!(
            (meta["width"].as_u64(), meta["height"].as_u64()),
            (Some(512), Some(512))
        );
        assert_eq!(meta["content_type"], "image/png");
        let r = reqwest::get(u).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
        let bytes = r.bytes().await.unwrap();
        assert_eq!(meta["file_size"].as_u64(), Some(bytes.len() as u64));
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (512, 512));
        pngs.push(bytes);
    }
    assert_ne!(pngs[0], pngs[1], "image i uses seed + i");
    assert_eq!(
        srv.api.balance().await,
        before - 24,
        "success keeps the credits"
    );

    // Same inputs and seed: the same bytes (the preview engine is deterministic).
    let again = srv.api.create_ok(&body).await;
    let data2 = srv.api.wait_done(&again, DONE).await;
    let r2: Value = serde_json::from_str(data2["resultJson"].as_str().unwrap()).unwrap();
    let b0 = reqwest::get(r2["resultUrls"][0].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(b0, pngs[0]);
    assert_ne!(
        r2["resultUrls"][0], result["resultUrls"][0],
        "every task gets its own unguessable URL"
    );

    // Fetched inputs stay private, though they sit in the same storage.
    let input = srv.api.get(&format!("/files/inputs/{id}/base")).await;
    assert_eq!(input.code(), 404);
    assert!(srv.dir.path().join("files/readyz-probe").exists());
    assert_eq!(srv.api.get("/files/readyz-probe").await.code(), 404);

    // A guessed file URL is 404 in the envelope.
    let guess = srv
        .api
        .get(&format!(
            "/files/results/{id}/00000000000000000000000000000000/0.png"
        ))
        .await;
    assert_eq!((guess.status, guess.code()), (404, 404));
    srv.stop().await;
}

#[tokio::test]
async fn a_task_without_a_seed_records_the_one_it_drew() {
    let srv = TestServer::start().await;
    let img = ImageServer::start().await;
    let id = srv.api.create_ok(&img.sample_task(json!({}))).await;
    let data = srv.api.wait_done(&id, DONE).await;
    let result: Value = serde_json::from_str(data["resultJson"].as_str().unwrap()).unwrap();
    let seed = result["seed"].as_i64().unwrap();
    assert!((0..=2_147_483_647).contains(&seed));
    srv.stop().await;
}

#[tokio::test]
async fn validation_errors_name_the_field_in_the_envelope() {
    let srv = TestServer::start().await;
    let ok = task_body(
        "http://127.0.0.1:9/a.png",
        "http://127.0.0.1:9/b.png",
        json!({}),
    );
    let mut cases: Vec<(Value, &str)> = Vec::new();
    let mut v = ok.clone();
    v["model"] = json!("ideogram/other");
    cases.push((v, "model must be ideogram/character-remix"));
    let mut v = ok.clone();
    v["input"]["strength"] = json!(3);
    cases.push((v, "input.strength must be between 0.1 and 1"));
    let mut v = ok.clone();
    v["input"]["num_images"] = json!("9");
    cases.push((v, "input.num_images must be between 1 and 4"));
    let mut v = ok.clone();
    v["input"]["image_size"] = json!("giant");
    cases.push((v, "input.image_size must be one of"));
    let mut v = ok.clone();
    v["input"].as_object_mut().unwrap().remove("prompt");
    cases.push((v, "input.prompt is required"));
    let mut v = ok.clone();
    v["callBackUrl"] = json!("gopher://x");
    cases.push((v, "callBackUrl must be an http or https URL"));
    for (body, want) in cases {
        let a = srv.api.create(&body).await;
        assert_eq!((a.status, a.code()), (422, 422), "{body}");
        assert!(
            a.msg().starts_with(want),
            "got {:?}, want {want:?}",
            a.msg()
        );
        assert_eq!(a.body["data"], Value::Null);
    }
    assert_eq!(
        srv.api.balance().await,
        1000,
        "refused requests cost nothing"
    );
    srv.stop().await;
}

#[tokio::test]
async fn framework_failures_answer_in_the_envelope() {
    let srv = TestServer::start().await;
    let a = srv
        .api
        .post_raw(
            "/api/v1/jobs/createTask",
            "application/json",
            b"{\"model\": ".to_vec(),
        )
        .await;
    assert_eq!((a.status, a.code()), (422, 422));
    assert!(
        a.msg().starts_with("request body is not valid JSON"),
        "{}",
        a.msg()
    );

    let a = srv
        .api
        .post_raw("/api/v1/jobs/createTask", "text/plain", b"{}".to_vec())
        .await;
    assert_eq!(
        (a.code(), a.msg()),
        (422, "Content-Type must be application/json")
    );

    let big = format!(
        "{{\"model\":\"ideogram/character-remix\",\"pad\":\"{}\"}}",
        "x".repeat(1 << 20)
    );
    let a = srv
        .api
        .post_raw(
            "/api/v1/jobs/createTask",
            "application/json",
            big.into_bytes(),
        )
        .await;
    assert_eq!(a.code(), 422);
    assert!(a.msg().contains("larger than the limit"), "{}", a.msg());

    let a = srv.api.get("/api/v1/nothing/here").await;
    assert_eq!((a.status, a.code()), (404, 404));
    let a = srv.api.get("/api/v1/jobs/createTask").await;
    assert_eq!(a.code(), 404, "wrong method: {:?}", a.body);

    let a = srv.api.get("/api/v1/jobs/recordInfo").await;
    assert_eq!((a.code(), a.msg()), (422, "taskId is required"));
    let a = srv
        .api
        .get("/api/v1/jobs/recordInfo?taskId=0123456789abcdef0123456789abcdef")
        .await;
    assert_eq!((a.status, a.code(), a.msg()), (404, 404, "Task not found"));
    let a = srv
        .api
        .get("/api/v1/jobs/recordInfo?taskId=../../etc")
        .await;
    assert_eq!(a.code(), 404);
    let a = srv
        .api
        .get("/api/v1/jobs/recordInfo?taskId=0123456789abcdef0123456789abcdef&taskId=x")
        .await;
    assert_eq!((a.code(), a.msg()), (422, "taskId is given more than once"));

    let h = srv.api.get("/healthz").await;
    assert_eq!(h.status, 200);
    let r = srv.api.get("/readyz").await;
    assert_eq!(
        (
            r.status,
            r.body["data"]["database"].as_str(),
            r.body["data"]["engine"].as_str()
        ),
        (200, Some("ok"), Some("ok"))
    );
    srv.stop().await;
}

#[tokio::test]
async fn auth_failures_are_401() {
    let srv = TestServer::start().await;
    let body = task_body(
        "http://127.0.0.1:9/a.png",
        "http://127.0.0.1:9/b.png",
        json!({}),
    );
    for key in [
        "",
        "not-a-key",
        &format!("rmx_0123456789abcdef_{}", "0".repeat(64)),
    ] {
        let a = srv.api.with_key(key).create(&body).await;
        assert_eq!((a.status, a.code()), (401, 401), "key {key:?}");
    }
    let r = srv
        .api
        .http
        .get(format!("{}/api/v1/chat/credit", srv.api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = srv
        .api
        .http
        .get(format!("{}/api/v1/chat/credit", srv.api.base))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A right key id with a wrong secret, and a revoked key.
    let other = srv.account("revokee", 100, KeyLimits::default()).await;
    assert_eq!(other.balance().await, 100);
    let mut wrong = other.key.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    assert_eq!(
        other
            .with_key(&wrong)
            .get("/api/v1/chat/credit")
            .await
            .code(),
        401
    );
    let store = srv.store().await;
    let id = other.key.split('_').nth(1).unwrap().to_string();
    assert!(store.revoke_key(&id, 1).await.unwrap());
    assert_eq!(other.get("/api/v1/chat/credit").await.code(), 401);
    srv.stop().await;
}

#[tokio::test]
async fn another_accounts_task_is_not_found() {
    let srv = TestServer::start().await;
    let img = ImageServer::start().await;
    let id = srv.api.create_ok(&img.sample_task(json!({}))).await;
    let stranger = srv.account("stranger", 100, KeyLimits::default()).await;
    let a = stranger.record(&id).await;
    assert_eq!((a.status, a.code(), a.msg()), (404, 404, "Task not found"));
    assert_eq!(a.body["data"], Value::Null);
    assert_eq!(srv.api.record(&id).await.code(), 200);
    srv.stop().await;
}

#[tokio::test]
async fn insufficient_credits_and_key_caps() {
    let srv = TestServer::start().await;
    let body = task_body(
        "http://127.0.0.1:9/a.png",
        "http://127.0.0.1:9/b.png",
        json!({}),
    );
    let poor = srv.account("poor", 17, KeyLimits::default()).await;
    let a = poor.create(&body).await;
    assert_eq!((a.status, a.code()), (402, 402));
    assert!(a.msg().contains("costs 18"), "{}", a.msg());
    assert_eq!(poor.balance().await, 17);

    // Slow inputs keep the tasks live (and charged) while the cap is checked.
    let img = ImageServer::start().await;
    let body = task_body(&img.url("slow/3000"), &img.url("astronaut.webp"), json!({}));
    let capped = srv
        .account(
            "capped",
            1000,
            KeyLimits {
                hourly: Some(40),
                daily: None,
                total: None,
            },
        )
        .await;
    capped.create_ok(&body).await;
    capped.create_ok(&body).await;
    let a = capped.create(&body).await;
    assert_eq!((a.status, a.code()), (429, 433), "433 maps to HTTP 429");
    assert!(a.msg().contains("hourly"), "{}", a.msg());
    assert!(a.headers.contains_key("retry-after"));
    srv.stop().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let srv = TestServer::start_with(|s| {
        s.limits.create_per_10s = 2;
        s.limits.query_per_s = 3;
    })
    .await;
    let body = task_body(
        "http://127.0.0.1:9/a.png",
        "http://127.0.0.1:9/b.png",
        json!({}),
    );
    srv.api.create_ok(&body).await;
    srv.api.create_ok(&body).await;
    let a = srv.api.create(&body).await;
    assert_eq!((a.status, a.code()), (429, 429));
    let wait = a.retry_after();
    assert!((1..=10).contains(&wait), "{wait}");

    let mut limited = 0;
    for _ in 0..6 {
        if srv.api.get("/api/v1/chat/credit").await.code() == 429 {
            limited += 1;
        }
    }
    assert!(
        limited >= 3,
        "queries per key per second are limited ({limited} of 6 refused)"
    );
    srv.stop().await;
}

#[tokio::test]
async fn maintenance_disabled_endpoints_and_always_200() {
    let srv = TestServer::start_with(|s| {
        s.api.maintenance = true;
        s.api.disabled = vec!["credit".into()];
    })
    .await;
    let body = task_body(
        "http://127.0.0.1:9/a.png",
        "http://127.0.0.1:9/b.png",
        json!({}),
    );
    let a = srv.api.create(&body).await;
    assert_eq!((a.status, a.code()), (503, 455));
    assert!(a.headers.contains_key("retry-after"));
    let a = srv.api.get("/api/v1/chat/credit").await;
    assert_eq!((a.status, a.code()), (403, 505));
    srv.stop().await;

    let srv = TestServer::start_with(|s| {
        s.api.error_http_status = remixd_api::ErrorHttpStatus::Always200
    })
    .await;
    let a = srv.api.with_key("nope").create(&body).await;
    assert_eq!((a.status, a.code()), (200, 401));
    let a = srv
        .api
        .get("/api/v1/jobs/recordInfo?taskId=0123456789abcdef0123456789abcdef")
        .await;
    assert_eq!((a.status, a.code()), (200, 404));
    srv.stop().await;
}

#[tokio::test]
async fn fetch_failures_fail_the_task_with_422_and_refund() {
    let srv = TestServer::start_with(|s| s.fetch.max_image_bytes = 200_000).await;
    let img = ImageServer::start().await;
    img.put("big.png", vec![0x89; 300_000], "image/png");
    img.put(
        "bomb.png",
        samples::png_header_claiming(100_000, 100_000),
        "image/png",
    );
    let good = img.url("coffee.webp");
    let cases = [
        (
            task_body(&img.url("status/404"), &good, json!({})),
            "input.image_url",
            "404",
        ),
        (
            task_body(&good, &img.url("text"), json!({})),
            "input.reference_image_urls[0]",
            "not a JPEG, PNG or WebP",
        ),
        (
            task_body(&img.url("big.png"), &good, json!({})),
            "input.image_url",
            "too large",
        ),
        (
            task_body(
                &good,
                &good,
                json!({"reference_mask_urls": img.url("bomb.png")}),
            ),
            "input.reference_mask_urls",
            "pixels",
        ),
        (
            task_body(
                &good,
                &good,
                json!({"image_urls": [good.clone(), img.url("missing.png")]}),
            ),
            "input.image_urls[1]",
            "404",
        ),
        (
            task_body("http://127.0.0.1:1/x.png", &good, json!({})),
            "input.image_url",
            "unreachable",
        ),
    ];
    let before = srv.api.balance().await;
    for (body, field, reason) in cases {
        let id = srv.api.create_ok(&body).await;
        let data = srv.api.wait_done(&id, DONE).await;
        assert_eq!(data["state"], "fail", "{data}");
        assert_eq!(data["failCode"], "422");
        let msg = data["failMsg"].as_str().unwrap();
        assert!(
            msg.starts_with(field) && msg.contains(reason),
            "{msg:?} should name {field} and say {reason}"
        );
        assert_eq!(data["creditsConsumed"], 0);
        assert_eq!(data["resultJson"], "");
    }
    assert_eq!(
        srv.api.balance().await,
        before,
        "every failed task was refunded"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_loopback_url_is_refused_unless_fetch_allow_names_it() {
    // No fetch.allow: the loopback image server must never be asked.
    let srv = TestServer::start_with(|s| s.fetch.allow.clear()).await;
    let img = ImageServer::start().await;
    let id = srv.api.create_ok(&img.sample_task(json!({}))).await;
    let data = srv.api.wait_done(&id, DONE).await;
    assert_eq!(
        (data["state"].as_str(), data["failCode"].as_str()),
        (Some("fail"), Some("422"))
    );
    let msg = data["failMsg"].as_str().unwrap();
    assert!(
        msg.starts_with("input.image_url") && msg.contains("blocked"),
        "{msg}"
    );
    assert_eq!(img.hits(), 0, "no request reached the blocked address");

    // "localhost" resolves to loopback: refused too.
    let port = img.base.rsplit(':').next().unwrap();
    let id = srv
        .api
        .create_ok(&task_body(
            &format!("http://localhost:{port}/coffee.webp"),
            &img.url("astronaut.webp"),
            json!({}),
        ))
        .await;
    let data = srv.api.wait_done(&id, DONE).await;
    assert!(
        data["failMsg"].as_str().unwrap().contains("blocked"),
        "{data}"
    );
    assert_eq!(img.hits(), 0);
    srv.stop().await;
}

#[tokio::test]
async fn first_start_writes_a_private_key_file() {
    use std::os::unix::fs::PermissionsExt;
    let srv = TestServer::start().await;
    let meta = std::fs::metadata(srv.dir.path().join("default.key")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let store = srv.store().await;
    let accounts = store.list_accounts().await.unwrap();
    assert_eq!(accounts.len(), 1);
    assert_eq!(
        (accounts[0].name.as_str(), accounts[0].credits),
        ("default", 1000)
    );
    let keys = store.list_keys(Some("default")).await.unwrap();
    assert_eq!(keys.len(), 1);
    let key = std::fs::read_to_string(srv.dir.path().join("default.key")).unwrap();
    assert_ne!(
        keys[0].key_hash,
        key.trim().as_bytes(),
        "only a hash is stored"
    );
    assert_eq!(keys[0].key_hash, remixd_api::auth::hash_key(key.trim()));
    srv.stop().await;
}

#[tokio::test]
async fn readyz_fails_when_storage_is_gone() {
    let srv = TestServer::start().await;
    assert_eq!(srv.api.get("/readyz").await.status, 200);
    // Replace the storage directory by a plain file: writes and reads must fail.
    let files = srv.dir.path().join("files");
    std::fs::remove_dir_all(&files).unwrap();
    std::fs::write(&files, b"not a directory").unwrap();
    let r = srv.api.get("/readyz").await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.body["data"]["database"], "ok");
    assert_ne!(r.body["data"]["storage"], "ok");
    assert_eq!(
        srv.api.get("/healthz").await.status,
        200,
        "the process itself is up"
    );
    srv.stop().await;
}
