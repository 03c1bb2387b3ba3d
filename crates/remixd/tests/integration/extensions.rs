//! API.md §8 extensions: Idempotency-Key, cancel (also of a task that is generating),
//! the Server-Sent Events stream and the task list.

use crate::common;

use std::time::{Duration, Instant};

use common::TestServer;
use remixd_testkit::{task_body, ImageServer, Receiver};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

async fn create_with_key(srv: &TestServer, key: &str, body: &Value) -> (u16, Value) {
    let r = srv
        .api
        .http
        .post(format!("{}/api/v1/jobs/createTask", srv.api.base))
        .bearer_auth(&srv.api.key)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_gives_one_task_and_one_charge() {
    let srv = TestServer::start().await;
    let img = ImageServer::start().await;
    let body = task_body(&img.url("slow/1000"), &img.url("astronaut.webp"), json!({}));
    let (_, a) = create_with_key(&srv, "order-42", &body).await;
    let (_, b) = create_with_key(&srv, "order-42", &body).await;
    assert_eq!(a["code"], 200);
    assert_eq!(a["data"]["taskId"], b["data"]["taskId"]);
    assert_eq!(srv.api.balance().await, 1000 - 18);

    let mut other = body.clone();
    other["input"]["prompt"] = json!("something else");
    let (status, c) = create_with_key(&srv, "order-42", &other).await;
    assert_eq!((status, c["code"].as_i64()), (422, Some(422)));
    assert!(c["msg"].as_str().unwrap().contains("Idempotency-Key"));

    // Concurrent retries of one request: one task, one charge.
    let mut joins = Vec::new();
    for _ in 0..10 {
        let (srv_api, body) = (srv.api.clone(), body.clone());
        joins.push(tokio::spawn(async move {
            let r = srv_api
                .http
                .post(format!("{}/api/v1/jobs/createTask", srv_api.base))
                .bearer_auth(&srv_api.key)
                .header("idempotency-key", "burst")
                .json(&body)
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()["data"]["taskId"]
                .as_str()
                .unwrap()
                .to_string()
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for j in joins {
        ids.insert(j.await.unwrap());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(srv.api.balance().await, 1000 - 36);

    let (status, bad) = create_with_key(&srv, "", &body).await;
    assert_eq!((status, bad["code"].as_i64()), (422, Some(422)));
    srv.stop().await;
}

#[tokio::test]
async fn cancelling_a_generating_task_stops_the_engine_and_refunds() {
    // A slow engine: 3 s per image, 4 images.
    let srv = TestServer::start_with(|s| s.engine.preview.delay_ms = 3000).await;
    let img = ImageServer::start().await;
    let rx = Receiver::start().await;
    let mut body = img.sample_task(json!({"num_images": 4}));
    body["callBackUrl"] = json!(rx.url("ok"));
    let id = srv.api.create_ok(&body).await;
    assert_eq!(srv.api.balance().await, 1000 - 72);
    let deadline = Instant::now() + WAIT;
    while srv.api.record(&id).await.body["data"]["state"] != "generating" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = srv.api.cancel(&id).await;
    assert_eq!(a.code(), 200, "{:?}", a.body);
    assert_eq!(
        (
            a.body["data"]["state"].as_str(),
            a.body["data"]["failCode"].as_str()
        ),
        (Some("fail"), Some("499"))
    );
    assert_eq!(srv.api.balance().await, 1000, "refunded at once");
    let cb = rx.wait_for(1, WAIT).await[0].json();
    assert_eq!(
        (cb["code"].as_i64(), cb["data"]["failCode"].as_str()),
        (Some(501), Some("499"))
    );

    // The engine stopped: the worker is free for the next task well before 12 s of images.
    let started = Instant::now();
    let quick = srv.api.create_ok(&img.sample_task(json!({}))).await;
    let d = srv.api.wait_done(&quick, WAIT).await;
    assert_eq!(d["state"], "success");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let rec = srv.api.record(&id).await.body["data"].clone();
    assert_eq!(
        (rec["state"].as_str(), rec["creditsConsumed"].as_i64()),
        (Some("fail"), Some(0))
    );

    // Terminal tasks cannot be cancelled; unknown ones are 404.
    let again = srv.api.cancel(&id).await;
    assert_eq!(again.code(), 422);
    let unknown = srv
        .api
        .post_raw(
            "/api/v1/jobs/cancel?taskId=0123456789abcdef0123456789abcdef",
            "application/json",
            vec![],
        )
        .await;
    assert_eq!(unknown.code(), 404);
    srv.stop().await;
}

#[tokio::test]
async fn cancelling_a_waiting_task_refunds_and_the_fetch_is_abandoned() {
    let srv = TestServer::start().await;
    let img = ImageServer::start().await;
    let id = srv
        .api
        .create_ok(&task_body(
            &img.url("slow/2000"),
            &img.url("astronaut.webp"),
            json!({}),
        ))
        .await;
    let a = srv.api.cancel(&id).await;
    assert_eq!(a.code(), 200);
    assert_eq!(srv.api.balance().await, 1000);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rec = srv.api.record(&id).await.body["data"].clone();
    assert_eq!(
        (rec["state"].as_str(), rec["failCode"].as_str()),
        (Some("fail"), Some("499")),
        "stays cancelled"
    );
    srv.stop().await;
}

#[tokio::test]
async fn the_stream_sends_each_change_and_closes_after_the_end() {
    let srv = TestServer::start_with(|s| s.engine.preview.delay_ms = 400).await;
    let img = ImageServer::start().await;
    let id = srv
        .api
        .create_ok(&img.sample_task(json!({"num_images": 3})))
        .await;
    let resp = srv
        .api
        .http
        .get(format!("{}/api/v1/jobs/stream?taskId={id}", srv.api.base))
        .bearer_auth(&srv.api.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    // The stream ends by itself after the terminal event.
    let text = tokio::time::timeout(WAIT, resp.text())
        .await
        .expect("the stream closes")
        .unwrap();
    let events: Vec<Value> = text
        .split("\n\n")
        .filter(|e| e.contains("event: task"))
        .map(|e| {
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            serde_json::from_str(data).unwrap()
        })
        .collect();
    assert!(events.len() >= 3, "{text}");
    let last = events.last().unwrap();
    assert_eq!(
        (last["state"].as_str(), last["progress"].as_i64()),
        (Some("success"), Some(100))
    );
    let progress: Vec<i64> = events
        .iter()
        .map(|e| e["progress"].as_i64().unwrap())
        .collect();
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress never goes back: {progress:?}"
    );
    let states: Vec<&str> = events
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"generating"), "{states:?}");
    for w in events.windows(2) {
        assert!(
            w[0]["state"] != w[1]["state"] || w[0]["progress"] != w[1]["progress"],
            "one event per change"
        );
    }
    let stranger = srv.account("peeker", 10, Default::default()).await;
    assert_eq!(
        stranger
            .get(&format!("/api/v1/jobs/stream?taskId={id}"))
            .await
            .code(),
        404
    );
    srv.stop().await;
}

/// `GET /api/v1/jobs/list`: the caller's own tasks, newest first, page by page; a
/// cursor of another account or one this server never issued is a 422 naming `cursor`.
#[tokio::test]
async fn the_list_pages_through_the_callers_own_tasks() {
    let srv = TestServer::start_with(|s| s.limits.query_per_s = 50).await;
    let img = ImageServer::start().await;
    let other = srv
        .account("other", 1000, remixd_domain::KeyLimits::default())
        .await;
    let body = task_body(
        &img.url("slow/60000"),
        &img.url("astronaut.webp"),
        json!({}),
    );
    let mut mine = Vec::new();
    for _ in 0..5 {
        mine.push(srv.api.create_ok(&body).await);
        other.create_ok(&body).await;
    }
    mine.reverse(); // newest first

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("/api/v1/jobs/list?limit=2&cursor={c}"),
            None => "/api/v1/jobs/list?limit=2".to_string(),
        };
        let a = srv.api.get(&q).await;
        assert_eq!(a.code(), 200, "{:?}", a.body);
        pages += 1;
        for t in a.body["data"]["tasks"].as_array().unwrap() {
            assert_eq!(t["model"], "ideogram/character-remix");
            assert!(t["param"].is_string() && t["state"].is_string());
            seen.push(t["taskId"].as_str().unwrap().to_string());
        }
        match a.body["data"]["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                assert!(a.body["data"]["nextCursor"].is_null());
                break;
            }
        }
    }
    assert_eq!(
        seen, mine,
        "all of mine, newest first, none of the other account's"
    );
    assert_eq!(pages, 3);
    let all = srv.api.get("/api/v1/jobs/list").await;
    assert_eq!(
        all.body["data"]["tasks"].as_array().unwrap().len(),
        5,
        "default 20"
    );

    // Another account's cursor, an altered one and garbage are refused, naming cursor.
    let theirs = other.get("/api/v1/jobs/list?limit=1").await;
    let their_cursor = theirs.body["data"]["nextCursor"]
        .as_str()
        .unwrap()
        .to_string();
    let mine_cursor = srv.api.get("/api/v1/jobs/list?limit=1").await.body["data"]["nextCursor"]
        .as_str()
        .unwrap()
        .to_string();
    let upper = mine_cursor.to_uppercase();
    for bad in [their_cursor.as_str(), "abc", "x.y", upper.as_str()] {
        let a = srv
            .api
            .get(&format!("/api/v1/jobs/list?cursor={bad}"))
            .await;
        assert_eq!(a.code(), 422, "{bad}: {:?}", a.body);
        assert!(a.msg().contains("cursor"), "{}", a.msg());
    }
    // A repeated parameter is refused, not read as its first value (a CI run's
    // schemathesis sent `limit=&limit=<junk>` and got a page).
    for bad in ["0", "101", "x", "-1", "", "2&limit=x", "&limit=3"] {
        let a = srv.api.get(&format!("/api/v1/jobs/list?limit={bad}")).await;
        assert_eq!(a.code(), 422, "{bad}");
        assert!(a.msg().contains("limit"), "{}", a.msg());
    }
    let twice = srv
        .api
        .get(&format!(
            "/api/v1/jobs/list?cursor={mine_cursor}&cursor={mine_cursor}"
        ))
        .await;
    assert_eq!(twice.code(), 422);
    assert!(twice.msg().contains("cursor"), "{}", twice.msg());
    let anon = remixd_testkit::Api::new(&srv.api.base, "");
    assert_eq!(anon.get("/api/v1/jobs/list").await.code(), 401);
    srv.stop().await;
}

/// The list counts against the key's query rate like recordInfo.
#[tokio::test]
async fn the_list_counts_against_the_query_rate() {
    let srv = TestServer::start_with(|s| s.limits.query_per_s = 3).await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(srv.api.get("/api/v1/jobs/list").await.code());
    }
    assert!(codes.contains(&429), "{codes:?}");
    srv.stop().await;
}
