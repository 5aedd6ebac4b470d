//! How much memory a fine-tune needs, to choose the micro-batch before starting (a user should
//! never see an out-of-memory error for the default settings).
//!
//! Estimated, not measured, so it errs on the large side: what training keeps for the trained
//! weights (f32 master copies for half precision, the gradients, the optimizer's state),
//! plus the activations of the passes, which grow with the micro-batch and the image.

use candle_core::DType;

use super::mode::{DEFAULT_LORA_RANK, TrainMode};
use super::tune::TuneSettings;
use crate::engine::model::StableDiffusion;
use crate::engine::optim::{OptimizerKind, OptimizerSettings};

/// Activation bytes per latent pixel per sample of one pass in f32 (halved in f16 and bf16),
/// from SD 1.5's UNet at 512 px measured by `unitune bench` (docs/performance.md): 0.62 to
/// 0.66 GB above the loaded model for a checkpointed pass of cross-kv or LoRA, 1.9 to 2.4 GB
/// without checkpointing, over 64x64 latent pixels; rounded up by a tenth.
const CHECKPOINTED_BYTES_PER_LATENT_PIXEL: u64 = 180_000;
const PLAIN_BYTES_PER_LATENT_PIXEL: u64 = 650_000;
/// The largest checkpointed segment's share of the UNet's weights: each of SDXL's ten-block
/// transformers at its lowest level holds 13.7% (SD 1.5's largest, a resnet at 1280 channels
/// in the first up block, 5.7%).
const LARGEST_SEGMENT_SHARE: f64 = 0.15;
/// Kept free for the sampler, the VAE and the allocator's slack.
const HEADROOM_BYTES: u64 = 1 << 30;

/// Trained values of `mode` in the model's UNet, and the values of Adafactor's factored second
/// moment for them (a row and a column mean over the last two dimensions: small for a matrix,
/// two thirds of the weight for a 3x3 convolution's `[out, in, 3, 3]`).
fn trained_values(model: &StableDiffusion, mode: TrainMode) -> (u64, u64) {
    let factored = |dims: &[usize]| -> u64 {
        match dims {
            [rest @ .., rows, cols] => {
                let rest: usize = rest.iter().product();
                (rest * (rows + cols)) as u64
            }
            _ => dims.iter().product::<usize>() as u64,
        }
    };
    model
        .unet_weights()
        .iter()
        .map(|(name, t)| match mode {
            TrainMode::Lora { rank } if mode.adapts(name) => t
                .dims2()
                .map(|(out_dim, in_dim)| {
                    let values = (rank * (in_dim + out_dim)) as u64;
                    (values, (rank + in_dim + rank + out_dim) as u64)
                })
                .unwrap_or((0, 0)),
            _ if mode.trains(name) => (t.elem_count() as u64, factored(t.dims())),
            _ => (0, 0),
        })
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

/// Bytes a fine-tune with `micro` photos per pass needs beyond the loaded model.
pub fn training_bytes(
    model: &StableDiffusion,
    settings: &TuneSettings,
    micro: usize,
    (width, height): (usize, usize),
) -> u64 {
    let (values, factored) = trained_values(model, settings.mode);
    let dtype = model.dtype();
    let half = matches!(dtype, DType::F16 | DType::BF16);
    let master = if half && settings.optimizer.master_weights {
        4
    } else {
        0
    };
    let optimizer = match settings.optimizer.kind {
        OptimizerKind::Adafactor => factored * 4,
        OptimizerKind::AdamW => values * 8,
    };
    // Gradients: summed in f32 over several passes. One pass that is the whole batch updates
    // each checkpointed segment as its gradients arrive (see `segment_updates`), so it holds
    // the largest segment's at most; without checkpointing, all of them at the end of backward.
    let gradients = if micro < settings.batch_size {
        values * 4
    } else if settings.checkpointing {
        (values as f64 * LARGEST_SEGMENT_SHARE) as u64 * dtype.size_in_bytes() as u64
    } else {
        values * dtype.size_in_bytes() as u64
    };
    let state = values * master + gradients + optimizer;
    let factor = model.config.vae.downscale_factor().max(1);
    let latent_pixels = ((width / factor) * (height / factor)) as u64;
    let per_pixel = if settings.checkpointing {
        CHECKPOINTED_BYTES_PER_LATENT_PIXEL
    } else {
        PLAIN_BYTES_PER_LATENT_PIXEL
    };
    let activations = micro as u64 * latent_pixels * per_pixel * dtype.size_in_bytes() as u64 / 4;
    state + activations + HEADROOM_BYTES
}

/// The largest micro-batch, a divisor of the batch no larger than the settings' own, whose
/// estimate fits in `available` bytes; 1 when nothing fits or the available memory is unknown.
pub fn choose_micro_batch(
    model: &StableDiffusion,
    settings: &TuneSettings,
    size: (usize, usize),
    available: Option<u64>,
) -> usize {
    let Some(available) = available else {
        return 1;
    };
    (1..=settings.micro_batch_size.min(settings.batch_size))
        .rev()
        .filter(|m| settings.batch_size.is_multiple_of(*m))
        .find(|&m| training_bytes(model, settings, m, size) <= available)
        .unwrap_or(1)
}

/// The least a fine-tune with `settings` needs beyond the loaded model, over the micro-batches
/// it may use (the divisors of the batch up to `settings.micro_batch_size`). Not always one
/// photo per pass: a pass that is the whole batch sums no gradients, and for a large model's
/// full fine-tune the sums (4 bytes per weight) outweigh three more photos' activations.
pub fn least_training_bytes(
    model: &StableDiffusion,
    settings: &TuneSettings,
    size: (usize, usize),
) -> u64 {
    (1..=settings.micro_batch_size.min(settings.batch_size))
        .filter(|m| settings.batch_size.is_multiple_of(*m))
        .map(|micro| training_bytes(model, settings, micro, size))
        .min()
        .unwrap_or_else(|| training_bytes(model, settings, 1, size))
}

/// What to train instead of `settings` when they do not fit in `available` bytes at any
/// micro-batch ([`least_training_bytes`]): first the same mode without f32 master weights
/// (which only half precision has: the paper's full fine-tune, updates rounded in
/// stochastically), then the heaviest lighter mode whose estimate fits (attention, cross-kv,
/// LoRA). `None` when `settings` fit, or when nothing lighter does.
pub fn settings_that_fit(
    model: &StableDiffusion,
    settings: &TuneSettings,
    size: (usize, usize),
    available: u64,
) -> Option<TuneSettings> {
    let fits = |settings: &TuneSettings| least_training_bytes(model, settings, size) <= available;
    if fits(settings) {
        return None;
    }
    // In f32 this needs what `settings` need, so it never fits where they do not.
    let without_masters = settings.optimizer.master_weights.then(|| TuneSettings {
        optimizer: OptimizerSettings {
            master_weights: false,
            ..settings.optimizer
        },
        ..settings.clone()
    });
    let lighter = [
        TrainMode::Attention,
        TrainMode::CrossKv,
        TrainMode::Lora {
            rank: DEFAULT_LORA_RANK,
        },
    ]
    .map(|mode| TuneSettings {
        mode,
        ..settings.clone()
    });
    without_masters.into_iter().chain(lighter).find(fits)
}
