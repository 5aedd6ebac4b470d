//! How a loaded model is named where others can see it (recipes in shared PNGs, LoRA
//! metadata): by a name and a content hash, never by where it sits on this machine.
//!
//! - a folder by its own name (`my-sd15`), a single file by its name without `.safetensors`
//!   (as AUTOMATIC1111 shows checkpoints), a hub model by its id, the demo model as `demo`;
//! - `hash`: for a single file the first 10 hex digits of its SHA-256, which is
//!   AUTOMATIC1111's, Forge's and civitai's "AutoV2" (so they recognise the checkpoint); for a
//!   folder the first 10 of the base model's fingerprint;
//! - `fingerprint`: the SHA-256 of every file that made the weights, the `--vae` and the
//!   LoRAs included (see `model_files::fingerprint`): what the snapshot cache is keyed by.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::config::PredictionType;
use crate::model_files::{ModelFiles, ModelFilesError, ModelSource, ModelSpec, VaeFiles};
use crate::recipe::LoraRecipe;

/// How many hex digits of a hash AUTOMATIC1111 shows as `Model hash` (its AutoV2).
pub const SHORT_HASH_DIGITS: usize = 10;

/// A loaded model's public names (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// A folder's or file's name, a hub id, or `demo`: never a path.
    pub name: String,
    /// The commit a hub model was resolved to; `None` for local files.
    pub revision: Option<String>,
    /// AUTOMATIC1111's `Model hash` (see the module docs).
    pub hash: String,
    /// SHA-256 of everything that made the weights, VAE and LoRAs included.
    pub fingerprint: String,
    /// The replacement VAE's file or folder name (`--vae`), when one was given.
    pub vae: Option<String>,
    /// The LoRAs applied to the base model, in order.
    pub loras: Vec<LoraRecipe>,
    /// `--prediction-type`, when it overrode what the model says.
    pub prediction_override: Option<String>,
}

impl ModelIdentity {
    /// Names `files` as loaded from `spec`. `memo` remembers file hashes between runs.
    pub fn of(
        spec: &ModelSpec,
        files: &ModelFiles,
        prediction_override: Option<PredictionType>,
        memo: Option<&Path>,
    ) -> Result<Self, ModelFilesError> {
        let fingerprint = files.fingerprint(memo)?;
        let base = ModelFiles {
            loras: Vec::new(),
            vae_replacement: None,
            ..files.clone()
        };
        let hash = match files.checkpoint_sha256(memo)? {
            Some(sha256) => sha256,
            None => base.fingerprint(memo)?,
        };
        let loras = files
            .loras
            .iter()
            .zip(files.lora_hashes(memo)?)
            .map(|(choice, hash)| LoraRecipe {
                file: choice.file_name(),
                hash,
                weight: choice.weight,
            })
            .collect();
        let revision = match &files.source {
            ModelSource::HubCache { commit, .. } | ModelSource::Downloaded { commit, .. } => {
                Some(commit.clone())
            }
            ModelSource::LocalFolder | ModelSource::Demo => None,
        };
        Ok(Self {
            name: public_name(spec),
            revision,
            hash: hash.chars().take(SHORT_HASH_DIGITS).collect(),
            fingerprint,
            vae: files.vae_replacement.as_ref().map(vae_name),
            loras,
            prediction_override: prediction_override.map(|p| p.as_str().to_owned()),
        })
    }

    /// What the snapshot cache is keyed by: the weights, and the target they are trained
    /// towards (the same weights told to predict something else make other snapshots).
    pub fn cache_identity(&self) -> String {
        match &self.prediction_override {
            Some(prediction) => format!("{}+prediction={prediction}", self.fingerprint),
            None => self.fingerprint.clone(),
        }
    }
}

/// A model's name without where it is: the last part of a path (a file without its
/// `.safetensors`), or the hub id, or `demo`.
pub fn public_name(spec: &ModelSpec) -> String {
    match spec {
        ModelSpec::Folder(path) => file_name_of(path, true),
        ModelSpec::Hub { repo_id, .. } => repo_id.clone(),
        ModelSpec::Demo => spec.to_string(),
    }
}

fn vae_name(vae: &VaeFiles) -> String {
    match vae {
        VaeFiles::File { weights } => file_name_of(weights, false),
        // `weights` is `<folder>/diffusion_pytorch_model.safetensors`: the folder names it.
        VaeFiles::Folder { weights, .. } => weights
            .parent()
            .map_or_else(|| file_name_of(weights, false), |p| file_name_of(p, false)),
    }
}

/// The last component of `path` (made absolute first, so `.` and `..` name a real folder),
/// without `.safetensors` when `strip_extension`.
fn file_name_of(path: &Path, strip_extension: bool) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    // `..` is resolved by hand: canonicalizing would also follow links, and a linked folder
    // is named as the user named it.
    let mut normal = std::path::PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    let name = normal
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    match name.strip_suffix(".safetensors") {
        Some(stem) if strip_extension => stem.to_owned(),
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn public_names_hold_no_folders() {
        let folder = ModelSpec::Folder(PathBuf::from("/home/someone/models/my-sd15"));
        assert_eq!(public_name(&folder), "my-sd15");
        let file = ModelSpec::Folder(PathBuf::from("/home/someone/v1-5-pruned.safetensors"));
        assert_eq!(public_name(&file), "v1-5-pruned");
        let trailing = ModelSpec::Folder(PathBuf::from("./tests/fixtures/models/sd15-tiny/"));
        assert_eq!(public_name(&trailing), "sd15-tiny");
        let up = ModelSpec::Folder(PathBuf::from("/m/a/b/.."));
        assert_eq!(public_name(&up), "a");
        assert_eq!(public_name(&ModelSpec::hub("o/n")), "o/n");
        assert_eq!(public_name(&ModelSpec::Demo), "demo");
    }
}
