//! What each command does, on the calling thread (no workers: the CLI runs jobs directly).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::UsageError;
use super::args::{EditArgs, GenerateArgs, GlobalOptions, SamplingOptions};
use super::recipe::{Recipe, program};
use crate::engine::StableDiffusion;
use crate::engine::device::{device_name, open_device};
use crate::engine::sampling::{SampleOutput, SampleRequest, Start, StepView, sample};
use crate::imaging::{self, DecodeLimits, ExistingFile};
use crate::model_files::{self, DownloadProgress, HubOptions, ModelSpec, TerminalProgress};

/// A loaded model and a name for it in recipes.
struct LoadedModel {
    model: StableDiffusion,
    name: String,
}

fn load_model(global: &GlobalOptions) -> Result<LoadedModel> {
    let spec = model_files::parse_model_arg(&global.model)?;
    let options = HubOptions {
        offline: global.offline,
        ..HubOptions::default()
    };
    let mut progress = NoticeBeforeDownload {
        notice: license_notice(&spec),
        inner: TerminalProgress::new(),
    };
    let files = model_files::resolve(&spec, &options, &mut progress)?;
    let device = open_device(global.device)?;
    eprintln!("using device: {}", device_name(&device));
    eprintln!("loading model {} ({})", spec, files.source);
    // Half precision on the CPU is not faster in candle, and bf16 matmul is missing there.
    let model = StableDiffusion::load(&files, &device, DType::F32)?;
    let name = match &spec {
        ModelSpec::Folder(path) => path.display().to_string(),
        ModelSpec::Hub { .. } => spec.to_string(),
    };
    Ok(LoadedModel { model, name })
}

/// The license a user accepts by downloading this model, when we know it.
fn license_notice(spec: &ModelSpec) -> Option<&'static str> {
    match spec {
        ModelSpec::Hub { repo_id, .. } if repo_id == model_files::DEFAULT_MODEL => Some(
            include_str!("../../assets/notices/stable-diffusion-v1-5.txt"),
        ),
        ModelSpec::Hub { .. } => Some(
            "This model comes with its own license; read its model card on the hub before use.\n",
        ),
        ModelSpec::Folder(_) => None,
    }
}

/// Prints the model's license notice once, before the first file downloads.
struct NoticeBeforeDownload<P> {
    notice: Option<&'static str>,
    inner: P,
}

impl<P: DownloadProgress> DownloadProgress for NoticeBeforeDownload<P> {
    fn start_file(&mut self, name: &str, total_bytes: Option<u64>) {
        if let Some(notice) = self.notice.take() {
            eprint!("{notice}");
        }
        self.inner.start_file(name, total_bytes);
    }
    fn advance(&mut self, bytes: u64) {
        self.inner.advance(bytes);
    }
    fn finish_file(&mut self) {
        self.inner.finish_file();
    }
    fn cancelled(&self) -> bool {
        self.inner.cancelled()
    }
}

fn choose_seed(options: &SamplingOptions) -> u64 {
    // Below 2^32 so it survives every tool that reads seeds as 32-bit or as JSON numbers.
    options.seed.unwrap_or_else(|| rand::random::<u32>() as u64)
}

fn check_common(options: &SamplingOptions) -> Result<()> {
    if options.sampling_steps == 0 {
        return Err(UsageError("--sampling-steps must be at least 1".into()).into());
    }
    if !options.guidance.is_finite() || options.guidance < 0.0 {
        return Err(UsageError(format!(
            "--guidance must be a number of at least 0, got {}",
            options.guidance
        ))
        .into());
    }
    if let Some(out) = &options.out {
        check_output_extension(out)?;
    }
    Ok(())
}

fn check_output_extension(out: &Path) -> Result<()> {
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if !matches!(ext.as_str(), "png" | "jpg" | "jpeg" | "webp") {
        return Err(UsageError(format!(
            "--out {} must end in .png, .jpg or .webp",
            out.display()
        ))
        .into());
    }
    Ok(())
}

fn check_prompt(prompt: &str) -> Result<()> {
    if prompt.trim().is_empty() {
        return Err(
            UsageError("--prompt is empty; describe what the image should show".into()).into(),
        );
    }
    Ok(())
}

/// A denoising progress bar on stderr that the sampler advances.
fn step_bar(label: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{msg} [{wide_bar}] {pos}/{len} steps, ETA {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(label.to_string());
    bar
}

fn run_sampling(
    model: &StableDiffusion,
    request: &SampleRequest,
    label: &str,
) -> Result<SampleOutput> {
    let bar = step_bar(label);
    let mut observer = |view: &StepView| {
        bar.set_length(view.total_steps as u64);
        bar.set_position(view.step as u64);
        ControlFlow::Continue(())
    };
    let output = sample(model, request, &mut observer);
    bar.finish_and_clear();
    let output = output?;
    if output.prompt_tokens_dropped > 0 {
        eprintln!(
            "warning: the prompt is too long for the model; its last {} tokens were ignored",
            output.prompt_tokens_dropped
        );
    }
    Ok(output)
}

/// The output path: `--out` as given (refused if it exists unless --overwrite), or a fresh
/// numbered name that never replaces a file.
fn output_path(options: &SamplingOptions, default: PathBuf) -> (PathBuf, ExistingFile) {
    match &options.out {
        Some(out) if options.overwrite => (out.clone(), ExistingFile::Overwrite),
        Some(out) => (out.clone(), ExistingFile::Refuse),
        None => (imaging::next_free_path(&default), ExistingFile::Refuse),
    }
}

pub fn generate(global: &GlobalOptions, args: &GenerateArgs) -> Result<()> {
    check_prompt(&args.prompt)?;
    check_common(&args.sampling)?;
    let requested = args.size.as_deref().map(imaging::parse_size).transpose()?;
    let seed = choose_seed(&args.sampling);

    let loaded = load_model(global)?;
    let model = &loaded.model;
    let side = model.config.native_image_side().unwrap_or(512) as u32;
    let (width, height) = imaging::working_size(side, side, side, requested)?;
    eprintln!("seed: {seed}, size: {width}x{height}");

    let request = SampleRequest {
        prompt: &args.prompt,
        baseline_prompt: "",
        guidance_weight: args.sampling.guidance,
        sampling_steps: args.sampling.sampling_steps,
        seed,
        start: Start::Noise {
            width: width as usize,
            height: height as usize,
        },
    };
    let output = run_sampling(model, &request, "sampling")?;

    let recipe = Recipe {
        mode: "generate",
        prompt: args.prompt.clone(),
        baseline_prompt: String::new(),
        seed,
        sampling_steps: args.sampling.sampling_steps,
        sampler: "DDIM",
        guidance_weight: args.sampling.guidance,
        t0: None,
        tune_steps: 0,
        width,
        height,
        working_width: width,
        working_height: height,
        model: loaded.name.clone(),
        prediction_type: model.config.scheduler.prediction_type.as_str(),
        source_image: None,
        program: program(),
        revision: crate::build_info::GIT_REVISION,
    };
    let (path, existing) =
        output_path(&args.sampling, PathBuf::from(format!("unitune-{seed}.png")));
    imaging::export_image(&path, &output.image, None, &recipe.text_chunks(), existing)?;
    println!("{}", path.display());
    Ok(())
}

pub fn edit(global: &GlobalOptions, args: &EditArgs) -> Result<()> {
    check_prompt(&args.prompt)?;
    check_common(&args.sampling)?;
    if args.tune_steps != 0 {
        return Err(UsageError(format!(
            "--tune-steps {} is not available yet: this version edits without fine-tuning; pass --tune-steps 0",
            args.tune_steps
        ))
        .into());
    }
    if !(0.0..=1.0).contains(&args.t0) {
        return Err(UsageError(format!("--t0 must be between 0 and 1, got {}", args.t0)).into());
    }
    let requested = args.size.as_deref().map(imaging::parse_size).transpose()?;
    let seed = choose_seed(&args.sampling);

    // Read the photo before the (slow) model load, so a bad file fails at once.
    let photo = imaging::load_photo(&args.image, &DecodeLimits::default())?;
    let (photo_w, photo_h) = photo.rgb.dimensions();

    let loaded = load_model(global)?;
    let model = &loaded.model;
    let side = model.config.native_image_side().unwrap_or(512) as u32;
    let (width, height) = imaging::working_size(photo_w, photo_h, side, requested)?;
    eprintln!("seed: {seed}, working size: {width}x{height}");
    let working = imaging::resize_rgb(&photo.rgb, width, height);

    let request = SampleRequest {
        prompt: &args.prompt,
        baseline_prompt: "",
        guidance_weight: args.sampling.guidance,
        sampling_steps: args.sampling.sampling_steps,
        seed,
        start: Start::Photo {
            image: &working,
            t0_fraction: args.t0,
            mask: None,
        },
    };
    let output = run_sampling(model, &request, "editing")?;
    let result = imaging::resize_rgb(&output.image, photo_w, photo_h);

    let recipe = Recipe {
        mode: "edit",
        prompt: args.prompt.clone(),
        baseline_prompt: String::new(),
        seed,
        sampling_steps: args.sampling.sampling_steps,
        sampler: "DDIM",
        guidance_weight: args.sampling.guidance,
        t0: Some(args.t0),
        tune_steps: 0,
        width: photo_w,
        height: photo_h,
        working_width: width,
        working_height: height,
        model: loaded.name.clone(),
        prediction_type: model.config.scheduler.prediction_type.as_str(),
        source_image: args
            .image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
        program: program(),
        revision: crate::build_info::GIT_REVISION,
    };
    let default = default_edit_path(&args.image);
    let (path, existing) = output_path(&args.sampling, default);
    imaging::export_image(
        &path,
        &result,
        photo.alpha.as_ref(),
        &recipe.text_chunks(),
        existing,
    )
    .with_context(|| format!("the edit was not saved to {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}

/// `some/where/photo.jpg` -> `photo-edit.png` in the current folder, like every other output
/// (the photo's own folder may be read-only, e.g. a camera card).
fn default_edit_path(image: &Path) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "photo".into());
    PathBuf::from(format!("{stem}-edit.png"))
}
