//! What every command shares: loading the model, seeds, output paths, progress bars,
//! Ctrl-C. Commands run on the calling thread (the CLI runs jobs directly, no workers).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::UsageError;
use super::args::{GlobalOptions, SamplingOptions};
use super::cancel::CancelFlag;
use super::preview::PreviewFile;
use crate::engine::StableDiffusion;
use crate::engine::device::{device_name, open_device};
use crate::engine::model::LoadOptions;
use crate::engine::precision::dtype_name;
use crate::engine::sampling::{SampleOutput, SampleRequest, StepObserver, StepView, sample};
use crate::imaging::{self, ExistingFile};
use crate::model_files::{
    self, DownloadProgress, HubOptions, LoraChoice, ModelFiles, ModelSpec, TerminalProgress,
};
use crate::recipe::LoraRecipe;

/// A loaded model and a name for it in recipes.
pub(super) struct LoadedModel {
    pub model: StableDiffusion,
    /// How recipes name the model.
    pub name: String,
    /// Names the exact weights (with the applied LoRAs), for the snapshot cache key.
    pub identity: String,
    /// The LoRAs applied to the model (`--lora`), for recipes.
    pub loras: Vec<LoraRecipe>,
}

impl LoadedModel {
    pub fn prediction_type(&self) -> &'static str {
        self.model.config.scheduler.prediction_type.as_str()
    }

    /// The compute precision, as recipes name it.
    pub fn precision(&self) -> &'static str {
        dtype_name(self.model.dtype())
    }
}

/// `--lora FILE[:WEIGHT]` arguments, checked before anything slow.
pub(super) fn lora_choices(global: &GlobalOptions) -> Result<Vec<LoraChoice>> {
    global
        .loras
        .iter()
        .map(|text| {
            let choice = LoraChoice::parse(text).map_err(UsageError)?;
            if !choice.path.is_file() {
                return Err(UsageError(format!(
                    "--lora {}: there is no such file",
                    choice.path.display()
                ))
                .into());
            }
            Ok(choice)
        })
        .collect()
}

pub(super) fn load_model(global: &GlobalOptions) -> Result<LoadedModel> {
    let loras = lora_choices(global)?;
    let spec = model_files::parse_model_arg(&global.model)?;
    let options = HubOptions {
        offline: global.offline,
        ..HubOptions::default()
    };
    let mut progress = NoticeBeforeDownload {
        notice: model_files::license_notice(&spec),
        inner: TerminalProgress::new(),
    };
    let mut files = ModelFiles {
        loras,
        ..model_files::resolve(&spec, &options, &mut progress)?
    };
    if let Some(vae) = &global.vae {
        files.vae_replacement = Some(model_files::parse_vae_arg(vae)?);
    }
    let device = open_device(global.device)?;
    let dtype = global.precision.resolve(&device)?;
    eprintln!(
        "using device: {} ({})",
        device_name(&device),
        dtype_name(dtype)
    );
    eprintln!("loading model {} ({})", spec, files.source);
    let options = LoadOptions {
        prediction_type: global.prediction_type.map(Into::into),
    };
    let model = StableDiffusion::load_with(&files, &device, dtype, &options)?;
    eprintln!("model: {}", model.info().describe());
    if !files.loras.is_empty() {
        eprintln!(
            "applied {} LoRA(s): {} UNet and {} text-encoder weights changed",
            files.loras.len(),
            model.loras().unet.len(),
            model.loras().text_encoder.len()
        );
    }
    let name = match &spec {
        ModelSpec::Folder(path) => path.display().to_string(),
        ModelSpec::Hub { .. } | ModelSpec::Demo => spec.to_string(),
    };
    let memo = crate::model_files::default_memo_path();
    let mut identity = files.fingerprint(memo.as_deref())?;
    let loras = files
        .loras
        .iter()
        .zip(files.lora_hashes(memo.as_deref())?)
        .map(|(choice, hash)| LoraRecipe {
            file: choice.file_name(),
            hash,
            weight: choice.weight,
        })
        .collect();
    if let Some(prediction) = options.prediction_type {
        // The same weights trained towards another target are another model's snapshots.
        identity.push_str(&format!("+prediction={}", prediction.as_str()));
    }
    Ok(LoadedModel {
        model,
        name,
        identity,
        loras,
    })
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

pub(super) fn choose_seed(requested: Option<u64>) -> u64 {
    // Below 2^32 so it survives every tool that reads seeds as 32-bit or as JSON numbers.
    requested.unwrap_or_else(|| rand::random::<u32>() as u64)
}

pub(super) fn check_sampling_steps(steps: usize) -> Result<()> {
    if steps == 0 {
        return Err(UsageError("--sampling-steps must be at least 1".into()).into());
    }
    Ok(())
}

pub(super) fn check_guidance(weight: f64) -> Result<()> {
    if !weight.is_finite() || weight < 0.0 {
        return Err(UsageError(format!(
            "--guidance must be a number of at least 0, got {weight}"
        ))
        .into());
    }
    Ok(())
}

pub(super) fn check_common(options: &SamplingOptions) -> Result<()> {
    check_sampling_steps(options.sampling_steps)?;
    check_guidance(options.guidance)?;
    if let Some(out) = &options.out {
        check_output_extension(out)?;
    }
    Ok(())
}

pub(super) fn check_output_extension(out: &Path) -> Result<()> {
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

pub(super) fn check_prompt(prompt: &str) -> Result<()> {
    if prompt.trim().is_empty() {
        return Err(
            UsageError("--prompt is empty; describe what the image should show".into()).into(),
        );
    }
    Ok(())
}

/// A denoising progress bar on stderr that the sampler advances.
pub(super) fn step_bar(label: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{msg} [{wide_bar}] {pos}/{len} steps, ETA {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(label.to_string());
    bar
}

/// Advances `bar` with each denoising step, writes the step's preview (if any) and stops
/// the loop after Ctrl-C.
pub(super) fn sampling_observer<'a>(
    bar: &'a ProgressBar,
    cancel: &'a CancelFlag,
    preview: Option<&'a mut PreviewFile<'_>>,
) -> impl StepObserver + 'a {
    BarObserver {
        bar,
        cancel,
        preview,
    }
}

/// Moves the step bar; Ctrl-C stops after the current step or stage.
struct BarObserver<'a, 'p> {
    bar: &'a ProgressBar,
    cancel: &'a CancelFlag,
    preview: Option<&'a mut PreviewFile<'p>>,
}

impl StepObserver for BarObserver<'_, '_> {
    fn observe(&mut self, view: &StepView) -> ControlFlow<()> {
        self.bar.set_length(view.total_steps as u64);
        self.bar.set_position(view.step as u64);
        if let Some(preview) = self.preview.as_deref_mut() {
            preview.show(view.predicted_x0, view.step == view.total_steps);
        }
        self.cancel.check()
    }

    fn proceed(&mut self) -> ControlFlow<()> {
        self.cancel.check()
    }
}

pub(super) fn run_sampling(
    model: &StableDiffusion,
    request: &SampleRequest,
    label: &str,
    cancel: &CancelFlag,
    preview: Option<&mut PreviewFile<'_>>,
) -> Result<SampleOutput> {
    let bar = step_bar(label);
    let mut observer = sampling_observer(&bar, cancel, preview);
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
pub(super) fn output_path(options: &SamplingOptions, default: PathBuf) -> (PathBuf, ExistingFile) {
    match &options.out {
        Some(out) if options.overwrite => (out.clone(), ExistingFile::Overwrite),
        Some(out) => (out.clone(), ExistingFile::Refuse),
        None => (imaging::next_free_path(&default), ExistingFile::Refuse),
    }
}
