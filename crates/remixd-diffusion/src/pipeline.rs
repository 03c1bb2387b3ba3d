//! The img2img pipeline: prompt → embeddings, base image → latents → noised to the
//! timestep that the strength selects → denoised with classifier-free guidance →
//! decoded.
//!
//! It follows diffusers' `StableDiffusionImg2ImgPipeline` step for step (the parity
//! tests replay that pipeline's random draws and compare the final latents and pixels).
//! Sizes, presets and the task's strength curve belong to the engine adapter; here
//! `strength` has diffusers' meaning: the fraction of the schedule that is run.

use candle_core::{DType, Device, Tensor};

use crate::model::StableDiffusion;
use crate::noise::NoiseSource;
use crate::scheduler::{self, SchedulerKind};
use crate::{Error, Result};

/// What one img2img run does.
#[derive(Debug, Clone)]
pub struct Img2ImgParams {
    pub prompt: String,
    pub negative_prompt: String,
    /// Steps of the full schedule; `strength` of them run.
    pub steps: usize,
    /// 0..=1, diffusers' meaning: 1 redraws everything, 0.3 keeps most of the image.
    pub strength: f64,
    /// Classifier-free guidance; 1 or less runs the UNet once per step without it.
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
}

/// The result of a run.
pub struct Img2ImgOutput {
    /// The final latents, before division by the VAE's scaling factor.
    pub latents: Tensor,
    /// The decoded image, `[1, 3, H, W]`, in [-1, 1] (unclamped, as the VAE gives it).
    pub decoded: Tensor,
    /// The UNet passes run.
    pub steps_run: usize,
}

/// Called after each denoising step with (steps done, steps in all); `false` stops the
/// run with [`Error::Cancelled`].
pub type OnStep<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

impl StableDiffusion {
    /// Text embeddings, `[1, 77, hidden]`, of one prompt.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(text)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        self.text_encoder.forward(&ids)
    }

    /// Latents of an image `[1, 3, H, W]` in [-1, 1]: the VAE posterior, sampled with one
    /// draw from `noise`, times the scaling factor.
    pub fn encode_image(&self, image: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let (mean, logvar) = self.vae.encode(image)?;
        let eps = noise.draw(mean.dims(), &self.device)?;
        let std = (logvar * 0.5)?.exp()?;
        let sample = (mean + (std * eps)?)?;
        Ok((sample * self.vae.config().scaling_factor)?)
    }

    /// Runs img2img on `image` (`[1, 3, H, W]` in [-1, 1], sides multiples of the VAE
    /// factor times the UNet's downsampling).
    pub fn img2img(
        &self,
        image: &Tensor,
        params: &Img2ImgParams,
        noise: &mut dyn NoiseSource,
        on_step: OnStep<'_>,
    ) -> Result<Img2ImgOutput> {
        let guided = params.guidance_scale > 1.0;
        let prompt = self.encode_prompt(&params.prompt)?;
        let context = if guided {
            let negative = self.encode_prompt(&params.negative_prompt)?;
            Tensor::cat(&[&negative, &prompt], 0)?
        } else {
            prompt
        };

        let mut sched = scheduler::build(
            &self.scheduler,
            params.scheduler,
            params.steps,
            params.strength,
        )?;
        let timesteps = sched.timesteps().to_vec();
        if timesteps.is_empty() {
            return Err(Error::Unsupported(format!(
                "strength {} with {} steps leaves no step to run",
                params.strength, params.steps
            )));
        }

        let init = self.encode_image(image, noise)?;
        let eps = noise.draw(init.dims(), &self.device)?;
        let mut latents = sched.add_noise(&init, &eps, 0)?;

        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = sched.scale_model_input(&input, i)?;
            let out = self.unet.forward(&input, t, &context)?;
            let out = if guided {
                let uncond = out.narrow(0, 0, 1)?;
                let text = out.narrow(0, 1, 1)?;
                (&uncond + ((text - &uncond)? * params.guidance_scale)?)?
            } else {
                out
            };
            let step_noise = if sched.needs_noise() {
                Some(noise.draw(latents.dims(), &self.device)?)
            } else {
                None
            };
            latents = sched.step(&out, i, &latents, step_noise.as_ref())?;
            if !on_step(i + 1, total) {
                return Err(Error::Cancelled);
            }
        }

        let decoded = self
            .vae
            .decode(&(&latents / self.vae.config().scaling_factor)?)?;
        Ok(Img2ImgOutput {
            latents,
            decoded,
            steps_run: total,
        })
    }

    /// The side lengths a generated image must be a multiple of: the VAE's factor times
    /// the UNet's downsampling (64 for SD 1.x/2.x).
    pub fn size_multiple(&self) -> u32 {
        let down = self
            .unet
            .config()
            .block_out_channels
            .len()
            .saturating_sub(1) as u32;
        self.vae.vae_scale_factor() as u32 * (1 << down)
    }

    /// The side of the square the model was trained at (512 for SD 1.5, 768 for SD 2.1).
    pub fn native_side(&self) -> u32 {
        self.unet.config().sample_size as u32 * self.vae.vae_scale_factor() as u32
    }
}

/// RGB bytes (`w`×`h`, row-major) → `[1, 3, h, w]` in [-1, 1], as diffusers'
/// image processor normalises.
pub fn image_to_tensor(rgb: &[u8], (w, h): (u32, u32), device: &Device) -> Result<Tensor> {
    let t = Tensor::from_slice(rgb, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?;
    Ok(((t / 127.5)? - 1.0)?.unsqueeze(0)?)
}

/// `[1, 3, h, w]` in [-1, 1] → RGB bytes, rounded as diffusers rounds.
pub fn tensor_to_image(t: &Tensor) -> Result<(Vec<u8>, (u32, u32))> {
    let (_, _, h, w) = t.dims4()?;
    let t = ((t.squeeze(0)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let t = (t * 255.0)?.round()?.permute((1, 2, 0))?;
    let bytes = t.flatten_all()?.to_dtype(DType::U8)?.to_vec1::<u8>()?;
    Ok((bytes, (w as u32, h as u32)))
}

/// The generation size for a target size: about `native`² pixels with the target's
/// aspect ratio, each side a multiple of `multiple` and at least one multiple.
pub fn generation_size(native: u32, multiple: u32, (tw, th): (u32, u32)) -> (u32, u32) {
    let aspect = tw as f64 / th.max(1) as f64;
    let area = native as f64 * native as f64;
    let h = (area / aspect).sqrt();
    let w = h * aspect;
    let round = |x: f64| ((x / multiple as f64).round().max(1.0) as u32) * multiple;
    (round(w), round(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_size_keeps_the_pixel_budget_and_the_aspect() {
        assert_eq!(generation_size(512, 64, (1024, 1024)), (512, 512));
        assert_eq!(generation_size(512, 64, (512, 512)), (512, 512));
        // 16:9 at a 512² budget: 683×384 → 704×384.
        assert_eq!(generation_size(512, 64, (1024, 576)), (704, 384));
        assert_eq!(generation_size(512, 64, (576, 1024)), (384, 704));
        assert_eq!(generation_size(768, 64, (1024, 768)), (896, 640));
        // Extreme aspect ratios never give a zero side.
        let (w, h) = generation_size(64, 64, (4000, 10));
        assert!(w >= 64 && h == 64);
    }

    #[test]
    fn image_tensor_round_trip_is_exact() {
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let t = image_to_tensor(&rgb, (4, 3), &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 3, 4]);
        let (back, size) = tensor_to_image(&t).unwrap();
        assert_eq!(size, (4, 3));
        assert_eq!(back, rgb);
    }
}
