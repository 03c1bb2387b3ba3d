//! The Qwen3 decoder (transformers' `Qwen3Model`, the body of `Qwen3ForCausalLM`) as
//! FLUX.2 [klein]'s text encoder, built from `text_encoder/config.json` and
//! `model.safetensors` (or the shards its index names).
//!
//! The pipeline reads a few intermediate hidden states, not the language model's logits,
//! so the head (`lm_head`) is never loaded, and neither are the decoder layers after the
//! deepest one asked for. Each layer is pre-norm: RMSNorm, grouped-query self-attention
//! whose queries and keys are RMS-normalised per head and then rotated (RoPE, "rotate
//! half" layout, positions `0..L`), a residual add, RMSNorm, a SwiGLU MLP, a residual add.
//!
//! Semantics matched against transformers 4.57.6 (PyTorch's SDPA attention, the default):
//!
//! - `hidden_states[0]` is the token embeddings and `hidden_states[k]` the output of
//!   layer `k`, except the last one, `hidden_states[num_hidden_layers]`, which is the
//!   output *after* the final `model.norm` (transformers overwrites the last recorded
//!   state with `last_hidden_state`);
//! - query `q` attends to key `k` when `k <= q` and the key is a real token
//!   (`attention_mask[k] != 0`), whatever the query itself is: a padding position's
//!   query sees every real token before it, so with right padding every padding
//!   position attends to the whole prompt, and its hidden state is well defined;
//! - a query with no key to attend to (only when the mask starts with padding) gets a
//!   zero attention output, as PyTorch's SDPA gives for a fully masked row;
//! - RMSNorm normalises in f32 and scales by its weight in the compute dtype; attention
//!   scales by `head_dim^-0.5`.
//!
//! Weights stay at their stored precision (bf16 for the real model) and are widened per
//! product (`crate::linear`); the embedding table (151936 × 2560 in the real model) is
//! kept as stored and only the looked-up rows are widened. The attention materialises
//! its scores, but only against the keys up to the last real token: with a 512-token
//! padded prompt of a few dozen real tokens that is a small fraction of the full matrix.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{read_json, Context, Error, Result};
use crate::linear::{linear_no_bias, widened, Linear};

fn default_vocab_size() -> usize {
    151936
}
fn default_hidden_size() -> usize {
    4096
}
fn default_intermediate_size() -> usize {
    22016
}
fn default_num_hidden_layers() -> usize {
    32
}
fn default_num_attention_heads() -> usize {
    32
}
fn default_head_dim() -> usize {
    128
}
fn default_hidden_act() -> String {
    "silu".to_owned()
}
fn default_max_position_embeddings() -> usize {
    32768
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_sliding_window() -> Option<usize> {
    Some(4096)
}
fn default_max_window_layers() -> usize {
    28
}

/// `text_encoder/config.json` of a Qwen3 model: the keys the encoder reads, with
/// transformers' `Qwen3Config` defaults for absent ones.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    /// Number of token embeddings.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Number of decoder layers.
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    /// Key and value heads per layer (grouped-query attention); absent or `null` means
    /// one per query head.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head (not necessarily `hidden_size / num_attention_heads`).
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// Activation of the MLP's gate; only `silu` is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// The longest sequence the model takes.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding's frequencies.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (YaRN, linear, …); only `null` is supported.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// Whether the attention projections have biases; only `false` is supported.
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether some layers use sliding-window attention (unsupported when any does).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The sliding window's width, when `use_sliding_window` is set.
    #[serde(default = "default_sliding_window")]
    pub sliding_window: Option<usize>,
    /// Layers from this index on slide when `use_sliding_window` is set and
    /// `layer_types` is absent.
    #[serde(default = "default_max_window_layers")]
    pub max_window_layers: usize,
    /// Each layer's attention, `full_attention` or `sliding_attention`.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

impl Qwen3Config {
    /// Reads and checks a `config.json`, naming the file in every error.
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|e| match e {
            Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", path.display())),
            e => e,
        })?;
        Ok(cfg)
    }

    /// Key and value heads per layer (`num_attention_heads` when not given).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Each layer's attention type, as transformers derives it when `layer_types` is
    /// absent: sliding from `max_window_layers` on when a window is in use.
    fn layer_kinds(&self) -> Vec<String> {
        match &self.layer_types {
            Some(kinds) => kinds.clone(),
            None => {
                let window = self.use_sliding_window && self.sliding_window.is_some();
                (0..self.num_hidden_layers)
                    .map(|i| {
                        if window && i >= self.max_window_layers {
                            "sliding_attention".to_owned()
                        } else {
                            "full_attention".to_owned()
                        }
                    })
                    .collect()
            }
        }
    }

    /// Refuses what this encoder does not implement, with a sentence naming the key.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |m: String| Err(Error::Unsupported(m));
        if self.hidden_act != "silu" {
            return unsupported(format!(
                "text encoder hidden_act {:?} (only \"silu\" is supported)",
                self.hidden_act
            ));
        }
        if let Some(scaling) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return unsupported(format!(
                "text encoder rope_scaling {scaling} (only null, plain RoPE, is supported)"
            ));
        }
        if self.attention_bias {
            return unsupported(
                "text encoder attention_bias true (Qwen3's projections have no bias)".to_owned(),
            );
        }
        let kinds = self.layer_kinds();
        if kinds.len() != self.num_hidden_layers {
            return unsupported(format!(
                "text encoder layer_types names {} layers for num_hidden_layers {}",
                kinds.len(),
                self.num_hidden_layers
            ));
        }
        if let Some(i) = kinds.iter().position(|k| k != "full_attention") {
            return unsupported(format!(
                "text encoder layer {i} uses {:?} (use_sliding_window {}, sliding_window \
                 {:?}); only full attention is supported",
                kinds[i], self.use_sliding_window, self.sliding_window
            ));
        }
        let (heads, kv) = (self.num_attention_heads, self.kv_heads());
        if heads == 0 || kv == 0 || heads % kv != 0 {
            return unsupported(format!(
                "text encoder num_attention_heads {heads} is not a positive multiple of \
                 num_key_value_heads {kv}"
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return unsupported(format!(
                "text encoder head_dim {} (RoPE needs a positive even width)",
                self.head_dim
            ));
        }
        let positive = |v: f64| v.partial_cmp(&0.0) == Some(std::cmp::Ordering::Greater);
        if !positive(self.rope_theta) || !(positive(self.rms_norm_eps) || self.rms_norm_eps == 0.0)
        {
            return unsupported(format!(
                "text encoder rope_theta {} / rms_norm_eps {} out of range",
                self.rope_theta, self.rms_norm_eps
            ));
        }
        Ok(())
    }
}

/// Qwen3's RMSNorm: `x / sqrt(mean(x²) + eps)` computed in f32, brought back to the
/// input's dtype, then scaled by the weight.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// The weight `name` (`(width,)`), converted to `compute` at load.
    fn new(width: usize, eps: f64, compute: DType, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(width, "weight")?.to_dtype(compute)?,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if xs.dtype() == DType::F32 {
            // candle's fused op: the same arithmetic in one pass.
            candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, self.eps)
        } else {
            candle_nn::ops::rms_norm_slow(xs, &self.weight, self.eps)
        }
    }
}

/// Which keys each query attends to, for one prompt of `len` tokens.
#[derive(Debug)]
struct AttentionMask {
    /// Keys `0..keys` are the only ones any query may see (up to the last real token).
    keys: usize,
    /// `(len, keys)` additive bias: `0` where the query attends to the key, `-inf`
    /// elsewhere; `0` across a query's row when it attends to nothing.
    bias: Tensor,
    /// `(len, 1)`: `1` for queries that attend to some key, `0` for the others; `None`
    /// when every query does.
    keep: Option<Tensor>,
}

impl AttentionMask {
    /// The causal mask restricted to real keys: query `q` sees key `k` iff `k <= q`
    /// and `mask[k] != 0`. `None` when no key is real.
    fn new(mask: &[u32], dtype: DType, device: &Device) -> candle_core::Result<Option<Self>> {
        let Some(last) = mask.iter().rposition(|&m| m != 0) else {
            return Ok(None);
        };
        let (len, keys) = (mask.len(), last + 1);
        let first = mask.iter().position(|&m| m != 0).unwrap_or(0);
        let mut bias = vec![0f32; len * keys];
        for (q, row) in bias.chunks_mut(keys).enumerate() {
            // A query before the first real token sees nothing: its row stays 0 (a
            // finite softmax) and `keep` zeroes its output.
            if q < first {
                continue;
            }
            for (k, b) in row.iter_mut().enumerate() {
                if k > q || mask[k] == 0 {
                    *b = f32::NEG_INFINITY;
                }
            }
        }
        let bias = Tensor::from_vec(bias, (len, keys), device)?.to_dtype(dtype)?;
        let keep = if first > 0 {
            let rows: Vec<f32> = (0..len).map(|q| f32::from(u8::from(q >= first))).collect();
            Some(Tensor::from_vec(rows, (len, 1), device)?.to_dtype(dtype)?)
        } else {
            None
        };
        Ok(Some(Self { keys, bias, keep }))
    }
}

/// Rotary embedding tables for positions `0..len`: `cos` and `sin`, `(len, head_dim/2)`.
#[derive(Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The angles `position · theta^(-2i/head_dim)` with the frequencies and the
    /// products in f32, as transformers computes them.
    fn new(
        len: usize,
        head_dim: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in &inv_freq {
                let angle = f64::from(f * p as f32);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?,
        })
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &Qwen3Config, compute: DType) -> candle_core::Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.kv_heads());
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            q_proj: linear_no_bias(h, heads * d, vb.pp("q_proj"))?,
            k_proj: linear_no_bias(h, kv_heads * d, vb.pp("k_proj"))?,
            v_proj: linear_no_bias(h, kv_heads * d, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(heads * d, h, vb.pp("o_proj"))?,
            q_norm: RmsNorm::new(d, eps, compute, vb.pp("q_norm"))?,
            k_norm: RmsNorm::new(d, eps, compute, vb.pp("k_norm"))?,
            heads,
            kv_heads,
            head_dim: d,
        })
    }

    /// `(1, len, hidden)` → the projected heads, normalised and rotated where it
    /// applies, as `(heads, len, head_dim)`.
    fn heads(
        &self,
        proj: &Linear,
        norm: Option<&RmsNorm>,
        heads: usize,
        xs: &Tensor,
        rope: &Rope,
    ) -> candle_core::Result<Tensor> {
        let (_, len, _) = xs.dims3()?;
        let mut t = proj.forward(xs)?.reshape((1, len, heads, self.head_dim))?;
        if let Some(norm) = norm {
            t = norm.forward(&t)?;
        }
        let t = t.transpose(1, 2)?.contiguous()?;
        let t = if norm.is_some() {
            candle_nn::rotary_emb::rope(&t, &rope.cos, &rope.sin)?
        } else {
            t
        };
        t.squeeze(0)
    }

    fn forward(
        &self,
        xs: &Tensor,
        rope: &Rope,
        mask: Option<&AttentionMask>,
    ) -> candle_core::Result<Tensor> {
        let (_, len, hidden) = xs.dims3()?;
        // No real key at all: every query's attention output is zero, and so is its
        // projection (no bias).
        let Some(mask) = mask else {
            return Tensor::zeros((1, len, hidden), xs.dtype(), xs.device());
        };
        let (d, kv, group) = (self.head_dim, self.kv_heads, self.heads / self.kv_heads);
        let q = self.heads(&self.q_proj, Some(&self.q_norm), self.heads, xs, rope)?;
        let k = self.heads(&self.k_proj, Some(&self.k_norm), kv, xs, rope)?;
        let v = self.heads(&self.v_proj, None, kv, xs, rope)?;
        // Only keys up to the last real token can be attended to.
        let (k, v) = if mask.keys < len {
            (
                k.narrow(1, 0, mask.keys)?.contiguous()?,
                v.narrow(1, 0, mask.keys)?.contiguous()?,
            )
        } else {
            (k, v)
        };
        // Query head `h` reads key/value head `h / group`: the `group` query heads of a
        // key head are consecutive, so they stack into one product with that head.
        let q = (q.reshape((kv, group * len, d))? * (d as f64).powf(-0.5))?;
        let scores = q
            .matmul(&k.t()?)?
            .reshape((kv, group, len, mask.keys))?
            .broadcast_add(&mask.bias)?;
        let mut probs = candle_nn::ops::softmax_last_dim(&scores)?;
        if let Some(keep) = &mask.keep {
            probs = probs.broadcast_mul(keep)?;
        }
        let out = probs
            .reshape((kv, group * len, mask.keys))?
            .matmul(&v)?
            .reshape((self.heads, len, d))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((1, len, self.heads * d))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl DecoderLayer {
    fn new(vb: VarBuilder, cfg: &Qwen3Config, compute: DType) -> candle_core::Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_layernorm: RmsNorm::new(h, eps, compute, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(vb.pp("self_attn"), cfg, compute)?,
            post_attention_layernorm: RmsNorm::new(
                h,
                eps,
                compute,
                vb.pp("post_attention_layernorm"),
            )?,
            gate_proj: linear_no_bias(h, i, mlp.pp("gate_proj"))?,
            up_proj: linear_no_bias(h, i, mlp.pp("up_proj"))?,
            down_proj: linear_no_bias(i, h, mlp.pp("down_proj"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rope: &Rope,
        mask: Option<&AttentionMask>,
    ) -> candle_core::Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(xs)?, rope, mask)?;
        let xs = (xs + attn)?;
        let h = self.post_attention_layernorm.forward(&xs)?;
        let gate = self.gate_proj.forward(&h)?.silu()?;
        let mlp = self
            .down_proj
            .forward(&(gate * self.up_proj.forward(&h)?)?)?;
        xs + mlp
    }
}

/// The Qwen3 decoder as a text encoder: a prompt's token ids to the hidden states the
/// FLUX.2 [klein] pipeline feeds its transformer.
#[derive(Debug, Clone)]
pub struct Qwen3TextEncoder {
    /// `(vocab_size, hidden_size)` at its stored dtype.
    embed_tokens: Tensor,
    /// The first `max(outputs)` decoder layers (fewer when the deepest output is
    /// shallower than the model).
    layers: Vec<DecoderLayer>,
    /// The final norm, loaded only when `hidden_states[num_hidden_layers]` is asked for.
    norm: Option<RmsNorm>,
    /// The hidden-state indices returned, in order.
    outputs: Vec<usize>,
    config: Qwen3Config,
    compute: DType,
    device: Device,
}

impl Qwen3TextEncoder {
    /// Loads `config.json` and the weights from a diffusers `text_encoder/` directory:
    /// only the decoder layers needed for the deepest of the hidden-state indices
    /// `layers` (index `k` is the output after `k` layers, 0 the embeddings), whose
    /// states [`Self::hidden_states`] returns in this order. Computes in `compute` on
    /// `device`; half-precision weights stay so in memory.
    pub fn load(dir: &Path, layers: &[usize], compute: DType, device: &Device) -> Result<Self> {
        let cfg = Qwen3Config::load(&dir.join("config.json"))?;
        check_outputs(layers, &cfg).map_err(|e| match e {
            Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", dir.display())),
            e => e,
        })?;
        let (vb, _, file) = crate::model::weights_stored(dir, "model", compute, device)?;
        Self::new(vb, &cfg, layers, compute).map_err(|e| match e {
            Error::Tensor { context, source } => Error::Tensor {
                context: format!("{context} ({})", file.display()),
                source,
            },
            e => e,
        })
    }

    /// Builds the encoder from weights named as in transformers' state dict
    /// (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, …),
    /// handed out at their storage dtype; see [`Self::load`].
    pub fn new(
        vb: VarBuilder,
        cfg: &Qwen3Config,
        layers: &[usize],
        compute: DType,
    ) -> Result<Self> {
        cfg.validate()?;
        check_outputs(layers, cfg)?;
        let depth = layers.iter().copied().max().unwrap_or(0);
        let vb = vb.pp("model");
        let build = || -> candle_core::Result<Self> {
            let embed_tokens = vb
                .pp("embed_tokens")
                .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
            let decoder = (0..depth)
                .map(|i| DecoderLayer::new(vb.pp(format!("layers.{i}")), cfg, compute))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let norm = (depth == cfg.num_hidden_layers)
                .then(|| RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, compute, vb.pp("norm")))
                .transpose()?;
            Ok(Self {
                device: embed_tokens.device().clone(),
                embed_tokens,
                layers: decoder,
                norm,
                outputs: layers.to_vec(),
                config: cfg.clone(),
                compute,
            })
        };
        build().context(|| "text encoder".to_owned())
    }

    /// The model's configuration.
    pub fn config(&self) -> &Qwen3Config {
        &self.config
    }

    /// The hidden-state indices [`Self::hidden_states`] concatenates, in order.
    pub fn outputs(&self) -> &[usize] {
        &self.outputs
    }

    /// The pipeline's `prompt_embeds` for one prompt: its token ids and attention mask
    /// (`1` for a real token, `0` for padding; the same length) to
    /// `(1, L, outputs.len() · hidden_size)`, the requested hidden states side by side
    /// for each token (diffusers stacks them on a new dim 1, moves that dim after the
    /// tokens and flattens it with the hidden one: the same layout). Padding positions
    /// get hidden states too, as in the reference.
    pub fn hidden_states(&self, ids: &[u32], mask: &[u32]) -> Result<Tensor> {
        let len = ids.len();
        if mask.len() != len {
            return Err(Error::Unsupported(format!(
                "text encoder: {len} token ids with an attention mask of {}",
                mask.len()
            )));
        }
        if len > self.config.max_position_embeddings {
            return Err(Error::Unsupported(format!(
                "text encoder: a sequence of {len} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(Error::Unsupported(format!(
                "text encoder: token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let width = self.outputs.len() * self.config.hidden_size;
        if len == 0 {
            return Ok(Tensor::zeros((1, 0, width), self.compute, &self.device)?);
        }
        self.run(ids, mask)
            .context(|| "text encoder forward".to_owned())
    }

    fn run(&self, ids: &[u32], mask: &[u32]) -> candle_core::Result<Tensor> {
        let len = ids.len();
        let ids = Tensor::from_slice(ids, len, &self.device)?;
        let mut xs =
            widened(&self.embed_tokens.index_select(&ids, 0)?, self.compute)?.unsqueeze(0)?;
        let rope = Rope::new(
            len,
            self.config.head_dim,
            self.config.rope_theta,
            self.compute,
            &self.device,
        )?;
        let attention = AttentionMask::new(mask, self.compute, &self.device)?;
        let last = self.config.num_hidden_layers;
        let mut states: Vec<Option<Tensor>> = vec![None; self.outputs.len()];
        let mut keep = |depth: usize, xs: &Tensor| -> candle_core::Result<()> {
            for (slot, _) in states
                .iter_mut()
                .zip(&self.outputs)
                .filter(|(_, &k)| k == depth)
            {
                *slot = Some(match (&self.norm, depth == last) {
                    (Some(norm), true) => norm.forward(xs)?,
                    _ => xs.clone(),
                });
            }
            Ok(())
        };
        keep(0, &xs)?;
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &rope, attention.as_ref())?;
            keep(i + 1, &xs)?;
        }
        let states = states
            .into_iter()
            .map(|s| s.ok_or_else(|| candle_core::Error::Msg("a hidden state was not kept".into())))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&states, 2)
    }
}

/// Checks the requested hidden-state indices against the model's depth.
fn check_outputs(layers: &[usize], cfg: &Qwen3Config) -> Result<()> {
    if layers.is_empty() {
        return Err(Error::Unsupported(
            "text encoder: no hidden-state layer requested".to_owned(),
        ));
    }
    if let Some(&bad) = layers.iter().find(|&&k| k > cfg.num_hidden_layers) {
        return Err(Error::Unsupported(format!(
            "text encoder: hidden state {bad} requested, but the model has \
             num_hidden_layers {} (indices 0..={})",
            cfg.num_hidden_layers, cfg.num_hidden_layers
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;
    use std::collections::HashMap;

    /// A small config: 4 query heads over 2 key/value heads of width 8.
    fn tiny_config(layers: usize, kv_heads: usize) -> Qwen3Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": kv_heads, "head_dim": 8, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
            "rope_scaling": null, "attention_bias": false, "use_sliding_window": false,
            "sliding_window": null, "max_window_layers": 28
        }))
        .unwrap()
    }

    /// Every weight of `cfg`'s model with its shape, under transformers' names.
    fn shapes(cfg: &Qwen3Config) -> Vec<(String, Vec<usize>)> {
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (q, kv) = (cfg.num_attention_heads * d, cfg.kv_heads() * d);
        let mut all = vec![(
            "model.embed_tokens.weight".to_owned(),
            vec![cfg.vocab_size, h],
        )];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj", vec![q, h]),
                ("self_attn.k_proj", vec![kv, h]),
                ("self_attn.v_proj", vec![kv, h]),
                ("self_attn.o_proj", vec![h, q]),
                ("self_attn.q_norm", vec![d]),
                ("self_attn.k_norm", vec![d]),
                ("input_layernorm", vec![h]),
                ("post_attention_layernorm", vec![h]),
                ("mlp.gate_proj", vec![i, h]),
                ("mlp.up_proj", vec![i, h]),
                ("mlp.down_proj", vec![h, i]),
            ] {
                all.push((format!("{p}.{name}.weight"), shape));
            }
        }
        all.push(("model.norm.weight".to_owned(), vec![h]));
        all
    }

    /// Deterministic weights: `0.3 sin(0.61 i + o)` (norms `1 + 0.2 sin(…)`) with `o`
    /// a tenth of the name's byte sum modulo 97, as the Python check below builds them.
    fn formula_weights(cfg: &Qwen3Config) -> HashMap<String, Tensor> {
        shapes(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let off = (name.bytes().map(u32::from).sum::<u32>() % 97) as f64 * 0.1;
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n)
                    .map(|i| {
                        let s = (0.61 * i as f64 + off).sin();
                        (if name.contains("norm") {
                            1.0 + 0.2 * s
                        } else {
                            0.3 * s
                        }) as f32
                    })
                    .collect();
                let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
                (name, t)
            })
            .collect()
    }

    fn encoder(
        cfg: &Qwen3Config,
        weights: HashMap<String, Tensor>,
        layers: &[usize],
    ) -> Qwen3TextEncoder {
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        Qwen3TextEncoder::new(vb, cfg, layers, DType::F32).unwrap()
    }

    /// `hidden_states[k]` of a result for `layers`.
    fn state(out: &Tensor, j: usize, hidden: usize) -> Tensor {
        out.narrow(2, j * hidden, hidden)
            .unwrap()
            .squeeze(0)
            .unwrap()
    }

    /// The reference's numbers for the formula weights: for two prompts (right padding;
    /// left padding, whose first two queries see no key), `hidden_states[k][p] · c` with
    /// `c_j = cos(j)`, printed by transformers 4.57.6 (`Qwen3ForCausalLM`, SDPA, f32,
    /// `output_hidden_states=True`).
    #[test]
    fn matches_transformers_on_formula_weights() {
        // (ids, mask, probes of hidden_states[0..=2] per position)
        type Case = ([u32; 8], [u32; 8], [[f32; 8]; 3]);
        let cases: [Case; 2] = [
            (
                [3, 17, 25, 8, 39, 0, 0, 0],
                [1, 1, 1, 1, 1, 0, 0, 0],
                [
                    [
                        -0.051926, 0.009619, -0.031585, 0.003113, -0.04149, 0.020529, 0.020529,
                        0.020529,
                    ],
                    [
                        -1.992823, 6.439117, 5.421597, 1.998478, -0.504349, -10.016481, 4.763608,
                        5.821882,
                    ],
                    [
                        -0.291991, 1.371657, 1.197807, 0.366207, -0.14492, -1.405882, 1.065805,
                        1.407251,
                    ],
                ],
            ),
            (
                [0, 0, 5, 9, 11, 30, 2, 7],
                [0, 0, 1, 1, 1, 1, 1, 1],
                [
                    [
                        0.020529, 0.020529, -0.046042, 0.014346, 0.042708, -0.045193, 0.0462,
                        -0.020226,
                    ],
                    [
                        -11.159081, -11.159081, 4.328478, 6.150844, 5.248671, -7.41178, -9.07481,
                        6.112942,
                    ],
                    [
                        -1.433164, -1.433164, 0.789413, 1.466222, 1.250248, -0.989374, -1.242824,
                        1.459949,
                    ],
                ],
            ),
        ];
        let cfg = tiny_config(2, 2);
        let enc = encoder(&cfg, formula_weights(&cfg), &[0, 1, 2]);
        let probe: Vec<f32> = (0..16).map(|j| (j as f64).cos() as f32).collect();
        let probe = Tensor::from_vec(probe, (16, 1), &Device::Cpu).unwrap();
        for (ids, mask, want) in cases {
            let out = enc.hidden_states(&ids, &mask).unwrap();
            assert_eq!(out.dims(), &[1, 8, 48]);
            for (k, want) in want.iter().enumerate() {
                let got: Vec<f32> = state(&out, k, 16)
                    .matmul(&probe)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (p, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= 2e-5 * (1.0 + w.abs()),
                        "{mask:?}: state {k} position {p}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn outputs_are_the_requested_states_side_by_side() {
        let cfg = tiny_config(3, 2);
        let weights = formula_weights(&cfg);
        let all = encoder(&cfg, weights.clone(), &[0, 1, 2, 3]);
        let ids = [1u32, 2, 3, 4, 5, 6];
        let mask = [1u32, 1, 1, 1, 0, 0];
        let full = all.hidden_states(&ids, &mask).unwrap();
        assert_eq!(full.dims(), &[1, 6, 64]);
        // Any order and repetition, and only the layers needed are loaded.
        let some = encoder(&cfg, weights, &[2, 0, 2]);
        assert_eq!(some.layers.len(), 2);
        assert!(some.norm.is_none());
        assert_eq!(some.outputs(), &[2, 0, 2]);
        let picked = some.hidden_states(&ids, &mask).unwrap();
        assert_eq!(picked.dims(), &[1, 6, 48]);
        for (j, k) in [2, 0, 2].into_iter().enumerate() {
            assert_eq!(max_diff(&state(&picked, j, 16), &state(&full, k, 16)), 0.0);
        }
        // State 0 is the embedding rows.
        let rows = all
            .embed_tokens
            .index_select(&Tensor::new(&ids, &Device::Cpu).unwrap(), 0);
        assert_eq!(max_diff(&state(&full, 0, 16), &rows.unwrap()), 0.0);
        // The last state is after the final norm, the others are not: a deeper model
        // with the same first three layers gives the raw output of layer 3.
        let deeper_cfg = tiny_config(4, 2);
        let mut deeper = formula_weights(&deeper_cfg);
        deeper.extend(formula_weights(&cfg));
        let raw = encoder(&deeper_cfg, deeper, &[3])
            .hidden_states(&ids, &mask)
            .unwrap();
        let norm = &formula_weights(&cfg)["model.norm.weight"];
        let normed = candle_nn::ops::rms_norm(&raw, norm, 1e-6).unwrap();
        assert!(max_diff(&state(&full, 3, 16), &normed.squeeze(0).unwrap()) < 1e-6);
        assert!(max_diff(&state(&full, 3, 16), &raw.squeeze(0).unwrap()) > 0.1);
    }

    #[test]
    fn padding_positions_see_every_real_token_and_no_padding() {
        let cfg = tiny_config(2, 2);
        let enc = encoder(&cfg, formula_weights(&cfg), &[2]);
        let mask = [1u32, 1, 1, 0, 0, 0];
        let base = enc.hidden_states(&[7, 8, 9, 1, 1, 1], &mask).unwrap();
        // Another id at padding position 4 changes no other position: padding keys are
        // masked for every query, padding queries included.
        let other = enc.hidden_states(&[7, 8, 9, 1, 30, 1], &mask).unwrap();
        for p in [0, 1, 2, 3, 5] {
            let (a, b) = (
                base.narrow(1, p, 1).unwrap(),
                other.narrow(1, p, 1).unwrap(),
            );
            assert_eq!(max_diff(&a, &b), 0.0, "position {p}");
        }
        assert!(
            max_diff(
                &base.narrow(1, 4, 1).unwrap(),
                &other.narrow(1, 4, 1).unwrap()
            ) > 0.0
        );
        // Real tokens are causal: position 0 is the same alone.
        let alone = enc.hidden_states(&[7], &[1]).unwrap();
        assert!(max_diff(&alone, &base.narrow(1, 0, 1).unwrap()) < 1e-6);
        // A padding query sees all real tokens: changing the last real token changes it.
        let changed = enc.hidden_states(&[7, 8, 10, 1, 1, 1], &mask).unwrap();
        assert!(
            max_diff(
                &changed.narrow(1, 5, 1).unwrap(),
                &base.narrow(1, 5, 1).unwrap()
            ) > 1e-4
        );
    }

    #[test]
    fn mask_bias_and_fully_masked_rows() {
        let m = AttentionMask::new(&[0, 1, 1, 0, 1, 0, 0], DType::F32, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(m.keys, 5, "keys after the last real token are dropped");
        let bias: Vec<Vec<f32>> = m.bias.to_vec2().unwrap();
        let seen =
            |q: usize| -> Vec<usize> { (0..5).filter(|&k| bias[q][k] == 0.0).collect::<Vec<_>>() };
        assert_eq!(
            bias[0],
            vec![0.0; 5],
            "a query without keys gets a finite row"
        );
        assert_eq!(seen(1), vec![1]);
        assert_eq!(seen(3), vec![1, 2]);
        assert_eq!(seen(4), vec![1, 2, 4]);
        assert_eq!(seen(6), vec![1, 2, 4]);
        let keep: Vec<Vec<f32>> = m.keep.unwrap().to_vec2().unwrap();
        assert_eq!(keep.concat(), vec![0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert!(AttentionMask::new(&[0, 0], DType::F32, &Device::Cpu)
            .unwrap()
            .is_none());
        let right = AttentionMask::new(&[1, 1, 0], DType::F32, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert!(right.keep.is_none());
    }

    #[test]
    fn queries_without_keys_get_no_attention() {
        let cfg = tiny_config(1, 2);
        let enc = encoder(&cfg, formula_weights(&cfg), &[1]);
        // No real token at all: every attention output is zero, so each position is its
        // embedding plus the MLP of it, independent of the others.
        let out = enc.hidden_states(&[3, 4], &[0, 0]).unwrap();
        let single = enc.hidden_states(&[4], &[0]).unwrap();
        assert!(max_diff(&out.narrow(1, 1, 1).unwrap(), &single) < 1e-6);
        assert!(out
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
    }

    #[test]
    fn grouped_heads_read_their_key_head() {
        // Two query heads per key/value head equal a model with one key/value head per
        // query head whose weights repeat each shared head (transformers' repeat_kv).
        let gqa = tiny_config(1, 2);
        let weights = formula_weights(&gqa);
        let mha = tiny_config(1, 4);
        let mut expanded = weights.clone();
        for proj in ["k_proj", "v_proj"] {
            let name = format!("model.layers.0.self_attn.{proj}.weight");
            let w = &weights[&name];
            let heads: Vec<Tensor> = (0..4)
                .map(|h| w.narrow(0, (h / 2) * 8, 8).unwrap())
                .collect();
            expanded.insert(name, Tensor::cat(&heads, 0).unwrap());
        }
        let ids = [5u32, 6, 7, 8, 9];
        let mask = [1u32, 1, 1, 1, 0];
        let a = encoder(&gqa, weights, &[1])
            .hidden_states(&ids, &mask)
            .unwrap();
        let b = encoder(&mha, expanded, &[1])
            .hidden_states(&ids, &mask)
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
    }

    #[test]
    fn half_precision_weights_give_nearly_the_f32_result() {
        let cfg = tiny_config(2, 2);
        let weights = formula_weights(&cfg);
        let half: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
            .collect();
        let vb = VarBuilder::from_tensors(half, DType::BF16, &Device::Cpu);
        let enc = Qwen3TextEncoder::new(vb, &cfg, &[1, 2], DType::F32).unwrap();
        assert_eq!(
            enc.embed_tokens.dtype(),
            DType::BF16,
            "the table stays as stored"
        );
        let ids = [1u32, 2, 3];
        let out = enc.hidden_states(&ids, &[1, 1, 1]).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        let full = encoder(&cfg, weights, &[1, 2])
            .hidden_states(&ids, &[1, 1, 1])
            .unwrap();
        // Only the weights' rounding to bf16 separates the two.
        assert!(max_diff(&out, &full) < 0.1, "{}", max_diff(&out, &full));
    }

    #[test]
    fn bad_inputs_are_refused_with_a_sentence() {
        let cfg = tiny_config(2, 2);
        let enc = encoder(&cfg, formula_weights(&cfg), &[1]);
        let err = |r: Result<Tensor>| r.unwrap_err().to_string();
        assert!(err(enc.hidden_states(&[1, 2], &[1]))
            .contains("2 token ids with an attention mask of 1"));
        assert!(err(enc.hidden_states(&[1, 40], &[1, 1]))
            .contains("token id 40 is outside the vocabulary of 40"));
        let long = vec![1u32; 65];
        assert!(err(enc.hidden_states(&long, &long)).contains("exceeds max_position_embeddings 64"));
        assert_eq!(enc.hidden_states(&[], &[]).unwrap().dims(), &[1, 0, 16]);

        let vb = || VarBuilder::from_tensors(formula_weights(&cfg), DType::F32, &Device::Cpu);
        let e = Qwen3TextEncoder::new(vb(), &cfg, &[1, 3], DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hidden state 3 requested") && e.contains("num_hidden_layers 2"),
            "{e}"
        );
        let e = Qwen3TextEncoder::new(vb(), &cfg, &[], DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no hidden-state layer"), "{e}");
        // A weight of the wrong shape names the tensor.
        let mut weights = formula_weights(&cfg);
        weights.insert(
            "model.layers.0.mlp.up_proj.weight".into(),
            Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        let e = Qwen3TextEncoder::new(vb, &cfg, &[1], DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("text encoder") && e.contains("up_proj"), "{e}");
    }

    #[test]
    fn config_defaults_and_refusals() {
        let cfg: Qwen3Config = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg.kv_heads(), cfg.num_attention_heads);
        assert_eq!(cfg.head_dim, 128);
        assert_eq!(cfg.rms_norm_eps, 1e-6);
        cfg.validate().unwrap();

        let refused = |patch: serde_json::Value, words: &[&str]| {
            let mut json = serde_json::to_value(serde_json::json!({
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2
            }))
            .unwrap();
            for (k, v) in patch.as_object().unwrap() {
                json[k] = v.clone();
            }
            let cfg: Qwen3Config = serde_json::from_value(json).unwrap();
            match cfg.validate() {
                Err(Error::Unsupported(m)) => {
                    assert!(words.iter().all(|w| m.contains(w)), "{m}")
                }
                other => panic!("{patch}: expected Unsupported, got {other:?}"),
            }
        };
        refused(
            serde_json::json!({"hidden_act": "gelu"}),
            &["hidden_act", "gelu"],
        );
        refused(
            serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
            &["rope_scaling", "yarn"],
        );
        refused(
            serde_json::json!({"attention_bias": true}),
            &["attention_bias"],
        );
        refused(
            serde_json::json!({"use_sliding_window": true, "sliding_window": 64, "max_window_layers": 2}),
            &["layer 2", "sliding_attention"],
        );
        refused(
            serde_json::json!({"layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]}),
            &["layer 1", "sliding_attention"],
        );
        refused(
            serde_json::json!({"layer_types": ["full_attention"]}),
            &["layer_types names 1 layers"],
        );
        refused(
            serde_json::json!({"num_key_value_heads": 3}),
            &["num_key_value_heads 3"],
        );
        refused(serde_json::json!({"head_dim": 7}), &["head_dim 7"]);
        // A window that covers no layer is fine, and so is an explicit null scaling.
        let cfg: Qwen3Config = serde_json::from_value(serde_json::json!({
            "num_hidden_layers": 4, "use_sliding_window": true, "sliding_window": 64,
            "max_window_layers": 4, "rope_scaling": null
        }))
        .unwrap();
        cfg.validate().unwrap();
    }

    #[test]
    fn load_reads_the_directory_and_names_bad_requests() {
        let dir = std::env::temp_dir().join(format!("remixd-qwen3-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = tiny_config(2, 2);
        let mut json = serde_json::to_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "max_position_embeddings": 64
        }))
        .unwrap();
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        let weights = formula_weights(&cfg);
        candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
        let enc = Qwen3TextEncoder::load(&dir, &[0, 2], DType::F32, &Device::Cpu).unwrap();
        assert_eq!(enc.config().num_hidden_layers, 2);
        let want = encoder(&cfg, weights, &[0, 2])
            .hidden_states(&[1, 2], &[1, 0])
            .unwrap();
        assert_eq!(
            max_diff(&enc.hidden_states(&[1, 2], &[1, 0]).unwrap(), &want),
            0.0
        );
        let e = Qwen3TextEncoder::load(&dir, &[9], DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hidden state 9") && e.contains(&dir.display().to_string()),
            "{e}"
        );
        json["hidden_act"] = "relu".into();
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        let e = Qwen3TextEncoder::load(&dir, &[1], DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json") && e.contains("relu"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
