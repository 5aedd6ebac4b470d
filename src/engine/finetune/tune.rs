//! Fine-tuning on a single photo (UniTune section 3.2): pairs of (photo, rare-token prompt),
//! batches of the same photo with independent noise and timesteps, the model's own
//! denoising loss, and snapshots of the trained weights after chosen step counts.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use image::RgbImage;

use super::adapter::{Adapter, Snapshot};
use super::mode::TrainMode;
use crate::engine::error::{EngineError, Result};
use crate::engine::model::StableDiffusion;
use crate::engine::noise::NoiseSource;
use crate::engine::optim::{Optimizer, OptimizerSettings};
use crate::engine::training::denoising_loss;

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
    /// This step's loss, averaged over its batch.
    pub loss: f32,
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
        if self.step == 0 {
            return Duration::ZERO;
        }
        self.elapsed
            .mul_f64((self.total_steps - self.step) as f64 / self.step as f64)
    }
}

/// Sees each step; `Break` stops fine-tuning with [`EngineError::Cancelled`].
pub trait TuneObserver {
    fn observe(&mut self, progress: &TuneProgress) -> ControlFlow<()>;

    /// Whether step `step` should come with a reconstruction (one extra UNet call).
    fn wants_reconstruction(&self, _step: usize) -> bool {
        false
    }
}

impl<F: FnMut(&TuneProgress) -> ControlFlow<()>> TuneObserver for F {
    fn observe(&mut self, progress: &TuneProgress) -> ControlFlow<()> {
        self(progress)
    }
}

/// Observes every step and asks for a reconstruction every `every` steps (and at the end).
pub struct ReconstructingObserver<F> {
    pub every: usize,
    pub total_steps: usize,
    pub observe: F,
}

impl<F: FnMut(&TuneProgress) -> ControlFlow<()>> TuneObserver for ReconstructingObserver<F> {
    fn observe(&mut self, progress: &TuneProgress) -> ControlFlow<()> {
        (self.observe)(progress)
    }

    fn wants_reconstruction(&self, step: usize) -> bool {
        step == self.total_steps || (self.every > 0 && step.is_multiple_of(self.every))
    }
}

/// The noise level the reconstruction starts from, as a fraction of the training timesteps:
/// noisy enough that an untrained model gets the photo visibly wrong.
const RECONSTRUCTION_T_FRACTION: f64 = 0.6;

/// Fine-tunes `adapter`'s weights on `photo` (already at the working size) and returns a
/// snapshot per requested step count. The weights are left at the last snapshot.
pub fn fine_tune(
    model: &StableDiffusion,
    adapter: &Adapter,
    photo: &RgbImage,
    settings: &TuneSettings,
    observer: &mut dyn TuneObserver,
) -> Result<Vec<Snapshot>> {
    settings.validate()?;
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
    let mut noise = NoiseSource::from_seed(settings.seed);

    // The photo is encoded once; each sample draws its own latent from the distribution.
    let distribution = model.vae.encode(&model.image_to_tensor(photo)?)?;
    let scaling = model.config.vae.scaling_factor;
    let micro = settings.micro_batch_size;
    let passes = settings.batch_size / micro;
    let context = model
        .encode_prompt(&settings.token)?
        .embedding
        .repeat((micro, 1, 1))?;
    let batch = settings.batch_size;
    let mean = distribution.mean.repeat((batch, 1, 1, 1))?;
    let std = distribution.std.repeat((batch, 1, 1, 1))?;
    let num_train_timesteps = model.scheduler.num_train_timesteps();

    // The reconstruction's noise has its own stream, so asking for previews never changes
    // the training itself.
    let reconstruction_latents = {
        let x0 = (&distribution.mean * scaling)?;
        let mut preview_noise = NoiseSource::from_seed(settings.seed ^ 0x7265_636f_6e73);
        let noise = preview_noise
            .normal(x0.shape(), device)?
            .to_dtype(x0.dtype())?;
        let t = (num_train_timesteps as f64 * RECONSTRUCTION_T_FRACTION) as usize;
        (model.scheduler.add_noise(&x0, &noise, &[t])?, t)
    };
    let mut optimizer = Optimizer::new(&settings.optimizer, adapter.vars().to_vec())?;
    let unet = adapter.training_unet();
    let total_steps = settings.total_steps();
    let mut snapshots = Vec::with_capacity(settings.snapshot_steps.len());
    let start = Instant::now();
    for step in 1..=total_steps {
        // The whole batch's randomness is drawn first, so accumulating micro-batches gives
        // the same update as one big batch.
        let latent_noise = noise.normal(mean.shape(), device)?.to_dtype(mean.dtype())?;
        let latents = ((&mean + (&std * latent_noise)?)? * scaling)?;
        let target_noise = noise.normal(mean.shape(), device)?.to_dtype(mean.dtype())?;
        let timesteps: Vec<usize> = (0..batch)
            .map(|_| noise.below(num_train_timesteps))
            .collect();

        let mut summed: Option<Vec<Tensor>> = None;
        let mut loss_total = 0f32;
        for pass in 0..passes {
            let range = pass * micro..(pass + 1) * micro;
            let loss = denoising_loss(
                unet,
                &model.scheduler,
                &latents.narrow(0, range.start, micro)?,
                &target_noise.narrow(0, range.start, micro)?,
                &timesteps[range],
                &context,
                None,
            )?;
            loss_total += loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
            // Each pass is a mean over its micro-batch; scale so the sum is the batch mean.
            let grads = (loss / passes as f64)?.backward()?;
            let mut pass_grads = Vec::with_capacity(adapter.vars().len());
            for (var, name) in adapter.vars().iter().zip(adapter.names()) {
                let grad = grads.get(var.as_tensor()).ok_or_else(|| {
                    EngineError::InvalidRequest(format!(
                        "no gradient reached {name}; it cannot be trained"
                    ))
                })?;
                pass_grads.push(grad.clone());
            }
            summed = Some(match summed {
                None => pass_grads,
                Some(sum) => sum
                    .iter()
                    .zip(&pass_grads)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        if let Some(grads) = summed {
            optimizer.step(&grads)?;
        }
        let snapshot_taken = settings.snapshot_steps.contains(&step);
        if snapshot_taken {
            snapshots.push(adapter.snapshot(step)?);
        }
        let reconstruction = if observer.wants_reconstruction(step) {
            let (noisy, t) = &reconstruction_latents;
            let context = context.narrow(0, 0, 1)?;
            let timestep = Tensor::new(&[*t as f32], device)?;
            let output = unet.forward(noisy, &timestep, &context)?.detach();
            let x0 = model.scheduler.step(&output, *t, noisy, 1)?.predicted_x0;
            Some(x0)
        } else {
            None
        };
        let progress = TuneProgress {
            step,
            total_steps,
            loss: loss_total / passes as f32,
            elapsed: start.elapsed(),
            snapshot_taken,
            reconstruction,
        };
        if observer.observe(&progress).is_break() {
            return Err(EngineError::Cancelled);
        }
    }
    Ok(snapshots)
}
