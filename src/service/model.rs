//! Loading a model for the service: every global flag (`--model`, `--vae`,
//! `--prediction-type`, `--device`, `--precision`, `--offline`, `--lora`) in one request, read
//! the same way by the command line and the editor.

use std::path::PathBuf;

use super::error::{Result, ServiceError};
use super::identity::ModelIdentity;
use crate::engine::config::PredictionType;
use crate::engine::device::{DeviceChoice, open_device};
use crate::engine::fidelity::FidelityTable;
use crate::engine::precision::Precision;
use crate::model_files::{
    self, DownloadProgress, HubOptions, LoraChoice, ModelFiles, ModelSpec, default_memo_path,
};

/// What to load and how: the global flags, whoever reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    /// A folder, a single `.safetensors` file, a hub id or `demo`, as `--model` takes it.
    pub model: String,
    /// `--vae`: a VAE file or folder replacing the model's own.
    pub vae: Option<String>,
    /// `--prediction-type`: wins over what the model's files say.
    pub prediction_type: Option<PredictionType>,
    pub device: DeviceChoice,
    pub precision: Precision,
    /// `--lora`: applied to the weights, in order.
    pub loras: Vec<LoraChoice>,
    pub hub: HubOptions,
    /// Where file hashes are remembered between runs (hashing a 2 GB UNet takes seconds);
    /// `None` hashes every time.
    pub hash_memo: Option<PathBuf>,
}

impl ModelRequest {
    /// `model` with every other flag at its default.
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            vae: None,
            prediction_type: None,
            device: DeviceChoice::Auto,
            precision: Precision::Auto,
            loras: Vec::new(),
            hub: HubOptions::default(),
            hash_memo: default_memo_path(),
        }
    }

    /// The flags that differ from their defaults, in words, for the editor's model panel
    /// (e.g. "precision f16 · VAE vae-ft-mse.safetensors · 1 LoRA"); empty when none do.
    pub fn flags_in_effect(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if self.device != DeviceChoice::Auto {
            flags.push(format!("--device {}", self.device.as_str()));
        }
        if self.precision != Precision::Auto {
            flags.push(format!("--precision {}", self.precision.as_str()));
        }
        if let Some(vae) = &self.vae {
            flags.push(format!("--vae {vae}"));
        }
        if let Some(prediction) = self.prediction_type {
            flags.push(format!("--prediction-type {}", prediction.as_str()));
        }
        if self.hub.offline {
            flags.push("--offline".to_owned());
        }
        for lora in &self.loras {
            flags.push(format!("--lora {}:{}", lora.file_name(), lora.weight));
        }
        flags
    }
}

/// The model's files, found or downloaded (`progress` shows a download), with the `--vae`
/// and `--lora` files checked and attached. Nothing is loaded yet.
pub fn resolve_files(
    request: &ModelRequest,
    progress: &mut dyn DownloadProgress,
) -> Result<(ModelSpec, ModelFiles)> {
    // A device this build or machine lacks is refused before anything downloads.
    open_device(request.device)?;
    for lora in &request.loras {
        if !lora.path.is_file() {
            return Err(ServiceError::Invalid(format!(
                "--lora {}: there is no such file",
                lora.path.display()
            )));
        }
    }
    let vae = request
        .vae
        .as_deref()
        .map(model_files::parse_vae_arg)
        .transpose()?;
    let spec = model_files::parse_model_arg(&request.model)?;
    let files = ModelFiles {
        loras: request.loras.clone(),
        vae_replacement: vae,
        ..model_files::resolve(&spec, &request.hub, progress)?
    };
    Ok((spec, files))
}

/// What was loaded, for the command line's lines and the editor's model panel.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    pub identity: ModelIdentity,
    /// Where the files came from, in words.
    pub source: String,
    /// The device it runs on, e.g. "cpu" or "cuda:0".
    pub device: String,
    /// The compute precision ("f32", "f16", "bf16").
    pub precision: &'static str,
    /// What the UNet predicts ("epsilon", "v_prediction").
    pub prediction_type: &'static str,
    /// Family, variant, prediction type and why, in one line.
    pub description: String,
    /// "SD 1.x", "SD 2.x" or "SDXL" (recipes name it).
    pub architecture: &'static str,
    /// An InstructPix2Pix model: edits are instructions, without fine-tuning.
    pub instruct: bool,
    /// What the fidelity slider means for this model.
    pub fidelity_table: &'static FidelityTable,
    /// How many UNet and text-encoder weights the LoRAs changed.
    pub lora_changes: (usize, usize),
}
