//! The VAE of each fixture model against diffusers: the encoder's posterior (mean and
//! clamped log-variance) and one decode (`vae.*` in
//! `tests/fixtures/reference-<model>.safetensors`).
//!
//! Tolerance: every element within `1e-4 · max|reference| + 1e-4 · |reference|`, i.e.
//! about 1e-4 relative to the tensor's scale (f32 with a different summation order).

use crate::common;

use candle_core::Device;
use common::{assert_close, fixtures, reference};
use remixd_diffusion::vae::AutoencoderKL;

fn load(model: &str) -> AutoencoderKL {
    AutoencoderKL::load(&fixtures().join(model).join("vae"), &Device::Cpu).expect("load vae")
}

fn encode_parity(model: &str) {
    let r = reference(model);
    let vae = load(model);
    let (mean, logvar) = vae.encode(&r["vae.image"]).expect("encode");
    assert_close(&format!("{model} vae.mean"), &mean, &r["vae.mean"], 1e-4);
    assert_close(
        &format!("{model} vae.logvar"),
        &logvar,
        &r["vae.logvar"],
        1e-4,
    );
}

fn decode_parity(model: &str) {
    let r = reference(model);
    let vae = load(model);
    let decoded = vae.decode(&r["vae.decode_in"]).expect("decode");
    assert_close(
        &format!("{model} vae.decoded"),
        &decoded,
        &r["vae.decoded"],
        1e-4,
    );
}

#[test]
fn tiny_sd1_vae_encode_matches_diffusers() {
    encode_parity("tiny-sd1");
}

#[test]
fn tiny_sd1_vae_decode_matches_diffusers() {
    decode_parity("tiny-sd1");
}

#[test]
fn tiny_sd2_vae_encode_matches_diffusers() {
    encode_parity("tiny-sd2");
}

#[test]
fn tiny_sd2_vae_decode_matches_diffusers() {
    decode_parity("tiny-sd2");
}

#[test]
fn scale_factor_and_config() {
    let vae = load("tiny-sd2");
    assert_eq!(vae.vae_scale_factor(), 4);
    assert_eq!(vae.config().scaling_factor, 0.18215);
    assert_eq!(load("tiny-sd1").vae_scale_factor(), 2);
}
