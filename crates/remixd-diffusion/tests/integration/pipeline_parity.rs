//! Whole img2img runs against diffusers' `StableDiffusionImg2ImgPipeline`: the fixture
//! model loaded through the real loader, the reference's random draws replayed, and the
//! final latents and decoded pixels compared (`img2img.*` in the fixtures).
//!
//! Tolerance: 1e-4 relative to each tensor's scale, as for the single modules, although a
//! run chains the text encoder, several UNet passes, guidance, the scheduler and the VAE
//! (measured: at most 4e-5 absolute on latents of scale 4 to 11, i.e. about 1e-5
//! relative). A wrong step, order of draws or guidance formula is off by order 1.

use crate::common;

use candle_core::{Device, Tensor};
use common::{assert_close, model_dir, reference, sidecar};
use remixd_diffusion::model::StableDiffusion;
use remixd_diffusion::noise::ReplayNoise;
use remixd_diffusion::pipeline::{tensor_to_image, Img2ImgParams};
use remixd_diffusion::scheduler::SchedulerKind;

fn run(model: &str, case: &str, kind: SchedulerKind) {
    let sd = StableDiffusion::load(&model_dir(model), &Device::Cpu).expect("load model");
    let r = reference(model);
    let meta = sidecar(model);
    let run = &meta["img2img"][case];
    let text = &meta["text"];
    let draws = run["noise_draws"]
        .as_array()
        .expect("noise_draws")
        .iter()
        .map(|d| r[d["name"].as_str().unwrap()].clone())
        .collect::<Vec<Tensor>>();
    let mut noise = ReplayNoise::new(draws);
    let params = Img2ImgParams {
        prompt: text["prompt"].as_str().unwrap().to_owned(),
        negative_prompt: text["negative_prompt"].as_str().unwrap().to_owned(),
        steps: run["num_inference_steps"].as_u64().unwrap() as usize,
        strength: run["strength"].as_f64().unwrap(),
        guidance_scale: run["guidance_scale"].as_f64().unwrap(),
        scheduler: kind,
    };
    let mut seen = Vec::new();
    let out = sd
        .img2img(
            &r[&format!("img2img.{case}.image")],
            &params,
            &mut noise,
            &mut |done, total| {
                seen.push((done, total));
                true
            },
        )
        .expect("img2img");
    let steps = run["timesteps"].as_array().unwrap().len();
    assert_eq!(out.steps_run, steps, "{model} {case}: steps run");
    assert_eq!(
        seen,
        (1..=steps).map(|i| (i, steps)).collect::<Vec<_>>(),
        "progress is reported after every step"
    );
    assert_eq!(
        noise.remaining(),
        0,
        "{model} {case}: every recorded draw was used"
    );
    let name = |what: &str| format!("{model} img2img.{case}.{what}");
    assert_close(
        &name("latents"),
        &out.latents,
        &r[&format!("img2img.{case}.latents")],
        1e-4,
    );
    assert_close(
        &name("decoded"),
        &out.decoded,
        &r[&format!("img2img.{case}.decoded")],
        1e-4,
    );
    // The pixels a user gets: decoded and rounded as diffusers rounds, within one level.
    let (ours, _) = tensor_to_image(&out.decoded).unwrap();
    let (theirs, _) = tensor_to_image(&r[&format!("img2img.{case}.decoded")]).unwrap();
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "{}: pixels differ by {worst} levels",
        name("pixels")
    );
}

#[test]
fn tiny_sd1_ddim_run_matches_diffusers() {
    run("tiny-sd1", "ddim", SchedulerKind::Ddim);
}

#[test]
fn tiny_sd1_euler_run_matches_diffusers() {
    run("tiny-sd1", "euler", SchedulerKind::Euler);
}

#[test]
fn tiny_sd1_euler_ancestral_run_matches_diffusers() {
    run("tiny-sd1", "euler_a", SchedulerKind::EulerAncestral);
}

#[test]
fn tiny_sd1_dpmpp_2m_run_matches_diffusers() {
    run("tiny-sd1", "dpmpp_2m", SchedulerKind::DpmPp2M);
}

#[test]
fn tiny_sd2_ddim_run_matches_diffusers() {
    run("tiny-sd2", "ddim", SchedulerKind::Ddim);
}

#[test]
fn tiny_sd2_euler_run_matches_diffusers() {
    run("tiny-sd2", "euler", SchedulerKind::Euler);
}

#[test]
fn tiny_sd2_euler_ancestral_run_matches_diffusers() {
    run("tiny-sd2", "euler_a", SchedulerKind::EulerAncestral);
}

#[test]
fn tiny_sd2_dpmpp_2m_run_matches_diffusers() {
    run("tiny-sd2", "dpmpp_2m", SchedulerKind::DpmPp2M);
}

#[test]
fn tiny_sd2_turbo_run_without_guidance_matches_diffusers() {
    run("tiny-sd2", "turbo", SchedulerKind::Euler);
}

#[test]
fn a_run_stops_between_steps_when_asked() {
    let sd = StableDiffusion::load(&model_dir("tiny-sd1"), &Device::Cpu).unwrap();
    let r = reference("tiny-sd1");
    let params = Img2ImgParams {
        prompt: "a cat".into(),
        negative_prompt: String::new(),
        steps: 10,
        strength: 1.0,
        guidance_scale: 7.5,
        scheduler: SchedulerKind::Ddim,
    };
    let mut calls = 0;
    let mut noise = remixd_diffusion::noise::SeededNoise::new(1);
    let err = sd
        .img2img(
            &r["img2img.ddim.image"],
            &params,
            &mut noise,
            &mut |done, _| {
                calls += 1;
                done < 2
            },
        )
        .err()
        .expect("cancelled");
    assert!(matches!(err, remixd_diffusion::Error::Cancelled), "{err}");
    assert_eq!(calls, 2, "no step runs after the stop");
}
