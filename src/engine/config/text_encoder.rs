//! `text_encoder/config.json` (transformers CLIPTextModel).

use std::path::Path;

use serde::Deserialize;

use super::*;
use crate::engine::error::{EngineError, Result};
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

/// `projection_dim` of a `CLIPTextModelWithProjection` config (SDXL's second text encoder).
/// Read on its own rather than kept in [`TextEncoderConfig`]: every CLIP text config carries
/// one, but only that model has the layer.
pub fn projection_dim(file: &Path) -> Result<Option<usize>> {
    let raw: serde_json::Value = read_json(file)?;
    Ok(raw
        .get("projection_dim")
        .and_then(serde_json::Value::as_u64)
        .map(|d| d as usize))
}

impl TextEncoderConfig {
    pub fn load(file: &Path) -> Result<Self> {
        Self::from_raw(read_json(file)?, file)
    }

    pub fn from_json(text: &str, file_for_messages: &Path) -> Result<Self> {
        Self::from_raw(parse_json(text, file_for_messages)?, file_for_messages)
    }

    fn from_raw(raw: RawTextConfig, file: &Path) -> Result<Self> {
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
