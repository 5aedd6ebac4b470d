//! `vae/config.json` (diffusers AutoencoderKL).

use std::path::Path;

use serde::Deserialize;

use super::*;
use crate::engine::error::{EngineError, Result};
#[derive(Debug, Clone, Deserialize)]
struct RawVaeConfig {
    #[serde(default = "three")]
    in_channels: usize,
    #[serde(default = "three")]
    out_channels: usize,
    block_out_channels: Vec<usize>,
    #[serde(default)]
    down_block_types: Vec<String>,
    #[serde(default)]
    up_block_types: Vec<String>,
    #[serde(default = "one")]
    layers_per_block: usize,
    #[serde(default = "four")]
    latent_channels: usize,
    #[serde(default = "thirty_two")]
    norm_num_groups: usize,
    #[serde(default = "default_act")]
    act_fn: String,
    #[serde(default)]
    sample_size: Option<usize>,
    #[serde(default = "default_scaling")]
    scaling_factor: f64,
    #[serde(default)]
    shift_factor: Option<f64>,
    #[serde(default = "default_true_opt")]
    use_quant_conv: Option<bool>,
    #[serde(default = "default_true_opt")]
    use_post_quant_conv: Option<bool>,
    #[serde(default = "default_true_opt")]
    mid_block_add_attention: Option<bool>,
    #[serde(default)]
    force_upcast: Option<bool>,
}

fn default_true_opt() -> Option<bool> {
    Some(true)
}

/// The AutoencoderKL architecture, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: Option<usize>,
    /// Latents are multiplied by this after encoding and divided before decoding.
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_attention: bool,
    /// True when the model card says the VAE overflows in float16 (SD's VAE does).
    pub force_upcast: bool,
}

impl VaeConfig {
    pub fn load(file: &Path) -> Result<Self> {
        Self::from_raw(read_json(file)?, file)
    }

    pub fn from_json(text: &str, file_for_messages: &Path) -> Result<Self> {
        Self::from_raw(parse_json(text, file_for_messages)?, file_for_messages)
    }

    fn from_raw(raw: RawVaeConfig, file: &Path) -> Result<Self> {
        let unsupported = |field: &str, value: &dyn std::fmt::Debug| {
            EngineError::config(file, field, format!("= {value:?} is not supported"))
        };
        let blocks = raw.block_out_channels.len();
        check_blocks_and_groups(file, blocks, raw.norm_num_groups)?;
        // Sizes the decoder's first layer; a huge count overflows its shape.
        check_count(
            file,
            "latent_channels",
            raw.latent_channels,
            1,
            MAX_CHANNELS,
        )?;
        if raw.act_fn != "silu" {
            return Err(unsupported("act_fn", &raw.act_fn));
        }
        if let Some(shift) = raw.shift_factor
            && shift != 0.0
        {
            return Err(unsupported("shift_factor", &shift));
        }
        for kind in &raw.down_block_types {
            if kind != "DownEncoderBlock2D" {
                return Err(unsupported("down_block_types", kind));
            }
        }
        for kind in &raw.up_block_types {
            if kind != "UpDecoderBlock2D" {
                return Err(unsupported("up_block_types", kind));
            }
        }
        for c in &raw.block_out_channels {
            if *c == 0 || c % raw.norm_num_groups != 0 {
                return Err(EngineError::config(
                    file,
                    "block_out_channels",
                    format!(
                        "entry {c} is not a multiple of norm_num_groups ({})",
                        raw.norm_num_groups
                    ),
                ));
            }
        }
        Ok(VaeConfig {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            sample_size: raw.sample_size,
            scaling_factor: raw.scaling_factor,
            use_quant_conv: raw.use_quant_conv.unwrap_or(true),
            use_post_quant_conv: raw.use_post_quant_conv.unwrap_or(true),
            mid_block_attention: raw.mid_block_add_attention.unwrap_or(true),
            force_upcast: raw.force_upcast.unwrap_or(true),
        })
    }

    /// Pixels per latent cell along each side: 2^(blocks - 1), 8 for Stable Diffusion.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
