//! Full-size Stable Diffusion with random weights, from the built-in architecture configs in
//! `assets/arch/`: what `unitune bench` measures. Compute time and memory do not depend on
//! the weights' values, so this stands in for the real model wherever quality is not the
//! question, with no download. Weights follow PyTorch's default initialisation (as diffusers'
//! randomly initialised models do), so activations keep realistic magnitudes in f16.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

use super::config::{TextEncoderConfig, UnetConfig, VaeConfig, projection_dim};
use super::error::{EngineError, Result};
use super::text_encoder::TextEncoder;
use super::unet::UNet;
use super::vae::Vae;
use crate::model_files::{BUNDLED_MERGES, BUNDLED_TOKENIZER, BUNDLED_VOCAB};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Architecture {
    /// Stable Diffusion 1.5: 860 M UNet parameters, CLIP ViT-L text encoder, 512 px.
    #[default]
    Sd15,
    /// Stable Diffusion 2.1: linear projections, OpenCLIP ViT-H text encoder, 768 px,
    /// v-prediction.
    Sd21,
    /// Stable Diffusion XL base 1.0: 2.6 B UNet parameters, CLIP ViT-L and OpenCLIP ViT-bigG
    /// text encoders, 1024 px.
    Sdxl,
}

struct ArchFiles {
    unet: &'static str,
    vae: &'static str,
    text_encoder: &'static str,
    /// SDXL's second text encoder (with its projection).
    text_encoder_2: Option<&'static str>,
    scheduler: &'static str,
    model_index: Option<&'static str>,
}

const SD15: ArchFiles = ArchFiles {
    unet: include_str!("../../assets/arch/sd15/unet.json"),
    vae: include_str!("../../assets/arch/sd15/vae.json"),
    text_encoder: include_str!("../../assets/arch/sd15/text_encoder.json"),
    text_encoder_2: None,
    scheduler: include_str!("../../assets/arch/sd15/scheduler.json"),
    model_index: None,
};

const SD21: ArchFiles = ArchFiles {
    unet: include_str!("../../assets/arch/sd21/unet.json"),
    vae: include_str!("../../assets/arch/sd21/vae.json"),
    text_encoder: include_str!("../../assets/arch/sd21/text_encoder.json"),
    text_encoder_2: None,
    scheduler: include_str!("../../assets/arch/sd21/scheduler.json"),
    model_index: None,
};

const SDXL: ArchFiles = ArchFiles {
    unet: include_str!("../../assets/arch/sdxl/unet.json"),
    vae: include_str!("../../assets/arch/sdxl/vae.json"),
    text_encoder: include_str!("../../assets/arch/sdxl/text_encoder.json"),
    text_encoder_2: Some(include_str!("../../assets/arch/sdxl/text_encoder_2.json")),
    scheduler: include_str!("../../assets/arch/sdxl/scheduler.json"),
    model_index: Some(include_str!("../../assets/arch/sdxl/model_index.json")),
};

/// `tokenizer_2`'s special tokens: the bundled vocabulary, padded with `!` as OpenCLIP is.
const SECOND_TOKENIZER_SPECIAL: &str = r#"{"pad_token": "!"}"#;

/// Written last: a folder without it is incomplete and is rebuilt.
const COMPLETE_MARKER: &str = "unitune-random-model";

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sd15 => "sd15",
            Self::Sd21 => "sd21",
            Self::Sdxl => "sdxl",
        }
    }

    fn files(self) -> &'static ArchFiles {
        match self {
            Self::Sd15 => &SD15,
            Self::Sd21 => &SD21,
            Self::Sdxl => &SDXL,
        }
    }

    /// The image side the model was trained at.
    pub fn native_side(self) -> usize {
        match self {
            Self::Sd15 => 512,
            Self::Sd21 => 768,
            Self::Sdxl => 1024,
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Architecture {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "sd15" | "sd1.5" => Ok(Self::Sd15),
            "sd21" | "sd2.1" => Ok(Self::Sd21),
            "sdxl" => Ok(Self::Sdxl),
            other => Err(format!(
                "unknown architecture `{other}` (use sd15, sd21 or sdxl)"
            )),
        }
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::Cache(format!("cannot write to {}: {e}", path.display()))
}

/// A diffusers folder for `arch` with random f16 weights in `dir`: the one already there if it
/// is complete, else written anew (about 2 GB for SD 1.5, a minute on a CPU; about 7 GB for
/// SDXL).
pub fn ensure_random_model(arch: Architecture, dir: &Path) -> Result<PathBuf> {
    let marker = dir.join(COMPLETE_MARKER);
    if marker.exists() {
        return Ok(dir.to_path_buf());
    }
    let files = arch.files();
    let write = |relative: &str, bytes: &[u8]| -> Result<PathBuf> {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        std::fs::write(&path, bytes).map_err(io_error(&path))?;
        Ok(path)
    };
    let unet_config = write("unet/config.json", files.unet.as_bytes())?;
    let vae_config = write("vae/config.json", files.vae.as_bytes())?;
    let text_config = write("text_encoder/config.json", files.text_encoder.as_bytes())?;
    write(
        "scheduler/scheduler_config.json",
        files.scheduler.as_bytes(),
    )?;
    for (name, bytes) in BUNDLED_TOKENIZER {
        write(&format!("tokenizer/{name}"), bytes)?;
    }
    if let Some(index) = files.model_index {
        write("model_index.json", index.as_bytes())?;
    }
    let text_config_2 = match files.text_encoder_2 {
        Some(config) => {
            write("tokenizer_2/vocab.json", BUNDLED_VOCAB)?;
            write("tokenizer_2/merges.txt", BUNDLED_MERGES)?;
            write(
                "tokenizer_2/special_tokens_map.json",
                SECOND_TOKENIZER_SPECIAL.as_bytes(),
            )?;
            Some(write("text_encoder_2/config.json", config.as_bytes())?)
        }
        None => None,
    };

    // Each component is built by the engine's own constructors on a VarMap, which creates
    // every tensor they ask for with the initialisation they name, then saved as diffusers
    // names it.
    let save =
        |relative: &str, build: &dyn Fn(VarBuilder) -> candle_core::Result<()>| -> Result<()> {
            let varmap = VarMap::new();
            build(VarBuilder::from_varmap(&varmap, DType::F16, &Device::Cpu))?;
            let path = dir.join(relative);
            varmap
                .save(&path)
                .map_err(|e| EngineError::Cache(format!("cannot write {}: {e}", path.display())))
        };
    let unet = UnetConfig::load(&unet_config)?;
    save("unet/diffusion_pytorch_model.safetensors", &|vb| {
        UNet::new(&unet, vb).map(drop)
    })?;
    let vae = VaeConfig::load(&vae_config)?;
    save("vae/diffusion_pytorch_model.safetensors", &|vb| {
        Vae::new(&vae, vb).map(drop)
    })?;
    let text = TextEncoderConfig::load(&text_config)?;
    save("text_encoder/model.safetensors", &|vb| {
        TextEncoder::new(&text, vb).map(drop)
    })?;
    if let Some(config) = text_config_2 {
        let text_2 = TextEncoderConfig::load(&config)?;
        let projection = projection_dim(&config)?.unwrap_or(text_2.hidden_size);
        save("text_encoder_2/model.safetensors", &|vb| {
            TextEncoder::with_projection(&text_2, projection, vb).map(drop)
        })?;
    }
    std::fs::write(&marker, arch.as_str()).map_err(io_error(&marker))?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::SchedulerConfig;

    /// Every built-in architecture's configs parse and fit together (what loading the random
    /// model would check, without writing its gigabytes): SDXL's context is both encoders'
    /// widths joined and its added embedding takes the second's projection and six size
    /// numbers.
    #[test]
    fn every_architecture_is_consistent() {
        let here = Path::new("assets/arch");
        for arch in [Architecture::Sd15, Architecture::Sd21, Architecture::Sdxl] {
            let files = arch.files();
            let unet = UnetConfig::from_json(files.unet, here).unwrap();
            let vae = VaeConfig::from_json(files.vae, here).unwrap();
            let text = TextEncoderConfig::from_json(files.text_encoder, here).unwrap();
            SchedulerConfig::from_json(files.scheduler, here).unwrap();
            assert_eq!(arch.as_str().parse::<Architecture>(), Ok(arch));
            let side = unet.sample_size.unwrap() * vae.downscale_factor();
            assert_eq!(side, arch.native_side(), "{arch}");
            match files.text_encoder_2 {
                None => assert_eq!(unet.cross_attention_dim, text.hidden_size, "{arch}"),
                Some(second) => {
                    let second_config = TextEncoderConfig::from_json(second, here).unwrap();
                    assert_eq!(
                        unet.cross_attention_dim,
                        text.hidden_size + second_config.hidden_size
                    );
                    let raw: serde_json::Value = serde_json::from_str(second).unwrap();
                    let projection = raw["projection_dim"].as_u64().unwrap() as usize;
                    assert_eq!(unet.text_time.unwrap().pooled_dim(), projection);
                    assert_eq!(vae.scaling_factor, 0.13025);
                }
            }
        }
    }
}
