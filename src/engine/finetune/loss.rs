//! The fine-tuning objective: the denoising loss of the model's own prediction type.

use candle_core::Tensor;

use crate::engine::conditioning::Conditioning;
use crate::engine::error::Result;
use crate::engine::layers::wide;
use crate::engine::scheduler::DdimScheduler;
use crate::engine::unet::UNet;

/// Mean squared error between the UNet's prediction for `latents` noised to `timesteps`
/// (one per batch element) and what it should predict (noise, velocity or sample).
///
/// `text` is the prompt's conditioning, one row per batch element. `extra_channels` holds
/// input channels appended after the noisy latents, for UNets with more than 4 inputs
/// (in-painting: mask + masked-image latents).
pub fn denoising_loss(
    unet: &UNet,
    scheduler: &DdimScheduler,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
    text: &Conditioning,
    extra_channels: Option<&Tensor>,
) -> Result<Tensor> {
    let noisy = scheduler.add_noise(latents, noise, timesteps)?;
    let noisy = match extra_channels {
        Some(extra) => Tensor::cat(&[&noisy, extra], 1)?,
        None => noisy,
    };
    let target = scheduler.training_target(latents, noise, timesteps)?;
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::new(t.as_slice(), latents.device())?;
    let prediction = text.predict(unet, &noisy, &t)?;
    // The squared errors are summed in f32 (as diffusers' `mse_loss(pred.float(), ...)`): a
    // half-precision sum of thousands of terms loses percents.
    let wide = wide(prediction.dtype());
    Ok((prediction.to_dtype(wide)? - target.to_dtype(wide)?)?
        .sqr()?
        .mean_all()?)
}
