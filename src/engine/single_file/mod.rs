//! Single-file checkpoints in the original LDM layout (what AUTOMATIC1111 and ComfyUI keep):
//! `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and `cond_stage_model.*`
//! (CLIP for SD 1.x, OpenCLIP for SD 2.x), or SDXL's SGM layout, whose text encoders are
//! `conditioner.embedders.0.transformer.*` (CLIP ViT-L) and `conditioner.embedders.1.model.*`
//! (OpenCLIP ViT-bigG with its projection). The architecture is read from the tensors
//! ([`detect`]), the engine's diffusers names are mapped onto the file's ([`names`]) and the
//! tensors are read through that map ([`weights`]), each once.

mod detect;
mod names;
mod weights;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

pub use names::{Naming, UnetLayout};
pub use weights::{NamedWeights, UnetWeightsSource, WeightsFile};

use super::config::{PredictionType, SchedulerConfig, TextEncoderConfig, UnetConfig, VaeConfig};
use super::error::Result;

/// The Stable Diffusion generation, told by the text encoder's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: OpenAI CLIP ViT-L text encoder (`cond_stage_model.transformer.*`).
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder (`cond_stage_model.model.*`).
    Sd2,
    /// SDXL: CLIP ViT-L and OpenCLIP ViT-bigG (`conditioner.embedders.{0,1}.*`), the UNet
    /// conditioned on the pooled text and the size numbers (`label_emb`).
    Sdxl,
}

impl Family {
    /// The (first) tokenizer's padding token: SD 2.x pads with `!` (id 0), SD 1.x with the
    /// end token, as SDXL's first tokenizer does (its second pads with `!`).
    pub fn pad_token(self) -> &'static str {
        match self {
            Family::Sd1 | Family::Sdxl => "<|endoftext|>",
            Family::Sd2 => "!",
        }
    }

    /// "SD 1.x", "SD 2.x" or "SDXL": what recipes and the model panel call it.
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the UNet was trained for, told by its input channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetVariant {
    /// 4 input channels.
    TextToImage,
    /// 9: latents, mask and masked-image latents.
    Inpainting,
    /// 8: latents and the photo's latents (InstructPix2Pix).
    InstructPix2Pix,
}

impl fmt::Display for UnetVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnetVariant::TextToImage => "text-to-image",
            UnetVariant::Inpainting => "in-painting",
            UnetVariant::InstructPix2Pix => "InstructPix2Pix",
        })
    }
}

/// The prediction type and why it was chosen, for one line of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PredictionChoice {
    pub prediction_type: PredictionType,
    /// Where it came from, e.g. "the file's modelspec.prediction_type".
    pub reason: String,
}

impl fmt::Display for PredictionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.prediction_type.as_str(), self.reason)
    }
}

/// A single-file checkpoint, read and checked.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub family: Family,
    pub variant: UnetVariant,
    pub prediction: PredictionChoice,
    pub unet: UnetConfig,
    pub vae: VaeConfig,
    pub text_encoder: TextEncoderConfig,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG); `None` for SD 1.x and 2.x.
    pub second_text_encoder: Option<SecondTextEncoder>,
    pub scheduler: SchedulerConfig,
    pub unet_weights: NamedWeights,
    pub vae_weights: NamedWeights,
    pub text_encoder_weights: NamedWeights,
}

/// SDXL's second text encoder as a single file holds it.
#[derive(Debug, Clone)]
pub struct SecondTextEncoder {
    pub config: TextEncoderConfig,
    /// The pooled embedding's width (`text_projection`'s output).
    pub projection_dim: usize,
    pub weights: NamedWeights,
}

impl Checkpoint {
    /// Reads the header of `path` and works out what it holds. `prediction` (the
    /// `--prediction-type` flag) wins over the file's metadata and the family's default.
    pub fn open(path: &Path, prediction: Option<PredictionType>) -> Result<Self> {
        let file = WeightsFile::open(path)?;
        let family = detect::detect_family(&file)?;
        let prediction = choose_prediction(family, &file, prediction);
        let (text_encoder, text_encoder_weights) = detect::detect_text_encoder(&file, family)?;
        let second_text_encoder = match family {
            Family::Sdxl => Some(detect::detect_second_text_encoder(&file)?),
            Family::Sd1 | Family::Sd2 => None,
        };
        let pooled_dim = second_text_encoder.as_ref().map(|s| s.projection_dim);
        let (unet, unet_weights, variant) =
            detect::detect_unet(&file, family, prediction.prediction_type, pooled_dim)?;
        let (vae, vae_weights) = detect::detect_vae(&file, detect::vae_naming(&file)?, family)?;
        let text_width = text_encoder.hidden_size
            + second_text_encoder
                .as_ref()
                .map_or(0, |s| s.config.hidden_size);
        if unet.cross_attention_dim != text_width {
            let encoders = if second_text_encoder.is_some() {
                "its two text encoders joined are"
            } else {
                "its text encoder is"
            };
            return Err(unet_weights.error(format!(
                "its UNet attends to {}-wide text but {encoders} {text_width} wide",
                unet.cross_attention_dim
            )));
        }
        let scheduler = detect::scheduler(family, prediction.prediction_type, path)?;
        Ok(Self {
            family,
            variant,
            prediction,
            unet,
            vae,
            text_encoder,
            second_text_encoder,
            scheduler,
            unet_weights,
            vae_weights,
            text_encoder_weights,
        })
    }

    /// "SD 2.x (OpenCLIP), text-to-image, v_prediction (...)": what was detected.
    pub fn describe(&self) -> String {
        describe(self.family, self.variant, &self.prediction)
    }
}

/// One line naming a model's family, variant and prediction type.
pub fn describe(family: Family, variant: UnetVariant, prediction: &PredictionChoice) -> String {
    let encoder = match family {
        Family::Sd1 => "CLIP text encoder",
        Family::Sd2 => "OpenCLIP text encoder",
        Family::Sdxl => "CLIP and OpenCLIP text encoders",
    };
    format!("{family} ({encoder}), {variant}, {prediction}")
}

/// A standalone VAE file (`--vae`), in LDM or diffusers names: its config and weights.
pub fn open_vae_file(path: &Path, family: Family) -> Result<(VaeConfig, NamedWeights)> {
    let file = WeightsFile::open(path)?;
    let naming = detect::vae_naming(&file)?;
    detect::detect_vae(&file, naming, family)
}

/// Keys of `__metadata__` that other tools write for the prediction type.
fn prediction_from_metadata(
    metadata: &HashMap<String, String>,
) -> Option<(PredictionType, String)> {
    let parse = |value: &str| match value.trim().to_ascii_lowercase().as_str() {
        "epsilon" | "eps" => Some(PredictionType::Epsilon),
        "v" | "v_prediction" | "v-prediction" | "vpred" | "v_pred" => {
            Some(PredictionType::VPrediction)
        }
        _ => None,
    };
    // The SAI model spec (kohya's sd-scripts and Stability write it).
    if let Some(found) = metadata
        .get("modelspec.prediction_type")
        .and_then(|v| parse(v))
    {
        return Some((found, "the file's modelspec.prediction_type".into()));
    }
    // kohya's training metadata.
    if let Some(value) = metadata.get("ss_v_parameterization") {
        let v = matches!(value.trim().to_ascii_lowercase().as_str(), "true" | "1");
        let found = if v {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        };
        return Some((found, "the file's ss_v_parameterization".into()));
    }
    if let Some(found) = metadata.get("prediction_type").and_then(|v| parse(v)) {
        return Some((found, "the file's prediction_type metadata".into()));
    }
    None
}

/// `--prediction-type`, else the file's metadata, else ComfyUI's `v_pred` marker tensor,
/// else the family's default: SD 2.x means the 768 px v-prediction model, as diffusers'
/// `from_single_file` and AUTOMATIC1111's `v2-inference-v.yaml` assume.
fn choose_prediction(
    family: Family,
    file: &WeightsFile,
    flag: Option<PredictionType>,
) -> PredictionChoice {
    let (prediction_type, reason) = if let Some(flag) = flag {
        (flag, "--prediction-type".to_owned())
    } else if let Some(found) = prediction_from_metadata(file.metadata()) {
        found
    } else if file.contains("v_pred") {
        (
            PredictionType::VPrediction,
            "the file's v_pred marker tensor".to_owned(),
        )
    } else {
        match family {
            Family::Sd1 => (PredictionType::Epsilon, "SD 1.x default".to_owned()),
            Family::Sdxl => (PredictionType::Epsilon, "SDXL default".to_owned()),
            Family::Sd2 => (
                PredictionType::VPrediction,
                "SD 2.x default, the 768 px model; --prediction-type epsilon for 512 px ones"
                    .to_owned(),
            ),
        }
    };
    PredictionChoice {
        prediction_type,
        reason,
    }
}
