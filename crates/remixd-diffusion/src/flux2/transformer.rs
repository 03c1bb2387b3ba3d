//! FLUX.2's denoising transformer, diffusers' `Flux2Transformer2DModel` (0.39.0): the
//! plain forward pass (no key/value cache, no LoRA).
//!
//! The image tokens (the noisy latent's patches, then any reference images' tokens) and
//! the text tokens (the prompt's hidden states) are embedded to the model width, run
//! through double-stream blocks (each stream normalised, modulated and projected with its
//! own weights, one joint attention over `[text, image]`, a SwiGLU feed-forward per
//! stream), then through single-stream blocks over the joint sequence (one fused
//! projection to queries, keys, values and the MLP's input; one output projection of
//! attention and MLP together). A final adaptive layer norm and projection give the
//! prediction for the image tokens.
//!
//! The timestep (and, for guidance-distilled models, the guidance scale) conditions every
//! block through three modulations (SiLU, then a linear layer) computed once per pass:
//! shift, scale and gate for the double blocks' image and text streams (two sets each:
//! attention and feed-forward) and for the single blocks (one set). Positions enter only
//! through a 4-axis rotary embedding `(T, H, W, L)` on the queries and keys.
//!
//! On the CPU in f32 the element-wise steps between the matrix products run as fused
//! single-pass kernels ([`kernels`]). On CPUs with AVX-512 the linear layers' weights are
//! packed at load (at their stored precision) for [`crate::sgemm`]'s matrix product, and
//! attention runs on the same micro-kernel without materialising the score matrix
//! ([`crate::sgemm::attention`]); elsewhere candle's products and the crate's attention
//! run. Each stream's query, key and value projections are one matrix product (weights
//! stacked at load), and the single blocks' output projection is split into its attention
//! and MLP halves so that no concatenation is needed. The position embedding's angles are
//! computed once per pass and shared by every block.

mod kernels;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{read_json, Context, Error, Result};
use crate::linear::{linear_b, linear_from, Linear};
use crate::sgemm::PackedWeight;
use kernels::{QkvStream, RopeTable};

/// The class `transformer/config.json` must name, when it names one.
const CLASS: &str = "Flux2Transformer2DModel";

/// `transformer/config.json`: diffusers' `Flux2Transformer2DModel` config. Absent keys
/// take diffusers' defaults; keys this module does not use are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Flux2TransformerConfig {
    /// The model class; `Flux2Transformer2DModel` when present.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Side of the square patches a token stands for; the output has
    /// `patch_size² · out_channels` channels per token.
    pub patch_size: usize,
    /// Channels of an image token (the packed latent).
    pub in_channels: usize,
    /// Channels of the prediction per patch position; `in_channels` when absent.
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    /// Width of an attention head (the rotary axes' widths add up to it).
    pub attention_head_dim: usize,
    /// Attention heads; the model width is `heads · head_dim`.
    pub num_attention_heads: usize,
    /// Width of a text token (the text encoder's stacked hidden states).
    pub joint_attention_dim: usize,
    /// Width of the sinusoidal timestep (and guidance) embedding.
    pub timestep_guidance_channels: usize,
    /// Hidden width of the feed-forwards and the single blocks' MLP, as a multiple of
    /// the model width.
    pub mlp_ratio: f64,
    /// Channels of each head given to each position axis `(T, H, W, L)`.
    pub axes_dims_rope: Vec<usize>,
    /// Base of the rotary embedding's frequencies.
    pub rope_theta: f64,
    /// Epsilon of every layer norm and RMS norm.
    pub eps: f64,
    /// Whether the model embeds a guidance scale (guidance-distilled models).
    pub guidance_embeds: bool,
}

impl Default for Flux2TransformerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            patch_size: 1,
            in_channels: 128,
            out_channels: None,
            num_layers: 8,
            num_single_layers: 48,
            attention_head_dim: 128,
            num_attention_heads: 48,
            joint_attention_dim: 15360,
            timestep_guidance_channels: 256,
            mlp_ratio: 3.0,
            axes_dims_rope: vec![32, 32, 32, 32],
            rope_theta: 2000.0,
            eps: 1e-6,
            guidance_embeds: true,
        }
    }
}

impl Flux2TransformerConfig {
    /// The model width, `num_attention_heads · attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels of the prediction per token: `patch_size² · out_channels` (or
    /// `in_channels`).
    pub fn output_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.out_channels.unwrap_or(self.in_channels)
    }

    /// The hidden width of the feed-forwards and MLPs: `int(inner_dim · mlp_ratio)`, as
    /// diffusers truncates it.
    pub fn mlp_hidden_dim(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }

    /// Checks the config against what this module implements; `source` names the file
    /// in errors.
    fn check(&self, source: &str) -> Result<()> {
        let bad = |key: &str, value: &dyn std::fmt::Debug, why: &str| {
            Err(Error::Unsupported(format!(
                "{source}: `{key}` = {value:?} ({why})"
            )))
        };
        if let Some(class) = self.class_name.as_deref().filter(|c| *c != CLASS) {
            return bad("_class_name", &class, "remixd runs Flux2Transformer2DModel");
        }
        if self.num_attention_heads == 0 {
            return bad("num_attention_heads", &0, "no heads");
        }
        if self.attention_head_dim == 0 || !self.attention_head_dim.is_multiple_of(2) {
            return bad(
                "attention_head_dim",
                &self.attention_head_dim,
                "the rotary embedding needs an even, non-zero head width",
            );
        }
        let axes = &self.axes_dims_rope;
        if axes.is_empty() || axes.iter().any(|d| d % 2 != 0) {
            return bad(
                "axes_dims_rope",
                axes,
                "each axis needs an even number of channels",
            );
        }
        if axes.iter().sum::<usize>() != self.attention_head_dim {
            return bad(
                "axes_dims_rope",
                axes,
                &format!(
                    "the axes' widths must add up to attention_head_dim = {}",
                    self.attention_head_dim
                ),
            );
        }
        if self.patch_size == 0 {
            return bad("patch_size", &0, "patches need a side");
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio >= 0.0) {
            return bad("mlp_ratio", &self.mlp_ratio, "not a finite ratio ≥ 0");
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope_theta", &self.rope_theta, "not a positive base");
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps", &self.eps, "not a finite epsilon ≥ 0");
        }
        Ok(())
    }
}

/// One set of a modulation's parameters: `shift`, `scale` and `gate`, each `[inner]`.
#[derive(Debug, Clone)]
struct Modulation {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

/// Splits a modulation's output `(1, 3·sets·dim)` into `sets` triples in diffusers'
/// order: shift, scale, gate of the first set, then of the second.
fn split_modulation(m: &Tensor, sets: usize, dim: usize) -> candle_core::Result<Vec<Modulation>> {
    let m = m.squeeze(0)?;
    let part = |i: usize| m.narrow(0, i * dim, dim);
    (0..sets)
        .map(|s| {
            Ok(Modulation {
                shift: part(3 * s)?,
                scale: part(3 * s + 1)?,
                gate: part(3 * s + 2)?,
            })
        })
        .collect()
}

/// A bias-free linear layer: packed for [`crate::sgemm`] on CPUs with AVX-512 (at the
/// weight's stored precision), the crate's [`Linear`] elsewhere.
#[derive(Debug, Clone)]
enum Dense {
    Packed(PackedWeight),
    Plain(Linear),
}

impl Dense {
    fn new(linear: Linear) -> candle_core::Result<Self> {
        Ok(match PackedWeight::new(linear.weight())? {
            Some(packed) => Self::Packed(packed),
            None => Self::Plain(linear),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Packed(w) => w.forward(x),
            Self::Plain(linear) => linear.forward(x),
        }
    }
}

/// A [`Dense`] layer from `weight` `(out_dim, in_dim)` under `vb`.
fn dense(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Dense> {
    Dense::new(linear_b(in_dim, out_dim, false, vb)?)
}

/// A [`Dense`] layer from a weight built at load (stacked or split).
fn dense_from(weight: Tensor) -> candle_core::Result<Dense> {
    Dense::new(linear_from(weight, None))
}

/// The sizes every block shares.
#[derive(Debug, Clone, Copy)]
struct Dims {
    /// Model width.
    inner: usize,
    heads: usize,
    head_dim: usize,
    /// Hidden width of the feed-forwards and MLPs.
    mlp: usize,
    eps: f64,
}

/// A small parameter (an RMS norm's weight) in the compute dtype.
fn small(vb: &VarBuilder, len: usize, name: &str, compute: DType) -> candle_core::Result<Tensor> {
    vb.get(len, name)?.to_dtype(compute)
}

/// One stream of a double-stream block.
#[derive(Debug, Clone)]
struct Stream {
    /// The query, key and value projections stacked into one.
    qkv: Dense,
    norm_q: Tensor,
    norm_k: Tensor,
    /// The attention's output projection.
    out: Dense,
    ff_in: Dense,
    ff_out: Dense,
}

impl Stream {
    /// `attn` is the block's attention, `names` this stream's projections in it (query,
    /// key, value, output) and norms (query, key); `ff` its feed-forward.
    fn new(
        attn: &VarBuilder,
        names: [&str; 6],
        ff: VarBuilder,
        dims: Dims,
        compute: DType,
    ) -> candle_core::Result<Self> {
        let Dims {
            inner,
            head_dim,
            mlp,
            ..
        } = dims;
        let weight = |name: &str, shape: (usize, usize)| attn.pp(name).get(shape, "weight");
        let qkv = Tensor::cat(
            &[
                weight(names[0], (inner, inner))?,
                weight(names[1], (inner, inner))?,
                weight(names[2], (inner, inner))?,
            ],
            0,
        )?;
        Ok(Self {
            qkv: dense_from(qkv)?,
            norm_q: small(&attn.pp(names[4]), head_dim, "weight", compute)?,
            norm_k: small(&attn.pp(names[5]), head_dim, "weight", compute)?,
            out: dense_from(weight(names[3], (inner, inner))?)?,
            ff_in: dense(inner, 2 * mlp, ff.pp("linear_in"))?,
            ff_out: dense(mlp, inner, ff.pp("linear_out"))?,
        })
    }

    /// The stream's query/key/value input to the joint attention.
    fn qkv_stream<'a>(&'a self, qkv: &'a Tensor) -> QkvStream<'a> {
        QkvStream {
            qkv,
            norm_q: &self.norm_q,
            norm_k: &self.norm_k,
        }
    }

    /// The rest of the block after attention: `x + gate·attn`, then the modulated
    /// feed-forward with its gated residual.
    fn finish(
        &self,
        x: &Tensor,
        attn: &Tensor,
        m: &[Modulation],
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        let x = kernels::gated_residual(x, &m[0].gate, &[&self.out.forward(attn)?])?;
        let h = kernels::modulated_layer_norm(&x, &m[1].shift, &m[1].scale, eps)?;
        let h = self
            .ff_out
            .forward(&kernels::swiglu(&self.ff_in.forward(&h)?)?)?;
        kernels::gated_residual(&x, &m[1].gate, &[&h])
    }
}

/// `Flux2TransformerBlock`: the double-stream block.
#[derive(Debug, Clone)]
struct DoubleBlock {
    img: Stream,
    txt: Stream,
    dims: Dims,
}

impl DoubleBlock {
    fn new(vb: VarBuilder, dims: Dims, compute: DType) -> candle_core::Result<Self> {
        let attn = vb.pp("attn");
        Ok(Self {
            img: Stream::new(
                &attn,
                ["to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k"],
                vb.pp("ff"),
                dims,
                compute,
            )?,
            txt: Stream::new(
                &attn,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "to_add_out",
                    "norm_added_q",
                    "norm_added_k",
                ],
                vb.pp("ff_context"),
                dims,
                compute,
            )?,
            dims,
        })
    }

    /// Runs the block on the text `(b, l, inner)` and image `(b, n, inner)` streams with
    /// their two modulation sets each; returns the new `(text, image)`.
    fn forward(
        &self,
        txt: &Tensor,
        img: &Tensor,
        m_txt: &[Modulation],
        m_img: &[Modulation],
        rope: &RopeTable,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let Dims {
            inner,
            heads,
            head_dim,
            eps,
            ..
        } = self.dims;
        let l = txt.dim(1)?;
        let n = img.dim(1)?;
        let norm_txt = kernels::modulated_layer_norm(txt, &m_txt[0].shift, &m_txt[0].scale, eps)?;
        let norm_img = kernels::modulated_layer_norm(img, &m_img[0].shift, &m_img[0].scale, eps)?;
        let qkv_txt = self.txt.qkv.forward(&norm_txt)?;
        let qkv_img = self.img.qkv.forward(&norm_img)?;
        let joint = kernels::qk_norm_rope(
            &[self.txt.qkv_stream(&qkv_txt), self.img.qkv_stream(&qkv_img)],
            rope,
            heads,
            head_dim,
            eps,
        )?;
        let attn = attention(&joint, inner, heads)?;
        let txt = self.txt.finish(txt, &attn.narrow(1, 0, l)?, m_txt, eps)?;
        let img = self.img.finish(img, &attn.narrow(1, l, n)?, m_img, eps)?;
        Ok((txt, img))
    }
}

/// Attention over the joint sequence `(b, s, 3·inner)` of queries, keys and values: the
/// packed kernel of [`crate::sgemm::attention`] where the CPU has AVX-512, the crate's
/// tiled (or, off the CPU, materialising) attention otherwise.
fn attention(qkv: &Tensor, inner: usize, heads: usize) -> candle_core::Result<Tensor> {
    let q = qkv.narrow(2, 0, inner)?;
    let k = qkv.narrow(2, inner, inner)?;
    let v = qkv.narrow(2, 2 * inner, inner)?;
    match crate::sgemm::attention::attention(&q, &k, &v, heads)? {
        Some(out) => Ok(out),
        None => crate::blocks::attention(&q, &k, &v, heads),
    }
}

/// `Flux2SingleTransformerBlock`: the single-stream ("parallel") block.
#[derive(Debug, Clone)]
struct SingleBlock {
    /// `to_qkv_mlp_proj`: queries, keys, values, then the MLP's gate and value halves.
    proj: Dense,
    norm_q: Tensor,
    norm_k: Tensor,
    /// The attention's columns of `to_out`.
    out_attn: Dense,
    /// The MLP's columns of `to_out`.
    out_mlp: Dense,
    dims: Dims,
}

impl SingleBlock {
    fn new(vb: VarBuilder, dims: Dims, compute: DType) -> candle_core::Result<Self> {
        let Dims {
            inner,
            head_dim,
            mlp,
            ..
        } = dims;
        let attn = vb.pp("attn");
        let out = attn.pp("to_out").get((inner, inner + mlp), "weight")?;
        Ok(Self {
            proj: dense(inner, 3 * inner + 2 * mlp, attn.pp("to_qkv_mlp_proj"))?,
            norm_q: small(&attn.pp("norm_q"), head_dim, "weight", compute)?,
            norm_k: small(&attn.pp("norm_k"), head_dim, "weight", compute)?,
            out_attn: dense_from(out.narrow(1, 0, inner)?.contiguous()?)?,
            out_mlp: dense_from(out.narrow(1, inner, mlp)?.contiguous()?)?,
            dims,
        })
    }

    /// Runs the block on the joint sequence `(b, s, inner)` with its modulation set.
    fn forward(&self, x: &Tensor, m: &Modulation, rope: &RopeTable) -> candle_core::Result<Tensor> {
        let Dims {
            inner,
            heads,
            head_dim,
            mlp,
            eps,
        } = self.dims;
        let h = kernels::modulated_layer_norm(x, &m.shift, &m.scale, eps)?;
        let proj = self.proj.forward(&h)?;
        let qkv = kernels::qk_norm_rope(
            &[QkvStream {
                qkv: &proj,
                norm_q: &self.norm_q,
                norm_k: &self.norm_k,
            }],
            rope,
            heads,
            head_dim,
            eps,
        )?;
        let attn = self.out_attn.forward(&attention(&qkv, inner, heads)?)?;
        let act = kernels::swiglu(&proj.narrow(2, 3 * inner, 2 * mlp)?)?;
        let mlp_out = self.out_mlp.forward(&act)?;
        kernels::gated_residual(x, &m.gate, &[&attn, &mlp_out])
    }
}

/// diffusers' `TimestepEmbedding` without biases: linear, SiLU, linear.
#[derive(Debug, Clone)]
struct TimestepMlp {
    linear_1: Dense,
    linear_2: Dense,
}

impl TimestepMlp {
    fn new(vb: VarBuilder, channels: usize, dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: dense(channels, dim, vb.pp("linear_1"))?,
            linear_2: dense(dim, dim, vb.pp("linear_2"))?,
        })
    }

    /// The embedding `(1, dim)` of `value` (already scaled by 1000).
    fn forward(
        &self,
        value: f32,
        channels: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        // `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`.
        let emb = crate::unet::timestep_embedding(value as f64, channels, true, 0.0);
        let emb = Tensor::from_vec(emb, (1, channels), device)?.to_dtype(dtype)?;
        self.linear_2.forward(&self.linear_1.forward(&emb)?.silu()?)
    }
}

/// The FLUX.2 transformer (`Flux2Transformer2DModel`), computing in the dtype it was
/// loaded for; linear weights stay at the precision they were stored in.
#[derive(Debug, Clone)]
pub struct Flux2Transformer {
    config: Flux2TransformerConfig,
    compute: DType,
    dims: Dims,
    time: TimestepMlp,
    guidance: Option<TimestepMlp>,
    mod_img: Dense,
    mod_txt: Dense,
    mod_single: Dense,
    x_embedder: Dense,
    context_embedder: Dense,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    /// `norm_out.linear`: the final layer norm's scale, then shift.
    norm_out: Dense,
    proj_out: Dense,
}

impl Flux2Transformer {
    /// Loads `config.json` and `diffusion_pytorch_model.safetensors` (or the shards its
    /// `.index.json` names) from the `transformer/` directory `dir`, computing in
    /// `compute` on `device`. Half-precision linear weights stay so (widened for each
    /// product); the norms' weights are converted to `compute`.
    pub fn load(dir: &Path, compute: DType, device: &Device) -> Result<Self> {
        let path = dir.join("config.json");
        let cfg: Flux2TransformerConfig = read_json(&path)?;
        cfg.check(&path.display().to_string())?;
        let (vb, _, file) =
            crate::model::weights_stored(dir, "diffusion_pytorch_model", compute, device)?;
        Self::build(vb, &cfg, compute)
            .context(|| format!("loading the FLUX.2 transformer from {}", file.display()))
    }

    /// Builds the model from weights named as in diffusers' state dict.
    pub fn new(vb: VarBuilder, cfg: &Flux2TransformerConfig, compute: DType) -> Result<Self> {
        cfg.check("transformer config")?;
        Self::build(vb, cfg, compute).context(|| "building the FLUX.2 transformer".to_string())
    }

    fn build(
        vb: VarBuilder,
        cfg: &Flux2TransformerConfig,
        compute: DType,
    ) -> candle_core::Result<Self> {
        let inner = cfg.inner_dim();
        let dims = Dims {
            inner,
            heads: cfg.num_attention_heads,
            head_dim: cfg.attention_head_dim,
            mlp: cfg.mlp_hidden_dim(),
            eps: cfg.eps,
        };
        let channels = cfg.timestep_guidance_channels;
        let embed = vb.pp("time_guidance_embed");
        let modulation =
            |name: &str, sets: usize| dense(inner, 3 * sets * inner, vb.pp(name).pp("linear"));
        let double = (0..cfg.num_layers)
            .map(|i| DoubleBlock::new(vb.pp(format!("transformer_blocks.{i}")), dims, compute))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let single = (0..cfg.num_single_layers)
            .map(|i| {
                SingleBlock::new(
                    vb.pp(format!("single_transformer_blocks.{i}")),
                    dims,
                    compute,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            compute,
            dims,
            time: TimestepMlp::new(embed.pp("timestep_embedder"), channels, inner)?,
            guidance: if cfg.guidance_embeds {
                Some(TimestepMlp::new(
                    embed.pp("guidance_embedder"),
                    channels,
                    inner,
                )?)
            } else {
                None
            },
            mod_img: modulation("double_stream_modulation_img", 2)?,
            mod_txt: modulation("double_stream_modulation_txt", 2)?,
            mod_single: modulation("single_stream_modulation", 1)?,
            x_embedder: dense(cfg.in_channels, inner, vb.pp("x_embedder"))?,
            context_embedder: dense(cfg.joint_attention_dim, inner, vb.pp("context_embedder"))?,
            double,
            single,
            norm_out: dense(inner, 2 * inner, vb.pp("norm_out").pp("linear"))?,
            proj_out: dense(inner, cfg.output_dim(), vb.pp("proj_out"))?,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &Flux2TransformerConfig {
        &self.config
    }

    /// Predicts the flow for the image tokens `hidden` `(b, n, in_channels)` (the noisy
    /// latent's tokens, then any reference images'), conditioned on the text tokens
    /// `encoder` `(b, l, joint_attention_dim)`.
    ///
    /// `timestep` is what diffusers' pipeline passes (the scheduler's sigma, `t / 1000`);
    /// the model scales it by 1000 itself, as does `guidance` (the guidance scale, used
    /// only by models with `guidance_embeds`; `None` there skips its embedding, as
    /// diffusers does). `img_ids` `(n, k)` and `txt_ids` `(l, k)` are the tokens'
    /// positions, one column per rotary axis `(T, H, W, L)` (extra columns are ignored; a
    /// leading batch dimension is read at its first entry, as diffusers does). Returns
    /// `(b, n, patch_size² · out_channels)` in the compute dtype.
    pub fn forward(
        &self,
        hidden: &Tensor,
        encoder: &Tensor,
        timestep: f64,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        guidance: Option<f64>,
    ) -> Result<Tensor> {
        self.run(hidden, encoder, timestep, img_ids, txt_ids, guidance)
            .context(|| "running the FLUX.2 transformer".to_string())
    }

    fn run(
        &self,
        hidden: &Tensor,
        encoder: &Tensor,
        timestep: f64,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        guidance: Option<f64>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, n, c) = hidden.dims3()?;
        let (eb, l, j) = encoder.dims3()?;
        if c != cfg.in_channels || eb != b || j != cfg.joint_attention_dim {
            candle_core::bail!(
                "hidden states {:?} and text states {:?} do not fit a model with \
                 in_channels = {} and joint_attention_dim = {}",
                hidden.dims(),
                encoder.dims(),
                cfg.in_channels,
                cfg.joint_attention_dim
            );
        }
        let device = hidden.device();
        let hidden = hidden.to_dtype(self.compute)?;
        let encoder = encoder.to_dtype(self.compute)?;
        let rope = self.rope(txt_ids, l, img_ids, n)?;

        // The conditioning: timestep (and guidance) embedding, then the modulations.
        let scaled = |v: f64| (v as f32) * 1000.0;
        let channels = cfg.timestep_guidance_channels;
        let mut temb = self
            .time
            .forward(scaled(timestep), channels, self.compute, device)?;
        if let (Some(embedder), Some(g)) = (&self.guidance, guidance) {
            temb = (temb + embedder.forward(scaled(g), channels, self.compute, device)?)?;
        }
        let act = temb.silu()?;
        let d = self.dims.inner;
        let m_img = split_modulation(&self.mod_img.forward(&act)?, 2, d)?;
        let m_txt = split_modulation(&self.mod_txt.forward(&act)?, 2, d)?;
        let m_single = split_modulation(&self.mod_single.forward(&act)?, 1, d)?;

        let mut img = self.x_embedder.forward(&hidden)?;
        let mut txt = self.context_embedder.forward(&encoder)?;
        for block in &self.double {
            (txt, img) = block.forward(&txt, &img, &m_txt, &m_img, &rope)?;
        }
        let mut joint = Tensor::cat(&[&txt, &img], 1)?;
        drop((txt, img));
        for block in &self.single {
            joint = block.forward(&joint, &m_single[0], &rope)?;
        }
        // `AdaLayerNormContinuous`: scale first, then shift.
        let out = self.norm_out.forward(&act)?.squeeze(0)?;
        let (scale, shift) = (out.narrow(0, 0, d)?, out.narrow(0, d, d)?);
        let img = joint.narrow(1, l, n)?;
        let img = kernels::modulated_layer_norm(&img, &shift, &scale, self.dims.eps)?;
        self.proj_out.forward(&img)
    }

    /// The rotary table of the joint sequence: the text tokens' positions, then the
    /// image tokens'.
    fn rope(
        &self,
        txt_ids: &Tensor,
        l: usize,
        img_ids: &Tensor,
        n: usize,
    ) -> candle_core::Result<RopeTable> {
        let axes = &self.config.axes_dims_rope;
        let txt = positions("txt_ids", txt_ids, l, axes.len())?;
        let img = positions("img_ids", img_ids, n, axes.len())?;
        Ok(rope_table(
            txt.iter().chain(&img).map(Vec::as_slice),
            axes,
            self.config.rope_theta,
        ))
    }
}

/// The rows of a position-id tensor `(tokens, ≥ axes)` (or `(batch, tokens, ≥ axes)`,
/// read at its first entry) as f32.
fn positions(
    what: &str,
    ids: &Tensor,
    tokens: usize,
    axes: usize,
) -> candle_core::Result<Vec<Vec<f32>>> {
    let ids = match ids.rank() {
        3 if ids.dim(0)? > 0 => ids.get(0)?,
        _ => ids.clone(),
    };
    match ids.dims() {
        &[t, k] if t == tokens && k >= axes => ids.to_dtype(DType::F32)?.to_vec2::<f32>(),
        dims => candle_core::bail!(
            "{what} has shape {dims:?}; expected ({tokens}, {axes}): one row per token, one \
             column per rotary axis"
        ),
    }
}

/// diffusers' `Flux2PosEmbed` for tokens at `positions`: for axis `a` of width `d_a`,
/// the channel pairs `i < d_a / 2` that follow the earlier axes' turn by
/// `position[a] · theta^(-2i / d_a)`; the angles are taken in f64 and their cosines and
/// sines rounded to f32, as the reference does.
fn rope_table<'a>(
    positions: impl Iterator<Item = &'a [f32]>,
    axes: &[usize],
    theta: f64,
) -> RopeTable {
    let freqs: Vec<(usize, f64)> = axes
        .iter()
        .enumerate()
        .flat_map(|(a, &d)| {
            (0..d / 2).map(move |i| (a, 1.0 / theta.powf((2 * i) as f64 / d as f64)))
        })
        .collect();
    let pairs = freqs.len();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    for pos in positions {
        for &(axis, freq) in &freqs {
            let angle = pos[axis] as f64 * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
        tokens += 1;
    }
    RopeTable {
        cos,
        sin,
        tokens,
        pairs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    /// A tiny config: 2 heads of 8 channels, rotary axes of 2 channels each.
    fn tiny() -> Flux2TransformerConfig {
        serde_json::from_str(
            r#"{"_class_name": "Flux2Transformer2DModel", "in_channels": 4, "num_layers": 1,
                "num_single_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                "joint_attention_dim": 12, "timestep_guidance_channels": 16,
                "axes_dims_rope": [2, 2, 2, 2], "guidance_embeds": false}"#,
        )
        .unwrap()
    }

    /// Random weights for `cfg` (norm weights around 1).
    fn random_weights(cfg: &Flux2TransformerConfig) -> VarMap {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        Flux2Transformer::new(vb, cfg, DType::F32).unwrap();
        for (name, var) in map.data().lock().unwrap().iter() {
            let shape = var.shape();
            let v = if shape.rank() == 1 {
                Tensor::randn(1f32, 0.2, shape, &Device::Cpu).unwrap()
            } else {
                let fan_in = shape.dims()[1] as f32;
                (Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap() / fan_in.sqrt() as f64)
                    .unwrap()
            };
            var.set(&v).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        map
    }

    /// The model of `weights`, computing in `compute`.
    fn model_of(
        weights: &VarMap,
        cfg: &Flux2TransformerConfig,
        compute: DType,
    ) -> Flux2Transformer {
        let vb = VarBuilder::from_varmap(weights, DType::F32, &Device::Cpu);
        Flux2Transformer::new(vb, cfg, compute).unwrap()
    }

    /// A model with random weights, computing in f32.
    fn random_model(cfg: &Flux2TransformerConfig) -> Flux2Transformer {
        model_of(&random_weights(cfg), cfg, DType::F32)
    }

    fn ids(rows: &[[f32; 4]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn defaults_are_diffusers() {
        let cfg: Flux2TransformerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, Flux2TransformerConfig::default());
        assert_eq!(cfg.inner_dim(), 6144);
        assert_eq!(cfg.mlp_hidden_dim(), 18432);
        assert_eq!(cfg.output_dim(), 128);
        cfg.check("x").unwrap();
        // klein 4B's sizes.
        let klein: Flux2TransformerConfig = serde_json::from_str(
            r#"{"num_attention_heads": 24, "num_layers": 5, "num_single_layers": 20,
                "joint_attention_dim": 7680, "guidance_embeds": false, "rope_theta": 2000,
                "out_channels": null, "patch_size": 2}"#,
        )
        .unwrap();
        klein.check("x").unwrap();
        assert_eq!(klein.inner_dim(), 3072);
        assert_eq!(klein.mlp_hidden_dim(), 9216);
        assert_eq!(klein.output_dim(), 512);
    }

    #[test]
    fn unsupported_values_are_named() {
        for (json, key) in [
            (
                r#"{"_class_name": "FluxTransformer2DModel"}"#,
                "_class_name",
            ),
            (r#"{"axes_dims_rope": [32, 32, 32]}"#, "axes_dims_rope"),
            (r#"{"axes_dims_rope": [33, 31, 32, 32]}"#, "axes_dims_rope"),
            (r#"{"attention_head_dim": 127}"#, "attention_head_dim"),
            (r#"{"num_attention_heads": 0}"#, "num_attention_heads"),
            (r#"{"patch_size": 0}"#, "patch_size"),
            (r#"{"rope_theta": 0}"#, "rope_theta"),
        ] {
            let cfg: Flux2TransformerConfig = serde_json::from_str(json).unwrap();
            match cfg.check("dir/config.json") {
                Err(Error::Unsupported(m)) => {
                    assert!(m.contains(key) && m.contains("dir/config.json"), "{m}")
                }
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn modulation_splits_shift_scale_gate_per_set() {
        let m = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((1, 12))
            .unwrap();
        let sets = split_modulation(&m, 2, 2).unwrap();
        let v = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        assert_eq!(v(&sets[0].shift), [0., 1.]);
        assert_eq!(v(&sets[0].scale), [2., 3.]);
        assert_eq!(v(&sets[0].gate), [4., 5.]);
        assert_eq!(v(&sets[1].shift), [6., 7.]);
        assert_eq!(v(&sets[1].scale), [8., 9.]);
        assert_eq!(v(&sets[1].gate), [10., 11.]);
    }

    #[test]
    fn rope_table_follows_the_formula() {
        let axes = [4, 2, 6];
        let positions: [[f32; 3]; 2] = [[0., 3., 5.], [10., 1., 2.5]];
        let t = rope_table(positions.iter().map(|p| &p[..]), &axes, 2000.0);
        assert_eq!((t.tokens, t.pairs), (2, 6));
        // Pair p of the head belongs to axis 0 for p < 2, axis 1 for p = 2, axis 2 after.
        let expect = |pos: &[f32], p: usize| {
            let (axis, i, d) = match p {
                0 | 1 => (0, p, 4),
                2 => (1, 0, 2),
                _ => (2, p - 3, 6),
            };
            pos[axis] as f64 * 2000f64.powf(-(2.0 * i as f64) / d as f64)
        };
        for (token, pos) in positions.iter().enumerate() {
            for p in 0..6 {
                let angle = expect(pos, p);
                assert_eq!(t.cos[token * 6 + p], angle.cos() as f32, "{token} {p}");
                assert!((t.sin[token * 6 + p] - angle.sin() as f32).abs() < 1e-7);
            }
        }
        // Position 0 turns nothing.
        assert_eq!(&t.cos[..2], &[1.0, 1.0]);
        assert_eq!(&t.sin[..2], &[0.0, 0.0]);
    }

    #[test]
    fn forward_shapes_and_batch_independence() {
        let cfg = tiny();
        let model = random_model(&cfg);
        let dev = Device::Cpu;
        let hidden = Tensor::randn(0f32, 1., (2, 6, 4), &dev).unwrap();
        let encoder = Tensor::randn(0f32, 1., (2, 3, 12), &dev).unwrap();
        let img = ids(&[
            [0., 0., 0., 0.],
            [0., 0., 1., 0.],
            [0., 1., 0., 0.],
            [0., 1., 1., 0.],
            [10., 0., 0., 0.],
            [10., 0., 1., 0.],
        ]);
        let txt = ids(&[[0., 0., 0., 0.], [0., 0., 0., 1.], [0., 0., 0., 2.]]);
        let out = model
            .forward(&hidden, &encoder, 0.5, &img, &txt, None)
            .unwrap();
        assert_eq!(out.dims(), &[2, 6, 4]);
        // Each batch entry is computed on its own.
        let one = model
            .forward(
                &hidden.narrow(0, 1, 1).unwrap(),
                &encoder.narrow(0, 1, 1).unwrap(),
                0.5,
                &img.unsqueeze(0).unwrap(),
                &txt,
                None,
            )
            .unwrap();
        let diff = crate::test_util::max_diff(&one, &out.narrow(0, 1, 1).unwrap());
        assert!(diff < 1e-5, "{diff}");
        // The timestep matters; an unused guidance does not.
        let other = model
            .forward(&hidden, &encoder, 0.9, &img, &txt, Some(3.0))
            .unwrap();
        assert!(crate::test_util::max_diff(&other, &out) > 1e-3);
        let guided = model
            .forward(&hidden, &encoder, 0.5, &img, &txt, Some(3.0))
            .unwrap();
        assert_eq!(crate::test_util::max_diff(&guided, &out), 0.0);
        // No text tokens; no image tokens.
        let none = encoder.narrow(1, 0, 0).unwrap();
        let out = model
            .forward(
                &hidden,
                &none,
                0.5,
                &img,
                &txt.narrow(0, 0, 0).unwrap(),
                None,
            )
            .unwrap();
        assert_eq!(out.dims(), &[2, 6, 4]);
        let out = model
            .forward(
                &hidden.narrow(1, 0, 0).unwrap(),
                &encoder,
                0.5,
                &img.narrow(0, 0, 0).unwrap(),
                &txt,
                None,
            )
            .unwrap();
        assert_eq!(out.dims(), &[2, 0, 4]);
    }

    #[test]
    fn fused_cpu_path_matches_candle_ops() {
        // The same weights computing in f64 run every step as candle ops (the path of
        // other devices); f32 on the CPU runs the fused kernels, the tiled attention and
        // (with 40 image tokens) the packed matrix products.
        let cfg = tiny();
        let weights = random_weights(&cfg);
        let fused = model_of(&weights, &cfg, DType::F32);
        let wide = model_of(&weights, &cfg, DType::F64);
        let dev = Device::Cpu;
        let hidden = Tensor::randn(0f32, 1., (1, 40, 4), &dev).unwrap();
        let encoder = Tensor::randn(0f32, 1., (1, 5, 12), &dev).unwrap();
        let img: Vec<[f32; 4]> = (0..40)
            .map(|i| {
                [
                    (i / 20 * 10) as f32,
                    (i % 20 / 5) as f32,
                    (i % 5) as f32,
                    0.,
                ]
            })
            .collect();
        let txt: Vec<[f32; 4]> = (0..5).map(|l| [0., 0., 0., l as f32]).collect();
        let (img, txt) = (ids(&img), ids(&txt));
        let want = wide
            .forward(&hidden, &encoder, 0.3, &img, &txt, None)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let got = fused
            .forward(&hidden, &encoder, 0.3, &img, &txt, None)
            .unwrap();
        let diff = crate::test_util::max_diff(&got, &want);
        let scale = crate::test_util::max_abs(&want);
        assert!(diff < 1e-5 * scale, "{diff} at scale {scale}");
    }

    #[test]
    fn half_precision_weights_stay_half_and_match() {
        // The same (bf16-representable) weights stored in bf16 and in f32 give the same
        // outputs: the bf16 panels are widened exactly in the product.
        let cfg = tiny();
        let weights = random_weights(&cfg);
        let tensors: std::collections::HashMap<String, Tensor> = weights
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().to_dtype(DType::BF16).unwrap()))
            .collect();
        let dev = Device::Cpu;
        let half = VarBuilder::from_tensors(tensors.clone(), DType::BF16, &dev);
        let half = Flux2Transformer::new(half, &cfg, DType::F32).unwrap();
        let widened = tensors
            .into_iter()
            .map(|(name, t)| (name, t.to_dtype(DType::F32).unwrap()))
            .collect();
        let full = VarBuilder::from_tensors(widened, DType::F32, &dev);
        let full = Flux2Transformer::new(full, &cfg, DType::F32).unwrap();
        let hidden = Tensor::randn(0f32, 1., (1, 40, 4), &dev).unwrap();
        let encoder = Tensor::randn(0f32, 1., (1, 3, 12), &dev).unwrap();
        let img: Vec<[f32; 4]> = (0..40)
            .map(|i| [0., (i / 8) as f32, (i % 8) as f32, 0.])
            .collect();
        let txt = ids(&[[0., 0., 0., 0.], [0., 0., 0., 1.], [0., 0., 0., 2.]]);
        let img = ids(&img);
        let run =
            |m: &Flux2Transformer| m.forward(&hidden, &encoder, 0.6, &img, &txt, None).unwrap();
        let (a, b) = (run(&half), run(&full));
        assert_eq!(a.dtype(), DType::F32);
        let diff = crate::test_util::max_diff(&a, &b);
        assert!(diff <= 1e-6 * crate::test_util::max_abs(&b), "{diff}");
    }

    #[test]
    fn guidance_changes_the_output_of_guided_models() {
        let mut cfg = tiny();
        cfg.guidance_embeds = true;
        cfg.patch_size = 2;
        let model = random_model(&cfg);
        let dev = Device::Cpu;
        let hidden = Tensor::randn(0f32, 1., (1, 2, 4), &dev).unwrap();
        let encoder = Tensor::randn(0f32, 1., (1, 1, 12), &dev).unwrap();
        let img = ids(&[[0., 0., 0., 0.], [0., 0., 1., 0.]]);
        let txt = ids(&[[0., 0., 0., 0.]]);
        let run = |g| {
            model
                .forward(&hidden, &encoder, 0.5, &img, &txt, g)
                .unwrap()
        };
        let (a, b, c) = (run(Some(2.0)), run(Some(4.0)), run(None));
        assert_eq!(a.dims(), &[1, 2, 16]);
        assert!(crate::test_util::max_diff(&a, &b) > 1e-4);
        assert!(crate::test_util::max_diff(&a, &c) > 1e-4);
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let model = random_model(&tiny());
        let dev = Device::Cpu;
        let hidden = Tensor::randn(0f32, 1., (1, 2, 4), &dev).unwrap();
        let encoder = Tensor::randn(0f32, 1., (1, 1, 12), &dev).unwrap();
        let img = ids(&[[0., 0., 0., 0.], [0., 0., 1., 0.]]);
        let txt = ids(&[[0., 0., 0., 0.]]);
        let err = |h: &Tensor, e: &Tensor, i: &Tensor, t: &Tensor| {
            model
                .forward(h, e, 0.5, i, t, None)
                .unwrap_err()
                .to_string()
        };
        let wide = Tensor::randn(0f32, 1., (1, 2, 5), &dev).unwrap();
        assert!(err(&wide, &encoder, &img, &txt).contains("in_channels = 4"));
        let two = Tensor::randn(0f32, 1., (2, 1, 12), &dev).unwrap();
        assert!(err(&hidden, &two, &img, &txt).contains("do not fit"));
        assert!(err(&hidden, &encoder, &txt, &txt).contains("img_ids"));
        let short = img.narrow(1, 0, 3).unwrap();
        assert!(err(&hidden, &encoder, &short, &txt).contains("img_ids"));
        assert!(err(&hidden, &encoder, &img, &img).contains("txt_ids"));
    }

    #[test]
    fn missing_weight_is_named() {
        let vb = VarBuilder::from_tensors(Default::default(), DType::F32, &Device::Cpu);
        let err = Flux2Transformer::new(vb, &tiny(), DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLUX.2 transformer"), "{err}");
        assert!(err.contains("weight"), "{err}");
    }
}
