//! Instruction edits with an InstructPix2Pix model ("make it winter"): no fine-tuning, the
//! photo's latents are given to the UNet next to the noisy latents at every step.
//!
//! As diffusers' `StableDiffusionInstructPix2PixPipeline`: the UNet has twice the latent
//! channels as input (noisy latents, then the photo's unscaled latent mode); sampling starts
//! from pure noise; with guidance, one UNet call on a batch of three (instruction + photo,
//! empty prompt + photo, empty prompt + no photo) is combined as
//! `uncond + text * (full - photo_only) + image * (photo_only - uncond)`. Guidance is on when
//! the text weight is above 1 and the image weight at least 1, as in diffusers.

use candle_core::Tensor;
use image::{GrayImage, RgbImage};

use super::error::{EngineError, Result};
use super::model::StableDiffusion;
use super::noise::NoiseSource;
use super::sampling::{
    KnownRegion, NoisePredictor, SampleOutput, StepObserver, check_mask_size, check_proceed,
    denoise, latent_mask,
};

/// InstructPix2Pix's published defaults.
pub const DEFAULT_TEXT_GUIDANCE: f64 = 7.5;
pub const DEFAULT_IMAGE_GUIDANCE: f64 = 1.5;

/// The model this mode downloads when none is loaded (the model panel offers it).
pub const DEFAULT_INSTRUCT_MODEL: &str = "timbrooks/instruct-pix2pix";

/// Whether `model` is an InstructPix2Pix model: its UNet takes the photo's latents as well.
pub fn is_instruct_model(model: &StableDiffusion) -> bool {
    model.config.unet.in_channels == 2 * model.config.vae.latent_channels
}

/// The image guidance for the fidelity knob: 0 (expressive) is 1.0 (the photo conditions
/// but is not pushed towards), 0.5 the published default 1.5, 1 (faithful) 2.5, close to the
/// photo; piecewise linear through those three points, so the slider's middle is the
/// default.
pub fn image_guidance_for(fidelity: f64) -> f64 {
    let f = if fidelity.is_nan() {
        0.5
    } else {
        fidelity.clamp(0.0, 1.0)
    };
    if f <= 0.5 {
        1.0 + f
    } else {
        1.5 + 2.0 * (f - 0.5)
    }
}

#[derive(Debug, Clone)]
pub struct InstructRequest<'a> {
    /// The photo at its working size.
    pub image: &'a RgbImage,
    pub instruction: &'a str,
    pub text_guidance: f64,
    pub image_guidance: f64,
    pub sampling_steps: usize,
    pub seed: u64,
    /// White may change; elsewhere the photo is held at every step. Same size as `image`.
    pub mask: Option<&'a GrayImage>,
}

/// The conditioning of every step: the encoded prompts and the photo's latents, batched the
/// way the guidance combines them.
pub struct InstructGuidance {
    /// `[instruction; empty; empty]` when guiding, else `[instruction]`.
    context: Tensor,
    /// The photo's unscaled latents, `[photo; photo; zeros]` when guiding, else `[photo]`.
    image_latents: Tensor,
    text_weight: f64,
    image_weight: f64,
    guided: bool,
    pub prompt_tokens_dropped: usize,
}

impl InstructGuidance {
    /// `image_latents` is the photo's latent mode `[1, c, h, w]`, unscaled.
    pub fn new(
        model: &StableDiffusion,
        instruction: &str,
        image_latents: &Tensor,
        text_weight: f64,
        image_weight: f64,
    ) -> Result<Self> {
        for (name, w) in [("text", text_weight), ("image", image_weight)] {
            if !w.is_finite() || w < 0.0 {
                return Err(EngineError::InvalidRequest(format!(
                    "{name} guidance must be a number of at least 0, got {w}"
                )));
            }
        }
        let encoded = model.encode_prompt(instruction)?;
        let image_latents = image_latents.to_dtype(model.dtype())?;
        let guided = text_weight > 1.0 && image_weight >= 1.0;
        let (context, image_latents) = if guided {
            let empty = model.encode_prompt("")?.embedding;
            (
                Tensor::cat(&[&encoded.embedding, &empty, &empty], 0)?,
                Tensor::cat(
                    &[&image_latents, &image_latents, &image_latents.zeros_like()?],
                    0,
                )?,
            )
        } else {
            (encoded.embedding, image_latents)
        };
        Ok(Self {
            context,
            image_latents,
            text_weight,
            image_weight,
            guided,
            prompt_tokens_dropped: encoded.tokens.dropped_tokens,
        })
    }
}

impl NoisePredictor for InstructGuidance {
    fn predict(
        &self,
        model: &StableDiffusion,
        latents: &Tensor,
        timestep: usize,
    ) -> Result<Tensor> {
        let batch = self.image_latents.dim(0)?;
        let repeated = if batch == 1 {
            latents.clone()
        } else {
            Tensor::cat(&vec![latents; batch], 0)?
        };
        let input = Tensor::cat(&[&repeated, &self.image_latents], 1)?;
        let t = Tensor::new(vec![timestep as f32; batch], model.device())?;
        let out = model.unet.forward(&input, &t, &self.context)?;
        if !self.guided {
            return Ok(out);
        }
        let full = out.narrow(0, 0, 1)?;
        let photo_only = out.narrow(0, 1, 1)?;
        let uncond = out.narrow(0, 2, 1)?;
        let text = ((full - &photo_only)? * self.text_weight)?;
        let image = ((&photo_only - &uncond)? * self.image_weight)?;
        Ok(((uncond + text)? + image)?)
    }
}

/// Edits `request.image` by the instruction. Noise is drawn from the seed: the starting noise
/// (the photo's latents are its distribution's mode, which draws nothing).
pub fn sample_instruct(
    model: &StableDiffusion,
    request: &InstructRequest,
    observer: &mut dyn StepObserver,
) -> Result<SampleOutput> {
    if !is_instruct_model(model) {
        return Err(EngineError::InvalidRequest(format!(
            "instruction edits need an InstructPix2Pix model (a UNet with {} input channels), \
             but this model's UNet has {}; load {DEFAULT_INSTRUCT_MODEL} or use a prompt instead",
            2 * model.config.vae.latent_channels,
            model.config.unet.in_channels
        )));
    }
    if request.instruction.trim().is_empty() {
        return Err(EngineError::InvalidRequest(
            "the instruction is empty; say how the photo should change, e.g. \"make it winter\""
                .into(),
        ));
    }
    let image = request.image;
    check_mask_size(request.mask, image)?;
    let (channels, latent_h, latent_w) =
        model.latent_dims(image.width() as usize, image.height() as usize)?;
    let device = model.device();
    let dtype = model.dtype();

    let photo = model.vae.encode(&model.image_to_tensor(image)?)?.mean;
    check_proceed(observer)?;
    let guidance = InstructGuidance::new(
        model,
        request.instruction,
        &photo,
        request.text_guidance,
        request.image_guidance,
    )?;
    check_proceed(observer)?;

    let mut noise = NoiseSource::from_seed(request.seed);
    let start_noise = noise
        .normal((1, channels, latent_h, latent_w), device)?
        .to_dtype(dtype)?;
    let known = match request.mask {
        Some(mask) => Some(KnownRegion {
            photo_latents: (photo.to_dtype(dtype)? * model.config.vae.scaling_factor)?,
            mask: latent_mask(model, mask, latent_w, latent_h)?,
            noise: start_noise.clone(),
        }),
        None => None,
    };
    let steps = request.sampling_steps;
    let timesteps = model.scheduler.timesteps(steps)?;
    let latents = denoise(
        model,
        start_noise,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_guidance_follows_fidelity_through_the_published_default() {
        assert_eq!(image_guidance_for(0.0), 1.0);
        assert_eq!(image_guidance_for(0.5), DEFAULT_IMAGE_GUIDANCE);
        assert_eq!(image_guidance_for(1.0), 2.5);
        assert_eq!(image_guidance_for(7.0), 2.5);
        assert_eq!(image_guidance_for(f64::NAN), DEFAULT_IMAGE_GUIDANCE);
        let mut previous = image_guidance_for(0.0);
        for i in 1..=100 {
            let g = image_guidance_for(i as f64 / 100.0);
            assert!(g > previous, "not increasing at {i}");
            previous = g;
        }
    }
}
