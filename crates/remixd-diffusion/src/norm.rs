//! Group normalisation, fused with the SiLU that usually follows it, on the CPU.
//!
//! candle's `GroupNorm` is a chain of tensor operations (mean, subtract, square, mean,
//! divide, scale, shift), each a full pass over the activations with a fresh buffer, and
//! the SiLU after it is two more; the UNet runs about sixty of them per pass. This one
//! reads each group once for its statistics (in f64) and once to write
//! `silu?(x · scale[c] + shift[c])`, in parallel over (image, group). candle has no fused
//! group norm for the CPU, hence the hand-written loop. Other devices use candle's.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::simd::{mul_add, silu, Kernel, Simd};

/// diffusers' `GroupNorm` (affine), optionally followed by SiLU.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    inner: candle_nn::GroupNorm,
    groups: usize,
    eps: f64,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

/// One call's operation; it borrows the weights so that a call copies nothing.
struct Fused<'a> {
    groups: usize,
    eps: f64,
    gamma: &'a [f32],
    beta: &'a [f32],
    silu: bool,
    simd: Simd,
}

impl GroupNorm {
    pub(crate) fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        let inner = candle_nn::group_norm(groups, channels, eps, vb.clone())?;
        let read = |name: &str| {
            vb.get(channels, name)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()
        };
        Ok(Self {
            inner,
            groups,
            eps,
            gamma: read("weight")?,
            beta: read("bias")?,
        })
    }

    /// `silu(group_norm(x))`.
    pub(crate) fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 3 {
            let op = Fused {
                groups: self.groups,
                eps: self.eps,
                gamma: &self.gamma,
                beta: &self.beta,
                silu,
                simd: Simd::detect(),
            };
            x.contiguous()?.apply_op1_no_bwd(&op)
        } else {
            let y = self.inner.forward(x)?;
            if silu {
                y.silu()
            } else {
                Ok(y)
            }
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }
}

/// One channel's `silu?(x · scale + shift)`, compiled per instruction set.
struct Affine<'a> {
    src: &'a [f32],
    dst: &'a mut [f32],
    scale: f32,
    shift: f32,
    silu: bool,
}

impl Kernel for Affine<'_> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let Self {
            src,
            dst,
            scale,
            shift,
            silu: activate,
        } = self;
        if activate {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = silu::<FMA>(mul_add::<FMA>(v, scale, shift));
            }
        } else {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = mul_add::<FMA>(v, scale, shift);
            }
        }
    }
}

impl CustomOp1 for Fused<'_> {
    fn name(&self) -> &'static str {
        "group-norm-silu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::contiguous_f32("group norm: input", storage, layout)?;
        let dims = layout.dims();
        let (b, c) = (dims[0], dims[1]);
        if c != self.gamma.len() || self.groups == 0 || c % self.groups != 0 {
            candle_core::bail!(
                "group norm: {c} channels for {} weights, {} groups",
                self.gamma.len(),
                self.groups
            );
        }
        let spatial: usize = dims[2..].iter().product();
        let per_group = c / self.groups * spatial;
        let mut out = vec![0f32; x.len()];
        // Nothing to normalise (no image, channel or pixel); a group of no values has no
        // mean, and the loop below would split by empty groups.
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), layout.shape().clone()));
        }
        let simd = self.simd;
        out.par_chunks_mut(per_group)
            .zip(x.par_chunks(per_group))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let (sum, sq) = src.iter().fold((0f64, 0f64), |(s, q), &v| {
                    let v = v as f64;
                    (s + v, q + v * v)
                });
                let n = per_group as f64;
                let mean = sum / n;
                let var = (sq / n - mean * mean).max(0.0);
                let inv = 1.0 / (var + self.eps).sqrt();
                let first = (i % self.groups) * (c / self.groups);
                for (k, (dst, src)) in dst.chunks_mut(spatial).zip(src.chunks(spatial)).enumerate()
                {
                    let ch = first + k;
                    let scale = (self.gamma[ch] as f64 * inv) as f32;
                    let shift = (self.beta[ch] as f64 - mean * self.gamma[ch] as f64 * inv) as f32;
                    simd.run(Affine {
                        src,
                        dst,
                        scale,
                        shift,
                        silu: self.silu,
                    });
                }
            });
        debug_assert_eq!(out.len(), b * c * spatial);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn norm(groups: usize, channels: usize) -> GroupNorm {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        // Create the variables, then give them values other than 1 and 0.
        GroupNorm::new(vb.pp("n"), groups, channels, 1e-5).unwrap();
        for (_, var) in map.data().lock().unwrap().iter() {
            let v = Tensor::randn(0.5f32, 1f32, var.shape(), &Device::Cpu).unwrap();
            var.set(&v).unwrap();
        }
        GroupNorm::new(vb.pp("n"), groups, channels, 1e-5).unwrap()
    }

    /// The fused op on the given instruction set.
    fn fused(n: &GroupNorm, x: &Tensor, silu: bool, simd: Simd) -> Tensor {
        let op = Fused {
            groups: n.groups,
            eps: n.eps,
            gamma: &n.gamma,
            beta: &n.beta,
            silu,
            simd,
        };
        x.apply_op1_no_bwd(&op).unwrap()
    }

    #[test]
    fn fused_group_norm_equals_candles() {
        for (shape, groups) in [((2, 32, 5, 7), 8), ((1, 64, 4, 4), 32), ((2, 6, 3, 1), 3)] {
            let n = norm(groups, shape.1);
            // An offset and a scale, as activations have, so that the variance matters.
            let x = (Tensor::randn(3f32, 2f32, shape, &Device::Cpu).unwrap() * 1.5).unwrap();
            let reference = n.inner.forward(&x).unwrap();
            assert!(
                max_diff(&n.forward(&x).unwrap(), &reference) < 1e-5,
                "{shape:?}"
            );
            let with_silu = reference.silu().unwrap();
            assert!(
                max_diff(&n.forward_silu(&x).unwrap(), &with_silu) < 1e-5,
                "{shape:?} silu"
            );
            for simd in Simd::supported() {
                let plain = fused(&n, &x, false, simd);
                assert!(max_diff(&plain, &reference) < 1e-5, "{shape:?} {simd:?}");
                let activated = fused(&n, &x, true, simd);
                assert!(
                    max_diff(&activated, &with_silu) < 1e-5,
                    "{shape:?} {simd:?} silu"
                );
            }
        }
    }

    #[test]
    fn zero_sized_inputs_give_empty_outputs() {
        // No image, no row, no column: an empty result of the input's shape (a 0-pixel
        // group used to panic on a zero chunk size).
        let n = norm(2, 4);
        for shape in [(0, 4, 3, 3), (1, 4, 0, 3), (2, 4, 3, 0)] {
            let x = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
            for y in [n.forward(&x).unwrap(), n.forward_silu(&x).unwrap()] {
                assert_eq!(y.dims(), x.dims(), "{shape:?}");
            }
        }
        // No channel at all.
        let n = norm(1, 0);
        let x = Tensor::zeros((2, 0, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(n.forward_silu(&x).unwrap().dims(), &[2, 0, 4, 4]);
        // Zero groups: a clear error when the model is built, not a division by zero.
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let err = GroupNorm::new(vb, 0, 4, 1e-5).unwrap_err().to_string();
        assert!(err.contains("num_groups (0)"), "{err}");
    }

    #[test]
    fn rank_three_inputs_work_too() {
        let n = norm(4, 8);
        let x = Tensor::randn(0f32, 1f32, (2, 8, 10), &Device::Cpu).unwrap();
        assert!(max_diff(&n.forward(&x).unwrap(), &n.inner.forward(&x).unwrap()) < 1e-5);
    }
}
