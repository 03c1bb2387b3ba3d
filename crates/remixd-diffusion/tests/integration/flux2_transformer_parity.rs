//! One forward pass of the tiny FLUX.2 transformer against diffusers'
//! `Flux2Transformer2DModel` (`tr.*` in `tests/fixtures/reference-tiny-flux2.safetensors`):
//! without reference tokens, and with a reference image's tokens appended to the image
//! tokens (their ids at `T = 10`).
//!
//! Tolerance: every element within `1e-4 · max|reference| + 1e-4 · |reference|`, i.e.
//! about 1e-4 relative to the output's scale (f32 with a different summation order).

use crate::common;

use candle_core::{DType, Device};
use common::{assert_close, fixtures, reference, sidecar};
use remixd_diffusion::flux2::transformer::Flux2Transformer;

const MODEL: &str = "tiny-flux2";

fn transformer_parity(case: &str) {
    let r = reference(MODEL);
    let meta = sidecar(MODEL);
    let model = Flux2Transformer::load(
        &fixtures().join(MODEL).join("transformer"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("load transformer");
    let key = |name: &str| format!("tr.{case}.{name}");
    let timestep = meta[key("timestep")].as_f64().expect("timestep");
    let out = model
        .forward(
            &r[&key("hidden")],
            &r[&key("encoder")],
            timestep,
            &r[&key("img_ids")],
            &r[&key("txt_ids")],
            None,
        )
        .expect("forward");
    assert_close(&key("out"), &out, &r[&key("out")], 1e-4);
}

#[test]
fn tiny_flux2_transformer_matches_diffusers() {
    transformer_parity("noref");
}

#[test]
fn tiny_flux2_transformer_with_reference_tokens_matches_diffusers() {
    transformer_parity("ref");
}
