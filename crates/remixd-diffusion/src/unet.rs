//! The denoising UNet (`UNet2DConditionModel`) of Stable Diffusion 1.x/2.x.
//!
//! Built from `unet/config.json` with diffusers' names and defaults; structures other
//! than SD 1.x/2.x (class or addition embeddings, other block types, …) are refused
//! with [`Error::Unsupported`].

use std::path::Path;

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::conv::Conv2d;
use crate::linear::Linear;
use serde::Deserialize;

use crate::blocks::{
    Downsample2D, GroupNorm, ResnetBlock2D, ResnetConfig, Transformer2D, Transformer2DConfig,
    Upsample2D,
};
use crate::error::{read_json, Context, Error, Result};

/// A config value given once for every block or as a list with one entry per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
// `Each` is tried first, so `[1, 2]` as `PerBlock<PerBlock<usize>>` reads as one value
// per block rather than one list for all blocks.
pub enum PerBlock<T> {
    /// One entry per down block (in down-block order).
    Each(Vec<T>),
    /// The same value for every block.
    All(T),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// The value for each of `n` blocks; a list of the wrong length is an error naming `key`.
    fn expand(&self, n: usize, key: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::All(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::Unsupported(format!(
                "unet config: `{key}` has {} entries for {n} blocks: {v:?}",
                v.len()
            ))),
        }
    }
}

/// `unet/config.json`: the diffusers `UNet2DConditionModel` config. Absent keys take
/// diffusers' defaults; keys this crate does not use are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    /// The latent side the model was trained at (64 for SD 1.x: 512 pixels).
    pub sample_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Channels out (the noise or velocity prediction).
    pub out_channels: usize,
    /// Maps the input from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
    /// Timestep embedding order: `cos, sin` when true, `sin, cos` otherwise.
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    pub freq_shift: f64,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// Must be `UNetMidBlock2DCrossAttn`.
    pub mid_block_type: Option<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D` per level.
    pub up_block_types: Vec<String>,
    /// Must be false everywhere.
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (the up blocks have one more).
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    /// Activation: `silu` (or its alias `swish`).
    pub act_fn: String,
    /// Groups of every group norm; must be set.
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the resnets' and the output's group norms.
    pub norm_eps: f64,
    /// Width of the text embeddings, for all blocks or per block.
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer layers per attention: one number, one per block, or one list per block.
    pub transformer_layers_per_block: PerBlock<PerBlock<usize>>,
    /// Transformer layers of the up blocks, when they differ from the mirrored down blocks.
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock<usize>>>,
    /// SD 1.x/2.x's name for the number of heads (used as such when
    /// `num_attention_heads` is absent, as diffusers does).
    pub attention_head_dim: PerBlock<usize>,
    /// The number of heads, taking precedence over `attention_head_dim` (diffusers
    /// itself still refuses configs that set it).
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Must be false.
    pub dual_cross_attention: bool,
    /// Linear rather than 1×1-convolution projections around the transformers.
    pub use_linear_projection: bool,
    /// Softmax in f32 under half precision; no effect in f32.
    pub upcast_attention: bool,
    /// Must be absent.
    pub class_embed_type: Option<String>,
    /// Must be absent.
    pub addition_embed_type: Option<String>,
    /// Must be absent.
    pub num_class_embeds: Option<usize>,
    /// Must be absent.
    pub encoder_hid_dim: Option<usize>,
    /// Must be absent.
    pub encoder_hid_dim_type: Option<String>,
    /// Must be `default`.
    pub resnet_time_scale_shift: String,
    /// Must be `positional`.
    pub time_embedding_type: String,
    /// Width of the time embedding; `4 × block_out_channels[0]` when absent.
    pub time_embedding_dim: Option<usize>,
    /// Must be absent.
    pub time_embedding_act_fn: Option<String>,
    /// Must be absent.
    pub timestep_post_act: Option<String>,
    /// Must be absent.
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of the input convolution.
    pub conv_in_kernel: usize,
    /// Kernel of the output convolution.
    pub conv_out_kernel: usize,
    /// Must be `default`.
    pub attention_type: String,
    /// Must be false.
    pub class_embeddings_concat: bool,
}

impl Default for UNetConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: 64,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: PerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::All(1280),
            transformer_layers_per_block: PerBlock::All(PerBlock::All(1)),
            reverse_transformer_layers_per_block: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            upcast_attention: false,
            class_embed_type: None,
            addition_embed_type: None,
            num_class_embeds: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".into(),
            class_embeddings_concat: false,
        }
    }
}

/// Whether a block has transformers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    CrossAttn,
    Plain,
}

/// One down or up block, resolved from the config.
#[derive(Debug, Clone)]
struct BlockPlan {
    kind: Kind,
    in_channels: usize,
    out_channels: usize,
    /// Up blocks: the channels coming from the block below.
    prev_channels: usize,
    resnets: usize,
    transformer_layers: Vec<usize>,
    heads: usize,
    cross_attention_dim: usize,
    resample: bool,
}

/// The whole UNet, resolved from the config.
#[derive(Debug, Clone)]
struct Plan {
    down: Vec<BlockPlan>,
    mid: BlockPlan,
    up: Vec<BlockPlan>,
    groups: usize,
    time_embed_dim: usize,
}

fn unsupported(key: &str, value: impl std::fmt::Debug) -> Error {
    Error::Unsupported(format!("unet config: `{key}` = {value:?}"))
}

/// Strips diffusers' legacy `UNetRes` prefix from a block type.
fn block_type(name: &str) -> &str {
    name.strip_prefix("UNetRes").unwrap_or(name)
}

/// Transformer layers for each of `n` attentions of one block.
fn layers_for(spec: &PerBlock<usize>, n: usize) -> Result<Vec<usize>> {
    match spec {
        PerBlock::All(v) => Ok(vec![*v; n]),
        PerBlock::Each(v) if v.len() >= n => Ok(v[..n].to_vec()),
        PerBlock::Each(v) => Err(Error::Unsupported(format!(
            "unet config: `transformer_layers_per_block` entry {v:?} has fewer than {n} layers"
        ))),
    }
}

impl UNetConfig {
    /// Checks the config against what this crate implements and resolves it per block.
    fn plan(&self) -> Result<Plan> {
        let require = |ok: bool, key: &str, value: &dyn std::fmt::Debug| {
            if ok {
                Ok(())
            } else {
                Err(unsupported(key, value))
            }
        };
        let mid = self.mid_block_type.as_deref();
        require(
            mid == Some("UNetMidBlock2DCrossAttn"),
            "mid_block_type",
            &mid,
        )?;
        let act = self.act_fn.as_str();
        require(matches!(act, "silu" | "swish"), "act_fn", &act)?;
        require(!self.dual_cross_attention, "dual_cross_attention", &true)?;
        let class = &self.class_embed_type;
        require(class.is_none(), "class_embed_type", class)?;
        let addition = &self.addition_embed_type;
        require(addition.is_none(), "addition_embed_type", addition)?;
        let n_class = &self.num_class_embeds;
        require(n_class.is_none(), "num_class_embeds", n_class)?;
        let hid = &self.encoder_hid_dim;
        require(hid.is_none(), "encoder_hid_dim", hid)?;
        let hid_type = &self.encoder_hid_dim_type;
        require(hid_type.is_none(), "encoder_hid_dim_type", hid_type)?;
        let shift = self.resnet_time_scale_shift.as_str();
        require(shift == "default", "resnet_time_scale_shift", &shift)?;
        let t_type = self.time_embedding_type.as_str();
        require(t_type == "positional", "time_embedding_type", &t_type)?;
        let t_act = &self.time_embedding_act_fn;
        require(t_act.is_none(), "time_embedding_act_fn", t_act)?;
        let post = &self.timestep_post_act;
        require(post.is_none(), "timestep_post_act", post)?;
        let cond = &self.time_cond_proj_dim;
        require(cond.is_none(), "time_cond_proj_dim", cond)?;
        let attn = self.attention_type.as_str();
        require(attn == "default", "attention_type", &attn)?;
        let concat = self.class_embeddings_concat;
        require(!concat, "class_embeddings_concat", &concat)?;
        let groups = self
            .norm_num_groups
            .ok_or_else(|| unsupported("norm_num_groups", None::<usize>))?;
        for (key, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(unsupported(key, k));
            }
        }

        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(unsupported("block_out_channels", &self.block_out_channels));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Unsupported(format!(
                "unet config: `down_block_types` ({}), `up_block_types` ({}) and \
                 `block_out_channels` ({n}) differ in length",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if self
            .only_cross_attention
            .expand(n, "only_cross_attention")?
            .contains(&true)
        {
            return Err(unsupported(
                "only_cross_attention",
                &self.only_cross_attention,
            ));
        }
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => self.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        if heads.contains(&0) {
            return Err(unsupported("attention_head_dim", &heads));
        }
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let tlayers = self
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let reverse_tlayers = match &self.reverse_transformer_layers_per_block {
            Some(r) if r.len() == n => r.clone(),
            Some(r) => return Err(unsupported("reverse_transformer_layers_per_block", r)),
            None => {
                if tlayers.iter().any(|t| matches!(t, PerBlock::Each(_))) {
                    return Err(Error::Unsupported(
                        "unet config: `transformer_layers_per_block` has per-layer lists but \
                         `reverse_transformer_layers_per_block` is absent"
                            .into(),
                    ));
                }
                tlayers.iter().rev().cloned().collect()
            }
        };

        let kind = |name: &str, key: &str, attn: &str, plain: &str| -> Result<Kind> {
            match block_type(name) {
                t if t == attn => Ok(Kind::CrossAttn),
                t if t == plain => Ok(Kind::Plain),
                _ => Err(unsupported(key, name)),
            }
        };

        let mut down = Vec::with_capacity(n);
        for (i, name) in self.down_block_types.iter().enumerate() {
            let k = kind(
                name,
                "down_block_types",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            )?;
            let resnets = layers[i];
            down.push(BlockPlan {
                kind: k,
                in_channels: self.block_out_channels[i.saturating_sub(1)],
                out_channels: self.block_out_channels[i],
                prev_channels: 0,
                resnets,
                transformer_layers: layers_for(&tlayers[i], resnets)?,
                heads: heads[i],
                cross_attention_dim: cross[i],
                resample: i + 1 < n,
            });
        }

        let last = n - 1;
        let mid = BlockPlan {
            kind: Kind::CrossAttn,
            in_channels: self.block_out_channels[last],
            out_channels: self.block_out_channels[last],
            prev_channels: 0,
            resnets: 2,
            transformer_layers: layers_for(&tlayers[last], 1)?,
            heads: heads[last],
            cross_attention_dim: cross[last],
            resample: false,
        };

        let rev = |v: &[usize], i: usize| v[v.len() - 1 - i];
        let mut up = Vec::with_capacity(n);
        for (i, name) in self.up_block_types.iter().enumerate() {
            let k = kind(name, "up_block_types", "CrossAttnUpBlock2D", "UpBlock2D")?;
            let resnets = rev(&layers, i) + 1;
            up.push(BlockPlan {
                kind: k,
                in_channels: rev(&self.block_out_channels, (i + 1).min(last)),
                out_channels: rev(&self.block_out_channels, i),
                prev_channels: rev(&self.block_out_channels, i.saturating_sub(1)),
                resnets,
                transformer_layers: layers_for(&reverse_tlayers[i], resnets)?,
                heads: rev(&heads, i),
                cross_attention_dim: rev(&cross, i),
                resample: i < last,
            });
        }

        Ok(Plan {
            down,
            mid,
            up,
            groups,
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(4 * self.block_out_channels[0]),
        })
    }
}

/// Shared settings for building blocks.
struct Builder<'a> {
    cfg: &'a UNetConfig,
    groups: usize,
    temb: usize,
    /// Index the next transformer block's self-attention gets.
    next_attn: usize,
}

impl Builder<'_> {
    fn resnet(
        &self,
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        scale: f64,
    ) -> candle_core::Result<ResnetBlock2D> {
        ResnetBlock2D::new(
            vb,
            ResnetConfig {
                in_channels: cin,
                out_channels: cout,
                temb_channels: Some(self.temb),
                groups: self.groups,
                eps: self.cfg.norm_eps,
                output_scale_factor: scale,
            },
        )
    }

    fn transformer(
        &mut self,
        vb: VarBuilder,
        plan: &BlockPlan,
        layers: usize,
    ) -> candle_core::Result<Transformer2D> {
        let channels = plan.out_channels;
        Transformer2D::new(
            vb,
            Transformer2DConfig {
                channels,
                heads: plan.heads,
                head_dim: channels / plan.heads,
                layers,
                cross_attention_dim: plan.cross_attention_dim,
                groups: self.groups,
                use_linear_projection: self.cfg.use_linear_projection,
            },
            &mut self.next_attn,
        )
    }
}

/// A down block: resnets, each followed by a transformer in `CrossAttnDownBlock2D`,
/// then an optional downsampler.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    fn new(vb: VarBuilder, plan: &BlockPlan, b: &mut Builder) -> candle_core::Result<Self> {
        let mut resnets = Vec::with_capacity(plan.resnets);
        let mut attentions = Vec::new();
        for i in 0..plan.resnets {
            let cin = if i == 0 {
                plan.in_channels
            } else {
                plan.out_channels
            };
            resnets.push(b.resnet(vb.pp(format!("resnets.{i}")), cin, plan.out_channels, 1.0)?);
            if plan.kind == Kind::CrossAttn {
                let t = b.transformer(
                    vb.pp(format!("attentions.{i}")),
                    plan,
                    plan.transformer_layers[i],
                )?;
                attentions.push(t);
            }
        }
        let downsampler = if plan.resample {
            Some(Downsample2D::new(
                vb.pp("downsamplers.0"),
                plan.out_channels,
                b.cfg.downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Runs the block, pushing every intermediate state the up blocks use onto `skips`.
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
struct MidBlock {
    first: ResnetBlock2D,
    layers: Vec<(Transformer2D, ResnetBlock2D)>,
}

impl MidBlock {
    fn new(vb: VarBuilder, plan: &BlockPlan, b: &mut Builder) -> candle_core::Result<Self> {
        let c = plan.out_channels;
        let scale = b.cfg.mid_block_scale_factor;
        let first = b.resnet(vb.pp("resnets.0"), c, c, scale)?;
        let mut layers = Vec::new();
        for i in 0..plan.resnets - 1 {
            let attn = b.transformer(
                vb.pp(format!("attentions.{i}")),
                plan,
                plan.transformer_layers[i],
            )?;
            let resnet = b.resnet(vb.pp(format!("resnets.{}", i + 1)), c, c, scale)?;
            layers.push((attn, resnet));
        }
        Ok(Self { first, layers })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.first.forward(x, Some(temb))?;
        for (attn, resnet) in &self.layers {
            x = attn.forward(&x, context)?;
            x = resnet.forward(&x, Some(temb))?;
        }
        Ok(x)
    }
}

/// An up block: resnets on the state concatenated with a skip connection, each followed
/// by a transformer in `CrossAttnUpBlock2D`, then an optional upsampler.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    fn new(vb: VarBuilder, plan: &BlockPlan, b: &mut Builder) -> candle_core::Result<Self> {
        let mut resnets = Vec::with_capacity(plan.resnets);
        let mut attentions = Vec::new();
        for i in 0..plan.resnets {
            let skip = if i + 1 == plan.resnets {
                plan.in_channels
            } else {
                plan.out_channels
            };
            let cin = if i == 0 {
                plan.prev_channels
            } else {
                plan.out_channels
            };
            resnets.push(b.resnet(
                vb.pp(format!("resnets.{i}")),
                cin + skip,
                plan.out_channels,
                1.0,
            )?);
            if plan.kind == Kind::CrossAttn {
                let t = b.transformer(
                    vb.pp(format!("attentions.{i}")),
                    plan,
                    plan.transformer_layers[i],
                )?;
                attentions.push(t);
            }
        }
        let upsampler = if plan.resample {
            Some(Upsample2D::new(vb.pp("upsamplers.0"), plan.out_channels)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Runs the block, popping one skip connection per resnet from `skips`. The
    /// upsampler targets the size of the next skip connection (twice the size when
    /// the input's sides are multiples of the overall downsampling, as diffusers does).
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("unet: skip connections exhausted".into())
            })?;
            x = Tensor::cat(&[&x, &skip], 1)?;
            x = resnet.forward(&x, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
        }
        if let Some(up) = &self.upsampler {
            let size = match skips.last() {
                Some(s) => {
                    let (_, _, h, w) = s.dims4()?;
                    Some((h, w))
                }
                None => None,
            };
            x = up.forward(&x, size)?;
        }
        Ok(x)
    }
}

/// The Stable Diffusion 1.x/2.x denoising UNet, computing in the dtype of its weights.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    self_attention_layers: usize,
}

impl UNet2DConditionModel {
    /// Builds the model from weights named as in diffusers' state dict.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let plan = cfg.plan()?;
        Self::build(vb, cfg, &plan).context(|| "building the UNet".to_string())
    }

    /// Loads `config.json` and `diffusion_pytorch_model[.fp16].safetensors` (f16 or f32) from
    /// the `unet/` directory `dir`, computing in f32 on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg: UNetConfig = read_json(&dir.join("config.json"))?;
        let plan = cfg.plan()?;
        let (vb, file) = crate::model::weights(dir, "diffusion_pytorch_model", device)?;
        let what = || format!("loading the UNet from {}", file.display());
        Self::build(vb, &cfg, &plan).context(what)
    }

    fn build(vb: VarBuilder, cfg: &UNetConfig, plan: &Plan) -> candle_core::Result<Self> {
        let c0 = cfg.block_out_channels[0];
        let conv_in = Conv2d::new(
            vb.pp("conv_in"),
            cfg.in_channels,
            c0,
            cfg.conv_in_kernel,
            1,
            (cfg.conv_in_kernel - 1) / 2,
        )?;
        let temb = plan.time_embed_dim;
        let time_linear_1 = crate::linear::linear(c0, temb, vb.pp("time_embedding.linear_1"))?;
        let time_linear_2 = crate::linear::linear(temb, temb, vb.pp("time_embedding.linear_2"))?;
        let mut b = Builder {
            cfg,
            groups: plan.groups,
            temb,
            next_attn: 0,
        };
        let down = plan
            .down
            .iter()
            .enumerate()
            .map(|(i, p)| DownBlock::new(vb.pp(format!("down_blocks.{i}")), p, &mut b))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid = MidBlock::new(vb.pp("mid_block"), &plan.mid, &mut b)?;
        let up = plan
            .up
            .iter()
            .enumerate()
            .map(|(i, p)| UpBlock::new(vb.pp(format!("up_blocks.{i}")), p, &mut b))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm_out = GroupNorm::new(vb.pp("conv_norm_out"), plan.groups, c0, cfg.norm_eps)?;
        let conv_out = Conv2d::new(
            vb.pp("conv_out"),
            c0,
            cfg.out_channels,
            cfg.conv_out_kernel,
            1,
            (cfg.conv_out_kernel - 1) / 2,
        )?;
        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            down,
            mid,
            up,
            norm_out,
            conv_out,
            self_attention_layers: b.next_attn,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// How many transformer blocks (each with one self-attention) the model has; their
    /// indices run 0.. in forward order (down blocks, mid block, up blocks).
    pub fn self_attention_layers(&self) -> usize {
        self.self_attention_layers
    }

    /// Predicts the noise (or velocity) for `sample` `(b, in_channels, h, w)` at
    /// `timestep`, conditioned on `encoder_hidden_states` `(b, tokens, cross_attention_dim)`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        Ok(self.forward_inner(sample, timestep, encoder_hidden_states)?)
    }

    fn forward_inner(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };
        let t = timestep_embedding(
            timestep,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        );
        let t = Tensor::from_vec(t, (1, self.config.block_out_channels[0]), sample.device())?
            .to_dtype(sample.dtype())?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t)?.silu()?)?;

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            x = block.forward(&x, &temb, context, &mut skips)?;
        }
        x = self.mid.forward(&x, &temb, context)?;
        for block in &self.up {
            x = block.forward(&x, &temb, context, &mut skips)?;
        }
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

/// The sinusoidal timestep embedding of diffusers' `get_timestep_embedding`, with the
/// same f32 rounding steps as the reference.
pub(crate) fn timestep_embedding(
    timestep: f64,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
) -> Vec<f32> {
    let half = dim / 2;
    let log_period = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let t = timestep as f32;
    let args: Vec<f32> = (0..half)
        .map(|i| t * ((log_period * i as f32) / denom).exp())
        .collect();
    let sin = args.iter().map(|&a| (a as f64).sin() as f32);
    let cos = args.iter().map(|&a| (a as f64).cos() as f32);
    let mut out: Vec<f32> = if flip_sin_to_cos {
        cos.chain(sin).collect()
    } else {
        sin.chain(cos).collect()
    };
    out.resize(dim, 0.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn timestep_embedding_layout() {
        let e = timestep_embedding(0.0, 6, true, 0.0);
        assert_eq!(e, vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        let e = timestep_embedding(0.0, 7, false, 1.0);
        assert_eq!(e, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn sd15_config_plans_like_diffusers() {
        let cfg: UNetConfig = serde_json::from_str(
            r#"{"attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64}"#,
        )
        .unwrap();
        let plan = cfg.plan().unwrap();
        assert_eq!(plan.time_embed_dim, 1280);
        assert_eq!(plan.down[0].heads, 8);
        assert_eq!(plan.up[0].kind, Kind::Plain);
        assert_eq!(plan.up[1].in_channels, 640);
        assert_eq!(plan.up[1].prev_channels, 1280);
        assert_eq!(plan.up[3].in_channels, 320);
        assert_eq!(plan.up[3].resnets, 3);
        assert!(!plan.up[3].resample && plan.down[2].resample && !plan.down[3].resample);
    }

    #[test]
    fn sd2_list_head_dims_reverse_for_up_blocks() {
        let cfg: UNetConfig = serde_json::from_str(
            r#"{"attention_head_dim": [5, 10, 20, 20], "use_linear_projection": true,
                "transformer_layers_per_block": [1, 2, 3, 4]}"#,
        )
        .unwrap();
        let plan = cfg.plan().unwrap();
        assert_eq!(plan.down[1].heads, 10);
        assert_eq!(plan.up[1].heads, 20);
        assert_eq!(plan.up[3].heads, 5);
        assert_eq!(plan.down[1].transformer_layers, vec![2, 2]);
        assert_eq!(plan.mid.transformer_layers, vec![4]);
        assert_eq!(plan.up[0].transformer_layers, vec![4, 4, 4]);
    }

    #[test]
    fn random_model_shapes() {
        let cfg: UNetConfig = serde_json::from_str(
            r#"{"block_out_channels": [8, 16], "norm_num_groups": 4, "layers_per_block": 1,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "attention_head_dim": 2, "cross_attention_dim": 12}"#,
        )
        .unwrap();
        let dev = candle_core::Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let unet = UNet2DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg)
            .unwrap();
        // down: 1 transformer, mid: 1, up: 2 (two resnets in the last up block)
        assert_eq!(unet.self_attention_layers(), 4);
        let x = Tensor::randn(0f32, 1., (2, 4, 6, 10), &dev).unwrap();
        let ctx = Tensor::randn(0f32, 1., (2, 5, 12), &dev).unwrap();
        let out = unet.forward(&x, 500.0, &ctx).unwrap();
        assert_eq!(out.dims(), &[2, 4, 6, 10]);
        // odd sizes upsample to the skip connection's size
        let x = Tensor::randn(0f32, 1., (2, 4, 7, 5), &dev).unwrap();
        assert_eq!(unet.forward(&x, 1.0, &ctx).unwrap().dims(), &[2, 4, 7, 5]);
    }

    #[test]
    fn missing_weight_is_named() {
        let dev = candle_core::Device::Cpu;
        let vb = VarBuilder::from_tensors(Default::default(), DType::F32, &dev);
        let err = UNet2DConditionModel::new(vb, &UNetConfig::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("UNet") && msg.contains("conv_in.weight"),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_keys_are_named() {
        for json in [
            r#"{"addition_embed_type": "text_time"}"#,
            r#"{"class_embed_type": "timestep"}"#,
            r#"{"time_cond_proj_dim": 256}"#,
            r#"{"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]
               }"#,
            r#"{"only_cross_attention": true}"#,
        ] {
            let cfg: UNetConfig = serde_json::from_str(json).unwrap();
            let key = json.split('"').nth(1).unwrap();
            match cfg.plan() {
                Err(Error::Unsupported(m)) => assert!(m.contains(key), "{m} lacks {key}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }
}
