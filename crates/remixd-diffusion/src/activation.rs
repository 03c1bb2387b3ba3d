//! The GEGLU of the transformer blocks' feed-forward, fused on the CPU.
//!
//! diffusers' `GEGLU` splits the projection into a value half and a gate half and returns
//! `value · gelu(gate)` with the exact (erf) GELU. With candle ops that is a strided GELU
//! over the gate half, calling a scalar `erf` per element, then a strided product: about
//! 8 % of a UNet pass on two cores. Here one parallel pass over the rows reads both
//! halves and writes the product, with the vectorised GELU of [`crate::simd`].

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::simd::{gelu_erf, Kernel, Simd};

/// `value · gelu_erf(gate)` where `h` is `(…, 2·inner)`, `value` its first `inner`
/// channels and `gate` the last; the result is `(…, inner)`.
pub(crate) fn geglu(h: &Tensor) -> Result<Tensor> {
    let width = h.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu: an odd last dimension ({width})");
    }
    if h.device().is_cpu() && h.dtype() == DType::F32 {
        let op = Geglu {
            simd: Simd::detect(),
        };
        return h.contiguous()?.apply_op1_no_bwd(&op);
    }
    let inner = width / 2;
    let value = h.narrow(D::Minus1, 0, inner)?;
    let gate = h.narrow(D::Minus1, inner, inner)?.gelu_erf()?;
    value * gate
}

/// The fused op, with the instruction set it runs on.
struct Geglu {
    simd: Simd,
}

/// Rows handed to a rayon task at once (a row is a few thousand values).
const ROWS_PER_TASK: usize = 16;

/// One row's GEGLU, compiled per instruction set.
struct Row<'a> {
    src: &'a [f32],
    dst: &'a mut [f32],
}

impl Kernel for Row<'_> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let (value, gate) = self.src.split_at(self.dst.len());
        for ((o, &v), &g) in self.dst.iter_mut().zip(value).zip(gate) {
            *o = v * gelu_erf::<FMA>(g);
        }
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = crate::contiguous_f32("geglu: input", storage, layout)?;
        let mut dims = layout.dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        let inner = width / 2;
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        let mut out = vec![0f32; h.len() / 2];
        if inner > 0 {
            let simd = self.simd;
            out.par_chunks_mut(inner * ROWS_PER_TASK)
                .zip(h.par_chunks(width * ROWS_PER_TASK))
                .for_each(|(dst, src)| {
                    for (dst, src) in dst.chunks_exact_mut(inner).zip(src.chunks_exact(width)) {
                        simd.run(Row { src, dst });
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;
    use candle_core::Device;

    #[test]
    fn fused_geglu_equals_candles() {
        let h = (Tensor::randn(0f32, 1., (2, 37, 2 * 24), &Device::Cpu).unwrap() * 3.0).unwrap();
        let got = geglu(&h).unwrap();
        let (value, gate) = (h.narrow(2, 0, 24).unwrap(), h.narrow(2, 24, 24).unwrap());
        let want = (value * gate.gelu_erf().unwrap()).unwrap();
        assert_eq!(got.dims(), &[2, 37, 24]);
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-5, "max |diff| {diff}");
        for simd in Simd::supported() {
            let got = h.apply_op1_no_bwd(&Geglu { simd }).unwrap();
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5, "{simd:?}: max |diff| {diff}");
        }
    }

    #[test]
    fn zero_sized_inputs_give_empty_outputs() {
        for (shape, want) in [
            ((0, 4, 8), [0, 4, 4]),
            ((2, 0, 8), [2, 0, 4]),
            ((2, 3, 0), [2, 3, 0]),
        ] {
            let h = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(geglu(&h).unwrap().dims(), &want, "{shape:?}");
        }
    }

    #[test]
    fn strided_input_and_odd_width() {
        let h = Tensor::randn(0f32, 1., (8, 3, 10), &Device::Cpu).unwrap();
        let t = h.transpose(0, 1).unwrap();
        let got = geglu(&t).unwrap();
        let want = geglu(&t.contiguous().unwrap()).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0);
        let odd = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(geglu(&odd).unwrap_err().to_string().contains("odd"));
    }
}
