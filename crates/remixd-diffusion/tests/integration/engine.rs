//! The `local` engine through remixd's `Engine` trait, on the tiny fixture model: sizes,
//! determinism per seed, one image per seed, progress, cancellation.

use crate::common;

use std::sync::{Arc, Mutex};

use remixd_diffusion::engine::{LocalConfig, LocalEngine};
use remixd_domain::{ImageSize, NumImages, RenderingSpeed, Seed, Strength, Style};
use remixd_engine::{Engine, EngineError, Job};
use tokio_util::sync::CancellationToken;

fn engine() -> LocalEngine {
    let mut cfg = LocalConfig::new(common::model_dir("tiny-sd1"));
    cfg.steps = Some([2, 3, 4]);
    LocalEngine::load(cfg).expect("load tiny-sd1")
}

fn job(seed: i64, n: i64, size: ImageSize) -> Job {
    let png = std::fs::read(common::fixtures().join("input-64.png")).unwrap();
    let base = image::load_from_memory(&png).unwrap().to_rgb8();
    Job {
        task_id: "t".into(),
        character: base.clone(),
        base,
        mask: None,
        style_images: vec![],
        prompt: "a knight".into(),
        negative_prompt: "blurry".into(),
        expand_prompt: false,
        size,
        num_images: NumImages::new(n).unwrap(),
        seed: Seed::new(seed).unwrap(),
        strength: Strength::new(0.5).unwrap(),
        style: Style::Realistic,
        rendering_speed: RenderingSpeed::Turbo,
        upstream: Default::default(),
    }
}

fn recorder() -> (remixd_engine::Progress, Arc<Mutex<Vec<u8>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (Arc::new(move |p| s.lock().unwrap().push(p)), seen)
}

#[tokio::test]
async fn images_have_the_requested_size_and_follow_their_seeds() {
    let e = engine();
    let (progress, seen) = recorder();
    let two = e
        .generate(
            job(7, 2, ImageSize::Landscape4_3),
            progress,
            CancellationToken::new(),
        )
        .await
        .expect("generate");
    assert_eq!(two.len(), 2);
    let (w, h) = ImageSize::Landscape4_3.dimensions();
    for img in &two {
        assert_eq!((img.width, img.height), (w, h));
        assert_eq!(img.content_type, "image/png");
        let decoded = image::load_from_memory(&img.bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (w, h));
    }
    assert_ne!(two[0].bytes, two[1].bytes, "image i uses seed + i");
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.is_empty() && seen.windows(2).all(|p| p[0] <= p[1]),
        "{seen:?}"
    );

    // Image 1 of seed 7 is image 0 of seed 8, byte for byte.
    let (progress, _) = recorder();
    let one = e
        .generate(
            job(8, 1, ImageSize::Landscape4_3),
            progress,
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(one[0].bytes, two[1].bytes);
}

#[tokio::test]
async fn a_cancelled_job_stops_with_cancelled() {
    let e = engine();
    let (progress, _) = recorder();
    let token = CancellationToken::new();
    token.cancel();
    let err = e
        .generate(job(1, 4, ImageSize::Square), progress, token)
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::Cancelled);
}

#[test]
fn render_stops_between_steps() {
    let e = engine();
    let mut steps = 0;
    let err = e
        .render(&job(1, 1, ImageSize::Square), 0, &mut |_, _| {
            steps += 1;
            false
        })
        .unwrap_err();
    assert!(matches!(err, remixd_diffusion::Error::Cancelled));
    assert_eq!(steps, 1);
}
