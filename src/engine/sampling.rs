//! Sampling an image: classifier-free (or prompt) guidance, an optional SDEdit start from the
//! noised photo, DDIM steps, and one observer that sees each step and may stop the loop.
//!
//! The stages read in order: check the request, encode the prompts, set the timesteps,
//! prepare the latents, denoise, decode.

use std::ops::ControlFlow;

use candle_core::Tensor;
use image::{GrayImage, RgbImage};

use super::conditioning::Conditioning;
use super::error::{EngineError, Result};
use super::finite::all_finite;
use super::model::StableDiffusion;
use super::noise::NoiseSource;

/// Where sampling starts.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// Pure noise at the top of the schedule (text-to-image).
    Noise { width: usize, height: usize },
    /// SDEdit: the photo (already at the working size), noised to `t0_fraction` of the
    /// schedule. 0 returns the photo through the VAE, 1 is the same as starting from noise.
    Photo {
        image: &'a RgbImage,
        t0_fraction: f64,
        /// In-painting (paper A.1): white may change; elsewhere the latents are replaced at
        /// every step by the photo's latents noised to that step. Same size as `image`.
        mask: Option<&'a GrayImage>,
    },
}

#[derive(Debug, Clone)]
pub struct SampleRequest<'a> {
    pub prompt: &'a str,
    /// What guidance pushes away from: the empty prompt for classifier-free guidance, or a
    /// description of the photo for the paper's prompt guidance.
    pub baseline_prompt: &'a str,
    /// 1 disables guidance (one model call per step); the paper uses up to 32.
    pub guidance_weight: f64,
    pub sampling_steps: usize,
    pub seed: u64,
    pub start: Start<'a>,
}

/// What the observer sees after each denoising step.
pub struct StepView<'a> {
    /// 1-based index of the step just finished.
    pub step: usize,
    pub total_steps: usize,
    pub timestep: usize,
    /// The latents after this step.
    pub latents: &'a Tensor,
    /// The model's current guess of the final latents (the better preview).
    pub predicted_x0: &'a Tensor,
}

/// Sees every step; returning `Break` stops sampling with [`EngineError::Cancelled`].
pub trait StepObserver {
    fn observe(&mut self, view: &StepView) -> ControlFlow<()>;

    /// Asked between the stages that are not denoising steps (encoding the prompts and the
    /// photo, decoding the result, bringing it back to the photo's size), each about as long
    /// as a step at 512 px, so that a stop waits for one of them at most.
    fn proceed(&mut self) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// `Err(Cancelled)` when the observer says stop between stages.
pub(crate) fn check_proceed(observer: &mut dyn StepObserver) -> Result<()> {
    match observer.proceed() {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(EngineError::Cancelled),
    }
}

impl<F: FnMut(&StepView) -> ControlFlow<()>> StepObserver for F {
    fn observe(&mut self, view: &StepView) -> ControlFlow<()> {
        self(view)
    }
}

/// An observer that never stops anything.
pub fn no_observer() -> impl StepObserver {
    |_: &StepView| ControlFlow::Continue(())
}

#[derive(Debug)]
pub struct SampleOutput {
    pub image: RgbImage,
    pub latents: Tensor,
    /// The timesteps actually run (empty when t0 = 0).
    pub timesteps: Vec<usize>,
    pub prompt_tokens_dropped: usize,
}

/// What gives the model output at each step: the UNet call(s) and how their outputs combine.
/// Text guidance ([`Guidance`]) and InstructPix2Pix's text-and-image guidance
/// (`super::instruct::InstructGuidance`) share one denoising loop through it.
pub trait NoisePredictor {
    /// The (guided) model output for `latents` at `timestep`.
    fn predict(&self, model: &StableDiffusion, latents: &Tensor, timestep: usize)
    -> Result<Tensor>;
}

/// The text conditioning for every step: the prompt, and the baseline it is guided away from.
pub struct Guidance {
    /// `[baseline; prompt]` when guiding, just `[prompt]` when the weight is at most 1.
    conditioning: Conditioning,
    weight: f64,
    /// How many prompt tokens did not fit the text encoder.
    pub prompt_tokens_dropped: usize,
}

impl Guidance {
    /// Encodes the prompt (and the baseline, when guiding) for latents of `latent_size`
    /// `(h, w)` (SDXL's size numbers).
    ///
    /// A weight of at most 1 is no classifier-free guidance, the prompt alone, as in diffusers
    /// (`do_classifier_free_guidance = guidance_scale > 1`): SDXL Turbo is sampled at 0 and
    /// Lightning at 1, where `baseline + w (prompt - baseline)` would be the baseline.
    pub fn new(
        model: &StableDiffusion,
        prompt: &str,
        baseline_prompt: &str,
        weight: f64,
        latent_size: (usize, usize),
    ) -> Result<Self> {
        if !weight.is_finite() || weight < 0.0 {
            return Err(EngineError::InvalidRequest(format!(
                "guidance weight must be a number of at least 0, got {weight}"
            )));
        }
        let encoded = model.encode_prompt(prompt)?;
        let prompted = model.condition(&encoded, latent_size)?;
        let conditioning = if weight > 1.0 {
            let baseline = model.conditioning(baseline_prompt, latent_size)?;
            Conditioning::cat(&[&baseline, &prompted])?
        } else {
            prompted
        };
        Ok(Self {
            conditioning,
            weight,
            prompt_tokens_dropped: encoded.tokens.dropped_tokens,
        })
    }

    fn guided(&self) -> bool {
        self.weight > 1.0
    }
}

impl NoisePredictor for Guidance {
    /// The guided model output at one timestep: `eps_base + w * (eps_prompt - eps_base)`.
    fn predict(
        &self,
        model: &StableDiffusion,
        latents: &Tensor,
        timestep: usize,
    ) -> Result<Tensor> {
        let device = model.device();
        if !self.guided() {
            let t = Tensor::new(&[timestep as f32], device)?;
            return self.conditioning.predict(&model.unet, latents, &t);
        }
        // One UNet call on a batch of two, as diffusers does.
        let input = Tensor::cat(&[latents, latents], 0)?;
        let t = Tensor::new(&[timestep as f32, timestep as f32], device)?;
        let both = self.conditioning.predict(&model.unet, &input, &t)?;
        let baseline = both.narrow(0, 0, 1)?;
        let prompted = both.narrow(0, 1, 1)?;
        Ok((&baseline + ((prompted - &baseline)? * self.weight)?)?)
    }
}

/// The part of the photo that must not change, for masked editing.
pub struct KnownRegion {
    /// The photo's (scaled) latents.
    pub photo_latents: Tensor,
    /// Latent-resolution mask `[1, 1, h, w]` in [0, 1]: 1 may change.
    pub mask: Tensor,
    /// The noise the photo is re-noised with at every step.
    pub noise: Tensor,
}

impl KnownRegion {
    /// Puts the photo back outside the mask, at the noise level the latents just reached.
    fn apply(
        &self,
        model: &StableDiffusion,
        latents: &Tensor,
        reached: Option<usize>,
    ) -> Result<Tensor> {
        let known = match reached {
            Some(t) => model
                .scheduler
                .add_noise(&self.photo_latents, &self.noise, &[t])?,
            None => self.photo_latents.clone(),
        };
        let keep = (1.0 - &self.mask)?;
        Ok((latents.broadcast_mul(&self.mask)? + known.broadcast_mul(&keep)?)?)
    }
}

/// Refuses a mask whose size is not the photo's.
pub(crate) fn check_mask_size(mask: Option<&GrayImage>, image: &RgbImage) -> Result<()> {
    match mask {
        Some(mask) if mask.dimensions() != image.dimensions() => {
            Err(EngineError::InvalidRequest(format!(
                "the mask is {}x{} but the photo is {}x{}",
                mask.width(),
                mask.height(),
                image.width(),
                image.height()
            )))
        }
        _ => Ok(()),
    }
}

/// A pixel mask as a latent-resolution mask `[1, 1, h, w]` in [0, 1] (area-averaged).
pub fn latent_mask(
    model: &StableDiffusion,
    mask: &GrayImage,
    latent_w: usize,
    latent_h: usize,
) -> Result<Tensor> {
    let small = image::imageops::resize(
        mask,
        latent_w as u32,
        latent_h as u32,
        image::imageops::FilterType::Triangle,
    );
    let values: Vec<f32> = small.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(
        Tensor::from_vec(values, (1, 1, latent_h, latent_w), model.device())?
            .to_dtype(model.dtype())?,
    )
}

/// Runs DDIM over `timesteps` (a tail of a `steps`-step schedule) from `latents`, holding
/// `known` (if any) to the photo.
pub fn denoise(
    model: &StableDiffusion,
    mut latents: Tensor,
    timesteps: &[usize],
    steps: usize,
    guidance: &dyn NoisePredictor,
    known: Option<&KnownRegion>,
    observer: &mut dyn StepObserver,
) -> Result<Tensor> {
    let total_steps = timesteps.len();
    for (index, &timestep) in timesteps.iter().enumerate() {
        let model_output = guidance.predict(model, &latents, timestep)?;
        let out = model
            .scheduler
            .step(&model_output, timestep, &latents, steps)?;
        latents = match known {
            Some(region) => {
                let reached = model.scheduler.previous_timestep(timestep, steps);
                region.apply(model, &out.prev_sample, reached)?
            }
            None => out.prev_sample,
        };
        let view = StepView {
            step: index + 1,
            total_steps,
            timestep,
            latents: &latents,
            predicted_x0: &out.predicted_x0,
        };
        if observer.observe(&view).is_break() {
            return Err(EngineError::Cancelled);
        }
    }
    // Checked once, at the end: a read-back every step would stall a GPU between steps.
    if !all_finite(&latents)? {
        return Err(EngineError::NotFinite(
            "the edit's latents stopped being numbers while denoising (the model's numbers overflowed); try --precision f32, a lower guidance, or a LoRA at a lower weight".into(),
        ));
    }
    Ok(latents)
}

/// Refuses a model whose UNet takes more than the noisy latents (an InstructPix2Pix or an
/// in-painting model) for text-to-image sampling, SDEdit and fine-tuning, saying what it is.
pub fn check_text_to_image(model: &StableDiffusion) -> Result<()> {
    let latent = model.config.vae.latent_channels;
    let unet = model.config.unet.in_channels;
    if unet == latent {
        return Ok(());
    }
    Err(EngineError::InvalidRequest(
        if super::instruct::is_instruct_model(model) {
            "this is an InstructPix2Pix model: it edits by instruction (\"make it winter\") without fine-tuning, not by a description of the result".into()
        } else {
            format!(
                "this model's UNet takes {unet} input channels (an in-painting model?), but fine-tuning and sampling from a description need a text-to-image model whose UNet takes the {latent} latent channels"
            )
        },
    ))
}

/// Samples one image. Noise is drawn from the request's seed in a fixed order: the photo's
/// latent sample first (SDEdit only), then the starting noise.
pub fn sample(
    model: &StableDiffusion,
    request: &SampleRequest,
    observer: &mut dyn StepObserver,
) -> Result<SampleOutput> {
    // 1. Check the request.
    check_text_to_image(model)?;
    if request.prompt.trim().is_empty() {
        return Err(EngineError::InvalidRequest(
            "the prompt is empty; describe what the image should show".into(),
        ));
    }
    let (width, height, mask) = match request.start {
        Start::Noise { width, height } => (width, height, None),
        Start::Photo {
            image,
            t0_fraction,
            mask,
        } => {
            if !(0.0..=1.0).contains(&t0_fraction) {
                return Err(EngineError::InvalidRequest(format!(
                    "t0 must be between 0 and 1, got {t0_fraction}"
                )));
            }
            check_mask_size(mask, image)?;
            (image.width() as usize, image.height() as usize, mask)
        }
    };
    let (channels, latent_h, latent_w) = model.latent_dims(width, height)?;
    let shape = (1, channels, latent_h, latent_w);
    let device = model.device();
    let dtype = model.dtype();
    let mut noise = NoiseSource::from_seed(request.seed);

    // 2. Encode the prompts.
    let guidance = Guidance::new(
        model,
        request.prompt,
        request.baseline_prompt,
        request.guidance_weight,
        (latent_h, latent_w),
    )?;
    check_proceed(observer)?;

    // 3. Set the timesteps; 4. prepare the starting latents. The photo's latents are drawn
    // first, then the starting noise, always in that order.
    let steps = request.sampling_steps;
    let (t0_fraction, photo_latents) = match request.start {
        Start::Photo {
            image, t0_fraction, ..
        } if t0_fraction < 1.0 || mask.is_some() => {
            (t0_fraction, Some(model.encode_image(image, &mut noise)?))
        }
        Start::Photo { t0_fraction, .. } => (t0_fraction, None),
        Start::Noise { .. } => (1.0, None),
    };
    if photo_latents.is_some() {
        check_proceed(observer)?;
    }
    let start_noise = noise.normal(shape, device)?.to_dtype(dtype)?;
    let (timesteps, latents) = match &photo_latents {
        Some(photo) if t0_fraction < 1.0 => {
            let timesteps = model.scheduler.sdedit_timesteps(steps, t0_fraction)?;
            let latents = match timesteps.first() {
                Some(&t_start) => model.scheduler.add_noise(photo, &start_noise, &[t_start])?,
                None => photo.clone(),
            };
            (timesteps, latents)
        }
        // DDIM's initial noise sigma is 1: the noise is used as it is.
        _ => (model.scheduler.timesteps(steps)?, start_noise.clone()),
    };
    let known = match (mask, photo_latents) {
        (Some(mask), Some(photo_latents)) => Some(KnownRegion {
            photo_latents,
            mask: latent_mask(model, mask, latent_w, latent_h)?,
            noise: start_noise,
        }),
        _ => None,
    };

    // 5. Denoise; 6. decode.
    let latents = denoise(
        model,
        latents,
        &timesteps,
        steps,
        &guidance,
        known.as_ref(),
        observer,
    )?;
    check_proceed(observer)?;
    let image = model.decode_latents(&latents)?;
    Ok(SampleOutput {
        image,
        latents,
        timesteps,
        prompt_tokens_dropped: guidance.prompt_tokens_dropped,
    })
}
