//! 2-D convolutions, with a faster CPU path built on the `gemm` crate.
//!
//! The UNet and the VAE spend most of their time in convolutions. candle's CPU
//! convolution re-orders the kernel on every call (tens of MB for SD 1.5's wide layers)
//! and multiplies tiles of 512 output pixels at a time. Here the kernel is used as it is
//! stored, `(c_out, c_in, k, k)` read as the matrix `(c_out, c_in·k·k)`, and each call,
//! for a strip of output rows at a time, writes the shifted copies of the input (im2col)
//! into one reused buffer and runs one large matrix product straight into the output,
//! which the matrix-product kernels do near their peak. A 1×1 convolution multiplies the
//! input itself. The output starts as the bias plus, on request, a residual or a
//! per-channel term, and the product accumulates onto it, so no pass over the
//! activations is spent on additions; a nearest-neighbour 2× upsampling before the
//! convolution is read through in the im2col step instead of being materialised.
//! 3×3 convolutions of stride 1 and padding 1 over enough output pixels (the UNet's and
//! the VAE's high-resolution layers) use Winograd's F(2×2, 3×3) instead
//! ([`crate::winograd`]), with the same output start and upsampling read-through.
//! candle has no such fused CPU convolution, hence the hand-written op. Other devices
//! and dtypes use candle's convolution and tensor operations.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::winograd;

/// A convolution built from diffusers' `weight` (`(c_out, c_in, k, k)`) and `bias`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// The bias on the host, for the CPU path (a few KB).
    bias: Option<Vec<f32>>,
    /// 3×3 convolutions (stride 1, padding 1) of at least this many 2×2 output tiles per
    /// call use Winograd's F(2×2, 3×3) ([`crate::winograd`]).
    winograd_min_tiles: usize,
    /// The most values of each scratch buffer (im2col columns, Winograd tiles).
    max_cols: usize,
}

/// What the output starts from before the product is added to it (besides the bias).
#[derive(Debug, Clone, Copy)]
pub enum Addend<'a> {
    /// A tensor of the output's shape, e.g. a residual.
    Full(&'a Tensor),
    /// One value per image and output channel, `(b, c_out)`, or per output channel for
    /// every image, `(1, c_out)`; e.g. a time embedding.
    PerChannel(&'a Tensor),
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
        let bias = match inner.bias() {
            Some(b) if b.device().is_cpu() => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            _ => None,
        };
        Ok(Self {
            inner,
            kernel,
            stride,
            padding,
            bias,
            winograd_min_tiles: WINOGRAD_MIN_TILES,
            max_cols: MAX_COLS,
        })
    }

    /// The same convolution with Winograd used from `min_tiles` output tiles per call
    /// on (`usize::MAX`: never), e.g. to time the im2col path on its own.
    pub fn with_winograd_min_tiles(self, min_tiles: usize) -> Self {
        Self {
            winograd_min_tiles: min_tiles,
            ..self
        }
    }

    /// candle's own convolution, whatever the shape (the reference for the fast path).
    pub fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }

    /// `conv(x) + addend`, with the addition done by the product itself on the CPU.
    pub fn forward_add(&self, x: &Tensor, addend: Addend) -> Result<Tensor> {
        self.run(x, false, Some(addend))
    }

    /// `conv(upsample_nearest(x, 2×))`, reading the upsampled input through on the CPU.
    pub fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true, None)
    }

    fn fast(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.inner.weight().dtype() == DType::F32
            && (self.bias.is_some() || self.inner.bias().is_none())
    }

    fn run(&self, x: &Tensor, upsample: bool, addend: Option<Addend>) -> Result<Tensor> {
        if !self.fast(x) {
            let x = if upsample {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)?
            } else {
                x.clone()
            };
            let y = self.inner.forward(&x)?;
            return match addend {
                None => Ok(y),
                Some(Addend::Full(a)) => y + a,
                Some(Addend::PerChannel(a)) => y.broadcast_add(&a.unsqueeze(2)?.unsqueeze(3)?),
            };
        }
        let op = CpuConv {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            upsample,
            bias: self.bias.as_deref(),
            winograd_min_tiles: self.winograd_min_tiles,
            max_cols: self.max_cols,
        };
        let x = x.contiguous()?;
        let w = self.inner.weight();
        match addend {
            None => x.apply_op2_no_bwd(w, &op),
            // The op tells the two apart by the addend's length.
            Some(Addend::Full(a) | Addend::PerChannel(a)) => {
                x.apply_op3_no_bwd(w, &a.contiguous()?, &op)
            }
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false, None)
    }
}

/// The most im2col matrix elements (or Winograd tile values, in each of its two buffers)
/// built at once (8 MiB of f32): larger outputs are done in strips of rows, so the
/// scratch buffers stay small and are reused.
const MAX_COLS: usize = 1 << 21;

/// Below this many output tiles per call, transforming the kernel on every call costs
/// more than Winograd saves (the deep, low-resolution layers with wide kernels).
const WINOGRAD_MIN_TILES: usize = 512;

/// One call's convolution (im2col, 1×1 direct or Winograd); it borrows the bias so that
/// a call copies nothing.
struct CpuConv<'a> {
    kernel: usize,
    stride: usize,
    padding: usize,
    upsample: bool,
    bias: Option<&'a [f32]>,
    winograd_min_tiles: usize,
    max_cols: usize,
}

impl CustomOp2 for CpuConv<'_> {
    fn name(&self) -> &'static str {
        "conv2d-cpu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.conv(xs, xl, ws, wl, None)
    }
}

impl CustomOp3 for CpuConv<'_> {
    fn name(&self) -> &'static str {
        "conv2d-cpu-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        a: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.conv(
            xs,
            xl,
            ws,
            wl,
            Some(crate::contiguous_f32("conv: addend", a, al)?),
        )
    }
}

impl CpuConv<'_> {
    fn conv(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        addend: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::contiguous_f32("conv: input", xs, xl)?;
        let w = crate::contiguous_f32("conv: weight", ws, wl)?;
        let Self {
            kernel: k,
            stride: s,
            padding: p,
            upsample,
            bias,
            winograd_min_tiles,
            max_cols,
        } = *self;
        let (b, c, h, wd) = xl.shape().dims4()?;
        let (c_out, wc, kh, kw) = wl.shape().dims4()?;
        if wc != c || kh != k || kw != k {
            candle_core::bail!("conv: input has {c} channels, kernel is {:?}", wl.dims());
        }
        let up = usize::from(upsample);
        let (hl, wl_) = (h << up, wd << up);
        if hl + 2 * p < k || wl_ + 2 * p < k || s == 0 {
            candle_core::bail!("conv: {k}×{k} kernel over a {hl}×{wl_} input");
        }
        let (ho, wo) = ((hl + 2 * p - k) / s + 1, (wl_ + 2 * p - k) / s + 1);
        let plane = ho * wo;
        let len = b * c_out * plane;
        let depth = c * k * k;

        let mut out = vec![0f32; len];
        // No image or no output channel: nothing to compute (the strips below split by
        // plane, which would be empty chunks).
        if len == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((b, c_out, ho, wo))));
        }
        let bias_of = |co: usize| bias.map_or(0.0, |b| b[co]);
        match addend {
            None if bias.is_none() => {}
            None => out
                .par_chunks_mut(plane)
                .enumerate()
                .for_each(|(i, o)| o.fill(bias_of(i % c_out))),
            // `(b, c_out)`, or `(1, c_out)` for every image.
            Some(a) if a.len() == b * c_out || a.len() == c_out => out
                .par_chunks_mut(plane)
                .enumerate()
                .for_each(|(i, o)| o.fill(a[i % a.len()] + bias_of(i % c_out))),
            Some(a) if a.len() == len => out
                .par_chunks_mut(plane)
                .zip(a.par_chunks(plane))
                .enumerate()
                .for_each(|(i, (o, a))| {
                    let bias = bias_of(i % c_out);
                    for (o, a) in o.iter_mut().zip(a) {
                        *o = a + bias;
                    }
                }),
            Some(a) => candle_core::bail!(
                "conv: an addend of {} values for an output of {b}×{c_out}×{ho}×{wo}",
                a.len()
            ),
        }

        // No input value (no input channel, or a 0-pixel input inside the padding): every
        // tap reads zero, so the output is what it starts from, the bias and addend.
        if x.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((b, c_out, ho, wo))));
        }
        let parallelism = match candle_core::utils::get_num_threads() {
            1 => Parallelism::None,
            n => Parallelism::Rayon(n),
        };
        if k == 3 && s == 1 && p == 1 && b * ho.div_ceil(2) * wo.div_ceil(2) >= winograd_min_tiles {
            let src = winograd::Source {
                img: x,
                c,
                h,
                w: wd,
                up,
            };
            winograd::conv3x3(src, w, c_out, &mut out, max_cols, parallelism);
            return Ok((CpuStorage::F32(out), Shape::from((b, c_out, ho, wo))));
        }

        let direct = k == 1 && s == 1 && p == 0 && !upsample;
        let rows = if direct {
            ho
        } else {
            (max_cols / (depth * wo)).clamp(1, ho)
        };
        let mut cols = if direct {
            Vec::new()
        } else {
            vec![0f32; depth * rows * wo]
        };
        for (img, dst) in x
            .chunks_exact(c * h * wd)
            .zip(out.chunks_exact_mut(c_out * plane))
        {
            for top in (0..ho).step_by(rows) {
                let n = rows.min(ho - top);
                let rhs = if direct {
                    img
                } else {
                    let cols = &mut cols[..depth * n * wo];
                    cols.par_chunks_mut(n * wo)
                        .enumerate()
                        .for_each(|(r, row)| self.fill(row, img, r, top, (h, wd), wo));
                    &*cols
                };
                // dst[c_out × n·wo] (row stride `plane`) += w[c_out × depth] · rhs[depth × n·wo].
                // SAFETY: `dst` holds `c_out` planes of `plane` elements; this strip
                // writes rows `top..top + n` of each, `n·wo` elements from `top·wo`, all
                // inside `dst[top·wo..]`, the slice its pointer comes from (a pointer
                // derived from a slice may reach all of that slice and nothing else). `w`
                // holds `c_out·depth` elements (its shape was checked) and `rhs` `depth`
                // rows of `n·wo` (the image itself when direct, whose `c = depth` planes
                // are `plane = n·wo` long), each read through its own whole slice's
                // pointer. The buffers do not overlap.
                unsafe {
                    gemm::gemm(
                        c_out,
                        n * wo,
                        depth,
                        dst[top * wo..].as_mut_ptr(),
                        1,
                        plane as isize,
                        true,
                        w.as_ptr(),
                        1,
                        depth as isize,
                        rhs.as_ptr(),
                        1,
                        (n * wo) as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, ho, wo))))
    }

    /// Row `r = (channel·k + ky)·k + kx` of the column matrix for output rows
    /// `top..top + row.len() / wo`: the input pixel each output pixel's kernel tap
    /// `(ky, kx)` reads, or zero in the padding. It matches the order of the weight's
    /// columns.
    fn fill(
        &self,
        row: &mut [f32],
        img: &[f32],
        r: usize,
        top: usize,
        (h, w): (usize, usize),
        wo: usize,
    ) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let up = usize::from(self.upsample);
        let (ch, ky, kx) = (r / (k * k), r / k % k, r % k);
        let src = &img[ch * h * w..(ch + 1) * h * w];
        // Output columns whose tap lands inside the input: ox·s + kx − p ∈ [0, w << up).
        let lo = p.saturating_sub(kx).div_ceil(s).min(wo);
        let hi = ((w << up) + p)
            .saturating_sub(kx)
            .div_ceil(s)
            .min(wo)
            .max(lo);
        for (oy, dst) in row.chunks_exact_mut(wo).enumerate() {
            let iy = ((top + oy) * s + ky).wrapping_sub(p);
            if iy >= h << up {
                dst.fill(0.0);
                continue;
            }
            let line = &src[(iy >> up) * w..][..w];
            dst[..lo].fill(0.0);
            dst[hi..].fill(0.0);
            if s == 1 && up == 0 {
                dst[lo..hi].copy_from_slice(&line[lo + kx - p..hi + kx - p]);
            } else {
                for (ox, d) in dst[lo..hi].iter_mut().enumerate() {
                    *d = line[((lo + ox) * s + kx - p) >> up];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, max_diff};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn conv(cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Conv2d {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        Conv2d::new(vb.clone(), cin, cout, k, stride, pad).unwrap();
        // VarMap initialises the bias to zero: give it values so that it is checked.
        for (name, var) in map.data().lock().unwrap().iter() {
            if name.ends_with("bias") {
                let b = Tensor::randn(0f32, 1f32, var.shape(), &Device::Cpu).unwrap();
                var.set(&b).unwrap();
            }
        }
        Conv2d::new(vb, cin, cout, k, stride, pad).unwrap()
    }

    fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
        assert_eq!(ours.dims(), theirs.dims(), "{what}");
        let diff = max_abs(&(ours - theirs).unwrap());
        assert!(diff <= 1e-5 * max_abs(theirs), "{what}: {diff}");
    }

    /// (batch, c_in, c_out, h, w, kernel, stride, padding)
    type Shape8 = (usize, usize, usize, usize, usize, usize, usize, usize);
    const SHAPES: [Shape8; 9] = [
        (1, 3, 8, 5, 7, 3, 1, 1),
        (2, 16, 4, 8, 8, 3, 1, 1),
        (2, 32, 32, 9, 4, 3, 1, 1),
        // Two strips of rows: MAX_COLS / (64·9·512) = 7 rows.
        (1, 64, 2, 10, 512, 3, 1, 1),
        (2, 8, 6, 7, 5, 1, 1, 0),
        (1, 4, 4, 8, 8, 3, 2, 1),
        (2, 5, 3, 9, 7, 3, 2, 0),
        (1, 4, 3, 6, 6, 3, 1, 0),
        (1, 2, 3, 5, 6, 5, 1, 2),
    ];

    /// A convolution with random bias, an input and a label for each of [`SHAPES`], once
    /// per path: im2col; Winograd where the shape allows it; Winograd with one tile row
    /// per strip.
    fn cases() -> impl Iterator<Item = (Conv2d, Tensor, String)> {
        SHAPES
            .into_iter()
            .flat_map(|(b, cin, cout, h, w, k, s, p)| {
                let x = Tensor::randn(0f32, 1f32, (b, cin, h, w), &Device::Cpu).unwrap();
                let c = conv(cin, cout, k, s, p);
                let paths = [
                    (usize::MAX, MAX_COLS, "im2col"),
                    (0, MAX_COLS, "winograd"),
                    (0, 1, "winograd strips"),
                ];
                paths.map(|(min_tiles, max_cols, path)| {
                    let mut c = c.clone();
                    c.winograd_min_tiles = min_tiles;
                    c.max_cols = max_cols;
                    let what = format!("{b} {cin} {cout} {h} {w} k{k} s{s} p{p} {path}");
                    (c, x.clone(), what)
                })
            })
    }

    #[test]
    fn the_fast_paths_equal_candles_convolution() {
        for (c, x, what) in cases() {
            assert_close(
                &c.forward(&x).unwrap(),
                &c.forward_candle(&x).unwrap(),
                &what,
            );
        }
    }

    #[test]
    fn upsampling_is_read_through() {
        for (c, x, what) in cases() {
            let (_, _, h, w) = x.dims4().unwrap();
            let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
            assert_close(
                &c.forward_upsampled(&x).unwrap(),
                &c.forward_candle(&up).unwrap(),
                &format!("{what} upsampled"),
            );
        }
    }

    #[test]
    fn addends_are_added() {
        for (c, x, what) in cases() {
            let (b, cout) = (x.dim(0).unwrap(), c.inner.weight().dim(0).unwrap());
            let y = c.forward_candle(&x).unwrap();
            let full = Tensor::randn(0f32, 1f32, y.shape(), &Device::Cpu).unwrap();
            assert_close(
                &c.forward_add(&x, Addend::Full(&full)).unwrap(),
                &(&y + &full).unwrap(),
                &format!("{what} full"),
            );
            for images in [b, 1] {
                let per = Tensor::randn(0f32, 1f32, (images, cout), &Device::Cpu).unwrap();
                let expected = y
                    .broadcast_add(&per.unsqueeze(2).unwrap().unsqueeze(3).unwrap())
                    .unwrap();
                assert_close(
                    &c.forward_add(&x, Addend::PerChannel(&per)).unwrap(),
                    &expected,
                    &format!("{what} per channel, {images} image(s)"),
                );
            }
        }
    }

    #[test]
    fn strided_inputs_and_missing_bias_work() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let inner = candle_nn::conv2d_no_bias(6, 5, 3, cfg, vb).unwrap();
        let c = Conv2d {
            inner,
            kernel: 3,
            stride: 1,
            padding: 1,
            bias: None,
            winograd_min_tiles: usize::MAX,
            max_cols: MAX_COLS,
        };
        // A transposed view: the op must see the values, not the storage order.
        let x = Tensor::randn(0f32, 1f32, (1, 6, 9, 7), &Device::Cpu)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let want = c.forward_candle(&x).unwrap();
        assert_close(&c.forward(&x).unwrap(), &want, "no bias");
        let c = c.with_winograd_min_tiles(0);
        assert_close(&c.forward(&x).unwrap(), &want, "no bias, winograd");
    }

    /// A convolution with the given weight and bias (VarMap's random initialisation
    /// divides by the input channel count, so it cannot build one without channels).
    fn conv_from(weight: Tensor, bias: Tensor, stride: usize, pad: usize) -> Conv2d {
        let (cout, cin, k, _) = weight.dims4().unwrap();
        let tensors = [("weight".to_string(), weight), ("bias".to_string(), bias)];
        let vb = VarBuilder::from_tensors(tensors.into(), DType::F32, &Device::Cpu);
        Conv2d::new(vb, cin, cout, k, stride, pad).unwrap()
    }

    #[test]
    fn zero_sized_shapes_give_empty_or_bias_outputs() {
        let dev = Device::Cpu;
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
        let bias = Tensor::new(&[1f32, -2., 3.], &dev).unwrap();
        // The output a convolution reading no input value gives: its bias everywhere.
        let bias_only = |shape: (usize, usize, usize, usize)| {
            bias.reshape((1, 3, 1, 1))
                .unwrap()
                .broadcast_as(shape)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        for k in [3, 1] {
            let p = k / 2;
            for (min_tiles, path) in [(usize::MAX, "im2col"), (0, "winograd")] {
                let what = format!("{k}×{k} {path}");
                let with = |c: Conv2d| c.with_winograd_min_tiles(min_tiles);
                // No image.
                let c = with(conv_from(zeros(&[3, 2, k, k]), bias.clone(), 1, p));
                let y = c.forward(&zeros(&[0, 2, 4, 4])).unwrap();
                assert_eq!(y.dims(), &[0, 3, 4, 4], "{what}");
                // No output channel.
                let c = with(conv_from(zeros(&[0, 2, k, k]), zeros(&[0]), 1, p));
                let y = c.forward(&zeros(&[1, 2, 4, 4])).unwrap();
                assert_eq!(y.dims(), &[1, 0, 4, 4], "{what}");
                // No input channel: every tap reads zero; bias and addend remain.
                let c = with(conv_from(zeros(&[3, 0, k, k]), bias.clone(), 1, p));
                let x = zeros(&[2, 0, 4, 4]);
                let want = bias_only((2, 3, 4, 4));
                assert_eq!(max_diff(&c.forward(&x).unwrap(), &want), 0.0, "{what}");
                let up = c.forward_upsampled(&x).unwrap();
                assert_eq!(max_diff(&up, &bias_only((2, 3, 8, 8))), 0.0, "{what}");
                let residual = Tensor::randn(0f32, 1f32, (2, 3, 4, 4), &dev).unwrap();
                let y = c.forward_add(&x, Addend::Full(&residual)).unwrap();
                let want = (&want + &residual).unwrap();
                assert_eq!(max_diff(&y, &want), 0.0, "{what} residual");
            }
        }
        // No row, but padding wide enough for an output: the taps all land in the padding.
        let c = conv_from(
            Tensor::randn(0f32, 1f32, (3, 2, 3, 3), &dev).unwrap(),
            bias.clone(),
            1,
            2,
        );
        let y = c.forward(&zeros(&[1, 2, 0, 4])).unwrap();
        assert_eq!(max_diff(&y, &bias_only((1, 3, 2, 6))), 0.0);
        // No row and no output: a clear error.
        let c = conv_from(zeros(&[3, 2, 3, 3]), bias, 1, 1);
        let err = c.forward(&zeros(&[1, 2, 0, 4])).unwrap_err().to_string();
        assert!(err.contains("3×3 kernel over a 0×4 input"), "{err}");
    }

    #[test]
    fn a_wrong_addend_is_refused() {
        let c = conv(2, 3, 3, 1, 1);
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let bad = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let err = c
            .forward_add(&x, Addend::Full(&bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("addend of 12 values"), "{err}");
    }
}
