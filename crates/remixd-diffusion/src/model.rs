//! The diffusers directory layout: which files make a model, and loading them.
//!
//! `model_index.json` names the pipeline class and each component's class; remixd checks
//! both before it reads a weight, so that an SDXL or inpainting directory, or one with
//! PyTorch `.bin` weights only, is refused with a sentence saying what is wrong instead of
//! a tensor-name error deep in a module.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::clip::ClipTextModel;
use crate::error::{read_json, Context};
use crate::scheduler::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::{Error, Result};

/// Pipeline classes whose components remixd can run (SD 1.x/2.x, SD-Turbo).
const PIPELINES: &[&str] = &["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"];

/// A Stable Diffusion 1.x/2.x model, loaded and ready to run.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler: SchedulerConfig,
    pub device: Device,
}

impl StableDiffusion {
    /// Loads every component of the model directory `dir` onto `device`, computing in f32
    /// whatever the weights' dtype on disk.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        check_index(dir)?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder: ClipTextModel::load(&dir.join("text_encoder"), device)?,
            unet: UNet2DConditionModel::load(&dir.join("unet"), device)?,
            vae: AutoencoderKL::load(&dir.join("vae"), device)?,
            scheduler: SchedulerConfig::load(&dir.join("scheduler").join("scheduler_config.json"))?,
            device: device.clone(),
        })
    }
}

/// Checks `model_index.json`: a pipeline class remixd runs, and the components it needs.
fn check_index(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::MissingFile(dir.to_owned()));
    }
    let path = dir.join("model_index.json");
    let index: Value = read_json(&path)?;
    let class = index
        .get("_class_name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if class.contains("XL") || index.get("text_encoder_2").is_some() {
        return Err(Error::Unsupported(format!(
            "{}: {class} (SDXL) is not supported yet; use an SD 1.x/2.x model",
            path.display()
        )));
    }
    if !PIPELINES.contains(&class) {
        return Err(Error::Unsupported(format!(
            "{}: pipeline class {class:?}; remixd runs {}",
            path.display(),
            PIPELINES.join(", ")
        )));
    }
    for (component, expected) in [
        ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"][..]),
        ("text_encoder", &["CLIPTextModel"][..]),
        ("unet", &["UNet2DConditionModel"][..]),
        ("vae", &["AutoencoderKL"][..]),
        ("scheduler", &[][..]),
    ] {
        // Each entry is `[library, class]`.
        let found = index
            .get(component)
            .and_then(Value::as_array)
            .and_then(|pair| pair.get(1))
            .and_then(Value::as_str)
            .ok_or_else(|| Error::BadConfig {
                path: path.clone(),
                reason: format!("no `{component}` component"),
            })?;
        if !expected.is_empty() && !expected.contains(&found) {
            return Err(Error::Unsupported(format!(
                "{}: {component} is a {found}; remixd runs {}",
                path.display(),
                expected.join(" or ")
            )));
        }
    }
    Ok(())
}

/// A component's weights: `<stem>.safetensors`, else its `fp16` variant, as a
/// VarBuilder that converts every tensor to f32 as it loads. Returns the file too, for
/// error messages.
pub(crate) fn weights(
    dir: &Path,
    stem: &str,
    device: &Device,
) -> Result<(VarBuilder<'static>, PathBuf)> {
    let file = weights_file(dir, stem)?;
    // SAFETY: the file is memory-mapped read-only; like every mmap user we rely on nobody
    // truncating it while the model loads (the tensors are copied out as f32).
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, device) }
        .context(|| format!("reading {}", file.display()))?;
    Ok((vb, file))
}

fn weights_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let bin = dir.join(format!("{stem}.bin"));
    if bin.is_file() {
        return Err(Error::Unsupported(format!(
            "{}: PyTorch .bin weights; remixd reads .safetensors only (download the \
             safetensors files, or convert with diffusers' save_pretrained)",
            bin.display()
        )));
    }
    Err(Error::MissingFile(dir.join(format!("{stem}.safetensors"))))
}
