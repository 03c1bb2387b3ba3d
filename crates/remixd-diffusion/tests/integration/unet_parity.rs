//! One UNet forward pass of each fixture model against diffusers' output
//! (`unet.*` in `tests/fixtures/reference-<model>.safetensors`).
//!
//! Tolerance: every element within `1e-4 · max|reference| + 1e-4 · |reference|`, i.e.
//! about 1e-4 relative to the output's scale (f32 with a different summation order).

use crate::common;

use candle_core::Device;
use common::{assert_close, fixtures, reference};
use remixd_diffusion::unet::UNet2DConditionModel;

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
