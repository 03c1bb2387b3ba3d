//! Prometheus metrics on their own listener.

use crate::common;

use std::time::Duration;

use common::TestServer;
use remixd_testkit::{task_body, ImageServer};
use serde_json::json;

#[tokio::test]
async fn metrics_report_tasks_and_outcomes_on_their_own_listener() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let srv =
        TestServer::start_with(|s| s.server.metrics_listen = Some(format!("127.0.0.1:{port}")))
            .await;
    let img = ImageServer::start().await;
    let ok = srv.api.create_ok(&img.sample_task(json!({}))).await;
    let bad = srv
        .api
        .create_ok(&task_body(
            &img.url("status/404"),
            &img.url("astronaut.webp"),
            json!({}),
        ))
        .await;
    srv.api.wait_done(&ok, Duration::from_secs(30)).await;
    srv.api.wait_done(&bad, Duration::from_secs(30)).await;

    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value(r#"remixd_tasks{state="success"}"#), 1.0);
    assert_eq!(value(r#"remixd_tasks{state="fail"}"#), 1.0);
    assert_eq!(value(r#"remixd_tasks{state="waiting"}"#), 0.0);
    assert!(value(r#"remixd_tasks_finished_total{state="success""#) >= 1.0);
    assert!(value(r#"remixd_tasks_finished_total{state="fail",fail_code="422"}"#) >= 1.0);
    assert!(text.contains("remixd_generation_seconds_bucket"), "{text}");
    // Not on the API listener.
    assert_eq!(srv.api.get("/metrics").await.code(), 404);
    srv.stop().await;
}
