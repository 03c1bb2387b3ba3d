//! Credits under concurrency: many simultaneous creates against a balance that covers
//! only some of them.

use crate::common;

use std::time::Duration;

use common::TestServer;
use remixd_domain::KeyLimits;
use remixd_testkit::{task_body, ImageServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_never_overdraw_and_failures_refund() {
    // Enough fetch slots for the seven tasks at once, so they time out together.
    let srv = TestServer::start_with(|s| {
        s.worker.fetch_concurrency = 8;
        s.worker.fetch_per_account = Some(8);
    })
    .await;
    let api = srv.account("racer", 18 * 7, KeyLimits::default()).await;
    // The base image takes 2 s to arrive and the character URL never answers, so no
    // task finishes (and refunds) during the burst (a task's downloads run in parallel);
    // then the character's download times out (fetch.timeout_s) and fails them all.
    let img = ImageServer::start().await;
    let body = task_body(&img.url("slow/2000"), &img.url("hang"), json!({}));
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
