//! 2-D convolutions, with a faster CPU path for the 3×3 stride-1 case.
//!
//! The UNet and the VAE spend most of their time in 3×3 convolutions. candle's CPU
//! convolution re-orders the kernel on every call (tens of MB for SD 1.5's wide layers)
//! and multiplies tiles of 512 output pixels at a time. Here the kernel is flattened once,
//! at load, to `(c_out, c_in·9)` — a free reshape of the stored layout — and each call
//! builds the nine shifted copies of the input (im2col) with tensor operations and runs
//! one large matrix product per image, which the matrix-product kernels do near their
//! peak. Other shapes (1×1, stride 2) and other devices use candle's own convolution.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

/// A convolution built from diffusers' `weight` (`(c_out, c_in, k, k)`) and `bias`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    /// The kernel as `(c_out, c_in·k·k)`, for the im2col path (3×3, stride 1, pad 1).
    flat: Option<Tensor>,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let inner = candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?;
        let flat = if kernel == 3 && stride == 1 && padding == 1 {
            Some(
                inner
                    .weight()
                    .reshape((out_channels, in_channels * 9))?
                    .contiguous()?,
            )
        } else {
            None
        };
        Ok(Self { inner, flat })
    }

    /// candle's own convolution, whatever the shape (the reference for the fast path).
    pub fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.flat {
            Some(flat) if matches!(x.device(), Device::Cpu) => {
                let y = conv3x3_im2col(x, flat)?;
                match self.inner.bias() {
                    Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
                    None => Ok(y),
                }
            }
            _ => self.inner.forward(x),
        }
    }
}

/// The most im2col matrix elements built at once (32 MiB of f32): larger images are
/// done in strips of rows, so that the VAE's 512×512×128 activations do not need a
/// 1.2 GB column matrix.
const MAX_COLS: usize = 1 << 23;

/// 3×3, stride 1, padding 1: `flat` is `(c_out, c_in·9)`, `x` is `(b, c_in, h, w)`.
fn conv3x3_im2col(x: &Tensor, flat: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let c_out = flat.dim(0)?;
    let padded = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let rows = (MAX_COLS / (c * 9 * w)).clamp(1, h);
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let img = padded.get(i)?;
        let mut strips = Vec::with_capacity(h.div_ceil(rows));
        for top in (0..h).step_by(rows) {
            let n = rows.min(h - top);
            // Row `c·9 + ky·3 + kx` of the column matrix is channel c shifted by (ky, kx),
            // matching the order of the flattened kernel's columns.
            let shifts = (0..3)
                .flat_map(|ky| (0..3).map(move |kx| (ky, kx)))
                .map(|(ky, kx)| img.narrow(1, top + ky, n)?.narrow(2, kx, w))
                .collect::<Result<Vec<_>>>()?;
            let cols = Tensor::stack(&shifts, 1)?.reshape((c * 9, n * w))?;
            strips.push(flat.matmul(&cols)?.reshape((c_out, n, w))?);
        }
        out.push(if strips.len() == 1 {
            strips.pop().expect("one strip")
        } else {
            Tensor::cat(&strips, 1)?
        });
    }
    Tensor::stack(&out, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;

    fn conv(cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Conv2d {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let c = Conv2d::new(vb, cin, cout, k, stride, pad).unwrap();
        // VarMap initialises the bias to zero: give it values so that it is checked.
        for (name, var) in map.data().lock().unwrap().iter() {
            if name.ends_with("bias") {
                let b = Tensor::randn(0f32, 1f32, var.shape(), &Device::Cpu).unwrap();
                var.set(&b).unwrap();
            }
        }
        c
    }

    fn max_abs(t: &Tensor) -> f32 {
        let t = t.abs().unwrap().flatten_all().unwrap();
        t.max(0).unwrap().to_scalar().unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    #[test]
    fn the_im2col_path_equals_candles_convolution() {
        // The last shape is done in two strips of rows (MAX_COLS / (64·9·512) = 28 rows).
        for (b, cin, cout, h, w) in [
            (1, 3, 8, 5, 7),
            (2, 16, 4, 8, 8),
            (2, 32, 32, 9, 4),
            (1, 64, 2, 40, 512),
        ] {
            let c = conv(cin, cout, 3, 1, 1);
            assert!(c.flat.is_some());
            let x = Tensor::randn(0f32, 1f32, (b, cin, h, w), &Device::Cpu).unwrap();
            let ours = c.forward(&x).unwrap();
            let theirs = c.forward_candle(&x).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(
                max_diff(&ours, &theirs) <= 1e-5 * max_abs(&theirs),
                "{b} {cin} {cout} {h} {w}"
            );
        }
    }

    #[test]
    fn other_shapes_use_candles_convolution() {
        for (k, stride, pad) in [(1, 1, 0), (3, 2, 1), (3, 2, 0)] {
            let c = conv(4, 4, k, stride, pad);
            assert!(c.flat.is_none());
            let x = Tensor::randn(0f32, 1f32, (1, 4, 8, 8), &Device::Cpu).unwrap();
            assert_eq!(
                max_diff(&c.forward(&x).unwrap(), &c.forward_candle(&x).unwrap()),
                0.0
            );
        }
    }
}
