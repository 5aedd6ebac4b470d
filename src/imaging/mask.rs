//! In-painting masks: white where the photo may change, black where it must stay.

use std::path::Path;

use image::{GrayImage, RgbImage};

use super::decode::{DecodeLimits, decode_file};
use super::error::ImagingError;
use super::size::resize_gray;

/// A mask whose every pixel is darker than this counts as black everywhere. It is above zero
/// so that a black JPEG's compression noise still counts as black.
const MASK_BLACK_LEVEL: u8 = 16;

/// Reads the mask at `path` (any image the program can open, EXIF orientation applied):
/// white means "may change", black "keep", grey in between, and a transparent pixel "keep"
/// whatever its colour (a mask painted on a transparent layer, as image editors export it, is
/// opaque only where it may change): the value is the luminance times the opacity. The mask
/// is resized to `width` x `height` (the photo's size) if it differs, with a linear filter.
///
/// A mask that is black everywhere is refused: it would let nothing change.
pub fn load_mask(
    path: &Path,
    limits: &DecodeLimits,
    width: u32,
    height: u32,
) -> Result<GrayImage, ImagingError> {
    if width == 0 || height == 0 {
        return Err(ImagingError::MaskTargetEmpty {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    let (image, _, _) = decode_file(path, limits)?;
    let mask = if image.color().has_alpha() {
        let luma_alpha = image.into_luma_alpha8();
        GrayImage::from_fn(luma_alpha.width(), luma_alpha.height(), |x, y| {
            let [luma, alpha] = luma_alpha.get_pixel(x, y).0;
            // Rounded: a fully opaque pixel keeps its value exactly.
            image::Luma([((u32::from(luma) * u32::from(alpha) + 127) / 255) as u8])
        })
    } else {
        image.into_luma8()
    };
    if mask.pixels().all(|p| p.0[0] < MASK_BLACK_LEVEL) {
        return Err(ImagingError::MaskEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(resize_gray(&mask, width, height))
}

/// A mask (or any grey image) as RGB, for the writers and grids that take colour.
pub fn gray_to_rgb(mask: &GrayImage) -> RgbImage {
    image::DynamicImage::ImageLuma8(mask.clone()).into_rgb8()
}

/// Intersection over union of two masks of one size, each read as white from half grey up;
/// 1 when both are empty.
pub fn mask_iou(a: &GrayImage, b: &GrayImage) -> f64 {
    let (mut both, mut either) = (0usize, 0usize);
    for (p, q) in a.pixels().zip(b.pixels()) {
        let (x, y) = (p.0[0] >= 128, q.0[0] >= 128);
        both += usize::from(x && y);
        either += usize::from(x || y);
    }
    if either == 0 {
        1.0
    } else {
        both as f64 / either as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_counts_overlap_over_union() {
        let left = GrayImage::from_fn(8, 8, |x, _| image::Luma([if x < 4 { 255 } else { 0 }]));
        let middle = GrayImage::from_fn(8, 8, |x, _| {
            image::Luma([if (2..6).contains(&x) { 200 } else { 0 }])
        });
        assert_eq!(mask_iou(&left, &left), 1.0);
        assert!((mask_iou(&left, &middle) - 2.0 / 6.0).abs() < 1e-12);
    }
}
