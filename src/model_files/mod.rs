//! Where a model's files come from: a local diffusers folder, the Hugging Face cache, or a
//! download from the hub into that cache.
//!
//! The one entry point is [`resolve`]: it takes a [`ModelSpec`] (from [`parse_model_arg`]) and
//! returns [`ModelFiles`], the paths of every file the engine reads. Nothing here loads a
//! tensor; the engine opens the paths it is given.
//!
//! - A folder is checked for the diffusers layout ([`locate_in_folder`]): one config and one
//!   `.safetensors` weights file per component, the CLIP tokenizer files and the scheduler
//!   config. Pickle weights (`.bin`, `.ckpt`, `.pt`, `.pth`) are refused: loading them can run
//!   arbitrary code.
//! - A `.safetensors` file is a single-file checkpoint in the original LDM layout (what
//!   AUTOMATIC1111 and ComfyUI keep); the engine reads its architecture from its tensors.
//!   Pickle checkpoints are refused.
//! - A hub id is looked up in the local Hugging Face cache first (no network call, so it works
//!   offline). On a miss, unless offline, the repo's file list is fetched and only the needed
//!   files are downloaded (the `.fp16.safetensors` weights when the repo has them) into the
//!   same cache layout Python's `huggingface_hub` uses, so both share one copy.

mod bundled;
mod demo;
mod error;
mod fingerprint;
mod hub;
mod layout;
mod lora;
mod notice;
mod progress;
mod spec;
mod tiny_vae;

pub use bundled::{BUNDLED_MERGES, BUNDLED_TOKENIZER, BUNDLED_VOCAB};
pub use demo::demo_model_dir;
pub use error::ModelFilesError;
pub use fingerprint::default_memo_path;
pub use hub::{HubOptions, default_cache_dir, repo_cache_dir, resolve, resolve_repo_files};
pub use layout::{
    DiffusersFiles, ModelFiles, ModelLayout, ModelSource, SecondTextFiles, VaeFiles,
    WeightsPreference, locate_in_folder, locate_in_folder_with, locate_vae,
};
pub use lora::LoraChoice;
pub use notice::{
    DEFAULT_MODEL_DOWNLOAD_BYTES, SDXL_MODEL, SDXL_MODEL_DOWNLOAD_BYTES, SDXL_SUGGESTED_GPU_BYTES,
    approximate_download_bytes, license_notice, suggests_sdxl,
};
pub use progress::{DownloadProgress, NoProgress, TerminalProgress};
pub use spec::{
    DEFAULT_MODEL, DEFAULT_REVISION, DEMO_MODEL, ModelSpec, parse_model_arg, parse_vae_arg,
};
pub use tiny_vae::{TINY_VAE_REPO, TinyVaeFiles, resolve_tiny_vae};
