//! What the parity tests share: the fixture paths, the reference tensors and the
//! comparison with its tolerance rule.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixture model's directory (`tiny-sd1`, `tiny-sd2`).
pub fn model_dir(model: &str) -> PathBuf {
    fixtures().join(model)
}

/// The reference tensors recorded from diffusers for `model`.
pub fn reference(model: &str) -> HashMap<String, Tensor> {
    let file = fixtures().join(format!("reference-{model}.safetensors"));
    candle_core::safetensors::load(&file, &Device::Cpu).expect("reference tensors")
}

/// The JSON sidecar of the reference tensors.
pub fn sidecar(model: &str) -> serde_json::Value {
    let file = fixtures().join(format!("reference-{model}.json"));
    serde_json::from_str(&std::fs::read_to_string(file).expect("reference json"))
        .expect("valid json")
}

/// Asserts that `actual` matches `expected` elementwise within
/// `rtol · (max|expected| + |expected|)`, that is `rtol` relative to the tensor's
/// scale (f32 summed in another order cannot be closer), and returns the largest
/// absolute difference.
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, rtol: f32) -> f32 {
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
