//! Retention (API.md §7): the sweeper deletes result files, expired uploads and old task
//! records; their URLs answer 404. Retention periods are shortened to seconds here.

use crate::common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::TestServer;
use remixd_testkit::{samples, ImageServer};
use serde_json::{json, Value};

fn files_under(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.path().is_dir() {
                files_under(&e.path())
            } else {
                1
            }
        })
        .sum()
}

async fn status(url: &str) -> u16 {
    reqwest::get(url).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn results_uploads_and_records_expire_and_are_deleted() {
    let srv = TestServer::start_with(|s| {
        s.retention.results_days = 2.0 / 86_400.0;
        s.retention.uploads_hours = 2.0 / 3_600.0;
        s.retention.tasks_days = 4.0 / 86_400.0;
        s.retention.sweep_interval_s = 0.2;
    })
    .await;
    let img = ImageServer::start().await;
    let id = srv.api.create_ok(&img.sample_task(json!({}))).await;
    let data = srv.api.wait_done(&id, Duration::from_secs(30)).await;
    let result: Value = serde_json::from_str(data["resultJson"].as_str().unwrap()).unwrap();
    let result_url = result["resultUrls"][0].as_str().unwrap().to_string();
    let b64 = base64::engine::general_purpose::STANDARD.encode(samples::ASTRONAUT_MASK_PNG);
    let up: Value = srv
        .api
        .http
        .post(format!("{}/api/file-base64-upload", srv.api.base))
        .bearer_auth(&srv.api.key)
        .json(&json!({"base64Data": b64, "uploadPath": "keep"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let upload_url = up["data"]["downloadUrl"].as_str().unwrap().to_string();
    assert_eq!(status(&result_url).await, 200);
    assert_eq!(status(&upload_url).await, 200);
    let files = srv.dir.path().join("files");
    assert!(files_under(&files.join("results")) >= 1 && files_under(&files.join("uploads")) == 1);

    // After their periods the files are gone from disk and their URLs are 404.
    let deadline = Instant::now() + Duration::from_secs(15);
    while files_under(&files.join("results")) + files_under(&files.join("uploads")) > 0 {
        assert!(
            Instant::now() < deadline,
            "the sweeper did not delete the files"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(&result_url).await, 404);
    assert_eq!(status(&upload_url).await, 404);
    assert_eq!(
        srv.api.record(&id).await.code(),
        200,
        "the record outlives its files"
    );
    // Then it goes too.
    let deadline = Instant::now() + Duration::from_secs(15);
    while srv.api.record(&id).await.code() == 200 {
        assert!(Instant::now() < deadline, "the task record was not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(srv.api.record(&id).await.code(), 404);
    srv.stop().await;
}
