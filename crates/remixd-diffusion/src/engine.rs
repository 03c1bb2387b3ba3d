//! The `local` engine: remixd's [`Engine`] over the Stable Diffusion img2img pipeline.
//!
//! What it adds to the pipeline is the task's vocabulary: the generation size (the
//! model's native pixel budget at the target's aspect ratio, resized to the requested
//! size at the end), the step count per `rendering_speed`, the strength curve, the
//! style presets, one seed per image, progress and cancellation.
//!
//! The pipeline is plain img2img of the base image with the prompt so far: the character
//! reference, its mask and the style images are not used yet (attention sharing comes
//! next), and the README says so.

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

use crate::model::StableDiffusion;
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
    /// share of them).
    pub steps: [usize; 3],
    /// Classifier-free guidance; 1 or less turns it off (SD-Turbo).
    pub guidance_scale: f64,
    /// The scheduler; `None` takes the model's own (PNDM, which remixd does not
    /// implement, runs as DDIM over the same schedule).
    pub scheduler: Option<SchedulerKind>,
}

impl LocalConfig {
    pub fn new(model_dir: PathBuf) -> Self {
        Self {
            model_dir,
            device: "cpu".into(),
            steps: [12, 25, 40],
            guidance_scale: 7.5,
            scheduler: None,
        }
    }
}

/// The local diffusion engine. The model is loaded once, at construction; clones share it.
#[derive(Clone)]
pub struct LocalEngine {
    model: Arc<StableDiffusion>,
    cfg: Arc<LocalConfig>,
    scheduler: SchedulerKind,
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
    /// Loads the model. Slow (seconds to a minute for SD 1.5 on a CPU); call it once.
    pub fn load(cfg: LocalConfig) -> Result<Self, Error> {
        let device = parse_device(&cfg.device)?;
        let model = StableDiffusion::load(&cfg.model_dir, &device)?;
        let scheduler = match cfg.scheduler {
            Some(k) => k,
            None => SchedulerKind::for_config(&model.scheduler).map_err(|e| {
                Error::Unsupported(format!(
                    "{e}; choose one with engine.local.scheduler (ddim, euler, euler_a, dpmpp_2m)"
                ))
            })?,
        };
        Ok(Self {
            model: Arc::new(model),
            cfg: Arc::new(cfg),
            scheduler,
        })
    }

    /// The steps of the full schedule for a rendering speed.
    pub fn steps(&self, speed: RenderingSpeed) -> usize {
        match speed {
            RenderingSpeed::Turbo => self.cfg.steps[0],
            RenderingSpeed::Balanced => self.cfg.steps[1],
            RenderingSpeed::Quality => self.cfg.steps[2],
        }
    }

    /// Renders image `index` of `job` synchronously. `on_step(done, total)` returns
    /// `false` to cancel.
    pub fn render(
        &self,
        job: &Job,
        index: u32,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<RgbImage, Error> {
        let model = &self.model;
        let gen = generation_size(
            model.native_side(),
            model.size_multiple(),
            job.size.dimensions(),
        );
        let base = preview::cover_resize(&job.base, gen, job.rendering_speed);
        let image = image_to_tensor(base.as_raw(), gen, &model.device)?;
        let fraction = denoise_fraction(job.strength.get());
        let params = Img2ImgParams {
            prompt: local_prompt(job),
            negative_prompt: job.negative_prompt.clone(),
            steps: schedule_steps(self.steps(job.rendering_speed), fraction),
            strength: fraction,
            guidance_scale: self.cfg.guidance_scale,
            scheduler: self.scheduler,
        };
        let mut noise = SeededNoise::new(job.seed.for_image(index));
        let out = model.img2img(&image, &params, &mut noise, on_step)?;
        let (rgb, size) = tensor_to_image(&out.decoded)?;
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
    /// budget at the output's aspect ratio), so nothing larger is needed; the reference,
    /// mask and style images are not used yet, so thumbnails will do.
    fn working_size(&self, role: InputRole, output: (u32, u32)) -> WorkingSize {
        match role {
            InputRole::Base => {
                let (w, h) =
                    generation_size(self.model.native_side(), self.model.size_multiple(), output);
                WorkingSize::Cover(w, h)
            }
            InputRole::Character | InputRole::Mask | InputRole::Style => WorkingSize::Fit(64, 64),
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
