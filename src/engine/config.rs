//! Model architecture read from the diffusers `config.json` files.
//!
//! Every number the models are built from comes from here, never from a per-version table, so
//! SD 1.x, SD 2.x and any tiny model of the same structure load alike. Fields we cannot
//! support are refused by name instead of being silently ignored.

use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

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

pub(crate) fn read_json<T: DeserializeOwned>(file: &Path) -> Result<T> {
    let text = std::fs::read_to_string(file).map_err(|e| EngineError::ConfigUnreadable {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::ConfigUnreadable {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// UNet

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
    #[serde(default)]
    upcast_attention: bool,
    #[serde(default)]
    only_cross_attention: serde_json::Value,
    #[serde(default)]
    dual_cross_attention: bool,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    addition_embed_type: Option<String>,
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

fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn thirty_two() -> usize {
    32
}
fn two_per_block() -> PerBlock {
    PerBlock::One(2)
}
fn one_per_block() -> PerBlock {
    PerBlock::One(1)
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_act() -> String {
    "silu".into()
}
fn default_time_shift() -> String {
    "default".into()
}
fn default_time_embedding_type() -> String {
    "positional".into()
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

/// One down or up block of the UNet, with everything resolved to numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetBlockConfig {
    pub out_channels: usize,
    pub layers: usize,
    /// `None` for a block without spatial transformers (DownBlock2D / UpBlock2D).
    pub attention: Option<BlockAttention>,
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
}

impl UnetConfig {
    pub fn load(file: &Path) -> Result<Self> {
        Self::from_raw(read_json(file)?, file)
    }

    pub fn from_json(text: &str, file_for_messages: &Path) -> Result<Self> {
        let raw = serde_json::from_str(text).map_err(|e| EngineError::ConfigUnreadable {
            file: file_for_messages.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_raw(raw, file_for_messages)
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
                    "= {value:?} is not supported (unitune runs Stable Diffusion 1.x/2.x UNets)"
                ),
            )
        };
        let n = raw.block_out_channels.len();
        if n == 0 {
            return Err(EngineError::config(file, "block_out_channels", "is empty"));
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
        if let Some(v) = &raw.addition_embed_type {
            return Err(unsupported("addition_embed_type", v));
        }
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
            Some("UNetMidBlock2DCrossAttn") => Some(BlockAttention {
                heads: heads[n - 1],
                transformer_layers: transformer_layers[n - 1],
            }),
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
            upcast_attention: raw.upcast_attention,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift as f64,
            conv_in_kernel: raw.conv_in_kernel,
            conv_out_kernel: raw.conv_out_kernel,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            sample_size: raw.sample_size,
        })
    }

    /// How many times the UNet halves the latent: latent sides must be multiples of 2^this.
    pub fn downsample_count(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}

// ---------------------------------------------------------------------------------------------
// VAE

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

fn default_scaling() -> f64 {
    0.18215
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
        let raw: RawVaeConfig = read_json(file)?;
        let unsupported = |field: &str, value: &dyn std::fmt::Debug| {
            EngineError::config(file, field, format!("= {value:?} is not supported"))
        };
        if raw.block_out_channels.is_empty() {
            return Err(EngineError::config(file, "block_out_channels", "is empty"));
        }
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

// ---------------------------------------------------------------------------------------------
// Text encoder

#[derive(Debug, Clone, Deserialize)]
struct RawTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "seventy_seven")]
    max_position_embeddings: usize,
    #[serde(default = "default_clip_act")]
    hidden_act: String,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
}

fn seventy_seven() -> usize {
    77
}
fn default_clip_act() -> String {
    "quick_gelu".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextActivation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP (SD 1.x).
    QuickGelu,
    /// Exact erf GELU, OpenCLIP (SD 2.x).
    Gelu,
    /// tanh-approximated GELU.
    GeluTanh,
}

/// The CLIP text transformer architecture, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TextEncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub activation: TextActivation,
    pub layer_norm_eps: f64,
}

impl TextEncoderConfig {
    pub fn load(file: &Path) -> Result<Self> {
        let raw: RawTextConfig = read_json(file)?;
        let activation = match raw.hidden_act.as_str() {
            "quick_gelu" => TextActivation::QuickGelu,
            "gelu" => TextActivation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => TextActivation::GeluTanh,
            other => {
                return Err(EngineError::config(
                    file,
                    "hidden_act",
                    format!("= {other:?} is not supported (expected quick_gelu or gelu)"),
                ));
            }
        };
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads)
        {
            return Err(EngineError::config(
                file,
                "num_attention_heads",
                format!(
                    "({}) does not divide hidden_size ({})",
                    raw.num_attention_heads, raw.hidden_size
                ),
            ));
        }
        Ok(TextEncoderConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            activation,
            layer_norm_eps: raw.layer_norm_eps,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Scheduler

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

fn thousand() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
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
        let raw = serde_json::from_str(text).map_err(|e| EngineError::ConfigUnreadable {
            file: file_for_messages.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_raw(raw, file_for_messages)
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
