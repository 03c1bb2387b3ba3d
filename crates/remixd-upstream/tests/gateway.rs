//! The upstream engines against a loopback stand-in that follows each provider's
//! documented API: what remixd sends, and how it behaves on each documented answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::{GrayImage, RgbImage};
use remixd_domain::{ImageSize, NumImages, RenderingSpeed, Seed, Strength, Style};
use remixd_engine::{Engine, EngineError, InputRole, Job, Progress, Source, UpstreamJob};
use remixd_fetch::{FetchConfig, Fetcher};
use remixd_testkit::providers::{Reply, StandIn};
use remixd_testkit::samples;
use remixd_upstream::{Gateway, GatewayConfig, Handle, Kind, ProviderConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const FAL_KEY: &str = "fal-test-key-0123456789";
const IDEOGRAM_KEY: &str = "ideogram-test-key-9876543210";

fn fetcher() -> Fetcher {
    Fetcher::new(FetchConfig {
        allow: vec!["127.0.0.1/32".into()],
        ..FetchConfig::default()
    })
    .unwrap()
}

fn provider(kind: Kind, base: &str) -> ProviderConfig {
    let key = match kind {
        Kind::Fal => FAL_KEY,
        Kind::Ideogram => IDEOGRAM_KEY,
    };
    ProviderConfig {
        base_url: base.to_string(),
        retries: 2,
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        poll_interval: Duration::from_millis(20),
        task_timeout: Duration::from_secs(20),
        ..ProviderConfig::new(kind, key)
    }
}

fn gateway(providers: Vec<(Kind, ProviderConfig)>) -> Gateway {
    Gateway::new(GatewayConfig {
        providers,
        fetcher: fetcher(),
        max_result_bytes: 16 << 20,
    })
    .unwrap()
}

fn source(role: InputRole, field: &str, url: &str, bytes: &'static [u8]) -> Source {
    Source {
        role,
        field: field.into(),
        url: url.into(),
        bytes: Bytes::from_static(bytes),
    }
}

/// A gateway to one provider, the stand-in, with the tests' settings.
fn only(kind: Kind, stand_in: &StandIn) -> Gateway {
    gateway(vec![(kind, provider(kind, &stand_in.base))])
}

/// A job with a mask and two style images; checkpoints land in `saved`.
fn job(n: i64, size: ImageSize, saved: &Arc<Mutex<Vec<String>>>) -> Job {
    let saved = saved.clone();
    Job {
        task_id: "t1".into(),
        base: RgbImage::new(0, 0),
        character: RgbImage::new(0, 0),
        mask: Some(GrayImage::new(0, 0)),
        style_images: vec![RgbImage::new(0, 0), RgbImage::new(0, 0)],
        prompt: "a knight in a kitchen".into(),
        negative_prompt: "blurry".into(),
        expand_prompt: true,
        size,
        num_images: NumImages::new(n).unwrap(),
        seed: Seed::new(77).unwrap(),
        strength: Strength::new(0.8).unwrap(),
        style: Style::Auto,
        rendering_speed: RenderingSpeed::Balanced,
        upstream: UpstreamJob {
            sources: vec![
                source(
                    InputRole::Base,
                    "input.image_url",
                    "https://img.example/base.webp",
                    samples::COFFEE_WEBP,
                ),
                source(
                    InputRole::Character,
                    "input.reference_image_urls[0]",
                    "https://img.example/char.webp",
                    samples::ASTRONAUT_WEBP,
                ),
                source(
                    InputRole::Mask,
                    "input.reference_mask_urls",
                    "https://img.example/mask.png",
                    samples::ASTRONAUT_MASK_PNG,
                ),
                source(
                    InputRole::Style,
                    "input.image_urls[0]",
                    "https://img.example/s0.webp",
                    samples::COFFEE_WEBP,
                ),
                source(
                    InputRole::Style,
                    "input.image_urls[1]",
                    "https://img.example/s1.webp",
                    samples::ASTRONAUT_WEBP,
                ),
            ],
            resume: None,
            checkpoint: Some(Arc::new(move |h: String| {
                saved.lock().unwrap().push(h);
                Box::pin(async { Ok(()) })
            })),
        },
    }
}

fn progress_log() -> (Progress, Arc<Mutex<Vec<u8>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    (Arc::new(move |p| l.lock().unwrap().push(p)), log)
}

/// Runs `j` on `gw` with a fresh progress callback and cancellation token.
async fn go(gw: &Gateway, j: Job) -> Result<Vec<remixd_engine::EngineImage>, EngineError> {
    gw.generate(j, progress_log().0, CancellationToken::new())
        .await
}

#[tokio::test]
async fn fal_submits_the_documented_input_follows_the_queue_and_copies_the_images() {
    let fal = StandIn::start().await;
    let gw = only(Kind::Fal, &fal);
    let saved = Arc::new(Mutex::new(Vec::new()));
    let (progress, log) = progress_log();
    let images = gw
        .generate(
            job(2, ImageSize::Landscape4_3, &saved),
            progress,
            CancellationToken::new(),
        )
        .await
        .unwrap();

    let submits = fal.fal_submits();
    assert_eq!(submits.len(), 1);
    let s = &submits[0];
    assert_eq!(s.header("authorization").unwrap(), format!("Key {FAL_KEY}"));
    let body = s.json.as_ref().unwrap();
    assert_eq!(body["num_images"], json!(2), "an integer");
    assert_eq!(
        body["reference_mask_urls"],
        json!(["https://img.example/mask.png"]),
        "a list"
    );
    assert_eq!(
        body["reference_image_urls"],
        json!(["https://img.example/char.webp"])
    );
    assert_eq!(
        body["image_urls"],
        json!(["https://img.example/s0.webp", "https://img.example/s1.webp"])
    );
    assert_eq!(body["image_url"], "https://img.example/base.webp");
    assert_eq!(body["image_size"], "landscape_4_3");
    assert_eq!(body["rendering_speed"], "BALANCED");
    assert_eq!(body["style"], "AUTO");
    assert_eq!(body["expand_prompt"], true);
    assert_eq!(body["seed"], json!(77));
    assert_eq!(body["strength"], json!(0.8));
    assert_eq!(body["sync_mode"], false);
    assert_eq!(body["negative_prompt"], "blurry");
    assert_eq!(body["prompt"], "a knight in a kitchen");

    // The handle was recorded before the first status request, and holds no key.
    let saved = saved.lock().unwrap().clone();
    assert_eq!(saved.len(), 1);
    let h: Handle = serde_json::from_str(&saved[0]).unwrap();
    assert_eq!((h.provider, h.request_id.as_str()), (Kind::Fal, "req-0"));
    assert!(!saved[0].contains(FAL_KEY));
    let polls = fal.seen_at("GET", "/fal-ai/ideogram/requests/req-0/status");
    assert_eq!(
        polls.len(),
        4,
        "IN_QUEUE 2, IN_QUEUE 1, IN_PROGRESS, COMPLETED"
    );
    assert!(polls
        .iter()
        .all(|p| p.header("authorization").as_deref() == Some(&*format!("Key {FAL_KEY}"))));

    // Progress rises with the queue and the logs, and never falls.
    let log = log.lock().unwrap().clone();
    assert!(log.windows(2).all(|w| w[0] <= w[1]), "{log:?}");
    assert!(
        log.contains(&15),
        "queue position 2 → 1 moves progress: {log:?}"
    );
    assert!(
        log.iter().any(|p| (30..90).contains(p)),
        "IN_PROGRESS: {log:?}"
    );

    assert_eq!(images.len(), 2);
    for (i, img) in images.iter().enumerate() {
        let file = reqwest::get(format!("{}/files/req-0/{i}.png", fal.base))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(img.bytes, file, "the provider's bytes, copied");
        assert_eq!(
            (img.width, img.height, img.content_type.as_str()),
            (64, 48, "image/png")
        );
        let p = img.provider.as_ref().unwrap();
        assert_eq!((p.provider.as_str(), p.seed), ("fal", Some(4242)));
    }
}

#[tokio::test]
async fn fal_honours_retry_after_through_a_429_storm_and_retries_a_500() {
    let fal = StandIn::start().await;
    fal.script(|s| {
        for _ in 0..2 {
            s.fal_submit.push_back(Reply::Status(
                429,
                json!({"detail": "Too many requests"}),
                Some(1),
            ));
        }
        // With `Retry-After: 0`, so the long schedule below does not apply to it.
        s.fal_status
            .push_back(Reply::Status(500, json!({"detail": "boom"}), Some(0)));
    });
    let mut cfg = provider(Kind::Fal, &fal.base);
    // A schedule far longer than the Retry-After: only the header explains a short wait.
    cfg.retry_base = Duration::from_secs(20);
    cfg.retry_max = Duration::from_secs(20);
    let gw = gateway(vec![(Kind::Fal, cfg)]);
    let saved = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut j = job(1, ImageSize::Square, &saved);
    j.upstream
        .sources
        .retain(|s| s.role != InputRole::Mask && s.role != InputRole::Style);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        gw.generate(j, progress_log().0, CancellationToken::new()),
    )
    .await;
    let images = out.expect("in time").unwrap();
    let took = started.elapsed();
    assert_eq!(images.len(), 1);
    assert_eq!(fal.fal_submits().len(), 3, "two 429s, then accepted");
    assert!(
        took >= Duration::from_secs(2),
        "Retry-After: 1 honoured twice: {took:?}"
    );
    let body = fal.fal_submits()[2].json.clone().unwrap();
    assert!(body.get("reference_mask_urls").is_none() && body.get("image_urls").is_none());
}

#[tokio::test]
async fn fal_validation_errors_fail_the_task_with_the_providers_message_and_no_key() {
    let fal = StandIn::start().await;
    fal.script(|s| {
        s.fal_submit.push_back(Reply::Status(
            422,
            json!({"detail": [{"loc": ["body", "image_url"], "msg": format!("could not read the image (key {FAL_KEY})"), "type": "value_error"}]}),
            None,
        ))
    });
    let gw = only(Kind::Fal, &fal);
    let saved = Arc::new(Mutex::new(Vec::new()));
    let err = go(&gw, job(1, ImageSize::Square, &saved))
        .await
        .unwrap_err();
    let EngineError::BadInput(msg) = err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("image_url: could not read the image"), "{msg}");
    assert!(
        !msg.contains(FAL_KEY) && msg.contains("<redacted>"),
        "{msg}"
    );
    assert_eq!(fal.fal_submits().len(), 1, "a 422 is not retried");
    assert!(!gw.circuit_open(Kind::Fal));
}

#[tokio::test]
async fn a_result_that_cannot_be_downloaded_is_retried_then_fails_the_task() {
    let fal = StandIn::start().await;
    fal.script(|s| s.results_404 = true);
    let gw = only(Kind::Fal, &fal);
    let saved = Arc::new(Mutex::new(Vec::new()));
    let err = go(&gw, job(1, ImageSize::Square, &saved))
        .await
        .unwrap_err();
    let EngineError::GenerationFailed(msg) = err else {
        panic!("{err:?}")
    };
    assert!(
        msg.contains("could not be downloaded") && msg.contains("404"),
        "{msg}"
    );
    assert_eq!(fal.seen_at("GET", "/files/req-0/0.png").len(), 3);
}

#[tokio::test]
async fn a_provider_that_hangs_past_the_task_timeout_fails_the_task_and_is_cancelled() {
    let fal = StandIn::start().await;
    fal.script(|s| s.hold = true);
    let mut cfg = provider(Kind::Fal, &fal.base);
    cfg.task_timeout = Duration::from_millis(800);
    let gw = gateway(vec![(Kind::Fal, cfg)]);
    let saved = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let err = go(&gw, job(1, ImageSize::Square, &saved))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let EngineError::GenerationFailed(msg) = err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("engine.fal.task_timeout_s"), "{msg}");
    assert_eq!(
        fal.fal_cancels().len(),
        1,
        "the provider's request is cancelled"
    );

    // A status request that never answers is bounded by the request timeout too.
    let fal = StandIn::start().await;
    fal.script(|s| s.fal_status.push_back(Reply::Hang));
    let mut cfg = provider(Kind::Fal, &fal.base);
    cfg.request_timeout = Duration::from_millis(300);
    let gw = gateway(vec![(Kind::Fal, cfg)]);
    let images = go(&gw, job(1, ImageSize::Square, &saved)).await.unwrap();
    assert_eq!(
        images.len(),
        1,
        "the hung status request timed out and was retried"
    );
}

#[tokio::test]
async fn a_cancelled_task_stops_at_once_and_abandon_cancels_the_queued_request() {
    let fal = StandIn::start().await;
    fal.script(|s| s.fal_sequence = vec!["IN_QUEUE:5".into()]);
    let gw = Arc::new(only(Kind::Fal, &fal));
    let saved = Arc::new(Mutex::new(Vec::new()));
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let (gw, j, c) = (
            gw.clone(),
            job(1, ImageSize::Square, &saved),
            cancel.clone(),
        );
        async move { gw.generate(j, progress_log().0, c).await }
    });
    while fal.status_polls("req-0") < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    let out = tokio::time::timeout(Duration::from_secs(2), run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.unwrap_err(), EngineError::Cancelled);
    assert!(
        fal.fal_cancels().is_empty(),
        "the engine alone does not cancel: the worker decides"
    );
    let handle = saved.lock().unwrap()[0].clone();
    gw.abandon(&handle).await;
    let cancels = fal.fal_cancels();
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].path, "/fal-ai/ideogram/requests/req-0/cancel");
    assert_eq!(
        cancels[0].header("authorization").unwrap(),
        format!("Key {FAL_KEY}")
    );
}

#[tokio::test]
async fn a_recorded_request_is_resumed_never_submitted_again() {
    let fal = StandIn::start().await;
    let gw = only(Kind::Fal, &fal);
    let saved = Arc::new(Mutex::new(Vec::new()));
    fal.script(|s| s.hold = true);
    let first = tokio::spawn({
        let j = job(1, ImageSize::Square, &saved);
        let gw = only(Kind::Fal, &fal);
        async move { go(&gw, j).await }
    });
    while fal.status_polls("req-0") < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The first worker dies here.
    first.abort();
    fal.script(|s| s.hold = false);
    let mut j = job(1, ImageSize::Square, &saved);
    j.upstream.resume = Some(saved.lock().unwrap()[0].clone());
    let images = go(&gw, j).await.unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(fal.fal_submits().len(), 1, "submitted once");
    assert_eq!(saved.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn ideogram_gets_the_files_and_the_documented_parts() {
    let ideo = StandIn::start().await;
    ideo.script(|s| s.result_size = (896, 1152));
    let gw = only(Kind::Ideogram, &ideo);
    let saved = Arc::new(Mutex::new(Vec::new()));
    let images = go(&gw, job(2, ImageSize::Portrait4_3, &saved))
        .await
        .unwrap();
    let reqs = ideo.ideogram_requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.header("api-key").unwrap(), IDEOGRAM_KEY);
    assert!(r.header("authorization").is_none());
    let text = |n: &str| r.part(n).unwrap_or_else(|| panic!("part {n}")).text();
    assert_eq!(text("prompt"), "a knight in a kitchen");
    assert_eq!(text("image_weight"), "80");
    assert_eq!(text("aspect_ratio"), "3x4");
    assert_eq!(text("rendering_speed"), "DEFAULT");
    assert_eq!(text("magic_prompt"), "ON");
    assert_eq!(text("style_type"), "AUTO");
    assert_eq!(text("num_images"), "2");
    assert_eq!(text("seed"), "77");
    assert_eq!(text("negative_prompt"), "blurry");
    let image = r.part("image").unwrap();
    assert_eq!(&image.bytes[..], samples::COFFEE_WEBP);
    assert_eq!(image.content_type.as_deref(), Some("image/webp"));
    assert_eq!(
        &r.part("character_reference_images").unwrap().bytes[..],
        samples::ASTRONAUT_WEBP
    );
    let styles = r.parts_named("style_reference_images");
    assert_eq!(styles.len(), 2);
    assert_eq!(&styles[1].bytes[..], samples::ASTRONAUT_WEBP);
    // The mask: one channel, the reference's size.
    let mask =
        image::load_from_memory(&r.part("character_reference_images_mask").unwrap().bytes).unwrap();
    let reference = image::load_from_memory(samples::ASTRONAUT_WEBP).unwrap();
    assert_eq!(mask.color(), image::ColorType::L8);
    assert_eq!(
        (mask.width(), mask.height()),
        (reference.width(), reference.height())
    );

    assert_eq!(images.len(), 2);
    for (i, img) in images.iter().enumerate() {
        assert_eq!((img.width, img.height), (768, 1024), "the preset's pixels");
        let decoded = image::load_from_memory(&img.bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (768, 1024));
        let p = img.provider.as_ref().unwrap();
        assert_eq!(
            (p.provider.as_str(), p.width, p.height, p.seed),
            ("ideogram", 896, 1152, Some(7 + i as u64))
        );
    }
    assert!(
        saved.lock().unwrap().is_empty(),
        "Ideogram gives no request id to record"
    );
}

#[tokio::test]
async fn ideogram_unsafe_images_and_refusals_fail_the_task_with_a_sentence() {
    let ideo = StandIn::start().await;
    ideo.script(|s| s.unsafe_images = true);
    let gw = only(Kind::Ideogram, &ideo);
    let saved = Arc::new(Mutex::new(Vec::new()));
    let err = go(&gw, job(1, ImageSize::Square, &saved))
        .await
        .unwrap_err();
    let EngineError::BadInput(msg) = err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("safety check"), "{msg}");

    ideo.script(|s| {
        s.unsafe_images = false;
        s.ideogram.push_back(Reply::Status(
            422,
            json!({"error": "Prompt or provided image failed the safety checks"}),
            None,
        ));
    });
    let err = go(&gw, job(1, ImageSize::Square, &saved))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        EngineError::BadInput(
            "Ideogram refused the task: Prompt or provided image failed the safety checks".into()
        )
    );

    // A refused key makes the provider unavailable (another may serve), and says which setting.
    ideo.script(|s| {
        s.ideogram
            .push_back(Reply::Status(401, json!({"error": "bad key"}), None))
    });
    let err = go(&gw, job(1, ImageSize::Square, &saved))
        .await
        .unwrap_err();
    let EngineError::Unavailable(msg) = err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("engine.ideogram.key"), "{msg}");
}

/// The provider the images of a run came from.
fn served_by(images: &[remixd_engine::EngineImage]) -> String {
    images[0].provider.as_ref().unwrap().provider.clone()
}

#[tokio::test]
async fn failover_moves_tasks_to_the_next_provider_and_the_breaker_probes_after_its_cooldown() {
    let ideo = StandIn::start().await;
    async fn run(gw: &Gateway) -> Result<Vec<remixd_engine::EngineImage>, EngineError> {
        let saved = Arc::new(Mutex::new(Vec::new()));
        let j = job(1, ImageSize::Square, &saved);
        go(gw, j).await
    }

    // Cool-downs of 2 s: long enough that a slow machine does not end one between two
    // runs that must both see the circuit open.
    // Phase 1: fal refuses connections.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut down = provider(Kind::Fal, &dead);
    down.retries = 1;
    down.breaker_failures = 2;
    down.breaker_cooldown = Duration::from_millis(2000);
    let gw = gateway(vec![
        (Kind::Fal, down),
        (Kind::Ideogram, provider(Kind::Ideogram, &ideo.base)),
    ]);
    for _ in 0..3 {
        assert_eq!(served_by(&run(&gw).await.unwrap()), "ideogram");
    }
    assert!(gw.circuit_open(Kind::Fal));

    // Phase 2: fal answers 503s.
    let fal = StandIn::start().await;
    fal.script(|s| {
        for _ in 0..100 {
            s.fal_submit.push_back(Reply::Status(
                503,
                json!({"detail": "runner unavailable"}),
                None,
            ));
        }
    });
    let mut flaky = provider(Kind::Fal, &fal.base);
    flaky.retries = 1;
    flaky.breaker_failures = 2;
    flaky.breaker_cooldown = Duration::from_millis(2000);
    let gw = gateway(vec![
        (Kind::Fal, flaky),
        (Kind::Ideogram, provider(Kind::Ideogram, &ideo.base)),
    ]);
    for _ in 0..2 {
        assert_eq!(served_by(&run(&gw).await.unwrap()), "ideogram");
    }
    assert_eq!(
        fal.fal_submits().len(),
        4,
        "two tasks, each tried and retried once"
    );
    assert!(gw.circuit_open(Kind::Fal));
    assert_eq!(served_by(&run(&gw).await.unwrap()), "ideogram");
    assert_eq!(fal.fal_submits().len(), 4, "the open circuit skips fal");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(served_by(&run(&gw).await.unwrap()), "ideogram");
    assert_eq!(
        fal.fal_submits().len(),
        6,
        "one probe (with its retry) after the cool-down"
    );
    assert_eq!(served_by(&run(&gw).await.unwrap()), "ideogram");
    assert_eq!(
        fal.fal_submits().len(),
        6,
        "the failed probe opened it again"
    );

    // fal recovers: the next probe succeeds and closes the circuit.
    fal.script(|s| s.fal_submit.clear());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(served_by(&run(&gw).await.unwrap()), "fal");
    assert!(!gw.circuit_open(Kind::Fal));
    assert_eq!(served_by(&run(&gw).await.unwrap()), "fal");

    // Every provider down: the task is unavailable (retried later), each reason named.
    let gw = gateway(vec![
        (Kind::Fal, provider(Kind::Fal, &dead)),
        (Kind::Ideogram, provider(Kind::Ideogram, &dead)),
    ]);
    let err = run(&gw).await.unwrap_err();
    let EngineError::Unavailable(msg) = err else {
        panic!("{err:?}")
    };
    assert!(
        msg.starts_with("fal: submit failed: could not connect")
            && msg.contains("; Ideogram: remix failed: could not connect"),
        "{msg}"
    );
}

#[tokio::test]
async fn engines_check_tells_a_refused_key_from_an_accepted_one() {
    let fal = StandIn::start().await;
    let gw = gateway(vec![
        (Kind::Fal, provider(Kind::Fal, &fal.base)),
        (Kind::Ideogram, provider(Kind::Ideogram, &fal.base)),
    ]);
    let out = gw.check().await;
    assert_eq!(out.len(), 2);
    let (k, r) = &out[0];
    assert_eq!(*k, Kind::Fal);
    assert!(
        r.as_ref().unwrap().contains("key accepted (HTTP 404"),
        "{r:?}"
    );
    let seen = fal.seen_at("GET", "/fal-ai/ideogram/requests/");
    assert_eq!(
        seen[0].header("authorization").unwrap(),
        format!("Key {FAL_KEY}")
    );
    // The stand-in's Ideogram answers any remix; a real one refuses the image-less
    // request with 400, which reads the same way.
    assert!(out[1].1.is_ok(), "{:?}", out[1]);
    fal.script(|s| {
        s.ideogram
            .push_back(Reply::Status(401, json!({"error": "no"}), None))
    });
    let out = gw.check().await;
    assert!(out[1]
        .1
        .as_ref()
        .unwrap_err()
        .contains("key was refused (HTTP 401)"));
}

#[tokio::test]
async fn inputs_with_an_exif_rotation_reach_the_provider_upright() {
    use remixd_testkit::exif::{encode_with_exif, exif_orientation};
    // Stored 40×20, shown 20×40 (orientation 6: rotate 90° clockwise).
    let stored = image::RgbImage::from_fn(40, 20, |x, _| image::Rgb([(x * 6) as u8, 0, 0]));
    let jpeg: &'static [u8] = Box::leak(
        encode_with_exif(&stored, image::ImageFormat::Jpeg, Some(exif_orientation(6)))
            .into_boxed_slice(),
    );
    let with_rotated_base = |saved| {
        let mut j = job(1, ImageSize::Square, saved);
        j.upstream.sources[0].bytes = Bytes::from_static(jpeg);
        j
    };
    let saved = Arc::new(Mutex::new(Vec::new()));

    let fal = StandIn::start().await;
    let gw = only(Kind::Fal, &fal);
    go(&gw, with_rotated_base(&saved)).await.unwrap();
    let sent = fal.fal_submits()[0].json.clone().unwrap();
    let uri = sent["image_url"].as_str().unwrap();
    let b64 = uri.strip_prefix("data:image/png;base64,").expect(uri);
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let shown = image::load_from_memory(&png).unwrap();
    assert_eq!((shown.width(), shown.height()), (20, 40), "upright");
    assert_eq!(
        sent["reference_image_urls"],
        json!(["https://img.example/char.webp"]),
        "inputs without a rotation go as they are"
    );

    let ideo = StandIn::start().await;
    let gw = only(Kind::Ideogram, &ideo);
    go(&gw, with_rotated_base(&saved)).await.unwrap();
    let part = ideo.ideogram_requests()[0].part("image").unwrap().clone();
    assert_eq!(part.content_type.as_deref(), Some("image/png"));
    let shown = image::load_from_memory(&part.bytes).unwrap();
    assert_eq!((shown.width(), shown.height()), (20, 40), "upright");
}
