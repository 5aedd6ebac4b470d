//! What a user should know before downloading a model: its license and its size.

use super::spec::{DEFAULT_MODEL, ModelSpec};

/// The download size of the default model's fp16 files (UNet 1.72 GB, text encoder 0.25 GB,
/// VAE 0.17 GB, plus small configs), for the editor's "Download (about 2.1 GB)". The hub's
/// file list carries no sizes, so other models' sizes are known only as files start.
pub const DEFAULT_MODEL_DOWNLOAD_BYTES: u64 = 2_140_000_000;

/// The license a user accepts by downloading this model, when we know it.
pub fn license_notice(spec: &ModelSpec) -> Option<&'static str> {
    match spec {
        ModelSpec::Hub { repo_id, .. } if repo_id == DEFAULT_MODEL => Some(include_str!(
            "../../assets/notices/stable-diffusion-v1-5.txt"
        )),
        ModelSpec::Hub { .. } => Some(
            "This model comes with its own license; read its model card on the hub before use.\n",
        ),
        ModelSpec::Folder(_) | ModelSpec::Demo => None,
    }
}

/// About how many bytes downloading `spec` takes, when known in advance.
pub fn approximate_download_bytes(spec: &ModelSpec) -> Option<u64> {
    match spec {
        ModelSpec::Hub { repo_id, .. } if repo_id == DEFAULT_MODEL => {
            Some(DEFAULT_MODEL_DOWNLOAD_BYTES)
        }
        _ => None,
    }
}
