//! Credits under concurrency: many simultaneous creates against a balance that covers
//! only some of them.

mod common;

use std::time::Duration;

use common::TestServer;
use remixd_domain::KeyLimits;
use remixd_testkit::{task_body, ImageServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_never_overdraw_and_failures_refund() {
    let srv = TestServer::start().await;
    let api = srv.account("racer", 18 * 7, KeyLimits::default()).await;
    // The base image takes 2 s to arrive, so no task finishes (and refunds) during the
    // burst; then the character URL (port 9, refused) fails them all.
    let img = ImageServer::start().await;
    let body = task_body(&img.url("slow/2000"), "http://127.0.0.1:9/b.png", json!({}));
    let mut joins = Vec::new();
    for _ in 0..40 {
        let (api, body) = (api.clone(), body.clone());
        joins.push(tokio::spawn(async move { api.create(&body).await }));
    }
    let mut ids = Vec::new();
    let mut refused = 0;
    for j in joins {
        let a = j.await.unwrap();
        match a.code() {
            200 => ids.push(a.body["data"]["taskId"].as_str().unwrap().to_string()),
            402 => refused += 1,
            other => panic!("unexpected {other}: {:?}", a.body),
        }
    }
    assert_eq!((ids.len(), refused), (7, 33));
    let b = api.balance().await;
    assert!((0..=18 * 7).contains(&b));
    for id in &ids {
        let d = api.wait_done(id, Duration::from_secs(30)).await;
        assert_eq!(
            (d["state"].as_str(), d["failCode"].as_str()),
            (Some("fail"), Some("422"))
        );
    }
    assert_eq!(
        api.balance().await,
        18 * 7,
        "every failed task gave its credits back"
    );
    srv.stop().await;
}
