//! DPM-Solver++ multistep (diffusers' `DPMSolverMultistepScheduler`, `dpmsolver++`).

use candle_core::Tensor;

use super::schedule::{
    alphas_cumprod, exponential, karras, np_arange, np_linspace, np_round, sigma_to_t, train_sigmas,
};
use super::{
    check_step, in_f32, unsupported, Prediction, Scheduler, SchedulerConfig, SchedulerKind, Spacing,
};
use crate::error::{Error, Result};

/// The multistep solver; it keeps the last `order` clean-sample predictions.
pub(crate) struct DpmSolver {
    /// All inference timesteps; the run uses those from `begin`.
    timesteps: Vec<f64>,
    /// One sigma per timestep, then the final sigma (f32 values).
    sigmas: Vec<f64>,
    begin: usize,
    prediction: Prediction,
    order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The latest predictions of the clean sample, oldest first.
    history: Vec<Tensor>,
    lower_order_nums: usize,
    next_step: usize,
}

/// `alpha_t` and `sigma_t` of the variance-preserving process for a sigma.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The log signal-to-noise half-ratio `ln(alpha_t) - ln(sigma_t)` for a sigma.
fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

impl DpmSolver {
    pub(crate) fn new(
        cfg: &SchedulerConfig,
        prediction: Prediction,
        spacing: Spacing,
        steps: usize,
        begin: usize,
    ) -> Result<Self> {
        match cfg.algorithm_type.as_str() {
            // diffusers reads `deis` as `dpmsolver++`.
            "dpmsolver++" | "deis" => {}
            other => return Err(unsupported("algorithm_type", other)),
        }
        let heun = match cfg.solver_type.as_str() {
            "heun" => true,
            // diffusers reads these UniPC / DEIS names as `midpoint`.
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            other => return Err(unsupported("solver_type", other)),
        };
        if !(1..=3).contains(&cfg.solver_order) {
            return Err(unsupported("solver_order", cfg.solver_order));
        }
        if let Some(v) = &cfg.variance_type {
            return Err(unsupported("variance_type", v));
        }
        if cfg.use_beta_sigmas {
            return Err(unsupported("use_beta_sigmas", true));
        }
        if cfg.use_flow_sigmas {
            return Err(unsupported("use_flow_sigmas", true));
        }
        let schedules = [
            cfg.use_karras_sigmas,
            cfg.use_exponential_sigmas,
            cfg.use_lu_lambdas,
        ];
        if schedules.iter().filter(|&&b| b).count() > 1 {
            return Err(Error::Unsupported(
                "scheduler config: more than one of use_karras_sigmas, \
                 use_exponential_sigmas, use_lu_lambdas set"
                    .into(),
            ));
        }
        let final_sigma_zero = match cfg.final_sigmas_type.as_str() {
            "zero" => true,
            "sigma_min" => false,
            other => return Err(unsupported("final_sigmas_type", other)),
        };

        let ac = alphas_cumprod(cfg, true)?;
        let n_train = cfg.num_train_timesteps;
        let train = train_sigmas(&ac);
        // Timesteps whose log-SNR falls below `lambda_min_clipped` are cut from the top.
        let clipped = match cfg.lambda_min_clipped {
            Some(min) => ac
                .iter()
                .filter(|&&a| {
                    let l = (a.sqrt().ln() - (1.0 - a).sqrt().ln()) as f64;
                    l < min
                })
                .count(),
            None => 0,
        };
        let last = n_train - clipped;
        let mut timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => {
                let mut t: Vec<f64> = np_linspace(0.0, last as f64 - 1.0, steps + 1)
                    .into_iter()
                    .rev()
                    .map(np_round)
                    .collect();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = (last / (steps + 1)) as f64;
                (1..=steps)
                    .rev()
                    .map(|i| np_round(i as f64 * ratio) + cfg.steps_offset as f64)
                    .collect()
            }
            Spacing::Trailing => np_arange(last as f64, 0.0, -(n_train as f64 / steps as f64))
                .into_iter()
                .map(|t| np_round(t) - 1.0)
                .collect(),
        };
        let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
        let cosine = cfg.beta_schedule == "squaredcos_cap_v2";
        // Not keys of this class, but diffusers keeps every key of the file it was
        // configured from and reads these two when they are there.
        let (lo, hi) = (
            cfg.sigma_min.unwrap_or(train[0] as f64),
            cfg.sigma_max.unwrap_or(train[n_train - 1] as f64),
        );
        let to_t = |sigmas: &[f64], round: bool| -> Vec<f64> {
            sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    if round {
                        np_round(t)
                    } else {
                        t
                    }
                })
                .collect()
        };
        let mut sigmas: Vec<f64> = if cfg.use_karras_sigmas {
            let s = karras(lo, hi, steps);
            timesteps = to_t(&s, !cosine);
            s
        } else if cfg.use_lu_lambdas {
            let (l_min, l_max) = (log_sigmas[0] as f64, log_sigmas[n_train - 1] as f64);
            let s: Vec<f64> = np_linspace(0.0, 1.0, steps)
                .into_iter()
                .map(|r| (l_max + r * (l_min - l_max)).exp())
                .collect();
            timesteps = to_t(&s, !cosine);
            s
        } else if cfg.use_exponential_sigmas {
            let s = exponential(lo, hi, steps);
            timesteps = to_t(&s, false);
            s
        } else {
            timesteps
                .iter()
                .map(|&t| train[t as usize] as f64)
                .collect()
        };
        sigmas.push(if final_sigma_zero {
            0.0
        } else {
            train[0] as f64
        });
        // diffusers stores the timesteps as int64 (truncating) and the sigmas as f32.
        let timesteps: Vec<f64> = timesteps.into_iter().map(|t| (t as i64) as f64).collect();
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0.0 || t >= n_train as f64) {
            return Err(unsupported(
                "steps_offset",
                format!(
                    "{} (timestep {t} falls outside the {n_train}-step schedule)",
                    cfg.steps_offset
                ),
            ));
        }
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Ok(Self {
            timesteps,
            sigmas,
            begin,
            prediction,
            order: cfg.solver_order,
            heun,
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_sigma_zero,
            history: Vec::new(),
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    fn index(&self, step: usize) -> Result<usize> {
        check_step(step, self.timesteps.len() - self.begin)?;
        Ok(self.begin + step)
    }
}

impl Scheduler for DpmSolver {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmPp2M
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps[self.begin..]
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        self.index(step)?;
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
        let i = self.index(step)?;
        if step != self.next_step {
            return Err(Error::Unsupported(format!(
                "the multistep solver must be stepped in order: got step {step}, expected {}",
                self.next_step
            )));
        }
        let n = self.timesteps.len();
        let short = self.lower_order_final && n < 15;
        let lower_final = i == n - 1 && (self.euler_at_final || short || self.final_sigma_zero);
        let lower_second = i + 2 == n && short;

        let sigma_s0 = self.sigmas[i];
        let (alpha_s0, sigma_s0_vp) = alpha_sigma(sigma_s0);
        let prediction = self.prediction;
        let x0 = in_f32(model_output, &[model_output, sample], |xs| {
            let (out, x) = (&xs[0], &xs[1]);
            match prediction {
                Prediction::Epsilon => (x - (out * sigma_s0_vp)?)? / alpha_s0,
                Prediction::Sample => Ok(out.clone()),
                Prediction::V => (x * alpha_s0)? - (out * sigma_s0_vp)?,
            }
        })?
        .to_dtype(candle_core::DType::F32)?;
        self.history.push(x0);
        if self.history.len() > self.order {
            self.history.remove(0);
        }

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda_t = alpha_t.ln() - sigma_t.ln();
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda_t - lambda_s0;
        let ratio = sigma_t / sigma_s0_vp;
        let em1 = (-h).exp() - 1.0;
        let m = &self.history;
        let k = m.len();

        let order = if self.order == 1 || self.lower_order_nums < 1 || lower_final {
            1
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_second {
            2
        } else {
            3
        };
        let heun = self.heun;
        let prev = match order {
            1 => {
                let m0 = &m[k - 1];
                in_f32(model_output, &[sample, m0], |xs| {
                    (&xs[0] * ratio)? - (&xs[1] * (alpha_t * em1))?
                })?
            }
            2 => {
                let h0 = lambda_s0 - lambda(self.sigmas[i - 1]);
                let r0 = h0 / h;
                in_f32(model_output, &[sample, &m[k - 1], &m[k - 2]], |xs| {
                    let (x, m0, m1) = (&xs[0], &xs[1], &xs[2]);
                    let d1 = ((m0 - m1)? * (1.0 / r0))?;
                    let c1 = if heun {
                        alpha_t * (em1 / h + 1.0)
                    } else {
                        -0.5 * alpha_t * em1
                    };
                    ((x * ratio)? - (m0 * (alpha_t * em1))?)? + (d1 * c1)?
                })?
            }
            _ => {
                let lambda_s1 = lambda(self.sigmas[i - 1]);
                let lambda_s2 = lambda(self.sigmas[i - 2]);
                let (h0, h1) = (lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
                let (r0, r1) = (h0 / h, h1 / h);
                in_f32(
                    model_output,
                    &[sample, &m[k - 1], &m[k - 2], &m[k - 3]],
                    |xs| {
                        let (x, m0, m1, m2) = (&xs[0], &xs[1], &xs[2], &xs[3]);
                        let d1_0 = ((m0 - m1)? * (1.0 / r0))?;
                        let d1_1 = ((m1 - m2)? * (1.0 / r1))?;
                        let diff = (&d1_0 - &d1_1)?;
                        let d1 = (&d1_0 + (&diff * (r0 / (r0 + r1)))?)?;
                        let d2 = (&diff * (1.0 / (r0 + r1)))?;
                        let c1 = alpha_t * (em1 / h + 1.0);
                        let c2 = -alpha_t * ((em1 + h) / (h * h) - 0.5);
                        (((x * ratio)? - (m0 * (alpha_t * em1))?)? + (d1 * c1)?)? + (d2 * c2)?
                    },
                )?
            }
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        self.next_step += 1;
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[self.index(step)?]);
        in_f32(original, &[original, noise], |xs| {
            (&xs[0] * alpha)? + (&xs[1] * sigma)?
        })
    }
}
