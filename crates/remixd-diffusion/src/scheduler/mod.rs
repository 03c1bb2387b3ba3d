//! Noise schedulers for img2img: DDIM, Euler, Euler ancestral and DPM++ 2M, read from a
//! diffusers `scheduler_config.json` and matching diffusers' arithmetic.
//!
//! [`build`] sets the timesteps for a step count and keeps the tail that an img2img
//! `strength` selects, as diffusers' img2img pipeline does. Steps are addressed by their
//! index into [`Scheduler::timesteps`]. Random draws are the caller's: the ancestral
//! scheduler takes its noise as an argument.

mod ddim;
mod dpm;
mod euler;
mod schedule;

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The scheduler algorithms remixd implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDIMScheduler` with eta 0 (deterministic).
    Ddim,
    /// `EulerDiscreteScheduler` without churn (deterministic).
    Euler,
    /// `EulerAncestralDiscreteScheduler` (draws noise every step).
    EulerAncestral,
    /// `DPMSolverMultistepScheduler` (DPM-Solver++, second order by default).
    DpmPp2M,
}

impl SchedulerKind {
    /// All kinds, in a fixed order.
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2M,
    ];

    /// The kind for a diffusers class name (`_class_name`); other classes are
    /// [`Error::Unsupported`].
    pub fn from_class_name(name: &str) -> Result<Self> {
        match name {
            "DDIMScheduler" => Ok(Self::Ddim),
            "EulerDiscreteScheduler" => Ok(Self::Euler),
            "EulerAncestralDiscreteScheduler" => Ok(Self::EulerAncestral),
            "DPMSolverMultistepScheduler" => Ok(Self::DpmPp2M),
            other => Err(Error::Unsupported(format!(
                "scheduler _class_name {other:?} (supported: DDIMScheduler, \
                 EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, \
                 DPMSolverMultistepScheduler)"
            ))),
        }
    }

    /// The kind a model's own config asks for, running `PNDMScheduler` configs (SD 1.x)
    /// through DDIM, which reads the same keys; a config without `_class_name` means DDIM.
    pub fn for_config(cfg: &SchedulerConfig) -> Result<Self> {
        match cfg.class_name.as_deref() {
            None | Some("PNDMScheduler") => Ok(Self::Ddim),
            Some(name) => Self::from_class_name(name),
        }
    }

    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmPp2M => "DPMSolverMultistepScheduler",
        }
    }

    /// A short name for settings files: `ddim`, `euler`, `euler_a`, `dpmpp_2m`.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::DpmPp2M => "dpmpp_2m",
        }
    }

    /// Parses a [`Self::short_name`].
    pub fn from_short_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.short_name() == name)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "scheduler {name:?} (supported: ddim, euler, euler_a, dpmpp_2m)"
                ))
            })
    }
}

/// `scheduler/scheduler_config.json`: every key the four schedulers (and PNDM's config
/// files) carry. Absent keys take diffusers' defaults; keys whose default depends on the
/// scheduler class are `None` until [`build`] resolves them.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// The diffusers class the file was written for.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Length of the training noise schedule.
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: usize,
    /// First beta of the schedule.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// Last beta of the schedule.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    /// Explicit betas, overriding the schedule.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace`; default `leading` for DDIM, `linspace` for
    /// the others.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// Added to `leading` timesteps.
    #[serde(default)]
    pub steps_offset: i64,
    /// DDIM: the last step's previous alpha product is 1 (else `alphas_cumprod[0]`).
    /// Default true.
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clamp the predicted clean sample. Default true.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// DDIM: the clamp's bound.
    #[serde(default = "default_one")]
    pub clip_sample_range: f64,
    /// Dynamic thresholding (not supported; meant for pixel-space models).
    #[serde(default)]
    pub thresholding: bool,
    /// Rescale the betas to zero terminal SNR.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Euler, DPM: Karras sigmas.
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_karras_sigmas: bool,
    /// Euler, DPM: exponentially spaced sigmas.
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_exponential_sigmas: bool,
    /// Euler, DPM: beta-distributed sigmas (not supported).
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_beta_sigmas: bool,
    /// DPM: uniform steps in log-SNR.
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_lu_lambdas: bool,
    /// DPM: flow-matching sigmas (not supported).
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_flow_sigmas: bool,
    /// Euler, DPM: lowest sigma of Karras / exponential schedules.
    #[serde(default)]
    pub sigma_min: Option<f64>,
    /// Euler, DPM: highest sigma of Karras / exponential schedules.
    #[serde(default)]
    pub sigma_max: Option<f64>,
    /// Euler: `linear` or `log_linear` sigma interpolation.
    #[serde(default = "default_interpolation_type")]
    pub interpolation_type: String,
    /// Euler: `discrete` or `continuous` timesteps.
    #[serde(default = "default_timestep_type")]
    pub timestep_type: String,
    /// Euler, DPM: `zero` or `sigma_min` as the sigma after the last step.
    #[serde(default = "default_final_sigmas_type")]
    pub final_sigmas_type: String,
    /// DPM: solver order, 1 to 3.
    #[serde(default = "default_solver_order")]
    pub solver_order: usize,
    /// DPM: `dpmsolver++` (`deis` is read as `dpmsolver++`, as diffusers does).
    #[serde(default = "default_algorithm_type")]
    pub algorithm_type: String,
    /// DPM: `midpoint` or `heun` second-order update.
    #[serde(default = "default_solver_type")]
    pub solver_type: String,
    /// DPM: lower the order on the final steps of short schedules.
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    /// DPM: a first-order final step.
    #[serde(default)]
    pub euler_at_final: bool,
    /// DPM: log-SNR below which timesteps are cut (`None`: no cut).
    #[serde(default)]
    pub lambda_min_clipped: Option<f64>,
    /// DPM: learned variance outputs (not supported).
    #[serde(default)]
    pub variance_type: Option<String>,
    /// PNDM only; parsed and ignored.
    #[serde(default)]
    pub skip_prk_steps: Option<bool>,
}

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".to_owned()
}
fn default_prediction_type() -> String {
    "epsilon".to_owned()
}
fn default_one() -> f64 {
    1.0
}
fn default_interpolation_type() -> String {
    "linear".to_owned()
}
fn default_timestep_type() -> String {
    "discrete".to_owned()
}
fn default_final_sigmas_type() -> String {
    "zero".to_owned()
}
fn default_solver_order() -> usize {
    2
}
fn default_algorithm_type() -> String {
    "dpmsolver++".to_owned()
}
fn default_solver_type() -> String {
    "midpoint".to_owned()
}
fn default_true() -> bool {
    true
}

fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every key has a default")
    }
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`. Python's `Infinity` / `NaN` literals, which
    /// diffusers writes for some float keys, are read as absent values.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile(path.to_owned()),
            _ => Error::Io(e),
        })?;
        Self::from_json(&text).map_err(|e| match e {
            Error::BadConfig { reason, .. } => Error::BadConfig {
                path: path.to_owned(),
                reason,
            },
            e => e,
        })
    }

    /// Parses the JSON text of a `scheduler_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(&nonfinite_as_null(text)).map_err(|e| Error::BadConfig {
            path: PathBuf::from("scheduler_config.json"),
            reason: e.to_string(),
        })
    }
}

/// Replaces the bare tokens `NaN`, `Infinity` and `-Infinity` outside strings by `null`.
fn nonfinite_as_null(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    /// The added noise (`epsilon`).
    Epsilon,
    /// The velocity `alpha_t * noise - sigma_t * x0` (`v_prediction`).
    V,
    /// The clean sample itself (`sample`).
    Sample,
}

impl Prediction {
    fn parse(value: &str) -> Result<Self> {
        match value {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::V),
            "sample" | "original_sample" => Ok(Self::Sample),
            other => Err(unsupported("prediction_type", other)),
        }
    }
}

/// How the inference timesteps are spread over the training schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Spacing {
    fn resolve(cfg: &SchedulerConfig, kind: SchedulerKind) -> Result<Self> {
        let default = match kind {
            SchedulerKind::Ddim => "leading",
            _ => "linspace",
        };
        match cfg.timestep_spacing.as_deref().unwrap_or(default) {
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            "linspace" => Ok(Self::Linspace),
            other => Err(unsupported("timestep_spacing", other)),
        }
    }
}

pub(crate) fn unsupported(key: &str, value: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!("scheduler config {key} = {value}"))
}

/// One scheduler, set up for a run: the remaining timesteps and the update rule.
pub trait Scheduler: Send {
    /// Which algorithm this is.
    fn kind(&self) -> SchedulerKind;

    /// The timesteps still to run, in order; `step` arguments index this slice. Values
    /// are what the UNet receives (integers except for some Euler schedules).
    fn timesteps(&self) -> &[f64];

    /// The whole sigma schedule after `set_timesteps` (one more than the step count,
    /// ending with the final sigma), for the sigma-based schedulers; `None` for DDIM.
    fn sigmas(&self) -> Option<&[f64]>;

    /// diffusers' `init_noise_sigma` (the scale of pure-noise latents).
    fn init_noise_sigma(&self) -> f64;

    /// The UNet input for step `step` (Euler family: `sample / sqrt(sigma² + 1)`).
    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor>;

    /// Whether [`Scheduler::step`] needs a noise tensor (ancestral sampling).
    fn needs_noise(&self) -> bool;

    /// One denoising step from timestep `step` to the next; `noise` (standard normal,
    /// the shape of `sample`) is required when [`Scheduler::needs_noise`] and ignored
    /// otherwise. Multistep schedulers keep state and must be stepped in order.
    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;

    /// Noises clean latents to the level of timestep `step` (img2img's start uses 0).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor>;
}

/// Sets a scheduler up for `num_inference_steps` steps and keeps the last
/// `min(floor(steps * strength), steps)` of them, as diffusers' img2img pipeline does
/// (the scheduler's begin index is the first kept step).
pub fn build(
    cfg: &SchedulerConfig,
    kind: SchedulerKind,
    num_inference_steps: usize,
    strength: f64,
) -> Result<Box<dyn Scheduler>> {
    if num_inference_steps == 0 || num_inference_steps > cfg.num_train_timesteps {
        return Err(Error::Unsupported(format!(
            "{num_inference_steps} inference steps (must be 1 to num_train_timesteps = {})",
            cfg.num_train_timesteps
        )));
    }
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::Unsupported(format!(
            "img2img strength {strength} (must be in [0, 1])"
        )));
    }
    // Python's int() of a non-negative float truncates, as `as` does.
    let init = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    if init == 0 {
        return Err(Error::Unsupported(format!(
            "img2img strength {strength} with {num_inference_steps} steps leaves no step to run"
        )));
    }
    let begin = num_inference_steps - init;
    let prediction = Prediction::parse(&cfg.prediction_type)?;
    let spacing = Spacing::resolve(cfg, kind)?;
    if cfg.thresholding {
        return Err(unsupported("thresholding", true));
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(
            cfg,
            prediction,
            spacing,
            num_inference_steps,
            begin,
        )?),
        SchedulerKind::Euler | SchedulerKind::EulerAncestral => Box::new(euler::Euler::new(
            cfg,
            kind == SchedulerKind::EulerAncestral,
            prediction,
            spacing,
            num_inference_steps,
            begin,
        )?),
        SchedulerKind::DpmPp2M => Box::new(dpm::DpmSolver::new(
            cfg,
            prediction,
            spacing,
            num_inference_steps,
            begin,
        )?),
    })
}

/// Checks a step index against the remaining timesteps.
pub(crate) fn check_step(step: usize, remaining: usize) -> Result<()> {
    if step >= remaining {
        return Err(Error::Unsupported(format!(
            "scheduler step {step} out of range ({remaining} steps)"
        )));
    }
    Ok(())
}

/// Runs `f` on f32 copies of the inputs and returns the result in `like`'s dtype
/// (diffusers computes these updates in f32).
pub(crate) fn in_f32(
    like: &Tensor,
    inputs: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let xs = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(f(&xs)?.to_dtype(like.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_takes_diffusers_defaults() {
        let cfg = SchedulerConfig::from_json("{}").unwrap();
        assert_eq!(cfg.num_train_timesteps, 1000);
        assert_eq!(cfg.beta_start, 0.0001);
        assert_eq!(cfg.beta_end, 0.02);
        assert_eq!(cfg.beta_schedule, "linear");
        assert_eq!(cfg.prediction_type, "epsilon");
        assert_eq!(cfg.steps_offset, 0);
        assert_eq!(cfg.solver_order, 2);
        assert_eq!(cfg.algorithm_type, "dpmsolver++");
        assert!(cfg.lower_order_final && !cfg.use_karras_sigmas);
        assert_eq!(
            Spacing::resolve(&cfg, SchedulerKind::Ddim).unwrap(),
            Spacing::Leading
        );
        assert_eq!(
            Spacing::resolve(&cfg, SchedulerKind::Euler).unwrap(),
            Spacing::Linspace
        );
        // DDIM's defaults: leading spacing, clip_sample and set_alpha_to_one on.
        let s = build(&cfg, SchedulerKind::Ddim, 10, 1.0).unwrap();
        assert_eq!(
            s.timesteps(),
            &[900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0, 100.0, 0.0]
        );
        assert_eq!(s.init_noise_sigma(), 1.0);
        // Euler's default: linspace over [0, 999].
        let s = build(&cfg, SchedulerKind::Euler, 4, 1.0).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    }

    #[test]
    fn pndm_config_parses_and_runs_as_ddim() {
        let text = r#"{
            "_class_name": "PNDMScheduler",
            "_diffusers_version": "0.6.0",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "trained_betas": null,
            "clip_sample": false
        }"#;
        let cfg = SchedulerConfig::from_json(text).unwrap();
        assert_eq!(cfg.skip_prk_steps, Some(true));
        assert_eq!(cfg.set_alpha_to_one, Some(false));
        assert!(matches!(
            SchedulerKind::from_class_name("PNDMScheduler"),
            Err(Error::Unsupported(m)) if m.contains("PNDMScheduler")
        ));
        let kind = SchedulerKind::for_config(&cfg).unwrap();
        assert_eq!(kind, SchedulerKind::Ddim);
        let s = build(&cfg, kind, 10, 0.5).unwrap();
        assert_eq!(s.timesteps(), &[401.0, 301.0, 201.0, 101.0, 1.0]);
    }

    #[test]
    fn unknown_class_and_values_are_unsupported() {
        match SchedulerKind::from_class_name("LMSDiscreteScheduler") {
            Err(Error::Unsupported(m)) => assert!(m.contains("LMSDiscreteScheduler"), "{m}"),
            other => panic!("{other:?}"),
        }
        let cases = [
            (
                r#"{"beta_schedule": "sigmoid"}"#,
                "beta_schedule",
                "sigmoid",
            ),
            (r#"{"prediction_type": "flow"}"#, "prediction_type", "flow"),
            (
                r#"{"timestep_spacing": "karras"}"#,
                "timestep_spacing",
                "karras",
            ),
            (r#"{"thresholding": true}"#, "thresholding", "true"),
        ];
        for (json, key, value) in cases {
            let cfg = SchedulerConfig::from_json(json).unwrap();
            for kind in SchedulerKind::ALL {
                match build(&cfg, kind, 10, 1.0) {
                    Err(Error::Unsupported(m)) => {
                        assert!(m.contains(key) && m.contains(value), "{m}")
                    }
                    Err(e) => panic!("{json} {kind:?}: {e}"),
                    Ok(_) => panic!("{json} {kind:?}: accepted"),
                }
            }
        }
        let kind_specific = [
            (
                r#"{"algorithm_type": "sde-dpmsolver++"}"#,
                SchedulerKind::DpmPp2M,
                "algorithm_type",
            ),
            (
                r#"{"solver_order": 4}"#,
                SchedulerKind::DpmPp2M,
                "solver_order",
            ),
            (
                r#"{"solver_type": "bogus"}"#,
                SchedulerKind::DpmPp2M,
                "solver_type",
            ),
            (
                r#"{"final_sigmas_type": "one"}"#,
                SchedulerKind::Euler,
                "final_sigmas_type",
            ),
            (
                r#"{"interpolation_type": "cubic"}"#,
                SchedulerKind::Euler,
                "interpolation_type",
            ),
            (
                r#"{"use_beta_sigmas": true}"#,
                SchedulerKind::Euler,
                "use_beta_sigmas",
            ),
            (
                r#"{"prediction_type": "sample"}"#,
                SchedulerKind::EulerAncestral,
                "prediction_type",
            ),
        ];
        for (json, kind, key) in kind_specific {
            let cfg = SchedulerConfig::from_json(json).unwrap();
            match build(&cfg, kind, 10, 1.0) {
                Err(Error::Unsupported(m)) => assert!(m.contains(key), "{m}"),
                Err(e) => panic!("{json}: {e}"),
                Ok(_) => panic!("{json}: accepted"),
            }
        }
        match SchedulerKind::from_short_name("lms") {
            Err(Error::Unsupported(m)) => assert!(m.contains("lms")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn python_nonfinite_literals_read_as_absent() {
        let text =
            r#"{"lambda_min_clipped": -Infinity, "note": "-Infinity \"NaN\"", "sigma_max": NaN}"#;
        let cfg = SchedulerConfig::from_json(text).unwrap();
        assert_eq!(cfg.lambda_min_clipped, None);
        assert_eq!(cfg.sigma_max, None);
        assert_eq!(
            nonfinite_as_null(r#"{"a": "x -Infinity", "b": Infinity}"#),
            r#"{"a": "x -Infinity", "b": null}"#
        );
    }

    #[test]
    fn strength_selects_the_tail() {
        let cfg = SchedulerConfig::default();
        for kind in SchedulerKind::ALL {
            let full = build(&cfg, kind, 10, 1.0).unwrap();
            for (strength, kept) in [(0.6, 6), (0.75, 7), (0.3, 3), (1.0, 10)] {
                let s = build(&cfg, kind, 10, strength).unwrap();
                assert_eq!(s.timesteps(), &full.timesteps()[10 - kept..], "{kind:?}");
            }
            assert!(build(&cfg, kind, 10, 0.05).is_err());
            assert!(build(&cfg, kind, 10, 1.5).is_err());
            assert!(build(&cfg, kind, 0, 1.0).is_err());
        }
    }

    #[test]
    fn short_names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(
                SchedulerKind::from_short_name(kind.short_name()).unwrap(),
                kind
            );
            assert_eq!(
                SchedulerKind::from_class_name(kind.class_name()).unwrap(),
                kind
            );
        }
    }
}
