//! FLUX.2 [klein]: the local engine's character-remix family.
//!
//! A flow-matching transformer that reads the prompt as hidden states of a Qwen3
//! language model and the base, character and style images as extra tokens. Like the
//! Stable Diffusion modules, every piece is remixd's own, built from the diffusers
//! directory's config files and checked tensor for tensor against diffusers'
//! `Flux2KleinInpaintPipeline` on a tiny random-weight model.
//!
//! Memory: the transformer's and the text encoder's linear weights stay in the half
//! precision they are stored in (klein 4B: about 8 GB each in bf16) and are widened for
//! each product (`linear::Linear`); a CPU computes in f32, CUDA in bf16.

pub mod inputs;
pub mod pipeline;
pub mod prompt;
pub mod qwen3;
pub mod scheduler;
pub mod transformer;

use std::path::Path;

use candle_core::{DType, Device};
use serde_json::Value;

use crate::vae::{AutoencoderKL, LatentStats};
use crate::{Error, Result};
use prompt::ChatPrompt;
use qwen3::Qwen3TextEncoder;
use scheduler::FlowMatchConfig;
use transformer::Flux2Transformer;

/// Pipeline classes of this family (the base and inpaint pipelines share their
/// components; remixd runs both as the inpaint pipeline).
pub const PIPELINES: &[&str] = &["Flux2KleinPipeline", "Flux2KleinInpaintPipeline"];

/// The text encoder's hidden states the pipelines read by default
/// (`text_encoder_out_layers`).
pub const DEFAULT_TEXT_LAYERS: [usize; 3] = [9, 18, 27];

/// The prompt's length in tokens, padded or truncated (`max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// A FLUX.2 [klein] model, loaded and ready to run.
pub struct Flux2Klein {
    pub prompt: ChatPrompt,
    pub text_encoder: Qwen3TextEncoder,
    pub transformer: Flux2Transformer,
    pub vae: AutoencoderKL,
    pub latent_stats: LatentStats,
    pub scheduler: FlowMatchConfig,
    /// The step-distilled variant: guidance is ignored (`is_distilled` in
    /// `model_index.json`).
    pub distilled: bool,
    /// The text encoder's hidden states stacked into the prompt embeddings.
    pub text_layers: Vec<usize>,
    pub device: Device,
    /// The dtype the transformer and text encoder compute in: f32 on a CPU, bf16 on CUDA.
    pub dtype: DType,
}

impl Flux2Klein {
    /// Loads every component of the model directory `dir` onto `device`. `text_layers`
    /// are the text encoder's hidden states the prompt embeddings stack
    /// ([`DEFAULT_TEXT_LAYERS`] for the released models).
    pub fn load(dir: &Path, text_layers: &[usize], device: &Device) -> Result<Self> {
        let index = check_index(dir)?;
        let dtype = if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        let text_encoder =
            Qwen3TextEncoder::load(&dir.join("text_encoder"), text_layers, dtype, device)?;
        let transformer = Flux2Transformer::load(&dir.join("transformer"), dtype, device)?;
        let hidden = text_encoder.config().hidden_size;
        let joint = transformer.config().joint_attention_dim;
        if text_layers.is_empty() || text_layers.len() * hidden != joint {
            return Err(Error::Unsupported(format!(
                "{}: the transformer reads prompt embeddings of {joint} features, but {} text \
                 encoder layers ({text_layers:?}) of {hidden} give {}; the released klein models \
                 read layers {DEFAULT_TEXT_LAYERS:?}",
                dir.display(),
                text_layers.len(),
                text_layers.len() * hidden
            )));
        }
        let vae_dir = dir.join("vae");
        let vae = AutoencoderKL::load(&vae_dir, device)?;
        let latent_stats = vae.latent_stats(&vae_dir, device)?;
        let channels = transformer.config().in_channels;
        if channels != 4 * vae.config().latent_channels {
            return Err(Error::Unsupported(format!(
                "{}: the transformer takes {channels} channels, but 2×2 patches of the VAE's {} \
                 latent channels are {}",
                dir.display(),
                vae.config().latent_channels,
                4 * vae.config().latent_channels
            )));
        }
        Ok(Self {
            prompt: ChatPrompt::from_dir(&dir.join("tokenizer"))?,
            text_encoder,
            transformer,
            vae,
            latent_stats,
            scheduler: FlowMatchConfig::load(&dir.join("scheduler").join("scheduler_config.json"))?,
            distilled: index
                .get("is_distilled")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            text_layers: text_layers.to_vec(),
            device: device.clone(),
            dtype,
        })
    }

    /// Pixels per latent side: the VAE's factor (8 for klein).
    pub fn vae_scale_factor(&self) -> u32 {
        self.vae.vae_scale_factor() as u32
    }

    /// The side lengths an image must be a multiple of: the VAE's factor times the 2×2
    /// latent patch (16 for klein).
    pub fn size_multiple(&self) -> u32 {
        self.vae_scale_factor() * 2
    }

    /// The side of the square the pipeline generates by default (1024 for klein: its
    /// `default_sample_size` 128 latents times the VAE's factor).
    pub fn native_side(&self) -> u32 {
        128 * self.vae_scale_factor()
    }
}

/// Checks `model_index.json`: a pipeline class of this family and its components.
/// Returns the index.
fn check_index(dir: &Path) -> Result<Value> {
    let (path, index, class) = crate::model::read_index(dir)?;
    if !PIPELINES.contains(&class.as_str()) {
        return Err(Error::Unsupported(format!(
            "{}: pipeline class {class:?}; the FLUX.2 family runs {}",
            path.display(),
            PIPELINES.join(", ")
        )));
    }
    crate::model::check_components(
        &path,
        &index,
        &[
            ("tokenizer", &["Qwen2Tokenizer", "Qwen2TokenizerFast"][..]),
            ("text_encoder", &["Qwen3ForCausalLM", "Qwen3Model"][..]),
            ("transformer", &["Flux2Transformer2DModel"][..]),
            ("vae", &["AutoencoderKLFlux2"][..]),
            ("scheduler", &["FlowMatchEulerDiscreteScheduler"][..]),
        ],
    )?;
    Ok(index)
}
