//! Fine-tuning on a single photo (UniTune section 3.2): pairs of (photo, rare-token prompt),
//! batches of the same photo with independent noise and timesteps, the model's own
//! denoising loss, and snapshots of the trained weights after chosen step counts.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use image::RgbImage;

use super::adapter::Adapter;
use super::mode::TrainMode;
use super::snapshot::Snapshot;
use super::step::TrainingRun;
use crate::engine::error::{EngineError, Result};
use crate::engine::finite::all_finite_together;
use crate::engine::memory::ReleaseFreeMemoryOnDrop;
use crate::engine::model::StableDiffusion;
use crate::engine::optim::{OptimizerSettings, OptimizerState};

/// The paper's rare token: "beikkpic".
pub const RARE_TOKEN: &str = "beikkpic";
/// The paper's snapshot ladder.
pub const PAPER_SNAPSHOTS: [usize; 4] = [16, 32, 64, 128];

/// A fine-tuning recipe. `Default` is the paper's: full model, Adafactor at 1e-4, batch 4,
/// 128 steps with snapshots after 16, 32, 64 and 128.
#[derive(Debug, Clone, PartialEq)]
pub struct TuneSettings {
    pub mode: TrainMode,
    pub optimizer: OptimizerSettings,
    /// Step counts after which the weights are kept, ascending; the last is the run's length.
    pub snapshot_steps: Vec<usize>,
    /// Photos per optimizer step (all the same photo, each with its own noise and timestep).
    pub batch_size: usize,
    /// Photos per forward/backward pass; gradients of `batch_size / micro_batch_size` passes
    /// are summed before each step (gradient accumulation, to fit small GPUs).
    pub micro_batch_size: usize,
    /// The prompt the photo is bound to.
    pub token: String,
    pub seed: u64,
    /// Recompute activations in backward instead of keeping them (see `UNet::checkpointed`):
    /// the same gradients for a fraction of the memory and about a third more time.
    pub checkpointing: bool,
    /// Lower the micro-batch to what the device's free memory holds (see
    /// [`super::choose_micro_batch`]) before starting, and halve it if a pass still runs out
    /// of memory; `micro_batch_size` is then the largest allowed. Off, the micro-batch is
    /// exactly `micro_batch_size`.
    pub auto_micro_batch: bool,
}

impl Default for TuneSettings {
    fn default() -> Self {
        Self {
            mode: TrainMode::Full,
            optimizer: OptimizerSettings::default(),
            snapshot_steps: PAPER_SNAPSHOTS.to_vec(),
            batch_size: 4,
            micro_batch_size: 4,
            token: RARE_TOKEN.to_string(),
            seed: 0,
            checkpointing: true,
            auto_micro_batch: true,
        }
    }
}

impl TuneSettings {
    pub fn total_steps(&self) -> usize {
        self.snapshot_steps.last().copied().unwrap_or(0)
    }

    pub fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(EngineError::InvalidRequest(m));
        if self.snapshot_steps.is_empty() || self.snapshot_steps[0] == 0 {
            return invalid("fine-tuning needs at least one snapshot step count above 0".into());
        }
        if self.snapshot_steps.windows(2).any(|w| w[0] >= w[1]) {
            return invalid(format!(
                "snapshot steps must increase, got {:?}",
                self.snapshot_steps
            ));
        }
        if self.batch_size == 0
            || self.micro_batch_size == 0
            || !self.batch_size.is_multiple_of(self.micro_batch_size)
        {
            return invalid(format!(
                "the micro-batch size ({}) must divide the batch size ({})",
                self.micro_batch_size, self.batch_size
            ));
        }
        if self.token.trim().is_empty() {
            return invalid("the rare-token prompt is empty".into());
        }
        if !(self.optimizer.learning_rate.is_finite() && self.optimizer.learning_rate > 0.0) {
            return invalid(format!(
                "the learning rate must be above 0, got {}",
                self.optimizer.learning_rate
            ));
        }
        Ok(())
    }
}

/// What the observer sees after each optimizer step.
#[derive(Debug, Clone)]
pub struct TuneProgress {
    pub step: usize,
    pub total_steps: usize,
    /// Steps done before this run started (a stopped fine-tune that continues), 0 otherwise.
    pub resumed_after: usize,
    /// This step's loss, averaged over its batch.
    pub loss: f32,
    /// Photos per forward and backward pass at this step.
    pub micro_batch: usize,
    pub elapsed: Duration,
    /// Set when this step's weights were kept as a snapshot.
    pub snapshot_taken: bool,
    /// The model's current reconstruction of the photo (scaled latents `[1, 4, h, w]`), on
    /// the steps the observer asked for one: it shows the user the model learning the photo.
    pub reconstruction: Option<Tensor>,
}

impl TuneProgress {
    /// Time left at the average pace so far.
    pub fn eta(&self) -> Duration {
        // A continued run has timed only the steps since it started.
        let done_here = self.step.saturating_sub(self.resumed_after);
        let left = self.total_steps.saturating_sub(self.step);
        time_left(self.elapsed, done_here, done_here + left).unwrap_or_default()
    }
}

/// Time left for `total` steps when `done` took `elapsed`, at the average pace so far; `None`
/// before the first step. The one ETA formula (the CLI's progress bar and the editor's).
pub fn time_left(elapsed: Duration, done: usize, total: usize) -> Option<Duration> {
    (done > 0).then(|| elapsed.mul_f64(total.saturating_sub(done) as f64 / done as f64))
}

/// Sees each step; `Break` stops fine-tuning with [`EngineError::Cancelled`].
pub trait TuneObserver {
    fn observe(&mut self, progress: &TuneProgress) -> ControlFlow<()>;

    /// Whether step `step` should come with a reconstruction (one extra UNet call).
    fn wants_reconstruction(&self, _step: usize) -> bool {
        false
    }

    /// Keeps the adapter's current values as the snapshot after `steps` steps: by default a
    /// copy in host memory; a caller with a cache writes it to disk instead.
    fn keep(&mut self, adapter: &Adapter, steps: usize) -> Result<Snapshot> {
        adapter.snapshot(steps)
    }

    /// Asked once the photo and prompt are encoded, before the first step (encoding a 512 px
    /// photo takes about as long as a step): `Break` stops there with
    /// [`EngineError::Cancelled`].
    fn proceed(&mut self) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    /// Fine-tuning stopped early (cancelled, or failed between steps) with the adapter's
    /// values and `state` consistent after `state.steps` steps: a caller that keeps them can
    /// later continue with [`fine_tune_from`] instead of starting again.
    fn stopped(&mut self, _adapter: &Adapter, _state: &TrainingState) -> Result<()> {
        Ok(())
    }
}

/// Where an interrupted fine-tune stood after its last whole step: with the adapter's values
/// at that step, enough to continue exactly as if it had never stopped.
#[derive(Debug, Clone)]
pub struct TrainingState {
    /// Whole optimizer steps taken.
    pub steps: usize,
    pub optimizer: OptimizerState,
    /// f16's dynamic loss scale and its count of good steps (`None` for other dtypes).
    pub loss_scale: Option<(f64, usize)>,
}

impl<F: FnMut(&TuneProgress) -> ControlFlow<()>> TuneObserver for F {
    fn observe(&mut self, progress: &TuneProgress) -> ControlFlow<()> {
        self(progress)
    }
}

/// Fine-tunes `adapter`'s weights on `photo` (already at the working size) and returns a
/// snapshot per requested step count (kept by the observer). The weights are left at the last
/// snapshot.
pub fn fine_tune(
    model: &StableDiffusion,
    adapter: &Adapter,
    photo: &RgbImage,
    settings: &TuneSettings,
    observer: &mut dyn TuneObserver,
) -> Result<Vec<Snapshot>> {
    fine_tune_from(model, adapter, photo, settings, None, observer)
}

/// [`fine_tune`], continuing from `resume` when given: the adapter must hold the values after
/// `resume.steps` steps (as [`TuneObserver::stopped`] saw them). Returns the snapshots taken
/// after that step only; the result is the same as that of a run that never stopped.
///
/// Each step: draw its randomness, take the optimizer step ([`TrainingRun::step`]: passes,
/// loss scaling, the out-of-memory retry), keep a snapshot when the ladder says so, make the
/// reconstruction the observer asked for, and let the observer see it (and stop the run).
pub fn fine_tune_from(
    model: &StableDiffusion,
    adapter: &Adapter,
    photo: &RgbImage,
    settings: &TuneSettings,
    resume: Option<&TrainingState>,
    observer: &mut dyn TuneObserver,
) -> Result<Vec<Snapshot>> {
    settings.validate()?;
    let first_step = resume.map_or(0, |r| r.steps) + 1;
    let total_steps = settings.total_steps();
    if first_step > total_steps {
        return Err(EngineError::InvalidRequest(format!(
            "cannot resume after step {} of a {total_steps}-step fine-tune",
            first_step - 1
        )));
    }
    if settings.mode != adapter.mode() {
        return Err(EngineError::InvalidRequest(format!(
            "the recipe trains {} weights but the adapter holds {}",
            settings.mode,
            adapter.mode()
        )));
    }
    // Dropped after `run`: the training state (f32 masters, gradients, the optimizer's moments:
    // 6 GB for SD 1.5's full fine-tune in f16) goes back to the system when the run ends, not
    // kept for reuse (see `tune_allocator`), so that the edit after it does not peak on top.
    let _release = ReleaseFreeMemoryOnDrop;
    // Encodes the prompt and the photo, and lets the text encoders go.
    let mut run = TrainingRun::prepare(model, adapter, photo, settings, resume)?;
    if observer.proceed().is_break() {
        return Err(EngineError::Cancelled);
    }
    adapter.mark_changed();
    let mut snapshots = Vec::with_capacity(settings.snapshot_steps.len());
    let start = Instant::now();
    for step in first_step..=total_steps {
        let draw = run.draw()?;
        // An overflow may lower the loss scale before the step fails; where the run stood
        // keeps the scale it had (the optimizer's state is unchanged until the update).
        let scale_before = run.loss_scale_state();
        let loss = match run.step(&draw) {
            Ok(loss) => loss,
            Err(failed) => {
                if failed.weights_intact && run.steps_taken() > 0 {
                    let before = TrainingState {
                        loss_scale: scale_before,
                        ..run.state()
                    };
                    // Best effort: the error is what the user needs to hear about.
                    let _ = observer.stopped(adapter, &before);
                }
                return Err(failed.error);
            }
        };
        let snapshot_taken = settings.snapshot_steps.contains(&step);
        if snapshot_taken {
            // A snapshot that is not all numbers is never kept, cached or exported.
            if !all_finite_together(
                &adapter
                    .vars()
                    .iter()
                    .map(|v| v.as_tensor().clone())
                    .collect::<Vec<_>>(),
            )? {
                return Err(EngineError::InvalidRequest(format!(
                    "fine-tuning diverged by step {step}: the trained weights stopped being finite numbers; the learning rate {} is too high (the paper's is 1e-4), lower it with --lr",
                    settings.optimizer.learning_rate
                )));
            }
            snapshots.push(observer.keep(adapter, step)?);
        } else {
            adapter.mark_changed();
        }
        let reconstruction = observer
            .wants_reconstruction(step)
            .then(|| run.reconstruct())
            .transpose()?;
        let progress = TuneProgress {
            step,
            total_steps,
            resumed_after: first_step - 1,
            loss,
            micro_batch: run.micro_batch,
            elapsed: start.elapsed(),
            snapshot_taken,
            reconstruction,
        };
        if observer.observe(&progress).is_break() {
            if step < total_steps {
                observer.stopped(adapter, &run.state())?;
            }
            return Err(EngineError::Cancelled);
        }
    }
    Ok(snapshots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_counts_only_the_steps_this_run_has_timed() {
        let progress = |step, resumed_after| TuneProgress {
            step,
            total_steps: 10,
            resumed_after,
            loss: 0.0,
            micro_batch: 1,
            elapsed: Duration::from_secs(2),
            snapshot_taken: false,
            reconstruction: None,
        };
        // 2 steps in 2 s, 4 to go: 4 s (not the 1.3 s that 6 steps in 2 s would mean).
        assert_eq!(progress(6, 4).eta(), Duration::from_secs(4));
        assert_eq!(progress(2, 0).eta(), Duration::from_secs(8));
        assert_eq!(progress(4, 4).eta(), Duration::ZERO);
    }
}
