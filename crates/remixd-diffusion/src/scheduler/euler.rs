//! Euler (diffusers' `EulerDiscreteScheduler`, no churn) and Euler ancestral
//! (`EulerAncestralDiscreteScheduler`).

use candle_core::Tensor;

use super::schedule::{
    alphas_cumprod, exponential, interp_index, karras, linspace_f32, np_arange, np_linspace,
    np_round, sigma_to_t, train_sigmas,
};
use super::{
    check_step, in_f32, unsupported, Prediction, Scheduler, SchedulerConfig, SchedulerKind, Spacing,
};
use crate::error::{Error, Result};

/// Euler steps in sigma space; ancestral ones add fresh noise every step.
pub(crate) struct Euler {
    ancestral: bool,
    /// All inference timesteps; the run uses those from `begin`.
    timesteps: Vec<f64>,
    /// One sigma per timestep, then the final sigma (f32 values, as diffusers holds them).
    sigmas: Vec<f64>,
    begin: usize,
    prediction: Prediction,
    init_noise_sigma: f64,
}

/// The f32 timesteps both Euler schedulers place before any sigma conversion.
fn spaced_timesteps(cfg: &SchedulerConfig, spacing: Spacing, steps: usize) -> Vec<f32> {
    let n_train = cfg.num_train_timesteps;
    match spacing {
        Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        Spacing::Leading => {
            let ratio = (n_train / steps) as f64;
            (0..steps)
                .rev()
                .map(|i| np_round(i as f64 * ratio) as f32 + cfg.steps_offset as f32)
                .collect()
        }
        Spacing::Trailing => np_arange(n_train as f64, 0.0, -(n_train as f64 / steps as f64))
            .into_iter()
            .map(|t| np_round(t) as f32 - 1.0)
            .collect(),
    }
}

impl Euler {
    pub(crate) fn new(
        cfg: &SchedulerConfig,
        ancestral: bool,
        prediction: Prediction,
        spacing: Spacing,
        steps: usize,
        begin: usize,
    ) -> Result<Self> {
        if ancestral && prediction == Prediction::Sample {
            return Err(unsupported(
                "prediction_type",
                "sample (EulerAncestralDiscreteScheduler does not implement it)",
            ));
        }
        let ac = alphas_cumprod(cfg, true)?;
        let train = train_sigmas(&ac);
        let spaced = spaced_timesteps(cfg, spacing, steps);
        let interpolated: Vec<f64> = spaced
            .iter()
            .map(|&t| interp_index(t as f64, &train))
            .collect();
        let (timesteps, sigmas) = if ancestral {
            let mut sigmas: Vec<f64> = interpolated.iter().map(|&s| s as f32 as f64).collect();
            sigmas.push(0.0);
            (spaced.iter().map(|&t| t as f64).collect(), sigmas)
        } else {
            Self::discrete_schedule(cfg, prediction, &train, spaced, interpolated, steps)?
        };
        let max = sigmas.iter().copied().fold(f64::MIN, f64::max);
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Self {
            ancestral,
            timesteps,
            sigmas,
            begin,
            prediction,
            init_noise_sigma,
        })
    }

    /// `EulerDiscreteScheduler.set_timesteps`: interpolation, optional Karras or
    /// exponential sigmas, the final sigma, and continuous timesteps.
    fn discrete_schedule(
        cfg: &SchedulerConfig,
        prediction: Prediction,
        train: &[f32],
        spaced: Vec<f32>,
        interpolated: Vec<f64>,
        steps: usize,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        if cfg.use_beta_sigmas {
            return Err(unsupported("use_beta_sigmas", true));
        }
        if cfg.use_karras_sigmas && cfg.use_exponential_sigmas {
            return Err(Error::Unsupported(
                "scheduler config: use_karras_sigmas and use_exponential_sigmas both set".into(),
            ));
        }
        let continuous = match cfg.timestep_type.as_str() {
            "discrete" => false,
            "continuous" => true,
            other => return Err(unsupported("timestep_type", other)),
        };
        let final_sigma = match cfg.final_sigmas_type.as_str() {
            "zero" => 0.0,
            "sigma_min" => train[0] as f64,
            other => return Err(unsupported("final_sigmas_type", other)),
        };
        let mut sigmas = match cfg.interpolation_type.as_str() {
            "linear" => interpolated,
            "log_linear" => {
                let (lo, hi) = (train[train.len() - 1].ln(), train[0].ln());
                linspace_f32(lo, hi, steps + 1)
                    .into_iter()
                    .map(|l| l.exp() as f64)
                    .collect()
            }
            other => return Err(unsupported("interpolation_type", other)),
        };
        let mut timesteps: Vec<f64> = spaced.iter().map(|&t| t as f64).collect();
        if cfg.use_karras_sigmas || cfg.use_exponential_sigmas {
            let lo = cfg.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = cfg.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if cfg.use_karras_sigmas {
                karras(lo, hi, steps)
            } else {
                exponential(lo, hi, steps)
            };
            let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64)
                .collect();
        }
        sigmas.push(final_sigma);
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        if continuous && prediction == Prediction::V {
            timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| (0.25 * (s as f32).ln()) as f64)
                .collect();
        }
        Ok((timesteps, sigmas))
    }

    fn index(&self, step: usize) -> Result<usize> {
        check_step(step, self.timesteps.len() - self.begin)?;
        Ok(self.begin + step)
    }

    /// The predicted clean sample. The scalar coefficients are computed in f32 from the
    /// f32 sigmas, as diffusers computes them.
    fn denoised(
        prediction: Prediction,
        out: &Tensor,
        x: &Tensor,
        sigma: f32,
    ) -> candle_core::Result<Tensor> {
        match prediction {
            Prediction::Epsilon => x - (out * sigma as f64)?,
            Prediction::V => {
                let var = sigma * sigma + 1.0;
                let c_out = -sigma / var.sqrt();
                (out * c_out as f64)? + (x / var as f64)?
            }
            Prediction::Sample => Ok(out.clone()),
        }
    }
}

impl Scheduler for Euler {
    fn kind(&self) -> SchedulerKind {
        if self.ancestral {
            SchedulerKind::EulerAncestral
        } else {
            SchedulerKind::Euler
        }
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps[self.begin..]
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        let sigma = self.sigmas[self.index(step)?] as f32;
        let scale = (sigma * sigma + 1.0).sqrt() as f64;
        in_f32(sample, &[sample], |xs| &xs[0] / scale)
    }

    fn needs_noise(&self) -> bool {
        self.ancestral
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let i = self.index(step)?;
        let (sigma, sigma_next) = (self.sigmas[i] as f32, self.sigmas[i + 1] as f32);
        let prediction = self.prediction;
        if !self.ancestral {
            let dt = (sigma_next - sigma) as f64;
            return in_f32(model_output, &[model_output, sample], |xs| {
                let (out, x) = (&xs[0], &xs[1]);
                let x0 = Self::denoised(prediction, out, x, sigma)?;
                let derivative = ((x - x0)? / sigma as f64)?;
                x + (derivative * dt)?
            });
        }
        let noise = noise.ok_or_else(|| {
            Error::Unsupported("the ancestral Euler step needs a noise tensor".into())
        })?;
        let (from2, to2) = (sigma * sigma, sigma_next * sigma_next);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).max(0.0).sqrt();
        let dt = (sigma_down - sigma) as f64;
        in_f32(model_output, &[model_output, sample, noise], |xs| {
            let (out, x, z) = (&xs[0], &xs[1], &xs[2]);
            let x0 = Self::denoised(prediction, out, x, sigma)?;
            let derivative = ((x - x0)? / sigma as f64)?;
            let prev = (x + (derivative * dt)?)?;
            prev + (z * sigma_up as f64)?
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let sigma = self.sigmas[self.index(step)?];
        in_f32(original, &[original, noise], |xs| {
            &xs[0] + (&xs[1] * sigma)?
        })
    }
}
