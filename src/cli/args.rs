//! The command line, as clap parses it. `unitune --help` is generated from these comments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::config::PredictionType;
use crate::engine::device::DeviceChoice;
use crate::engine::precision::Precision;
use crate::engine::preview::PreviewMode;
use crate::engine::random_model::Architecture;
use crate::model_files::DEFAULT_MODEL;

#[derive(Debug, Parser)]
#[command(
    name = "unitune",
    version = concat!(env!("CARGO_PKG_VERSION"), " (rev ", env!("UNITUNE_GIT_REVISION"), ", ", env!("UNITUNE_BUILD_PROFILE"), ")"),
    about = "Edit a photo by typing what it should become (UniTune on Stable Diffusion).",
    long_about = "Edit a photo by typing what it should become (UniTune on Stable Diffusion).\n\n\
Models are diffusers-format folders (unet/, vae/, text_encoder/, tokenizer/, scheduler/) with \
.safetensors weights, single-file .safetensors checkpoints (SD 1.x/2.x and SDXL, as AUTOMATIC1111 \
and ComfyUI keep them), or Hugging Face hub ids, which are looked up in the standard Hugging Face \
cache first and downloaded otherwise.\n\n\
SDXL works at 1024 px and needs a GPU to be practical: in half precision a whole fine-tune \
peaks at about 8.5 GB with --train lora, 9.6 GB with cross-kv (a 12 GB card) and 13.7 GB with \
full; on a CPU one fine-tuning step takes about 11 minutes on 2 cores.\n\n\
Exit codes: 0 success, 2 invalid input or usage, 1 any other failure."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOptions,
    /// Without a command: open the editor, with this photo when given.
    #[arg(value_name = "PHOTO")]
    pub photo: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<CliCommand>,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalOptions {
    /// Model: a diffusers folder or a single-file .safetensors checkpoint (absolute, ./, ../
    /// or ~/ path), or a Hugging Face hub id (owner/name, optionally @revision).
    #[arg(long, global = true, value_name = "M", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Replace the model's VAE: a VAE .safetensors file (LDM or diffusers names) or a
    /// diffusers vae/ folder (or a folder holding one).
    #[arg(long, global = true, value_name = "FILE_OR_FOLDER")]
    pub vae: Option<String>,

    /// What the UNet predicts, when the model cannot say: a single file's metadata is read,
    /// else SD 1.x means epsilon and SD 2.x v_prediction (the 768 px model).
    #[arg(long, global = true, value_name = "P")]
    pub prediction_type: Option<PredictionArg>,

    /// Where to compute: auto picks CUDA, then Metal, then the CPU.
    #[arg(long, global = true, value_name = "D", default_value = "auto")]
    pub device: DeviceChoice,

    /// Number format: auto (bf16 on recent NVIDIA cards, f16 on older ones and on Macs, f32 on
    /// the CPU), f32, f16 or bf16. Half precision halves the memory; norms, softmax and the
    /// optimizer's master weights stay in f32 whatever is chosen.
    /// (Default auto; the editor then keeps the one chosen in its Advanced section.)
    #[arg(long, global = true, value_name = "P")]
    pub precision: Option<Precision>,

    /// Never contact the hub; use only local folders and the Hugging Face cache.
    #[arg(long, global = true)]
    pub offline: bool,

    /// Apply a LoRA (kohya-format .safetensors, as AUTOMATIC1111, ComfyUI and diffusers use)
    /// to the model before fine-tuning and sampling; WEIGHT scales it (default 1). Repeat for
    /// several, applied in order.
    #[arg(long = "lora", global = true, value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<String>,
}

/// `--prediction-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PredictionArg {
    Epsilon,
    #[value(name = "v_prediction", alias = "v")]
    VPrediction,
}

impl From<PredictionArg> for PredictionType {
    fn from(arg: PredictionArg) -> Self {
        match arg {
            PredictionArg::Epsilon => PredictionType::Epsilon,
            PredictionArg::VPrediction => PredictionType::VPrediction,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Make an image from a prompt alone (text-to-image).
    Generate(GenerateArgs),
    /// Fine-tune the model on a photo and keep the snapshots (editing reuses them).
    Tune(TuneArgs),
    /// Edit a photo by text: fine-tunes on it first unless cached snapshots exist.
    Edit(Box<EditArgs>),
    /// The paper's figure 10: one fine-tuning run, columns = snapshots, rows = t0 values.
    Grid(GridArgs),
    /// Write a photo's cached fine-tune (trained with --train lora) as a LoRA file for
    /// AUTOMATIC1111, ComfyUI and diffusers, without training again: give the photo and the
    /// options of the `tune` or `edit` that made it.
    ExportLora(ExportLoraArgs),
    /// List the snapshot cache (fine-tunes kept so that editing a photo again never
    /// retrains), remove one entry, or clear it.
    Cache(CacheArgs),
    /// Measure speed and peak memory at full size (random weights, no download) and print
    /// JSON; `benches/diffusers/` prints the same measurements from diffusers.
    Bench(BenchArgs),
    /// The edit-quality benchmark on the demo world (use with --model demo): every method and
    /// setting edits the same scenes; prints success and fidelity, writes JSON and a plot.
    Eval(EvalArgs),
    /// Write the demo world's training set (scenes, renders, captions) for
    /// assets/demo-model/train.py.
    #[command(hide = true)]
    World(WorldArgs),
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Folder for edit-quality.json, edit-quality.png (the trade-off plot),
    /// slider-examples.png (each edit across the slider) and example-edit.png.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// How many scenes (each fine-tuned on, then edited two or three ways).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 8
    )]
    pub scenes: usize,

    /// Scenes the model draws itself from random captions (read back by the world's reader),
    /// benchmarked after the rendered ones.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 0
    )]
    pub sampled_scenes: usize,

    /// Seed of the scenes, their edits and the sampling noise.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 1
    )]
    pub seed: u64,

    /// SDEdit starts swept by each method's curve, comma-separated.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "F,F,..",
        value_delimiter = ',',
        default_value = "0.5,0.6,0.7,0.8,0.9,1.0"
    )]
    pub t0_values: Vec<f64>,

    /// Guidance weight of the swept curves (the slider's comes from the fidelity table).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "W",
        default_value_t = 7.5
    )]
    pub guidance: f64,

    /// Denoising steps (DDIM).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 20
    )]
    pub sampling_steps: usize,

    /// Which curves to measure, comma-separated (a quicker run measures fewer): sdedit,
    /// unitune (each snapshot), prompt-guidance, interpolation, mask (the true region),
    /// auto-region, slider.
    #[arg(
        long,
        value_name = "M,M,..",
        value_delimiter = ',',
        default_value = "sdedit,unitune,prompt-guidance,interpolation,mask,auto-region,slider"
    )]
    pub methods: Vec<EvalMethod>,

    /// The automatic region's threshold (the auto-region curves), 0 to 1.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "T",
        default_value_t = crate::engine::region::DEFAULT_THRESHOLD
    )]
    pub region_threshold: f64,

    #[command(flatten)]
    pub training: TrainingOptions,
}

/// `--region`: where an edit may change the photo.
#[derive(Debug, Clone, PartialEq)]
pub enum RegionArg {
    All,
    Auto,
    File(PathBuf),
}

impl std::str::FromStr for RegionArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "all" => Ok(Self::All),
            "auto" => Ok(Self::Auto),
            "" => Err("give auto, all or a mask file".into()),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

impl RegionArg {
    /// The mask file, when the region is one.
    pub fn file(&self) -> Option<&std::path::Path> {
        match self {
            Self::File(path) => Some(path),
            _ => None,
        }
    }
}

/// A curve of `unitune eval` (`--methods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalMethod {
    /// The untuned model, the prompt alone, at each t0.
    Sdedit,
    /// "token prompt" from each snapshot, at each t0.
    Unitune,
    /// The middle snapshot with the scene's caption as prompt guidance's baseline.
    PromptGuidance,
    /// The middle snapshot, its result interpolated toward the photo.
    Interpolation,
    /// The middle snapshot, only the edited region allowed to change.
    Mask,
    /// The middle snapshot at each t0 and the slider's five positions, each with the region
    /// estimated from the prompt (`--region auto`).
    AutoRegion,
    /// The fidelity slider's five positions, through the model's fidelity table.
    Slider,
}

#[derive(Debug, Args)]
pub struct WorldArgs {
    /// Folder to write images.rgb and captions.jsonl into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// How many scenes.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 50_000
    )]
    pub count: usize,

    /// Seed of the scenes and their captions.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 0
    )]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// What to do; without one, list the entries.
    #[command(subcommand)]
    pub action: Option<CacheAction>,
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Each entry with its size, snapshots, last use and a small copy of its photo.
    List,
    /// Remove one entry, named by the start of its key (as `list` prints it).
    Remove {
        #[arg(value_name = "KEY")]
        key: String,
    },
    /// Remove every entry.
    Clear,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Architecture to build with random weights: sd15, sd21 or sdxl.
    #[arg(long, value_name = "A", default_value = "sd15")]
    pub arch: Architecture,

    /// Image size WxH (multiples of 64). Default: the architecture's native size.
    #[arg(long, allow_hyphen_values = true, value_name = "WxH")]
    pub size: Option<String>,

    /// Training modes whose passes and steps are measured, comma-separated.
    #[arg(
        long,
        value_name = "M,M,..",
        value_delimiter = ',',
        default_value = "full,attention,cross-kv,lora"
    )]
    pub modes: Vec<String>,

    /// What to measure, comma-separated: pass (one forward and backward at micro-batch 1),
    /// step (one optimizer step at batch 4), sample (a guided denoising step), vae (encode and
    /// decode), run (a whole UniTune run: fine-tune, then one edit), precision (a half and an
    /// f32 UNet forward compared; loads the model a second time).
    #[arg(
        long,
        value_name = "W,W,..",
        value_delimiter = ',',
        default_value = "pass,step,sample,vae,run"
    )]
    pub measure: Vec<String>,

    /// Also measure passes without gradient checkpointing.
    #[arg(long)]
    pub without_checkpointing: bool,

    /// Fine-tuning steps of the whole run (snapshots at 1/8, 1/4, 1/2 and all of them).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 128
    )]
    pub steps: usize,

    /// Denoising steps of the whole run's edit.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 50
    )]
    pub sampling_steps: usize,

    /// Training mode of the whole run.
    #[arg(long, value_name = "MODE", default_value = "full")]
    pub run_mode: String,

    /// Photos per pass in the batch-4 steps: auto (the largest that fits) or a number.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value = "auto"
    )]
    pub micro_batch: String,

    /// Optimizer of the steps and the whole run: adafactor or adamw.
    #[arg(long, value_name = "NAME", default_value = "adafactor")]
    pub optimizer: String,

    /// Train the steps and the whole run without f32 master weights (half-precision weights
    /// only, updates rounded in stochastically).
    #[arg(long)]
    pub no_master_weights: bool,

    /// Where the random-weight model is written (reused when complete). Default: a folder in
    /// the user cache.
    #[arg(long, value_name = "DIR")]
    pub model_dir: Option<PathBuf>,

    /// Also write the JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// How to fine-tune on the photo (UniTune section 3.2). Defaults follow the paper.
#[derive(Debug, Clone, Args)]
pub struct TrainingOptions {
    /// Fine-tuning steps after which snapshots are kept, comma-separated.
    #[arg(
        long = "snapshots",
        value_name = "N,N,..",
        value_delimiter = ',',
        default_value = "16,32,64,128"
    )]
    pub snapshots: Vec<usize>,

    /// What is trained: full (the paper), attention, cross-kv (cross-attention keys and
    /// values only; the smallest snapshots) or lora. Peak memory of a whole fine-tune in half
    /// precision: SD 1.5 at 512 px about 4.4 GB with cross-kv or lora and 9.6 GB with full;
    /// SDXL at 1024 px about 8.5 GB with lora, 9.6 GB with cross-kv and 13.7 GB with full.
    #[arg(long = "train", value_name = "MODE", default_value = "full")]
    pub train: String,

    /// Rank of the LoRA adapters (with --train lora).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "R",
        default_value_t = 4
    )]
    pub lora_rank: usize,

    /// Learning rate.
    #[arg(
        long,
        allow_hyphen_values = true,
        value_name = "X",
        default_value_t = 1e-4
    )]
    pub lr: f64,

    /// Optimizer: adafactor (the paper's; least optimizer state) or adamw.
    #[arg(long, value_name = "NAME", default_value = "adafactor")]
    pub optimizer: String,

    /// Photos per forward pass: the batch of 4 is accumulated from 4/N passes. auto (the
    /// default) takes the largest that the device's free memory holds, and smaller passes if
    /// one still runs out of memory.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value = "auto"
    )]
    pub micro_batch: String,

    /// Train half-precision weights without f32 master copies, rounding each update into
    /// them stochastically (as kohya's --full_bf16): 4 bytes less per trained weight, 10 GB
    /// for SDXL's full fine-tune. Without this flag the masters are dropped only when the
    /// fine-tune would not fit otherwise.
    #[arg(long)]
    pub no_master_weights: bool,

    /// Largest size of the snapshot cache in GB; the least recently used fine-tunes are
    /// removed beyond it.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "GB",
        default_value_t = 16.0
    )]
    pub cache_size: f64,

    /// The rare token the photo is bound to.
    #[arg(long, value_name = "TEXT", default_value = "beikkpic")]
    pub token: String,

    /// Seed of the fine-tuning noise.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 0
    )]
    pub tune_seed: u64,

    /// Retrain even if snapshots for this photo and recipe are cached, and do not cache.
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(Debug, Args)]
pub struct TuneArgs {
    /// The photo to fine-tune on.
    #[arg(value_name = "PHOTO")]
    pub image: PathBuf,

    /// Working size WxH (multiples of 64). Default: the model's native area at the photo's
    /// aspect ratio.
    #[arg(long, allow_hyphen_values = true, value_name = "WxH")]
    pub size: Option<String>,

    #[command(flatten)]
    pub training: TrainingOptions,

    /// Also write the last snapshot as a LoRA file (.safetensors, kohya format) for
    /// AUTOMATIC1111, ComfyUI and diffusers; needs --train lora.
    #[arg(long, value_name = "FILE")]
    pub export_lora: Option<PathBuf>,

    /// Replace the --export-lora file if it already exists (otherwise it is refused, before
    /// anything is computed).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct ExportLoraArgs {
    /// The photo that was fine-tuned on.
    #[arg(value_name = "PHOTO")]
    pub image: PathBuf,

    /// The LoRA file to write (.safetensors).
    #[arg(long, short, value_name = "FILE")]
    pub out: PathBuf,

    /// Replace --out if it already exists (otherwise it is refused).
    #[arg(long)]
    pub overwrite: bool,

    /// Which snapshot: the one after N fine-tuning steps. Default: the last.
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub steps: Option<usize>,

    /// Working size WxH the fine-tune used (as given to `tune` or `edit`).
    #[arg(long, allow_hyphen_values = true, value_name = "WxH")]
    pub size: Option<String>,

    #[command(flatten)]
    pub training: TrainingOptions,
}

#[derive(Debug, Args)]
pub struct GridArgs {
    /// The photo to edit.
    #[arg(value_name = "PHOTO")]
    pub image: PathBuf,

    /// What the photo should become.
    #[arg(long, short, value_name = "TEXT")]
    pub prompt: String,

    /// SDEdit starts for the rows, comma-separated.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "F,F,..",
        value_delimiter = ',',
        default_value = "1.0,0.96,0.92,0.88,0.8"
    )]
    pub t0_values: Vec<f64>,

    /// Working size WxH (multiples of 64).
    #[arg(long, allow_hyphen_values = true, value_name = "WxH")]
    pub size: Option<String>,

    #[command(flatten)]
    pub training: TrainingOptions,

    /// Guidance weight for every cell.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "W",
        default_value_t = 9.0
    )]
    pub guidance: f64,

    /// Seed for every cell (the same noise everywhere, so cells differ only by settings).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub seed: Option<u64>,

    /// Denoising steps (DDIM).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 50
    )]
    pub sampling_steps: usize,

    /// Output file (.png, .jpg or .webp).
    #[arg(long, short, value_name = "FILE")]
    pub out: PathBuf,

    /// Replace --out if it already exists.
    #[arg(long)]
    pub overwrite: bool,
}

/// Options shared by every command that samples.
#[derive(Debug, Clone, Args)]
pub struct SamplingOptions {
    /// Random seed; the same seed and inputs give the same image. Random when omitted (and
    /// printed).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub seed: Option<u64>,

    /// Denoising steps (DDIM).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 50
    )]
    pub sampling_steps: usize,

    /// Classifier-free guidance weight: how strongly to follow the prompt (1 or less = off,
    /// the prompt alone, as SDXL Turbo and Lightning models are sampled).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "W",
        default_value_t = 7.5
    )]
    pub guidance: f64,

    /// Output file (.png, .jpg or .webp). Default: `unitune-SEED.png` or `PHOTO-edit.png` in
    /// the current folder, numbered so that it never overwrites anything.
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Replace --out if it already exists (otherwise an existing file is refused).
    #[arg(long)]
    pub overwrite: bool,
}

/// Live previews of the denoising, written to an image file after every step.
#[derive(Debug, Clone, Args)]
pub struct PreviewOptions {
    /// Preview each step's guess of the result: taesd (the tiny VAE madebyollin/taesd, about
    /// 10 MB, fetched once like a model; the fast preview stands in if it cannot be had),
    /// fast (a linear map, one pixel per latent) or off. The final image always comes from
    /// the full VAE.
    #[arg(long, value_name = "KIND", default_value = "off")]
    pub preview: PreviewMode,

    /// Where the preview goes, replaced after every step (an image viewer that reloads shows
    /// it live); it keeps the last step's. Default: the output's name with `-preview`. An
    /// existing file is replaced only when it is an earlier preview of unitune's (or with
    /// --overwrite); the preview is never one of the inputs or outputs.
    #[arg(long, value_name = "FILE")]
    pub preview_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What the image should show.
    #[arg(long, short, value_name = "TEXT")]
    pub prompt: String,

    /// Image size WxH in pixels, multiples of 64. Default: the model's native size.
    #[arg(long, allow_hyphen_values = true, value_name = "WxH")]
    pub size: Option<String>,

    #[command(flatten)]
    pub sampling: SamplingOptions,

    #[command(flatten)]
    pub previews: PreviewOptions,
}

#[derive(Debug, Args)]
pub struct EditArgs {
    /// The photo to edit (PNG, JPEG, WebP or GIF).
    #[arg(value_name = "PHOTO")]
    pub image: PathBuf,

    /// What the photo should become, e.g. "a cat wearing sunglasses".
    #[arg(
        long,
        short,
        value_name = "TEXT",
        required_unless_present_any = ["instruct", "recipe"],
        conflicts_with = "instruct"
    )]
    pub prompt: Option<String>,

    /// Repeat the edit an image unitune exported was made with (a PNG; AUTOMATIC1111's
    /// infotext is read too): its prompt, seed, fidelity or snapshot, t0 and guidance, sampling
    /// steps and fine-tuning recipe, on this photo. Flags given as well win over the recipe.
    #[arg(long, value_name = "PNG")]
    pub recipe: Option<PathBuf>,

    /// How the photo should change, e.g. "make it winter", for an InstructPix2Pix model
    /// (--model timbrooks/instruct-pix2pix): no fine-tuning; --fidelity sets how closely the
    /// result follows the photo (image guidance), --guidance how strongly the instruction.
    #[arg(
        long,
        value_name = "TEXT",
        conflicts_with_all = ["tune_steps", "t0", "baseline_prompt"]
    )]
    pub instruct: Option<String>,

    /// Image guidance of an instruction edit (overrides --fidelity's choice; 1.5 is the
    /// published default, higher stays closer to the photo).
    #[arg(long, allow_negative_numbers = true, value_name = "W")]
    pub image_guidance: Option<f64>,

    /// One knob from 0 (expressive) to 1 (faithful to the photo): picks the snapshot, t0 and
    /// guidance together (see the table in the README); for --instruct, the image guidance.
    /// Default 0.5.
    #[arg(long, allow_negative_numbers = true, value_name = "F")]
    pub fidelity: Option<f64>,

    /// Sample from the snapshot after N fine-tuning steps (overrides --fidelity's choice);
    /// 0 skips fine-tuning entirely (plain SDEdit, the paper's baseline).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub tune_steps: Option<usize>,

    /// SDEdit start in [0, 1] (overrides --fidelity's choice): how far up the noise schedule
    /// the photo is pushed before denoising. 0 returns the photo, 1 starts from pure noise.
    #[arg(long, allow_negative_numbers = true, value_name = "F")]
    pub t0: Option<f64>,

    /// Guidance weight (overrides --fidelity's choice).
    #[arg(long, allow_negative_numbers = true, value_name = "W")]
    pub guidance: Option<f64>,

    /// A description of the photo as it is: guidance then pushes from it toward the prompt
    /// (the paper's prompt guidance) instead of from the empty prompt.
    #[arg(long, value_name = "TEXT")]
    pub baseline_prompt: Option<String>,

    /// Where the edit may change the photo; everywhere else it comes back exactly: `auto`
    /// (the default for descriptions: estimated from the prompt, only what it changes; a new
    /// background is the photo's background, other global edits such as a style the whole
    /// photo), `all` (the paper's
    /// mask-free edit; the default for --instruct), or a mask FILE (white may change, black
    /// and transparent are kept; resized to the photo). `--mask FILE` is the same as
    /// `--region FILE`. Write `./auto` for a file named auto.
    #[arg(long, alias = "mask", value_name = "auto|all|FILE")]
    pub region: Option<RegionArg>,

    /// With --region auto: how much the prompt must change a place, from 0 (everywhere it
    /// changes at all) to 1 (only where it changes most), for it to be edited.
    #[arg(long, allow_negative_numbers = true, value_name = "T")]
    pub region_threshold: Option<f64>,

    /// With --region auto: also write the estimated region as a mask PNG (white = changed),
    /// to look at, touch up and give back with --region FILE.
    #[arg(long, value_name = "FILE")]
    pub region_out: Option<PathBuf>,

    /// Blend the result toward the original wherever their neighbourhoods match, keeping the
    /// original's detail in untouched areas (paper 3.4).
    #[arg(long)]
    pub interpolate: bool,

    /// How many variants, with consecutive seeds; files are numbered.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "K",
        default_value_t = 1
    )]
    pub samples: usize,

    /// Working size WxH (multiples of 64). Default: the model's native area at the photo's
    /// aspect ratio. The result always comes back at the photo's own size.
    #[arg(long, allow_hyphen_values = true, value_name = "WxH")]
    pub size: Option<String>,

    #[command(flatten)]
    pub training: TrainingOptions,

    /// Also write the snapshot the edit samples from as a LoRA file (.safetensors, kohya
    /// format) for AUTOMATIC1111, ComfyUI and diffusers; needs --train lora. An existing file
    /// is replaced only with --overwrite.
    #[arg(long, value_name = "FILE")]
    pub export_lora: Option<PathBuf>,

    /// Random seed of the first sample; the same seed and inputs give the same image.
    /// Random when omitted (and printed).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub seed: Option<u64>,

    /// Denoising steps (DDIM).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 50
    )]
    pub sampling_steps: usize,

    /// Output file (.png, .jpg or .webp). Default: `PHOTO-edit.png` in the current folder,
    /// numbered so that it never overwrites anything.
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Replace --out (each numbered sample), --export-lora and --preview-out if they
    /// already exist (otherwise an existing file is refused before anything is computed).
    #[arg(long)]
    pub overwrite: bool,

    #[command(flatten)]
    pub previews: PreviewOptions,
}
