//! Model architecture read from the diffusers `config.json` files.
//!
//! Every number the models are built from comes from here, never from a per-version table, so
//! SD 1.x, SD 2.x and any tiny model of the same structure load alike. Fields we cannot
//! support are refused by name instead of being silently ignored.

mod scheduler;
mod taesd;
mod text_encoder;
mod unet;
mod vae;

use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

pub use scheduler::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use taesd::{TinyActivation, TinyVaeConfig};
pub use text_encoder::{TextActivation, TextEncoderConfig, projection_dim};
pub use unet::{BlockAttention, TextTimeConfig, UnetBlockConfig, UnetConfig};
pub use vae::VaeConfig;

use super::error::{EngineError, Result};

/// A config value that diffusers allows either as one number for every block or as a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for each of `blocks` blocks; a list must have exactly one entry per block.
    fn expand(&self, blocks: usize, file: &Path, field: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(list) if list.len() == blocks => Ok(list.clone()),
            PerBlock::Each(list) => Err(EngineError::config(
                file,
                field,
                format!(
                    "has {} entries but the model has {blocks} blocks",
                    list.len()
                ),
            )),
        }
    }
}

/// Checks a count read from a config: at least `min` (a zero divides by zero or leaves a layer
/// with nothing in it) and at most `max`. The upper bounds lie far above any real model; they
/// keep arithmetic on sizes, and allocations sized by them, from overflowing when a damaged
/// config holds a huge number.
pub(super) fn check_count(
    file: &Path,
    field: &str,
    value: usize,
    min: usize,
    max: usize,
) -> Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(EngineError::config(
            file,
            field,
            format!("= {value} is outside the supported range {min} to {max}"),
        ))
    }
}

/// The checks the UNet and the VAE share, made before anything is sized from their block
/// list or divided by their group count: 1 to [`MAX_BLOCKS`] blocks, 1 to [`MAX_CHANNELS`]
/// groups.
pub(super) fn check_blocks_and_groups(
    file: &Path,
    blocks: usize,
    norm_num_groups: usize,
) -> Result<()> {
    if blocks == 0 {
        return Err(EngineError::config(file, "block_out_channels", "is empty"));
    }
    if blocks > MAX_BLOCKS {
        return Err(EngineError::config(
            file,
            "block_out_channels",
            format!("has {blocks} entries; at most {MAX_BLOCKS} blocks are supported"),
        ));
    }
    check_count(file, "norm_num_groups", norm_num_groups, 1, MAX_CHANNELS)
}

/// Most channels of any layer (SD uses at most 1280).
pub(super) const MAX_CHANNELS: usize = 1 << 16;
/// Most resnet layers in one block (SD uses 2).
pub(super) const MAX_LAYERS: usize = 256;
/// Most down (or up) blocks: each halves the image side, so 2^(blocks - 1) must stay small.
pub(super) const MAX_BLOCKS: usize = 8;
/// Largest `sample_size`: sides in latent cells or pixels, far above any real model's.
pub(super) const MAX_SAMPLE_SIZE: usize = 1 << 16;

pub(crate) fn read_json<T: DeserializeOwned>(file: &Path) -> Result<T> {
    let text = std::fs::read_to_string(file).map_err(|e| EngineError::ConfigUnreadable {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    parse_json(&text, file)
}

/// Parses config text; `file` only names it in messages.
pub(crate) fn parse_json<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|e| EngineError::ConfigUnreadable {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })
}

// Defaults diffusers and transformers assume when a field is absent.

pub(super) fn three() -> usize {
    3
}

pub(super) fn one_f64() -> f64 {
    1.0
}

pub(super) fn default_eps() -> f64 {
    1e-5
}

pub(super) fn default_act() -> String {
    "silu".into()
}

pub(super) fn four() -> usize {
    4
}

pub(super) fn one() -> usize {
    1
}

pub(super) fn thirty_two() -> usize {
    32
}

pub(super) fn one_per_block() -> PerBlock {
    PerBlock::One(1)
}

pub(super) fn default_true() -> bool {
    true
}

pub(super) fn default_time_shift() -> String {
    "default".into()
}

pub(super) fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

pub(super) fn default_scaling() -> f64 {
    0.18215
}

pub(super) fn seventy_seven() -> usize {
    77
}

pub(super) fn thousand() -> usize {
    1000
}

pub(super) fn default_beta_end() -> f64 {
    0.02
}

pub(super) fn default_prediction() -> String {
    "epsilon".into()
}

/// All four architecture configs of one pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub unet: UnetConfig,
    pub vae: VaeConfig,
    pub text_encoder: TextEncoderConfig,
    pub scheduler: SchedulerConfig,
}

impl PipelineConfig {
    /// The model's native image side in pixels (UNet sample size x VAE factor), if stated.
    pub fn native_image_side(&self) -> Option<usize> {
        self.unet
            .sample_size
            .map(|s| s * self.vae.downscale_factor())
            .or(self.vae.sample_size)
    }

    /// Latent sides must be multiples of this many pixels for the UNet's down/up sampling.
    pub fn pixel_multiple(&self) -> usize {
        self.vae.downscale_factor() << self.unet.downsample_count()
    }
}
