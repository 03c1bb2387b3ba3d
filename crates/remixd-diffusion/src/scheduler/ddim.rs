//! DDIM with eta 0 (diffusers' `DDIMScheduler`).

use candle_core::Tensor;

use super::schedule::{alphas_cumprod, np_arange, np_linspace, np_round};
use super::{
    check_step, in_f32, unsupported, Prediction, Scheduler, SchedulerConfig, SchedulerKind, Spacing,
};
use crate::error::Result;

/// Deterministic DDIM over integer timesteps.
pub(crate) struct Ddim {
    /// All inference timesteps; the run uses those from `begin`.
    timesteps: Vec<f64>,
    begin: usize,
    alphas_cumprod: Vec<f32>,
    /// The alpha product after the last training step.
    final_alpha_cumprod: f32,
    /// diffusers' distance to the previous timestep: `num_train_timesteps // steps`.
    step_ratio: i64,
    prediction: Prediction,
    clip_range: Option<f64>,
}

impl Ddim {
    pub(crate) fn new(
        cfg: &SchedulerConfig,
        prediction: Prediction,
        spacing: Spacing,
        steps: usize,
        begin: usize,
    ) -> Result<Self> {
        let ac = alphas_cumprod(cfg, false)?;
        let n_train = cfg.num_train_timesteps;
        let timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| np_round(t) as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = (n_train / steps) as i64;
                (0..steps as i64)
                    .rev()
                    .map(|i| i * ratio + cfg.steps_offset)
                    .collect()
            }
            Spacing::Trailing => np_arange(n_train as f64, 0.0, -(n_train as f64 / steps as f64))
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect(),
        };
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0 || t >= n_train as i64) {
            return Err(unsupported(
                "steps_offset",
                format!(
                    "{} (timestep {t} falls outside the {n_train}-step schedule)",
                    cfg.steps_offset
                ),
            ));
        }
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            ac[0]
        };
        let clip_range = cfg
            .clip_sample
            .unwrap_or(true)
            .then_some(cfg.clip_sample_range);
        Ok(Self {
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            begin,
            alphas_cumprod: ac,
            final_alpha_cumprod,
            step_ratio: (n_train / steps) as i64,
            prediction,
            clip_range,
        })
    }

    fn timestep(&self, step: usize) -> Result<i64> {
        check_step(step, self.timesteps.len() - self.begin)?;
        Ok(self.timesteps[self.begin + step] as i64)
    }
}

impl Scheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps[self.begin..]
    }

    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        self.timestep(step)?;
        Ok(sample.clone())
    }

    fn needs_noise(&self) -> bool {
        false
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t = self.timestep(step)?;
        let prev_t = t - self.step_ratio;
        let alpha_t = self.alphas_cumprod[t as usize] as f64;
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        } as f64;
        let beta_t = 1.0 - alpha_t;
        let (sa, sb) = (alpha_t.sqrt(), beta_t.sqrt());
        let prediction = self.prediction;
        let clip = self.clip_range;
        in_f32(model_output, &[model_output, sample], |xs| {
            let (out, x) = (&xs[0], &xs[1]);
            let (x0, eps) = match prediction {
                Prediction::Epsilon => (((x - (out * sb)?)? / sa)?, out.clone()),
                Prediction::Sample => (out.clone(), ((x - (out * sa)?)? / sb)?),
                Prediction::V => (((x * sa)? - (out * sb)?)?, ((out * sa)? + (x * sb)?)?),
            };
            let x0 = match clip {
                Some(r) => x0.clamp(-r, r)?,
                None => x0,
            };
            // eta = 0: no variance term, the whole remaining noise is the direction.
            (x0 * alpha_prev.sqrt())? + (eps * (1.0 - alpha_prev).sqrt())?
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let t = self.timestep(step)?;
        let ac = self.alphas_cumprod[t as usize] as f64;
        in_f32(original, &[original, noise], |xs| {
            (&xs[0] * ac.sqrt())? + (&xs[1] * (1.0 - ac).sqrt())?
        })
    }
}
