//! Fine-tuning on a single photo (UniTune section 3.2): pairs of (photo, rare-token prompt),
//! batches of the same photo with independent noise and timesteps, the model's own
//! denoising loss, and snapshots of the trained weights after chosen step counts.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use image::RgbImage;

use super::adapter::Adapter;
use super::memory_plan::choose_micro_batch;
use super::mode::TrainMode;
use super::snapshot::Snapshot;
use crate::engine::autograd::{GradientAccumulator, accumulate_gradients, no_grad};
use crate::engine::error::{EngineError, Result};
use crate::engine::layers::wide;
use crate::engine::memory::MemoryProbe;
use crate::engine::model::StableDiffusion;
use crate::engine::noise::NoiseSource;
use crate::engine::optim::{Optimizer, OptimizerSettings, OptimizerState};
use crate::engine::training::denoising_loss;
use crate::engine::unet::UNet;

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

/// The noise level the reconstruction starts from, as a fraction of the training timesteps:
/// noisy enough that an untrained model gets the photo visibly wrong.
const RECONSTRUCTION_T_FRACTION: f64 = 0.6;

/// Dynamic loss scaling for f16 training (as PyTorch's `GradScaler`): the loss is multiplied
/// before backward so that small gradients do not flush to zero in f16, and divided out of
/// the gradients before the update; a step whose gradients overflowed is redone at half the
/// scale. bf16 and f32 have f32's range and need none.
struct LossScale {
    scale: f64,
    good_steps: usize,
}

impl LossScale {
    /// 2^12: high enough for SD's small gradients, low enough that a first overflow is rare.
    const INITIAL: f64 = 4096.0;
    /// Grow the scale after this many steps without an overflow.
    const GROWTH_INTERVAL: usize = 50;
    /// Below this the gradients are not finite for another reason than range.
    const MINIMUM: f64 = 1.0 / 1024.0;

    fn for_dtype(dtype: DType) -> Option<Self> {
        (dtype == DType::F16).then_some(Self {
            scale: Self::INITIAL,
            good_steps: 0,
        })
    }
}

const DIVERGED: &str =
    "fine-tuning diverged (the gradients are not finite); try a lower --lr or --precision f32";

/// The summed gradient of every variable; an error names a variable no gradient reached.
fn collect_gradients(adapter: &Adapter, sums: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    sums.into_iter()
        .zip(adapter.names())
        .map(|(sum, name)| {
            sum.ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "no gradient reached {name}; it cannot be trained"
                ))
            })
        })
        .collect()
}

/// True when every gradient is finite (one device-to-host read for all of them).
fn all_finite(grads: &[Tensor]) -> Result<bool> {
    let norms = grads
        .iter()
        .map(|g| g.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = Tensor::stack(&norms, 0)?.sum_all()?.to_dtype(DType::F32)?;
    Ok(total.to_scalar::<f32>()?.is_finite())
}

/// One forward and backward pass's inputs: latents, noise and timesteps per sample, and the
/// text conditioning.
pub struct TrainingBatch<'a> {
    pub latents: &'a Tensor,
    pub noise: &'a Tensor,
    pub timesteps: &'a [usize],
    pub context: &'a Tensor,
}

/// One forward and backward pass of the denoising loss; the gradients of `weight` times the
/// loss are added to `accumulator`. Returns the loss.
pub fn training_pass(
    model: &StableDiffusion,
    unet: &UNet,
    batch: &TrainingBatch,
    weight: f64,
    accumulator: &mut GradientAccumulator,
) -> Result<f32> {
    let loss = denoising_loss(
        unet,
        &model.scheduler,
        batch.latents,
        batch.noise,
        batch.timesteps,
        batch.context,
        None,
    )?;
    let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    accumulate_gradients(&(loss * weight)?, accumulator)?;
    Ok(value)
}

/// The randomness of one optimizer step: each sample's latent draw, target noise and
/// timestep. Drawn whole before the step, so that micro-batching, a step redone after an f16
/// overflow, or a run resumed after `n` steps (which draws and drops `n` of these) all train
/// on the same numbers.
struct StepDraw {
    latent_noise: Tensor,
    target_noise: Tensor,
    timesteps: Vec<usize>,
}

impl StepDraw {
    fn next(
        noise: &mut NoiseSource,
        shape: &candle_core::Shape,
        num_train_timesteps: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let latent_noise = noise.normal(shape, device)?;
        let target_noise = noise.normal(shape, device)?;
        let timesteps = (0..shape.dims()[0])
            .map(|_| noise.below(num_train_timesteps))
            .collect();
        Ok(Self {
            latent_noise,
            target_noise,
            timesteps,
        })
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
    if first_step > settings.total_steps() {
        return Err(EngineError::InvalidRequest(format!(
            "cannot resume after step {} of a {}-step fine-tune",
            first_step - 1,
            settings.total_steps()
        )));
    }
    if settings.mode != adapter.mode() {
        return Err(EngineError::InvalidRequest(format!(
            "the recipe trains {} weights but the adapter holds {}",
            settings.mode,
            adapter.mode()
        )));
    }
    let (width, height) = (photo.width() as usize, photo.height() as usize);
    model.latent_dims(width, height)?;
    let device = model.device();
    let dtype = model.dtype();
    let mut noise = NoiseSource::from_seed(settings.seed);

    // The photo is encoded once; each sample draws its own latent from the distribution.
    let image = model.image_to_tensor(photo)?;
    let distribution = no_grad(|| model.vae.encode(&image))?;
    let scaling = model.config.vae.scaling_factor;
    let mut micro = if settings.auto_micro_batch {
        let available = MemoryProbe::new(device).available_bytes();
        choose_micro_batch(model, settings, (width, height), available)
    } else {
        settings.micro_batch_size
    };
    let prompt = no_grad(|| model.encode_prompt(&settings.token))?.embedding;
    let mut context = prompt.repeat((micro, 1, 1))?;
    let batch = settings.batch_size;
    let mean = distribution.mean.repeat((batch, 1, 1, 1))?;
    let std = distribution.std.repeat((batch, 1, 1, 1))?;
    let num_train_timesteps = model.scheduler.num_train_timesteps();

    // The reconstruction's noise has its own stream, so asking for previews never changes
    // the training itself.
    let reconstruction_latents = {
        let x0 = (&distribution.mean * scaling)?.to_dtype(dtype)?;
        let mut preview_noise = NoiseSource::from_seed(settings.seed ^ 0x7265_636f_6e73);
        let noise = preview_noise.normal(x0.shape(), device)?.to_dtype(dtype)?;
        let t = (num_train_timesteps as f64 * RECONSTRUCTION_T_FRACTION) as usize;
        (model.scheduler.add_noise(&x0, &noise, &[t])?, t)
    };
    let mut optimizer = Optimizer::new(&settings.optimizer, adapter.vars().to_vec())?;
    let mut loss_scale = LossScale::for_dtype(dtype);
    if let Some(resume) = resume {
        optimizer.restore(&resume.optimizer)?;
        if let (Some(ls), Some((scale, good_steps))) = (loss_scale.as_mut(), resume.loss_scale) {
            ls.scale = scale;
            ls.good_steps = good_steps;
        }
        for _ in 1..first_step {
            StepDraw::next(
                &mut noise,
                mean.shape(),
                num_train_timesteps,
                &candle_core::Device::Cpu,
            )?;
        }
    }
    let unet = adapter.training_unet().checkpointed(settings.checkpointing);
    let mut accumulator = GradientAccumulator::new(adapter.vars(), wide(dtype));
    let total_steps = settings.total_steps();
    let mut snapshots = Vec::with_capacity(settings.snapshot_steps.len());
    let start = Instant::now();
    // Where a stop leaves the run: the values and state after the last whole step.
    let state_after = |optimizer: &Optimizer, loss_scale: Option<(f64, usize)>| TrainingState {
        steps: optimizer.steps_taken(),
        optimizer: optimizer.state(),
        loss_scale,
    };
    let loss_scale_state = |ls: &Option<LossScale>| ls.as_ref().map(|l| (l.scale, l.good_steps));
    if observer.proceed().is_break() {
        return Err(EngineError::Cancelled);
    }
    adapter.mark_changed();
    for step in first_step..=total_steps {
        let draw = StepDraw::next(&mut noise, mean.shape(), num_train_timesteps, device)?;
        let latents = ((&mean + (&std * draw.latent_noise.to_dtype(mean.dtype())?)?)? * scaling)?
            .to_dtype(dtype)?;
        let target_noise = draw.target_noise.to_dtype(dtype)?;
        let timesteps = draw.timesteps;

        // Until the update starts, a failure leaves the weights (and the loss scale, which an
        // overflow may already have lowered) as they were after the previous step.
        let mut updating = false;
        let scale_before = loss_scale_state(&loss_scale);
        let outcome = (|| -> Result<f32> {
            Ok('step: loop {
                let scale = loss_scale.as_ref().map_or(1.0, |s| s.scale);
                let passes = batch / micro;
                let mut loss_total = 0f32;
                for pass in 0..passes {
                    let range = pass * micro..(pass + 1) * micro;
                    let inputs = TrainingBatch {
                        latents: &latents.narrow(0, range.start, micro)?,
                        noise: &target_noise.narrow(0, range.start, micro)?,
                        timesteps: &timesteps[range],
                        context: &context,
                    };
                    // Each pass is a mean over its micro-batch; scale so the sum is the batch mean.
                    let weight = scale / passes as f64;
                    match training_pass(model, &unet, &inputs, weight, &mut accumulator) {
                        Ok(loss) => loss_total += loss,
                        // The estimate was too hopeful: the same step again in smaller passes
                        // (the same update, as the batch's randomness is already drawn).
                        Err(EngineError::OutOfMemory) if settings.auto_micro_batch && micro > 1 => {
                            accumulator.take();
                            micro = (1..micro)
                                .rev()
                                .find(|m| batch.is_multiple_of(*m))
                                .unwrap_or(1);
                            context = prompt.repeat((micro, 1, 1))?;
                            continue 'step;
                        }
                        Err(e) => return Err(e),
                    }
                }
                let mut grads = collect_gradients(adapter, accumulator.take())?;
                if let Some(ls) = loss_scale.as_mut() {
                    // Consumed one by one: each sum is freed as soon as it is unscaled, never a
                    // second full set of gradients (3.4 GB for SD 1.5's full fine-tune).
                    grads = grads
                        .into_iter()
                        .map(|g| g / ls.scale)
                        .collect::<candle_core::Result<_>>()?;
                    if !all_finite(&grads)? {
                        ls.scale /= 2.0;
                        ls.good_steps = 0;
                        if ls.scale < LossScale::MINIMUM {
                            return Err(EngineError::InvalidRequest(DIVERGED.into()));
                        }
                        continue;
                    }
                    ls.good_steps += 1;
                    if ls.good_steps.is_multiple_of(LossScale::GROWTH_INTERVAL) {
                        ls.scale *= 2.0;
                    }
                }
                updating = true;
                optimizer.step(&grads)?;
                break loss_total / passes as f32;
            })
        })();
        let loss = match outcome {
            Ok(loss) => loss,
            Err(e) => {
                if !updating && optimizer.steps_taken() > 0 {
                    accumulator.take();
                    // Best effort: the error is what the user needs to hear about.
                    let _ = observer.stopped(adapter, &state_after(&optimizer, scale_before));
                }
                return Err(e);
            }
        };
        let snapshot_taken = settings.snapshot_steps.contains(&step);
        if snapshot_taken {
            snapshots.push(observer.keep(adapter, step)?);
        } else {
            adapter.mark_changed();
        }
        let reconstruction = if observer.wants_reconstruction(step) {
            let (noisy, t) = &reconstruction_latents;
            let context = context.narrow(0, 0, 1)?;
            let timestep = Tensor::new(&[*t as f32], device)?;
            let output = no_grad(|| unet.forward(noisy, &timestep, &context))?;
            Some(model.scheduler.step(&output, *t, noisy, 1)?.predicted_x0)
        } else {
            None
        };
        let progress = TuneProgress {
            step,
            total_steps,
            resumed_after: first_step - 1,
            loss,
            micro_batch: micro,
            elapsed: start.elapsed(),
            snapshot_taken,
            reconstruction,
        };
        if observer.observe(&progress).is_break() {
            if step < total_steps {
                let state = state_after(&optimizer, loss_scale_state(&loss_scale));
                observer.stopped(adapter, &state)?;
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
