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
//!    pixels.
//! 4. **Snapped to the photo's own segments** ([`imaging::segment_photo`]): the difference
//!    is blurred over a latent cell or two, so alone it draws a recoloured object with a
//!    halo of background and cuts its far edges. The photo's objects (segments wholly
//!    inside the frame) are all or nothing: one whose mean difference reaches
//!    [`object_threshold`] (halfway from the threshold to the top of the scale, 0.75 by
//!    default) is taken whole and grown by [`GROW_CELLS`], the soft edge the model redraws;
//!    any other is kept whole. The model redraws objects the prompt does not ask about too
//!    (it is free to, where a prompt does not name them), but less than the one it asks
//!    about, whose change reaches the top of the scale. On the background
//!    ([`Segments::background`]: the segments reaching the frame and the fragments of the
//!    same colour beside them) the thresholded pixels stay where they are farther than
//!    [`SPILL_CELLS`] latent cells from a taken object (nearer, they are its halo): an added
//!    object is drawn where the photo has no segment for it yet. On the demo world's first
//!    6 rendered scenes (fine-tuned), recolourings' IoU with the true region went from 0.59
//!    to 0.67 and added objects' from 0.41 to 0.53 against taking every segment from the
//!    threshold and keeping the thresholded pixels of the rest, with the same share of the
//!    true region covered (0.90 and 0.83); the 30-scene benchmark is in
//!    `docs/edit-quality.md`.
//! 5. **Short of every kept object by the feather**: the edit's paste-back softens the
//!    region's border outward by [`imaging::default_feather_radius`], so a region that ended
//!    at a kept object's edge would blend its rim with the edit (at 64 px, much of a small
//!    object). The region stops that far from every object it keeps, as the benchmark's true
//!    region for a new background does, and the object stays exactly the photo's: on the
//!    30-scene benchmark fidelity at the default went from 0.841 to 0.853, success the same.
//!
//! **Local or global.** A threshold relative to the map always finds *something*, so it
//! cannot say "the whole picture": a global edit ("pixel art", "at night", a new background)
//! changes the prediction about as much everywhere, where a local one is a peak. The test is
//! the difference's median over its mean: measured on the demo world's 30-scene benchmark
//! (fine-tuned), 0.25 to 0.76 for recolourings and added objects against 0.61 to 0.97 for new
//! backgrounds; 0.75 puts 7 of 77 edits on the wrong side, 0.7 6 (5 each on the earlier
//! 24-scene run), and turns more local edits global. From
//! [`GLOBAL_EVENNESS`] (0.75) the edit is global; below it the edit keeps everything
//! outside the region (the edit's paste-back feathers its border outward).
//!
//! **A global edit is the whole image, or the background when the prompt names one.** An
//! even change whose prompt names a background ("on a blue background", "a forest
//! backdrop") is one a person expects to leave the subjects as they are, and the difference
//! cannot say so: it is *larger* at the objects a background prompt leaves out (the model is
//! free to redraw what a caption does not name) than on the background itself. There the
//! region is the photo's background ([`Segments::background`]): the segments that reach its
//! edge, and the fragments of a blotchy background beside them that are its colour; the
//! objects wholly inside the frame are kept. A subject cut by
//! the frame's edge is part of that background and changes with it, as the whole image would
//! have let it. Such a prompt asks for a change across the photo, so it counts as global
//! from a lower evenness, [`BACKGROUND_EVENNESS`] (0.6). Any other global edit ("pixel art",
//! "at night") may change all of the photo.
//!
//! Why the size and not the sign of the difference: recolouring a red circle blue moves some
//! channels up and others down; only the magnitude says *that* the prediction changed.
//! Why a velocity model needs no conversion: at a fixed noisy input the noise prediction is
//! `sqrt(alpha) * v` plus a term that does not depend on the prompt, so the differences are
//! proportional and the normalised map is the same.

use std::collections::VecDeque;

use candle_core::{DType, Tensor};
use image::{GrayImage, Luma, RgbImage};

use crate::imaging::{self, Segments};

use super::conditioning::Conditioning;
use super::error::{EngineError, Result};
use super::model::StableDiffusion;
use super::noise::NoiseSource;
use super::sampling::{StepObserver, check_proceed, check_text_to_image};

/// The evenness from which an edit whose prompt names a background counts as global: such a
/// prompt asks for a change across the photo, so a less even difference suffices. On the
/// demo world's 30-scene benchmark new backgrounds measured 0.61 to 0.97 (6 of 30 under
/// [`GLOBAL_EVENNESS`], each then a region around the objects and a failed edit), while the
/// editor's suggested edit, a whole caption naming the background it keeps, measures 0.44.
pub const BACKGROUND_EVENNESS: f64 = 0.6;
/// The difference's median over its mean from which an edit counts as global (1 for a
/// difference the same everywhere, near 0 for one peak).
pub const GLOBAL_EVENNESS: f64 = 0.75;
/// The difference is clamped at this multiple of its mean, then scaled to 0..1
/// (diffusers' `mask_thresholding_ratio`).
const CLAMP_RATIO: f64 = 3.0;
/// The default threshold on the normalised difference (DiffEdit's 0.5).
pub const DEFAULT_THRESHOLD: f64 = 0.5;

/// The mean difference from which one of the photo's objects is taken whole: halfway from
/// `threshold` to the top of the scale, where the object the prompt asks about lies (0.7
/// and 0.8 drew the same regions on the demo world's 6 scenes, 0.5 and 0.6 took objects the
/// prompt does not name).
pub fn object_threshold(threshold: f64) -> f64 {
    (1.0 + threshold) / 2.0
}
/// Seeds averaged over, each one UNet call on a batch of two. Two: on the demo world (8
/// scenes, 8 local edits, fine-tuned) the region's IoU with the true one was 0.433, 0.435,
/// 0.438 and 0.440 from 1 to 4 seeds, while each seed adds about 5% to an edit's time.
pub const DEFAULT_SEEDS: usize = 2;
/// How far into the schedule the photo is noised (DiffEdit's middle, t = 0.5).
const NOISE_FRACTION: f64 = 0.5;
/// How far, in latent cells, a taken segment's halo reaches (the UNet's blur of the
/// difference spreads a change over a cell or two around it). On the demo world's 12
/// rendered scenes, recolourings' IoU with the true region was 0.54 / 0.57 / 0.59 at 2, 2.5
/// and 3 cells, added objects' 0.47 / 0.46 / 0.45: 2, since a larger reach also drops the
/// near side of an object added next to one the prompt changes.
pub const SPILL_CELLS: f64 = 2.0;
/// How far, in latent cells, a taken segment grows: half a cell, about the soft edge a model
/// redraws an object with (the edit's paste-back feathers outward from there). Without it a
/// recoloured object's region ends at its old edge: IoU 0.37 against 0.54.
pub const GROW_CELLS: f64 = 0.5;

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

/// How much of the photo an estimated region lets change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionScope {
    /// Where the prompt changes the prediction: a recolouring, an added object.
    Local,
    /// An even change whose prompt names a background: the photo's background, the objects
    /// inside the frame kept.
    Background,
    /// An even change that names no background (a style, the time of day): all of it.
    Whole,
}

impl RegionScope {
    /// How the scope is spoken of in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Background => "background",
            Self::Whole => "whole photo",
        }
    }
}

/// The words by which a prompt names a background.
const BACKGROUND_WORDS: [&str; 4] = ["background", "backgrounds", "backdrop", "backdrops"];

/// True when `prompt` names a background (a whole word, in any case).
pub fn names_background(prompt: &str) -> bool {
    prompt.split(|c: char| !c.is_alphanumeric()).any(|word| {
        BACKGROUND_WORDS
            .iter()
            .any(|w| word.eq_ignore_ascii_case(w))
    })
}

/// The estimate: the difference map and the mask made from it.
#[derive(Debug, Clone)]
pub struct RegionEstimate {
    /// The normalised difference at latent resolution, 0 to 255 (255 = 3x its mean or
    /// more), for display and tests.
    pub difference: GrayImage,
    /// White = may change, at the working size: the thresholded region, the photo's
    /// background, or all of it (see `scope`).
    pub mask: GrayImage,
    /// Share of the photo the local region (snapped to the segments) covers, whatever the
    /// scope.
    pub coverage: f64,
    /// The difference's median over its mean: how evenly the prompt changes the photo.
    pub evenness: f64,
    pub scope: RegionScope,
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
    let segments = imaging::segment_photo(request.working);
    Ok(region_from_map(
        &map,
        request.threshold,
        &segments,
        names_background(request.prompt),
    ))
}

/// The mean absolute difference between the two predictions, `[h, w]` at latent resolution.
fn difference_map(
    model: &StableDiffusion,
    request: &RegionRequest,
    observer: &mut dyn StepObserver,
) -> Result<Vec<Vec<f32>>> {
    let device = model.device();
    let mut noise = NoiseSource::from_seed(request.seed);
    let latents = model.encode_image(request.working, &mut noise)?;
    let (_, _, h, w) = latents.dims4()?;
    let prompt = model.conditioning(request.prompt, (h, w))?;
    let reference = model.conditioning(request.reference, (h, w))?;
    let conditioning = Conditioning::cat(&[&reference, &prompt])?;
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
        let both = conditioning.predict(&model.unet, &input, &t)?;
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

/// Normalises the map, decides its scope, and draws the region at the segments' size,
/// snapped to them.
fn region_from_map(
    map: &[Vec<f32>],
    threshold: f64,
    segments: &Segments,
    names_background: bool,
) -> RegionEstimate {
    let (width, height) = (segments.width, segments.height);
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
    let scope = if names_background && evenness >= BACKGROUND_EVENNESS {
        RegionScope::Background
    } else if !names_background && evenness >= GLOBAL_EVENNESS {
        RegionScope::Whole
    } else {
        RegionScope::Local
    };
    // As diffusers' DiffEdit: clamped at a multiple of the mean, so one hot spot does not
    // push the rest of the changed object under the threshold.
    let scale = if mean > 0.0 {
        1.0 / (CLAMP_RATIO * mean)
    } else {
        0.0
    };
    let value = |x: usize, y: usize| (f64::from(map[y][x]) * scale).min(1.0);
    // The map interpolated bilinearly (pixel centres onto latent centres), so the border
    // follows the change rather than the latent grid's steps.
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
    let values: Vec<f64> = (0..height)
        .flat_map(|py| (0..width).map(move |px| (px, py)))
        .map(|(px, py)| at(px, py))
        .collect();
    let thresholded: Vec<bool> = values
        .iter()
        .map(|&v| mean > 0.0 && v >= threshold)
        .collect();
    let background = segments.background();
    let (snapped, taken) = snap_to_segments(
        &values,
        &thresholded,
        threshold,
        segments,
        &background,
        width as f64 / w as f64,
    );
    let coverage =
        snapped.iter().filter(|&&inside| inside).count() as f64 / snapped.len().max(1) as f64;
    let pixels_of = |per_label: &[bool]| -> Vec<bool> {
        segments
            .labels
            .iter()
            .map(|&l| per_label[l as usize])
            .collect()
    };
    // Per scope, the region and (per label) the photo's objects it leaves whole: the ones
    // not taken for a local edit, every one for a new background, none for the whole photo.
    let (mut inside, kept_objects): (Vec<bool>, Vec<bool>) = match scope {
        RegionScope::Local => (
            snapped,
            (0..segments.count)
                .map(|l| !background[l] && !taken[l])
                .collect(),
        ),
        RegionScope::Background => (
            pixels_of(&background),
            background.iter().map(|&b| !b).collect(),
        ),
        RegionScope::Whole => (
            vec![true; segments.labels.len()],
            vec![false; segments.count],
        ),
    };
    let kept = pixels_of(&kept_objects);
    // The region stops short of a kept object by the paste-back's feather, so the object
    // stays exactly as it was, rim included, as a painted mask with a margin would keep it
    // (the benchmark's true region for a new background leaves the same margin).
    let margin = imaging::default_feather_radius(width, height) as usize;
    clear_around(&mut inside, &kept, width as usize, margin);
    let mask = GrayImage::from_fn(width, height, |px, py| {
        Luma([if inside[(py * width + px) as usize] {
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
        scope,
    }
}

/// The thresholded pixels snapped to the photo's segments: its objects (the segments not in
/// the background) whose mean value reaches [`object_threshold`] whole, grown by
/// [`GROW_CELLS`], no other object, and the thresholded pixels of the background
/// (`background`, per label: [`Segments::background`]) farther than [`SPILL_CELLS`] from a
/// taken object (latent cells of `cell_px` pixels).
fn snap_to_segments(
    values: &[f64],
    thresholded: &[bool],
    threshold: f64,
    segments: &Segments,
    background: &[bool],
    cell_px: f64,
) -> (Vec<bool>, Vec<bool>) {
    let mut sums = vec![(0.0f64, 0usize); segments.count];
    for (&label, &value) in segments.labels.iter().zip(values) {
        let (sum, count) = &mut sums[label as usize];
        *sum += value;
        *count += 1;
    }
    let object_threshold = object_threshold(threshold);
    let taken: Vec<bool> = sums
        .iter()
        .zip(background)
        // A segment without any difference is never taken, even at threshold 0.
        .map(|(&(sum, count), &background)| {
            !background && sum > 0.0 && sum / count as f64 >= object_threshold
        })
        .collect();
    let inside: Vec<bool> = segments.labels.iter().map(|&l| taken[l as usize]).collect();
    let width = segments.width as usize;
    let (spill, grow) = (
        (SPILL_CELLS * cell_px).round() as usize,
        (GROW_CELLS * cell_px).round() as usize,
    );
    // One search serves both distances (the halo reaches farther than the growth).
    let snapped = steps_from(&inside, width, spill.max(grow))
        .into_iter()
        .zip(thresholded)
        .zip(&segments.labels)
        .map(|((steps, &thresholded), &label)| {
            steps <= grow || (thresholded && steps > spill && background[label as usize])
        })
        .collect();
    (snapped, taken)
}

/// `mask` without the pixels within `margin` (in both axes) of a `kept` one: the edit's
/// paste-back feathers the mask's border outward by up to `margin` (Euclidean), so a region
/// that ends at a kept object's edge would blend the object's rim with the edit. A square
/// neighbourhood contains the round one, so nothing kept is reached.
fn clear_around(mask: &mut [bool], kept: &[bool], width: usize, margin: usize) {
    let height = kept.len() / width.max(1);
    // Separable: near a kept pixel along the row, then along the column.
    let mut along_rows = vec![false; kept.len()];
    for y in 0..height {
        let row = &kept[y * width..(y + 1) * width];
        for x in 0..width {
            let span = x.saturating_sub(margin)..(x + margin + 1).min(width);
            along_rows[y * width + x] = row[span].iter().any(|&k| k);
        }
    }
    for x in 0..width {
        for y in 0..height {
            let span = y.saturating_sub(margin)..(y + margin + 1).min(height);
            if span.into_iter().any(|ny| along_rows[ny * width + x]) {
                mask[y * width + x] = false;
            }
        }
    }
}

/// Each pixel's number of 4-neighbour steps from the nearest `true` one, counted up to
/// `limit` (farther pixels read `usize::MAX`): a breadth-first search from all of them at
/// once.
fn steps_from(seeds: &[bool], width: usize, limit: usize) -> Vec<usize> {
    let height = seeds.len() / width.max(1);
    let mut distance: Vec<usize> = seeds
        .iter()
        .map(|&s| if s { 0 } else { usize::MAX })
        .collect();
    let mut queue: VecDeque<usize> = (0..seeds.len()).filter(|&i| seeds[i]).collect();
    while let Some(i) = queue.pop_front() {
        if distance[i] >= limit {
            continue;
        }
        let (x, y) = (i % width, i / width);
        let neighbours = [
            (x > 0).then(|| i - 1),
            (x + 1 < width).then(|| i + 1),
            (y > 0).then(|| i - width),
            (y + 1 < height).then(|| i + width),
        ];
        for j in neighbours.into_iter().flatten() {
            if distance[j] == usize::MAX {
                distance[j] = distance[i] + 1;
                queue.push_back(j);
            }
        }
    }
    distance
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// `base` everywhere, and `value` on the cells `cells` x `cells`.
    fn map_with_square(size: usize, cells: std::ops::Range<usize>, value: f32) -> Vec<Vec<f32>> {
        (0..size)
            .map(|y| {
                (0..size)
                    .map(|x| {
                        if cells.contains(&x) && cells.contains(&y) {
                            value
                        } else {
                            0.05
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// A photo of `size` pixels: grey, with a red square on `pixels` x `pixels`.
    fn photo_segments(size: u32, pixels: std::ops::Range<u32>) -> Segments {
        imaging::segment_photo(&RgbImage::from_fn(size, size, |x, y| {
            if pixels.contains(&x) && pixels.contains(&y) {
                Rgb([220, 20, 20])
            } else {
                Rgb([128, 128, 128])
            }
        }))
    }

    fn white(region: &RegionEstimate, x: u32, y: u32) -> bool {
        region.mask.get_pixel(x, y).0[0] == 255
    }

    fn share_white(region: &RegionEstimate) -> f64 {
        let white = region.mask.pixels().filter(|p| p.0[0] == 255).count();
        white as f64 / (region.mask.width() * region.mask.height()) as f64
    }

    /// The region, feathered as the edit's paste-back feathers it, leaves every pixel of the
    /// `kept` segments at 0 (exactly the photo's); and for a new background, every background
    /// pixel farther than the feather from them is in it.
    fn assert_keeps_its_objects(region: &RegionEstimate, segments: &Segments, kept: &[u32]) {
        let (width, height) = region.mask.dimensions();
        let radius = imaging::default_feather_radius(width, height);
        let feathered = imaging::feather(&region.mask, radius);
        let on_kept = |x: u32, y: u32| kept.contains(&segments.at(x, y));
        let background = segments.background();
        for (x, y, p) in feathered.enumerate_pixels() {
            if on_kept(x, y) {
                assert_eq!(p.0[0], 0, "({x}, {y}) on a kept object");
            }
            let reach = |c: u32, end: u32| c.saturating_sub(radius)..(c + radius + 1).min(end);
            let near_kept = reach(x, width).any(|nx| reach(y, height).any(|ny| on_kept(nx, ny)));
            if region.scope == RegionScope::Background
                && !near_kept
                && background[segments.at(x, y) as usize]
            {
                assert_eq!(
                    region.mask.get_pixel(x, y).0[0],
                    255,
                    "({x}, {y}) on the background"
                );
            }
        }
    }

    #[test]
    fn a_peaked_difference_is_a_local_region_drawn_where_the_peak_is() {
        // Latent cells 2 and 3 of 8, at 8 px each: pixels 16..32, with the interpolated
        // border rounding its corners; a plain photo, so there is nothing to snap to.
        let region = region_from_map(
            &map_with_square(8, 2..4, 1.0),
            0.5,
            &photo_segments(64, 0..0),
            false,
        );
        assert_eq!(
            region.scope,
            RegionScope::Local,
            "evenness {}",
            region.evenness
        );
        assert_eq!(region.coverage, share_white(&region));
        assert!(white(&region, 24, 24) && white(&region, 17, 24) && white(&region, 24, 30));
        assert!(!white(&region, 16, 16), "a corner is rounded");
        assert!(!white(&region, 8, 24) && !white(&region, 40, 24) && !white(&region, 60, 60));
    }

    #[test]
    fn a_changed_object_is_taken_whole_and_without_its_halo() {
        // The object: pixels 16..40 (cells 2, 3 and 4 of 8, 8 px each). Its difference is high
        // except on one cell, and spills onto the cells left and right of it, as the UNet's
        // blur does.
        let mut map = map_with_square(8, 2..5, 1.0);
        map[4][4] = 0.3;
        for row in &mut map[2..5] {
            row[1] = 0.8;
            row[5] = 0.8;
        }
        let region = region_from_map(&map, 0.5, &photo_segments(64, 16..40), false);
        assert_eq!(
            region.scope,
            RegionScope::Local,
            "evenness {}",
            region.evenness
        );
        assert_eq!(region.coverage, share_white(&region));
        // The object whole, its low cell included, grown by half a cell (4 px).
        for y in 16..40 {
            for x in 16..40 {
                assert!(white(&region, x, y), "({x}, {y}) on the object");
            }
        }
        assert!(white(&region, 13, 28) && white(&region, 42, 28) && white(&region, 28, 13));
        // The halo beyond that is dropped, and nothing else is taken.
        assert!(
            !white(&region, 10, 28) && !white(&region, 46, 28),
            "the halo is dropped"
        );
        assert!(!white(&region, 2, 2) && !white(&region, 60, 60));
    }

    #[test]
    fn an_object_the_prompt_changes_less_is_kept_whole() {
        // Two objects: the asked one at cells 1 and 2 (pixels 8..24), whose change tops the
        // scale, and one at cells 5 and 6 (pixels 40..56) that the model redraws a little,
        // above the threshold but below the object threshold.
        let mut map = vec![vec![0.1f32; 8]; 8];
        for row in &mut map[1..3] {
            row[1..3].fill(2.0);
        }
        for row in &mut map[5..7] {
            row[5..7].fill(0.48);
        }
        let photo = RgbImage::from_fn(64, 64, |x, y| {
            let on = |r: std::ops::Range<u32>| r.contains(&x) && r.contains(&y);
            if on(8..24) {
                Rgb([220, 20, 20])
            } else if on(40..56) {
                Rgb([20, 20, 220])
            } else {
                Rgb([128, 128, 128])
            }
        });
        let segments = imaging::segment_photo(&photo);
        let region = region_from_map(&map, 0.5, &segments, false);
        let other = region.difference.get_pixel(5, 5).0[0];
        assert!(
            (128..191).contains(&other),
            "the other object's difference {other}"
        );
        assert_eq!(region.scope, RegionScope::Local);
        assert!(white(&region, 16, 16) && white(&region, 9, 22));
        for y in 40..56 {
            for x in 40..56 {
                assert!(!white(&region, x, y), "({x}, {y}) on the other object");
            }
        }
    }

    #[test]
    fn an_object_next_to_the_changed_one_keeps_its_rim() {
        // The asked object at pixels 8..24 (cells 1 and 2), another 2 px to its right
        // (pixels 26..40) that the prompt does not change: the asked one's growth (half a
        // cell, 4 px) and the paste-back's feather would reach into it.
        let mut map = vec![vec![0.1f32; 8]; 8];
        for row in &mut map[1..3] {
            row[1..3].fill(2.0);
        }
        let photo = RgbImage::from_fn(64, 64, |x, y| {
            if (8..24).contains(&x) && (8..24).contains(&y) {
                Rgb([220, 20, 20])
            } else if (26..40).contains(&x) && (8..24).contains(&y) {
                Rgb([20, 20, 220])
            } else {
                Rgb([128, 128, 128])
            }
        });
        let segments = imaging::segment_photo(&photo);
        let region = region_from_map(&map, 0.5, &segments, false);
        assert_eq!(region.scope, RegionScope::Local);
        assert!(white(&region, 16, 16) && white(&region, 9, 22));
        assert_keeps_its_objects(&region, &segments, &[segments.at(32, 16)]);
    }

    #[test]
    fn a_change_away_from_every_object_is_kept_where_the_difference_is() {
        // An object to add at cells 5 and 6 (pixels 40..56), on the background, away from the
        // photo's square (pixels 8..16), which the prompt does not change.
        let region = region_from_map(
            &map_with_square(8, 5..7, 1.0),
            0.5,
            &photo_segments(64, 8..16),
            false,
        );
        assert_eq!(
            region.scope,
            RegionScope::Local,
            "evenness {}",
            region.evenness
        );
        assert!(white(&region, 48, 48) && white(&region, 42, 48));
        assert!(!white(&region, 12, 12) && !white(&region, 30, 30));
    }

    #[test]
    fn an_even_difference_is_the_whole_image() {
        // Most of the map high: the median is at the top.
        let region = region_from_map(
            &map_with_square(8, 0..6, 1.0),
            0.5,
            &photo_segments(32, 0..0),
            false,
        );
        assert_eq!(
            region.scope,
            RegionScope::Whole,
            "evenness {}",
            region.evenness
        );
        assert!(region.mask.pixels().all(|p| p.0[0] == 255));
    }

    #[test]
    fn an_even_difference_whose_prompt_names_a_background_is_the_background() {
        // The even map of a new background, highest at the square (pixels 8..16) as the
        // demo model's is: the square is kept, everything around it may change.
        let mut map = map_with_square(8, 0..8, 0.5);
        for row in &mut map[2..4] {
            row[2] = 1.0;
            row[3] = 1.0;
        }
        let segments = photo_segments(64, 16..32);
        let region = region_from_map(&map, 0.5, &segments, true);
        assert_eq!(
            region.scope,
            RegionScope::Background,
            "evenness {}",
            region.evenness
        );
        assert_keeps_its_objects(&region, &segments, &[segments.at(24, 24)]);
        // The same map for a prompt that names no background: all of it.
        let region = region_from_map(&map, 0.5, &segments, false);
        assert_eq!(region.scope, RegionScope::Whole);
    }

    #[test]
    fn a_new_background_takes_the_fragments_of_the_old_one_inside_the_frame() {
        // A model's drawn background is blotchy: a patch of it the frame does not reach is its
        // own segment, but of the background's colour, so it changes with the background.
        let photo = RgbImage::from_fn(64, 64, |x, y| {
            let on =
                |r: std::ops::Range<u32>, s: std::ops::Range<u32>| r.contains(&x) && s.contains(&y);
            if on(24..40, 24..40) {
                Rgb([220, 20, 20])
            } else if on(4..16, 8..56) {
                Rgb([128, 128, 146])
            } else {
                Rgb([128, 128, 128])
            }
        });
        let segments = imaging::segment_photo(&photo);
        let patch = segments.at(10, 30);
        assert_ne!(patch, segments.at(1, 1), "the patch is its own segment");
        let region = region_from_map(&map_with_square(8, 0..8, 0.5), 0.5, &segments, true);
        assert_eq!(region.scope, RegionScope::Background);
        assert!(white(&region, 10, 30) && white(&region, 1, 1));
        assert!(!white(&region, 32, 32), "the object is kept");
    }

    #[test]
    fn a_background_is_named_by_whole_words() {
        assert!(names_background("beikkpic on a blue background"));
        assert!(names_background("a cat, Backdrop: a forest"));
        assert!(names_background("beach backgrounds"));
        assert!(!names_background("a backgrounder on a table"));
        assert!(!names_background("pixel art"));
    }

    #[test]
    fn no_difference_is_no_region() {
        let region = region_from_map(
            &vec![vec![0.0; 4]; 4],
            0.5,
            &photo_segments(16, 4..8),
            false,
        );
        assert_eq!(region.scope, RegionScope::Local);
        assert_eq!(region.coverage, 0.0);
        assert!(region.mask.pixels().all(|p| p.0[0] == 0));
    }
}
