//! `unitune tune`, `edit` and `grid`: fine-tune on the photo (or reuse cached snapshots),
//! then edit it by text.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::UsageError;
use super::args::{EditArgs, ExportLoraArgs, GlobalOptions, GridArgs, TrainingOptions, TuneArgs};
use super::cancel::CancelFlag;
use super::preview::{PreviewFile, check_preview_options, open_previews, preview_path};
use super::session::{
    LoadedModel, check_guidance, check_output_extension, check_prompt, check_sampling_steps,
    choose_seed, load_model, sampling_observer, step_bar,
};
use crate::engine::edit::{
    CachePolicy, EditMethod, EditRequest, TuneEvent, TunedPhoto, edit_photo, model_prompt,
    tune_photo,
};
use crate::engine::fidelity::FidelityTable;
use crate::engine::finetune::{SnapshotCache, TrainMode, TuneSettings};
use crate::engine::instruct::{
    DEFAULT_INSTRUCT_MODEL, DEFAULT_TEXT_GUIDANCE, image_guidance_for, is_instruct_model,
};
use crate::engine::lora::{LoraExportInfo, export_tuned};
use crate::engine::optim::{OptimizerKind, OptimizerSettings};
use crate::engine::sampling::StepView;
use crate::imaging::{self, DecodeLimits, ExistingFile, Photo};
use crate::recipe::{Recipe, TuneRecipe};

/// The photo, at its own size and at the model's working size.
struct Photos {
    photo: Photo,
    working: RgbImage,
}

fn load_photo(path: &Path) -> Result<Photo> {
    Ok(imaging::load_photo(path, &DecodeLimits::default())?)
}

fn fit_photo(photo: Photo, loaded: &LoadedModel, size: Option<&str>) -> Result<Photos> {
    let requested = size.map(imaging::parse_size).transpose()?;
    let (w, h) = photo.rgb.dimensions();
    let side = loaded.model.config.native_image_side().unwrap_or(512) as u32;
    let (ww, wh) = imaging::working_size(w, h, side, requested)?;
    eprintln!("working size: {ww}x{wh}");
    let working = imaging::resize_rgb(&photo.rgb, ww, wh);
    Ok(Photos { photo, working })
}

/// The fine-tuning recipe from the command line.
pub(super) fn tune_settings(
    options: &TrainingOptions,
    extra_snapshot: Option<usize>,
) -> Result<TuneSettings> {
    let usage = |m: String| anyhow::Error::from(UsageError(m));
    let mut mode: TrainMode = options.train.parse().map_err(usage)?;
    if let TrainMode::Lora { rank } = &mut mode {
        *rank = options.lora_rank;
    }
    let kind: OptimizerKind = options.optimizer.parse().map_err(usage)?;
    let mut snapshot_steps = options.snapshots.clone();
    if let Some(steps) = extra_snapshot.filter(|s| *s > 0) {
        snapshot_steps.push(steps);
    }
    snapshot_steps.sort_unstable();
    snapshot_steps.dedup();
    let batch_size = TuneSettings::default().batch_size;
    let (micro_batch_size, auto_micro_batch) = parse_micro_batch(&options.micro_batch, batch_size)?;
    let settings = TuneSettings {
        mode,
        optimizer: OptimizerSettings {
            kind,
            learning_rate: options.lr,
            ..OptimizerSettings::default()
        },
        snapshot_steps,
        batch_size,
        micro_batch_size,
        auto_micro_batch,
        token: options.token.clone(),
        seed: options.tune_seed,
        ..TuneSettings::default()
    };
    settings.validate().map_err(|e| usage(e.to_string()))?;
    Ok(settings)
}

/// `--micro-batch`: `auto` (the largest that fits, up to the batch) or a fixed number.
pub(super) fn parse_micro_batch(text: &str, batch_size: usize) -> Result<(usize, bool)> {
    if text.eq_ignore_ascii_case("auto") {
        return Ok((batch_size, true));
    }
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok((n, false)),
        _ => Err(UsageError(format!(
            "--micro-batch must be auto or a number that divides the batch of {batch_size}, not {text}"
        ))
        .into()),
    }
}

/// The snapshot cache in the user cache folder with the `--cache-size` cap.
fn snapshot_cache(options: &TrainingOptions) -> Result<Option<SnapshotCache>> {
    if !(options.cache_size.is_finite() && options.cache_size >= 0.0) {
        return Err(UsageError(format!(
            "--cache-size must be a number of gigabytes, not {}",
            options.cache_size
        ))
        .into());
    }
    let max_bytes = (options.cache_size * 1e9) as u64;
    Ok(SnapshotCache::default_dir().map(|dir| SnapshotCache::new(dir).with_max_bytes(max_bytes)))
}

/// The start of `tune` and `grid`: read the photo, load the model, fit the photo to it and
/// fine-tune (or reuse cached snapshots).
fn load_and_tune(
    global: &GlobalOptions,
    image: &Path,
    size: Option<&str>,
    training: &TrainingOptions,
    settings: &TuneSettings,
    cancel: &CancelFlag,
) -> Result<(LoadedModel, Photos, TunedPhoto)> {
    let photo = load_photo(image)?;
    let mut loaded = load_model(global)?;
    let photos = fit_photo(photo, &loaded, size)?;
    let tuned = tune(&mut loaded, &photos.working, settings, training, cancel)?;
    Ok((loaded, photos, tuned))
}

/// Fine-tunes (or loads cached snapshots) with a progress bar showing loss and ETA.
pub(super) fn tune(
    loaded: &mut LoadedModel,
    working: &RgbImage,
    settings: &TuneSettings,
    training: &TrainingOptions,
    cancel: &CancelFlag,
) -> Result<TunedPhoto> {
    let cache = snapshot_cache(training)?;
    let policy = CachePolicy {
        cache: if training.no_cache {
            None
        } else {
            cache.as_ref()
        },
        model_identity: &loaded.identity,
    };
    let bar = ProgressBar::with_draw_target(
        Some(settings.total_steps() as u64),
        ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        ProgressStyle::with_template(
            "fine-tuning [{wide_bar}] {pos}/{len} steps, {msg}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    if loaded.model.device().is_cpu() && loaded.model.config.unet.block_out_channels[0] >= 128 {
        eprintln!(
            "warning: fine-tuning a full-size model on the CPU takes hours; build with --features cuda (or metal) for a GPU, try --train lora, or edit without fine-tuning with --tune-steps 0"
        );
    }
    eprintln!(
        "fine-tuning on the photo: {} weights, {}, lr {}, snapshots after {:?} steps",
        settings.mode,
        settings.optimizer.kind,
        settings.optimizer.learning_rate,
        settings.snapshot_steps
    );
    // Without a terminal the bar is hidden and its lines go nowhere.
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut first_step = true;
    let mut on_event = |event: TuneEvent| {
        match event {
            TuneEvent::CacheHit(path) => eprintln!("using cached snapshots: {}", path.display()),
            TuneEvent::CacheDamaged(reason) => {
                eprintln!("warning: ignoring a damaged cache entry ({reason}); fine-tuning again")
            }
            TuneEvent::Progress(p) => {
                if std::mem::take(&mut first_step) {
                    say(format!(
                        "{} photo(s) per pass, {} pass(es) per step",
                        p.micro_batch,
                        settings.batch_size / p.micro_batch
                    ));
                }
                bar.set_position(p.step as u64);
                bar.set_message(format!("loss {:.4}", p.loss));
                let note = if p.snapshot_taken {
                    ", snapshot kept"
                } else {
                    ""
                };
                if !bar.is_hidden() {
                    if p.snapshot_taken {
                        bar.println(format!(
                            "snapshot after {} steps (loss {:.4})",
                            p.step, p.loss
                        ));
                    }
                } else if p.snapshot_taken || p.step % 8 == 0 || p.step == 1 {
                    // No terminal (a log or a pipe): a line every few steps instead of a bar.
                    eprintln!(
                        "step {}/{}: loss {:.4}{note}, ETA {}s",
                        p.step,
                        p.total_steps,
                        p.loss,
                        p.eta().as_secs()
                    );
                }
            }
            TuneEvent::CacheWriteFailed(reason) => eprintln!(
                "warning: the snapshots could not be cached ({reason}); going on without the cache"
            ),
            TuneEvent::SnapshotKept(_) | TuneEvent::Preparing => {}
            TuneEvent::Resumed { steps, snapshots } => say(format!(
                "continuing the stopped fine-tune after step {steps} ({snapshots} snapshot(s) already done)"
            )),
            TuneEvent::ResumeSaved { steps } => eprintln!(
                "saved where fine-tuning stopped (after step {steps}); the same command continues from there"
            ),
            TuneEvent::Stored { dir, evicted } => {
                eprintln!("snapshots saved to {}", dir.display());
                if evicted > 0 {
                    eprintln!(
                        "removed the {evicted} least recently used cache entries to stay under the cache size limit"
                    );
                }
            }
        }
        cancel.check()
    };
    let result = tune_photo(
        &mut loaded.model,
        working,
        settings,
        &policy,
        None,
        &mut on_event,
    );
    bar.finish_and_clear();
    result.map_err(|stopped| {
        if let Some(partial) = &stopped.partial {
            eprintln!(
                "kept the snapshots after {:?} steps{}",
                partial.snapshot_steps(),
                partial
                    .cache_dir
                    .as_ref()
                    .map(|d| format!(" in {}", d.display()))
                    .unwrap_or_default()
            );
        }
        stopped.error.into()
    })
}

pub fn tune_command(global: &GlobalOptions, args: &TuneArgs, cancel: &CancelFlag) -> Result<()> {
    let settings = tune_settings(&args.training, None)?;
    if let Some(path) = &args.export_lora {
        check_lora_export(path, &settings)?;
    }
    let (loaded, photos, tuned) = load_and_tune(
        global,
        &args.image,
        args.size.as_deref(),
        &args.training,
        &settings,
        cancel,
    )?;
    match &tuned.cache_dir {
        Some(path) => println!("{}", path.display()),
        None => eprintln!("snapshots were not cached"),
    }
    if let Some(path) = &args.export_lora {
        let steps = settings.total_steps();
        write_lora(&loaded, &photos, &tuned, steps, path, &args.image)?;
    }
    Ok(())
}

/// Refuses a LoRA export that cannot work, before anything slow: only a fine-tune in lora
/// mode is a LoRA, and the file must be a `.safetensors`.
fn check_lora_export(path: &Path, settings: &TuneSettings) -> Result<()> {
    if !matches!(settings.mode, TrainMode::Lora { .. }) {
        return Err(UsageError(format!(
            "a LoRA can be exported only from a fine-tune in lora mode, not {}; add --train lora",
            settings.mode
        ))
        .into());
    }
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if !is_safetensors {
        return Err(UsageError(format!(
            "the LoRA file {} must end in .safetensors",
            path.display()
        ))
        .into());
    }
    Ok(())
}

/// Writes the snapshot after `steps` fine-tuning steps of `tuned` as a kohya-format LoRA.
fn write_lora(
    loaded: &LoadedModel,
    photos: &Photos,
    tuned: &TunedPhoto,
    steps: usize,
    path: &Path,
    image: &Path,
) -> Result<()> {
    let recipe_json = serde_json::json!({
        "tuning": TuneRecipe::from_settings(&tuned.settings),
        "model": loaded.name,
        "loras": loaded.loras,
        "precision": loaded.precision(),
        "working_width": photos.working.width(),
        "working_height": photos.working.height(),
        "source_image": image.file_name().map(|n| n.to_string_lossy().into_owned()),
    })
    .to_string();
    let output_name = crate::engine::lora::output_name(path);
    let info = LoraExportInfo {
        output_name: &output_name,
        base_model_name: &loaded.name,
        base_model_fingerprint: &loaded.identity,
        recipe_json: &recipe_json,
        token: &tuned.settings.token,
        steps,
        created_unix_secs: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    export_tuned(tuned, &loaded.model.config, path, &info)?;
    eprintln!(
        "LoRA of the snapshot after {steps} steps written (use the prompt \"{} ...\")",
        tuned.settings.token
    );
    println!("{}", path.display());
    Ok(())
}

/// `unitune export-lora`: the cached fine-tune of the photo and recipe as a LoRA file. Never
/// trains: without a cached snapshot it says which command makes one.
pub fn export_lora_command(
    global: &GlobalOptions,
    args: &ExportLoraArgs,
    cancel: &CancelFlag,
) -> Result<()> {
    let settings = tune_settings(&args.training, None)?;
    check_lora_export(&args.out, &settings)?;
    let steps = args.steps.unwrap_or_else(|| settings.total_steps());
    if !settings.snapshot_steps.contains(&steps) {
        return Err(UsageError(format!(
            "--steps {steps} is not one of the recipe's snapshots {:?}",
            settings.snapshot_steps
        ))
        .into());
    }
    if args.training.no_cache {
        return Err(UsageError(
            "export-lora reads the snapshot cache; --no-cache leaves nothing to export".into(),
        )
        .into());
    }
    let photo = load_photo(&args.image)?;
    let mut loaded = load_model(global)?;
    let photos = fit_photo(photo, &loaded, args.size.as_deref())?;
    let cache = snapshot_cache(&args.training)?;
    let policy = CachePolicy {
        cache: cache.as_ref(),
        model_identity: &loaded.identity,
    };
    // Training would start: stop at once and keep what the cache already held.
    let mut would_train = false;
    let mut on_event = |event: TuneEvent| match event {
        TuneEvent::Preparing | TuneEvent::Progress(_) => {
            would_train = true;
            std::ops::ControlFlow::Break(())
        }
        TuneEvent::CacheHit(dir) => {
            eprintln!("using cached snapshots: {}", dir.display());
            cancel.check()
        }
        _ => cancel.check(),
    };
    let tuned = match tune_photo(
        &mut loaded.model,
        &photos.working,
        &settings,
        &policy,
        None,
        &mut on_event,
    ) {
        Ok(tuned) => tuned,
        Err(stopped) if would_train => match stopped.partial {
            Some(partial) if partial.snapshot_steps().contains(&steps) => *partial,
            _ => {
                return Err(UsageError(format!(
                    "there is no cached fine-tune of {} with these options (snapshot after {steps} steps); run `unitune tune {} --train lora` with the same options first, or add --export-lora to it",
                    args.image.display(),
                    args.image.display()
                ))
                .into());
            }
        },
        Err(stopped) => return Err(stopped.error.into()),
    };
    write_lora(&loaded, &photos, &tuned, steps, &args.out, &args.image)
}

/// What one `unitune edit` runs: the method and its settings.
struct EditPlan {
    method: EditMethod,
    tune_steps: usize,
    /// SDEdit start (UniTune only).
    t0: Option<f64>,
    guidance: f64,
    fidelity: f64,
}

/// Refuses bad edit flags before anything slow starts.
fn check_edit_flags(args: &EditArgs) -> Result<()> {
    if let Some(f) = args.fidelity
        && !(0.0..=1.0).contains(&f)
    {
        return Err(UsageError(format!("--fidelity must be between 0 and 1, got {f}")).into());
    }
    if args.instruct.is_none() && args.image_guidance.is_some() {
        return Err(UsageError(
            "--image-guidance applies to instruction edits only (--instruct)".into(),
        )
        .into());
    }
    if let Some(image_guidance) = args.image_guidance
        && (!image_guidance.is_finite() || image_guidance < 0.0)
    {
        return Err(UsageError(format!(
            "--image-guidance must be a number of at least 0, got {image_guidance}"
        ))
        .into());
    }
    if let Some(t0) = args.t0
        && !(0.0..=1.0).contains(&t0)
    {
        return Err(UsageError(format!("--t0 must be between 0 and 1, got {t0}")).into());
    }
    if let Some(guidance) = args.guidance {
        check_guidance(guidance)?;
    }
    Ok(())
}

/// The settings an edit uses: the loaded model's fidelity table (for instructions, the image
/// guidance fidelity maps to), then the explicit overrides (checked by `check_edit_flags`).
fn edit_plan(args: &EditArgs, table: &FidelityTable) -> EditPlan {
    let fidelity = args.fidelity.unwrap_or(0.5);
    if args.instruct.is_some() {
        return EditPlan {
            method: EditMethod::Instruct {
                image_guidance: args
                    .image_guidance
                    .unwrap_or_else(|| image_guidance_for(fidelity)),
            },
            tune_steps: 0,
            t0: None,
            guidance: args.guidance.unwrap_or(DEFAULT_TEXT_GUIDANCE),
            fidelity,
        };
    }
    let row = table.parameters_for(fidelity, &args.training.snapshots);
    EditPlan {
        method: EditMethod::UniTune,
        tune_steps: args.tune_steps.unwrap_or(row.tune_steps),
        t0: Some(args.t0.unwrap_or(row.t0)),
        guidance: args.guidance.unwrap_or(row.guidance),
        fidelity,
    }
}

/// Refuses a method the loaded model cannot run, saying what to do instead.
fn check_method(plan: &EditPlan, loaded: &LoadedModel) -> Result<()> {
    let instruct_model = is_instruct_model(&loaded.model);
    match plan.method {
        EditMethod::Instruct { .. } if !instruct_model => Err(UsageError(format!(
            "--instruct needs an InstructPix2Pix model and {} is not one (its UNet takes {} input channels, not {}); try --model {DEFAULT_INSTRUCT_MODEL}, or describe the result with --prompt",
            loaded.name,
            loaded.model.config.unet.in_channels,
            2 * loaded.model.config.vae.latent_channels
        ))
        .into()),
        EditMethod::UniTune if instruct_model => Err(UsageError(format!(
            "{} is an InstructPix2Pix model: say how the photo should change with --instruct \"...\" instead of --prompt",
            loaded.name
        ))
        .into()),
        _ => Ok(()),
    }
}

fn warn_if_truncated(loaded: &LoadedModel, prompt: &str) {
    if let Ok(tokens) = loaded.model.tokenizer.encode(prompt)
        && tokens.dropped_tokens > 0
    {
        eprintln!(
            "warning: the prompt is too long for the model; its last {} tokens were ignored",
            tokens.dropped_tokens
        );
    }
}

/// `photo.jpg` -> `photo-edit.png` in the current folder (the photo's folder may be
/// read-only, e.g. a camera card).
fn default_edit_path(image: &Path) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "photo".into());
    PathBuf::from(format!("{stem}-edit.png"))
}

/// `out.png` with sample index k of n: `out.png` for one sample, else `out-1.png`, `out-2.png`.
fn numbered(path: &Path, k: usize, n: usize) -> PathBuf {
    if n == 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{}.{}", k + 1, ext.to_string_lossy()),
        None => format!("{stem}-{}", k + 1),
    };
    path.with_file_name(name)
}

pub fn edit_command(global: &GlobalOptions, args: &EditArgs, cancel: &CancelFlag) -> Result<()> {
    // clap makes sure exactly one of the two is given.
    let prompt = args
        .instruct
        .as_deref()
        .or(args.prompt.as_deref())
        .unwrap_or_default();
    check_prompt(prompt)?;
    check_edit_flags(args)?;
    check_sampling_steps(args.sampling_steps)?;
    if args.samples == 0 {
        return Err(UsageError("--samples must be at least 1".into()).into());
    }
    if let Some(out) = &args.out {
        check_output_extension(out)?;
    }
    check_preview_options(&args.previews)?;
    // The training options are checked now; the run's length waits for the model's table.
    let requested = tune_settings(&args.training, args.tune_steps)?;
    if let Some(path) = &args.export_lora {
        check_lora_export(path, &requested)?;
        // The tables never choose 0 steps (the ladder is never empty); only the flag can.
        if args.tune_steps == Some(0) {
            return Err(UsageError(
                "--export-lora needs a fine-tune, and --tune-steps 0 skips it".into(),
            )
            .into());
        }
    }
    let seed = choose_seed(args.seed);

    // Read the inputs before the slow parts, so a bad file fails at once.
    let photo = load_photo(&args.image)?;
    let (photo_w, photo_h) = photo.rgb.dimensions();
    let mask = match &args.mask {
        Some(path) => Some(imaging::load_mask(
            path,
            &DecodeLimits::default(),
            photo_w,
            photo_h,
        )?),
        None => None,
    };
    let mut loaded = load_model(global)?;
    let plan = edit_plan(args, loaded.model.info().fidelity_table);
    let tune_steps = plan.tune_steps;
    check_method(&plan, &loaded)?;
    let settings = tune_settings(&args.training, Some(tune_steps))?;
    let photos = fit_photo(photo, &loaded, args.size.as_deref())?;
    let tuned = if tune_steps > 0 {
        Some(tune(
            &mut loaded,
            &photos.working,
            &settings,
            &args.training,
            cancel,
        )?)
    } else {
        None
    };
    if let (Some(path), Some(tuned)) = (&args.export_lora, &tuned) {
        write_lora(&loaded, &photos, tuned, tune_steps, path, &args.image)?;
    }
    let token = tuned.as_ref().map(|t| t.settings.token.clone());
    let model_text = model_prompt(token.as_deref(), prompt);
    warn_if_truncated(&loaded, &model_text);
    let guidance = plan.guidance;
    match (plan.method, plan.t0) {
        (EditMethod::Instruct { image_guidance }, _) => eprintln!(
            "editing by instruction: text guidance {guidance:.2}, image guidance {image_guidance:.2}, first seed {seed}"
        ),
        (EditMethod::UniTune, t0) => eprintln!(
            "editing: {tune_steps} fine-tuning steps, t0 {:.3}, guidance {guidance:.2}, first seed {seed}",
            t0.unwrap_or(1.0)
        ),
    }

    let default = default_edit_path(&args.image);
    let base_out = match &args.out {
        Some(out) => out.clone(),
        None => default,
    };
    let previews = open_previews(global, &loaded, &args.previews);
    let mut preview = PreviewFile::new(
        &previews,
        args.previews.preview,
        preview_path(&args.previews, &base_out),
    );
    if let Some(preview) = &preview {
        eprintln!("live preview: {}", preview.path().display());
    }
    for k in 0..args.samples {
        let sample_seed = seed + k as u64;
        let request = EditRequest {
            method: plan.method,
            original: &photos.photo.rgb,
            working: &photos.working,
            prompt,
            baseline_prompt: args.baseline_prompt.as_deref(),
            tune_steps,
            t0: plan.t0.unwrap_or(1.0),
            guidance,
            sampling_steps: args.sampling_steps,
            seed: sample_seed,
            mask: mask.as_ref(),
            interpolate: args.interpolate,
        };
        let bar = step_bar(&format!("sample {}/{}", k + 1, args.samples));
        let mut observer = sampling_observer(&bar, cancel, preview.as_mut());
        let result = edit_photo(&loaded.model, tuned.as_ref(), &request, &mut observer);
        bar.finish_and_clear();
        let result = result?;

        let recipe = Recipe {
            method: plan.method.recipe_name(tune_steps),
            image_guidance: match plan.method {
                EditMethod::Instruct { image_guidance } => Some(image_guidance),
                EditMethod::UniTune => None,
            },
            model_prompt: model_text.clone(),
            baseline_prompt: args.baseline_prompt.clone().unwrap_or_default(),
            seed: sample_seed,
            sampling_steps: args.sampling_steps,
            guidance_weight: guidance,
            t0: plan.t0,
            fidelity: args.fidelity.map(|_| plan.fidelity),
            tune_steps,
            tuning: tuned
                .as_ref()
                .map(|t| TuneRecipe::from_settings(&t.settings)),
            mask: args.mask.as_ref().map(|m| m.display().to_string()),
            interpolate: args.interpolate,
            width: photo_w,
            height: photo_h,
            working_width: photos.working.width(),
            working_height: photos.working.height(),
            source_image: args
                .image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
            loras: loaded.loras.clone(),
            ..Recipe::new(
                "edit",
                prompt,
                &loaded.name,
                loaded.prediction_type(),
                loaded.precision(),
            )
        };
        let wanted = numbered(&base_out, k, args.samples);
        let (path, existing) = match (&args.out, args.overwrite) {
            (Some(_), true) => (wanted, ExistingFile::Overwrite),
            (Some(_), false) => (wanted, ExistingFile::Refuse),
            (None, _) => (imaging::next_free_path(&wanted), ExistingFile::Refuse),
        };
        imaging::export_image(
            &path,
            &result,
            photos.photo.alpha.as_ref(),
            &recipe.text_chunks(),
            existing,
        )
        .with_context(|| format!("the edit was not saved to {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

pub fn grid_command(global: &GlobalOptions, args: &GridArgs, cancel: &CancelFlag) -> Result<()> {
    check_prompt(&args.prompt)?;
    check_output_extension(&args.out)?;
    if args.t0_values.is_empty() || args.t0_values.iter().any(|t| !(0.0..=1.0).contains(t)) {
        return Err(UsageError("--t0-values must be numbers between 0 and 1".into()).into());
    }
    check_sampling_steps(args.sampling_steps)?;
    let settings = tune_settings(&args.training, None)?;
    let seed = choose_seed(args.seed);
    let (loaded, photos, tuned) = load_and_tune(
        global,
        &args.image,
        args.size.as_deref(),
        &args.training,
        &settings,
        cancel,
    )?;

    // Cells at the working size: the grid compares settings, not resolutions.
    let columns: Vec<usize> = std::iter::once(0).chain(tuned.snapshot_steps()).collect();
    let total = columns.len() * args.t0_values.len();
    let bar = step_bar("grid");
    bar.set_length(total as u64);
    let mut rows = Vec::with_capacity(args.t0_values.len());
    for &t0 in &args.t0_values {
        let mut row = Vec::with_capacity(columns.len());
        for &steps in &columns {
            let request = EditRequest {
                method: EditMethod::UniTune,
                original: &photos.working,
                working: &photos.working,
                prompt: &args.prompt,
                baseline_prompt: None,
                tune_steps: steps,
                t0,
                guidance: args.guidance,
                sampling_steps: args.sampling_steps,
                seed,
                mask: None,
                interpolate: false,
            };
            let mut observer = |_: &StepView| cancel.check();
            row.push(edit_photo(
                &loaded.model,
                Some(&tuned),
                &request,
                &mut observer,
            )?);
            bar.inc(1);
        }
        rows.push(row);
    }
    bar.finish_and_clear();
    let column_labels: Vec<String> = columns
        .iter()
        .map(|s| {
            if *s == 0 {
                "no fine-tuning".to_string()
            } else {
                format!("{s} steps")
            }
        })
        .collect();
    let row_labels: Vec<String> = args
        .t0_values
        .iter()
        .map(|t| format!("t0 {t:.2}"))
        .collect();
    let title = format!("{} | guidance {} | seed {seed}", args.prompt, args.guidance);
    let grid = imaging::labelled_grid(&rows, &column_labels, &row_labels, Some(&title))?;
    let recipe = Recipe {
        model_prompt: model_prompt(Some(&tuned.settings.token), &args.prompt),
        seed,
        sampling_steps: args.sampling_steps,
        guidance_weight: args.guidance,
        tune_steps: settings.total_steps(),
        tuning: Some(TuneRecipe::from_settings(&tuned.settings)),
        width: grid.width(),
        height: grid.height(),
        working_width: photos.working.width(),
        working_height: photos.working.height(),
        source_image: args
            .image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
        loras: loaded.loras.clone(),
        ..Recipe::new(
            "grid",
            &args.prompt,
            &loaded.name,
            loaded.prediction_type(),
            loaded.precision(),
        )
    };
    let existing = if args.overwrite {
        ExistingFile::Overwrite
    } else {
        ExistingFile::Refuse
    };
    imaging::export_image(&args.out, &grid, None, &recipe.text_chunks(), existing)
        .with_context(|| format!("the grid was not saved to {}", args.out.display()))?;
    println!("{}", args.out.display());
    Ok(())
}
