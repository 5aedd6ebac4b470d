//! `unet/config.json` (diffusers UNet2DConditionModel).

use std::path::Path;

use serde::Deserialize;

use super::*;
use crate::engine::error::{EngineError, Result};

/// `unet/config.json` as diffusers writes it (UNet2DConditionModel). Only what we read.
#[derive(Debug, Clone, Deserialize)]
struct RawUnetConfig {
    #[serde(default = "four")]
    in_channels: usize,
    #[serde(default = "four")]
    out_channels: usize,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    mid_block_type: Option<String>,
    #[serde(default = "two_per_block")]
    layers_per_block: PerBlock,
    #[serde(default = "one_per_block")]
    transformer_layers_per_block: PerBlock,
    #[serde(default)]
    attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    num_attention_heads: Option<PerBlock>,
    cross_attention_dim: PerBlock,
    #[serde(default = "thirty_two")]
    norm_num_groups: usize,
    #[serde(default = "default_eps")]
    norm_eps: f64,
    #[serde(default)]
    use_linear_projection: bool,
    /// SDXL base writes `null`, which diffusers reads as false.
    #[serde(default)]
    upcast_attention: Option<bool>,
    #[serde(default)]
    only_cross_attention: serde_json::Value,
    #[serde(default)]
    dual_cross_attention: bool,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    encoder_hid_dim: Option<usize>,
    #[serde(default)]
    time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_true")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: usize,
    #[serde(default = "default_act")]
    act_fn: String,
    #[serde(default = "default_time_shift")]
    resnet_time_scale_shift: String,
    #[serde(default = "default_time_embedding_type")]
    time_embedding_type: String,
    #[serde(default = "three")]
    conv_in_kernel: usize,
    #[serde(default = "three")]
    conv_out_kernel: usize,
    #[serde(default = "one")]
    downsample_padding: usize,
    #[serde(default = "one_f64")]
    mid_block_scale_factor: f64,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default)]
    sample_size: Option<usize>,
}

/// The widths `addition_embed_type: "text_time"` needs, checked to leave room for a pooled
/// embedding.
fn text_time_config(raw: &RawUnetConfig, file: &Path) -> Result<TextTimeConfig> {
    let required = |field: &str, value: Option<usize>| {
        value.filter(|&v| v > 0).ok_or_else(|| {
            EngineError::config(
                file,
                field,
                "is required and must be positive when addition_embed_type is \"text_time\"",
            )
        })
    };
    let time_embed_dim = required("addition_time_embed_dim", raw.addition_time_embed_dim)?;
    check_count(
        file,
        "addition_time_embed_dim",
        time_embed_dim,
        1,
        MAX_CHANNELS,
    )?;
    let input_dim = required(
        "projection_class_embeddings_input_dim",
        raw.projection_class_embeddings_input_dim,
    )?;
    check_count(
        file,
        "projection_class_embeddings_input_dim",
        input_dim,
        1,
        MAX_CHANNELS,
    )?;
    if input_dim <= TextTimeConfig::SIZE_NUMBERS * time_embed_dim {
        return Err(EngineError::config(
            file,
            "projection_class_embeddings_input_dim",
            format!(
                "= {input_dim} leaves no room for the pooled text embedding beside 6 size numbers of {time_embed_dim}"
            ),
        ));
    }
    Ok(TextTimeConfig {
        time_embed_dim,
        input_dim,
    })
}

fn two_per_block() -> PerBlock {
    PerBlock::One(2)
}
fn default_time_embedding_type() -> String {
    "positional".into()
}

/// One down or up block of the UNet, with everything resolved to numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetBlockConfig {
    pub out_channels: usize,
    pub layers: usize,
    /// `None` for a block without spatial transformers (DownBlock2D / UpBlock2D).
    pub attention: Option<BlockAttention>,
}

/// SDXL's added conditioning (`addition_embed_type: "text_time"`): the pooled text embedding
/// and six size numbers (original size, crop top-left, target size, each as height, width),
/// each number embedded sinusoidally, joined, passed through `add_embedding` and added to the
/// time embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextTimeConfig {
    /// Width of each size number's sinusoidal embedding (`addition_time_embed_dim`; SDXL 256).
    pub time_embed_dim: usize,
    /// `add_embedding`'s input width (`projection_class_embeddings_input_dim`): the pooled
    /// embedding's width plus 6 x `time_embed_dim` (SDXL: 1280 + 1536).
    pub input_dim: usize,
}

impl TextTimeConfig {
    /// How many size numbers the conditioning takes.
    pub const SIZE_NUMBERS: usize = 6;

    /// The pooled text embedding's width the UNet expects.
    pub fn pooled_dim(&self) -> usize {
        self.input_dim - Self::SIZE_NUMBERS * self.time_embed_dim
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockAttention {
    pub heads: usize,
    pub transformer_layers: usize,
}

/// The UNet architecture, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// Down blocks, first (highest resolution) to last.
    pub down_blocks: Vec<UnetBlockConfig>,
    /// Up blocks in execution order (lowest resolution first); `layers` counts the resnets.
    pub up_blocks: Vec<UnetBlockConfig>,
    /// `None` when the model has no mid block.
    pub mid_block: Option<BlockAttention>,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub sample_size: Option<usize>,
    /// `Some` for SDXL's UNets, which take the pooled text embedding and the size numbers.
    pub text_time: Option<TextTimeConfig>,
}

impl UnetConfig {
    pub fn load(file: &Path) -> Result<Self> {
        Self::from_raw(read_json(file)?, file)
    }

    pub fn from_json(text: &str, file_for_messages: &Path) -> Result<Self> {
        Self::from_raw(parse_json(text, file_for_messages)?, file_for_messages)
    }

    /// The time embedding width: 4x the first block's channels, as in diffusers.
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    fn from_raw(raw: RawUnetConfig, file: &Path) -> Result<Self> {
        let unsupported = |field: &str, value: &dyn std::fmt::Debug| {
            EngineError::config(
                file,
                field,
                format!(
                    "= {value:?} is not supported (unitune runs Stable Diffusion 1.x, 2.x and XL UNets)"
                ),
            )
        };
        let n = raw.block_out_channels.len();
        check_blocks_and_groups(file, n, raw.norm_num_groups)?;
        if let Some(size) = raw.sample_size {
            check_count(file, "sample_size", size, 1, MAX_SAMPLE_SIZE)?;
        }
        if raw.down_block_types.len() != n {
            return Err(EngineError::config(
                file,
                "down_block_types",
                format!(
                    "has {} entries but block_out_channels has {n}",
                    raw.down_block_types.len()
                ),
            ));
        }
        if raw.up_block_types.len() != n {
            return Err(EngineError::config(
                file,
                "up_block_types",
                format!(
                    "has {} entries but block_out_channels has {n}",
                    raw.up_block_types.len()
                ),
            ));
        }
        if let Some(v) = &raw.class_embed_type {
            return Err(unsupported("class_embed_type", v));
        }
        let text_time = match raw.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => Some(text_time_config(&raw, file)?),
            Some(other) => return Err(unsupported("addition_embed_type", &other)),
        };
        if let Some(v) = &raw.encoder_hid_dim {
            return Err(unsupported("encoder_hid_dim", v));
        }
        if let Some(v) = &raw.time_cond_proj_dim {
            return Err(unsupported("time_cond_proj_dim", v));
        }
        if raw.dual_cross_attention {
            return Err(unsupported("dual_cross_attention", &true));
        }
        if !matches!(
            raw.only_cross_attention,
            serde_json::Value::Null | serde_json::Value::Bool(false)
        ) {
            return Err(unsupported(
                "only_cross_attention",
                &raw.only_cross_attention,
            ));
        }
        if raw.act_fn != "silu" {
            return Err(unsupported("act_fn", &raw.act_fn));
        }
        if raw.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                &raw.resnet_time_scale_shift,
            ));
        }
        if raw.time_embedding_type != "positional" {
            return Err(unsupported("time_embedding_type", &raw.time_embedding_type));
        }
        if raw.center_input_sample {
            return Err(unsupported("center_input_sample", &true));
        }
        for (field, k) in [
            ("conv_in_kernel", raw.conv_in_kernel),
            ("conv_out_kernel", raw.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(EngineError::config(
                    file,
                    field,
                    format!("= {k} must be odd"),
                ));
            }
        }
        for (i, c) in raw.block_out_channels.iter().enumerate() {
            if *c == 0 || c % raw.norm_num_groups != 0 {
                return Err(EngineError::config(
                    file,
                    "block_out_channels",
                    format!(
                        "entry {i} ({c}) is not a multiple of norm_num_groups ({})",
                        raw.norm_num_groups
                    ),
                ));
            }
        }
        let cross_attention_dim = match raw.cross_attention_dim {
            PerBlock::One(d) => d,
            ref other => return Err(unsupported("cross_attention_dim", other)),
        };
        // A huge width asks for terabytes of key/value weights: the allocation aborts.
        check_count(
            file,
            "cross_attention_dim",
            cross_attention_dim,
            1,
            MAX_CHANNELS,
        )?;

        // diffusers quirk: `attention_head_dim` has always meant the number of heads in
        // UNet2DConditionModel; `num_attention_heads`, when present, takes precedence.
        let heads_field = if raw.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let heads = raw
            .num_attention_heads
            .clone()
            .or(raw.attention_head_dim.clone())
            .unwrap_or(PerBlock::One(8))
            .expand(n, file, heads_field)?;
        let layers = raw.layers_per_block.expand(n, file, "layers_per_block")?;
        let transformer_layers =
            raw.transformer_layers_per_block
                .expand(n, file, "transformer_layers_per_block")?;
        // Each up block has one layer more; a block's layers are allocated up front.
        for count in &layers {
            check_count(file, "layers_per_block", *count, 1, MAX_LAYERS)?;
        }

        let block_attention = |i: usize,
                               field: &str,
                               kind: &str|
         -> Result<Option<BlockAttention>> {
            let channels = raw.block_out_channels[i];
            match kind {
                "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => {
                    if heads[i] == 0 || !channels.is_multiple_of(heads[i]) {
                        return Err(EngineError::config(
                            file,
                            heads_field,
                            format!(
                                "entry {i} ({}) does not divide the block's {channels} channels",
                                heads[i]
                            ),
                        ));
                    }
                    Ok(Some(BlockAttention {
                        heads: heads[i],
                        transformer_layers: transformer_layers[i],
                    }))
                }
                "DownBlock2D" | "UpBlock2D" => Ok(None),
                other => Err(EngineError::config(
                    file,
                    field,
                    format!(
                        "contains `{other}`, which is not supported (expected CrossAttn/plain 2D blocks)"
                    ),
                )),
            }
        };

        let mut down_blocks = Vec::with_capacity(n);
        for (i, kind) in raw.down_block_types.iter().enumerate() {
            down_blocks.push(UnetBlockConfig {
                out_channels: raw.block_out_channels[i],
                layers: layers[i],
                attention: block_attention(i, "down_block_types", kind)?,
            });
        }
        let mut up_blocks = Vec::with_capacity(n);
        for (i, kind) in raw.up_block_types.iter().enumerate() {
            // Up blocks mirror the down blocks: the i-th up block uses the reversed lists.
            let mirrored = n - 1 - i;
            up_blocks.push(UnetBlockConfig {
                out_channels: raw.block_out_channels[mirrored],
                layers: layers[mirrored] + 1,
                attention: block_attention(mirrored, "up_block_types", kind)?,
            });
        }
        let mid_block = match raw.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                // The mid block attends with the last block's heads even when that block has
                // no attention of its own, so its entry was not checked above.
                let (last, channels) = (n - 1, raw.block_out_channels[n - 1]);
                if heads[last] == 0 || !channels.is_multiple_of(heads[last]) {
                    return Err(EngineError::config(
                        file,
                        heads_field,
                        format!(
                            "entry {last} ({}) does not divide the mid block's {channels} channels",
                            heads[last]
                        ),
                    ));
                }
                Some(BlockAttention {
                    heads: heads[last],
                    transformer_layers: transformer_layers[last],
                })
            }
            Some(other) => return Err(unsupported("mid_block_type", &other)),
        };

        Ok(UnetConfig {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            down_blocks,
            up_blocks,
            mid_block,
            cross_attention_dim,
            norm_num_groups: raw.norm_num_groups,
            norm_eps: raw.norm_eps,
            use_linear_projection: raw.use_linear_projection,
            upcast_attention: raw.upcast_attention.unwrap_or(false),
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift as f64,
            conv_in_kernel: raw.conv_in_kernel,
            conv_out_kernel: raw.conv_out_kernel,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            sample_size: raw.sample_size,
            text_time,
        })
    }

    /// How many times the UNet halves the latent: latent sides must be multiples of 2^this.
    pub fn downsample_count(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl_like(extra: serde_json::Value) -> Result<UnetConfig> {
        let mut config = serde_json::json!({
            "block_out_channels": [16, 32],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 48,
            "norm_num_groups": 8,
            "attention_head_dim": [2, 4],
            "addition_embed_type": "text_time",
        });
        config
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        UnetConfig::from_json(&config.to_string(), Path::new("unet/config.json"))
    }

    #[test]
    fn text_time_needs_both_widths_and_room_for_the_pooled_embedding() {
        let ok = sdxl_like(serde_json::json!({
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 80,
        }))
        .unwrap();
        assert_eq!(ok.text_time.unwrap().pooled_dim(), 32);
        let missing = sdxl_like(serde_json::json!({"addition_time_embed_dim": 8})).unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("projection_class_embeddings_input_dim"),
            "{missing}"
        );
        let no_room = sdxl_like(serde_json::json!({
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 48,
        }))
        .unwrap_err();
        assert!(no_room.to_string().contains("no room"), "{no_room}");
        let other = sdxl_like(serde_json::json!({"addition_embed_type": "image"})).unwrap_err();
        assert!(other.to_string().contains("addition_embed_type"), "{other}");
    }
}
