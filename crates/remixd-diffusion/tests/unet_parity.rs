//! One UNet forward pass of each fixture model against diffusers' output
//! (`unet.*` in `tests/fixtures/reference-<model>.safetensors`).
//!
//! Tolerance: every element within `1e-4 · max|reference| + 1e-4 · |reference|`, i.e.
//! about 1e-4 relative to the output's scale (f32 with a different summation order).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use remixd_diffusion::unet::UNet2DConditionModel;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference(model: &str) -> HashMap<String, Tensor> {
    let file = fixtures().join(format!("reference-{model}.safetensors"));
    candle_core::safetensors::load(&file, &Device::Cpu).expect("reference tensors")
}

/// Asserts `actual` matches `expected` elementwise within
/// `rtol · (max|expected| + |expected|)` and returns the largest absolute difference.
fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, rtol: f32) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "{name}: shape");
    let a = actual.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let e = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        let d = (x - y).abs();
        assert!(
            d <= rtol * (scale + y.abs()),
            "{name}[{i}]: got {x}, expected {y} (|diff| {d}, scale {scale})"
        );
        worst = worst.max(d);
    }
    eprintln!("{name}: max |diff| {worst:e}, max |expected| {scale}");
    worst
}

fn unet_parity(model: &str) {
    let r = reference(model);
    let unet = UNet2DConditionModel::load(&fixtures().join(model).join("unet"), &Device::Cpu)
        .expect("load unet");
    let t = r["unet.timestep"].to_vec1::<f32>().unwrap()[0];
    let out = unet
        .forward(
            &r["unet.sample"],
            t as f64,
            &r["unet.encoder_hidden_states"],
        )
        .expect("forward");
    assert_close(&format!("{model} unet.out"), &out, &r["unet.out"], 1e-4);
}

#[test]
fn tiny_sd1_unet_matches_diffusers() {
    unet_parity("tiny-sd1");
}

#[test]
fn tiny_sd2_unet_matches_diffusers() {
    unet_parity("tiny-sd2");
}
