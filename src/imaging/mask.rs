//! In-painting masks: white where the photo may change, black where it must stay.

use std::path::Path;

use image::GrayImage;

use super::decode::{DecodeLimits, decode_file};
use super::error::ImagingError;
use super::size::resize_gray;

/// A mask whose every pixel is darker than this counts as black everywhere. It is above zero
/// so that a black JPEG's compression noise still counts as black.
const MASK_BLACK_LEVEL: u8 = 16;

/// Reads the mask at `path` (any image the program can open, EXIF orientation applied) as
/// luminance: white means "may change", black "keep", grey in between. The alpha channel is
/// ignored. The mask is resized to `width` x `height` (the photo's size) if it differs, with a
/// linear filter.
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
    let (image, _) = decode_file(path, limits)?;
    let mask = image.into_luma8();
    if mask.pixels().all(|p| p.0[0] < MASK_BLACK_LEVEL) {
        return Err(ImagingError::MaskEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(resize_gray(&mask, width, height))
}
