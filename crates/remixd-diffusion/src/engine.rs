//! The `local` engine: remixd's [`Engine`] over the model family its directory holds.
//!
//! What it adds to the pipelines is the task's vocabulary: the generation size (the
//! model's native pixel budget at the target's aspect ratio, resized to the requested
//! size at the end), the step count and guidance per `rendering_speed` and family, the
//! strength curve, the style presets, one seed per image, progress and cancellation.
//!
//! - Stable Diffusion 1.x/2.x: plain img2img of the base image with the prompt; the
//!   character reference, its mask and the style images are not used (the README says
//!   so).
//! - FLUX.2 [klein]: the character remix. The base image is the pipeline's image, the
//!   character (its mask applied, see [`crate::flux2::inputs`]) the first reference
//!   image, the style images further references.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use candle_core::Device;
use image::RgbImage;
use remixd_domain::{RenderingSpeed, Style};
use remixd_engine::{
    preview, Engine, EngineError, EngineImage, InputRole, Job, Progress, WorkingSize,
};
use tokio_util::sync::CancellationToken;

use crate::flux2::inputs::{masked_character, sized_reference};
use crate::flux2::pipeline::{RemixInputs, RemixParams};
use crate::flux2::{Flux2Klein, DEFAULT_TEXT_LAYERS};
use crate::model::{Family, StableDiffusion};
use crate::noise::SeededNoise;
use crate::pipeline::{generation_size, image_to_tensor, tensor_to_image, Img2ImgParams};
use crate::scheduler::SchedulerKind;
use crate::Error;

/// How the local engine runs; the defaults are documented in the README.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub model_dir: PathBuf,
    /// `cpu`, or `cuda:N` in a build with the `cuda` feature.
    pub device: String,
    /// Full-schedule steps for TURBO, BALANCED, QUALITY (img2img runs the strength's
    /// share of them); `None` takes the family's preset ([`Presets`]).
    pub steps: Option<[usize; 3]>,
    /// Classifier-free guidance; 1 or less turns it off (SD-Turbo, distilled klein);
    /// `None` takes the family's preset.
    pub guidance_scale: Option<f64>,
    /// SD only: the scheduler; `None` takes the model's own (PNDM, which remixd does not
    /// implement, runs as DDIM over the same schedule).
    pub scheduler: Option<SchedulerKind>,
    /// FLUX.2 only: the text encoder's hidden states the prompt embeddings stack.
    pub text_layers: Vec<usize>,
    /// The side of the square whose pixel count images are generated at (then resized
    /// to the requested size); `None` takes the model's native one (512 for SD 1.5,
    /// 1024 for klein). Smaller is faster on a CPU, at some cost in detail.
    pub native_side: Option<u32>,
}

impl LocalConfig {
    pub fn new(model_dir: PathBuf) -> Self {
        Self {
            model_dir,
            device: "cpu".into(),
            steps: None,
            guidance_scale: None,
            scheduler: None,
            text_layers: DEFAULT_TEXT_LAYERS.to_vec(),
            native_side: None,
        }
    }
}

/// Steps (TURBO, BALANCED, QUALITY) and guidance per family, unless configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Presets {
    pub steps: [usize; 3],
    pub guidance_scale: f64,
}

impl Presets {
    /// Stable Diffusion 1.x/2.x: 12/25/40 steps, guidance 7.5.
    pub const STABLE_DIFFUSION: Self = Self {
        steps: [12, 25, 40],
        guidance_scale: 7.5,
    };
    /// FLUX.2 [klein], step-distilled (the released klein 4B): the 4 steps it was
    /// distilled for at every speed but QUALITY's 6, no guidance.
    pub const KLEIN_DISTILLED: Self = Self {
        steps: [4, 4, 6],
        guidance_scale: 1.0,
    };
    /// FLUX.2 [klein] base: 20/28/50 steps with guidance 4.
    pub const KLEIN_BASE: Self = Self {
        steps: [20, 28, 50],
        guidance_scale: 4.0,
    };
}

/// The loaded model of one family (boxed: each is a few kB of handles).
enum Model {
    StableDiffusion {
        model: Box<StableDiffusion>,
        scheduler: SchedulerKind,
    },
    Flux2(Box<Flux2Klein>),
}

/// The local diffusion engine. The model is loaded once, at construction; clones share it.
#[derive(Clone)]
pub struct LocalEngine {
    model: Arc<Model>,
    presets: Presets,
    native_side: Option<u32>,
}

/// Parses the `engine.local.scheduler` setting: empty for the model's own.
pub fn scheduler_setting(s: &str) -> Result<Option<SchedulerKind>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    SchedulerKind::from_short_name(s)
        .map(Some)
        .map_err(|e| Error::Unsupported(format!("engine.local.scheduler = {s:?}: {e}")))
}

/// Parses `cpu` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, Error> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if cfg!(feature = "cuda") => Ok(Device::new_cuda(n)?),
            Some(_) => Err(Error::Unsupported(
                "engine.local.device = cuda:N needs a build with the `cuda` feature".into(),
            )),
            None => Err(Error::Unsupported(format!(
                "engine.local.device = {s:?}; use \"cpu\" or \"cuda:N\""
            ))),
        },
    }
}

/// The share of the schedule that runs for a task's `strength` (0.1..=1): high strength
/// keeps the base image, low strength redraws more. Linear from 0.915 at 0.1 to 0.15 at
/// 1.0; never 0, so the prompt always has some effect.
pub fn denoise_fraction(strength: f64) -> f64 {
    (1.0 - 0.85 * strength.clamp(0.0, 1.0)).clamp(0.15, 1.0)
}

/// The full-schedule steps to ask for so that at least one step runs: img2img runs
/// `floor(steps · fraction)` of them, which is 0 for few steps and a small fraction.
pub fn schedule_steps(steps: usize, fraction: f64) -> usize {
    let least = (1.0 / fraction).ceil() as usize;
    steps.max(least)
}

/// The prompt the model sees: the style's preset phrases, then remixd's prompt
/// expansion when the task asks for it.
pub fn local_prompt(job: &Job) -> String {
    let styled = styled_prompt(&job.prompt, job.style);
    if job.expand_prompt {
        remixd_domain::prompt::expand(&styled, job.style)
    } else {
        styled
    }
}

/// The prompt with the style's preset phrases.
pub fn styled_prompt(prompt: &str, style: Style) -> String {
    match style {
        Style::Auto => prompt.to_owned(),
        Style::Realistic => format!("{prompt}, photograph, natural light, sharp focus, detailed"),
        Style::Fiction => format!("{prompt}, illustration, digital painting, vivid colours"),
    }
}

impl LocalEngine {
    /// Loads the model of whichever family the directory holds. Slow (seconds to a
    /// minute on a CPU); call it once.
    pub fn load(cfg: LocalConfig) -> Result<Self, Error> {
        let device = parse_device(&cfg.device)?;
        let (model, family_presets) = match crate::model::family(&cfg.model_dir)? {
            Family::StableDiffusion => {
                if !cfg.text_layers.is_empty() && cfg.text_layers != DEFAULT_TEXT_LAYERS {
                    tracing::warn!("engine.local.text_layers is for FLUX.2 models; ignored");
                }
                let model = StableDiffusion::load(&cfg.model_dir, &device)?;
                let scheduler = match cfg.scheduler {
                    Some(k) => k,
                    None => SchedulerKind::for_config(&model.scheduler).map_err(|e| {
                        Error::Unsupported(format!(
                            "{e}; choose one with engine.local.scheduler (ddim, euler, euler_a, dpmpp_2m)"
                        ))
                    })?,
                };
                (
                    Model::StableDiffusion {
                        model: Box::new(model),
                        scheduler,
                    },
                    Presets::STABLE_DIFFUSION,
                )
            }
            Family::Flux2Klein => {
                if cfg.scheduler.is_some() {
                    return Err(Error::Unsupported(
                        "engine.local.scheduler is for Stable Diffusion models; FLUX.2 runs its \
                         own flow-matching scheduler (leave it empty)"
                            .into(),
                    ));
                }
                let model = Flux2Klein::load(&cfg.model_dir, &cfg.text_layers, &device)?;
                let presets = if model.distilled {
                    Presets::KLEIN_DISTILLED
                } else {
                    Presets::KLEIN_BASE
                };
                (Model::Flux2(Box::new(model)), presets)
            }
        };
        let presets = Presets {
            steps: cfg.steps.unwrap_or(family_presets.steps),
            guidance_scale: cfg.guidance_scale.unwrap_or(family_presets.guidance_scale),
        };
        Ok(Self {
            model: Arc::new(model),
            presets,
            native_side: cfg.native_side,
        })
    }

    /// The family of the loaded model.
    pub fn family(&self) -> Family {
        match *self.model {
            Model::StableDiffusion { .. } => Family::StableDiffusion,
            Model::Flux2(_) => Family::Flux2Klein,
        }
    }

    /// The steps and guidance in force (the family's presets, or the configured values).
    pub fn presets(&self) -> Presets {
        self.presets
    }

    /// The steps of the full schedule for a rendering speed.
    pub fn steps(&self, speed: RenderingSpeed) -> usize {
        match speed {
            RenderingSpeed::Turbo => self.presets.steps[0],
            RenderingSpeed::Balanced => self.presets.steps[1],
            RenderingSpeed::Quality => self.presets.steps[2],
        }
    }

    /// The size the model generates at for an output size: its native pixel budget at
    /// the output's aspect ratio, sides multiples of what it needs.
    pub fn generation_size(&self, output: (u32, u32)) -> (u32, u32) {
        let (native, multiple) = match &*self.model {
            Model::StableDiffusion { model, .. } => (model.native_side(), model.size_multiple()),
            Model::Flux2(model) => (model.native_side(), model.size_multiple()),
        };
        generation_size(self.native_side.unwrap_or(native), multiple, output)
    }

    /// Renders image `index` of `job` synchronously. `on_step(done, total)` returns
    /// `false` to cancel.
    pub fn render(
        &self,
        job: &Job,
        index: u32,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<RgbImage, Error> {
        let gen = self.generation_size(job.size.dimensions());
        let base = preview::cover_resize(&job.base, gen, job.rendering_speed);
        let fraction = denoise_fraction(job.strength.get());
        let steps = schedule_steps(self.steps(job.rendering_speed), fraction);
        let mut noise = SeededNoise::new(job.seed.for_image(index));
        let decoded = match &*self.model {
            Model::StableDiffusion { model, scheduler } => {
                let image = image_to_tensor(base.as_raw(), gen, &model.device)?;
                let params = Img2ImgParams {
                    prompt: local_prompt(job),
                    negative_prompt: job.negative_prompt.clone(),
                    steps,
                    strength: fraction,
                    guidance_scale: self.presets.guidance_scale,
                    scheduler: *scheduler,
                };
                model.img2img(&image, &params, &mut noise, on_step)?.decoded
            }
            Model::Flux2(model) => {
                let device = &model.device;
                let image = image_to_tensor(base.as_raw(), gen, device)?;
                let budget = gen.0 as u64 * gen.1 as u64;
                let multiple = model.size_multiple();
                let character = masked_character(&job.character, job.mask.as_ref());
                let mut references = Vec::with_capacity(1 + job.style_images.len());
                for r in std::iter::once(&character).chain(&job.style_images) {
                    let r = sized_reference(r, budget, multiple);
                    references.push(image_to_tensor(r.as_raw(), r.dimensions(), device)?);
                }
                let params = RemixParams {
                    prompt: local_prompt(job),
                    negative_prompt: job.negative_prompt.clone(),
                    steps,
                    strength: fraction,
                    guidance_scale: self.presets.guidance_scale,
                };
                let inputs = RemixInputs {
                    image: &image,
                    mask: None,
                    references: &references,
                };
                model.remix(&inputs, &params, &mut noise, on_step)?.decoded
            }
        };
        let (rgb, size) = tensor_to_image(&decoded)?;
        let img = RgbImage::from_raw(size.0, size.1, rgb)
            .ok_or_else(|| Error::Unsupported("decoded image has the wrong length".into()))?;
        Ok(preview::cover_resize(
            &img,
            job.size.dimensions(),
            job.rendering_speed,
        ))
    }
}

fn engine_error(e: Error) -> EngineError {
    match e {
        Error::Cancelled => EngineError::Cancelled,
        other => EngineError::Internal(format!("local engine: {other}")),
    }
}

#[async_trait]
impl Engine for LocalEngine {
    fn name(&self) -> &str {
        "local"
    }

    async fn ready(&self) -> Result<(), EngineError> {
        // The model is loaded before the engine exists.
        Ok(())
    }

    /// The base is cover-resized to the generation size (the model's native pixel
    /// budget at the output's aspect ratio), so nothing larger is needed. SD does not use
    /// the reference, mask and style images, so thumbnails will do; FLUX.2 takes
    /// references of up to the generation's pixel count, which a square of its longer
    /// side holds.
    fn working_size(&self, role: InputRole, output: (u32, u32)) -> WorkingSize {
        let (w, h) = self.generation_size(output);
        match (role, &*self.model) {
            (InputRole::Base, _) => WorkingSize::Cover(w, h),
            (_, Model::StableDiffusion { .. }) => WorkingSize::Fit(64, 64),
            (_, Model::Flux2(_)) => WorkingSize::Fit(w.max(h), w.max(h)),
        }
    }

    async fn generate(
        &self,
        job: Job,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Vec<EngineImage>, EngineError> {
        let this = self.clone();
        let token = cancel.clone();
        remixd_engine::run_blocking("local", &cancel, move || {
            let n = job.num_images.get();
            let mut images = Vec::with_capacity(n as usize);
            for i in 0..n {
                let mut on_step = |done: usize, total: usize| {
                    let pct = (i as usize * total + done) * 100 / (n as usize * total).max(1);
                    progress(pct.min(99) as u8);
                    !token.is_cancelled()
                };
                let img = this.render(&job, i, &mut on_step).map_err(engine_error)?;
                images.push(EngineImage::png(&img));
            }
            Ok(images)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denoise_fraction_falls_with_strength_and_stays_in_bounds() {
        assert!((denoise_fraction(0.1) - 0.915).abs() < 1e-9);
        assert!((denoise_fraction(1.0) - 0.15).abs() < 1e-9);
        let mut last = f64::INFINITY;
        for i in 1..=100 {
            let d = denoise_fraction(i as f64 / 100.0);
            assert!(d < last && (0.15..=1.0).contains(&d));
            last = d;
        }
    }

    #[test]
    fn at_least_one_step_runs_whatever_the_strength() {
        for steps in 1..=50 {
            for i in 1..=100 {
                let f = denoise_fraction(i as f64 / 100.0);
                let n = schedule_steps(steps, f);
                assert!(n >= steps);
                assert!((n as f64 * f).floor() >= 1.0, "{steps} steps at {f}");
            }
        }
        assert_eq!(schedule_steps(25, 0.5), 25, "enough steps are left alone");
    }

    #[test]
    fn scheduler_setting_names_the_key() {
        assert_eq!(scheduler_setting("").unwrap(), None);
        assert_eq!(
            scheduler_setting("euler_a").unwrap(),
            Some(SchedulerKind::EulerAncestral)
        );
        let e = scheduler_setting("pndm").unwrap_err().to_string();
        assert!(
            e.contains("engine.local.scheduler") && e.contains("pndm"),
            "{e}"
        );
    }

    #[test]
    fn devices_parse_with_clear_errors() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        let e = parse_device("gpu").unwrap_err().to_string();
        assert!(e.contains("engine.local.device"), "{e}");
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("cuda"), "{e}");
        }
    }
}
