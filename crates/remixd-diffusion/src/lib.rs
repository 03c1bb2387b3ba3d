//! Stable Diffusion 1.x/2.x on candle, built from the diffusers directory layout.
//!
//! remixd owns these modules (CLIP text encoder, UNet, VAE) rather than building on
//! candle-transformers: the character conditioning needs hooks inside attention, and the
//! reference implementation's exact GELU must be matched for numerical parity.
//!
//! Every module but `engine` knows nothing of tasks, HTTP or storage; `engine` adapts the
//! pipeline to remixd's `Engine` trait (the `local` engine).

mod activation;
pub mod attention;
mod blocks;
pub mod clip;
pub mod conv;
pub mod engine;
pub mod error;
pub mod flux2;
pub(crate) mod linear;
pub mod model;
pub mod noise;
mod norm;
pub mod pipeline;
mod rows;
pub mod scheduler;
mod sgemm;
mod simd;
pub mod tokenizer;
pub mod unet;
pub mod vae;
mod winograd;

pub use error::{Error, Result};

/// The values of a contiguous f32 operand of a CPU custom op; `what` names it in the
/// error (e.g. "conv: weight").
pub(crate) fn contiguous_f32<'a>(
    what: &str,
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} not contiguous")))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// Helpers shared by the unit tests.
#[cfg(test)]
mod test_util {
    use candle_core::Tensor;

    /// The largest absolute value of `t`.
    pub(crate) fn max_abs(t: &Tensor) -> f32 {
        let t = t.abs().unwrap().flatten_all().unwrap();
        t.max(0).unwrap().to_scalar().unwrap()
    }

    /// The largest absolute difference between `a` and `b`.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }
}
