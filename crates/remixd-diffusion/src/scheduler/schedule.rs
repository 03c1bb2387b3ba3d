//! The training noise schedule and the numeric helpers the schedulers share.
//!
//! diffusers keeps betas and cumulative alpha products as f32 tensors and does its
//! spacing arithmetic in numpy; these helpers reproduce both, including numpy's
//! round-half-to-even and its `linspace` / `arange` element formulas.

use super::{unsupported, SchedulerConfig};
use crate::error::Result;

/// `alphas_cumprod` of the training schedule, as the f32 values diffusers holds.
///
/// `pin_terminal` sets the last value to 2^-24 when the betas are rescaled to zero
/// terminal SNR (the Euler and DPM schedulers do this so that the last sigma is finite).
pub(crate) fn alphas_cumprod(cfg: &SchedulerConfig, pin_terminal: bool) -> Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    let mut betas: Vec<f32> = match &cfg.trained_betas {
        Some(b) => b.iter().map(|&v| v as f32).collect(),
        None => match cfg.beta_schedule.as_str() {
            "linear" => linspace_f32(cfg.beta_start as f32, cfg.beta_end as f32, n),
            "scaled_linear" => {
                linspace_f32(cfg.beta_start.sqrt() as f32, cfg.beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            "squaredcos_cap_v2" => cosine_betas(n),
            other => return Err(unsupported("beta_schedule", other)),
        },
    };
    if betas.is_empty() {
        return Err(unsupported("num_train_timesteps", 0));
    }
    if cfg.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let mut acc = 1f64;
    let mut out: Vec<f32> = betas
        .iter()
        .map(|&b| {
            // torch accumulates a float cumprod in double on the CPU.
            acc *= (1f32 - b) as f64;
            acc as f32
        })
        .collect();
    if cfg.rescale_betas_zero_snr && pin_terminal {
        *out.last_mut().expect("non-empty") = 2f32.powi(-24);
    }
    Ok(out)
}

/// torch's f32 `linspace` (each element from the nearer end).
pub(crate) fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// The `squaredcos_cap_v2` (cosine) schedule with betas capped at 0.999.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas so that the final cumulative alpha is zero (Lin et al. 2023, alg. 1).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    let sqrt_bar: Vec<f64> = betas
        .iter()
        .map(|&b| {
            acc *= (1f32 - b) as f64;
            (acc as f32 as f64).sqrt()
        })
        .collect();
    let first = sqrt_bar[0];
    let last = *sqrt_bar.last().expect("non-empty");
    let bar: Vec<f64> = sqrt_bar
        .iter()
        .map(|&s| ((s - last) * (first / (first - last))).powi(2))
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push((1.0 - bar[0]) as f32);
    for w in bar.windows(2) {
        out.push((1.0 - w[1] / w[0]) as f32);
    }
    out
}

/// `sqrt((1 - ac) / ac)` for each cumulative alpha, as f32 values.
pub(crate) fn train_sigmas(ac: &[f32]) -> Vec<f32> {
    ac.iter()
        .map(|&a| ((1.0 - a as f64) / a as f64).sqrt() as f32)
        .collect()
}

/// numpy's `linspace(start, stop, n)` (endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// numpy's `arange(start, stop, step)` for floats.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let delta = (start + step) - start;
    (0..len as usize)
        .map(|i| start + i as f64 * delta)
        .collect()
}

/// numpy's `round` (half to even).
pub(crate) fn np_round(v: f64) -> f64 {
    v.round_ties_even()
}

/// numpy's `interp(x, arange(len(ys)), ys)`.
pub(crate) fn interp_index(x: f64, ys: &[f32]) -> f64 {
    let last = ys.len() - 1;
    if x <= 0.0 {
        return ys[0] as f64;
    }
    if x >= last as f64 {
        return ys[last] as f64;
    }
    let i = x.floor() as usize;
    let frac = x - i as f64;
    let (a, b) = (ys[i] as f64, ys[i + 1] as f64);
    if frac == 0.0 {
        a
    } else {
        a + (b - a) * frac
    }
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose sigma is `sigma`,
/// interpolating linearly in log-sigma. `log_sigmas` ascends.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // numpy: argmax of the running count of entries at or below `log_sigma`, that is
    // the first index where the count reaches its total (0 when nothing is below).
    let mut count = 0usize;
    let mut first_max = 0usize;
    let mut best = 0usize;
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            count += 1;
            if count > best {
                best = count;
                first_max = i;
            }
        }
    }
    let low_idx = first_max.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx] as f64, log_sigmas[high_idx] as f64);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al.'s sigmas (rho 7) from `max` down to `min`.
pub(crate) fn karras(min: f64, max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Sigmas spaced evenly in log from `max` down to `min`.
pub(crate) fn exponential(min: f64, max: f64, n: usize) -> Vec<f64> {
    np_linspace(max.ln(), min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(3.5), 4.0);
        assert_eq!(interp_index(1.5, &[0.0, 2.0, 4.0]), 3.0);
        assert_eq!(interp_index(5.0, &[0.0, 2.0, 4.0]), 4.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_schedule() {
        let cfg = SchedulerConfig::default();
        let ac = alphas_cumprod(&cfg, true).unwrap();
        let sigmas = train_sigmas(&ac);
        let logs: Vec<f32> = sigmas.iter().map(|s| s.ln()).collect();
        for t in [0usize, 1, 10, 500, 998, 999] {
            let got = sigma_to_t(sigmas[t] as f64, &logs);
            assert!((got - t as f64).abs() < 1e-3, "{t}: {got}");
        }
        // Between two entries: linear in log sigma.
        let mid = ((logs[10] as f64 + logs[11] as f64) / 2.0).exp();
        assert!((sigma_to_t(mid, &logs) - 10.5).abs() < 1e-3);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let cfg = SchedulerConfig {
            rescale_betas_zero_snr: true,
            ..SchedulerConfig::default()
        };
        let ac = alphas_cumprod(&cfg, false).unwrap();
        assert!(ac[999].abs() < 1e-6, "{}", ac[999]);
        let ac = alphas_cumprod(&cfg, true).unwrap();
        assert_eq!(ac[999], 2f32.powi(-24));
    }
}
