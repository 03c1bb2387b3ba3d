//! The CLIP text encoder (transformers' `CLIPTextModel`), built from
//! `text_encoder/config.json` and `model.safetensors`.
//!
//! Weights are read under the transformers state-dict names (`text_model.…`) and held in
//! f32 whatever their type on disk.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use crate::error::{read_json, Context, Error, Result};
use crate::linear::Linear;

/// The text encoder's activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (SD 1.x).
    QuickGelu,
    /// The exact, erf-based GELU (SD 2.x).
    Gelu,
}

impl ClipActivation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            other => Err(Error::Unsupported(format!(
                "text encoder hidden_act {other:?} (supported: quick_gelu, gelu)"
            ))),
        }
    }

    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
        }
    }
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".to_owned()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_eos_token_id() -> u32 {
    2
}

/// `text_encoder/config.json`: the keys the encoder reads, with transformers' defaults
/// for absent ones.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Number of token embeddings.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Number of transformer layers.
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    /// Number of position embeddings (the longest sequence).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Activation name, `quick_gelu` or `gelu`.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Epsilon of every layer norm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Width of the text projection (only `CLIPTextModelWithProjection` has one).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// End-of-text id; 2 is transformers' legacy marker for "the highest id".
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: u32,
}

impl ClipTextConfig {
    /// Reads and checks a `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|e| match e {
            Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", path.display())),
            e => e,
        })?;
        Ok(cfg)
    }

    /// The parsed activation function.
    pub fn activation(&self) -> Result<ClipActivation> {
        ClipActivation::parse(&self.hidden_act)
    }

    fn validate(&self) -> Result<()> {
        self.activation()?;
        if self.hidden_size.checked_rem(self.num_attention_heads) != Some(0) {
            return Err(Error::Unsupported(format!(
                "text encoder hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: crate::linear::linear(h, h, vb.pp("q_proj"))?,
            k_proj: crate::linear::linear(h, h, vb.pp("k_proj"))?,
            v_proj: crate::linear::linear(h, h, vb.pp("v_proj"))?,
            out_proj: crate::linear::linear(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// `[b, s, h]` → `[b * heads, s, head_dim]`.
    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        xs.reshape((b, s, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * self.heads, s, self.head_dim))
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = self.split_heads(&(self.q_proj.forward(xs)? * scale)?)?;
        let k = self.split_heads(&self.k_proj.forward(xs)?)?;
        let v = self.split_heads(&self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .reshape((b, self.heads, s, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl EncoderLayer {
    fn new(
        vb: VarBuilder,
        cfg: &ClipTextConfig,
        activation: ClipActivation,
    ) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(h, eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(vb.pp("self_attn"), cfg)?,
            layer_norm2: candle_nn::layer_norm(h, eps, vb.pp("layer_norm2"))?,
            fc1: crate::linear::linear(h, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: crate::linear::linear(cfg.intermediate_size, h, vb.pp("mlp.fc2"))?,
            activation,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (xs + attn)?;
        let mlp = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let mlp = self.fc2.forward(&self.activation.apply(&mlp)?)?;
        xs + mlp
    }
}

/// Everything one pass of the encoder computes.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// The last layer's output after the final layer norm, `[b, s, hidden]`.
    pub last_hidden_state: Tensor,
    /// The embeddings followed by every layer's output (before the final layer norm),
    /// `num_hidden_layers + 1` tensors of `[b, s, hidden]`.
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at each sequence's end-of-text token, `[b, hidden]`.
    pub pooled_output: Tensor,
}

/// CLIP's text transformer with a causal attention mask.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Loads `config.json` and `model[.fp16].safetensors` (f16 or f32) from a diffusers
    /// `text_encoder/` directory; computes in f32 on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = ClipTextConfig::load(&dir.join("config.json"))?;
        let (vb, weights) = crate::model::weights(dir, "model", device)?;
        Self::new(vb, &cfg).map_err(|e| match e {
            Error::Tensor { context, source } => Error::Tensor {
                context: format!("{context} ({})", weights.display()),
                source,
            },
            e => e,
        })
    }

    /// Builds the model from weights named as in transformers' state dict
    /// (`text_model.embeddings.token_embedding.weight`, …).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        let activation = cfg.activation()?;
        Self::build(vb.pp("text_model"), cfg, activation).context(|| "text encoder".to_owned())
    }

    fn build(
        vb: VarBuilder,
        cfg: &ClipTextConfig,
        activation: ClipActivation,
    ) -> candle_core::Result<Self> {
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = candle_nn::embedding(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            emb.pp("position_embedding"),
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), cfg, activation))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = candle_nn::layer_norm(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            vb.pp("final_layer_norm"),
        )?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            config: cfg.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `last_hidden_state` (after the final layer norm) for token ids `[b, s]`
    /// (any integer type), `[b, s, hidden]` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.run(ids, false)?.0)
    }

    /// The full output: final hidden state, every layer's hidden state, pooled output.
    pub fn forward_all(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        let (last_hidden_state, hidden_states) = self.run(ids, true)?;
        let pooled_output = self.pool(&last_hidden_state, ids)?;
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled_output,
        })
    }

    /// The final hidden state and, when `keep`, every layer's input and the last output.
    fn run(&self, ids: &Tensor, keep: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let ids = ids
            .to_dtype(DType::U32)
            .context(|| "token ids".to_owned())?;
        let (_, s) = ids.dims2().context(|| "token ids".to_owned())?;
        if s > self.config.max_position_embeddings {
            return Err(Error::Unsupported(format!(
                "sequence of {s} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let device = ids.device();
        let positions = Tensor::arange(0u32, s as u32, device)?;
        let mut xs = self
            .token_embedding
            .forward(&ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(s, device)?;
        let mut hidden_states = Vec::new();
        for layer in &self.layers {
            if keep {
                hidden_states.push(xs.clone());
            }
            xs = layer.forward(&xs, &mask)?;
        }
        if keep {
            hidden_states.push(xs.clone());
        }
        Ok((self.final_layer_norm.forward(&xs)?, hidden_states))
    }

    /// Picks each row's end-of-text position: the highest id for the legacy
    /// `eos_token_id` 2, otherwise the first occurrence of `eos_token_id` (as transformers).
    fn pool(&self, last: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mut picked = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let pos = if self.config.eos_token_id == 2 {
                // First position of the maximum, as torch's argmax.
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&t| t == max).unwrap_or(0)
            } else {
                row.iter()
                    .position(|&t| t == self.config.eos_token_id)
                    .unwrap_or(0)
            };
            picked.push(last.i((i, pos))?);
        }
        Ok(Tensor::stack(&picked, 0)?)
    }
}

/// `[s, s]` additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(s: usize, device: &Device) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (s, s), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_activation() {
        let cfg: ClipTextConfig = serde_json::from_str(r#"{"hidden_act": "gelu"}"#).unwrap();
        assert_eq!(cfg.hidden_size, 512);
        assert_eq!(cfg.max_position_embeddings, 77);
        assert_eq!(cfg.layer_norm_eps, 1e-5);
        assert_eq!(cfg.activation().unwrap(), ClipActivation::Gelu);
        let cfg: ClipTextConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg.activation().unwrap(), ClipActivation::QuickGelu);
    }

    #[test]
    fn unknown_activation_is_unsupported() {
        let cfg: ClipTextConfig = serde_json::from_str(r#"{"hidden_act": "relu"}"#).unwrap();
        match cfg.validate() {
            Err(Error::Unsupported(m)) => assert!(m.contains("hidden_act") && m.contains("relu")),
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn quick_gelu_values() {
        let xs = Tensor::new(&[-2f32, 0.0, 1.0], &Device::Cpu).unwrap();
        let ys: Vec<f32> = ClipActivation::QuickGelu
            .apply(&xs)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (x, y) in [-2f32, 0.0, 1.0].iter().zip(ys) {
            let want = x / (1.0 + (-1.702 * x).exp());
            assert!((y - want).abs() < 1e-6, "{x}: {y} vs {want}");
        }
    }
}
