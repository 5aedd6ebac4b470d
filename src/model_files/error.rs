//! The one error type of this module: each variant reads as a sentence that says what went
//! wrong and what to do.

use std::path::PathBuf;

use super::layout::required_files;
use super::spec::DEFAULT_MODEL;

/// Why a model's files could not be found, checked or downloaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelFilesError {
    /// The `--model` argument is neither an existing path nor a hub id.
    #[error(
        "'{arg}' is not a usable model: {reason}. Pass a diffusers model folder or a single-file \
         .safetensors checkpoint (an absolute path, or one starting with ./, ../ or ~/), or a Hugging Face id of the form \
         owner/name or owner/name@revision, such as {DEFAULT_MODEL}."
    )]
    InvalidModelArg { arg: String, reason: String },

    /// A path was given that does not exist.
    #[error(
        "the model {} does not exist. Pass a folder holding a diffusers model (with unet/, \
         vae/, text_encoder/, tokenizer/ and scheduler/), a single-file .safetensors \
         checkpoint, or a Hugging Face id such as {DEFAULT_MODEL}.",
        path.display()
    )]
    FolderNotFound { path: PathBuf },

    /// `--model demo`, but the demo model's folder is not where unitune looks for it.
    #[error(
        "the demo model is not on this machine (looked in {}); set UNITUNE_DEMO_MODEL to its \
         folder (assets/demo-model in unitune's source)",
        looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    DemoModelMissing { looked: Vec<PathBuf> },

    /// A path was given that is a file, but not a checkpoint file.
    #[error(
        "{} is neither a model folder nor a .safetensors checkpoint. Pass the folder that \
         holds unet/, vae/, text_encoder/, tokenizer/ and scheduler/, or a single-file \
         .safetensors checkpoint.",
        path.display()
    )]
    NotAFolder { path: PathBuf },

    /// A folder without unet/ that holds single-file checkpoints.
    #[error(
        "{} holds a single-file checkpoint but no diffusers model; pass the file itself \
         (--model {}).",
        folder.display(),
        checkpoint.display()
    )]
    CheckpointInFolder {
        folder: PathBuf,
        checkpoint: PathBuf,
    },

    /// A pickle checkpoint (`*.ckpt`, `*.pt`, `*.bin`, `*.pth`) was given.
    #[error(
        "{} is a pickle file, which can run arbitrary code when it is loaded, so unitune only \
         loads .safetensors; download the model's .safetensors version or convert it (e.g. \
         with diffusers' `StableDiffusionPipeline.from_single_file`).",
        path.display()
    )]
    PickleCheckpoint { path: PathBuf },

    /// The `--vae` path does not exist.
    #[error(
        "the VAE {} does not exist; pass a VAE .safetensors file or a diffusers vae/ folder.",
        path.display()
    )]
    VaeNotFound { path: PathBuf },

    /// A config or tokenizer file the engine needs is absent.
    #[error(
        "{location} has no {file}, so it is not a complete diffusers-format Stable Diffusion \
         model."
    )]
    MissingFile { location: String, file: String },

    /// A component has no weights file in any form unitune knows.
    #[error("{location} has no {component} weights: looked for {looked_for}{found}.")]
    MissingWeights {
        location: String,
        component: String,
        looked_for: String,
        /// Empty, or a clause naming the other weights-like files that are there.
        found: String,
    },

    /// A component has weights only as pickle files.
    #[error(
        "{location} has {component} weights only as pickle files ({files}). Pickle files can \
         run arbitrary code when they are loaded, so unitune only loads .safetensors. Convert \
         the model with diffusers (`DiffusionPipeline.from_pretrained(folder)\
         .save_pretrained(folder, safe_serialization=True)`) or download its safetensors \
         version."
    )]
    PickleOnly {
        location: String,
        component: String,
        files: String,
    },

    /// The hub answered 404 for the repo or revision.
    #[error(
        "the model {repo_id} (revision {revision}) was not found on {endpoint} (HTTP 404). \
         Check the id and the revision; for a local folder, start its path with ./ or give \
         it in full."
    )]
    RepoNotFound {
        repo_id: String,
        revision: String,
        endpoint: String,
    },

    /// The hub answered 401 or 403: missing repo (hidden as 401), private or gated.
    #[error(
        "{endpoint} refused access to {repo_id} (HTTP {status}): the repo does not exist, or \
         it is private or gated. Check the id; for a gated model, accept its licence at \
         {endpoint}/{repo_id} while logged in, then set HF_TOKEN (or run `hf auth login`) \
         with a token of that account."
    )]
    AccessDenied {
        repo_id: String,
        endpoint: String,
        status: u16,
    },

    /// Offline or the hub unreachable, and the cache does not hold the model.
    #[error(
        "{cause}, and {repo_id} (revision {revision}) is not complete in the Hugging Face \
         cache: looked in {} for {} ({detail}). Download it once while online, or pass a \
         diffusers folder with --model.",
        repo_cache_dir.display(),
        required_files().join(", ")
    )]
    NotCached {
        /// Why the hub was not asked: offline, or the error that reaching it gave.
        cause: String,
        repo_id: String,
        revision: String,
        /// The repo's folder in the cache (`.../hub/models--owner--name`).
        repo_cache_dir: PathBuf,
        /// What was missing there (the files looked for are in the message).
        detail: String,
    },

    /// Offline or the hub unreachable, and the cache lacks some of a small repo's files
    /// (the tiny VAE of the previews).
    #[error(
        "{cause}, and {repo} is not in the Hugging Face cache: looked in {} for {files} \
         ({detail}). Download it once while online.",
        repo_cache_dir.display()
    )]
    FilesNotCached {
        cause: String,
        /// `owner/name (revision R)`.
        repo: String,
        repo_cache_dir: PathBuf,
        /// The files looked for, comma-separated.
        files: String,
        detail: String,
    },

    /// A small repo's file list lacks a file that is needed.
    #[error("the hub repo {repo_id} (revision {revision}) has no {file}.")]
    FileNotInRepo {
        repo_id: String,
        revision: String,
        file: String,
    },

    /// A download started but did not finish.
    #[error(
        "downloading {file} of {repo_id} failed: {detail}. Check the network and run again; \
         finished files stay in the cache and a partial one resumes."
    )]
    Download {
        repo_id: String,
        file: String,
        detail: String,
    },

    /// The endpoint answered something that is not the Hugging Face hub's API.
    #[error(
        "{endpoint} gave an answer unitune cannot use ({detail}). Check HF_ENDPOINT, or \
         unset it to use https://huggingface.co."
    )]
    HubResponse { endpoint: String, detail: String },

    /// No cache folder could be chosen (no home folder and no HF_HUB_CACHE / HF_HOME).
    #[error(
        "cannot tell where the Hugging Face cache is: there is no home folder. Set \
         HF_HUB_CACHE or HF_HOME, or pass a diffusers folder with --model."
    )]
    NoCacheDir,

    /// Reading or writing the local file system failed.
    #[error("cannot read or write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The caller's progress observer asked to stop.
    #[error("the model download was cancelled; files finished so far stay in the cache")]
    Cancelled,
}

impl ModelFilesError {
    /// Whether the user gave something unusable (a bad or missing folder, pickle-only
    /// weights, a wrong or inaccessible id): exit code 2. Network, disk and cancellation
    /// are not: exit code 1.
    pub fn is_invalid_input(&self) -> bool {
        match self {
            Self::InvalidModelArg { .. }
            | Self::FolderNotFound { .. }
            | Self::NotAFolder { .. }
            | Self::CheckpointInFolder { .. }
            | Self::PickleCheckpoint { .. }
            | Self::VaeNotFound { .. }
            | Self::MissingFile { .. }
            | Self::MissingWeights { .. }
            | Self::PickleOnly { .. }
            | Self::RepoNotFound { .. }
            | Self::AccessDenied { .. }
            | Self::FileNotInRepo { .. } => true,
            Self::NotCached { .. }
            | Self::FilesNotCached { .. }
            | Self::Download { .. }
            | Self::HubResponse { .. }
            | Self::NoCacheDir
            | Self::DemoModelMissing { .. }
            | Self::Io { .. }
            | Self::Cancelled => false,
        }
    }
}
