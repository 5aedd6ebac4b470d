//! One fine-tuning run's inputs and its optimizer step: the photo's latent distribution and
//! the prompt encoded once, each step's randomness drawn whole before it, the passes of a
//! step (micro-batches), f16 loss scaling, and the one place a step that ran out of memory is
//! retried in smaller passes.

use candle_core::{DType, Device, Shape, Tensor};
use image::RgbImage;

use super::adapter::Adapter;
use super::loss::denoising_loss;
use super::loss_scale::{LossScaler, Unscaled};
use super::memory_plan::choose_micro_batch;
use super::segment_updates::SegmentUpdates;
use super::tune::{TrainingState, TuneSettings};
use crate::engine::autograd::{GradientAccumulator, GradientSink, accumulate_gradients, no_grad};
use crate::engine::conditioning::Conditioning;
use crate::engine::error::{EngineError, Result};
use crate::engine::finite::all_finite_together;
use crate::engine::layers::wide;
use crate::engine::memory::MemoryProbe;
use crate::engine::model::StableDiffusion;
use crate::engine::noise::NoiseSource;
use crate::engine::optim::Optimizer;
use crate::engine::unet::UNet;

/// The noise level the reconstruction starts from, as a fraction of the training timesteps:
/// noisy enough that an untrained model gets the photo visibly wrong.
const RECONSTRUCTION_T_FRACTION: f64 = 0.6;

/// One forward and backward pass's inputs: latents, noise and timesteps per sample, and the
/// text conditioning.
pub struct TrainingBatch<'a> {
    pub latents: &'a Tensor,
    pub noise: &'a Tensor,
    pub timesteps: &'a [usize],
    pub text: &'a Conditioning,
}

/// One forward and backward pass of the denoising loss; the gradients of `weight` times the
/// loss go to `sink` (summed by a [`GradientAccumulator`]). Returns the loss.
pub fn training_pass<S: GradientSink + Default>(
    model: &StableDiffusion,
    unet: &UNet,
    batch: &TrainingBatch,
    weight: f64,
    sink: &mut S,
) -> Result<f32> {
    let loss = denoising_loss(
        unet,
        &model.scheduler,
        batch.latents,
        batch.noise,
        batch.timesteps,
        batch.text,
        None,
    )?;
    let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    accumulate_gradients(&(loss * weight)?, sink)?;
    Ok(value)
}

/// The randomness of one optimizer step: each sample's latent draw, target noise and
/// timestep. Drawn whole before the step, so that micro-batching, a step redone after an f16
/// overflow, or a run resumed after `n` steps (which draws and drops `n` of these) all train
/// on the same numbers.
pub(super) struct StepDraw {
    latent_noise: Tensor,
    target_noise: Tensor,
    timesteps: Vec<usize>,
}

/// Why a step failed, and whether the weights are still those after the previous step (a
/// failure before the update starts), so that where the run stood can be kept.
pub(super) struct StepFailed {
    pub error: EngineError,
    pub weights_intact: bool,
}

impl From<EngineError> for StepFailed {
    fn from(error: EngineError) -> Self {
        Self {
            error,
            weights_intact: true,
        }
    }
}

impl From<candle_core::Error> for StepFailed {
    fn from(error: candle_core::Error) -> Self {
        EngineError::from(error).into()
    }
}

/// How one attempt at a step ended, short of an error.
enum Attempt {
    Updated {
        loss: f32,
    },
    /// f16 gradients overflowed; the scale is lower now.
    Overflowed,
    /// A pass ran out of memory with room to use smaller passes.
    OutOfMemory,
}

/// A fine-tuning run between its steps: everything the next step needs.
pub(super) struct TrainingRun<'a> {
    model: &'a StableDiffusion,
    adapter: &'a Adapter,
    settings: &'a TuneSettings,
    unet: UNet,
    noise: NoiseSource,
    /// The photo's latent distribution, repeated for the batch.
    mean: Tensor,
    std: Tensor,
    scaling: f64,
    /// The prompt's conditioning, and repeated for one pass.
    prompt: Conditioning,
    text: Conditioning,
    /// Photos per pass, lowered when a pass runs out of memory.
    pub micro_batch: usize,
    optimizer: Optimizer,
    loss_scale: Option<LossScaler>,
    /// The noised photo latents and timestep the reconstruction denoises.
    reconstruction: (Tensor, usize),
}

impl<'a> TrainingRun<'a> {
    /// Encodes the photo and the prompt, chooses the micro-batch and sets up the optimizer;
    /// a run continuing from `resume` takes its optimizer and loss-scale state and skips the
    /// randomness of the steps it already took.
    pub fn prepare(
        model: &'a StableDiffusion,
        adapter: &'a Adapter,
        photo: &RgbImage,
        settings: &'a TuneSettings,
        resume: Option<&TrainingState>,
    ) -> Result<Self> {
        let (width, height) = (photo.width() as usize, photo.height() as usize);
        let (_, latent_h, latent_w) = model.latent_dims(width, height)?;
        let device = model.device();
        let dtype = model.dtype();
        let prompt = no_grad(|| model.conditioning(&settings.token, (latent_h, latent_w)))?;
        // The prompt is encoded once and the text encoders are not needed again until the next
        // edit. They leave before the photo's VAE encode, the fine-tune's largest moment
        // otherwise: SDXL's encoders are 1.6 GB and its VAE encode at 1024 px takes 2.9 GB.
        model.release_text_encoders();
        // The photo is encoded once; each sample draws its own latent from the distribution.
        let image = model.image_to_tensor(photo)?;
        let distribution = no_grad(|| model.vae.encode(&image))?;
        let scaling = model.config.vae.scaling_factor;
        let micro_batch = if settings.auto_micro_batch {
            let available = MemoryProbe::new(device).available_bytes();
            choose_micro_batch(model, settings, (width, height), available)
        } else {
            settings.micro_batch_size
        };
        let text = prompt.repeat(micro_batch)?;
        let batch = settings.batch_size;
        let mean = distribution.mean.repeat((batch, 1, 1, 1))?;
        let std = distribution.std.repeat((batch, 1, 1, 1))?;
        let num_train_timesteps = model.scheduler.num_train_timesteps();

        // The reconstruction's noise has its own stream, so asking for previews never changes
        // the training itself.
        let reconstruction = {
            let x0 = (&distribution.mean * scaling)?.to_dtype(dtype)?;
            let mut preview_noise = NoiseSource::from_seed(settings.seed ^ 0x7265_636f_6e73);
            let noise = preview_noise.normal(x0.shape(), device)?.to_dtype(dtype)?;
            let t = (num_train_timesteps as f64 * RECONSTRUCTION_T_FRACTION) as usize;
            (model.scheduler.add_noise(&x0, &noise, &[t])?, t)
        };
        let mut optimizer = Optimizer::new(&settings.optimizer, adapter.vars().to_vec())?;
        let mut loss_scale = LossScaler::for_dtype(dtype);
        let mut noise = NoiseSource::from_seed(settings.seed);
        if let Some(resume) = resume {
            optimizer.restore(&resume.optimizer)?;
            if let (Some(scaler), Some(state)) = (loss_scale.as_mut(), resume.loss_scale) {
                scaler.restore(state);
            }
            for _ in 0..resume.steps {
                StepDraw::next(&mut noise, mean.shape(), num_train_timesteps, &Device::Cpu)?;
            }
        }
        Ok(Self {
            model,
            adapter,
            settings,
            unet: adapter.training_unet().checkpointed(settings.checkpointing),
            noise,
            mean,
            std,
            scaling,
            prompt,
            text,
            micro_batch,
            optimizer,
            loss_scale,
            reconstruction,
        })
    }

    /// Whole optimizer steps taken (a continued run counts its earlier ones).
    pub fn steps_taken(&self) -> usize {
        self.optimizer.steps_taken()
    }

    /// The f16 loss scale and its good steps (`None` for other dtypes).
    pub fn loss_scale_state(&self) -> Option<(f64, usize)> {
        self.loss_scale.map(|s| s.state())
    }

    /// Where the run stands after its last whole step. Holds the optimizer's state: taken
    /// only when the run stops, never kept across a step.
    pub fn state(&self) -> TrainingState {
        TrainingState {
            steps: self.optimizer.steps_taken(),
            optimizer: self.optimizer.state(),
            loss_scale: self.loss_scale.map(|s| s.state()),
        }
    }

    /// Draws the next step's randomness.
    pub fn draw(&mut self) -> Result<StepDraw> {
        StepDraw::next(
            &mut self.noise,
            self.mean.shape(),
            self.model.scheduler.num_train_timesteps(),
            self.model.device(),
        )
    }

    /// One optimizer step on `draw`: redone at a lower loss scale after an f16 overflow, and
    /// in smaller passes after running out of memory (the same update either way: the batch's
    /// randomness is already drawn). Returns the step's loss, averaged over its batch.
    pub fn step(&mut self, draw: &StepDraw) -> std::result::Result<f32, StepFailed> {
        let dtype = self.model.dtype();
        let latents = ((&self.mean
            + (&self.std * draw.latent_noise.to_dtype(self.mean.dtype())?)?)?
            * self.scaling)?
            .to_dtype(dtype)?;
        let target_noise = draw.target_noise.to_dtype(dtype)?;
        loop {
            let attempt = self
                .attempt(&latents, &target_noise, &draw.timesteps)
                .map_err(|mut failed| {
                    // A step updated segment by segment may have changed some weights already.
                    failed.weights_intact &= !self.optimizer.step_begun();
                    failed
                })?;
            match attempt {
                Attempt::Updated { loss } => return Ok(loss),
                Attempt::Overflowed => {}
                Attempt::OutOfMemory => self.use_smaller_passes()?,
            }
        }
    }

    fn attempt(
        &mut self,
        latents: &Tensor,
        target_noise: &Tensor,
        timesteps: &[usize],
    ) -> std::result::Result<Attempt, StepFailed> {
        if self.micro_batch == self.settings.batch_size {
            self.attempt_in_one_pass(latents, target_noise, timesteps)
        } else {
            self.attempt_in_passes(latents, target_noise, timesteps)
        }
    }

    /// The step as one pass over the whole batch (what `--micro-batch auto` picks when it
    /// fits): each segment's variables are updated as backward reaches them, so no whole set
    /// of gradients is ever held (see `segment_updates`).
    fn attempt_in_one_pass(
        &mut self,
        latents: &Tensor,
        target_noise: &Tensor,
        timesteps: &[usize],
    ) -> std::result::Result<Attempt, StepFailed> {
        let scale = self.loss_scale.map_or(1.0, |s| s.scale());
        let mut updates = SegmentUpdates::new(std::mem::take(&mut self.optimizer), 1.0 / scale);
        let pass = self.pass(0, latents, target_noise, timesteps, scale, &mut updates);
        let overflowed = updates.overflowed();
        self.optimizer = updates.into_optimizer();
        let loss = match pass {
            Ok(loss) => loss,
            Err(EngineError::OutOfMemory)
                if self.settings.auto_micro_batch && self.micro_batch > 1 =>
            {
                return Ok(Attempt::OutOfMemory);
            }
            Err(e) => return Err(e.into()),
        };
        let finite = !overflowed && loss.is_finite();
        match self.loss_scale.as_mut() {
            Some(scaler) => {
                if let Unscaled::Overflowed = scaler.record(finite)? {
                    return Ok(Attempt::Overflowed);
                }
            }
            None if !finite => return Err(self.diverged(loss).into()),
            None => {}
        }
        if let Some(index) = self.optimizer.pending().next() {
            return Err(unreached(&self.adapter.names()[index]).into());
        }
        self.optimizer.finish_step()?;
        Ok(Attempt::Updated { loss })
    }

    /// The step as several passes, their gradients summed in f32 (which loses nothing between
    /// passes), then one update.
    fn attempt_in_passes(
        &mut self,
        latents: &Tensor,
        target_noise: &Tensor,
        timesteps: &[usize],
    ) -> std::result::Result<Attempt, StepFailed> {
        let passes = self.settings.batch_size / self.micro_batch;
        let scale = self.loss_scale.map_or(1.0, |s| s.scale());
        // Per attempt: an attempt that fails drops what it summed with it.
        let dtype = self.model.dtype();
        let mut accumulator = GradientAccumulator::new(self.adapter.vars(), wide(dtype));
        let mut loss_total = 0f32;
        for pass in 0..passes {
            // Each pass is a mean over its micro-batch; scale so the sum is the batch mean.
            let weight = scale / passes as f64;
            match self.pass(
                pass,
                latents,
                target_noise,
                timesteps,
                weight,
                &mut accumulator,
            ) {
                Ok(loss) => loss_total += loss,
                // The estimate was too hopeful: the step again in smaller passes.
                Err(EngineError::OutOfMemory)
                    if self.settings.auto_micro_batch && self.micro_batch > 1 =>
                {
                    return Ok(Attempt::OutOfMemory);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let sums = accumulator.take();
        let grads = collect_gradients(self.adapter, sums)?;
        let mut grad_scale = 1.0;
        match self.loss_scale.as_mut() {
            Some(scaler) => match scaler.unscale(&grads)? {
                Unscaled::Finite { factor } => grad_scale = factor,
                Unscaled::Overflowed => return Ok(Attempt::Overflowed),
            },
            // Without a loss scale nothing is redone: a loss or gradient that is not a number
            // stops the run before it reaches the weights.
            None if !loss_total.is_finite() || !all_finite_together(&grads)? => {
                return Err(self.diverged(loss_total).into());
            }
            None => {}
        }
        self.optimizer
            .step_scaled(&grads, grad_scale)
            .map_err(|error| StepFailed {
                error,
                weights_intact: false,
            })?;
        Ok(Attempt::Updated {
            loss: loss_total / passes as f32,
        })
    }

    /// Pass number `pass` of the step (its slice of the batch), its gradients times `weight`
    /// into `sink`.
    fn pass<S: GradientSink + Default>(
        &self,
        pass: usize,
        latents: &Tensor,
        target_noise: &Tensor,
        timesteps: &[usize],
        weight: f64,
        sink: &mut S,
    ) -> Result<f32> {
        let micro = self.micro_batch;
        let range = pass * micro..(pass + 1) * micro;
        let inputs = TrainingBatch {
            latents: &latents.narrow(0, range.start, micro)?,
            noise: &target_noise.narrow(0, range.start, micro)?,
            timesteps: &timesteps[range],
            text: &self.text,
        };
        training_pass(self.model, &self.unet, &inputs, weight, sink)
    }

    /// Why the run stopped: its numbers stopped being numbers, most often from a learning rate
    /// far too high.
    fn diverged(&self, loss: f32) -> EngineError {
        EngineError::InvalidRequest(format!(
            "fine-tuning diverged at step {}: the loss became {loss} (not a finite number); the learning rate {} is too high (the paper's is 1e-4), lower it with --lr",
            self.optimizer.steps_taken() + 1,
            self.settings.optimizer.learning_rate
        ))
    }

    /// The next smaller micro-batch that divides the batch.
    fn use_smaller_passes(&mut self) -> Result<()> {
        let batch = self.settings.batch_size;
        self.micro_batch = (1..self.micro_batch)
            .rev()
            .find(|m| batch.is_multiple_of(*m))
            .unwrap_or(1);
        self.text = self.prompt.repeat(self.micro_batch)?;
        Ok(())
    }

    /// The model's current reconstruction of the photo (scaled latents `[1, 4, h, w]`): one
    /// UNet call from the photo noised to 60%.
    pub fn reconstruct(&self) -> Result<Tensor> {
        let (noisy, t) = &self.reconstruction;
        let text = self.text.narrow(0, 1)?;
        let timestep = Tensor::new(&[*t as f32], self.model.device())?;
        let output = no_grad(|| text.predict(&self.unet, noisy, &timestep))?;
        Ok(self
            .model
            .scheduler
            .step(&output, *t, noisy, 1)?
            .predicted_x0)
    }
}

impl StepDraw {
    fn next(
        noise: &mut NoiseSource,
        shape: &Shape,
        num_train_timesteps: usize,
        device: &Device,
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

/// The summed gradient of every variable; an error names a variable no gradient reached.
fn collect_gradients(adapter: &Adapter, sums: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    sums.into_iter()
        .zip(adapter.names())
        .map(|(sum, name)| sum.ok_or_else(|| unreached(name)))
        .collect()
}

fn unreached(name: &str) -> EngineError {
    EngineError::InvalidRequest(format!("no gradient reached {name}; it cannot be trained"))
}
