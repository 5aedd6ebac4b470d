//! The photo's own regions: a graph-based segmentation (Felzenszwalb and Huttenlocher 2004),
//! which the automatic edit region snaps to so that its border follows the photo's edges
//! rather than the model's blurred difference.
//!
//! Written here because the one Rust implementation on crates.io
//! (`graph-based-image-segmentation`) works on OpenCV matrices, and the algorithm is one
//! sort and a union-find: every pair of neighbouring pixels is an edge weighted by their
//! colour distance; in order of weight, an edge joins its two segments when it is no heavier
//! than the heaviest edge inside either one plus `SCALE / size` (so small segments join
//! readily and large ones only across a weak edge). Segments under a minimum area are then
//! merged into a neighbour, so noise does not count as an object.

use image::RgbImage;

/// Felzenszwalb's `k`, in 8-bit RGB distance times pixels: larger prefers larger segments.
/// 300 separates the demo world's objects from their background on its own 64 px photos and
/// on the noisy ones its model draws (about 11 segments a photo).
const SCALE: f32 = 300.0;
/// The smallest segment, as a share of the photo: 1/200, 20 pixels at 64x64.
const MIN_AREA_FRACTION: f64 = 1.0 / 200.0;
/// The Gaussian smoothing before the distances, as the paper's (0.8 px): it keeps one pixel
/// of JPEG noise or anti-aliasing from splitting a flat area.
const SMOOTHING_SIGMA: f32 = 0.8;

/// How near a segment's mean colour (8-bit RGB distance) must be to a neighbouring
/// background segment's for [`Segments::background`] to take it as more of the same
/// background. A model's drawn background is blotchy, and the segmentation splits it into
/// fragments, some wholly inside the frame; the objects on it differ from it by far more
/// (the demo world's colours by 100 and more). Replayed on the 77 region maps of the
/// 30-scene benchmark, any distance from 20 to 80 gave the same regions.
const BACKGROUND_COLOUR_DISTANCE: f64 = 20.0;

/// A label per pixel, row-major, `0..count`, and each segment's mean colour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    pub width: u32,
    pub height: u32,
    pub labels: Vec<u32>,
    pub count: usize,
    /// Per label, the mean colour of its pixels in the photo.
    pub colours: Vec<[u8; 3]>,
}

impl Segments {
    /// The label of pixel `(x, y)`.
    pub fn at(&self, x: u32, y: u32) -> u32 {
        self.labels[(y * self.width + x) as usize]
    }

    /// Per label, whether the segment reaches the photo's edge: what surrounds the photo's
    /// subjects (its background) does, an object wholly inside the frame does not.
    pub fn touching_border(&self) -> Vec<bool> {
        let (width, height) = (self.width, self.height);
        let mut touching = vec![false; self.count];
        let edge = (0..width)
            .flat_map(|x| [(x, 0), (x, height.saturating_sub(1))])
            .chain((0..height).flat_map(|y| [(0, y), (width.saturating_sub(1), y)]));
        for (x, y) in edge {
            touching[self.at(x, y) as usize] = true;
        }
        touching
    }

    /// Per label, whether the segment is the photo's background: it reaches the frame
    /// ([`Self::touching_border`]), or it borders a background segment and its mean colour
    /// is within [`BACKGROUND_COLOUR_DISTANCE`] of that segment's (a fragment of the same
    /// blotchy background that the frame does not reach), repeatedly. What remains is the
    /// photo's objects.
    pub fn background(&self) -> Vec<bool> {
        let mut background = self.touching_border();
        let neighbours = self.neighbouring_pairs();
        let near = |a: usize, b: usize| {
            let [p, q] = [self.colours[a], self.colours[b]];
            let squared: f64 = p
                .iter()
                .zip(q)
                .map(|(&x, y)| (f64::from(x) - f64::from(y)).powi(2))
                .sum();
            squared < BACKGROUND_COLOUR_DISTANCE * BACKGROUND_COLOUR_DISTANCE
        };
        // Each pass takes the fragments next to the background found so far; a chain of
        // fragments takes one pass a link.
        let mut grew = true;
        while grew {
            grew = false;
            for &(a, b) in &neighbours {
                for (inner, outer) in [(a, b), (b, a)] {
                    if background[outer] && !background[inner] && near(inner, outer) {
                        background[inner] = true;
                        grew = true;
                    }
                }
            }
        }
        background
    }

    /// Every pair of labels that share a pixel edge (4-connected), once, smaller label first.
    fn neighbouring_pairs(&self) -> Vec<(usize, usize)> {
        let (width, height) = (self.width, self.height);
        let mut pairs = std::collections::BTreeSet::new();
        for y in 0..height {
            for x in 0..width {
                let here = self.at(x, y) as usize;
                for (nx, ny) in [(x + 1, y), (x, y + 1)] {
                    if nx < width && ny < height {
                        let there = self.at(nx, ny) as usize;
                        if here != there {
                            pairs.insert((here.min(there), here.max(there)));
                        }
                    }
                }
            }
        }
        pairs.into_iter().collect()
    }
}

/// Splits `photo` into regions of similar colour.
pub fn segment_photo(photo: &RgbImage) -> Segments {
    let (width, height) = photo.dimensions();
    let smooth = image::imageops::blur(photo, SMOOTHING_SIGMA);
    let pixel = |x: u32, y: u32| smooth.get_pixel(x, y).0.map(f32::from);
    let index = |x: u32, y: u32| (y * width + x) as usize;
    let mut edges = Vec::with_capacity(4 * (width * height) as usize);
    for y in 0..height {
        for x in 0..width {
            let here = pixel(x, y);
            // Right, down, and both diagonals down: each neighbouring pair once (8-connected).
            let neighbours = [
                (x + 1 < width).then(|| (x + 1, y)),
                (y + 1 < height).then(|| (x, y + 1)),
                (x + 1 < width && y + 1 < height).then(|| (x + 1, y + 1)),
                (x > 0 && y + 1 < height).then(|| (x - 1, y + 1)),
            ];
            for (nx, ny) in neighbours.into_iter().flatten() {
                let there = pixel(nx, ny);
                let distance = here
                    .iter()
                    .zip(there)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                edges.push((distance, index(x, y), index(nx, ny)));
            }
        }
    }
    edges.sort_by(|a, b| a.0.total_cmp(&b.0));

    let mut sets = DisjointSets::new((width * height) as usize);
    for &(weight, a, b) in &edges {
        let (a, b) = (sets.find(a), sets.find(b));
        if a != b && weight <= sets.tolerance(a).min(sets.tolerance(b)) {
            sets.join(a, b, weight);
        }
    }
    let min_area = ((f64::from(width * height) * MIN_AREA_FRACTION).round() as usize).max(1);
    for &(weight, a, b) in &edges {
        let (a, b) = (sets.find(a), sets.find(b));
        if a != b && (sets.size[a] < min_area || sets.size[b] < min_area) {
            sets.join(a, b, weight);
        }
    }
    // The smoothing turns a sharp edge into a line or two of in-between colour, which a
    // long edge makes larger than the minimum area: a thin segment (most of its pixels on
    // its border) joins the neighbour nearest its mean colour, the object or its background.
    absorb_thin_segments(&mut sets, &smooth);

    // Roots to 0..count, in reading order.
    let mut label_of_root = vec![u32::MAX; sets.parent.len()];
    let mut count = 0usize;
    let labels: Vec<u32> = (0..sets.parent.len())
        .map(|i| {
            let root = sets.find(i);
            if label_of_root[root] == u32::MAX {
                label_of_root[root] = count as u32;
                count += 1;
            }
            label_of_root[root]
        })
        .collect();
    let colours = mean_colours(photo, &labels, count);
    Segments {
        width,
        height,
        labels,
        count,
        colours,
    }
}

/// Per label, the mean colour of the photo's pixels (not the smoothed ones: the smoothing
/// blends each segment's edge with its neighbours').
fn mean_colours(photo: &RgbImage, labels: &[u32], count: usize) -> Vec<[u8; 3]> {
    let mut sums = vec![([0u64; 3], 0u64); count];
    for (pixel, &label) in photo.pixels().zip(labels) {
        let (sum, n) = &mut sums[label as usize];
        for (total, value) in sum.iter_mut().zip(pixel.0) {
            *total += u64::from(value);
        }
        *n += 1;
    }
    sums.into_iter()
        .map(|(sum, n)| sum.map(|total| ((total as f64) / (n.max(1) as f64)).round() as u8))
        .collect()
}

/// The share of a segment's pixels on its border from which it counts as thin: a line two
/// pixels wide is all border, a 36x36 block (the minimum area at 512x512) a tenth.
const THIN_BORDER_SHARE: f64 = 0.75;

/// Joins each thin segment (see [`THIN_BORDER_SHARE`]) to its neighbour of nearest mean
/// colour, preferring neighbours that are not thin themselves.
fn absorb_thin_segments(sets: &mut DisjointSets, smooth: &RgbImage) {
    let (width, height) = (smooth.width() as usize, smooth.height() as usize);
    let n = width * height;
    let roots: Vec<usize> = (0..n).map(|i| sets.find(i)).collect();
    let mut border = vec![0usize; n];
    let mut colour = vec![[0.0f64; 3]; n];
    let neighbours = |i: usize| {
        let (x, y) = (i % width, i / width);
        [
            (x > 0).then(|| i - 1),
            (x + 1 < width).then(|| i + 1),
            (y > 0).then(|| i - width),
            (y + 1 < height).then(|| i + width),
        ]
        .into_iter()
        .flatten()
    };
    for (i, &root) in roots.iter().enumerate() {
        border[root] += usize::from(neighbours(i).any(|j| roots[j] != root));
        let pixel = smooth.get_pixel((i % width) as u32, (i / width) as u32).0;
        for (sum, value) in colour[root].iter_mut().zip(pixel) {
            *sum += f64::from(value);
        }
    }
    let thin: Vec<bool> = (0..n)
        .map(|i| roots[i] == i && border[i] as f64 >= THIN_BORDER_SHARE * sets.size[i] as f64)
        .collect();
    let mean = |root: usize| colour[root].map(|sum| sum / sets.size[root] as f64);
    let distance =
        |a: [f64; 3], b: [f64; 3]| -> f64 { a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum() };
    // The best neighbour of each thin root: (not thin first, then nearest colour).
    let mut best: Vec<Option<(bool, f64, usize)>> = vec![None; n];
    for (i, &root) in roots.iter().enumerate() {
        if !thin[root] {
            continue;
        }
        for j in neighbours(i) {
            let other = roots[j];
            if other == root {
                continue;
            }
            let candidate = (thin[other], distance(mean(root), mean(other)), other);
            if best[root].is_none_or(|b| (candidate.0, candidate.1) < (b.0, b.1)) {
                best[root] = Some(candidate);
            }
        }
    }
    for (root, choice) in best.into_iter().enumerate() {
        if let Some((_, _, other)) = choice {
            let (a, b) = (sets.find(root), sets.find(other));
            if a != b {
                sets.join(a, b, 0.0);
            }
        }
    }
}

/// Union-find with each set's size and heaviest inner edge.
struct DisjointSets {
    parent: Vec<usize>,
    size: Vec<usize>,
    heaviest: Vec<f32>,
}

impl DisjointSets {
    fn new(n: usize) -> Self {
        Self {
            parent: (0..n).collect(),
            size: vec![1; n],
            heaviest: vec![0.0; n],
        }
    }

    fn find(&mut self, mut a: usize) -> usize {
        while self.parent[a] != a {
            self.parent[a] = self.parent[self.parent[a]];
            a = self.parent[a];
        }
        a
    }

    /// How heavy an edge root `a`'s set still accepts.
    fn tolerance(&self, a: usize) -> f32 {
        self.heaviest[a] + SCALE / self.size[a] as f32
    }

    /// Joins two roots; edges arrive in increasing weight, so `weight` is the new heaviest.
    fn join(&mut self, a: usize, b: usize, weight: f32) {
        let (big, small) = if self.size[a] >= self.size[b] {
            (a, b)
        } else {
            (b, a)
        };
        self.parent[small] = big;
        self.size[big] += self.size[small];
        self.heaviest[big] = self.heaviest[big].max(weight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// A grey background with a red square at 16..32, slightly noisy so that flat areas are
    /// not trivially one colour.
    fn photo_with_square() -> RgbImage {
        RgbImage::from_fn(48, 48, |x, y| {
            let jitter = ((x * 7 + y * 13) % 5) as u8;
            if (16..32).contains(&x) && (16..32).contains(&y) {
                Rgb([200 + jitter, 30, 30])
            } else {
                Rgb([120 + jitter, 120, 120])
            }
        })
    }

    #[test]
    fn an_object_is_its_own_segment_and_noise_is_not() {
        let segments = segment_photo(&photo_with_square());
        assert_eq!(segments.count, 2, "the square and the background");
        let square = segments.at(24, 24);
        let background = segments.at(2, 2);
        assert_ne!(square, background);
        // Every pixel inside the square shares its label, every pixel well outside the other
        // one (the border pixel rows are blurred, so they may go either way).
        for y in 0..48 {
            for x in 0..48 {
                let inside = (17..31).contains(&x) && (17..31).contains(&y);
                let outside = !(15..33).contains(&x) || !(15..33).contains(&y);
                if inside {
                    assert_eq!(segments.at(x, y), square, "({x}, {y})");
                } else if outside {
                    assert_eq!(segments.at(x, y), background, "({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn the_background_touches_the_border_and_an_object_inside_the_frame_does_not() {
        let segments = segment_photo(&photo_with_square());
        let touching = segments.touching_border();
        assert!(touching[segments.at(2, 2) as usize]);
        assert!(!touching[segments.at(24, 24) as usize]);
        // A square cut by the frame's right edge touches it.
        let cut = RgbImage::from_fn(48, 48, |x, y| {
            if x >= 32 && (16..32).contains(&y) {
                Rgb([200, 30, 30])
            } else {
                Rgb([120, 120, 120])
            }
        });
        let segments = segment_photo(&cut);
        assert_ne!(segments.at(40, 24), segments.at(2, 2));
        assert!(segments.touching_border()[segments.at(40, 24) as usize]);
    }

    #[test]
    fn a_fragment_of_the_background_inside_the_frame_is_background_and_an_object_is_not() {
        // A grey background with a slightly bluer patch (a blotch the frame does not reach,
        // its own segment) and, inside it, a bluer blotch still: a chain of fragments, each
        // 18 from the one around it, the blotch 25 from the background. The red square is an
        // object.
        let photo = RgbImage::from_fn(48, 48, |x, y| {
            let on =
                |r: std::ops::Range<u32>, s: std::ops::Range<u32>| r.contains(&x) && s.contains(&y);
            if on(16..32, 16..32) {
                Rgb([200, 30, 30])
            } else if on(5..12, 16..32) {
                Rgb([120, 138, 138])
            } else if on(2..15, 8..40) {
                Rgb([120, 120, 138])
            } else {
                Rgb([120, 120, 120])
            }
        });
        let segments = segment_photo(&photo);
        let (outer, patch, blotch, square) = (
            segments.at(1, 1),
            segments.at(3, 10),
            segments.at(8, 24),
            segments.at(24, 24),
        );
        let distinct: std::collections::BTreeSet<u32> = [outer, patch, blotch, square].into();
        assert_eq!(distinct.len(), 4, "four segments: {:?}", segments.colours);
        assert_eq!(segments.colours[patch as usize], [120, 120, 138]);
        let touching = segments.touching_border();
        assert!(!touching[patch as usize] && !touching[blotch as usize]);
        let background = segments.background();
        assert!(background[outer as usize]);
        assert!(
            background[patch as usize],
            "a fragment next to the background"
        );
        assert!(background[blotch as usize], "a fragment next to a fragment");
        assert!(!background[square as usize], "the object");
    }

    #[test]
    fn a_speck_below_the_minimum_area_joins_its_surroundings() {
        let mut photo = photo_with_square();
        // 2x2 pixels: under 1/200 of 48x48 (11.5 pixels).
        for (x, y) in [(4, 4), (5, 4), (4, 5), (5, 5)] {
            photo.put_pixel(x, y, Rgb([0, 0, 255]));
        }
        let segments = segment_photo(&photo);
        assert_eq!(segments.count, 2);
        assert_eq!(segments.at(4, 4), segments.at(40, 40));
    }

    #[test]
    fn a_uniform_photo_is_one_segment() {
        let segments = segment_photo(&RgbImage::from_pixel(20, 10, Rgb([9, 99, 199])));
        assert_eq!(segments.count, 1);
        assert!(segments.labels.iter().all(|&l| l == 0));
    }
}
