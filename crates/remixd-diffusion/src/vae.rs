//! The variational autoencoder (`AutoencoderKL`) that maps images to latents and back.
//!
//! Built from `vae/config.json` with diffusers' names and defaults. FLUX.2's
//! `AutoencoderKLFlux2` is the same encoder and decoder plus a batch norm whose running
//! statistics normalise the 2×2-patchified latents ([`LatentStats`]).

use std::path::Path;

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::conv::Conv2d;
use serde::Deserialize;

use crate::blocks::{
    Downsample2D, GroupNorm, ResnetBlock2D, ResnetConfig, SpatialAttention, Upsample2D,
};
use crate::error::{read_json, Context, Error, Result};

/// Epsilon of every norm in the VAE (fixed by diffusers, not in the config).
const EPS: f64 = 1e-6;

/// `vae/config.json`: the diffusers `AutoencoderKL` config. Absent keys take
/// diffusers' defaults; keys this crate does not use are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Must all be `DownEncoderBlock2D`.
    pub down_block_types: Vec<String>,
    /// Must all be `UpDecoderBlock2D`.
    pub up_block_types: Vec<String>,
    /// Channels of each level.
    pub block_out_channels: Vec<usize>,
    /// The decoder's channels when they differ from the encoder's (FLUX.2's VAE may say).
    pub decoder_block_out_channels: Option<Vec<usize>>,
    /// Epsilon of FLUX.2's latent batch norm.
    pub batch_norm_eps: f64,
    /// FLUX.2's latent patch (2×2).
    pub patch_size: Option<Vec<usize>>,
    /// Resnets per encoder block (the decoder blocks have one more).
    pub layers_per_block: usize,
    /// Activation: `silu` (or its alias `swish`).
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Factor the pipeline multiplies latents by after encoding (and divides by before
    /// decoding).
    pub scaling_factor: f64,
    /// Offset the pipeline subtracts from latents before scaling (absent for SD 1.x/2.x).
    pub shift_factor: Option<f64>,
    /// 1×1 convolution on the encoder's moments.
    pub use_quant_conv: bool,
    /// 1×1 convolution on the latents before decoding.
    pub use_post_quant_conv: bool,
    /// Attention in the encoder's and decoder's mid blocks.
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            decoder_block_out_channels: None,
            batch_norm_eps: 1e-4,
            patch_size: None,
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    fn check(&self) -> Result<()> {
        let bad = |key: &str, value: &dyn std::fmt::Debug| {
            Err(Error::Unsupported(format!(
                "vae config: `{key}` = {value:?}"
            )))
        };
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels", &self.block_out_channels);
        }
        if let Some(d) = &self.decoder_block_out_channels {
            if d.len() != n {
                return bad("decoder_block_out_channels", d);
            }
        }
        if let Some(p) = &self.patch_size {
            if p.len() != 2 || p.contains(&0) {
                return bad("patch_size", p);
            }
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return bad("act_fn", &self.act_fn);
        }
        if self.down_block_types.len() != n
            || self
                .down_block_types
                .iter()
                .any(|t| t != "DownEncoderBlock2D")
        {
            return bad("down_block_types", &self.down_block_types);
        }
        if self.up_block_types.len() != n
            || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D")
        {
            return bad("up_block_types", &self.up_block_types);
        }
        Ok(())
    }
}

impl VaeConfig {
    /// The decoder's channels per level.
    pub fn decoder_channels(&self) -> &[usize] {
        self.decoder_block_out_channels
            .as_deref()
            .unwrap_or(&self.block_out_channels)
    }
}

/// FLUX.2's latent normalisation: the running mean and `sqrt(running_var + eps)` of the
/// VAE's batch norm over the 2×2-patchified latent channels (`bn.running_mean`,
/// `bn.running_var` in the weights), which the pipeline applies to encoded latents and
/// undoes before decoding.
#[derive(Debug, Clone)]
pub struct LatentStats {
    /// `(1, 4·latent_channels, 1, 1)`.
    pub mean: Tensor,
    /// `(1, 4·latent_channels, 1, 1)`.
    pub std: Tensor,
}

impl LatentStats {
    /// `(x - mean) / std` for patchified latents `(b, 4c, h, w)`.
    pub fn normalise(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_sub(&self.mean)?.broadcast_div(&self.std)
    }

    /// `x · std + mean`, the inverse of [`normalise`](Self::normalise).
    pub fn denormalise(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_mul(&self.std)?.broadcast_add(&self.mean)
    }
}

/// 2×2 patches of latents into channels: `(b, c, h, w)` → `(b, 4c, h/2, w/2)`, channel
/// `4k + 2i + j` holding pixel `(2y + i, 2x + j)` of channel `k`, as diffusers'
/// `_patchify_latents`.
pub fn patchify(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * 4, h / 2, w / 2))
}

/// The inverse of [`patchify`]: `(b, 4c, h, w)` → `(b, c, 2h, 2w)`.
pub fn unpatchify(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c4, h, w) = x.dims4()?;
    x.reshape((b, c4 / 4, 2, 2, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, c4 / 4, h * 2, w * 2))
}

/// `UNetMidBlock2D` without time embedding: resnet, optional attention, resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet_1: ResnetBlock2D,
}

fn resnet(
    vb: VarBuilder,
    cfg: &VaeConfig,
    cin: usize,
    cout: usize,
) -> candle_core::Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups: cfg.norm_num_groups,
            eps: EPS,
            output_scale_factor: 1.0,
        },
    )
}

impl MidBlock {
    fn new(vb: VarBuilder, cfg: &VaeConfig, c: usize) -> candle_core::Result<Self> {
        let attention = if cfg.mid_block_add_attention {
            Some(SpatialAttention::new(
                vb.pp("attentions.0"),
                c,
                cfg.norm_num_groups,
                EPS,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnet_0: resnet(vb.pp("resnets.0"), cfg, c, c)?,
            attention,
            resnet_1: resnet(vb.pp("resnets.1"), cfg, c, c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.resnet_0.forward(x, None)?;
        if let Some(attn) = &self.attention {
            x = attn.forward(&x)?;
        }
        self.resnet_1.forward(&x, None)
    }
}

/// Resnets followed by an optional down- or upsampler.
#[derive(Debug, Clone)]
struct Block {
    resnets: Vec<ResnetBlock2D>,
    down: Option<Downsample2D>,
    up: Option<Upsample2D>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x, None)?;
        }
        if let Some(d) = &self.down {
            x = d.forward(&x)?;
        }
        if let Some(u) = &self.up {
            x = u.forward(&x, None)?;
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<Block>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let last = *ch.last().expect("checked non-empty");
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut blocks = Vec::with_capacity(ch.len());
        for (i, &cout) in ch.iter().enumerate() {
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let mut cin = ch[i.saturating_sub(1)];
            let mut resnets = Vec::with_capacity(cfg.layers_per_block);
            for j in 0..cfg.layers_per_block {
                resnets.push(resnet(vbb.pp(format!("resnets.{j}")), cfg, cin, cout)?);
                cin = cout;
            }
            let down = if i + 1 < ch.len() {
                Some(Downsample2D::new(vbb.pp("downsamplers.0"), cout, 0)?)
            } else {
                None
            };
            blocks.push(Block {
                resnets,
                down,
                up: None,
            });
        }
        Ok(Self {
            conv_in,
            blocks,
            mid: MidBlock::new(vb.pp("mid_block"), cfg, last)?,
            norm_out: GroupNorm::new(vb.pp("conv_norm_out"), cfg.norm_num_groups, last, EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        let x = self.mid.forward(&x)?;
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let channels = cfg.decoder_channels();
        let rev: Vec<usize> = channels.iter().rev().copied().collect();
        let first = *channels.first().expect("checked non-empty");
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?;
        let mid = MidBlock::new(vb.pp("mid_block"), cfg, rev[0])?;
        let mut blocks = Vec::with_capacity(rev.len());
        for (i, &cout) in rev.iter().enumerate() {
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let mut cin = rev[i.saturating_sub(1)];
            let mut resnets = Vec::with_capacity(cfg.layers_per_block + 1);
            for j in 0..=cfg.layers_per_block {
                resnets.push(resnet(vbb.pp(format!("resnets.{j}")), cfg, cin, cout)?);
                cin = cout;
            }
            let up = if i + 1 < rev.len() {
                Some(Upsample2D::new(vbb.pp("upsamplers.0"), cout)?)
            } else {
                None
            };
            blocks.push(Block {
                resnets,
                down: None,
                up,
            });
        }
        Ok(Self {
            conv_in,
            mid,
            blocks,
            norm_out: GroupNorm::new(vb.pp("conv_norm_out"), cfg.norm_num_groups, first, EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid.forward(&x)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

/// The KL autoencoder of Stable Diffusion, computing in the dtype of its weights.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Builds the model from weights named as in diffusers' state dict.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.check()?;
        Self::build(vb, cfg).context(|| "building the VAE".to_string())
    }

    /// Loads `config.json` and `diffusion_pytorch_model[.fp16].safetensors` (f16 or f32) from
    /// the `vae/` directory `dir`, computing in f32 on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg: VaeConfig = read_json(&dir.join("config.json"))?;
        cfg.check()?;
        let (vb, file) = crate::model::weights(dir, "diffusion_pytorch_model", device)?;
        let what = || format!("loading the VAE from {}", file.display());
        Self::build(vb, &cfg).context(what)
    }

    fn build(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let l = cfg.latent_channels;
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// FLUX.2's latent statistics from the batch norm's running mean and variance, on
    /// `device` in f32; `dir` is the `vae/` directory the model was loaded from.
    pub fn latent_stats(&self, dir: &Path, device: &Device) -> Result<LatentStats> {
        let (vb, file) = crate::model::weights(dir, "diffusion_pytorch_model", device)?;
        let n = 4 * self.config.latent_channels;
        let what = || format!("reading the VAE's batch norm from {}", file.display());
        let mean = vb.get(n, "bn.running_mean").context(what)?;
        let var = vb.get(n, "bn.running_var").context(what)?;
        let std = (var + self.config.batch_norm_eps)?.sqrt()?;
        Ok(LatentStats {
            mean: mean.reshape((1, n, 1, 1))?,
            std: std.reshape((1, n, 1, 1))?,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// How many pixels one latent covers per side: `2^(levels - 1)`.
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Encodes images `(b, in_channels, h, w)` in [-1, 1] to the posterior's mean and
    /// log-variance `(b, latent_channels, h / f, w / f)`, the log-variance clamped to
    /// [-30, 20]. Neither is scaled by `scaling_factor`.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut moments = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        let mean = moments.narrow(1, 0, l)?.contiguous()?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Decodes unscaled latents `(b, latent_channels, h, w)` to images
    /// `(b, out_channels, h · f, w · f)`, nominally in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        Ok(self.decoder.forward(&z)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;

    #[test]
    fn random_model_shapes() {
        let cfg: VaeConfig = serde_json::from_str(
            r#"{"block_out_channels": [8, 16], "norm_num_groups": 4, "layers_per_block": 1,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
        )
        .unwrap();
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vae = AutoencoderKL::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg).unwrap();
        assert_eq!(vae.vae_scale_factor(), 2);
        let x = Tensor::zeros((1, 3, 16, 12), DType::F32, &dev).unwrap();
        let (mean, logvar) = vae.encode(&x).unwrap();
        assert_eq!(mean.dims(), &[1, 4, 8, 6]);
        assert_eq!(logvar.dims(), &[1, 4, 8, 6]);
        assert_eq!(vae.decode(&mean).unwrap().dims(), &[1, 3, 16, 12]);
    }

    #[test]
    fn patchify_moves_each_2x2_patch_into_channels_and_back() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 4.0 * 6.0, &dev)
            .unwrap()
            .reshape((1, 2, 4, 6))
            .unwrap();
        let p = patchify(&x).unwrap();
        assert_eq!(p.dims(), &[1, 8, 2, 3]);
        // Channel 4k + 2i + j at (y, x) is pixel (2y + i, 2x + j) of channel k.
        for k in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    for y in 0..2 {
                        for xx in 0..3 {
                            let got: f32 = p
                                .get(0)
                                .and_then(|t| t.get(4 * k + 2 * i + j))
                                .and_then(|t| t.get(y))
                                .and_then(|t| t.get(xx))
                                .and_then(|t| t.to_scalar())
                                .unwrap();
                            let want = (k * 24 + (2 * y + i) * 6 + 2 * xx + j) as f32;
                            assert_eq!(got, want);
                        }
                    }
                }
            }
        }
        assert_eq!(
            crate::test_util::max_diff(&unpatchify(&p).unwrap(), &x),
            0.0
        );
    }

    #[test]
    fn wrong_shape_is_named() {
        let dev = Device::Cpu;
        let bad = Tensor::zeros((64, 3, 1, 1), DType::F32, &dev).unwrap();
        let tensors = [("encoder.conv_in.weight".to_string(), bad)].into();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let msg = AutoencoderKL::new(vb, &VaeConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("VAE") && msg.contains("encoder.conv_in.weight"),
            "{msg}"
        );
    }

    #[test]
    fn missing_weights_file_is_named() {
        let dir = std::env::temp_dir().join(format!("remixd-vae-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let err = AutoencoderKL::load(&dir, &Device::Cpu).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        match err {
            Error::MissingFile(p) => assert!(p.ends_with("diffusion_pytorch_model.safetensors")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unsupported_block_is_named() {
        let cfg: VaeConfig =
            serde_json::from_str(r#"{"down_block_types": ["AttnDownEncoderBlock2D"]}"#).unwrap();
        match cfg.check() {
            Err(Error::Unsupported(m)) => assert!(m.contains("down_block_types"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
