//! Imaging: everything between a file on disk and the model's pixels.
//!
//! - [`load_photo`] / [`load_photo_from_bytes`]: decode PNG, JPEG, WebP or GIF (found from the
//!   content) within [`DecodeLimits`], apply EXIF orientation, and give 8-bit RGB composited
//!   over white with the alpha kept aside ([`Photo`]).
//! - [`working_size`], [`parse_size`], [`resize_rgb`]: fit a photo to the model's resolution
//!   (multiples of 64, aspect kept) and bring results back to the photo's own size.
//! - [`load_mask`]: an in-painting mask as luminance, at the photo's size.
//! - [`segment_photo`]: the photo's own regions of similar colour (the automatic edit region
//!   snaps to them).
//! - [`export_image`], [`next_free_path`], [`read_png_text`]: atomic export as PNG (with text
//!   metadata), JPEG or WebP, and reading the metadata back.
//!
//! Errors are [`ImagingError`]: one sentence naming the file and saying what to do.
//! This module knows nothing of the engine, the jobs or the GUI.

mod composite;
mod decode;
mod error;
mod export;
mod grid;
mod interpolate;
mod mask;
mod plot;
mod segments;
mod size;

pub use composite::{default_feather_radius, feather, paste_outside_mask, restore_transparency};
pub(crate) use decode::one_line;
pub use decode::{
    DecodeLimits, Photo, PhotoMetadata, SourceFormat, load_photo, load_photo_from_bytes,
};
pub use error::ImagingError;
pub use export::{
    ExistingFile, JPEG_QUALITY, Original, PREVIEW_MARK, STALE_PART_AGE, export_edit, export_image,
    export_image_with_metadata, next_free_path, read_png_text,
};
pub use grid::labelled_grid;
pub use interpolate::{InterpolationSettings, interpolate_toward_original, similarity_map};
pub use mask::{gray_to_rgb, load_mask, mask_iou};
pub use plot::{TradeOffCurve, trade_off_plot};
pub use segments::{Segments, segment_photo};
pub use size::{SIZE_STEP, parse_size, resize_gray, resize_rgb, working_size};
