//! Fitting a photo to the model's resolution and back.
//!
//! The VAE downsamples by 8 and the UNet by another 8 (three 2x stages plus the input), so
//! both sides of the working image must be multiples of 64.

use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};

use super::error::ImagingError;

/// Both sides of a working size are multiples of this.
pub const SIZE_STEP: u32 = 64;

/// The working resolution for a `width` x `height` photo: the photo's aspect ratio, an area of
/// about `model_side`² (the resolution the model was trained at; clamped to at least 64), both
/// sides multiples of 64 and at least 64.
///
/// For extreme panoramas, where the short side would fall below 64, the short side is 64 and
/// the long side is cut so that the area stays about `model_side`²; the aspect ratio is then
/// not kept (the result is stretched back to the photo's own size afterwards anyway).
///
/// `requested` (the CLI's `--size WxH`) wins when given; it must itself be multiples of 64,
/// and the error suggests the nearest size that is.
pub fn working_size(
    width: u32,
    height: u32,
    model_side: u32,
    requested: Option<(u32, u32)>,
) -> Result<(u32, u32), ImagingError> {
    if let Some((w, h)) = requested {
        if is_valid_side(w) && is_valid_side(h) {
            return Ok((w, h));
        }
        return Err(ImagingError::SizeNotMultipleOf64 {
            width: w,
            height: h,
            suggested_width: nearest_valid_side(f64::from(w)),
            suggested_height: nearest_valid_side(f64::from(h)),
        });
    }
    if width == 0 || height == 0 {
        return Err(ImagingError::EmptyImage { width, height });
    }
    let side = f64::from(model_side.max(SIZE_STEP));
    let (long, short) = (width.max(height), width.min(height));
    let ratio = f64::from(long) / f64::from(short);
    let short_ideal = side / ratio.sqrt();
    let (long_out, short_out) = if short_ideal < f64::from(SIZE_STEP) {
        let short_out = SIZE_STEP;
        (
            nearest_valid_side(side * side / f64::from(short_out)),
            short_out,
        )
    } else {
        (
            nearest_valid_side(side * ratio.sqrt()),
            nearest_valid_side(short_ideal),
        )
    };
    Ok(if width >= height {
        (long_out, short_out)
    } else {
        (short_out, long_out)
    })
}

fn is_valid_side(side: u32) -> bool {
    side > 0 && side.is_multiple_of(SIZE_STEP)
}

/// The multiple of 64 nearest to `side` (halves round up), at least 64.
fn nearest_valid_side(side: f64) -> u32 {
    let steps = (side / f64::from(SIZE_STEP)).round().max(1.0);
    // Float-to-int casts saturate; no photo comes near u32::MAX pixels per side.
    (steps as u32).saturating_mul(SIZE_STEP)
}

/// Reads a size written as `WIDTHxHEIGHT` ("512x384"; `X` and `×` also work, spaces around the
/// numbers are ignored). Both numbers must be positive; whether they suit the model is
/// [`working_size`]'s question.
pub fn parse_size(text: &str) -> Result<(u32, u32), ImagingError> {
    let invalid = || ImagingError::InvalidSizeText {
        text: text.to_string(),
    };
    let (w, h) = text
        .trim()
        .split_once(['x', 'X', '×'])
        .ok_or_else(invalid)?;
    let parse = |part: &str| -> Option<u32> {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse::<u32>().ok().filter(|&n| n > 0)
    };
    match (parse(w), parse(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => Err(invalid()),
    }
}

/// Resizes a colour image, both to fit a photo to the working size and to bring a result back
/// to the photo's own size.
///
/// The filter is Catmull-Rom: an interpolating cubic that keeps edges and texture sharp (the
/// model's output is enlarged several times on the way back, where a soft filter would blur
/// it), with much less overshoot than Lanczos3, whose ringing shows as halos around edges when
/// enlarging, and at two thirds of Lanczos3's cost. `image` widens the kernel when shrinking,
/// so downscaling is properly anti-aliased. Filtering is done on the sRGB values, as every
/// common editor does by default.
pub fn resize_rgb(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    imageops::resize(img, width, height, FilterType::CatmullRom)
}

/// Resizes a mask or an alpha channel with a linear (triangle) filter: it never overshoots, so
/// a black-and-white mask stays within its own range, and its edges stay soft rather than
/// stair-stepped.
pub fn resize_gray(img: &GrayImage, width: u32, height: u32) -> GrayImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    imageops::resize(img, width, height, FilterType::Triangle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_side_rounds_half_up_and_stays_positive() {
        assert_eq!(nearest_valid_side(0.0), 64);
        assert_eq!(nearest_valid_side(95.9), 64);
        assert_eq!(nearest_valid_side(96.0), 128);
        assert_eq!(nearest_valid_side(500.0), 512);
    }

    #[test]
    fn extreme_panorama_keeps_the_area() {
        let (w, h) = working_size(100_000, 1, 512, None).expect("fits");
        assert_eq!((w, h), (4096, 64));
        let (w, h) = working_size(1, 100_000, 512, None).expect("fits");
        assert_eq!((w, h), (64, 4096));
    }

    #[test]
    fn tiny_model_side_is_clamped() {
        assert_eq!(working_size(300, 300, 0, None).expect("fits"), (64, 64));
    }

    #[test]
    fn parse_size_accepts_variants_and_rejects_junk() {
        assert_eq!(parse_size(" 512 x 384 ").expect("valid"), (512, 384));
        assert_eq!(parse_size("640X448").expect("valid"), (640, 448));
        assert_eq!(parse_size("768×512").expect("valid"), (768, 512));
        for bad in [
            "512", "x512", "512x", "0x512", "-64x64", "+64x64", "5.5x64", "64x64x64", "axb", "",
        ] {
            assert!(
                matches!(parse_size(bad), Err(ImagingError::InvalidSizeText { .. })),
                "{bad:?} should be refused"
            );
        }
    }
}
