//! `engine.kind = "local"` runs real tasks through the service: the tiny random-weight
//! SD 1.x fixture model of remixd-diffusion, loaded through the real loader, behind the
//! real HTTP API, queue and storage.

use crate::common;

use std::time::Duration;

use common::TestServer;
use remixd_testkit::ImageServer;
use serde_json::{json, Value};

/// Waits for task `id` to succeed and downloads its images, each checked to be a PNG of
/// `size`.
async fn result_images(
    srv: &TestServer,
    id: &str,
    wait_s: u64,
    size: (u32, u32),
) -> Vec<bytes::Bytes> {
    let data = srv.api.wait_done(id, Duration::from_secs(wait_s)).await;
    assert_eq!(data["state"], "success", "{data}");
    let result: Value = serde_json::from_str(data["resultJson"].as_str().unwrap()).unwrap();
    let mut images = Vec::new();
    for u in result["resultUrls"].as_array().unwrap() {
        let bytes = reqwest::get(u.as_str().unwrap())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let png = image::load_from_memory(&bytes).unwrap();
        assert_eq!((png.width(), png.height()), size, "the image_size's pixels");
        images.push(bytes);
    }
    images
}

fn tiny_model() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../remixd-diffusion/tests/fixtures/tiny-sd1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_runs_through_the_local_engine() {
    let srv = TestServer::start_with(|s| {
        s.engine.kind = "local".into();
        s.engine.local.model_dir = Some(tiny_model());
        s.engine.local.steps_turbo = Some(3);
        s.engine.local.steps_balanced = Some(3);
        s.engine.local.steps_quality = Some(3);
    })
    .await;
    let img = ImageServer::start().await;
    let id = srv
        .api
        .create_ok(
            &img.sample_task(json!({"num_images": "2", "seed": 5, "rendering_speed": "TURBO"})),
        )
        .await;
    let images = result_images(&srv, &id, 120, (512, 512)).await;
    assert_eq!(images.len(), 2);
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

fn tiny_klein() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../remixd-diffusion/tests/fixtures/tiny-flux2")
}

/// A character remix through the FLUX.2 [klein] family: the tiny random-weight klein
/// fixture, chosen by its model_index.json, with the character, its mask and a style
/// image as references, behind the real API. The same task and seed give the same bytes;
/// another character gives other pixels (the reference reaches the model).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_character_remix_runs_through_flux2_klein() {
    let srv = TestServer::start_with(|s| {
        s.engine.kind = "local".into();
        s.engine.local.model_dir = Some(tiny_klein());
        s.engine.local.text_layers = vec![0, 1, 2];
        s.engine.local.native_side = Some(48);
    })
    .await;
    let img = ImageServer::start().await;
    let task = |character: &str| {
        img.sample_task(json!({
            "seed": 9,
            "rendering_speed": "TURBO",
            "image_size": "landscape_4_3",
            "reference_image_urls": [img.url(character)],
            "reference_mask_urls": img.url("mask.png"),
            "image_urls": [img.url("coffee.webp")],
            "num_images": "2",
        }))
    };
    let mut results = Vec::new();
    for character in ["astronaut.webp", "astronaut.webp", "coffee.webp"] {
        let id = srv.api.create_ok(&task(character)).await;
        let images = result_images(&srv, &id, 300, (1024, 768)).await;
        assert_eq!(images.len(), 2);
        assert_ne!(images[0], images[1], "one seed per image");
        results.push(images);
    }
    assert_eq!(results[0], results[1], "same task and seed, same bytes");
    assert_ne!(results[0], results[2], "the character reaches the model");
    srv.stop().await;
}
