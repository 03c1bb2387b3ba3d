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

/// The model families the local engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Stable Diffusion 1.x/2.x ([`StableDiffusion`]).
    StableDiffusion,
    /// FLUX.2 [klein] ([`crate::flux2::Flux2Klein`]).
    Flux2Klein,
}

/// Which family the model directory `dir` holds, by its `model_index.json`'s pipeline
/// class; a class of neither is refused with a sentence naming the ones remixd runs.
pub fn family(dir: &Path) -> Result<Family> {
    let (path, index, class) = read_index(dir)?;
    let class = class.as_str();
    if crate::flux2::PIPELINES.contains(&class) {
        Ok(Family::Flux2Klein)
    } else if PIPELINES.contains(&class) {
        Ok(Family::StableDiffusion)
    } else if class.contains("XL") || index.get("text_encoder_2").is_some() {
        Err(Error::Unsupported(format!(
            "{}: {class} (SDXL) is not supported yet; use an SD 1.x/2.x or FLUX.2 [klein] model",
            path.display()
        )))
    } else {
        Err(Error::Unsupported(format!(
            "{}: pipeline class {class:?}; remixd runs {} and {}",
            path.display(),
            PIPELINES.join(", "),
            crate::flux2::PIPELINES.join(", ")
        )))
    }
}

/// `dir`'s `model_index.json`: its path, its contents and the pipeline class it names
/// (empty when it names none).
pub(crate) fn read_index(dir: &Path) -> Result<(PathBuf, Value, String)> {
    if !dir.is_dir() {
        return Err(Error::MissingFile(dir.to_owned()));
    }
    let path = dir.join("model_index.json");
    let index: Value = read_json(&path)?;
    let class = index
        .get("_class_name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok((path, index, class))
}

/// Checks `model_index.json`: a pipeline class remixd runs, and the components it needs.
fn check_index(dir: &Path) -> Result<()> {
    if family(dir)? != Family::StableDiffusion {
        return Err(Error::Unsupported(format!(
            "{}: a FLUX.2 [klein] model, not Stable Diffusion",
            dir.join("model_index.json").display()
        )));
    }
    let (path, index, _) = read_index(dir)?;
    check_components(
        &path,
        &index,
        &[
            ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"][..]),
            ("text_encoder", &["CLIPTextModel"][..]),
            ("unet", &["UNet2DConditionModel"][..]),
            ("vae", &["AutoencoderKL"][..]),
            ("scheduler", &[][..]),
        ],
    )
}

/// Checks that `model_index.json` (at `path`) names each component with one of the
/// expected classes (any class when the list is empty).
pub(crate) fn check_components(
    path: &Path,
    index: &Value,
    components: &[(&str, &[&str])],
) -> Result<()> {
    for &(component, expected) in components {
        // Each entry is `[library, class]`.
        let found = index
            .get(component)
            .and_then(Value::as_array)
            .and_then(|pair| pair.get(1))
            .and_then(Value::as_str)
            .ok_or_else(|| Error::BadConfig {
                path: path.to_owned(),
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

/// A large component's weights (FLUX.2's transformer and text encoder), one file or the
/// shards `<stem>.safetensors.index.json` names, as a VarBuilder that hands tensors out
/// in `storage`: see [`storage_dtype`]. Returns the first file, for error messages.
pub(crate) fn weights_stored(
    dir: &Path,
    stem: &str,
    compute: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, DType, PathBuf)> {
    let files = weight_files(dir, stem)?;
    let storage = storage_dtype(&files, compute)?;
    // SAFETY: as in `weights`: read-only maps of files nobody truncates while loading.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, storage, device) }
        .context(|| format!("reading {}", files[0].display()))?;
    Ok((vb, storage, files[0].clone()))
}

/// The dtype [`weights_stored`] keeps the component `dir`/`stem`'s linear weights in
/// when computing in `compute` (for reports such as the benchmark's).
pub fn kept_dtype(dir: &Path, stem: &str, compute: DType) -> Result<DType> {
    storage_dtype(&weight_files(dir, stem)?, compute)
}

/// The dtype a large model's linear weights are kept in: their on-disk half precision
/// when they are stored in f16 or bf16 and `compute` is wider (widened for each product
/// by `linear::Linear`), otherwise `compute`.
pub(crate) fn storage_dtype(files: &[PathBuf], compute: DType) -> Result<DType> {
    // SAFETY: read-only maps, as above; only the headers are read here.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .context(|| format!("reading {}", files[0].display()))?;
    let mut half = None;
    for (_, view) in st.tensors() {
        match view.dtype() {
            safetensors::Dtype::BF16 => half = Some(DType::BF16),
            safetensors::Dtype::F16 => half = Some(DType::F16),
            _ => return Ok(compute),
        }
    }
    Ok(match half {
        Some(h) if compute.size_in_bytes() > h.size_in_bytes() => h,
        _ => compute,
    })
}

/// The weight files of a component: `<stem>.safetensors` (or its `fp16` variant), or
/// every shard named by `<stem>.safetensors.index.json`.
pub(crate) fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if !index.is_file() {
        return Ok(vec![weights_file(dir, stem)?]);
    }
    let json: Value = read_json(&index)?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::BadConfig {
            path: index.clone(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for shard in map.values() {
        let name = shard.as_str().ok_or_else(|| Error::BadConfig {
            path: index.clone(),
            reason: "a `weight_map` value is not a file name".into(),
        })?;
        // A shard is a plain file name next to the index, never a path elsewhere.
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(Error::BadConfig {
                path: index.clone(),
                reason: format!("shard {name:?} is not a file name in the same folder"),
            });
        }
        let file = dir.join(name);
        if !files.contains(&file) {
            if !file.is_file() {
                return Err(Error::MissingFile(file));
            }
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(Error::BadConfig {
            path: index,
            reason: "`weight_map` names no file".into(),
        });
    }
    files.sort();
    Ok(files)
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
