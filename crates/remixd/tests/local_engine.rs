//! `engine.kind = "local"` runs real tasks through the service: the tiny random-weight
//! SD 1.x fixture model of remixd-diffusion, loaded through the real loader, behind the
//! real HTTP API, queue and storage.

mod common;

use std::time::Duration;

use common::TestServer;
use remixd_testkit::ImageServer;
use serde_json::{json, Value};

fn tiny_model() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../remixd-diffusion/tests/fixtures/tiny-sd1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_runs_through_the_local_engine() {
    let srv = TestServer::start_with(|s| {
        s.engine.kind = "local".into();
        s.engine.local.model_dir = Some(tiny_model());
        s.engine.local.steps_turbo = 3;
    })
    .await;
    let img = ImageServer::start().await;
    let id = srv
        .api
        .create_ok(
            &img.sample_task(json!({"num_images": "2", "seed": 5, "rendering_speed": "TURBO"})),
        )
        .await;
    let data = srv.api.wait_done(&id, Duration::from_secs(120)).await;
    assert_eq!(data["state"], "success", "{data}");
    let result: Value = serde_json::from_str(data["resultJson"].as_str().unwrap()).unwrap();
    let urls = result["resultUrls"].as_array().unwrap();
    assert_eq!(urls.len(), 2);
    let mut images = Vec::new();
    for u in urls {
        let bytes = reqwest::get(u.as_str().unwrap())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let png = image::load_from_memory(&bytes).unwrap();
        assert_eq!((png.width(), png.height()), (512, 512), "image_size square");
        images.push(bytes);
    }
    assert_ne!(images[0], images[1], "one seed per image");
    srv.stop().await;
}

#[tokio::test]
async fn a_local_engine_without_a_model_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = common::test_settings(dir.path());
    s.engine.kind = "local".into();
    let fetcher = remixd::build_fetcher(&s, None).unwrap();
    let err = remixd::build_engine(&s, &fetcher)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("engine.local.model_dir"), "{err}");
    s.engine.local.model_dir = Some(dir.path().join("no-such-model"));
    let err = format!(
        "{:#}",
        remixd::build_engine(&s, &fetcher).err().expect("refused")
    );
    assert!(err.contains("no-such-model"), "{err}");
}
