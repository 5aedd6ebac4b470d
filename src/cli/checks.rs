//! Flags checked before anything slow starts: each bad value is refused in one sentence
//! naming the flag, with exit code 2.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::UsageError;
use super::args::{SamplingOptions, TrainingOptions};
use crate::engine::finetune::TrainMode;
use crate::imaging::{self, ExistingFile};
use crate::service::{MicroBatch, TrainingChoice};

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

/// The output path: `--out` as given (refused if it exists unless --overwrite), or a fresh
/// numbered name that never replaces a file.
pub(super) fn output_path(options: &SamplingOptions, default: PathBuf) -> (PathBuf, ExistingFile) {
    match &options.out {
        Some(out) if options.overwrite => (out.clone(), ExistingFile::Overwrite),
        Some(out) => (out.clone(), ExistingFile::Refuse),
        None => (imaging::next_free_path(&default), ExistingFile::Refuse),
    }
}

/// The training flags as the service's choice; a bad name or number is refused here.
pub(super) fn training_choice(options: &TrainingOptions) -> Result<TrainingChoice> {
    let usage = |m: String| anyhow::Error::from(UsageError(m));
    let mut mode: TrainMode = options.train.parse().map_err(usage)?;
    if options.lora_rank == 0 {
        return Err(usage(
            "--lora-rank must be at least 1 (4 to 32 is usual)".into(),
        ));
    }
    if let TrainMode::Lora { rank } = &mut mode {
        *rank = options.lora_rank;
    }
    let micro_batch: MicroBatch = options.micro_batch.parse().map_err(|_| {
        usage(format!(
            "--micro-batch must be auto or a number that divides the batch of {}, not {}",
            TrainingChoice::default().batch_size,
            options.micro_batch
        ))
    })?;
    Ok(TrainingChoice {
        mode,
        optimizer: options.optimizer.parse().map_err(usage)?,
        learning_rate: options.lr,
        master_weights: !options.no_master_weights,
        snapshot_steps: options.snapshots.clone(),
        micro_batch,
        token: options.token.clone(),
        seed: options.tune_seed,
        ..TrainingChoice::default()
    })
}
