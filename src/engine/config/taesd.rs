//! `config.json` of a tiny autoencoder (diffusers `AutoencoderTiny`, the TAESD family).

use std::path::Path;

use serde::Deserialize;

use super::*;
use crate::engine::error::{EngineError, Result};

#[derive(Debug, Clone, Deserialize)]
struct RawTinyVaeConfig {
    #[serde(default, rename = "_class_name")]
    class_name: Option<String>,
    #[serde(default = "three")]
    in_channels: usize,
    #[serde(default = "three")]
    out_channels: usize,
    #[serde(default = "four_times_64")]
    encoder_block_out_channels: Vec<usize>,
    #[serde(default = "four_times_64")]
    decoder_block_out_channels: Vec<usize>,
    #[serde(default = "relu")]
    act_fn: String,
    #[serde(default = "nearest")]
    upsample_fn: String,
    #[serde(default = "four")]
    latent_channels: usize,
    #[serde(default = "two")]
    upsampling_scaling_factor: usize,
    #[serde(default = "taesd_encoder_blocks")]
    num_encoder_blocks: Vec<usize>,
    #[serde(default = "taesd_decoder_blocks")]
    num_decoder_blocks: Vec<usize>,
    #[serde(default = "three_f64")]
    latent_magnitude: f64,
    #[serde(default = "half")]
    latent_shift: f64,
    #[serde(default = "one_f64")]
    scaling_factor: f64,
    #[serde(default)]
    shift_factor: Option<f64>,
}

// diffusers' defaults, which are taesd's architecture.
fn four_times_64() -> Vec<usize> {
    vec![64; 4]
}
fn relu() -> String {
    "relu".into()
}
fn nearest() -> String {
    "nearest".into()
}
fn two() -> usize {
    2
}
fn taesd_encoder_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn taesd_decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn three_f64() -> f64 {
    3.0
}
fn half() -> f64 {
    0.5
}

/// The activation between the tiny autoencoder's convolutions (`act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyActivation {
    Relu,
    /// Also named "swish".
    Silu,
    /// The exact (erf) GELU, PyTorch's `nn.GELU()`.
    Gelu,
    Mish,
}

/// The `AutoencoderTiny` architecture, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyVaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// One entry per encoder stage, all equal (see `from_raw`).
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    /// `AutoencoderTinyBlock`s per encoder stage.
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub act_fn: TinyActivation,
    pub latent_channels: usize,
    /// Nearest-neighbour upsampling factor between decoder stages.
    pub upsampling_scaling_factor: usize,
    /// Only for quantising latents to bytes (diffusers' `scale_latents`); decoding and
    /// encoding do not use it.
    pub latent_magnitude: f64,
    pub latent_shift: f64,
    /// Pipelines decode `latents / scaling_factor + shift_factor`; 1 and 0 for taesd, whose
    /// latents are the Stable Diffusion UNet's (already scaled) latents.
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl TinyVaeConfig {
    pub fn load(file: &Path) -> Result<Self> {
        Self::from_raw(read_json(file)?, file)
    }

    pub fn from_json(text: &str, file_for_messages: &Path) -> Result<Self> {
        Self::from_raw(parse_json(text, file_for_messages)?, file_for_messages)
    }

    fn from_raw(raw: RawTinyVaeConfig, file: &Path) -> Result<Self> {
        let unsupported = |field: &str, value: &dyn std::fmt::Debug| {
            EngineError::config(file, field, format!("= {value:?} is not supported"))
        };
        if let Some(class) = &raw.class_name
            && class != "AutoencoderTiny"
        {
            return Err(EngineError::config(
                file,
                "_class_name",
                format!("= {class:?}: this is not a tiny autoencoder (AutoencoderTiny)"),
            ));
        }
        check_count(file, "in_channels", raw.in_channels, 1, MAX_CHANNELS)?;
        check_count(file, "out_channels", raw.out_channels, 1, MAX_CHANNELS)?;
        check_count(
            file,
            "latent_channels",
            raw.latent_channels,
            1,
            MAX_CHANNELS,
        )?;
        // Each upsampling multiplies the image's area by its square.
        check_count(
            file,
            "upsampling_scaling_factor",
            raw.upsampling_scaling_factor,
            1,
            4,
        )?;
        check_stages(
            file,
            (
                "encoder_block_out_channels",
                &raw.encoder_block_out_channels,
            ),
            ("num_encoder_blocks", &raw.num_encoder_blocks),
        )?;
        check_stages(
            file,
            (
                "decoder_block_out_channels",
                &raw.decoder_block_out_channels,
            ),
            ("num_decoder_blocks", &raw.num_decoder_blocks),
        )?;
        let act_fn = match raw.act_fn.to_ascii_lowercase().as_str() {
            "relu" => TinyActivation::Relu,
            "silu" | "swish" => TinyActivation::Silu,
            "gelu" => TinyActivation::Gelu,
            "mish" => TinyActivation::Mish,
            _ => return Err(unsupported("act_fn", &raw.act_fn)),
        };
        if raw.upsample_fn != "nearest" {
            return Err(unsupported("upsample_fn", &raw.upsample_fn));
        }
        let shift_factor = raw.shift_factor.unwrap_or(0.0);
        for (field, value, positive) in [
            ("latent_magnitude", raw.latent_magnitude, true),
            ("latent_shift", raw.latent_shift, false),
            ("scaling_factor", raw.scaling_factor, true),
            ("shift_factor", shift_factor, false),
        ] {
            if !value.is_finite() || (positive && value <= 0.0) {
                let wanted = if positive {
                    "a positive number"
                } else {
                    "a finite number"
                };
                return Err(EngineError::config(
                    file,
                    field,
                    format!("= {value} must be {wanted}"),
                ));
            }
        }
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            encoder_block_out_channels: raw.encoder_block_out_channels,
            decoder_block_out_channels: raw.decoder_block_out_channels,
            num_encoder_blocks: raw.num_encoder_blocks,
            num_decoder_blocks: raw.num_decoder_blocks,
            act_fn,
            latent_channels: raw.latent_channels,
            upsampling_scaling_factor: raw.upsampling_scaling_factor,
            latent_magnitude: raw.latent_magnitude,
            latent_shift: raw.latent_shift,
            scaling_factor: raw.scaling_factor,
            shift_factor,
        })
    }

    /// Pixels per latent cell along each side when decoding:
    /// `upsampling_scaling_factor^(stages - 1)`, 8 for taesd.
    pub fn decoder_upscale_factor(&self) -> usize {
        self.upsampling_scaling_factor
            .pow(self.decoder_block_out_channels.len() as u32 - 1)
    }

    /// Pixels per latent cell along each side when encoding: every stage after the first
    /// halves the image.
    pub fn encoder_downscale_factor(&self) -> usize {
        1 << (self.encoder_block_out_channels.len() - 1)
    }
}

/// One side's stage lists: as many channel entries as block counts, 1 to [`MAX_BLOCKS`]
/// stages, and the same width everywhere, because diffusers chains the stages without a
/// projection (a real checkpoint with different widths cannot exist).
fn check_stages(
    file: &Path,
    (channels_field, channels): (&str, &[usize]),
    (blocks_field, blocks): (&str, &[usize]),
) -> Result<()> {
    if channels.is_empty() || channels.len() > MAX_BLOCKS {
        return Err(EngineError::config(
            file,
            channels_field,
            format!(
                "has {} entries; 1 to {MAX_BLOCKS} stages are supported",
                channels.len()
            ),
        ));
    }
    if blocks.len() != channels.len() {
        return Err(EngineError::config(
            file,
            blocks_field,
            format!(
                "has {} entries but {channels_field} has {}",
                blocks.len(),
                channels.len()
            ),
        ));
    }
    for &c in channels {
        check_count(file, channels_field, c, 1, MAX_CHANNELS)?;
        if c != channels[0] {
            return Err(EngineError::config(
                file,
                channels_field,
                format!("= {channels:?}: every stage must have the same width"),
            ));
        }
    }
    for &n in blocks {
        check_count(file, blocks_field, n, 0, MAX_LAYERS)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TinyVaeConfig> {
        TinyVaeConfig::from_json(text, Path::new("taesd/config.json"))
    }

    #[test]
    fn an_empty_config_is_taesd() {
        let config = parse("{}").unwrap();
        assert_eq!(config.decoder_upscale_factor(), 8);
        assert_eq!(config.encoder_downscale_factor(), 8);
        assert_eq!(config.num_decoder_blocks, [3, 3, 3, 1]);
        assert_eq!(config.act_fn, TinyActivation::Relu);
        assert_eq!((config.scaling_factor, config.shift_factor), (1.0, 0.0));
    }

    #[test]
    fn bad_fields_are_refused_by_name() {
        for (text, field) in [
            (r#"{"_class_name": "AutoencoderKL"}"#, "_class_name"),
            (r#"{"act_fn": "tanh"}"#, "act_fn"),
            (r#"{"upsample_fn": "bilinear"}"#, "upsample_fn"),
            (r#"{"num_decoder_blocks": [3, 3]}"#, "num_decoder_blocks"),
            (
                r#"{"encoder_block_out_channels": [32, 64, 64, 64]}"#,
                "encoder_block_out_channels",
            ),
            (
                r#"{"decoder_block_out_channels": [], "num_decoder_blocks": []}"#,
                "decoder_block_out_channels",
            ),
            (r#"{"latent_channels": 0}"#, "latent_channels"),
            (
                r#"{"upsampling_scaling_factor": 1000}"#,
                "upsampling_scaling_factor",
            ),
            (r#"{"scaling_factor": 0}"#, "scaling_factor"),
            (
                r#"{"num_encoder_blocks": [1, 3, 3, 100000]}"#,
                "num_encoder_blocks",
            ),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(&format!("`{field}`")), "{text}: {error}");
        }
    }
}
