//! The four schedulers against the reference tensors of both tiny models
//! (tests/fixtures/README.md): each is built from the model's own
//! `scheduler/scheduler_config.json` with the class swapped, set to 10 steps at img2img
//! strength 0.6, then checked on its timesteps, sigmas, `init_noise_sigma`, `add_noise`
//! at the first kept timestep, and three consecutive steps (`scale_model_input` and the
//! step's output; the DPM solver carries its history between them).
//!
//! Tolerance, elementwise: `|ours - reference| <= 1e-5 + 1e-4 * |reference|`.

use crate::common;

use std::collections::HashMap;

use common::fixtures;

use candle_core::{Device, Tensor};
use remixd_diffusion::scheduler::{build, SchedulerConfig, SchedulerKind};
use serde_json::Value;

const MODELS: [&str; 2] = ["tiny-sd1", "tiny-sd2"];
const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;

fn load(model: &str) -> (HashMap<String, Tensor>, Value) {
    (common::reference(model), common::sidecar(model))
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Asserts `|got - want| <= ATOL + RTOL * |want|` everywhere, reporting the worst element.
fn assert_close_values(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= ATOL + RTOL * w.abs(),
            "{what}: element {i}: {g} vs reference {w} (tolerance {ATOL} + {RTOL} * |ref|)"
        );
    }
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_close_values(what, &values(got), &values(want));
}

#[test]
fn schedulers_match_reference_for_both_models() {
    for model in MODELS {
        let (r, meta) = load(model);
        let get = |name: &str| {
            r.get(name)
                .unwrap_or_else(|| panic!("{model}: reference tensor {name} missing"))
        };
        let cfg = SchedulerConfig::load(
            &fixtures()
                .join(model)
                .join("scheduler")
                .join("scheduler_config.json"),
        )
        .unwrap();
        for kind in SchedulerKind::ALL {
            let s = kind.short_name();
            let entry = &meta["sched"][s];
            assert_eq!(entry["class"].as_str().unwrap(), kind.class_name());
            let steps = entry["num_inference_steps"].as_u64().unwrap() as usize;
            let strength = entry["strength"].as_f64().unwrap();
            let mut sched = build(&cfg, kind, steps, strength).unwrap();
            let tag = format!("{model} {s}");

            assert_close_values(
                &format!("{tag} timesteps"),
                sched.timesteps(),
                &values(get(&format!("sched.{s}.timesteps"))),
            );
            match r.get(&format!("sched.{s}.sigmas")) {
                Some(want) => assert_close_values(
                    &format!("{tag} sigmas"),
                    sched.sigmas().expect("sigma schedule"),
                    &values(want),
                ),
                None => assert_eq!(kind, SchedulerKind::Ddim, "{tag}: no reference sigmas"),
            }
            let init = entry["init_noise_sigma"].as_f64().unwrap();
            assert_close_values(
                &format!("{tag} init_noise_sigma"),
                &[sched.init_noise_sigma()],
                &[init],
            );

            let noised = sched
                .add_noise(
                    get(&format!("sched.{s}.add_noise.original")),
                    get(&format!("sched.{s}.add_noise.noise")),
                    0,
                )
                .unwrap();
            assert_close(
                &format!("{tag} add_noise"),
                &noised,
                get(&format!("sched.{s}.add_noise.out")),
            );

            let mut sample = noised;
            for k in 0..3 {
                let p = format!("sched.{s}.step{k}");
                let want_sample = get(&format!("{p}.sample"));
                assert_close(&format!("{tag} step {k} input"), &sample, want_sample);
                let scaled = sched.scale_model_input(want_sample, k).unwrap();
                assert_close(
                    &format!("{tag} step {k} scale_model_input"),
                    &scaled,
                    get(&format!("{p}.scaled")),
                );
                let noise = r.get(&format!("{p}.noise"));
                assert_eq!(sched.needs_noise(), noise.is_some(), "{tag}: noise use");
                let prev = sched
                    .step(get(&format!("{p}.model_output")), k, want_sample, noise)
                    .unwrap();
                assert_close(
                    &format!("{tag} step {k} prev_sample"),
                    &prev,
                    get(&format!("{p}.prev")),
                );
                sample = prev;
            }
        }
    }
}

#[test]
fn model_configs_pick_the_expected_kind() {
    let kind_of = |model: &str| {
        let cfg = SchedulerConfig::load(
            &fixtures()
                .join(model)
                .join("scheduler")
                .join("scheduler_config.json"),
        )
        .unwrap();
        SchedulerKind::for_config(&cfg).unwrap()
    };
    // SD 1.x ships a PNDM config, which runs as DDIM; the SD 2.x fixture is Euler.
    assert_eq!(kind_of("tiny-sd1"), SchedulerKind::Ddim);
    assert_eq!(kind_of("tiny-sd2"), SchedulerKind::Euler);
}

#[test]
fn multistep_solver_must_be_stepped_in_order() {
    let cfg = SchedulerConfig::default();
    let mut sched = build(&cfg, SchedulerKind::DpmPp2M, 10, 1.0).unwrap();
    let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(sched.step(&x, 1, &x, None).is_err());
    sched.step(&x, 0, &x, None).unwrap();
    assert!(sched.step(&x, 10, &x, None).is_err());
    // The ancestral scheduler refuses to step without noise.
    let mut sched = build(&cfg, SchedulerKind::EulerAncestral, 10, 1.0).unwrap();
    assert!(sched.step(&x, 0, &x, None).is_err());
}
