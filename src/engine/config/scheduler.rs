//! `scheduler/scheduler_config.json`, whatever scheduler class the model ships.

use std::path::Path;

use serde::Deserialize;

use super::*;
use crate::engine::error::{EngineError, Result};
#[derive(Debug, Clone, Deserialize)]
struct RawSchedulerConfig {
    #[serde(default = "thousand")]
    num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    beta_start: f64,
    #[serde(default = "default_beta_end")]
    beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    beta_schedule: String,
    #[serde(default)]
    trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction")]
    prediction_type: String,
    #[serde(default = "default_spacing")]
    timestep_spacing: String,
    #[serde(default)]
    steps_offset: usize,
    #[serde(default = "default_true")]
    set_alpha_to_one: bool,
    #[serde(default = "default_true")]
    clip_sample: bool,
    #[serde(default = "one_f64")]
    clip_sample_range: f64,
    #[serde(default)]
    thresholding: bool,
    #[serde(default)]
    rescale_betas_zero_snr: bool,
}

/// Most training timesteps accepted (Stable Diffusion uses 1000).
const MAX_TRAIN_TIMESTEPS: usize = 1 << 20;

fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_spacing() -> String {
    "leading".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The UNet predicts the added noise.
    Epsilon,
    /// The UNet predicts `sqrt(a) * noise - sqrt(1 - a) * x0` (SD 2.x 768-v models).
    VPrediction,
    /// The UNet predicts the clean sample.
    Sample,
}

impl PredictionType {
    pub fn as_str(&self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The noise schedule read from `scheduler/scheduler_config.json`, whatever scheduler class
/// the model ships with (SD 1.5 ships PNDM's config; DDIM reads the same fields).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub clip_sample: Option<f64>,
    pub rescale_betas_zero_snr: bool,
}

impl SchedulerConfig {
    pub fn load(file: &Path) -> Result<Self> {
        let raw: RawSchedulerConfig = read_json(file)?;
        Self::from_raw(raw, file)
    }

    pub fn from_json(text: &str, file_for_messages: &Path) -> Result<Self> {
        Self::from_raw(parse_json(text, file_for_messages)?, file_for_messages)
    }

    fn from_raw(raw: RawSchedulerConfig, file: &Path) -> Result<Self> {
        let beta_schedule = match raw.beta_schedule.as_str() {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            other => {
                return Err(EngineError::config(
                    file,
                    "beta_schedule",
                    format!(
                        "= {other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
                    ),
                ));
            }
        };
        let prediction_type = match raw.prediction_type.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            other => {
                return Err(EngineError::config(
                    file,
                    "prediction_type",
                    format!("= {other:?} is not supported (epsilon, v_prediction, sample)"),
                ));
            }
        };
        let timestep_spacing = match raw.timestep_spacing.as_str() {
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            "linspace" => TimestepSpacing::Linspace,
            other => {
                return Err(EngineError::config(
                    file,
                    "timestep_spacing",
                    format!("= {other:?} is not supported (leading, trailing, linspace)"),
                ));
            }
        };
        if raw.thresholding {
            return Err(EngineError::config(
                file,
                "thresholding",
                "= true (dynamic thresholding) is not supported",
            ));
        }
        if raw.num_train_timesteps == 0 {
            return Err(EngineError::config(file, "num_train_timesteps", "is 0"));
        }
        // The schedule holds one value per training timestep.
        check_count(
            file,
            "num_train_timesteps",
            raw.num_train_timesteps,
            1,
            MAX_TRAIN_TIMESTEPS,
        )?;
        if raw.steps_offset >= raw.num_train_timesteps {
            return Err(EngineError::config(
                file,
                "steps_offset",
                format!(
                    "({}) must be less than num_train_timesteps ({})",
                    raw.steps_offset, raw.num_train_timesteps
                ),
            ));
        }
        if let Some(betas) = &raw.trained_betas
            && betas.len() != raw.num_train_timesteps
        {
            return Err(EngineError::config(
                file,
                "trained_betas",
                format!(
                    "has {} values but num_train_timesteps is {}",
                    betas.len(),
                    raw.num_train_timesteps
                ),
            ));
        }
        Ok(SchedulerConfig {
            num_train_timesteps: raw.num_train_timesteps,
            beta_start: raw.beta_start,
            beta_end: raw.beta_end,
            beta_schedule,
            trained_betas: raw.trained_betas,
            prediction_type,
            timestep_spacing,
            steps_offset: raw.steps_offset,
            set_alpha_to_one: raw.set_alpha_to_one,
            clip_sample: raw.clip_sample.then_some(raw.clip_sample_range),
            rescale_betas_zero_snr: raw.rescale_betas_zero_snr,
        })
    }
}
