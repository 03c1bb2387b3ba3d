//! Callbacks through the durable outbox, against a loopback receiver: retries with a
//! stable webhook-id, signatures checked with a textbook HMAC, 410, redirects, a
//! hanging receiver, a blocked URL, and a restart in the middle of a retry series.

use crate::common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::TestServer;
use hmac::{Hmac, Mac};
use remixd_domain::TaskId;
use remixd_store::{DeliveryRecord, DeliveryState};
use remixd_testkit::{task_body, ImageServer, Received, Receiver};
use serde_json::{json, Value};
use sha2::Sha256;

const WAIT: Duration = Duration::from_secs(30);

fn with_callback(img: &ImageServer, url: &str) -> Value {
    let mut b = img.sample_task(json!({}));
    b["callBackUrl"] = json!(url);
    b
}

/// HMAC-SHA256, base64: what any receiver would write, independent of remixd's code.
fn textbook_hmac(key: &[u8], msg: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(msg);
    base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
}

fn verify(r: &Received, secret: &str, task_id: &str) {
    let id = r.header("webhook-id");
    let ts = r.header("webhook-timestamp");
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut signed = format!("{id}.{ts}.").into_bytes();
    signed.extend_from_slice(&r.body);
    assert_eq!(
        r.header("webhook-signature"),
        format!("v1,{}", textbook_hmac(&key, &signed))
    );
    let xts = r.header("x-webhook-timestamp");
    assert_eq!(xts, ts);
    assert_eq!(
        r.header("x-webhook-signature"),
        textbook_hmac(secret.as_bytes(), format!("{task_id}.{xts}").as_bytes())
    );
    let age = remixd_domain::now_millis() / 1000 - ts.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "the timestamp is this attempt's");
}

/// Polls the outbox until the task's delivery reaches `state` (a final state: no
/// attempt follows it), instead of sleeping and hoping.
async fn wait_delivery(srv: &TestServer, task: &str, state: DeliveryState) -> DeliveryRecord {
    let store = srv.store().await;
    let id = task.parse().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let d = store.deliveries_of(&id).await.unwrap();
        if let Some(d) = d.into_iter().next().filter(|d| d.state == state) {
            return d;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "delivery never {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn set_secret(srv: &TestServer) -> String {
    let secret = remixd_worker::callbacks::new_secret();
    srv.store()
        .await
        .set_webhook_secret("default", &secret)
        .await
        .unwrap();
    secret
}

#[tokio::test]
async fn a_flaky_receiver_gets_signed_retries_with_one_stable_id() {
    let srv = TestServer::start_with(|s| s.callbacks.retry_schedule_ms = vec![200, 300, 400]).await;
    let secret = set_secret(&srv).await;
    let img = ImageServer::start().await;
    let rx = Receiver::start().await;
    let id = srv
        .api
        .create_ok(&with_callback(&img, &rx.url("flaky/2")))
        .await;
    let task = srv.api.wait_done(&id, WAIT).await;
    assert_eq!(task["state"], "success");

    let seen = rx.wait_for(3, WAIT).await;
    assert_eq!(seen.len(), 3);
    let wid = seen[0].header("webhook-id").to_string();
    assert!(wid.starts_with("msg_"));
    for r in &seen {
        assert_eq!(r.header("webhook-id"), wid, "stable across retries");
        assert_eq!(r.body, seen[0].body, "the same bytes every time");
        assert_eq!(r.header("content-type"), "application/json");
        assert!(r.header("user-agent").starts_with("remixd/"));
        verify(r, &secret, &id);
    }
    assert!(
        seen[1].at_ms - seen[0].at_ms >= 150,
        "backoff between attempts"
    );
    let body = seen[2].json();
    assert_eq!(
        (body["code"].as_i64(), body["msg"].as_str()),
        (Some(200), Some("Task completed successfully."))
    );
    let data = &body["data"];
    assert_eq!(data["taskId"], id);
    assert_eq!(data["state"], "success");
    assert_eq!(data["resultJson"], task["resultJson"]);
    assert_eq!(data["consumeCredits"], 18);
    assert_eq!(data["remainedCredits"], 1000 - 18);

    // The outbox says delivered, after three attempts.
    let d = wait_delivery(&srv, &id, DeliveryState::Delivered).await;
    assert_eq!((d.attempts, d.last_status), (3, Some(204)));
    assert_eq!(
        srv.store()
            .await
            .deliveries_of(&id.parse::<TaskId>().unwrap())
            .await
            .unwrap()
            .len(),
        1
    );
    srv.stop().await;
}

#[tokio::test]
async fn failed_tasks_call_back_too_and_410_stops_the_retries() {
    let srv = TestServer::start_with(|s| s.callbacks.retry_schedule_ms = vec![100, 100, 100]).await;
    let img = ImageServer::start().await;
    let rx = Receiver::start().await;
    let mut body = task_body(
        &img.url("status/404"),
        &img.url("astronaut.webp"),
        json!({}),
    );
    body["callBackUrl"] = json!(rx.url("gone"));
    let id = srv.api.create_ok(&body).await;
    let seen = rx.wait_for(1, WAIT).await;
    let cb = seen[0].json();
    assert_eq!(
        (cb["code"].as_i64(), cb["data"]["state"].as_str()),
        (Some(501), Some("fail"))
    );
    assert_eq!(cb["data"]["failCode"], "422");
    assert_eq!(cb["data"]["consumeCredits"], 0);
    assert_eq!(cb["data"]["remainedCredits"], 1000, "the refund came first");
    assert!(
        !seen[0].headers.contains_key("webhook-signature"),
        "no secret, no signature"
    );
    // Given up (a final state: nothing is ever sent again), after one attempt.
    let d = wait_delivery(&srv, &id, DeliveryState::Failed).await;
    assert_eq!((d.attempts, d.last_status), (1, Some(410)));
    assert_eq!(rx.seen().len(), 1, "410 Gone: no retry");
    srv.stop().await;
}

#[tokio::test]
async fn redirects_are_not_followed_and_the_schedule_runs_out() {
    let srv = TestServer::start_with(|s| s.callbacks.retry_schedule_ms = vec![100, 100]).await;
    let img = ImageServer::start().await;
    let rx = Receiver::start().await;
    let id = srv
        .api
        .create_ok(&with_callback(&img, &rx.url("redirect")))
        .await;
    let d = wait_delivery(&srv, &id, DeliveryState::Failed).await;
    assert_eq!((d.attempts, d.last_status), (3, Some(302)));
    assert!(
        d.last_error.contains("no attempts left"),
        "{}",
        d.last_error
    );
    let seen = rx.seen();
    assert_eq!(
        seen.len(),
        3,
        "three attempts (first + two retries), then give up"
    );
    assert!(
        seen.iter().all(|r| r.path == "redirect"),
        "the 302 to /ok was never followed"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_hanging_receiver_times_out_at_15_s_while_others_flow() {
    // The real default limit: this test takes about 15 s.
    let srv = TestServer::start().await;
    assert_eq!(srv.settings.callbacks.timeout_s, 15.0);
    let img = ImageServer::start().await;
    let rx = Receiver::start().await;
    let hang = srv
        .api
        .create_ok(&with_callback(&img, &rx.url("hang")))
        .await;
    rx.wait_for(1, WAIT).await;
    let started = Instant::now();
    // Meanwhile other tasks are generated and their callbacks delivered.
    let mut ok_ids = Vec::new();
    for _ in 0..5 {
        ok_ids.push(srv.api.create_ok(&with_callback(&img, &rx.url("ok"))).await);
    }
    rx.wait_for(6, WAIT).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "others were not held up by the hanging receiver"
    );
    for id in &ok_ids {
        assert_eq!(srv.api.wait_done(id, WAIT).await["state"], "success");
    }
    // The hanging attempt ends at the limit and is scheduled again.
    let store = srv.store().await;
    let hang_id: TaskId = hang.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(25);
    let d = loop {
        let d = store.deliveries_of(&hang_id).await.unwrap();
        if d[0].attempts == 1 {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "the hanging attempt never timed out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(13) && waited < Duration::from_secs(20),
        "{waited:?}"
    );
    assert_eq!(d[0].state, DeliveryState::Pending);
    assert!(
        d[0].last_error.contains("timed out after 15"),
        "{}",
        d[0].last_error
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_blocked_callback_url_is_never_contacted() {
    let srv = TestServer::start_with(|s| s.fetch.allow.clear()).await;
    let rx = Receiver::start().await;
    let mut body = task_body(
        "http://127.0.0.1:9/a.png",
        "http://127.0.0.1:9/b.png",
        json!({}),
    );
    body["callBackUrl"] = json!(rx.url("ok"));
    let id = srv.api.create_ok(&body).await;
    srv.api.wait_done(&id, WAIT).await;
    let store = srv.store().await;
    let tid: TaskId = id.parse().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let d = store.deliveries_of(&tid).await.unwrap();
        if d[0].state == DeliveryState::Failed {
            assert!(d[0].last_error.contains("blocked"), "{}", d[0].last_error);
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rx.seen().is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn a_restart_mid_series_loses_nothing_and_operators_can_redeliver() {
    let srv =
        TestServer::start_with(|s| s.callbacks.retry_schedule_ms = vec![1500, 200, 200]).await;
    let secret = set_secret(&srv).await;
    let img = ImageServer::start().await;
    let rx = Receiver::start().await;
    let id = srv
        .api
        .create_ok(&with_callback(&img, &rx.url("flaky/1")))
        .await;
    rx.wait_for(1, WAIT).await;
    // Stop before the retry is due; the next process picks the series up.
    let srv = srv.restart().await;
    let seen = rx.wait_for(2, WAIT).await;
    assert_eq!(seen[0].header("webhook-id"), seen[1].header("webhook-id"));
    assert_eq!(seen[0].body, seen[1].body);
    verify(&seen[1], &secret, &id);

    // The operator sends it once more, once the attempt in flight has been recorded.
    let d = wait_delivery(&srv, &id, DeliveryState::Delivered).await;
    let store = srv.store().await;
    assert!(store
        .redeliver(&d.id, remixd_domain::now_millis())
        .await
        .unwrap());
    let seen = rx.wait_for(3, Duration::from_secs(5)).await;
    assert_eq!(seen[2].header("webhook-id"), d.id);
    srv.stop().await;
}
