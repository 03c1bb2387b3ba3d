//! The transformer's element-wise work, fused into single passes on the CPU.
//!
//! Between its matrix products a FLUX.2 block normalises and modulates each stream, puts
//! RMS norms and the rotary embedding on the queries and keys, gates the SwiGLU and adds
//! gated residuals. As candle ops each of these is several full passes over activations
//! of thousands of tokens × thousands of channels, with a fresh buffer per pass. Here each
//! is one parallel pass over the rows (tokens) that reads its inputs once and writes its
//! output once, with the vectorised math of [`crate::simd`]:
//!
//! - [`modulated_layer_norm`]: `layer_norm(x) · (1 + scale) + shift`;
//! - [`qk_norm_rope`]: per-head RMS norm of the queries and keys, the rotary embedding
//!   on both, and the values copied, written straight into the joint `[text, image]`
//!   sequence the attention reads (no concatenation);
//! - [`swiglu`]: `silu(first half) · second half`, reading rows in place (the single
//!   blocks' MLP half of the fused projection is a strided view);
//! - [`gated_residual`]: `x + gate · (y₁ + y₂ …)`.
//!
//! Every kernel takes `(batch, tokens, channels)` tensors whose rows are unit-stride
//! (any batch and token strides) and returns a new contiguous tensor. Other devices and
//! dtypes run the same math as candle ops (the `*_candle` functions, which the tests use
//! as the reference).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

use crate::rows::Rows;
use crate::simd::{mul_add, silu, Kernel, Simd};

/// Rows (tokens) handed to a rayon task at once.
const ROWS_PER_TASK: usize = 8;

/// Whether the fused CPU kernels run for `x` (f32 on the CPU).
fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `x` with unit-stride rows: itself when it already has them (no copy).
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let (_, _, w) = x.dims3()?;
    if w <= 1 || x.layout().stride()[2] == 1 {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// The values of a small `[n]` parameter (a modulation vector, a norm weight) as f32.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// Runs `f(batch, token, out_row)` over every row of a new `(b, s, width)` buffer, in
/// parallel.
fn map_rows(
    [b, s, width]: [usize; 3],
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> (CpuStorage, Shape) {
    let mut out = vec![0f32; b * s * width];
    if width > 0 {
        out.par_chunks_mut(width * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (i, row) in chunk.chunks_exact_mut(width).enumerate() {
                    let r = task * ROWS_PER_TASK + i;
                    f(r / s, r % s, row);
                }
            });
    }
    (CpuStorage::F32(out), Shape::from((b, s, width)))
}

/// Sum of `f(x)` over a slice in 16 independent f64 lanes (so the loop vectorises
/// without reassociating a single accumulator), then the lanes.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    const LANES: usize = 16;
    let mut acc = [0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v as f64);
        }
    }
    let mut total: f64 = acc.iter().sum();
    for &v in tail {
        total += f(v as f64);
    }
    total
}

// ---------------------------------------------------------------------------------
// Modulated layer norm.

/// `layer_norm(x) · (1 + scale) + shift` over the last dimension of `x` `(b, s, d)`: the
/// layer norm without affine parameters (epsilon `eps`), then diffusers' modulation with
/// `shift` and `scale` `[d]` shared by every row.
pub(super) fn modulated_layer_norm(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if shift.dims() != [d] || scale.dims() != [d] {
        candle_core::bail!(
            "modulated layer norm: shift {:?} and scale {:?} for {d} channels",
            shift.dims(),
            scale.dims()
        );
    }
    if !fused(x) {
        return modulated_layer_norm_candle(x, shift, scale, eps);
    }
    // `1 + scale` first, in f32, as the reference does.
    let scale1: Vec<f32> = values(scale)?.iter().map(|s| 1.0 + s).collect();
    let op = ModulatedNorm {
        shift: &values(shift)?,
        scale1: &scale1,
        eps,
        simd: Simd::detect(),
    };
    unit_rows(x)?.apply_op1_no_bwd(&op)
}

/// [`modulated_layer_norm`] with candle ops.
pub(super) fn modulated_layer_norm_candle(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

struct ModulatedNorm<'a> {
    shift: &'a [f32],
    scale1: &'a [f32],
    eps: f64,
    simd: Simd,
}

/// One row of [`ModulatedNorm`], compiled per instruction set.
struct NormRow<'a> {
    src: &'a [f32],
    dst: &'a mut [f32],
    shift: &'a [f32],
    scale1: &'a [f32],
    eps: f64,
}

impl Kernel for NormRow<'_> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let n = self.src.len() as f64;
        let mean = lane_sum(self.src, |v| v) / n;
        let var = lane_sum(self.src, |v| (v - mean) * (v - mean)) / n;
        let rstd = (1.0 / (var + self.eps).sqrt()) as f32;
        let mean = mean as f32;
        for (((o, &v), &s1), &sh) in self
            .dst
            .iter_mut()
            .zip(self.src)
            .zip(self.scale1)
            .zip(self.shift)
        {
            *o = mul_add::<FMA>((v - mean) * rstd, s1, sh);
        }
    }
}

impl CustomOp1 for ModulatedNorm<'_> {
    fn name(&self) -> &'static str {
        "flux2-modulated-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = Rows::new("modulated layer norm: input", storage, layout)?;
        let simd = self.simd;
        Ok(map_rows(x.dims, |b, s, dst| {
            simd.run(NormRow {
                src: x.row(b, s),
                dst,
                shift: self.shift,
                scale1: self.scale1,
                eps: self.eps,
            })
        }))
    }
}

// ---------------------------------------------------------------------------------
// Query/key RMS norm and rotary embedding.

/// The rotary embedding's angles for one joint sequence: `cos` and `sin` of each token's
/// angle for each pair of channels `(2i, 2i + 1)` of a head, `tokens × pairs` values each.
#[derive(Debug, Clone)]
pub(super) struct RopeTable {
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
    pub(super) tokens: usize,
    pub(super) pairs: usize,
}

impl RopeTable {
    /// `cos` and `sin` as `(tokens, pairs)` tensors on `device`, for the candle path.
    fn tensors(&self, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let shape = (self.tokens, self.pairs);
        Ok((
            Tensor::from_slice(&self.cos, shape, device)?,
            Tensor::from_slice(&self.sin, shape, device)?,
        ))
    }
}

/// One stream's input to [`qk_norm_rope`]: its projection `(b, s, ≥ 3·inner)`, whose
/// first `3·inner` channels are the queries, keys and values, and the RMS-norm weights
/// `[head_dim]` of its queries and keys.
pub(super) struct QkvStream<'a> {
    pub(super) qkv: &'a Tensor,
    pub(super) norm_q: &'a Tensor,
    pub(super) norm_k: &'a Tensor,
}

/// The joint sequence of `streams` (one or two, concatenated along the tokens in this
/// order) as `(b, Σ s, 3·heads·head_dim)`: queries and keys RMS-normalised per head
/// (epsilon `eps`, then the stream's weights) and rotated by `rope` (interleaved pairs,
/// one table row per joint token), values as they are.
pub(super) fn qk_norm_rope(
    streams: &[QkvStream],
    rope: &RopeTable,
    heads: usize,
    head_dim: usize,
    eps: f64,
) -> Result<Tensor> {
    let inner = heads * head_dim;
    if streams.is_empty() || streams.len() > 2 {
        candle_core::bail!("qk norm: {} streams", streams.len());
    }
    let mut tokens = 0;
    let mut batch = None;
    for s in streams {
        let (b, n, w) = s.qkv.dims3()?;
        if w < 3 * inner || batch.is_some_and(|batch| batch != b) {
            candle_core::bail!(
                "qk norm: a projection of shape {:?} for {heads} heads of {head_dim}",
                s.qkv.dims()
            );
        }
        for norm in [s.norm_q, s.norm_k] {
            if norm.dims() != [head_dim] {
                candle_core::bail!("qk norm: a weight of shape {:?}", norm.dims());
            }
        }
        batch = Some(b);
        tokens += n;
    }
    if !head_dim.is_multiple_of(2) || rope.tokens != tokens || 2 * rope.pairs != head_dim {
        candle_core::bail!(
            "rope: a table of {} tokens × {} pairs for {tokens} tokens of head width {head_dim}",
            rope.tokens,
            rope.pairs
        );
    }
    let first = streams[0].qkv;
    if !fused(first) {
        return qk_norm_rope_candle(streams, rope, heads, head_dim, eps);
    }
    let norms = streams
        .iter()
        .map(|s| Ok((values(s.norm_q)?, values(s.norm_k)?)))
        .collect::<Result<Vec<_>>>()?;
    let op = QkNormRope {
        norms: &norms,
        rope,
        heads,
        head_dim,
        eps: eps as f32,
        simd: Simd::detect(),
    };
    match streams {
        [one] => unit_rows(one.qkv)?.apply_op1_no_bwd(&op),
        [txt, img] => unit_rows(txt.qkv)?.apply_op2_no_bwd(&unit_rows(img.qkv)?, &op),
        _ => candle_core::bail!("qk norm: {} streams", streams.len()),
    }
}

/// [`qk_norm_rope`] with candle ops.
pub(super) fn qk_norm_rope_candle(
    streams: &[QkvStream],
    rope: &RopeTable,
    heads: usize,
    head_dim: usize,
    eps: f64,
) -> Result<Tensor> {
    let inner = heads * head_dim;
    let mut parts = Vec::with_capacity(streams.len());
    for s in streams {
        let (b, n, _) = s.qkv.dims3()?;
        let split = |i: usize| -> Result<Tensor> {
            s.qkv
                .narrow(2, i * inner, inner)?
                .reshape((b, n, heads, head_dim))
        };
        let rms = |x: Tensor, w: &Tensor| -> Result<Tensor> {
            let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
            x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?
                .broadcast_mul(&w.to_dtype(x.dtype())?)
        };
        let q = rms(split(0)?, s.norm_q)?;
        let k = rms(split(1)?, s.norm_k)?;
        parts.push((q, k, split(2)?));
    }
    let cat = |f: &dyn Fn(&(Tensor, Tensor, Tensor)) -> Tensor| -> Result<Tensor> {
        Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 1)
    };
    let (q, k, v) = (
        cat(&|p| p.0.clone())?,
        cat(&|p| p.1.clone())?,
        cat(&|p| p.2.clone())?,
    );
    let (b, s, _, _) = q.dims4()?;
    let (cos, sin) = rope.tensors(q.device())?;
    let (cos, sin) = (
        cos.to_dtype(q.dtype())?.reshape((1, s, 1, rope.pairs))?,
        sin.to_dtype(q.dtype())?.reshape((1, s, 1, rope.pairs))?,
    );
    let rotate = |x: &Tensor| -> Result<Tensor> {
        let x = x.reshape((b, s, heads, rope.pairs, 2))?;
        let re = x.narrow(4, 0, 1)?.squeeze(4)?;
        let im = x.narrow(4, 1, 1)?.squeeze(4)?;
        let out_re = (re.broadcast_mul(&cos)? - im.broadcast_mul(&sin)?)?;
        let out_im = (im.broadcast_mul(&cos)? + re.broadcast_mul(&sin)?)?;
        Tensor::stack(&[out_re, out_im], 4)?.reshape((b, s, inner))
    };
    Tensor::cat(&[rotate(&q)?, rotate(&k)?, v.reshape((b, s, inner))?], 2)
}

struct QkNormRope<'a> {
    /// Per stream: the query and key norm weights.
    norms: &'a [(Vec<f32>, Vec<f32>)],
    rope: &'a RopeTable,
    heads: usize,
    head_dim: usize,
    eps: f32,
    simd: Simd,
}

/// One joint token's queries, keys and values, compiled per instruction set.
struct QkRow<'a> {
    src: &'a [f32],
    dst: &'a mut [f32],
    norm_q: &'a [f32],
    norm_k: &'a [f32],
    cos: &'a [f32],
    sin: &'a [f32],
    head_dim: usize,
    eps: f32,
}

impl Kernel for QkRow<'_> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let d = self.head_dim;
        let inner = self.dst.len() / 3;
        let (qk, v) = self.dst.split_at_mut(2 * inner);
        v.copy_from_slice(&self.src[2 * inner..3 * inner]);
        for (part, weight) in [self.norm_q, self.norm_k].into_iter().enumerate() {
            let src = &self.src[part * inner..(part + 1) * inner];
            let dst = &mut qk[part * inner..(part + 1) * inner];
            for (x, out) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
                let ms = lane_sum(x, |v| v * v) / d as f64;
                let inv = 1.0 / ((ms as f32) + self.eps).sqrt();
                for ((((o, x), w), &c), &s) in out
                    .chunks_exact_mut(2)
                    .zip(x.chunks_exact(2))
                    .zip(weight.chunks_exact(2))
                    .zip(self.cos)
                    .zip(self.sin)
                {
                    let re = x[0] * inv * w[0];
                    let im = x[1] * inv * w[1];
                    o[0] = mul_add::<FMA>(re, c, -im * s);
                    o[1] = mul_add::<FMA>(im, c, re * s);
                }
            }
        }
    }
}

impl QkNormRope<'_> {
    /// Fills the joint rows from `streams` (in sequence order).
    fn run(&self, streams: &[Rows]) -> (CpuStorage, Shape) {
        let inner = self.heads * self.head_dim;
        let b = streams[0].dims[0];
        let lens: Vec<usize> = streams.iter().map(|s| s.dims[1]).collect();
        let total = lens.iter().sum();
        let pairs = self.rope.pairs;
        let simd = self.simd;
        map_rows([b, total, 3 * inner], |batch, token, dst| {
            // The stream holding joint token `token`, and the token's index in it.
            let (mut stream, mut t) = (0, token);
            while t >= lens[stream] {
                t -= lens[stream];
                stream += 1;
            }
            let (norm_q, norm_k) = &self.norms[stream];
            simd.run(QkRow {
                src: streams[stream].row(batch, t),
                dst,
                norm_q,
                norm_k,
                cos: &self.rope.cos[token * pairs..(token + 1) * pairs],
                sin: &self.rope.sin[token * pairs..(token + 1) * pairs],
                head_dim: self.head_dim,
                eps: self.eps,
            })
        })
    }
}

impl CustomOp1 for QkNormRope<'_> {
    fn name(&self) -> &'static str {
        "flux2-qk-norm-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = Rows::new("qk norm: projection", storage, layout)?;
        Ok(self.run(&[x]))
    }
}

impl CustomOp2 for QkNormRope<'_> {
    fn name(&self) -> &'static str {
        "flux2-qk-norm-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let txt = Rows::new("qk norm: text projection", s1, l1)?;
        let img = Rows::new("qk norm: image projection", s2, l2)?;
        Ok(self.run(&[txt, img]))
    }
}

// ---------------------------------------------------------------------------------
// SwiGLU.

/// `silu(gate) · value` where `h` is `(b, s, 2·m)`, `gate` its first `m` channels and
/// `value` the last; the result is `(b, s, m)`. `h` may be a view with row stride wider
/// than `2·m`.
pub(super) fn swiglu(h: &Tensor) -> Result<Tensor> {
    let width = h.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("swiglu: an odd last dimension ({width})");
    }
    if !fused(h) {
        return swiglu_candle(h);
    }
    unit_rows(h)?.apply_op1_no_bwd(&Swiglu {
        simd: Simd::detect(),
    })
}

/// [`swiglu`] with candle ops.
pub(super) fn swiglu_candle(h: &Tensor) -> Result<Tensor> {
    let m = h.dim(D::Minus1)? / 2;
    h.narrow(D::Minus1, 0, m)?.silu()? * h.narrow(D::Minus1, m, m)?
}

struct Swiglu {
    simd: Simd,
}

/// One row's SwiGLU, compiled per instruction set.
struct SwigluRow<'a> {
    src: &'a [f32],
    dst: &'a mut [f32],
}

impl Kernel for SwigluRow<'_> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let (gate, value) = self.src.split_at(self.dst.len());
        for ((o, &g), &v) in self.dst.iter_mut().zip(gate).zip(value) {
            *o = silu::<FMA>(g) * v;
        }
    }
}

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "flux2-swiglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = Rows::new("swiglu: input", storage, layout)?;
        let [b, s, w] = h.dims;
        let simd = self.simd;
        Ok(map_rows([b, s, w / 2], |batch, token, dst| {
            simd.run(SwigluRow {
                src: h.row(batch, token),
                dst,
            })
        }))
    }
}

// ---------------------------------------------------------------------------------
// Gated residual.

/// `x + gate · (y₁ + …)` for `x` and one or two `ys` `(b, s, d)` and `gate` `[d]`.
pub(super) fn gated_residual(x: &Tensor, gate: &Tensor, ys: &[&Tensor]) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if gate.dims() != [d] || ys.iter().any(|y| y.dims() != x.dims()) || ys.is_empty() {
        candle_core::bail!(
            "gated residual: x {:?}, gate {:?} and {} addends that do not fit together",
            x.dims(),
            gate.dims(),
            ys.len()
        );
    }
    if !fused(x) {
        return gated_residual_candle(x, gate, ys);
    }
    let op = GatedResidual {
        gate: &values(gate)?,
        simd: Simd::detect(),
    };
    let x = unit_rows(x)?;
    match ys {
        [y] => x.apply_op2_no_bwd(&unit_rows(y)?, &op),
        [y1, y2] => x.apply_op3_no_bwd(&unit_rows(y1)?, &unit_rows(y2)?, &op),
        _ => gated_residual_candle(&x, gate, ys),
    }
}

/// [`gated_residual`] with candle ops.
pub(super) fn gated_residual_candle(x: &Tensor, gate: &Tensor, ys: &[&Tensor]) -> Result<Tensor> {
    let mut sum = ys[0].clone();
    for y in &ys[1..] {
        sum = (sum + *y)?;
    }
    x + sum.broadcast_mul(gate)?
}

struct GatedResidual<'a> {
    gate: &'a [f32],
    simd: Simd,
}

/// One row of [`GatedResidual`], compiled per instruction set.
struct ResidualRow<'a> {
    x: &'a [f32],
    y1: &'a [f32],
    y2: Option<&'a [f32]>,
    gate: &'a [f32],
    dst: &'a mut [f32],
}

impl Kernel for ResidualRow<'_> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let rows = self.dst.iter_mut().zip(self.x).zip(self.gate);
        match self.y2 {
            None => {
                for (((o, &x), &g), &y) in rows.zip(self.y1) {
                    *o = mul_add::<FMA>(g, y, x);
                }
            }
            Some(y2) => {
                for ((((o, &x), &g), &y1), &y2) in rows.zip(self.y1).zip(y2) {
                    *o = mul_add::<FMA>(g, y1 + y2, x);
                }
            }
        }
    }
}

impl GatedResidual<'_> {
    fn run(&self, x: &Rows, y1: &Rows, y2: Option<&Rows>) -> Result<(CpuStorage, Shape)> {
        if y1.dims != x.dims || y2.is_some_and(|y| y.dims != x.dims) || x.dims[2] != self.gate.len()
        {
            candle_core::bail!("gated residual: operands that do not fit together");
        }
        let simd = self.simd;
        Ok(map_rows(x.dims, |b, s, dst| {
            simd.run(ResidualRow {
                x: x.row(b, s),
                y1: y1.row(b, s),
                y2: y2.map(|y| y.row(b, s)),
                gate: self.gate,
                dst,
            })
        }))
    }
}

impl CustomOp2 for GatedResidual<'_> {
    fn name(&self) -> &'static str {
        "flux2-gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = Rows::new("gated residual: x", s1, l1)?;
        let y = Rows::new("gated residual: y", s2, l2)?;
        self.run(&x, &y, None)
    }
}

impl CustomOp3 for GatedResidual<'_> {
    fn name(&self) -> &'static str {
        "flux2-gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = Rows::new("gated residual: x", s1, l1)?;
        let y1 = Rows::new("gated residual: y1", s2, l2)?;
        let y2 = Rows::new("gated residual: y2", s3, l3)?;
        self.run(&x, &y1, Some(&y2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, max_diff};
    use candle_core::Device;

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
    }

    /// `t` as a strided view: the same values inside a wider tensor (row stride
    /// `width + 3`), with an offset.
    fn strided(t: &Tensor) -> Tensor {
        let (b, s, w) = t.dims3().unwrap();
        let wide = Tensor::cat(&[&randn(&[b, s, 1]), t, &randn(&[b, s, 2])], 2).unwrap();
        let view = wide.narrow(2, 1, w).unwrap();
        assert!(!view.is_contiguous());
        view
    }

    #[test]
    fn modulated_layer_norm_matches_candle() {
        let x = randn(&[2, 7, 40]).affine(3.0, 1.5).unwrap();
        let (shift, scale) = (randn(&[40]), randn(&[40]));
        let want = modulated_layer_norm_candle(&x, &shift, &scale, 1e-6).unwrap();
        for x in [x.clone(), strided(&x)] {
            let got = modulated_layer_norm(&x, &shift, &scale, 1e-6).unwrap();
            assert!(got.is_contiguous());
            assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        }
        // The candle path is the definition: unit variance, then (1 + scale), shift.
        let ones = Tensor::ones(40, DType::F32, &Device::Cpu).unwrap();
        let zeros = ones.zeros_like().unwrap();
        let plain = modulated_layer_norm(&x, &zeros, &zeros, 1e-6).unwrap();
        let var = plain.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        assert!(max_diff(&var, &Tensor::ones_like(&var).unwrap()) < 1e-4);
        let doubled = modulated_layer_norm(&x, &ones, &ones, 1e-6).unwrap();
        let expect = ((plain * 2.0).unwrap() + 1.0).unwrap();
        assert!(max_diff(&doubled, &expect) < 1e-5);
    }

    #[test]
    fn swiglu_gates_with_the_first_half() {
        let h = (randn(&[2, 5, 12]) * 2.0).unwrap();
        let got = swiglu(&h).unwrap();
        let gate = h.narrow(2, 0, 6).unwrap();
        let value = h.narrow(2, 6, 6).unwrap();
        let sigmoid = (gate.neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .recip()
            .unwrap();
        let want = ((gate * sigmoid).unwrap() * value).unwrap();
        assert_eq!(got.dims(), &[2, 5, 6]);
        assert!(max_diff(&got, &want) < 1e-5);
        assert!(max_diff(&swiglu(&strided(&h)).unwrap(), &want) < 1e-5);
        assert!(max_diff(&swiglu_candle(&h).unwrap(), &want) < 1e-5);
        let odd = Tensor::zeros((1, 2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(swiglu(&odd).unwrap_err().to_string().contains("odd"));
    }

    #[test]
    fn gated_residual_matches_candle() {
        let x = randn(&[2, 4, 9]);
        let (y1, y2, gate) = (randn(&[2, 4, 9]), randn(&[2, 4, 9]), randn(&[9]));
        for ys in [vec![&y1], vec![&y1, &y2]] {
            let want = gated_residual_candle(&x, &gate, &ys).unwrap();
            let got = gated_residual(&x, &gate, &ys).unwrap();
            assert!(max_diff(&got, &want) < 1e-6);
        }
        let y1s = strided(&y1);
        let got = gated_residual(&strided(&x), &gate, &[&y1s, &y2]).unwrap();
        let want = gated_residual_candle(&x, &gate, &[&y1, &y2]).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
        assert!(gated_residual(&x, &gate, &[]).is_err());
        assert!(gated_residual(&x, &randn(&[8]), &[&y1]).is_err());
    }

    /// A table of random angles.
    fn table(tokens: usize, pairs: usize) -> RopeTable {
        let angles = (randn(&[tokens * pairs]) * 3.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        RopeTable {
            cos: angles.iter().map(|a| a.cos()).collect(),
            sin: angles.iter().map(|a| a.sin()).collect(),
            tokens,
            pairs,
        }
    }

    #[test]
    fn qk_norm_rope_follows_the_formula() {
        // One stream, one head of 4 channels: check a row by hand.
        let (heads, d) = (1, 4);
        let qkv = randn(&[1, 3, 3 * heads * d + 5]);
        let (nq, nk) = (randn(&[d]), randn(&[d]));
        let rope = table(3, d / 2);
        let stream = QkvStream {
            qkv: &qkv,
            norm_q: &nq,
            norm_k: &nk,
        };
        let got = qk_norm_rope(&[stream], &rope, heads, d, 1e-6).unwrap();
        assert_eq!(got.dims(), &[1, 3, 12]);
        let src = qkv.to_vec3::<f32>().unwrap();
        let out = got.to_vec3::<f32>().unwrap();
        for t in 0..3 {
            for (part, w) in [(0, &nq), (1, &nk)] {
                let w = w.to_vec1::<f32>().unwrap();
                let x = &src[0][t][part * d..(part + 1) * d];
                let rms = (x.iter().map(|v| v * v).sum::<f32>() / d as f32 + 1e-6).sqrt();
                let n: Vec<f32> = x.iter().zip(&w).map(|(v, w)| v / rms * w).collect();
                for i in 0..d / 2 {
                    let (c, s) = (rope.cos[t * 2 + i], rope.sin[t * 2 + i]);
                    let want = [
                        n[2 * i] * c - n[2 * i + 1] * s,
                        n[2 * i + 1] * c + n[2 * i] * s,
                    ];
                    let o = &out[0][t][part * d + 2 * i..part * d + 2 * i + 2];
                    assert!((o[0] - want[0]).abs() < 1e-5 && (o[1] - want[1]).abs() < 1e-5);
                }
            }
            // The values pass through.
            assert_eq!(&out[0][t][8..12], &src[0][t][8..12]);
        }
    }

    #[test]
    fn joint_qk_norm_rope_matches_candle() {
        let (heads, d) = (3, 8);
        let inner = heads * d;
        let txt = randn(&[2, 5, 3 * inner]);
        let img = (randn(&[2, 7, 3 * inner + 10]) * 2.0).unwrap();
        let weights: Vec<Tensor> = (0..4).map(|_| randn(&[d])).collect();
        let rope = table(12, d / 2);
        for img in [img.clone(), strided(&img)] {
            let streams = [
                QkvStream {
                    qkv: &txt,
                    norm_q: &weights[0],
                    norm_k: &weights[1],
                },
                QkvStream {
                    qkv: &img,
                    norm_q: &weights[2],
                    norm_k: &weights[3],
                },
            ];
            let want = qk_norm_rope_candle(&streams, &rope, heads, d, 1e-6).unwrap();
            let got = qk_norm_rope(&streams, &rope, heads, d, 1e-6).unwrap();
            assert_eq!(got.dims(), &[2, 12, 3 * inner]);
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5 * max_abs(&want), "{diff}");
        }
        // A table for the wrong number of tokens is refused.
        let stream = QkvStream {
            qkv: &txt,
            norm_q: &weights[0],
            norm_k: &weights[1],
        };
        assert!(qk_norm_rope(&[stream], &rope, heads, d, 1e-6).is_err());
    }

    #[test]
    fn zero_sized_inputs_give_empty_outputs() {
        let dev = Device::Cpu;
        let v = randn(&[6]);
        for shape in [[0, 3, 6], [2, 0, 6]] {
            let x = Tensor::zeros(&shape, DType::F32, &dev).unwrap();
            assert_eq!(
                modulated_layer_norm(&x, &v, &v, 1e-6).unwrap().dims(),
                shape
            );
            assert_eq!(gated_residual(&x, &v, &[&x]).unwrap().dims(), shape);
            assert_eq!(swiglu(&x).unwrap().dims(), [shape[0], shape[1], 3]);
        }
        let (w, rope) = (randn(&[2]), table(0, 1));
        let qkv = Tensor::zeros((1, 0, 6), DType::F32, &dev).unwrap();
        let stream = QkvStream {
            qkv: &qkv,
            norm_q: &w,
            norm_k: &w,
        };
        let got = qk_norm_rope(&[stream], &rope, 1, 2, 1e-6).unwrap();
        assert_eq!(got.dims(), &[1, 0, 6]);
    }
}
