//! Putting results together: the feathered paste outside a mask (paper, appendix A.1), the
//! interpolation toward the original (section 3.4), and the labelled grid of figure 10.
//! Every image is made here, from seeded patterns.

use std::time::Instant;

use image::{GrayImage, Luma, Rgb, RgbImage};
use unitune::imaging::{
    ImagingError, InterpolationSettings, default_feather_radius, feather,
    interpolate_toward_original, labelled_grid, paste_outside_mask, resize_rgb, similarity_map,
};

/// A well-mixed hash of a pixel position, for repeatable noise.
fn hash(x: u32, y: u32, seed: u32) -> u32 {
    let mut h = x.wrapping_mul(374_761_393)
        ^ y.wrapping_mul(668_265_263)
        ^ seed.wrapping_mul(2_246_822_519);
    h = (h ^ (h >> 13)).wrapping_mul(1_274_126_177);
    h ^ (h >> 16)
}

/// Noise in `-amplitude..=amplitude`.
fn noise(x: u32, y: u32, seed: u32, amplitude: i32) -> i32 {
    (hash(x, y, seed) % (2 * amplitude as u32 + 1)) as i32 - amplitude
}

/// A photo-like test image: smooth colour gradients with fine texture on top (single-pixel
/// grain and 3-pixel blobs, about ±20 levels), the detail a model at a quarter of the size
/// cannot keep.
fn textured(width: u32, height: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let fx = x as f32 / width as f32;
        let fy = y as f32 / height as f32;
        let base = [
            50.0 + 140.0 * fx,
            70.0 + 110.0 * fy,
            120.0 + 60.0 * (fx * 7.0 + fy * 3.0).sin(),
        ];
        let grain = noise(x, y, seed, 12) + noise(x / 3, y / 3, seed + 1, 16);
        Rgb(base.map(|b| (b + grain as f32).clamp(0.0, 255.0) as u8))
    })
}

fn add_noise(image: &RgbImage, seed: u32, amplitude: i32) -> RgbImage {
    let mut noisy = image.clone();
    for (x, y, pixel) in noisy.enumerate_pixels_mut() {
        for (c, value) in pixel.0.iter_mut().enumerate() {
            let n = noise(x, y, seed + c as u32, amplitude);
            *value = (i32::from(*value) + n).clamp(0, 255) as u8;
        }
    }
    noisy
}

/// What a model working at a quarter of the size gives back for an unedited photo: the
/// photo's detail lost in the round trip, plus a little noise of its own.
fn model_round_trip(original: &RgbImage) -> RgbImage {
    let (w, h) = original.dimensions();
    let small = resize_rgb(original, w / 4, h / 4);
    add_noise(&resize_rgb(&small, w, h), 99, 3)
}

/// A square of side `side` at (`x0`, `y0`).
#[derive(Clone, Copy)]
struct Square {
    x0: u32,
    y0: u32,
    side: u32,
}

impl Square {
    fn contains(self, x: u32, y: u32) -> bool {
        (self.x0..self.x0 + self.side).contains(&x) && (self.y0..self.y0 + self.side).contains(&y)
    }

    /// Euclidean distance from pixel (`x`, `y`) to the nearest pixel of the square.
    fn distance(self, x: u32, y: u32) -> f64 {
        let gap = |v: u32, start: u32| {
            let end = start + self.side - 1;
            f64::from(start.saturating_sub(v).max(v.saturating_sub(end)))
        };
        gap(x, self.x0).hypot(gap(y, self.y0))
    }

    fn mask(self, width: u32, height: u32) -> GrayImage {
        GrayImage::from_fn(width, height, |x, y| {
            Luma([if self.contains(x, y) { 255 } else { 0 }])
        })
    }
}

// ---------------------------------------------------------------------------------------------
// feather

#[test]
fn feather_is_zero_beyond_the_radius_and_white_inside() {
    let square = Square {
        x0: 40,
        y0: 30,
        side: 30,
    };
    let mask = square.mask(120, 100);
    for radius in [1, 4, 10] {
        let feathered = feather(&mask, radius);
        assert_eq!(feathered.dimensions(), mask.dimensions());
        for (x, y, value) in feathered.enumerate_pixels() {
            let value = value.0[0];
            let distance = square.distance(x, y);
            if distance > f64::from(radius) {
                // Includes the corners' diagonals, where a square blur would still reach.
                assert_eq!(value, 0, "radius {radius}: ({x}, {y}) at {distance:.2} px");
            }
            if square.contains(x, y) {
                assert_eq!(value, 255, "radius {radius}: ({x}, {y}) inside the mask");
            }
        }
    }
}

#[test]
fn feather_ramp_falls_smoothly_to_zero() {
    let square = Square {
        x0: 40,
        y0: 30,
        side: 30,
    };
    let mask = square.mask(120, 100);
    let radius = 10;
    let feathered = feather(&mask, radius);
    // Out of the square to the right, and out of its corner along the diagonal.
    let rightward: Vec<u8> = (69..100).map(|x| feathered.get_pixel(x, 45).0[0]).collect();
    let diagonal: Vec<u8> = (0..20)
        .map(|i| feathered.get_pixel(69 + i, 59 + i).0[0])
        .collect();
    for (name, ramp) in [("rightward", &rightward), ("diagonal", &diagonal)] {
        assert_eq!(ramp[0], 255, "{name}: the mask's edge stays white");
        for pair in ramp.windows(2) {
            assert!(pair[1] <= pair[0], "{name} ramp rises: {ramp:?}");
            // smoothstep's steepest slope is 1.5 over r + 1 pixels (a diagonal step is √2).
            assert!(pair[0] - pair[1] <= 56, "{name} ramp has a jump: {ramp:?}");
        }
        assert_eq!(*ramp.last().expect("non-empty"), 0, "{name}: {ramp:?}");
    }
    let between = rightward.iter().filter(|&&v| v > 0 && v < 255).count();
    assert_eq!(
        between, radius as usize,
        "one grey step per pixel: {rightward:?}"
    );
    // Half way out, about half way down.
    let middle = rightward[5];
    assert!((90..=170).contains(&middle), "{rightward:?}");
}

#[test]
fn feather_of_radius_zero_is_the_mask_itself() {
    let mask = GrayImage::from_fn(37, 21, |x, y| Luma([hash(x, y, 5) as u8]));
    assert_eq!(feather(&mask, 0), mask);
}

#[test]
fn feather_only_adds_and_follows_the_painted_strength() {
    // A region painted at 60% with a soft edge, and faint noise (as a JPEG mask has) elsewhere.
    let square = Square {
        x0: 20,
        y0: 20,
        side: 20,
    };
    let mask = GrayImage::from_fn(80, 60, |x, y| {
        let value = if square.contains(x, y) {
            153
        } else if square.distance(x, y) <= 2.0 {
            60
        } else {
            (hash(x, y, 8) % 6) as u8
        };
        Luma([value])
    });
    let feathered = feather(&mask, 8);
    for ((x, y, out), original) in feathered.enumerate_pixels().zip(mask.pixels()) {
        let (out, original) = (out.0[0], original.0[0]);
        assert!(
            out >= original,
            "({x}, {y}) darkened from {original} to {out}"
        );
        assert!(out <= 153, "({x}, {y}): halo {out} above the painted 153");
        if square.distance(x, y) > 8.0 {
            assert_eq!(out, original, "({x}, {y}): faint noise spawned a halo");
        }
    }
}

#[test]
fn default_feather_radius_grows_with_the_photo() {
    assert_eq!(default_feather_radius(100, 80), 2);
    assert_eq!(default_feather_radius(512, 768), 8);
    assert_eq!(default_feather_radius(4000, 3000), 47);
}

// ---------------------------------------------------------------------------------------------
// paste_outside_mask

#[test]
fn paste_keeps_the_original_outside_the_seam_and_the_edit_inside() {
    let (w, h) = (160, 120);
    let original = textured(w, h, 1);
    let generated = textured(w, h, 2);
    let square = Square {
        x0: 50,
        y0: 40,
        side: 40,
    };
    let radius = 6;
    let out =
        paste_outside_mask(&original, &generated, &square.mask(w, h), radius).expect("same sizes");
    let mut in_seam = 0;
    for (x, y, pixel) in out.enumerate_pixels() {
        let (o, g) = (original.get_pixel(x, y), generated.get_pixel(x, y));
        let distance = square.distance(x, y);
        if distance > f64::from(radius) {
            assert_eq!(
                pixel, o,
                "({x}, {y}) outside the seam is not the original's"
            );
        } else if square.contains(x, y) {
            assert_eq!(pixel, g, "({x}, {y}) inside the mask is not the edit's");
        } else {
            in_seam += 1;
            for c in 0..3 {
                let (low, high) = (o.0[c].min(g.0[c]), o.0[c].max(g.0[c]));
                assert!((low..=high).contains(&pixel.0[c]), "({x}, {y}) overshoots");
            }
        }
    }
    assert!(in_seam > 0);
}

#[test]
fn paste_with_a_black_mask_is_the_original() {
    let original = textured(64, 48, 3);
    let generated = textured(64, 48, 4);
    let out =
        paste_outside_mask(&original, &generated, &GrayImage::new(64, 48), 5).expect("same sizes");
    assert_eq!(out, original);
}

#[test]
fn paste_refuses_images_of_different_sizes() {
    let original = textured(64, 48, 3);
    let mask = GrayImage::new(64, 48);
    let err = paste_outside_mask(&original, &textured(64, 40, 4), &mask, 2)
        .expect_err("generated image of another size");
    assert!(matches!(err, ImagingError::SizeMismatch { .. }), "{err:?}");
    assert!(!err.is_invalid_input());
    let text = err.to_string();
    assert!(text.contains("64x40") && text.contains("64x48"), "{text}");
    assert!(!text.contains('\n'));

    let err = paste_outside_mask(&original, &original, &GrayImage::new(48, 64), 2)
        .expect_err("mask of another size");
    assert!(err.to_string().contains("mask"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// interpolate_toward_original

#[test]
fn identical_images_interpolate_to_the_original_exactly() {
    let original = textured(200, 150, 5);
    let settings = InterpolationSettings::for_size(200, 150);
    let out = interpolate_toward_original(&original, &original, &settings).expect("same size");
    assert_eq!(out, original);
    let map = similarity_map(&original, &original, &settings).expect("same size");
    assert!(map.pixels().all(|p| p.0[0] == 255));
}

/// Share of pixels of `a` equal to `b`'s, over the pixels `keep` selects.
fn share_equal(a: &RgbImage, b: &RgbImage, keep: impl Fn(u32, u32) -> bool) -> f64 {
    let (mut equal, mut total) = (0u32, 0u32);
    for (x, y, pixel) in a.enumerate_pixels() {
        if keep(x, y) {
            total += 1;
            equal += u32::from(pixel == b.get_pixel(x, y));
        }
    }
    f64::from(equal) / f64::from(total.max(1))
}

#[test]
fn small_noise_everywhere_gives_back_the_original() {
    let (w, h) = (256, 192);
    let original = textured(w, h, 6);
    let generated = add_noise(&original, 7, 6);
    let settings = InterpolationSettings::for_size(w, h);
    let out = interpolate_toward_original(&original, &generated, &settings).expect("same size");
    let restored = share_equal(&out, &original, |_, _| true);
    println!(
        "noise ±6: {:.2}% of pixels are the original's",
        restored * 100.0
    );
    assert!(restored >= 0.99, "only {restored:.4} restored");
}

#[test]
fn detail_lost_by_the_model_is_restored() {
    let (w, h) = (1024, 768);
    let original = textured(w, h, 8);
    let generated = model_round_trip(&original);
    let settings = InterpolationSettings::for_size(w, h);
    let out = interpolate_toward_original(&original, &generated, &settings).expect("same size");
    let restored = share_equal(&out, &original, |_, _| true);
    let before = share_equal(&generated, &original, |_, _| true);
    println!(
        "round trip: {:.2}% of pixels were the original's, {:.2}% after interpolation",
        before * 100.0,
        restored * 100.0
    );
    assert!(restored >= 0.99, "only {restored:.4} restored");
}

#[test]
fn an_edit_keeps_its_pixels_and_the_rest_returns_to_the_original() {
    let (w, h) = (512, 384);
    let original = textured(w, h, 9);
    let mut generated = model_round_trip(&original);
    let square = Square {
        x0: 200,
        y0: 150,
        side: 64,
    };
    // The edit: another thing, of other colours and texture, in the square.
    let edit = textured(w, h, 10);
    for (x, y, pixel) in generated.enumerate_pixels_mut() {
        if square.contains(x, y) {
            let [r, g, b] = edit.get_pixel(x, y).0;
            *pixel = Rgb([b, r.saturating_add(40), g / 2]);
        }
    }
    let settings = InterpolationSettings::for_size(w, h);
    let radius = f64::from(settings.window_radius_px);
    let out = interpolate_toward_original(&original, &generated, &settings).expect("same size");
    let map = similarity_map(&original, &generated, &settings).expect("same size");

    for (x, y, pixel) in out.enumerate_pixels() {
        if square.contains(x, y) {
            assert_eq!(pixel, generated.get_pixel(x, y), "({x}, {y}) in the edit");
            assert_eq!(map.get_pixel(x, y).0[0], 0);
        }
    }
    // Past the reach of every window (1 + 1 + 3 + 1 radii), the original.
    let far = |x, y| square.distance(x, y) > 6.0 * radius + 1.0;
    let restored = share_equal(&out, &original, far);
    println!(
        "far from the edit {:.2}% are the original's",
        restored * 100.0
    );
    assert!(restored >= 0.99, "only {restored:.4} restored");
}

#[test]
fn interpolation_refuses_images_of_different_sizes() {
    let settings = InterpolationSettings::default();
    let err = interpolate_toward_original(&textured(32, 32, 1), &textured(32, 31, 1), &settings)
        .expect_err("sizes differ");
    assert!(matches!(err, ImagingError::SizeMismatch { .. }), "{err:?}");
    assert!(similarity_map(&textured(8, 8, 1), &textured(9, 8, 1), &settings).is_err());
    let empty = RgbImage::new(0, 0);
    assert_eq!(
        interpolate_toward_original(&empty, &empty, &settings).expect("empty is fine"),
        empty
    );
}

#[test]
fn a_twelve_megapixel_photo_interpolates_quickly() {
    // Timing is printed, not asserted: `cargo test --release --test imaging_compose --
    // --nocapture twelve` shows it (well under a second); a debug build is many times slower.
    let (w, h) = (4000, 3000);
    let original = RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x / 7 + y / 5) as u8,
            (x ^ y) as u8,
            (hash(x, y, 1) & 0x1F) as u8 + 100,
        ])
    });
    let mut generated = original.clone();
    let square = Square {
        x0: 1000,
        y0: 1000,
        side: 500,
    };
    for y in square.y0..square.y0 + square.side {
        for x in square.x0..square.x0 + square.side {
            generated.put_pixel(x, y, Rgb([255, 0, 255]));
        }
    }
    let settings = InterpolationSettings::for_size(w, h);
    let start = Instant::now();
    let out = interpolate_toward_original(&original, &generated, &settings).expect("same size");
    let elapsed = start.elapsed();
    println!(
        "{w}x{h} interpolated in {:.0} ms ({} build, window radius {} px)",
        elapsed.as_secs_f64() * 1000.0,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        settings.window_radius_px
    );
    assert_eq!(out.get_pixel(1250, 1250), &Rgb([255, 0, 255]));
    assert_eq!(out.get_pixel(10, 10), original.get_pixel(10, 10));
    assert_eq!(out.get_pixel(3990, 2990), original.get_pixel(3990, 2990));

    let mask = square.mask(w, h);
    let start = Instant::now();
    let pasted = paste_outside_mask(&original, &generated, &mask, default_feather_radius(w, h))
        .expect("same sizes");
    println!(
        "{w}x{h} pasted with a {} px seam in {:.0} ms",
        default_feather_radius(w, h),
        start.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(pasted.get_pixel(10, 10), original.get_pixel(10, 10));
}

// ---------------------------------------------------------------------------------------------
// labelled_grid

fn flat(width: u32, height: u32, value: u8) -> RgbImage {
    RgbImage::from_pixel(width, height, Rgb([value, 255 - value, value / 2]))
}

fn labels(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| t.to_string()).collect()
}

/// Whether any pixel in the rectangle is dark (text).
fn has_dark(image: &RgbImage, x0: u32, y0: u32, width: u32, height: u32) -> bool {
    (y0..y0 + height).any(|y| (x0..x0 + width).any(|x| image.get_pixel(x, y).0[0] < 100))
}

#[test]
fn grid_size_and_placement_follow_the_documented_layout() {
    // 2 rows x 3 columns of 64x48 cells: scale 1, text 8 px, gap 4 px.
    let cells: Vec<Vec<RgbImage>> = (0..2)
        .map(|r| {
            (0..3)
                .map(|c| flat(64, 48, 40 * (3 * r + c) as u8 + 20))
                .collect()
        })
        .collect();
    let columns = labels(&["16", "32", "64"]);
    let rows = labels(&["t0=0.8", "t0=0.9"]);
    let grid = labelled_grid(&cells, &columns, &rows, Some("steps")).expect("valid grid");
    // Width: gap + 6 chars x 8 + gap + 3 x 64 + 2 gaps + gap.
    // Height: gap + title 8 + gap + header 8 + gap + 2 x 48 + gap + gap.
    assert_eq!(
        grid.dimensions(),
        (4 + 48 + 4 + 192 + 8 + 4, 4 + 12 + 12 + 96 + 4 + 4)
    );

    let (cells_x, cells_y) = (4 + 48 + 4, 4 + 12 + 12);
    for (r, row) in cells.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let x0 = cells_x + c as u32 * (64 + 4);
            let y0 = cells_y + r as u32 * (48 + 4);
            for (x, y, pixel) in cell.enumerate_pixels() {
                assert_eq!(grid.get_pixel(x0 + x, y0 + y), pixel, "cell {r},{c}");
            }
        }
    }
    // Gaps and margins are white.
    assert_eq!(
        grid.get_pixel(cells_x + 64 + 1, cells_y + 10).0,
        [255, 255, 255]
    );
    assert_eq!(grid.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(
        grid.get_pixel(grid.width() - 1, grid.height() - 1).0,
        [255, 255, 255]
    );
}

#[test]
fn large_cells_get_twice_the_text_and_unlabelled_strips_are_left_out() {
    let cells = vec![vec![flat(256, 256, 10), flat(256, 256, 200)]];
    let grid = labelled_grid(&cells, &labels(&["a", "b"]), &[], None).expect("valid grid");
    // Scale 2: gap 8, text 16; no title, no row labels.
    assert_eq!(
        grid.dimensions(),
        (8 + 256 + 8 + 256 + 8, 8 + 16 + 8 + 256 + 8)
    );
    assert_eq!(grid.get_pixel(8, 8 + 16 + 8).0, [10, 245, 5]);

    let bare = labelled_grid(&cells, &[], &[], None).expect("valid grid");
    assert_eq!(bare.dimensions(), (8 + 256 + 8 + 256 + 8, 8 + 256 + 8));
}

#[test]
fn labels_are_drawn_dark_where_they_belong() {
    let cells = vec![
        vec![flat(64, 64, 200), flat(64, 64, 220)],
        vec![flat(64, 64, 180), flat(64, 64, 160)],
    ];
    let grid = labelled_grid(
        &cells,
        &labels(&["16 steps", "32 steps"]),
        &labels(&["t0 0.8", "t0 0.9"]),
        Some("UniTune"),
    )
    .expect("valid grid");
    let (cells_x, header_y, cells_y) = (4 + 48 + 4, 4 + 8 + 4, 4 + 12 + 12);
    for column in 0..2 {
        let x0 = cells_x + column * (64 + 4);
        assert!(
            has_dark(&grid, x0, header_y, 64, 8),
            "column label {column}"
        );
    }
    for row in 0..2 {
        let y0 = cells_y + row * (64 + 4);
        assert!(has_dark(&grid, 4, y0, 48, 64), "row label {row}");
    }
    assert!(has_dark(&grid, 0, 4, grid.width(), 8), "title");
    // Nothing dark in the gaps between the strips.
    assert!(!has_dark(&grid, 0, 0, grid.width(), 4));
    assert!(!has_dark(
        &grid,
        cells_x,
        header_y + 8,
        grid.width() - cells_x,
        4
    ));
}

#[test]
fn long_labels_are_cut_to_their_place_with_an_ellipsis() {
    let cells = vec![vec![flat(64, 64, 200), flat(64, 64, 220)]];
    let long = "a very long label that cannot fit above a small cell".to_string();
    let grid = labelled_grid(&cells, &[long.clone(), long], &[], None).expect("valid grid");
    let (cells_x, header_y) = (4, 4);
    // 64 px hold 8 glyphs: 5 letters and "...". The dots sit in rows 5 and 6 of the glyph.
    for column in 0..2 {
        let x0 = cells_x + column * (64 + 4);
        let dots_x = x0 + 5 * 8;
        assert!(
            has_dark(&grid, dots_x, header_y + 5, 24, 2),
            "column {column}"
        );
        assert!(!has_dark(&grid, dots_x, header_y, 24, 5), "column {column}");
        assert!(
            !has_dark(&grid, dots_x, header_y + 7, 24, 1),
            "column {column}"
        );
    }
    // Nothing spills into the gap between the columns.
    assert!(!has_dark(&grid, cells_x + 64, header_y, 4, 8));
}

#[test]
fn grids_that_are_not_grids_are_refused() {
    let cell = || flat(32, 32, 100);
    let is_invalid_grid = |result: Result<RgbImage, ImagingError>| match result {
        Err(err @ ImagingError::InvalidGrid { .. }) => {
            assert!(!err.is_invalid_input());
            assert!(!err.to_string().contains('\n'));
            true
        }
        _ => false,
    };
    assert!(is_invalid_grid(labelled_grid(&[], &[], &[], None)));
    assert!(is_invalid_grid(labelled_grid(&[vec![]], &[], &[], None)));
    let ragged = vec![vec![cell(), cell()], vec![cell()]];
    let result = labelled_grid(&ragged, &[], &[], None);
    let message = result
        .as_ref()
        .map_err(ToString::to_string)
        .expect_err("ragged");
    assert!(
        message.contains("row 2 has 1 image but row 1 has 2"),
        "{message}"
    );
    assert!(is_invalid_grid(result));
    let mixed = vec![vec![cell(), flat(32, 16, 0)]];
    assert!(is_invalid_grid(labelled_grid(&mixed, &[], &[], None)));
    let square = vec![vec![cell(), cell()], vec![cell(), cell()]];
    assert!(is_invalid_grid(labelled_grid(
        &square,
        &labels(&["one"]),
        &[],
        None
    )));
    assert!(is_invalid_grid(labelled_grid(
        &square,
        &[],
        &labels(&["a", "b", "c"]),
        None
    )));
    let empty_cells = vec![vec![RgbImage::new(0, 0)]];
    assert!(is_invalid_grid(labelled_grid(&empty_cells, &[], &[], None)));
}
