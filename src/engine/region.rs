//! The edit region, estimated from the prompt (DiffEdit, Couairon et al. 2022, adapted to
//! UniTune): where does the model's prediction for the photo change when it is asked for the
//! edit instead of for the photo itself?
//!
//! 1. The photo's latents are noised to the middle of the schedule with a few seeds.
//! 2. For each, the model predicts the noise (or velocity) once for the edit prompt
//!    ("beikkpic a blue circle") and once for the reference ("beikkpic", which the fine-tuned
//!    model reconstructs the photo from, or the user's baseline prompt).
//! 3. The size of the difference, averaged over channels and seeds, is where the prompt
//!    disagrees with the photo. As in diffusers' DiffEdit it is clamped at three times its
//!    mean and scaled to 0..1, then thresholded (0.5 by default) on the map interpolated to
//!    pixels, so the border follows the change rather than the latent grid.
//!
//! **Local or global.** A threshold relative to the map always finds *something*, so it
//! cannot say "the whole picture": a global edit ("pixel art", "at night", a new background)
//! changes the prediction about as much everywhere, where a local one is a peak. The test is
//! the difference's median over its mean: measured on the demo world's 24-scene benchmark
//! (fine-tuned), 0.25 to 0.76 for recolourings and added objects against 0.62 to 0.97 for new
//! backgrounds; 0.75 and 0.7 put the fewest edits on the wrong side (5 of 61). From
//! [`GLOBAL_EVENNESS`] (0.75) the region is the whole image; below it the
//! edit keeps everything outside the region (the edit's paste-back feathers its border
//! outward).
//!
//! Why the size and not the sign of the difference: recolouring a red circle blue moves some
//! channels up and others down; only the magnitude says *that* the prediction changed.
//! Why a velocity model needs no conversion: at a fixed noisy input the noise prediction is
//! `sqrt(alpha) * v` plus a term that does not depend on the prompt, so the differences are
//! proportional and the normalised map is the same.

use candle_core::{DType, Tensor};
use image::{GrayImage, Luma, RgbImage};

use super::error::{EngineError, Result};
use super::model::StableDiffusion;
use super::noise::NoiseSource;
use super::sampling::{StepObserver, check_proceed, check_text_to_image};

/// The difference's median over its mean from which an edit counts as global (1 for a
/// difference the same everywhere, near 0 for one peak).
pub const GLOBAL_EVENNESS: f64 = 0.75;
/// The difference is clamped at this multiple of its mean, then scaled to 0..1
/// (diffusers' `mask_thresholding_ratio`).
const CLAMP_RATIO: f64 = 3.0;
/// The default threshold on the normalised difference (DiffEdit's 0.5).
pub const DEFAULT_THRESHOLD: f64 = 0.5;
/// Seeds averaged over, each one UNet call on a batch of two. Two: on the demo world (8
/// scenes, 8 local edits, fine-tuned) the region's IoU with the true one was 0.433, 0.435,
/// 0.438 and 0.440 from 1 to 4 seeds, while each seed adds about 5% to an edit's time.
pub const DEFAULT_SEEDS: usize = 2;
/// How far into the schedule the photo is noised (DiffEdit's middle, t = 0.5).
const NOISE_FRACTION: f64 = 0.5;

/// What to estimate the region of.
#[derive(Debug, Clone)]
pub struct RegionRequest<'a> {
    /// The photo at the model's working size.
    pub working: &'a RgbImage,
    /// The prompt as the model samples it (the rare token in front when fine-tuned).
    pub prompt: &'a str,
    /// What the photo already is: the bare rare token, the baseline prompt, or "".
    pub reference: &'a str,
    /// Normalised difference from which a pixel belongs to the region (0 to 1).
    pub threshold: f64,
    pub seeds: usize,
    pub seed: u64,
}

/// The estimate: the difference map and the mask made from it.
#[derive(Debug, Clone)]
pub struct RegionEstimate {
    /// The normalised difference at latent resolution, 0 to 255 (255 = 3x its mean or
    /// more), for display and tests.
    pub difference: GrayImage,
    /// White = may change, at the working size: the thresholded region, or all white when
    /// global.
    pub mask: GrayImage,
    /// Share of the latent map at or above the threshold.
    pub coverage: f64,
    /// The difference's median over its mean: how evenly the prompt changes the photo.
    pub evenness: f64,
    /// True when the edit was judged global (the mask is the whole image).
    pub global: bool,
}

/// Estimates where `request.prompt` changes the photo; the model's UNet is used as it is
/// (select the snapshot first).
pub fn estimate_region(
    model: &StableDiffusion,
    request: &RegionRequest,
    observer: &mut dyn StepObserver,
) -> Result<RegionEstimate> {
    check_text_to_image(model)?;
    // The same checks sampling makes, before the first VAE or UNet call.
    let (width, height) = request.working.dimensions();
    model.latent_dims(width as usize, height as usize)?;
    if request.prompt.trim().is_empty() {
        return Err(EngineError::InvalidRequest(
            "the prompt is empty; describe what the image should show".into(),
        ));
    }
    if !(0.0..=1.0).contains(&request.threshold) {
        return Err(EngineError::InvalidRequest(format!(
            "the region threshold must be between 0 and 1, got {}",
            request.threshold
        )));
    }
    if request.seeds == 0 {
        return Err(EngineError::InvalidRequest(
            "the region estimate needs at least one seed".into(),
        ));
    }
    let map = difference_map(model, request, observer)?;
    Ok(region_from_map(
        &map,
        request.threshold,
        request.working.dimensions(),
    ))
}

/// The mean absolute difference between the two predictions, `[h, w]` at latent resolution.
fn difference_map(
    model: &StableDiffusion,
    request: &RegionRequest,
    observer: &mut dyn StepObserver,
) -> Result<Vec<Vec<f32>>> {
    let device = model.device();
    let prompt = model.encode_prompt(request.prompt)?.embedding;
    let reference = model.encode_prompt(request.reference)?.embedding;
    let context = Tensor::cat(&[&reference, &prompt], 0)?;
    let mut noise = NoiseSource::from_seed(request.seed);
    let latents = model.encode_image(request.working, &mut noise)?;
    let timestep =
        ((model.scheduler.num_train_timesteps() - 1) as f64 * NOISE_FRACTION).round() as usize;
    let t = Tensor::new(&[timestep as f32, timestep as f32], device)?;
    let mut sum: Option<Tensor> = None;
    for _ in 0..request.seeds {
        check_proceed(observer)?;
        let eps = noise
            .normal(latents.shape(), device)?
            .to_dtype(latents.dtype())?;
        let noisy = model.scheduler.add_noise(&latents, &eps, &[timestep])?;
        let input = Tensor::cat(&[&noisy, &noisy], 0)?;
        let both = model.unet.forward(&input, &t, &context)?;
        let difference = (both.narrow(0, 1, 1)? - both.narrow(0, 0, 1)?)?
            .to_dtype(DType::F32)?
            .abs()?
            .mean(1)?
            .squeeze(0)?;
        sum = Some(match sum {
            Some(total) => (total + difference)?,
            None => difference,
        });
    }
    let mean = sum.expect("at least one seed").to_vec2::<f32>()?;
    let largest = mean.iter().flatten().copied().fold(0.0f32, f32::max);
    if !largest.is_finite() {
        return Err(EngineError::NotFinite(
            "the region estimate's predictions stopped being numbers (the model's numbers overflowed); try --precision f32 or paint the region".into(),
        ));
    }
    Ok(mean)
}

/// Normalises the map, decides local or global, and draws the thresholded region at `size`.
fn region_from_map(
    map: &[Vec<f32>],
    threshold: f64,
    (width, height): (u32, u32),
) -> RegionEstimate {
    let h = map.len();
    let w = map.first().map_or(0, Vec::len);
    let n = (w * h).max(1) as f64;
    let mean = map.iter().flatten().map(|&v| f64::from(v)).sum::<f64>() / n;
    // Global: the typical place changes about as much as the average one (a local edit's
    // difference is a peak, far above the median).
    let mut sorted: Vec<f32> = map.iter().flatten().copied().collect();
    sorted.sort_by(f32::total_cmp);
    let median = sorted.get(sorted.len() / 2).map_or(0.0, |&v| f64::from(v));
    let evenness = if mean > 0.0 { median / mean } else { 0.0 };
    let global = evenness >= GLOBAL_EVENNESS;
    // As diffusers' DiffEdit: clamped at a multiple of the mean, so one hot spot does not
    // push the rest of the changed object under the threshold.
    let scale = if mean > 0.0 {
        1.0 / (CLAMP_RATIO * mean)
    } else {
        0.0
    };
    let value = |x: usize, y: usize| (f64::from(map[y][x]) * scale).min(1.0);
    let inside = |x: usize, y: usize| mean > 0.0 && value(x, y) >= threshold;
    let count = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| inside(x, y))
        .count();
    let coverage = count as f64 / n;
    // Drawn from the map interpolated bilinearly (pixel centres onto latent centres), so the
    // border follows the change rather than the latent grid's 8-pixel steps.
    let at = |px: u32, py: u32| {
        let fx =
            ((f64::from(px) + 0.5) * w as f64 / f64::from(width) - 0.5).clamp(0.0, (w - 1) as f64);
        let fy =
            ((f64::from(py) + 0.5) * h as f64 / f64::from(height) - 0.5).clamp(0.0, (h - 1) as f64);
        let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (tx, ty) = (fx - x0 as f64, fy - y0 as f64);
        let top = value(x0, y0) * (1.0 - tx) + value(x1, y0) * tx;
        let bottom = value(x0, y1) * (1.0 - tx) + value(x1, y1) * tx;
        top * (1.0 - ty) + bottom * ty
    };
    let mask = GrayImage::from_fn(width, height, |px, py| {
        Luma([if global || (mean > 0.0 && at(px, py) >= threshold) {
            255
        } else {
            0
        }])
    });
    let difference = GrayImage::from_fn(w as u32, h as u32, |x, y| {
        Luma([(value(x as usize, y as usize) * 255.0).round() as u8])
    });
    RegionEstimate {
        difference,
        mask,
        coverage,
        evenness,
        global,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0.05 everywhere and 1.0 on the square `square` x `square`.
    fn map_with_square(size: usize, square: std::ops::Range<usize>) -> Vec<Vec<f32>> {
        (0..size)
            .map(|y| {
                (0..size)
                    .map(|x| {
                        if square.contains(&x) && square.contains(&y) {
                            1.0
                        } else {
                            0.05
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_peaked_difference_is_a_local_region_drawn_where_the_peak_is() {
        // Latent pixels 2 and 3 of 8, at 8 px each: pixels 16..32, with the interpolated
        // border rounding its corners.
        let region = region_from_map(&map_with_square(8, 2..4), 0.5, (64, 64));
        assert!(!region.global, "evenness {}", region.evenness);
        assert_eq!(region.coverage, 4.0 / 64.0);
        let white = |x: u32, y: u32| region.mask.get_pixel(x, y).0[0] == 255;
        assert!(white(24, 24) && white(17, 24) && white(24, 30));
        assert!(!white(16, 16), "a corner is rounded");
        assert!(!white(8, 24) && !white(40, 24) && !white(60, 60));
    }

    #[test]
    fn an_even_difference_is_the_whole_image() {
        // Most of the map high: the median is at the top.
        let region = region_from_map(&map_with_square(8, 0..6), 0.5, (32, 32));
        assert!(region.global, "evenness {}", region.evenness);
        assert!(region.mask.pixels().all(|p| p.0[0] == 255));
    }

    #[test]
    fn no_difference_is_no_region() {
        let region = region_from_map(&vec![vec![0.0; 4]; 4], 0.5, (16, 16));
        assert!(!region.global);
        assert_eq!(region.coverage, 0.0);
        assert!(region.mask.pixels().all(|p| p.0[0] == 0));
    }
}
