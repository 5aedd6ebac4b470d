//! The paper's interpolation (section 3.4): "interpolating with the pixels of the original
//! image if their neighborhood is very similar in both the generated and original images".
//!
//! The model works at about 512x512 pixels; its result, brought back to the photo's size, has
//! lost the photo's fine detail even where nothing was edited. Here, at the photo's full
//! resolution, every pixel whose neighbourhood looks the same in both images takes the
//! original's pixel, so untouched areas keep their detail and edits keep theirs.
//!
//! The weight map (255 = take the original), with `r` the settings' `window_radius_px`; each
//! step is O(pixels) whatever `r` (running sums, and the van Herk / Gil-Werman running
//! minimum):
//! 1. **Local colour difference**: `generated - original` per channel, averaged over a box of
//!    radius `r`, then its absolute value averaged over RGB. Averaging the signed difference
//!    first cancels what the model cannot reproduce anyway (detail finer than its own pixels,
//!    sampling noise) and keeps what a person sees as a change: colour, shapes, objects. (The
//!    mean *absolute* difference would not: it calls every textured area changed, because the
//!    generated image lacks the texture, and restores nothing.)
//! 2. **Neighbourhood difference**: the mean of that over a box of radius `r`, which keeps a
//!    few unlucky pixels from counting as an edit.
//! 3. **Weight**: 255 up to [`InterpolationSettings::threshold`], 0 from `threshold +
//!    softness`, smoothstep in between.
//! 4. **The whole neighbourhood must be alike**: the weight's minimum over a box of radius
//!    `3r`, which covers how far steps 1, 2 and 5 spread an edit's edge. An edit thus keeps
//!    its own pixels up to and a little past its edge, and the original never bleeds into it.
//! 5. **Smooth**: the weight's mean over a box of radius `r`, so the hand-over from edit to
//!    original is a ramp, not a seam.
//!
//! So every pixel `6r` or more from any change takes the original, and no pixel inside a clear
//! change does.
//!
//! The blend is in integers: weight 255 gives the original byte for byte, 0 the generated.
//! Where both images are identical the result is the original whatever the weights.

use image::{GrayImage, RgbImage};

use super::ImagingError;
use super::composite::{blend_rgb, check_same_size, smoothstep};

/// How [`interpolate_toward_original`] decides that a neighbourhood is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InterpolationSettings {
    /// The scale, in photo pixels, at which the images are compared: differences are averaged
    /// over boxes of this radius, the original is taken only where everything within three
    /// times it is alike, and the hand-over ramp is this wide (see the module documentation).
    /// Clamped to the image's longer side.
    pub window_radius_px: u32,
    /// Neighbourhoods whose local colour difference (mean over RGB, in 8-bit levels) is at
    /// most this take the original's pixels.
    pub threshold: f32,
    /// Above the threshold, the original's share falls smoothly to zero over this many more
    /// levels; 0 (or less) makes it a hard cut.
    pub softness: f32,
}

impl InterpolationSettings {
    /// Settings for a `width` x `height` photo: the window radius is two pixels of the model's
    /// working image (about 512x512 in area) at the photo's scale, at least 2: 2 px at 512,
    /// 7 px for 2048x1536, 14 px for 4000x3000. Averaging over two of the model's pixels
    /// cancels the detail it cannot keep, and still sees any change it made. Threshold and
    /// softness do not depend on the size.
    pub fn for_size(width: u32, height: u32) -> Self {
        let photo_pixels_per_model_pixel = (f64::from(width) * f64::from(height)).sqrt() / 512.0;
        Self {
            // Float-to-int casts saturate.
            window_radius_px: ((2.0 * photo_pixels_per_model_pixel).round() as u32).max(2),
            threshold: 6.0,
            softness: 12.0,
        }
    }
}

impl Default for InterpolationSettings {
    /// The settings for a 512x512 photo: [`InterpolationSettings::for_size`]`(512, 512)`.
    ///
    /// The original is taken whole up to a difference of 6 levels (2.4%), meant to lie above
    /// the colour drift of an untouched area once detail is averaged away, and the generated
    /// image from 18 levels (7%), below most changes meant as an edit. Both are starting
    /// points, to be tuned on real results.
    fn default() -> Self {
        Self::for_size(512, 512)
    }
}

/// The generated image with every pixel whose neighbourhood is alike in both images replaced
/// by the original's (the paper's section 3.4); see the module documentation for how.
///
/// Identical images give the original exactly; where the images differ clearly (an edit), the
/// result is the generated image exactly, and it hands over to the original within
/// `6 * window_radius_px` of the edit. Both images must have the same size.
pub fn interpolate_toward_original(
    original: &RgbImage,
    generated: &RgbImage,
    settings: &InterpolationSettings,
) -> Result<RgbImage, ImagingError> {
    let weights = similarity_map(original, generated, settings)?;
    Ok(blend_rgb(generated, original, &weights))
}

/// The weight [`interpolate_toward_original`] gives the original at each pixel: 255 where the
/// neighbourhoods are alike (the original is taken), 0 where they differ (the generated image
/// is kept). For debugging and for showing in the GUI. Both images must have the same size.
pub fn similarity_map(
    original: &RgbImage,
    generated: &RgbImage,
    settings: &InterpolationSettings,
) -> Result<GrayImage, ImagingError> {
    check_same_size(
        "generated image",
        generated.dimensions(),
        "original",
        original.dimensions(),
    )?;
    let (width, height) = original.dimensions();
    let mut map = GrayImage::new(width, height);
    let (w, h) = (width as usize, height as usize);
    if w == 0 || h == 0 {
        return Ok(map);
    }
    let radius = (settings.window_radius_px as usize).min(w.max(h));
    let mut differences = local_differences(original.as_raw(), generated.as_raw(), (w, h), radius);
    box_mean(&mut differences, w, h, radius);
    let curve = WeightCurve::new(settings).table();
    let weights: &mut [u8] = &mut map;
    for (weight, &difference) in weights.iter_mut().zip(&differences) {
        *weight = curve[usize::from(difference)];
    }
    // Steps 1 and 2 blur an edit's edge by up to 2 radii and step 5 by one more, so a
    // neighbourhood of 3 radii keeps a clear edit's own pixels up to its edge.
    let alike_radius = (3 * radius).min(w.max(h));
    min_filter_rows(weights, w, alike_radius);
    min_filter_columns(weights, w, h, alike_radius);
    box_mean(weights, w, h, radius);
    Ok(map)
}

/// Local colour differences are stored in 1/16 of an 8-bit level.
const STEPS_PER_LEVEL: u32 = 16;

/// The largest local colour difference, in steps.
const MAX_DIFFERENCE: u16 = (255 * STEPS_PER_LEVEL) as u16;

/// Step 1: every pixel's local colour difference in steps of 1/16 level: the signed difference
/// averaged per channel over a box of radius `detail_radius` (clipped at the borders), its
/// absolute value averaged over RGB.
///
/// Column sums are kept for the rows in the window and slid down one row at a time, and each
/// row's sums slid across it, so every pixel costs a few additions whatever the radius.
fn local_differences(
    original: &[u8],
    generated: &[u8],
    (w, h): (usize, usize),
    detail_radius: usize,
) -> Vec<u16> {
    let r = detail_radius;
    let mut out = vec![0u16; w * h];
    let mut column_sums = vec![[0i64; 3]; w];
    let add_row = |sums: &mut [[i64; 3]], y: usize, sign: i64| {
        let start = y * w * 3;
        let original = &original[start..start + w * 3];
        let generated = &generated[start..start + w * 3];
        for ((sum, o), g) in sums
            .iter_mut()
            .zip(original.chunks_exact(3))
            .zip(generated.chunks_exact(3))
        {
            for c in 0..3 {
                sum[c] += sign * (i64::from(g[c]) - i64::from(o[c]));
            }
        }
    };
    for y in 0..=r.min(h - 1) {
        add_row(&mut column_sums, y, 1);
    }
    // Steps per unit of summed absolute difference, for the columns in each pixel's window.
    let column_scales: Vec<f64> = (0..w)
        .map(|x| {
            let columns = (x + r).min(w - 1) - x.saturating_sub(r) + 1;
            f64::from(STEPS_PER_LEVEL) / (3 * columns) as f64
        })
        .collect();
    for y in 0..h {
        let rows = (y + r).min(h - 1) - y.saturating_sub(r) + 1;
        let row_scale = 1.0 / rows as f64;
        let mut window = [0i64; 3];
        for sums in &column_sums[..=r.min(w - 1)] {
            add3(&mut window, sums, 1);
        }
        let out_row = &mut out[y * w..(y + 1) * w];
        for (x, (difference, &column_scale)) in out_row.iter_mut().zip(&column_scales).enumerate() {
            let total: i64 = window.iter().map(|s| s.abs()).sum();
            let steps = total as f64 * column_scale * row_scale;
            // Rounds to nearest (steps is never negative); the cast saturates.
            *difference = ((steps + 0.5) as u16).min(MAX_DIFFERENCE);
            if x + r + 1 < w {
                add3(&mut window, &column_sums[x + r + 1], 1);
            }
            if x >= r {
                add3(&mut window, &column_sums[x - r], -1);
            }
        }
        if y + r + 1 < h {
            add_row(&mut column_sums, y + r + 1, 1);
        }
        if y >= r {
            add_row(&mut column_sums, y - r, -1);
        }
    }
    out
}

fn add3(into: &mut [i64; 3], from: &[i64; 3], sign: i64) {
    for (a, b) in into.iter_mut().zip(from) {
        *a += sign * b;
    }
}

/// Step 3: neighbourhood difference (levels) to weight (255 = take the original).
struct WeightCurve {
    threshold: f64,
    softness: f64,
}

impl WeightCurve {
    fn new(settings: &InterpolationSettings) -> Self {
        Self {
            threshold: f64::from(settings.threshold),
            softness: f64::from(settings.softness),
        }
    }

    /// The weight of every difference in steps, 0 to [`MAX_DIFFERENCE`].
    fn table(&self) -> Vec<u8> {
        (0..=MAX_DIFFERENCE)
            .map(|steps| self.weight(f64::from(steps) / f64::from(STEPS_PER_LEVEL)))
            .collect()
    }

    fn weight(&self, levels: f64) -> u8 {
        if levels <= self.threshold {
            return 255;
        }
        if self.softness.is_nan() || self.softness <= 0.0 {
            return 0;
        }
        let t = (levels - self.threshold) / self.softness;
        (255.0 * (1.0 - smoothstep(t))).round() as u8
    }
}

/// Step 4 along rows: every value becomes the minimum within `radius` of it in its row.
fn min_filter_rows(buf: &mut [u8], w: usize, radius: usize) {
    if radius == 0 {
        return;
    }
    let mut padded = vec![u8::MAX; w + 2 * radius];
    let mut prefix = vec![0u8; padded.len()];
    let mut suffix = vec![0u8; padded.len()];
    for row in buf.chunks_exact_mut(w) {
        padded[radius..radius + w].copy_from_slice(row);
        running_min(&padded, radius, &mut prefix, &mut suffix, row);
    }
}

/// The minimum over each window of `2 * radius + 1` values of `padded` (van Herk /
/// Gil-Werman: per block of that length, minima from its start and from its end; every
/// window spans at most two blocks). `out[j]` is the window starting at `padded[j]`.
fn running_min(padded: &[u8], radius: usize, prefix: &mut [u8], suffix: &mut [u8], out: &mut [u8]) {
    let block = 2 * radius + 1;
    for ((source, prefix), suffix) in padded
        .chunks(block)
        .zip(prefix.chunks_mut(block))
        .zip(suffix.chunks_mut(block))
    {
        let mut low = u8::MAX;
        for (&value, min) in source.iter().zip(prefix.iter_mut()) {
            low = low.min(value);
            *min = low;
        }
        let mut low = u8::MAX;
        for (&value, min) in source.iter().zip(suffix.iter_mut()).rev() {
            low = low.min(value);
            *min = low;
        }
    }
    for ((value, &s), &p) in out.iter_mut().zip(suffix.iter()).zip(&prefix[2 * radius..]) {
        *value = s.min(p);
    }
}

/// Step 4 along columns: the same running minimum, done a whole row at a time so the inner
/// loops run along memory.
fn min_filter_columns(buf: &mut [u8], w: usize, h: usize, radius: usize) {
    if radius == 0 {
        return;
    }
    let block = 2 * radius + 1;
    let len = h + 2 * radius;
    // Rows of the column padded with `radius` rows of u8::MAX at both ends.
    let padded_row = |i: usize| (radius..radius + h).contains(&i).then(|| i - radius);
    let mut prefix = vec![u8::MAX; len * w];
    for i in 0..len {
        let (done, rest) = prefix.split_at_mut(i * w);
        let current = &mut rest[..w];
        if let Some(y) = padded_row(i) {
            current.copy_from_slice(&buf[y * w..(y + 1) * w]);
        }
        if !i.is_multiple_of(block) {
            let previous = &done[(i - 1) * w..];
            for (c, &p) in current.iter_mut().zip(previous) {
                *c = (*c).min(p);
            }
        }
    }
    let mut suffix = vec![u8::MAX; len * w];
    for i in (0..len).rev() {
        let (head, later) = suffix.split_at_mut((i + 1) * w);
        let current = &mut head[i * w..];
        if let Some(y) = padded_row(i) {
            current.copy_from_slice(&buf[y * w..(y + 1) * w]);
        }
        if i + 1 != len && !(i + 1).is_multiple_of(block) {
            for (c, &n) in current.iter_mut().zip(&later[..w]) {
                *c = (*c).min(n);
            }
        }
    }
    for (j, row) in buf.chunks_exact_mut(w).enumerate() {
        let from_suffix = &suffix[j * w..(j + 1) * w];
        let from_prefix = &prefix[(j + 2 * radius) * w..(j + 2 * radius + 1) * w];
        for ((value, &s), &p) in row.iter_mut().zip(from_suffix).zip(from_prefix) {
            *value = s.min(p);
        }
    }
}

/// Steps 2 and 5: every value becomes the mean over the box of `radius` around it (clipped at
/// the borders), rounded to nearest, so a box of equal values keeps that value exactly.
///
/// Column sums slide down one row at a time and each row's window slides across it, so every
/// value costs a few additions whatever the radius.
fn box_mean<T>(buf: &mut [T], w: usize, h: usize, radius: usize)
where
    T: Copy + Into<u64> + TryFrom<u64>,
{
    if radius == 0 {
        return;
    }
    let source = buf.to_vec();
    let r = radius;
    let mut column_sums = vec![0u64; w];
    for row in source.chunks_exact(w).take(r + 1) {
        for (sum, &v) in column_sums.iter_mut().zip(row) {
            *sum += v.into();
        }
    }
    let column_counts: Vec<(u64, f64)> = (0..w)
        .map(|x| {
            let columns = ((x + r).min(w - 1) - x.saturating_sub(r) + 1) as u64;
            (columns, 1.0 / columns as f64)
        })
        .collect();
    for y in 0..h {
        let rows = ((y + r).min(h - 1) - y.saturating_sub(r) + 1) as u64;
        let mut window: u64 = column_sums[..=r.min(w - 1)].iter().sum();
        let row_inverse = 1.0 / rows as f64;
        for (x, (value, &(columns, column_inverse))) in buf[y * w..(y + 1) * w]
            .iter_mut()
            .zip(&column_counts)
            .enumerate()
        {
            let count = rows * columns;
            let mean = rounded_quotient(window, count, row_inverse * column_inverse);
            // A mean is never above the largest value, so it always fits.
            if let Ok(mean) = T::try_from(mean) {
                *value = mean;
            }
            if x + r + 1 < w {
                window += column_sums[x + r + 1];
            }
            if x >= r {
                window -= column_sums[x - r];
            }
        }
        if y + r + 1 < h {
            for (sum, &v) in column_sums
                .iter_mut()
                .zip(&source[(y + r + 1) * w..(y + r + 2) * w])
            {
                *sum += v.into();
            }
        }
        if y >= r {
            for (sum, &v) in column_sums
                .iter_mut()
                .zip(&source[(y - r) * w..(y - r + 1) * w])
            {
                *sum -= v.into();
            }
        }
    }
}

/// `sum / count` rounded to nearest (halves up), exactly, for sums below 2^52, given
/// `inverse` ≈ 1 / `count`: a float estimate corrected by one where needed, which is several
/// times faster than integer division.
fn rounded_quotient(sum: u64, count: u64, inverse: f64) -> u64 {
    let numerator = sum + count / 2;
    // Through i64, which converts to and from f64 in one instruction (u64 takes a dozen).
    let mut quotient = (numerator as i64 as f64 * inverse) as i64 as u64;
    if quotient * count > numerator {
        quotient -= 1;
    } else if (quotient + 1) * count <= numerator {
        quotient += 1;
    }
    quotient
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random byte image.
    fn noise(w: usize, h: usize, seed: u32) -> Vec<u8> {
        let mut state = seed;
        (0..w * h)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect()
    }

    fn window(w: usize, h: usize, x: usize, y: usize, r: usize) -> impl Iterator<Item = usize> {
        let (x0, x1) = (x.saturating_sub(r), (x + r).min(w - 1));
        let (y0, y1) = (y.saturating_sub(r), (y + r).min(h - 1));
        (y0..=y1).flat_map(move |yy| (x0..=x1).map(move |xx| yy * w + xx))
    }

    #[test]
    fn min_filter_matches_brute_force() {
        for (w, h, r) in [
            (13, 7, 1),
            (13, 7, 2),
            (5, 9, 4),
            (6, 6, 6),
            (1, 11, 3),
            (17, 1, 5),
        ] {
            let source = noise(w, h, (w * 31 + r) as u32);
            let mut filtered = source.clone();
            min_filter_rows(&mut filtered, w, r);
            min_filter_columns(&mut filtered, w, h, r);
            for y in 0..h {
                for x in 0..w {
                    let expected = window(w, h, x, y, r).map(|i| source[i]).min();
                    assert_eq!(
                        Some(filtered[y * w + x]),
                        expected,
                        "{w}x{h} r{r} at {x},{y}"
                    );
                }
            }
        }
    }

    #[test]
    fn box_mean_matches_brute_force() {
        for (w, h, r) in [(13, 7, 1), (9, 12, 3), (4, 4, 9)] {
            let source = noise(w, h, (h * 7 + r) as u32);
            let mut blurred = source.clone();
            box_mean(&mut blurred, w, h, r);
            for y in 0..h {
                for x in 0..w {
                    let values: Vec<u64> = window(w, h, x, y, r)
                        .map(|i| u64::from(source[i]))
                        .collect();
                    let count = values.len() as u64;
                    let expected = (values.iter().sum::<u64>() + count / 2) / count;
                    assert_eq!(
                        u64::from(blurred[y * w + x]),
                        expected,
                        "{w}x{h} r{r} at {x},{y}"
                    );
                }
            }
        }
    }

    #[test]
    fn local_differences_match_brute_force() {
        let (w, h) = (11, 8);
        let original = noise(w * 3, h, 1);
        let generated = noise(w * 3, h, 2);
        for r in [0, 1, 2, 20] {
            let differences = local_differences(&original, &generated, (w, h), r);
            for y in 0..h {
                for x in 0..w {
                    let mut sums = [0i64; 3];
                    let mut count = 0;
                    for i in window(w, h, x, y, r) {
                        for (c, sum) in sums.iter_mut().enumerate() {
                            *sum +=
                                i64::from(generated[3 * i + c]) - i64::from(original[3 * i + c]);
                        }
                        count += 1;
                    }
                    let total = sums.iter().map(|s| s.unsigned_abs()).sum::<u64>();
                    let expected = (total as f64 * 16.0 / f64::from(3 * count)).round();
                    assert_eq!(
                        f64::from(differences[y * w + x]),
                        expected,
                        "r{r} at {x},{y}"
                    );
                }
            }
        }
    }

    #[test]
    fn weight_curve_ends_and_hard_cut() {
        let curve = WeightCurve::new(&InterpolationSettings {
            window_radius_px: 1,
            threshold: 6.0,
            softness: 12.0,
        });
        assert_eq!(curve.weight(0.0), 255);
        assert_eq!(curve.weight(6.0), 255);
        assert_eq!(curve.weight(12.0), 128);
        assert_eq!(curve.weight(18.0), 0);
        assert_eq!(curve.weight(200.0), 0);
        for softness in [0.0, -1.0, f32::NAN] {
            let hard = WeightCurve::new(&InterpolationSettings {
                window_radius_px: 1,
                threshold: 6.0,
                softness,
            });
            assert_eq!(hard.weight(6.0), 255);
            assert_eq!(hard.weight(6.01), 0);
        }
    }

    #[test]
    fn window_scales_with_the_photo() {
        assert_eq!(InterpolationSettings::for_size(64, 64).window_radius_px, 2);
        assert_eq!(InterpolationSettings::default().window_radius_px, 2);
        assert_eq!(
            InterpolationSettings::for_size(2048, 1536).window_radius_px,
            7
        );
        assert_eq!(
            InterpolationSettings::for_size(4000, 3000).window_radius_px,
            14
        );
        assert_eq!(InterpolationSettings::for_size(0, 0).window_radius_px, 2);
        assert_eq!(
            InterpolationSettings::for_size(u32::MAX, u32::MAX).window_radius_px,
            1 << 24
        );
    }
}
