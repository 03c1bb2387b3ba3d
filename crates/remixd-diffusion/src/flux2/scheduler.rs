//! diffusers' `FlowMatchEulerDiscreteScheduler` as the FLUX.2 [klein] pipelines drive it.
//!
//! The pipeline gives the scheduler its own sigmas, `linspace(1, 1/n, n)`, and the
//! resolution-dependent shift `mu` from [`empirical_mu`]; the scheduler shifts them
//! (`e^mu / (e^mu + (1/σ - 1))` for the exponential kind), appends a final 0 and steps
//! with Euler: `x + (σ_next - σ) · v`. img2img starts part way down ([`Schedule::cut`])
//! from `σ · noise + (1 - σ) · latents`.
//!
//! The arithmetic is f32 in the reference's order (numpy float32 arrays, torch float32
//! tensors), so that sigmas match it to the last bit or so.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::read_json;
use crate::{Error, Result};

/// `scheduler/scheduler_config.json`. Absent keys take diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FlowMatchConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub num_train_timesteps: usize,
    /// The static shift, used when `use_dynamic_shifting` is off.
    pub shift: f64,
    /// Shift by the pipeline's `mu` (FLUX.2 does).
    pub use_dynamic_shifting: bool,
    /// `exponential` or `linear`.
    pub time_shift_type: String,
    pub shift_terminal: Option<f64>,
    pub invert_sigmas: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        Self {
            class_name: "FlowMatchEulerDiscreteScheduler".into(),
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
            shift_terminal: None,
            invert_sigmas: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchConfig {
    /// Reads and checks the config file.
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.check()
            .map_err(|reason| Error::Unsupported(format!("{}: {reason}", path.display())))?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.class_name != "FlowMatchEulerDiscreteScheduler" {
            return Err(format!(
                "scheduler {:?}; FLUX.2 runs with FlowMatchEulerDiscreteScheduler",
                self.class_name
            ));
        }
        for (key, on) in [
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("invert_sigmas", self.invert_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
        ] {
            if on {
                return Err(format!("`{key}: true` is not implemented"));
            }
        }
        if self.shift_terminal.is_some() {
            return Err("`shift_terminal` is not implemented".into());
        }
        if !matches!(self.time_shift_type.as_str(), "exponential" | "linear") {
            return Err(format!(
                "`time_shift_type` {:?}; expected exponential or linear",
                self.time_shift_type
            ));
        }
        if self.num_train_timesteps == 0 {
            return Err("`num_train_timesteps` is 0".into());
        }
        Ok(())
    }
}

/// The FLUX.2 pipelines' resolution- and step-dependent shift: a line in the image's
/// token count fitted at 10 and 200 steps, interpolated in the step count; above 4300
/// tokens the 200-step line alone.
pub fn empirical_mu(image_seq_len: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let n = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * n + b2;
    }
    let m200 = a2 * n + b2;
    let m10 = a1 * n + b1;
    let a = (m200 - m10) / 190.0;
    let b = m200 - 200.0 * a;
    a * steps as f64 + b
}

/// A set schedule: `sigmas` has one more entry than `timesteps` (the final 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
}

impl Schedule {
    /// The schedule for `steps` steps and the pipeline's `mu`, as
    /// `set_timesteps(steps, sigmas=linspace(1, 1/steps, steps), mu=mu)` sets it.
    pub fn new(cfg: &FlowMatchConfig, steps: usize, mu: f64) -> Result<Self> {
        if steps == 0 {
            return Err(Error::Unsupported("a schedule of 0 steps".into()));
        }
        // numpy's linspace in f64 (the last value exactly `stop`), then float32.
        let stop = 1.0 / steps as f64;
        let delta = if steps > 1 {
            (stop - 1.0) / (steps - 1) as f64
        } else {
            0.0
        };
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                if i + 1 == steps && steps > 1 {
                    stop as f32
                } else {
                    (1.0 + i as f64 * delta) as f32
                }
            })
            .collect();
        for s in &mut sigmas {
            *s = shift(cfg, mu, *s);
        }
        let n = cfg.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|s| s * n).collect();
        sigmas.push(0.0);
        Ok(Self { sigmas, timesteps })
    }

    /// The steps img2img runs for diffusers' `strength` (the fraction of the schedule
    /// run): the index of the first, as the pipeline's `get_timesteps` picks it.
    pub fn start_for_strength(&self, strength: f64) -> usize {
        let n = self.timesteps.len() as f64;
        let init = (n * strength).min(n);
        (n - init).max(0.0) as usize
    }

    /// `σ · noise + (1 - σ) · sample`, the scheduler's `scale_noise` at sigma `index`.
    pub fn scale_noise(&self, sample: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        Ok(((noise * sigma as f64)? + (sample * (1.0 - sigma) as f64)?)?)
    }

    /// One Euler step from sigma `index` to `index + 1`: `x + (σ_next - σ) · v`.
    pub fn step(&self, velocity: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        let dt = self.sigmas[index + 1] - self.sigmas[index];
        Ok((sample + (velocity * dt as f64)?)?)
    }
}

/// The shifted sigma, in f32 as numpy computes it on a float32 array.
fn shift(cfg: &FlowMatchConfig, mu: f64, t: f32) -> f32 {
    if cfg.use_dynamic_shifting {
        let r = 1.0 / t - 1.0;
        match cfg.time_shift_type.as_str() {
            "linear" => {
                let m = mu as f32;
                m / (m + r)
            }
            _ => {
                let e = mu.exp() as f32;
                e / (e + r)
            }
        }
    } else {
        let s = cfg.shift as f32;
        s * t / (1.0 + (s - 1.0) * t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn klein() -> FlowMatchConfig {
        serde_json::from_str(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                "use_dynamic_shifting": true, "time_shift_type": "exponential"}"#,
        )
        .unwrap()
    }

    #[test]
    fn mu_follows_both_branches() {
        // Above 4300 tokens: the 200-step line whatever the steps.
        assert_eq!(empirical_mu(8192, 4), empirical_mu(8192, 50));
        assert!((empirical_mu(8192, 4) - (0.00016927 * 8192.0 + 0.45666666)).abs() < 1e-12);
        // Below: at 10 and 200 steps the fitted lines.
        let n = 1024.0;
        assert!((empirical_mu(1024, 10) - (8.73809524e-05 * n + 1.89833333)).abs() < 1e-9);
        assert!((empirical_mu(1024, 200) - (0.00016927 * n + 0.45666666)).abs() < 1e-9);
    }

    #[test]
    fn schedule_starts_at_one_ends_at_zero_and_falls() {
        let s = Schedule::new(&klein(), 4, empirical_mu(1024, 4)).unwrap();
        assert_eq!(s.sigmas.len(), 5);
        assert_eq!(s.sigmas[0], 1.0);
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(s.timesteps[0], 1000.0);
        let one = Schedule::new(&klein(), 1, 2.0).unwrap();
        assert_eq!(one.sigmas, vec![1.0, 0.0]);
    }

    #[test]
    fn strength_picks_the_first_step_as_diffusers_does() {
        let s = Schedule::new(&klein(), 5, 1.0).unwrap();
        assert_eq!(s.start_for_strength(1.0), 0);
        assert_eq!(s.start_for_strength(0.7), 1); // int(5 - 3.5)
        assert_eq!(s.start_for_strength(0.2), 4);
        assert_eq!(s.start_for_strength(0.0), 5); // nothing left to run
    }

    #[test]
    fn unsupported_options_are_named() {
        let mut c = klein();
        c.use_karras_sigmas = true;
        assert!(c.check().unwrap_err().contains("use_karras_sigmas"));
        let mut c = klein();
        c.class_name = "EulerDiscreteScheduler".into();
        assert!(c.check().unwrap_err().contains("EulerDiscreteScheduler"));
    }
}
