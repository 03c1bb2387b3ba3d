//! Building blocks shared by the UNet and the VAE: residual blocks, down- and
//! upsamplers, attention and the spatial transformer.
//!
//! Everything here computes in the dtype of its weights (f32 on CPU). The layer names
//! follow the diffusers state dict, so a `VarBuilder` prefixed with a block's path finds
//! its tensors.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use crate::activation::geglu;
use crate::conv::{Addend, Conv2d};
use crate::linear::Linear;
pub(crate) use crate::norm::GroupNorm;

/// `ResnetBlock2D` with the default time-embedding handling (added after `conv1`).
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// The sizes of one [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` for blocks without one (the VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn new(vb: VarBuilder, cfg: ResnetConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let norm1 = GroupNorm::new(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?;
        let conv1 = Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?;
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(crate::linear::linear(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let norm2 = GroupNorm::new(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?;
        let conv2 = Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?;
        let conv_shortcut = if cin != cout {
            Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb` is the activated-later time embedding `(b, temb_channels)`; ignored when
    /// the block was built without one.
    pub(crate) fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?;
        // The time embedding and the shortcut are added by the convolutions themselves.
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(&temb.silu()?)?;
                self.conv1.forward_add(&h, Addend::PerChannel(&t))?
            }
            _ => self.conv1.forward(&h)?,
        };
        let h = self.norm2.forward_silu(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = self.conv2.forward_add(&h, Addend::Full(&shortcut))?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D` with a convolution of stride 2. With `padding == 0` the input is
/// first padded by one zero row at the bottom and one zero column at the right, as the
/// VAE encoder does.
#[derive(Debug, Clone)]
pub(crate) struct Downsample2D {
    conv: Conv2d,
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub(crate) fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let conv = Conv2d::new(vb.pp("conv"), channels, channels, 3, 2, padding)?;
        Ok(Self {
            conv,
            pad_bottom_right: padding == 0,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let x = x
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D`: nearest-neighbour interpolation followed by a 3×3 convolution.
#[derive(Debug, Clone)]
pub(crate) struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub(crate) fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let conv = Conv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1)?;
        Ok(Self { conv })
    }

    /// Upsamples to `size` (height, width), or to twice the input size when `None`.
    pub(crate) fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        match size {
            Some((th, tw)) if (th, tw) != (2 * h, 2 * w) => {
                self.conv.forward(&x.upsample_nearest2d(th, tw)?)
            }
            _ => self.conv.forward_upsampled(x),
        }
    }
}

/// Most attention scores computed at once (64 MiB of f32) by the materialising path;
/// larger products are split over heads and query rows so memory stays bounded at high
/// resolutions.
pub(crate) const MAX_SCORES: usize = 1 << 24;

/// Scaled dot-product attention over `heads` heads.
///
/// `q` is `(b, n, heads·d)`, `k` and `v` are `(b, m, heads·d)`; the result is
/// `(b, n, heads·d)`. f32 on the CPU runs the tiled kernel of [`crate::attention`];
/// other devices and dtypes materialise the scores with candle ops, the heads folded
/// into the batch so that each product is one batched matrix multiplication.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        crate::attention::tiled_attention(q, k, v, heads)
    } else {
        attention_chunked(q, k, v, heads, MAX_SCORES)
    }
}

pub(crate) fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    max_scores: usize,
) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    if k.dims() != [b, m, inner] || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if heads == 0 || inner % heads != 0 {
        candle_core::bail!("attention: width {inner} is not a multiple of {heads} heads");
    }
    // No keys: the product over an empty sum is zero (candle's softmax over an empty
    // last dimension would panic), as in the tiled kernel.
    if m == 0 || q.elem_count() == 0 {
        return Tensor::zeros((b, n, inner), q.dtype(), q.device());
    }
    let d = inner / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let split = |x: &Tensor, len: usize| -> Result<Tensor> {
        if heads == 1 {
            x.contiguous()
        } else {
            x.reshape((b, len, heads, d))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * heads, len, d))
        }
    };
    let q = (split(q, n)? * scale)?;
    let k = split(k, m)?;
    let v = split(v, m)?;
    let bh = b * heads;
    let out = if bh * n * m <= max_scores {
        scores_times_values(&q, &k, &v)?
    } else if n * m <= max_scores {
        let step = max_scores / (n * m);
        let parts = (0..bh)
            .step_by(step)
            .map(|i| {
                let len = step.min(bh - i);
                scores_times_values(
                    &q.narrow(0, i, len)?,
                    &k.narrow(0, i, len)?,
                    &v.narrow(0, i, len)?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?
    } else {
        let rows = (max_scores / m).max(1);
        let mut per_head = Vec::with_capacity(bh);
        for i in 0..bh {
            let (qi, ki, vi) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
            let parts = (0..n)
                .step_by(rows)
                .map(|r| scores_times_values(&qi.narrow(1, r, rows.min(n - r))?, &ki, &vi))
                .collect::<Result<Vec<_>>>()?;
            per_head.push(Tensor::cat(&parts, 1)?);
        }
        Tensor::cat(&per_head, 0)?
    };
    if heads == 1 {
        Ok(out)
    } else {
        out.reshape((b, heads, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, inner))
    }
}

/// `softmax(q·kᵀ)·v` for batched `(g, n, d)` queries (already scaled) and `(g, m, d)`
/// keys and values.
fn scores_times_values(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let weights = candle_nn::ops::softmax_last_dim(&q.contiguous()?.matmul(&k.t()?)?)?;
    weights.matmul(v)
}

/// diffusers' `Attention` as the transformer blocks use it: separate q/k/v projections
/// (no bias), an output projection with bias, `heads` heads of `inner / heads` each.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `context_dim` is the width of the keys' and values' input (the query width for
    /// self-attention).
    pub(crate) fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: crate::linear::linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: crate::linear::linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: crate::linear::linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: crate::linear::linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
        })
    }

    /// Attends from `x` `(b, n, query_dim)` to `context` `(b, m, context_dim)`.
    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = attention(&q, &k, &v, self.heads)?;
        self.to_out.forward(&out)
    }
}

/// The feed-forward of a transformer block: a GEGLU projection (exact erf GELU on the
/// gate half) and a linear layer back to the model width.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj: crate::linear::linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            out: crate::linear::linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&geglu(&self.proj.forward(x)?)?)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attention, cross-attention,
/// GEGLU feed-forward, each with a residual).
#[derive(Debug, Clone)]
pub(crate) struct TransformerBlock {
    /// Position of this block's self-attention among all self-attention layers of the
    /// model, in the order the forward pass runs them (0, 1, 2, …).
    pub(crate) index: usize,
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
        index: usize,
    ) -> Result<Self> {
        let ln = |name: &str| candle_nn::layer_norm(dim, 1e-5, vb.pp(name));
        Ok(Self {
            index,
            norm1: ln("norm1")?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: ln("norm2")?,
            attn2: Attention::new(vb.pp("attn2"), dim, cross_attention_dim, heads, head_dim)?,
            norm3: ln("norm3")?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (self.self_attention(&h)? + x)?;
        let h = self.norm2.forward(&x)?;
        let x = (self.attn2.forward(&h, context)? + x)?;
        let h = self.norm3.forward(&x)?;
        self.ff.forward(&h)? + x
    }

    /// The self-attention of this block on the normalised hidden states `h`.
    ///
    /// This is the single place where attention sharing ("reference-only") plugs in:
    /// the keys and values come from `h` here; a hook keyed by [`Self::index`] can
    /// record `h` in a reference pass and extend the key/value input in the main pass.
    fn self_attention(&self, h: &Tensor) -> Result<Tensor> {
        self.attn1
            .forward(h, h)
            .map_err(|e| e.context(format!("self-attention layer {}", self.index)))
    }
}

/// How a [`Transformer2D`] is laid out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

/// The input/output projection of a [`Transformer2D`]: a 1×1 convolution on the image
/// layout or a linear layer on the sequence layout.
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` on continuous input: group norm, projection in,
/// transformer blocks over the `h·w` positions, projection out, residual.
#[derive(Debug, Clone)]
pub(crate) struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    /// Builds the model; its blocks take self-attention indices from `next_index` on,
    /// which is advanced past them.
    pub(crate) fn new(
        vb: VarBuilder,
        cfg: Transformer2DConfig,
        next_index: &mut usize,
    ) -> Result<Self> {
        let c = cfg.channels;
        let inner = cfg.heads * cfg.head_dim;
        let norm = GroupNorm::new(vb.pp("norm"), cfg.groups, c, 1e-6)?;
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                Projection::Linear(crate::linear::linear(c, inner, vb.pp("proj_in"))?),
                Projection::Linear(crate::linear::linear(inner, c, vb.pp("proj_out"))?),
            )
        } else {
            (
                Projection::Conv(Conv2d::new(vb.pp("proj_in"), c, inner, 1, 1, 0)?),
                Projection::Conv(Conv2d::new(vb.pp("proj_out"), inner, c, 1, 1, 0)?),
            )
        };
        let vbb = vb.pp("transformer_blocks");
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            blocks.push(TransformerBlock::new(
                vbb.pp(i.to_string()),
                inner,
                cfg.heads,
                cfg.head_dim,
                cfg.cross_attention_dim,
                *next_index,
            )?);
            *next_index += 1;
        }
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_seq = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
        };
        let mut s = match &self.proj_in {
            Projection::Conv(conv) => to_seq(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_seq(&normed)?)?,
        };
        for block in &self.blocks {
            s = block.forward(&s, context)?;
        }
        let to_image = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        match &self.proj_out {
            Projection::Conv(conv) => conv.forward_add(&to_image(&s)?, Addend::Full(x)),
            Projection::Linear(lin) => to_image(&lin.forward(&s)?)? + x,
        }
    }
}

/// The VAE's mid-block attention: group norm, one head over all channels (q/k/v and
/// output projections with bias), residual connection.
#[derive(Debug, Clone)]
pub(crate) struct SpatialAttention {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    pub(crate) fn new(vb: VarBuilder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let lin = |name: &str| crate::linear::linear(channels, channels, vb.pp(name));
        Ok(Self {
            norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, eps)?,
            to_q: lin("to_q")?,
            to_k: lin("to_k")?,
            to_v: lin("to_v")?,
            to_out: lin("to_out.0")?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let s = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&s)?;
        let k = self.to_k.forward(&s)?;
        let v = self.to_v.forward(&s)?;
        let out = self.to_out.forward(&attention(&q, &k, &v, 1)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunked_attention_matches_whole() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 12, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 10, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 10, 8), &dev).unwrap();
        for heads in [1, 2, 4] {
            let whole = attention_chunked(&q, &k, &v, heads, usize::MAX).unwrap();
            // 130: one head per chunk; 250: two (or all, for one head); 100 and 7:
            // query rows split within a head.
            for max in [130, 250, 100, 7] {
                let part = attention_chunked(&q, &k, &v, heads, max).unwrap();
                let diff = crate::test_util::max_diff(&whole, &part);
                assert!(diff < 1e-6, "heads {heads} max {max}: {diff}");
            }
        }
    }

    #[test]
    fn single_query_attends_to_its_only_key() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 3, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, 1, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, 1, 4), &dev).unwrap();
        let out = attention(&q, &k, &v, 2).unwrap();
        let expected = v.broadcast_as((1, 3, 4)).unwrap();
        let diff = (out - expected).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
