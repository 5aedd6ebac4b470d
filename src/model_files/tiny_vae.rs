//! The tiny autoencoder that previews the denoising (madebyollin/taesd, for SD 1.x and 2.x):
//! two files of a hub repo, found and downloaded like a model's.

use std::path::PathBuf;

use super::error::ModelFilesError;
use super::hub::{HubOptions, resolve_repo_files};
use super::progress::DownloadProgress;
use super::spec::DEFAULT_REVISION;

/// The hub repo of the tiny VAE (diffusers' `AutoencoderTiny` layout, about 10 MB).
pub const TINY_VAE_REPO: &str = "madebyollin/taesd";

const CONFIG: &str = "config.json";
const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// The tiny VAE's files on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyVaeFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
}

/// The tiny VAE from the Hugging Face cache, downloaded first unless offline.
pub fn resolve_tiny_vae(
    opts: &HubOptions,
    progress: &mut dyn DownloadProgress,
) -> Result<TinyVaeFiles, ModelFilesError> {
    let paths = resolve_repo_files(
        TINY_VAE_REPO,
        DEFAULT_REVISION,
        &[CONFIG, WEIGHTS],
        opts,
        progress,
    )?;
    // One path per file asked for, in that order.
    let mut paths = paths.into_iter();
    match (paths.next(), paths.next()) {
        (Some(config), Some(weights)) => Ok(TinyVaeFiles { config, weights }),
        _ => Err(ModelFilesError::FileNotInRepo {
            repo_id: TINY_VAE_REPO.to_owned(),
            revision: DEFAULT_REVISION.to_owned(),
            file: WEIGHTS.to_owned(),
        }),
    }
}
