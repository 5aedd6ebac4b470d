//! `unitune tune` (fine-tune on a photo, keep the snapshots) and `unitune export-lora` (a
//! cached lora-mode fine-tune as a LoRA file, never training).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::UsageError;
use super::args::{ExportLoraArgs, GlobalOptions, TrainingOptions, TuneArgs};
use super::cancel::CancelFlag;
use super::checks::training_choice;
use super::model::{load_service, snapshot_cache};
use super::outputs::{Output, announce, check_outputs, command_inputs};
use super::progress::tune_with_progress;
use crate::engine::edit::TuneEvent;
use crate::imaging::{self, DecodeLimits, Photo};
use crate::service::{EditService, TuneRequest, WorkingSize, check_lora_export};

pub(super) fn load_photo(path: &Path) -> Result<Photo> {
    Ok(imaging::load_photo(path, &DecodeLimits::default())?)
}

/// `--size WxH`, read (without it the photo is fitted to the model).
pub(super) fn requested_size(size: Option<&str>) -> Result<WorkingSize> {
    Ok(size.map(imaging::parse_size).transpose()?.into())
}

/// The photo's file name for recipes (never its folder).
pub(super) fn file_name(path: &Path) -> Option<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Says the working size the service will fit the photo to.
pub(super) fn say_working_size(
    service: &EditService,
    photo: (u32, u32),
    size: WorkingSize,
) -> Result<()> {
    let (w, h) = service.working_size(photo, size)?;
    eprintln!("working size: {w}x{h}");
    Ok(())
}

/// The photo, read first so that a bad file fails before the slow model load, and the
/// service with the command's snapshot cache; says the working size.
fn photo_and_service(
    global: &GlobalOptions,
    image: &Path,
    training: &TrainingOptions,
    size: WorkingSize,
) -> Result<(Photo, EditService)> {
    let photo = load_photo(image)?;
    let service = load_service(global, snapshot_cache(training)?)?;
    say_working_size(&service, photo.dimensions(), size)?;
    Ok((photo, service))
}

pub fn tune_command(global: &GlobalOptions, args: &TuneArgs, cancel: &CancelFlag) -> Result<()> {
    let settings = training_choice(&args.training)?.settings(None)?;
    if let Some(path) = &args.export_lora {
        check_lora_export(path, &settings)?;
        check_lora_output("--export-lora", path, args.overwrite, global, &args.image)?;
    }
    let size = requested_size(args.size.as_deref())?;
    let (photo, mut service) = photo_and_service(global, &args.image, &args.training, size)?;
    let request = TuneRequest {
        photo: &photo.rgb,
        settings: &settings,
        size,
        reconstruct_every: None,
        lighter_mode_if_short: true,
    };
    let tuned = tune_with_progress(&mut service, &request, cancel)?;
    match &tuned.cache_dir {
        Some(path) => println!("{}", path.display()),
        None => eprintln!("snapshots were not cached"),
    }
    if let Some(path) = &args.export_lora {
        write_lora(
            &service,
            settings.total_steps(),
            path,
            &args.image,
            &settings.token,
        )?;
    }
    Ok(())
}

/// A LoRA file to write, checked before anything is computed (see `outputs`).
fn check_lora_output(
    flag: &'static str,
    path: &Path,
    overwrite: bool,
    global: &GlobalOptions,
    photo: &Path,
) -> Result<()> {
    let mut inputs = command_inputs(global)?;
    inputs.push(photo.to_path_buf());
    check_outputs(
        &[Output::new(flag, path, overwrite)],
        &inputs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    )
}

/// Writes the snapshot after `steps` fine-tuning steps as a kohya-format LoRA; `token` is
/// the word the photo is bound to.
pub(super) fn write_lora(
    service: &EditService,
    steps: usize,
    path: &Path,
    image: &Path,
    token: &str,
) -> Result<()> {
    service.export_lora(path, steps, file_name(image).as_deref())?;
    eprintln!("LoRA of the snapshot after {steps} steps written (use the prompt \"{token} ...\")");
    announce(path);
    Ok(())
}

/// `unitune export-lora`: the cached fine-tune of the photo and recipe as a LoRA file. Never
/// trains: without a cached snapshot it says which command makes one.
pub fn export_lora_command(
    global: &GlobalOptions,
    args: &ExportLoraArgs,
    cancel: &CancelFlag,
) -> Result<()> {
    let settings = training_choice(&args.training)?.settings(None)?;
    check_lora_export(&args.out, &settings)?;
    check_lora_output("--out", &args.out, args.overwrite, global, &args.image)?;
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
    let size = requested_size(args.size.as_deref())?;
    let (photo, mut service) = photo_and_service(global, &args.image, &args.training, size)?;
    let request = TuneRequest {
        photo: &photo.rgb,
        settings: &settings,
        size,
        reconstruct_every: None,
        lighter_mode_if_short: true,
    };
    let mut on_event = |event: TuneEvent| {
        if let TuneEvent::CacheHit(dir) = event {
            eprintln!("using cached snapshots: {}", dir.display());
        }
        cancel.check()
    };
    if service
        .tune_from_cache(&request, steps, &mut on_event)?
        .is_none()
    {
        return Err(UsageError(format!(
            "there is no cached fine-tune of {} with these options (snapshot after {steps} steps); run `unitune tune {} --train lora` with the same options first, or add --export-lora to it",
            args.image.display(),
            args.image.display()
        ))
        .into());
    }
    write_lora(&service, steps, &args.out, &args.image, &settings.token)
}
