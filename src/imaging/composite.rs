//! Finishing a masked edit: the photo's own pixels outside the mask, joined to the edit by a
//! soft seam.
//!
//! In-painting (paper, appendix A.1) keeps the unmasked part of the photo by putting the
//! original back at every sampling step, but in latent space, at an eighth of the working
//! resolution: after the VAE and the resize back to the photo's size, the "kept" part is a
//! softened, slightly shifted copy of the photo. [`paste_outside_mask`] puts the photo's own
//! pixels back there. A hard cut would show as a seam, so the mask is first softened outward
//! by [`feather`].

use super::ImagingError;
use image::{GrayImage, RgbImage};

/// Mask pixels at least this bright are the mask proper, from which the feather ramps out.
/// Half way, so that the soft edge a resize gives a hard mask counts as the edge the user
/// painted, and faint noise in the black part (a JPEG mask) spawns no halo.
const MASK_CORE_LEVEL: u8 = 128;

/// Fails unless `a` (called `what` in the message) and `b` (`other`) have the same size.
pub(crate) fn check_same_size(
    what: &'static str,
    a: (u32, u32),
    other: &'static str,
    b: (u32, u32),
) -> Result<(), ImagingError> {
    if a == b {
        return Ok(());
    }
    Err(ImagingError::SizeMismatch {
        what,
        width: a.0,
        height: a.1,
        other,
        other_width: b.0,
        other_height: b.1,
    })
}

/// The seam width [`paste_outside_mask`] should get for a `width` x `height` photo: one latent
/// cell of a 512-pixel working image at the photo's scale (the shorter side over 64, rounded),
/// and at least 2 pixels.
///
/// The sampler honoured the mask one latent cell (8 working pixels) at a time, so the edit's
/// own edge is uncertain by about that much; a seam as wide covers it, and is still narrow
/// next to the photo (1.6% of its shorter side: 8 px at 512, 47 px for a 4000x3000 photo).
pub fn default_feather_radius(width: u32, height: u32) -> u32 {
    let short = width.min(height);
    (short.saturating_add(32) / 64).max(2)
}

/// A soft version of `mask` (white = may change) for pasting: the mask itself, plus a ramp
/// outward from its edge that falls smoothly towards 0 over `radius_px` pixels and is exactly
/// 0 beyond them.
///
/// - A pixel farther than `radius_px` (Euclidean distance) from every non-zero mask pixel is
///   exactly 0; inside the mask, values are kept, so a white region stays exactly 255.
/// - The feather only adds: the result is never darker than `mask`, so the edit keeps its
///   full strength everywhere the user painted, and the seam lies in the band outside the
///   mask, where the generated image is (nearly) the original anyway. A feather centred on
///   the edge would instead fade the edit out inside the mask and show a ghost of its border.
/// - The ramp is `smoothstep` of the distance to the mask's core (pixels of at least half
///   white), scaled by that core pixel's value: a mask painted at half strength gets a
///   half-strength halo. Faint pixels outside the core (a resize's soft edge, JPEG noise)
///   keep their own value and spawn no ramp.
/// - `radius_px` 0 returns the mask unchanged.
///
/// Distance-based rather than a blur: a box or tent blur has a square footprint, so its
/// ramp reaches √2 times farther along diagonals and corners get square halos; the exact
/// Euclidean distance transform (Felzenszwalb and Huttenlocher) gives round corners, an exact
/// zero beyond the radius, and costs O(pixels) whatever the radius.
pub fn feather(mask: &GrayImage, radius_px: u32) -> GrayImage {
    let (width, height) = mask.dimensions();
    if radius_px == 0 || width == 0 || height == 0 {
        return mask.clone();
    }
    let (w, h) = (width as usize, height as usize);
    let src = mask.as_raw();
    let nearest_rows = nearest_core_rows(src, w, h, radius_px);
    let radius = f64::from(radius_px);
    let radius_sq = radius * radius;

    let mut feathered = mask.clone();
    let out: &mut [u8] = &mut feathered;
    let mut column_cost = vec![0.0f64; w];
    let mut sites: Vec<usize> = Vec::with_capacity(w);
    let mut envelope = LowerEnvelope::with_capacity(w);
    for y in 0..h {
        let row = y * w..(y + 1) * w;
        sites.clear();
        for (x, &nearest) in nearest_rows[row.clone()].iter().enumerate() {
            if nearest != NO_CORE {
                let dy = f64::from(nearest.abs_diff(y as u32));
                column_cost[x] = dy * dy;
                sites.push(x);
            }
        }
        if sites.is_empty() {
            continue;
        }
        envelope.build(&sites, &column_cost);
        let mut cursor = envelope.cursor();
        for (x, out_value) in out[row].iter_mut().enumerate() {
            let (site_x, distance_sq) = cursor.nearest(x, &column_cost);
            if *out_value >= MASK_CORE_LEVEL || distance_sq > radius_sq {
                continue;
            }
            let site_y = nearest_rows[y * w + site_x] as usize;
            let core_value = f64::from(src[site_y * w + site_x]);
            // One pixel past the radius the ramp would reach 0: every pixel within the radius
            // gets some weight, the cut beyond it is at most 3/(r+1)² of full scale.
            let t = (radius + 1.0 - distance_sq.sqrt()) / (radius + 1.0);
            let ramp = (core_value * smoothstep(t)).round() as u8;
            *out_value = (*out_value).max(ramp);
        }
    }
    feathered
}

/// `3t² - 2t³` for `t` clamped to [0, 1]: 0 and 1 with zero slope at both ends.
pub(crate) fn smoothstep(t: f64) -> f64 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Marks "no core pixel near enough in this column".
const NO_CORE: u32 = u32::MAX;

/// For every pixel, the row of the nearest core pixel in its column, or [`NO_CORE`] when that
/// is farther than `radius_px` (such a pixel cannot be within the radius of it anyway).
fn nearest_core_rows(src: &[u8], w: usize, h: usize, radius_px: u32) -> Vec<u32> {
    let mut nearest = vec![NO_CORE; w * h];
    let mut above = vec![NO_CORE; w];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for (x, &value) in row.iter().enumerate() {
            if value >= MASK_CORE_LEVEL {
                above[x] = y as u32;
            }
        }
        nearest[y * w..(y + 1) * w].copy_from_slice(&above);
    }
    let mut below = vec![NO_CORE; w];
    for y in (0..h).rev() {
        let row = &src[y * w..(y + 1) * w];
        let y32 = y as u32;
        for (x, &value) in row.iter().enumerate() {
            if value >= MASK_CORE_LEVEL {
                below[x] = y32;
            }
            let slot = &mut nearest[y * w + x];
            if below[x] != NO_CORE && (*slot == NO_CORE || below[x] - y32 < y32 - *slot) {
                *slot = below[x];
            }
            if *slot != NO_CORE && slot.abs_diff(y32) > radius_px {
                *slot = NO_CORE;
            }
        }
    }
    nearest
}

/// The lower envelope of the parabolas `(x - site)² + cost[site]` over one row
/// (Felzenszwalb and Huttenlocher, "Distance Transforms of Sampled Functions", 2012).
/// With integer costs and positions every value is an exact integer in f64.
struct LowerEnvelope {
    /// Sites whose parabola is on the envelope, left to right.
    sites: Vec<usize>,
    /// Where each of them starts being the lowest.
    starts: Vec<f64>,
}

impl LowerEnvelope {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            sites: Vec::with_capacity(capacity),
            starts: Vec::with_capacity(capacity),
        }
    }

    /// `sites` ascending and non-empty.
    fn build(&mut self, sites: &[usize], cost: &[f64]) {
        self.sites.clear();
        self.starts.clear();
        for &q in sites {
            let qf = q as f64;
            let q_height = cost[q] + qf * qf;
            let mut start = f64::NEG_INFINITY;
            while let (Some(&p), Some(&p_start)) = (self.sites.last(), self.starts.last()) {
                let pf = p as f64;
                let crossing = (q_height - (cost[p] + pf * pf)) / (2.0 * (qf - pf));
                if crossing <= p_start {
                    self.sites.pop();
                    self.starts.pop();
                } else {
                    start = crossing;
                    break;
                }
            }
            self.sites.push(q);
            self.starts.push(start);
        }
    }

    fn cursor(&self) -> EnvelopeCursor<'_> {
        EnvelopeCursor {
            envelope: self,
            index: 0,
        }
    }
}

/// Walks an envelope left to right.
struct EnvelopeCursor<'a> {
    envelope: &'a LowerEnvelope,
    index: usize,
}

impl EnvelopeCursor<'_> {
    /// The site nearest to `x` and the squared distance to it; `x` must not decrease between
    /// calls.
    fn nearest(&mut self, x: usize, cost: &[f64]) -> (usize, f64) {
        let xf = x as f64;
        let starts = &self.envelope.starts;
        while self.index + 1 < starts.len() && starts[self.index + 1] < xf {
            self.index += 1;
        }
        let site = self.envelope.sites[self.index];
        let dx = xf - site as f64;
        (site, dx * dx + cost[site])
    }
}

/// `original` where the feathered `mask` is black, `generated` where it is white, and a blend
/// in between (the mask is feathered by `feather_radius_px` first; see [`feather`] and
/// [`default_feather_radius`]).
///
/// Every pixel where the feathered mask is 0 (in particular every pixel farther than the
/// radius from the mask) is byte-for-byte the original's, and every pixel where it is 255 the
/// generated one's: the blend is `(o·(255-m) + g·m + 127) / 255` in integers.
///
/// All three images must have the same size.
pub fn paste_outside_mask(
    original: &RgbImage,
    generated: &RgbImage,
    mask: &GrayImage,
    feather_radius_px: u32,
) -> Result<RgbImage, ImagingError> {
    check_same_size(
        "generated image",
        generated.dimensions(),
        "original",
        original.dimensions(),
    )?;
    check_same_size("mask", mask.dimensions(), "original", original.dimensions())?;
    let weights = feather(mask, feather_radius_px);
    Ok(blend_rgb(original, generated, &weights))
}

/// `base` where `weights` is 0, `over` where it is 255, linear in between, rounded to nearest;
/// all three the same size (checked by the callers).
pub(crate) fn blend_rgb(base: &RgbImage, over: &RgbImage, weights: &GrayImage) -> RgbImage {
    let mut out = base.clone();
    for ((out_pixel, over_pixel), weight) in
        out.pixels_mut().zip(over.pixels()).zip(weights.pixels())
    {
        let m = u32::from(weight.0[0]);
        if m == 0 {
            continue;
        }
        for (o, &g) in out_pixel.0.iter_mut().zip(over_pixel.0.iter()) {
            let mixed = (u32::from(*o) * (255 - m) + u32::from(g) * m + 127) / 255;
            *o = mixed as u8;
        }
    }
    out
}

/// The colour to write beside the photo's `alpha` for `result`, an edit of the photo
/// computed on its colour over white (`over_white`, what the model saw), at the photo's size.
///
/// - A pixel the edit left as it was (equal to `over_white`: everything outside a mask is
///   pasted back so) gets the file's own colour `file_rgb` back, byte for byte.
/// - A changed pixel has the white taken out again (`c = (r - (1 - a) 255) / a`), so that
///   writing it beside its alpha shows over any background what the edit showed over white,
///   instead of the white counting twice.
/// - A fully transparent pixel keeps the file's colour (it shows nowhere, and some files use
///   it).
pub fn restore_transparency(
    result: &RgbImage,
    over_white: &RgbImage,
    file_rgb: &RgbImage,
    alpha: &GrayImage,
) -> RgbImage {
    let size = result.dimensions();
    if over_white.dimensions() != size
        || file_rgb.dimensions() != size
        || alpha.dimensions() != size
    {
        return result.clone();
    }
    RgbImage::from_fn(size.0, size.1, |x, y| {
        let edited = result.get_pixel(x, y);
        let a = i32::from(alpha.get_pixel(x, y).0[0]);
        if a == 0 || edited == over_white.get_pixel(x, y) {
            return *file_rgb.get_pixel(x, y);
        }
        image::Rgb(edited.0.map(|c| {
            let numerator = 255 * (i32::from(c) + a - 255);
            ((numerator + a / 2).div_euclid(a)).clamp(0, 255) as u8
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Squared distance from every pixel to the nearest core pixel, by brute force.
    fn brute_force_distance_sq(mask: &GrayImage) -> Vec<Option<u64>> {
        let core: Vec<(i64, i64)> = mask
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0[0] >= MASK_CORE_LEVEL)
            .map(|(x, y, _)| (i64::from(x), i64::from(y)))
            .collect();
        mask.enumerate_pixels()
            .map(|(x, y, _)| {
                core.iter()
                    .map(|&(cx, cy)| {
                        ((cx - i64::from(x)).pow(2) + (cy - i64::from(y)).pow(2)) as u64
                    })
                    .min()
            })
            .collect()
    }

    #[test]
    fn feather_matches_the_brute_force_distance_ramp() {
        // Scattered core pixels of different values, so the envelope has many parabolas.
        let mut mask = GrayImage::new(37, 23);
        let mut state = 12345u32;
        for _ in 0..12 {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let x = (state >> 8) % 37;
            let y = (state >> 20) % 23;
            mask.put_pixel(
                x,
                y,
                image::Luma([if state.is_multiple_of(2) { 255 } else { 200 }]),
            );
        }
        let distances = brute_force_distance_sq(&mask);
        for radius in [1u32, 3, 7, 40] {
            let feathered = feather(&mask, radius);
            for (index, (pixel, distance)) in feathered.pixels().zip(&distances).enumerate() {
                let own = mask.as_raw()[index];
                let value = pixel.0[0];
                match distance {
                    Some(0) => assert_eq!(value, own),
                    Some(d) if *d > u64::from(radius * radius) => assert_eq!(value, 0),
                    Some(d) => {
                        // The nearest core pixel's value is 200 or 255; check the ramp's shape.
                        let r = f64::from(radius);
                        let t = (r + 1.0 - (*d as f64).sqrt()) / (r + 1.0);
                        let low = (200.0 * smoothstep(t)).round() as u8;
                        let high = (255.0 * smoothstep(t)).round() as u8;
                        assert!(
                            (low..=high).contains(&value),
                            "radius {radius}, index {index}: {value} not in {low}..={high}"
                        );
                    }
                    None => assert_eq!(value, 0),
                }
            }
        }
    }

    #[test]
    fn blend_is_exact_at_both_ends_and_rounds_in_between() {
        let base = RgbImage::from_pixel(3, 1, image::Rgb([10, 200, 0]));
        let over = RgbImage::from_pixel(3, 1, image::Rgb([20, 100, 255]));
        let weights = GrayImage::from_raw(3, 1, vec![0, 255, 128]).expect("3 pixels");
        let out = blend_rgb(&base, &over, &weights);
        assert_eq!(out.get_pixel(0, 0).0, [10, 200, 0]);
        assert_eq!(out.get_pixel(1, 0).0, [20, 100, 255]);
        assert_eq!(out.get_pixel(2, 0).0, [15, 150, 128]);
    }

    #[test]
    fn default_radius_follows_the_shorter_side() {
        assert_eq!(default_feather_radius(0, 0), 2);
        assert_eq!(default_feather_radius(64, 4000), 2);
        assert_eq!(default_feather_radius(512, 512), 8);
        assert_eq!(default_feather_radius(4000, 3000), 47);
    }
}
