//! FLUX.2 [klein]'s VAE, scheduler and whole pipeline runs against diffusers on the tiny
//! random-weight model (`tests/fixtures/tiny-flux2`, references in
//! `reference-tiny-flux2.*`): every tensor within 1e-4 of its scale, as the SD tests.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, reference, sidecar};
use remixd_diffusion::flux2::scheduler::{empirical_mu, FlowMatchConfig, Schedule};
use remixd_diffusion::vae::{patchify, AutoencoderKL};

const MODEL: &str = "tiny-flux2";

fn vae() -> (AutoencoderKL, remixd_diffusion::vae::LatentStats) {
    let dir = fixtures().join(MODEL).join("vae");
    let vae = AutoencoderKL::load(&dir, &Device::Cpu).expect("load vae");
    let stats = vae.latent_stats(&dir, &Device::Cpu).expect("batch norm");
    (vae, stats)
}

#[test]
fn vae_encode_mode_patchify_and_normalise_match_diffusers() {
    let r = reference(MODEL);
    let (vae, stats) = vae();
    let (mode, _) = vae.encode(&r["vae.image"]).unwrap();
    assert_close("vae.mode", &mode, &r["vae.mode"], 1e-4);
    let packed = stats.normalise(&patchify(&mode).unwrap()).unwrap();
    assert_close("vae.packed", &packed, &r["vae.packed"], 1e-4);
}

#[test]
fn vae_decode_matches_diffusers() {
    let r = reference(MODEL);
    let (vae, _) = vae();
    let decoded = vae.decode(&r["vae.mode"]).unwrap();
    assert_close("vae.decoded", &decoded, &r["vae.decoded"], 1e-4);
}

#[test]
fn scheduler_sigmas_and_timesteps_match_diffusers() {
    let cfg = FlowMatchConfig::load(
        &fixtures()
            .join(MODEL)
            .join("scheduler")
            .join("scheduler_config.json"),
    )
    .unwrap();
    let meta = sidecar(MODEL);
    let cases = meta["scheduler_cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let steps = case["steps"].as_u64().unwrap() as usize;
        let seq = case["image_seq_len"].as_u64().unwrap() as usize;
        let mu = empirical_mu(seq, steps);
        let want_mu = case["mu"].as_f64().unwrap();
        assert!(
            (mu - want_mu).abs() <= 1e-12 * want_mu.abs().max(1.0),
            "mu {steps} {seq}"
        );
        let s = Schedule::new(&cfg, steps, mu).unwrap();
        let floats = |k: &str| -> Vec<f32> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        };
        let (sigmas, timesteps) = (floats("sigmas"), floats("timesteps"));
        assert_eq!(s.sigmas.len(), sigmas.len());
        for (a, b) in s
            .sigmas
            .iter()
            .zip(&sigmas)
            .chain(s.timesteps.iter().zip(&timesteps))
        {
            // The same f32 arithmetic: equal, or a last-bit difference of exp().
            assert!(
                (a - b).abs() <= 2.0 * f32::EPSILON * b.abs(),
                "{steps} steps, {seq} tokens: {a} vs {b}"
            );
        }
    }
}

#[test]
fn patchified_shapes_follow_the_config() {
    let (vae, stats) = vae();
    assert_eq!(vae.vae_scale_factor(), 2);
    assert_eq!(stats.mean.dims(), &[1, 4, 1, 1]);
    let x = Tensor::zeros((1, 3, 8, 12), DType::F32, &Device::Cpu).unwrap();
    let (mode, _) = vae.encode(&x).unwrap();
    assert_eq!(patchify(&mode).unwrap().dims(), &[1, 4, 2, 3]);
}

mod runs {
    use super::*;
    use remixd_diffusion::flux2::pipeline::{RemixInputs, RemixParams};
    use remixd_diffusion::flux2::Flux2Klein;
    use remixd_diffusion::noise::{ReplayNoise, SeededNoise};
    use remixd_diffusion::pipeline::image_to_tensor;
    use remixd_diffusion::vae::unpatchify;
    use std::sync::OnceLock;

    fn model() -> &'static Flux2Klein {
        static LOADED: OnceLock<Flux2Klein> = OnceLock::new();
        LOADED.get_or_init(|| {
            let layers: Vec<usize> = sidecar(MODEL)["text_layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            Flux2Klein::load(&fixtures().join(MODEL), &layers, &Device::Cpu).expect("load")
        })
    }

    fn rgb(name: &str) -> Tensor {
        let img = image::open(fixtures().join(name)).unwrap().to_rgb8();
        image_to_tensor(img.as_raw(), img.dimensions(), &Device::Cpu).unwrap()
    }

    fn mask() -> Tensor {
        let img = image::open(fixtures().join("flux2-mask.png"))
            .unwrap()
            .to_luma8();
        let (w, h) = img.dimensions();
        let t =
            Tensor::from_vec(img.into_raw(), (1, 1, h as usize, w as usize), &Device::Cpu).unwrap();
        (t.to_dtype(DType::F32).unwrap() / 255.0).unwrap()
    }

    fn params(run: &serde_json::Value) -> RemixParams {
        let guidance = run["guidance_scale"].as_f64().unwrap();
        let meta = sidecar(MODEL);
        RemixParams {
            prompt: meta["prompt"].as_str().unwrap().into(),
            // The fixture passes the negative prompt's embeddings when it guides.
            negative_prompt: meta["negative_prompt"].as_str().unwrap().into(),
            steps: run["num_inference_steps"].as_u64().unwrap() as usize,
            strength: run["strength"].as_f64().unwrap(),
            guidance_scale: guidance,
        }
    }

    fn run_parity(name: &str) {
        let r = reference(MODEL);
        let meta = sidecar(MODEL);
        let run = &meta["runs"][name];
        let image = rgb("flux2-base.png");
        let references: Vec<Tensor> = if run["reference"].as_bool().unwrap() {
            vec![rgb("flux2-reference.png")]
        } else {
            vec![]
        };
        let m = mask();
        let inputs = RemixInputs {
            image: &image,
            mask: run["mask"].as_bool().unwrap().then_some(&m),
            references: &references,
        };
        let mut noise = ReplayNoise::new([r[&format!("run.{name}.noise.0")].clone()]);
        let mut steps = 0;
        let out = model()
            .remix(&inputs, &params(run), &mut noise, &mut |done, _| {
                steps = done;
                true
            })
            .expect("remix");
        let want_steps = run["timesteps_run"].as_array().unwrap().len();
        assert_eq!((out.steps_run, steps), (want_steps, want_steps));
        assert_close(
            &format!("run.{name}.latents"),
            &out.latents,
            &r[&format!("run.{name}.latents")],
            1e-4,
        );
        assert_close(
            &format!("run.{name}.decoded"),
            &out.decoded,
            &r[&format!("run.{name}.decoded")],
            1e-4,
        );
    }

    #[test]
    fn plain_img2img_without_a_reference_matches_diffusers() {
        run_parity("plain");
    }

    #[test]
    fn a_run_with_a_reference_matches_diffusers() {
        run_parity("ref");
    }

    #[test]
    fn a_masked_guided_run_with_a_reference_matches_diffusers() {
        run_parity("mask_cfg");
    }

    fn seeded(mask: Option<&Tensor>, seed: u64) -> Tensor {
        let image = rgb("flux2-base.png");
        let references = vec![rgb("flux2-reference.png")];
        let inputs = RemixInputs {
            image: &image,
            mask,
            references: &references,
        };
        let meta = sidecar(MODEL);
        let p = params(&meta["runs"]["mask_cfg"]);
        model()
            .remix(&inputs, &p, &mut SeededNoise::new(seed), &mut |_, _| true)
            .unwrap()
            .latents
    }

    fn bytes(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes() {
        assert_eq!(bytes(&seeded(None, 11)), bytes(&seeded(None, 11)));
        assert_ne!(bytes(&seeded(None, 11)), bytes(&seeded(None, 12)));
    }

    #[test]
    fn an_all_black_mask_leaves_the_base_latents_untouched() {
        let black = mask().zeros_like().unwrap();
        let out = seeded(Some(&black), 3);
        let m = model();
        let base = m.encode_image(&rgb("flux2-base.png")).unwrap();
        let base = unpatchify(&m.latent_stats.denormalise(&base).unwrap()).unwrap();
        assert_eq!(bytes(&out), bytes(&base));
    }

    #[test]
    fn references_change_the_result() {
        let image = rgb("flux2-base.png");
        let meta = sidecar(MODEL);
        let p = params(&meta["runs"]["ref"]);
        let with = |refs: &[Tensor]| {
            let inputs = RemixInputs {
                image: &image,
                mask: None,
                references: refs,
            };
            m_remix(&inputs, &p)
        };
        fn m_remix(inputs: &RemixInputs<'_>, p: &RemixParams) -> Vec<u32> {
            bytes(
                &model()
                    .remix(inputs, p, &mut SeededNoise::new(1), &mut |_, _| true)
                    .unwrap()
                    .latents,
            )
        }
        let none = with(&[]);
        let one = with(&[rgb("flux2-reference.png")]);
        let two = with(&[rgb("flux2-reference.png"), rgb("flux2-base.png")]);
        assert_ne!(none, one);
        assert_ne!(one, two);
    }
}
