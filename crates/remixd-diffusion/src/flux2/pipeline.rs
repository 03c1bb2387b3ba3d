//! The FLUX.2 [klein] remix pipeline, as diffusers' `Flux2KleinInpaintPipeline` runs it:
//! prompt → Qwen3 hidden states; base image → patchified, normalised latents, noised to
//! the sigma that `strength` selects; the base image's own latents and each reference
//! image's appended as tokens (time coordinates 10 for the base, then 20, 30, …); Euler steps of the
//! transformer's velocity, with classifier-free guidance when asked (base variant) and
//! the inpainting mask holding the unmasked latents on the base image's noise path;
//! then denormalised, unpatchified and decoded.
//!
//! Without a mask (white everywhere) this is the pipeline's plain img2img; without a
//! reference, the base image is still the first reference, as in diffusers. Sizes,
//! presets and the task's strength curve belong to the engine adapter; here `strength`
//! has diffusers' meaning, the fraction of the schedule run.

use candle_core::{DType, Device, Tensor};

use super::scheduler::{empirical_mu, Schedule};
use super::{Flux2Klein, MAX_SEQUENCE_LENGTH};
use crate::noise::NoiseSource;
use crate::pipeline::OnStep;
use crate::vae::{patchify, unpatchify};
use crate::{Error, Result};

/// What one remix run does.
#[derive(Debug, Clone)]
pub struct RemixParams {
    pub prompt: String,
    /// The unconditional prompt of classifier-free guidance (diffusers' pipeline uses
    /// the empty prompt unless given embeddings; remixd passes the task's negative
    /// prompt).
    pub negative_prompt: String,
    /// Steps of the full schedule; `strength` of them run.
    pub steps: usize,
    /// 0..=1, diffusers' meaning: 1 redraws everything from noise, 0.3 keeps most of the
    /// image.
    pub strength: f64,
    /// Classifier-free guidance; 1 or less (or a distilled model) runs the transformer
    /// once per step without it.
    pub guidance_scale: f64,
}

/// The images of a run, as tensors on the model's device.
pub struct RemixInputs<'a> {
    /// `[1, 3, H, W]` in [-1, 1], sides multiples of [`Flux2Klein::size_multiple`].
    pub image: &'a Tensor,
    /// `[1, 1, H, W]` in [0, 1]: white is repainted, black kept (binarised at 0.5 as the
    /// pipeline's mask processor does). `None` repaints everything.
    pub mask: Option<&'a Tensor>,
    /// Reference images, each `[1, 3, h, w]` in [-1, 1], sides multiples of
    /// [`Flux2Klein::size_multiple`].
    pub references: &'a [Tensor],
}

/// The result of a run.
pub struct RemixOutput {
    /// The final latents as the VAE decodes them, `[1, latent_channels, H/f, W/f]`
    /// (the pipeline's `output_type="latent"`).
    pub latents: Tensor,
    /// The decoded image, `[1, 3, H, W]`, in [-1, 1] (unclamped, as the VAE gives it).
    pub decoded: Tensor,
    /// The transformer steps run (each one or two passes).
    pub steps_run: usize,
}

impl Flux2Klein {
    /// The prompt embeddings `[1, 512, layers · hidden]` of one prompt.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor> {
        let (ids, mask) = self.prompt.encode(text, MAX_SEQUENCE_LENGTH)?;
        self.text_encoder.hidden_states(&ids, &mask)
    }

    /// An image `[1, 3, H, W]` in [-1, 1] as the transformer's latents: the VAE
    /// posterior's mode, 2×2-patchified and normalised, `[1, 4c, H/2f, W/2f]`.
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        let (mode, _) = self.vae.encode(image)?;
        Ok(self.latent_stats.normalise(&patchify(&mode)?)?)
    }

    /// Runs the remix.
    pub fn remix(
        &self,
        inputs: &RemixInputs<'_>,
        params: &RemixParams,
        noise: &mut dyn NoiseSource,
        on_step: OnStep<'_>,
    ) -> Result<RemixOutput> {
        let guided = params.guidance_scale > 1.0 && !self.distilled;
        let (_, _, height, width) = inputs.image.dims4()?;
        let m = self.size_multiple() as usize;
        if height % m != 0 || width % m != 0 || height == 0 || width == 0 {
            return Err(Error::Unsupported(format!(
                "image of {width}×{height}; sides must be non-zero multiples of {m}"
            )));
        }

        let prompt = self.to_compute(&self.encode_prompt(&params.prompt)?)?;
        let negative = if guided {
            Some(self.to_compute(&self.encode_prompt(&params.negative_prompt)?)?)
        } else {
            None
        };
        let txt_ids = text_ids(prompt.dim(1)?, &self.device)?;

        // The schedule, cut by strength.
        let (h, w) = (height / m, width / m);
        let mu = empirical_mu(h * w, params.steps);
        let schedule = Schedule::new(&self.scheduler, params.steps, mu)?;
        let start = schedule.start_for_strength(params.strength);
        let total = schedule.timesteps.len().saturating_sub(start);
        if total == 0 {
            return Err(Error::Unsupported(format!(
                "strength {} with {} steps leaves no step to run",
                params.strength, params.steps
            )));
        }

        // The base image's latents, noised to the first sigma run.
        let image_latents = self.encode_image(inputs.image)?;
        let eps = noise.draw(image_latents.dims(), &self.device)?;
        let latents = schedule.scale_noise(&image_latents, &eps, start)?;
        let mut latents = pack(&latents)?;
        let eps = pack(&eps)?;
        let init = pack(&image_latents)?;
        let latent_ids = image_ids(h, w, 0, &self.device)?;

        // Reference tokens: the base image's own latents first, then each reference.
        let mut cond = vec![init.clone()];
        let mut cond_ids = vec![image_ids(h, w, 10, &self.device)?];
        for (i, r) in inputs.references.iter().enumerate() {
            let (_, _, rh, rw) = r.dims4()?;
            if rh % m != 0 || rw % m != 0 || rh == 0 || rw == 0 {
                return Err(Error::Unsupported(format!(
                    "reference {i} of {rw}×{rh}; sides must be non-zero multiples of {m}"
                )));
            }
            cond.push(pack(&self.encode_image(r)?)?);
            cond_ids.push(image_ids(rh / m, rw / m, 10 * (i + 2), &self.device)?);
        }
        let cond_ids = Tensor::cat(&cond_ids, 0)?;
        let cond = Tensor::cat(&cond, 1)?;
        let all_ids = Tensor::cat(&[&latent_ids, &cond_ids], 0)?;

        let mask = match inputs.mask {
            Some(mask) => Some(mask_latents(mask, h, w)?),
            None => None,
        };

        let seq = latents.dim(1)?;
        for (k, &t) in schedule.timesteps[start..].iter().enumerate() {
            let index = start + k;
            let input = self.to_compute(&Tensor::cat(&[&latents, &cond], 1)?)?;
            let timestep = (t / 1000.0) as f64;
            let velocity = |embeds: &Tensor| -> Result<Tensor> {
                let out = self
                    .transformer
                    .forward(&input, embeds, timestep, &all_ids, &txt_ids, None)?;
                Ok(out.narrow(1, 0, seq)?.to_dtype(DType::F32)?)
            };
            let mut v = velocity(&prompt)?;
            if let Some(negative) = &negative {
                let uncond = velocity(negative)?;
                v = (&uncond + ((v - &uncond)? * params.guidance_scale)?)?;
            }
            latents = schedule.step(&v, index, &latents)?;
            if let Some(mask) = &mask {
                let proper = if k + 1 < total {
                    schedule.scale_noise(&init, &eps, index + 1)?
                } else {
                    init.clone()
                };
                // (1 - mask) · proper + mask · latents
                let keep = (mask.ones_like()? - mask)?;
                latents = (proper.broadcast_mul(&keep)? + latents.broadcast_mul(mask)?)?;
            }
            if !on_step(k + 1, total) {
                return Err(Error::Cancelled);
            }
        }

        let latents = unpack(&latents, h, w)?;
        let latents = unpatchify(&self.latent_stats.denormalise(&latents)?)?;
        let decoded = self.vae.decode(&latents)?;
        Ok(RemixOutput {
            latents,
            decoded,
            steps_run: total,
        })
    }

    fn to_compute(&self, t: &Tensor) -> Result<Tensor> {
        Ok(crate::linear::widened(t, self.dtype)?)
    }
}

/// `(b, c, h, w)` → `(b, h·w, c)`: one token per latent position, row-major.
pub fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?)
}

/// The inverse of [`pack`] for an `h`×`w` grid of tokens.
pub fn unpack(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    if n != h * w {
        return Err(Error::Unsupported(format!(
            "{n} tokens do not make a {h}×{w} grid"
        )));
    }
    Ok(x.transpose(1, 2)?.reshape((b, c, h, w))?)
}

/// Position ids `(T, H, W, L)` of an `h`×`w` grid of image tokens at time `t`:
/// `(t, y, x, 0)`, row-major, `[h·w, 4]` f32.
pub fn image_ids(h: usize, w: usize, t: usize, device: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(h * w * 4);
    for y in 0..h {
        for x in 0..w {
            v.extend_from_slice(&[t as f32, y as f32, x as f32, 0.0]);
        }
    }
    Ok(Tensor::from_vec(v, (h * w, 4), device)?)
}

/// Position ids of `len` text tokens: `(0, 0, 0, l)`, `[len, 4]` f32.
pub fn text_ids(len: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..len).flat_map(|l| [0.0, 0.0, 0.0, l as f32]).collect();
    Ok(Tensor::from_vec(v, (len, 4), device)?)
}

/// The inpainting mask as the pipeline prepares it: binarised at 0.5 (white = 1),
/// resized bilinearly (half-pixel centres, no antialiasing, as torch's `interpolate`)
/// to the `h`×`w` token grid and packed, `[1, h·w, 1]`.
pub fn mask_latents(mask: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, mh, mw) = mask.dims4()?;
    let m: Vec<f32> = mask
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| if v < 0.5 { 0.0 } else { 1.0 })
        .collect();
    let out = bilinear(&m, (mh, mw), (h, w));
    Ok(Tensor::from_vec(out, (1, h * w, 1), mask.device())?)
}

/// Bilinear resampling of a single-channel `src` (`sh`×`sw`, row-major) to `dh`×`dw`,
/// with torch's `align_corners=False` source coordinates. Written here because no image
/// crate resamples with exactly torch's coordinates, which parity needs.
fn bilinear(src: &[f32], (sh, sw): (usize, usize), (dh, dw): (usize, usize)) -> Vec<f32> {
    let coords = |dst: usize, from: usize, to: usize| -> (usize, usize, f32) {
        let scale = from as f32 / to as f32;
        let s = ((dst as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(from - 1);
        let i1 = (i0 + 1).min(from - 1);
        (i0, i1, s - i0 as f32)
    };
    let mut out = Vec::with_capacity(dh * dw);
    for y in 0..dh {
        let (y0, y1, ly) = coords(y, sh, dh);
        for x in 0..dw {
            let (x0, x1, lx) = coords(x, sw, dw);
            let top = (1.0 - lx) * src[y0 * sw + x0] + lx * src[y0 * sw + x1];
            let bottom = (1.0 - lx) * src[y1 * sw + x0] + lx * src[y1 * sw + x1];
            out.push((1.0 - ly) * top + ly * bottom);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_row_major_with_the_time_coordinate() {
        let ids = image_ids(2, 3, 20, &Device::Cpu).unwrap();
        let v = ids.to_vec2::<f32>().unwrap();
        assert_eq!(v[0], [20.0, 0.0, 0.0, 0.0]);
        assert_eq!(v[4], [20.0, 1.0, 1.0, 0.0]);
        let t = text_ids(3, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(t[2], [0.0, 0.0, 0.0, 2.0]);
    }

    #[test]
    fn pack_and_unpack_are_inverse() {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 4, 2, 3))
            .unwrap();
        let p = pack(&x).unwrap();
        assert_eq!(p.dims(), &[1, 6, 4]);
        // Token (y, x) = (1, 2) holds channel k's value at that position.
        let row: Vec<f32> = p.get(0).unwrap().get(5).unwrap().to_vec1().unwrap();
        assert_eq!(row, vec![5.0, 11.0, 17.0, 23.0]);
        let back = unpack(&p, 2, 3).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn bilinear_matches_torch_coordinates() {
        // 4 → 2 averages pairs (sources at 0.5 and 2.5); 2 → 4 clamps at the edges.
        let down = bilinear(&[0.0, 1.0, 2.0, 3.0], (1, 4), (1, 2));
        assert_eq!(down, vec![0.5, 2.5]);
        let up = bilinear(&[0.0, 1.0], (1, 2), (1, 4));
        assert_eq!(up, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
