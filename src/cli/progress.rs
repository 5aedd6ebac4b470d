//! What the command line shows while the service works: a fine-tuning bar with loss and ETA
//! (or a line every few steps without a terminal), a denoising bar, and the live preview file.
//! Ctrl-C stops the work between steps.

use std::ops::ControlFlow;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::cancel::CancelFlag;
use super::preview::PreviewFile;
use crate::engine::edit::TuneEvent;
use crate::engine::sampling::{StepObserver, StepView};
use crate::service::{EditService, TuneRequest, Tuned};

/// Fine-tunes (or takes the cached snapshots) with a progress bar showing loss and ETA.
pub(super) fn tune_with_progress(
    service: &mut EditService,
    request: &TuneRequest,
    cancel: &CancelFlag,
) -> Result<Tuned> {
    let settings = request.settings;
    if service.tuning_is_slow() {
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
                if !bar.is_hidden() {
                    if p.snapshot_taken {
                        bar.println(format!(
                            "snapshot after {} steps (loss {:.4})",
                            p.step, p.loss
                        ));
                    }
                } else if p.snapshot_taken || p.step % 8 == 0 || p.step == 1 {
                    // No terminal (a log or a pipe): a line every few steps instead of a bar.
                    let note = if p.snapshot_taken {
                        ", snapshot kept"
                    } else {
                        ""
                    };
                    eprintln!(
                        "step {}/{}: loss {:.4}{note}, ETA {}s",
                        p.step,
                        p.total_steps,
                        p.loss,
                        p.eta().as_secs()
                    );
                }
            }
            TuneEvent::Notice(sentence) => say(sentence.to_owned()),
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
    let result = service.tune(request, &mut on_event);
    bar.finish_and_clear();
    result.map_err(|stopped| {
        if !stopped.kept.is_empty() {
            eprintln!(
                "kept the snapshots after {:?} steps{}",
                stopped.kept,
                stopped
                    .cache_dir
                    .as_ref()
                    .map(|d| format!(" in {}", d.display()))
                    .unwrap_or_default()
            );
        }
        stopped.error.into()
    })
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

/// Warns when the prompt the model is given is longer than its text encoder takes.
pub(super) fn warn_if_truncated(service: &EditService, model_prompt: &str) {
    let dropped = service.tokens_dropped(model_prompt);
    if dropped > 0 {
        eprintln!(
            "warning: the prompt is too long for the model; its last {dropped} tokens were ignored"
        );
    }
}
