//! The command line, as clap parses it. `unitune --help` is generated from these comments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::device::DeviceChoice;
use crate::model_files::DEFAULT_MODEL;

#[derive(Debug, Parser)]
#[command(
    name = "unitune",
    version = crate::build_info::VERSION,
    about = "Edit a photo by typing what it should become (UniTune on Stable Diffusion).",
    long_about = "Edit a photo by typing what it should become (UniTune on Stable Diffusion).\n\n\
Models are diffusers-format folders (unet/, vae/, text_encoder/, tokenizer/, scheduler/) with \
.safetensors weights, or Hugging Face hub ids, which are looked up in the standard Hugging Face \
cache first and downloaded otherwise.\n\n\
Exit codes: 0 success, 2 invalid input or usage, 1 any other failure."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOptions,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalOptions {
    /// Model: a diffusers folder (absolute, ./ or ../ path) or a Hugging Face hub id
    /// (owner/name, optionally @revision).
    #[arg(long, global = true, value_name = "M", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Where to compute: auto picks CUDA, then Metal, then the CPU.
    #[arg(long, global = true, value_name = "D", default_value = "auto")]
    pub device: DeviceChoice,

    /// Never contact the hub; use only local folders and the Hugging Face cache.
    #[arg(long, global = true)]
    pub offline: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make an image from a prompt alone (text-to-image).
    Generate(GenerateArgs),
    /// Edit a photo by text. Without fine-tuning (--tune-steps 0) this is SDEdit.
    Edit(EditArgs),
}

/// Options shared by every command that samples.
#[derive(Debug, Clone, Args)]
pub struct SamplingOptions {
    /// Random seed; the same seed and inputs give the same image. Random when omitted (and
    /// printed).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Denoising steps (DDIM).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub sampling_steps: usize,

    /// Classifier-free guidance weight: how strongly to follow the prompt (1 = off).
    #[arg(long, value_name = "W", default_value_t = 7.5)]
    pub guidance: f64,

    /// Output file (.png, .jpg or .webp). Default: `unitune-SEED.png` or `PHOTO-edit.png` in
    /// the current folder, numbered so that it never overwrites anything.
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Replace --out if it already exists (otherwise an existing file is refused).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What the image should show.
    #[arg(long, short, value_name = "TEXT")]
    pub prompt: String,

    /// Image size WxH in pixels, multiples of 64. Default: the model's native size.
    #[arg(long, value_name = "WxH")]
    pub size: Option<String>,

    #[command(flatten)]
    pub sampling: SamplingOptions,
}

#[derive(Debug, Args)]
pub struct EditArgs {
    /// The photo to edit (PNG, JPEG, WebP or GIF).
    pub image: PathBuf,

    /// What the photo should become, e.g. "a cat wearing sunglasses".
    #[arg(long, short, value_name = "TEXT")]
    pub prompt: String,

    /// Fine-tuning steps on the photo before editing. Only 0 (plain SDEdit, the paper's
    /// baseline) is available in this version.
    #[arg(long, value_name = "N")]
    pub tune_steps: usize,

    /// SDEdit start in [0, 1]: how far up the noise schedule the photo is pushed before
    /// denoising. 0 returns the photo, 1 ignores it.
    #[arg(long, value_name = "F", default_value_t = 0.6)]
    pub t0: f64,

    /// Working size WxH (multiples of 64). Default: the model's native area at the photo's
    /// aspect ratio. The result always comes back at the photo's own size.
    #[arg(long, value_name = "WxH")]
    pub size: Option<String>,

    #[command(flatten)]
    pub sampling: SamplingOptions,
}
