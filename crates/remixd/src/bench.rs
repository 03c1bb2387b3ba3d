//! `remixd bench …`: measurements that print figures and assert nothing.
//!
//! - `bench preview`: the preview engine's time per image, render and PNG encoding apart.
//! - `bench queue`: tasks created and claims taken per second on the configured database.
//! - `bench callbacks`: callback latency from task completion to receipt (p50/p99), and
//!   the deliveries per second the deliverer sustains, against a receiver on loopback.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::demo::{serve_samples, BASE, CHARACTER, MASK};
use crate::settings::Settings;
use crate::Role;

/// Prints the preview engine's time per image (render, and PNG encoding apart): each
/// rendering speed with a mask, then the heaviest looks (a style with two style images).
pub fn preview(size: &str, iterations: u32) -> anyhow::Result<()> {
    use remixd_domain::{ImageSize, NumImages, RenderingSpeed, Seed, Strength, Style};
    let size = ImageSize::parse(size).map_err(|e| anyhow::anyhow!("--size {e}"))?;
    let decode =
        |b: &[u8]| remixd_fetch::decode_rgb(b, 40_000_000).map_err(|e| anyhow::anyhow!("{e}"));
    let job = |speed: RenderingSpeed, style: Style, style_images| -> anyhow::Result<_> {
        Ok(remixd_engine::Job {
            task_id: "bench".into(),
            base: decode(BASE)?,
            character: decode(CHARACTER)?,
            mask: Some(
                remixd_fetch::decode_luma(MASK, 40_000_000).map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            style_images,
            prompt: "bench".into(),
            negative_prompt: String::new(),
            expand_prompt: false,
            size,
            num_images: NumImages::new(1).expect("1 is valid"),
            seed: Seed::new(1).expect("1 is valid"),
            strength: Strength::new(0.6).expect("0.6 is valid"),
            style,
            rendering_speed: speed,
            upstream: Default::default(),
        })
    };
    let two_styles = || -> anyhow::Result<_> { Ok(vec![decode(BASE)?, decode(CHARACTER)?]) };
    let cases = [
        ("TURBO", job(RenderingSpeed::Turbo, Style::Auto, vec![])?),
        (
            "BALANCED",
            job(RenderingSpeed::Balanced, Style::Auto, vec![])?,
        ),
        (
            "QUALITY",
            job(RenderingSpeed::Quality, Style::Auto, vec![])?,
        ),
        (
            "QUALITY, FICTION, 2 style images",
            job(RenderingSpeed::Quality, Style::Fiction, two_styles()?)?,
        ),
        (
            "QUALITY, REALISTIC, 2 style images",
            job(RenderingSpeed::Quality, Style::Realistic, two_styles()?)?,
        ),
    ];
    let (w, h) = size.dimensions();
    for (name, job) in cases {
        let _ = remixd_engine::preview::render(&job, 0); // warm-up
        let mut times: Vec<f64> = (0..iterations.max(1))
            .map(|i| {
                let t = Instant::now();
                std::hint::black_box(remixd_engine::preview::render(&job, i));
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let img = remixd_engine::preview::render(&job, 0);
        let t = Instant::now();
        for _ in 0..iterations.max(1) {
            std::hint::black_box(remixd_engine::preview::encode_png(&img));
        }
        let encode_ms = t.elapsed().as_secs_f64() * 1000.0 / iterations.max(1) as f64;
        println!(
            "preview {w}x{h} {name:<34} render {:7.2} ms/image (median; fastest {:.2})   png encode {encode_ms:7.2} ms/image   ({iterations} iterations, one core)",
            times[times.len() / 2],
            times[0]
        );
    }
    Ok(())
}

/// What the loopback receiver saw: (arrival ms, completeTime ms, webhook-id, attempt was answered 200).
type Seen = Arc<Mutex<Vec<(i64, i64, String, bool)>>>;

async fn receiver(shutdown: CancellationToken) -> anyhow::Result<(String, Seen)> {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    let seen: Seen = Arc::default();
    let first_failed: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/{mode}",
            axum::routing::post(
                |State((seen, failed)): State<(
                    Seen,
                    Arc<Mutex<std::collections::HashSet<String>>>,
                )>,
                 Path(mode): Path<String>,
                 headers: HeaderMap,
                 body: bytes::Bytes| async move {
                    let now = remixd_domain::now_millis();
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let complete = v["data"]["completeTime"].as_i64().unwrap_or(0);
                    let id = headers
                        .get("webhook-id")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    // "flaky": the first attempt of each delivery fails, so all retries fall due together.
                    let ok = mode != "flaky" || !failed.lock().expect("lock").insert(id.clone());
                    seen.lock().expect("lock").push((now, complete, id, ok));
                    if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                },
            ),
        )
        .with_state((seen.clone(), first_failed));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", l.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(l, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((url, seen))
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Measures callback latency and the deliverer's sustained rate.
pub async fn callbacks(mut settings: Settings, tasks: usize) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    settings.data_dir = data.path().to_path_buf();
    settings.database.url = None;
    settings.storage.url = None;
    settings.server.public_url = None;
    settings.fetch.allow = vec!["127.0.0.1/32".into()];
    settings.limits.create_per_10s = 1_000_000;
    settings.limits.query_per_s = 1_000_000;
    settings.worker.poll_ms = 100;
    // One retry, long after the first attempt (phase 2 makes them due by hand).
    settings.callbacks.retry_schedule_ms = vec![3_600_000];
    let shutdown = CancellationToken::new();
    let samples = serve_samples(shutdown.clone()).await?;
    let (rx, seen) = receiver(shutdown.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(crate::launch_with_listener(
        settings.clone(),
        listener,
        Role::All,
        server_stop.clone(),
    ));
    crate::submit::Client::new(&base, "")?
        .wait_ready(Duration::from_secs(30))
        .await?;
    let store = crate::open_store(&settings).await?;
    store.add_credits("default", 100_000_000).await?;
    let key = std::fs::read_to_string(settings.data_dir.join("default.key"))?
        .trim()
        .to_string();
    let client = crate::submit::Client::new(&base, &key)?;
    let create = |body: Value| {
        let client = &client;
        async move { client.create(&body).await.map(drop) }
    };
    let wait_for = |n: usize, secs: u64| {
        let seen = seen.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            while seen.lock().expect("lock").len() < n {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "only {} of {n} callbacks arrived",
                    seen.lock().expect("lock").len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(())
        }
    };

    // Phase 1: latency from completion to receipt, on real preview tasks.
    for _ in 0..tasks {
        create(json!({
            "model": "ideogram/character-remix",
            "callBackUrl": format!("{rx}/ok"),
            "input": {"prompt": "bench", "image_url": format!("{samples}/coffee.webp"),
                      "reference_image_urls": [format!("{samples}/astronaut.webp")],
                      "image_size": "square", "rendering_speed": "TURBO"}
        }))
        .await?;
    }
    wait_for(tasks, 600).await?;
    let mut lat: Vec<i64> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|(at, done, _, _)| at - done)
        .collect();
    lat.sort_unstable();
    println!(
        "callback latency, completion to receipt, {tasks} tasks: p50 {} ms, p99 {} ms, max {} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0)
    );

    // Phase 2: throughput on a backlog. Every first attempt is refused and its retry is
    // scheduled far away; the server stops, an operator redelivers them all, and a new
    // server starts with the whole backlog due at once.
    seen.lock().expect("lock").clear();
    let burst = tasks * 4;
    for _ in 0..burst {
        create(json!({
            "model": "ideogram/character-remix",
            "callBackUrl": format!("{rx}/flaky"),
            "input": {"prompt": "bench", "image_url": "http://127.0.0.1:9/unreachable.png",
                      "reference_image_urls": [format!("{samples}/astronaut.webp")]}
        }))
        .await?;
    }
    wait_for(burst, 600).await?;
    server_stop.cancel();
    server.await.context("server task")??;
    let pending = store
        .list_deliveries(Some(remixd_store::DeliveryState::Pending), i64::MAX)
        .await?;
    anyhow::ensure!(
        pending.len() == burst,
        "{} of {burst} deliveries pending",
        pending.len()
    );
    for d in &pending {
        store.redeliver(&d.id, remixd_domain::now_millis()).await?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(crate::launch_with_listener(
        settings.clone(),
        listener,
        Role::All,
        server_stop.clone(),
    ));
    wait_for(burst * 2, 600).await?;
    let seen = seen.lock().expect("lock").clone();
    let retries: Vec<i64> = seen.iter().filter(|s| s.3).map(|s| s.0).collect();
    let (first, last) = (
        retries.iter().min().copied().unwrap_or(0),
        retries.iter().max().copied().unwrap_or(0),
    );
    let span = (last - first).max(1) as f64 / 1000.0;
    println!(
        "deliverer throughput on a due backlog: {} deliveries in {:.3} s = {:.0} deliveries/s (concurrency {})",
        retries.len(),
        span,
        retries.len() as f64 / span,
        settings.callbacks.concurrency
    );
    server_stop.cancel();
    server.await.context("server task")??;
    shutdown.cancel();
    Ok(())
}

/// A part of `bench flux2`; scripts/bench-flux2.sh times the same work on diffusers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flux2Part {
    /// The prompt's embeddings: chat template, 512 tokens, hidden states stacked.
    Text,
    /// One transformer forward for a 512² output with one 512² reference.
    Tr512,
    /// One transformer forward for a 1024² output with one 1024² reference.
    Tr1024,
    /// VAE encode of a 512² image (mode, patchify, normalise).
    #[value(name = "vae_encode")]
    VaeEncode,
    /// VAE decode of 64×64 latents.
    #[value(name = "vae_decode")]
    VaeDecode,
    /// A whole 4-step 512² remix with one 512² reference (loading excluded).
    Image,
}

/// The prompt every FLUX.2 part encodes.
const BENCH_PROMPT: &str =
    "a portrait of a knight in silver armor, dramatic lighting, highly detailed";

/// Times one part of a FLUX.2 [klein] model on the CPU, loading only the components the
/// part needs, and prints one JSON object: `part`, `seconds` (median of `repeats` after a
/// warm-up), `runs`, `peak_rss_mb` (this process's `VmHWM`, loading included), `compute_dtype`,
/// `weights_dtype`, `threads`.
pub fn flux2(model_dir: &std::path::Path, part: Flux2Part, repeats: usize) -> anyhow::Result<()> {
    use candle_core::{DType, Device, Tensor};
    use remixd_diffusion::flux2::pipeline::{image_ids, text_ids, RemixInputs, RemixParams};
    use remixd_diffusion::flux2::prompt::ChatPrompt;
    use remixd_diffusion::flux2::qwen3::Qwen3TextEncoder;
    use remixd_diffusion::flux2::transformer::Flux2Transformer;
    use remixd_diffusion::flux2::{Flux2Klein, DEFAULT_TEXT_LAYERS, MAX_SEQUENCE_LENGTH};
    use remixd_diffusion::noise::SeededNoise;
    use remixd_diffusion::vae::{patchify, AutoencoderKL};

    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    let err = |e: remixd_diffusion::Error| anyhow::anyhow!("{e}");
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1f32, shape, &dev);
    let mut runs = Vec::with_capacity(repeats);
    let mut timed = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        let t = Instant::now();
        f()?;
        eprintln!("warm-up: {:.3} s", t.elapsed().as_secs_f64());
        for _ in 0..repeats.max(1) {
            let t = Instant::now();
            f()?;
            runs.push(t.elapsed().as_secs_f64());
            eprintln!("run: {:.3} s", runs[runs.len() - 1]);
        }
        Ok(())
    };
    let t = Instant::now();
    let kept = |component: &str, stem: &str| -> anyhow::Result<&'static str> {
        let d = remixd_diffusion::model::kept_dtype(&model_dir.join(component), stem, DType::F32)
            .map_err(err)?;
        Ok(match d {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        })
    };
    let mut weights = "float32";
    match part {
        Flux2Part::Text => {
            let prompt = ChatPrompt::from_dir(&model_dir.join("tokenizer")).map_err(err)?;
            let enc = Qwen3TextEncoder::load(
                &model_dir.join("text_encoder"),
                &DEFAULT_TEXT_LAYERS,
                DType::F32,
                &dev,
            )
            .map_err(err)?;
            weights = kept("text_encoder", "model")?;
            eprintln!("loaded in {:.1} s", t.elapsed().as_secs_f64());
            timed(&mut || {
                let (ids, mask) = prompt
                    .encode(BENCH_PROMPT, MAX_SEQUENCE_LENGTH)
                    .map_err(err)?;
                std::hint::black_box(enc.hidden_states(&ids, &mask).map_err(err)?);
                Ok(())
            })?;
        }
        Flux2Part::Tr512 | Flux2Part::Tr1024 => {
            let side = if part == Flux2Part::Tr512 { 512 } else { 1024 };
            let tr = Flux2Transformer::load(&model_dir.join("transformer"), DType::F32, &dev)
                .map_err(err)?;
            weights = kept("transformer", "diffusion_pytorch_model")?;
            eprintln!("loaded in {:.1} s", t.elapsed().as_secs_f64());
            let cfg = tr.config();
            let g = side / 16;
            let hidden = randn(&[1, 3 * g * g, cfg.in_channels])?;
            let encoder = randn(&[1, MAX_SEQUENCE_LENGTH, cfg.joint_attention_dim])?;
            let ids = Tensor::cat(
                &[
                    image_ids(g, g, 0, &dev).map_err(err)?,
                    image_ids(g, g, 10, &dev).map_err(err)?,
                    image_ids(g, g, 20, &dev).map_err(err)?,
                ],
                0,
            )?;
            let txt = text_ids(MAX_SEQUENCE_LENGTH, &dev).map_err(err)?;
            timed(&mut || {
                std::hint::black_box(
                    tr.forward(&hidden, &encoder, 0.5, &ids, &txt, None)
                        .map_err(err)?,
                );
                Ok(())
            })?;
        }
        Flux2Part::VaeEncode | Flux2Part::VaeDecode => {
            let dir = model_dir.join("vae");
            let vae = AutoencoderKL::load(&dir, &dev).map_err(err)?;
            let stats = vae.latent_stats(&dir, &dev).map_err(err)?;
            eprintln!("loaded in {:.1} s", t.elapsed().as_secs_f64());
            if part == Flux2Part::VaeEncode {
                let image = randn(&[1, 3, 512, 512])?.clamp(-1f32, 1f32)?;
                timed(&mut || {
                    let (mode, _) = vae.encode(&image).map_err(err)?;
                    std::hint::black_box(stats.normalise(&patchify(&mode)?)?);
                    Ok(())
                })?;
            } else {
                let z = randn(&[1, vae.config().latent_channels, 64, 64])?;
                timed(&mut || {
                    std::hint::black_box(vae.decode(&z).map_err(err)?);
                    Ok(())
                })?;
            }
        }
        Flux2Part::Image => {
            let model = Flux2Klein::load(model_dir, &DEFAULT_TEXT_LAYERS, &dev).map_err(err)?;
            weights = kept("transformer", "diffusion_pytorch_model")?;
            eprintln!("loaded in {:.1} s", t.elapsed().as_secs_f64());
            let image = randn(&[1, 3, 512, 512])?.clamp(-1f32, 1f32)?;
            let reference = randn(&[1, 3, 512, 512])?.clamp(-1f32, 1f32)?;
            let references = [reference];
            let inputs = RemixInputs {
                image: &image,
                mask: None,
                references: &references,
            };
            let params = |steps| RemixParams {
                prompt: BENCH_PROMPT.into(),
                negative_prompt: String::new(),
                steps,
                strength: 1.0,
                guidance_scale: 1.0,
            };
            // A one-step warm-up, as the diffusers side's.
            let t = Instant::now();
            model
                .remix(
                    &inputs,
                    &params(1),
                    &mut SeededNoise::new(0),
                    &mut |_, _| true,
                )
                .map_err(err)?;
            eprintln!("warm-up (1 step): {:.3} s", t.elapsed().as_secs_f64());
            for _ in 0..repeats.max(1) {
                let t = Instant::now();
                let out = model
                    .remix(
                        &inputs,
                        &params(4),
                        &mut SeededNoise::new(1),
                        &mut |_, _| true,
                    )
                    .map_err(err)?;
                std::hint::black_box(out.decoded);
                runs.push(t.elapsed().as_secs_f64());
                eprintln!("run: {:.3} s", runs[runs.len() - 1]);
            }
        }
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let figures = json!({
        "impl": "remixd",
        "part": clap::ValueEnum::to_possible_value(&part).map(|v| v.get_name().to_owned()),
        "seconds": sorted[sorted.len() / 2],
        "runs": runs,
        "peak_rss_mb": crate::membench::rss_mib(std::process::id())?.1,
        "compute_dtype": "float32",
        "weights_dtype": weights,
        "threads": threads,
    });
    println!("{figures}");
    Ok(())
}

/// What `bench sd` measures.
pub struct SdBench {
    pub model_dir: std::path::PathBuf,
    pub steps: usize,
    pub strength: f64,
    pub repeats: usize,
    /// The parts to measure; empty means all.
    pub only: Vec<SdPart>,
}

/// A part of `bench sd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SdPart {
    /// One UNet pass at batch 1 and at batch 2.
    Unet,
    /// VAE encode and decode.
    Vae,
    /// A whole img2img image.
    Image,
    /// The optimised convolution and attention against the paths they replace.
    Kernels,
    /// candle's f32 matrix-product peak.
    Matmul,
}

/// Times the local engine's model on the CPU: one UNet pass at batch 1 and 2, the VAE
/// encode and decode, a whole img2img image, and candle's f32 matrix-product peak.
/// Prints one JSON object (scripts/bench-sd.sh sets it beside diffusers' figures).
pub fn sd(b: SdBench) -> anyhow::Result<()> {
    use candle_core::{DType, Device, Tensor};
    use remixd_diffusion::model::StableDiffusion;
    use remixd_diffusion::noise::SeededNoise;
    use remixd_diffusion::pipeline::Img2ImgParams;
    use remixd_diffusion::scheduler::SchedulerKind;

    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    let t = Instant::now();
    let sd = StableDiffusion::load(&b.model_dir, &dev)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", b.model_dir.display()))?;
    eprintln!(
        "loaded in {:.1} s, {threads} threads",
        t.elapsed().as_secs_f64()
    );

    // Median seconds of `repeats` runs after one warm-up.
    let time = |name: &str, repeats: usize, f: &mut dyn FnMut() -> anyhow::Result<()>| {
        f()?;
        let mut runs = Vec::with_capacity(repeats);
        for _ in 0..repeats.max(1) {
            let t = Instant::now();
            f()?;
            runs.push(t.elapsed().as_secs_f64());
        }
        runs.sort_by(f64::total_cmp);
        let median = runs[runs.len() / 2];
        eprintln!("{name}: {median:.3} s (runs {runs:.3?})");
        anyhow::Ok(median)
    };
    let err = |e: remixd_diffusion::Error| anyhow::anyhow!("{e}");
    let side = sd.native_side() as usize;
    let latent = side / sd.vae.vae_scale_factor();
    let hidden = sd.encode_prompt("").map_err(err)?.dim(2)?;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1f32, shape, &dev);

    let want = |part: SdPart| b.only.is_empty() || b.only.contains(&part);
    let mut figures = serde_json::Map::new();
    figures.insert("impl".into(), json!("remixd"));
    figures.insert("threads".into(), json!(threads));
    let mut put = |key: &str, value: Value| figures.insert(key.into(), value);

    if want(SdPart::Unet) {
        for batch in [1, 2] {
            let x = randn(&[batch, 4, latent, latent])?;
            let ctx = randn(&[batch, 77, hidden])?;
            let s = time(&format!("unet batch {batch}"), b.repeats, &mut || {
                std::hint::black_box(sd.unet.forward(&x, 500.0, &ctx).map_err(err)?);
                Ok(())
            })?;
            put(&format!("unet_b{batch}_s"), json!(s));
        }
    }
    let image = randn(&[1, 3, side, side])?.clamp(-1f32, 1f32)?;
    if want(SdPart::Vae) {
        let s = time("vae encode", b.repeats, &mut || {
            std::hint::black_box(sd.vae.encode(&image).map_err(err)?);
            Ok(())
        })?;
        put("vae_encode_s", json!(s));
        let z = randn(&[1, 4, latent, latent])?;
        let s = time("vae decode", b.repeats, &mut || {
            std::hint::black_box(sd.vae.decode(&z).map_err(err)?);
            Ok(())
        })?;
        put("vae_decode_s", json!(s));
    }
    if want(SdPart::Image) {
        let params = Img2ImgParams {
            prompt: "a portrait of a knight".into(),
            negative_prompt: String::new(),
            steps: b.steps,
            strength: b.strength,
            guidance_scale: 7.5,
            scheduler: SchedulerKind::for_config(&sd.scheduler).map_err(err)?,
        };
        let mut passes = 0;
        let s = time("image", b.repeats.div_ceil(2), &mut || {
            let out = sd
                .img2img(&image, &params, &mut SeededNoise::new(1), &mut |_, _| true)
                .map_err(err)?;
            passes = out.steps_run;
            Ok(())
        })?;
        put("image_s", json!(s));
        put("image_unet_passes", json!(passes));
    }

    // The optimised kernels against the paths they replace, at SD 1.5's largest
    // shapes (512², guidance batch 2), in this same run.
    if want(SdPart::Kernels) {
        use candle_core::Module;
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let conv = remixd_diffusion::conv::Conv2d::new(vb, 320, 320, 3, 1, 1)?;
        let x = randn(&[2, 320, latent, latent])?;
        let s = time("conv 3x3 320ch, candle", b.repeats, &mut || {
            std::hint::black_box(conv.forward_candle(&x)?);
            Ok(())
        })?;
        put("conv3x3_320_candle_s", json!(s));
        let im2col = conv.clone().with_winograd_min_tiles(usize::MAX);
        let s = time("conv 3x3 320ch, im2col", b.repeats, &mut || {
            std::hint::black_box(im2col.forward(&x)?);
            Ok(())
        })?;
        put("conv3x3_320_im2col_s", json!(s));
        let winograd = conv.with_winograd_min_tiles(0);
        let s = time("conv 3x3 320ch, winograd", b.repeats, &mut || {
            std::hint::black_box(winograd.forward(&x)?);
            Ok(())
        })?;
        put("conv3x3_320_winograd_s", json!(s));

        use remixd_diffusion::attention::{materialized_attention, tiled_attention};
        let tokens = latent * latent;
        let (q, k, v) = (
            randn(&[2, tokens, 320])?,
            randn(&[2, tokens, 320])?,
            randn(&[2, tokens, 320])?,
        );
        let s = time("self-attention 8x40, materialised", b.repeats, &mut || {
            std::hint::black_box(materialized_attention(&q, &k, &v, 8)?);
            Ok(())
        })?;
        put("attention_4096_materialised_s", json!(s));
        let s = time("self-attention 8x40, tiled", b.repeats, &mut || {
            std::hint::black_box(tiled_attention(&q, &k, &v, 8)?);
            Ok(())
        })?;
        put("attention_4096_tiled_s", json!(s));
    }

    if want(SdPart::Matmul) {
        let n = 4096;
        let (a, c) = (randn(&[n, n])?, randn(&[n, n])?);
        let s = time("matmul 4096²", 3, &mut || {
            std::hint::black_box(a.matmul(&c)?.to_dtype(DType::F32)?);
            Ok(())
        })?;
        put("matmul_gflops", json!(2.0 * (n as f64).powi(3) / s / 1e9));
    }
    let figures = Value::Object(figures);
    println!("{figures}");
    Ok(())
}

/// A phase of `bench queue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueuePhase {
    /// Create the tasks (each reserving its credit, as createTask does).
    Fill,
    /// Claim ready tasks until none is left.
    Claim,
    /// Fill, then claim.
    Both,
    /// The shared rate counters alone: `tasks` checks spread over 100 keys, as many
    /// clients would make them (PostgreSQL only; SQLite keeps no shared counters).
    Rate,
}

/// The queue of the configured database, without HTTP or engines: `fill` creates
/// `tasks` tasks with `concurrency` creators at once (each reserves a credit, as
/// createTask does); `claim` has `concurrency` claimers walk tasks through both
/// stages as workers do (the fair fetch claim, inputs ready, the generate claim,
/// success: two claims per task) until none is left. Prints one JSON object per phase:
/// the tasks, the seconds, the rate, and the wall-clock bounds (`first_ms`, `last_ms`)
/// so that several processes claiming at once can be added up.
pub async fn queue(
    settings: Settings,
    tasks: usize,
    concurrency: usize,
    phase: QueuePhase,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    use remixd_domain::{now_millis, TaskId};
    let store = crate::open_store(&settings).await?;
    let database = crate::settings::redact_url(&settings.database_url());
    let concurrency = concurrency.max(1);
    let report = |phase: &str, n: usize, first: i64, last: i64| {
        let seconds = (last - first).max(1) as f64 / 1000.0;
        println!(
            "{}",
            json!({"phase": phase, "database": database, "count": n, "concurrency": concurrency,
                   "seconds": seconds, "per_s": n as f64 / seconds,
                   "first_ms": first, "last_ms": last})
        );
    };
    if phase == QueuePhase::Rate {
        let first = now_millis();
        let checks = futures::stream::iter(0..tasks)
            .map(|i| {
                let store = store.clone();
                // One request per key per 10 ms at most, a burst of 1000: every check
                // passes, so each is the one upsert a limited request costs.
                async move {
                    store
                        .rate_check(&format!("bench {}", i % 100), 10_000, 1000)
                        .await
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await;
        let last = now_millis();
        for c in checks {
            anyhow::ensure!(c?.is_some(), "{database} keeps no shared rate counters");
        }
        report("rate", tasks, first, last);
        return Ok(());
    }
    if phase != QueuePhase::Claim {
        let name = "bench-queue";
        let account = match store.account_by_name(name).await? {
            Some(a) => a,
            None => {
                store
                    .create_account(&crate::uuid_like(), name, 0, now_millis())
                    .await?
            }
        };
        store.add_credits(name, tasks as i64).await?;
        let (_, key) = remixd_api::auth::generate_key(name, "bench", Default::default());
        let key = store.create_key(key, now_millis()).await?;
        let input = remixd_domain::TaskInput {
            prompt: "bench".into(),
            image_url: "http://127.0.0.1:9/base.png".into(),
            reference_image_url: "http://127.0.0.1:9/character.png".into(),
            reference_mask_url: None,
            style_image_urls: vec![],
            rendering_speed: remixd_domain::RenderingSpeed::Turbo,
            style: remixd_domain::Style::Auto,
            expand_prompt: false,
            image_size: remixd_domain::ImageSize::Square,
            num_images: remixd_domain::NumImages::new(1).expect("1 is valid"),
            seed: remixd_domain::Seed::new(1).expect("1 is valid"),
            strength: remixd_domain::Strength::new(0.8).expect("0.8 is valid"),
            negative_prompt: String::new(),
        };
        let first = now_millis();
        let created = futures::stream::iter(0..tasks)
            .map(|_| {
                let task = remixd_store::NewTask {
                    id: TaskId::new(),
                    account_id: account.id.clone(),
                    key_id: key.id.clone(),
                    model: remixd_domain::MODEL_NAME.into(),
                    param: "{}".into(),
                    input: input.clone(),
                    callback_url: None,
                    cost: 1,
                    now: now_millis(),
                    idempotency: None,
                };
                let store = store.clone();
                async move { store.create_task(task).await }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await;
        let last = now_millis();
        for c in created {
            anyhow::ensure!(
                matches!(c?, remixd_store::CreateOutcome::Created { .. }),
                "a task was refused"
            );
        }
        report("fill", tasks, first, last);
    }
    if phase != QueuePhase::Fill {
        // Each claimer walks tasks through the queue as a worker does, with no work in
        // between: the fetch-stage claim, inputs ready, the generate-stage claim, success.
        let first = now_millis();
        let claimers = (0..concurrency).map(|i| {
            let store = store.clone();
            let owner = format!("bench-{}-{i}", std::process::id());
            async move {
                let (mut n, mut last) = (0usize, now_millis());
                loop {
                    let now = now_millis();
                    let fetched = store
                        .claim_fetch(&owner, now, now + 600_000, u32::MAX)
                        .await?;
                    if let Some(t) = &fetched {
                        anyhow::ensure!(store.inputs_ready(&t.id, &owner, now_millis()).await?);
                    }
                    // Another claimer may take this task's generate stage; this one
                    // finishes whichever it gets, and stops when neither stage has work.
                    let now = now_millis();
                    let generated = store
                        .claim(remixd_store::Stage::Generate, &owner, now, now + 600_000)
                        .await?;
                    if let Some(g) = &generated {
                        store.succeed(&g.id, &owner, "{}", now_millis()).await?;
                        n += 1;
                        last = now_millis();
                    }
                    if fetched.is_none() && generated.is_none() {
                        return Ok::<_, anyhow::Error>((n, last));
                    }
                }
            }
        });
        let mut total = 0;
        let mut last = first;
        for r in futures::future::join_all(claimers).await {
            let (n, l) = r?;
            total += n;
            last = last.max(l);
        }
        report("claim", total, first, last);
    }
    Ok(())
}
