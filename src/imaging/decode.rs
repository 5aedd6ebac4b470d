//! Reading photos: format from content, limits checked before any pixel is allocated, EXIF
//! orientation applied, everything brought to 8-bit RGB with the alpha kept aside.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use image::metadata::Orientation;
use image::{
    DynamicImage, GrayImage, ImageBuffer, ImageDecoder, ImageError, ImageFormat, ImageReader,
    Limits, RgbImage, Rgba, RgbaImage,
};

type Rgba16Image = ImageBuffer<Rgba<u16>, Vec<u16>>;

use super::error::ImagingError;

/// Limits on what a decoder may allocate, checked against the file's header before any pixel
/// buffer exists, so that a small file claiming a huge size (a decompression bomb) is refused
/// at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Widest image accepted, in pixels (before EXIF rotation).
    pub max_width: u32,
    /// Tallest image accepted, in pixels (before EXIF rotation).
    pub max_height: u32,
    /// Most bytes the decoded pixels and the decoder's own buffers may take. Converting to the
    /// 8-bit [`Photo`] afterwards needs at most about as much again.
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    /// 16384 x 16384 pixels (a 268-megapixel photo; larger than any camera's) and 1 GiB.
    fn default() -> Self {
        Self {
            max_width: 16384,
            max_height: 16384,
            max_alloc_bytes: 1 << 30,
        }
    }
}

/// The file format a photo was decoded from (found from the content, never the extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceFormat {
    Png,
    Jpeg,
    WebP,
    Gif,
}

impl SourceFormat {
    /// The format's usual name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
            Self::WebP => "WebP",
            Self::Gif => "GIF",
        }
    }
}

impl fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoded photo, upright, in 8-bit colour (the file's own colour space: its ICC profile
/// is kept in `metadata` and written back with every export).
#[derive(Debug, Clone)]
pub struct Photo {
    /// The colour, 8 bits per channel (16-bit sources are rounded). Where the source has
    /// transparency, this is the colour composited over white: fully transparent pixels carry
    /// arbitrary colour in many files, and the model must not see it.
    pub rgb: RgbImage,
    /// The source's alpha channel, 8-bit and the same size as `rgb`, kept so that export can
    /// re-attach it; `None` when the source has no alpha channel or is opaque everywhere
    /// (as for most GIFs).
    pub alpha: Option<GrayImage>,
    /// With `alpha`: the colour as the file holds it (not over white), so that export gives
    /// back every pixel an edit left alone exactly (see [`super::restore_transparency`]).
    pub file_rgb: Option<RgbImage>,
    /// The ICC profile and EXIF the file carries, for its exports.
    pub metadata: PhotoMetadata,
    /// What the file was.
    pub source_format: SourceFormat,
}

/// What a photo's file says about its pixels beyond them, carried into every export: the ICC
/// colour profile (without it a colour-managed screen shows an Adobe RGB photo's export in
/// the wrong colours) and the EXIF block (camera, date, ...), whose orientation is set to
/// upright because the pixels were turned upright when read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhotoMetadata {
    pub icc_profile: Option<Vec<u8>>,
    pub exif: Option<Vec<u8>>,
}

impl Photo {
    /// Width and height in pixels, after EXIF orientation.
    pub fn dimensions(&self) -> (u32, u32) {
        self.rgb.dimensions()
    }
}

/// Reads the photo at `path`. The format comes from the content (PNG, JPEG, WebP or GIF; a
/// GIF gives its first frame), EXIF orientation is applied, and the header's size is checked
/// against `limits` before decoding.
pub fn load_photo(path: &Path, limits: &DecodeLimits) -> Result<Photo, ImagingError> {
    let (image, format, metadata) = decode_file(path, limits)?;
    Ok(Photo {
        metadata,
        ..photo_from_image(image, format)
    })
}

/// Like [`load_photo`], for a file already in memory (a file dropped on the GUI);
/// `name_for_messages` names it in errors.
pub fn load_photo_from_bytes(
    bytes: &[u8],
    name_for_messages: &str,
    limits: &DecodeLimits,
) -> Result<Photo, ImagingError> {
    let (image, format, metadata) = decode_bytes(bytes, Path::new(name_for_messages), limits)?;
    Ok(Photo {
        metadata,
        ..photo_from_image(image, format)
    })
}

/// What `decode_file` gives: the pixels, upright, the format and the metadata.
pub(crate) type Decoded = (DynamicImage, SourceFormat, PhotoMetadata);

/// Opens and decodes `path` with every check of [`load_photo`], keeping the decoder's own pixel
/// type (masks need it in grey, photos in RGB).
pub(crate) fn decode_file(path: &Path, limits: &DecodeLimits) -> Result<Decoded, ImagingError> {
    let mut file = open_for_reading(path)?;
    let unreadable = |source: io::Error| ImagingError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut start = [0u8; JPEG_START.len()];
    let is_jpeg = match file.read_exact(&mut start) {
        Ok(()) => start == JPEG_START,
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => false,
        Err(error) => return Err(unreadable(error)),
    };
    file.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    if !is_jpeg {
        return decode_reader(BufReader::new(file), path, limits);
    }
    // The JPEG decoder reads the whole file into memory anyway; reading it here first lets the
    // file be checked for completeness, which the decoder does not do.
    let length = file.metadata().map_err(unreadable)?.len();
    if length > limits.max_alloc_bytes {
        return Err(ImagingError::DecoderOverLimit {
            path: path.to_path_buf(),
            limit_bytes: limits.max_alloc_bytes,
        });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(unreadable)?;
    decode_bytes(&bytes, path, limits)
}

/// Decodes a file held in memory; a JPEG must be complete.
fn decode_bytes(bytes: &[u8], path: &Path, limits: &DecodeLimits) -> Result<Decoded, ImagingError> {
    if bytes.starts_with(&JPEG_START) && !jpeg_is_complete(bytes) {
        return Err(ImagingError::Truncated {
            path: path.to_path_buf(),
        });
    }
    decode_reader(Cursor::new(bytes), path, limits)
}

/// SOI followed by the first byte of the next marker.
const JPEG_START: [u8; 3] = [0xFF, 0xD8, 0xFF];

/// Whether a JPEG's last scan is followed by its end-of-image marker. The JPEG decoder fills
/// a cut-off image with grey rather than failing, which would hand half a photo to the model.
///
/// Inside entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so
/// scanning back from the end, the first EOI (FF D9) or SOS (FF DA) met tells which came last.
/// Data appended after EOI (as some cameras do) is allowed as long as it holds no SOS.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    for window in bytes.windows(2).rev() {
        match window {
            [0xFF, 0xD9] => return true,
            [0xFF, 0xDA] => return false,
            _ => {}
        }
    }
    false
}

/// Opens a file the user named, telling a missing file and a folder apart from other failures.
pub(crate) fn open_for_reading(path: &Path) -> Result<File, ImagingError> {
    let file = File::open(path).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => ImagingError::NotFound {
            path: path.to_path_buf(),
        },
        io::ErrorKind::IsADirectory => ImagingError::IsFolder {
            path: path.to_path_buf(),
        },
        _ => ImagingError::Unreadable {
            path: path.to_path_buf(),
            source: error,
        },
    })?;
    // Opening a folder succeeds on Unix; reading it fails later with a confusing message.
    let metadata = file.metadata().map_err(|source| ImagingError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    if metadata.is_dir() {
        return Err(ImagingError::IsFolder {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

fn decode_reader<R: BufRead + Seek>(
    reader: R,
    path: &Path,
    limits: &DecodeLimits,
) -> Result<Decoded, ImagingError> {
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|source| read_error(path, source))?;
    let format = match reader.format() {
        Some(ImageFormat::Png) => SourceFormat::Png,
        Some(ImageFormat::Jpeg) => SourceFormat::Jpeg,
        Some(ImageFormat::WebP) => SourceFormat::WebP,
        Some(ImageFormat::Gif) => SourceFormat::Gif,
        Some(other) => {
            return Err(ImagingError::UnsupportedFormat {
                path: path.to_path_buf(),
                format: format_name(other),
            });
        }
        None => {
            return Err(ImagingError::NotAnImage {
                path: path.to_path_buf(),
            });
        }
    };

    // Stage 1: read the header only. The dimension limits are checked here by hand rather than
    // by `image` so that the error can say how large the image claims to be.
    let mut header_limits = Limits::no_limits();
    header_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(header_limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|error| decode_error(path, error, limits))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ImagingError::NoPixels {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    if width > limits.max_width || height > limits.max_height {
        return Err(ImagingError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            max_width: limits.max_width,
            max_height: limits.max_height,
        });
    }
    let pixel_bytes = decoder.total_bytes();
    if pixel_bytes > limits.max_alloc_bytes {
        return Err(ImagingError::TooMuchMemory {
            path: path.to_path_buf(),
            width,
            height,
            needed_bytes: pixel_bytes,
            limit_bytes: limits.max_alloc_bytes,
        });
    }
    // A damaged Exif block must not stop an otherwise good photo from loading.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    // Nor a damaged profile or EXIF block: the photo loads without it.
    let metadata = PhotoMetadata {
        icc_profile: decoder.icc_profile().ok().flatten(),
        exif: decoder.exif_metadata().ok().flatten().map(|mut exif| {
            // The pixels are turned upright below: the EXIF must say so, or a viewer
            // that reads it turns the export a second time.
            let _ = Orientation::remove_from_exif_chunk(&mut exif);
            exif
        }),
    };

    // Stage 2: decode, leaving the decoder what the pixel buffer does not take.
    let mut pixel_limits = Limits::no_limits();
    pixel_limits.max_image_width = Some(limits.max_width);
    pixel_limits.max_image_height = Some(limits.max_height);
    pixel_limits.max_alloc = Some(limits.max_alloc_bytes - pixel_bytes);
    decoder
        .set_limits(pixel_limits)
        .map_err(|error| decode_error(path, error, limits))?;
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|error| decode_error(path, error, limits))?;
    image.apply_orientation(orientation);
    Ok((image, format, metadata))
}

fn format_name(format: ImageFormat) -> String {
    match format.extensions_str().first() {
        Some(extension) => extension.to_ascii_uppercase(),
        None => format!("{format:?}"),
    }
}

fn read_error(path: &Path, error: io::Error) -> ImagingError {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        ImagingError::Truncated {
            path: path.to_path_buf(),
        }
    } else {
        ImagingError::Unreadable {
            path: path.to_path_buf(),
            source: error,
        }
    }
}

/// Maps a decoder's error to one the user can act on.
fn decode_error(path: &Path, error: ImageError, limits: &DecodeLimits) -> ImagingError {
    match error {
        ImageError::IoError(error) => read_error(path, error),
        ImageError::Limits(_) => ImagingError::DecoderOverLimit {
            path: path.to_path_buf(),
            limit_bytes: limits.max_alloc_bytes,
        },
        other => {
            let detail = one_line(&other.to_string());
            if looks_truncated(&detail) {
                ImagingError::Truncated {
                    path: path.to_path_buf(),
                }
            } else {
                ImagingError::Corrupt {
                    path: path.to_path_buf(),
                    detail,
                }
            }
        }
    }
}

/// Decoder messages may span lines; an error message must not.
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Decoders report running out of data in words rather than as an io error kind.
fn looks_truncated(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    [
        "unexpected end",
        "unexpected eof",
        "end of file",
        "not enough data",
        "not enough bytes",
        "no more data",
    ]
    .iter()
    .any(|phrase| detail.contains(phrase))
}

/// Brings any decoded image to 8-bit RGB, compositing over white where it has alpha.
pub(crate) fn photo_from_image(image: DynamicImage, source_format: SourceFormat) -> Photo {
    let color = image.color();
    if !color.has_alpha() {
        return Photo {
            rgb: image.into_rgb8(),
            alpha: None,
            file_rgb: None,
            metadata: PhotoMetadata::default(),
            source_format,
        };
    }
    let ((rgb, alpha), file_rgb) = if color.bytes_per_pixel() > color.channel_count() {
        // Each rounded to 8 bits once, from the 16-bit source.
        let file_rgb = drop_alpha(&image.to_rgba8());
        (composite_over_white_16(&image.into_rgba16()), file_rgb)
    } else {
        let rgba = image.into_rgba8();
        (composite_over_white_8(&rgba), drop_alpha(&rgba))
    };
    Photo {
        file_rgb: alpha.is_some().then_some(file_rgb),
        rgb,
        alpha,
        metadata: PhotoMetadata::default(),
        source_format,
    }
}

/// The colour channels of an RGBA image.
fn drop_alpha(rgba: &RgbaImage) -> RgbImage {
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, _] = rgba.get_pixel(x, y).0;
        image::Rgb([r, g, b])
    })
}

/// Straight (not premultiplied) alpha over white, rounded; the alpha is returned only if some
/// pixel is not fully opaque.
fn composite_over_white_8(rgba: &RgbaImage) -> (RgbImage, Option<GrayImage>) {
    let (width, height) = rgba.dimensions();
    let mut rgb = RgbImage::new(width, height);
    let mut alpha = GrayImage::new(width, height);
    let mut any_transparent = false;
    for ((source, colour), coverage) in rgba.pixels().zip(rgb.pixels_mut()).zip(alpha.pixels_mut())
    {
        let [r, g, b, a] = source.0;
        let a32 = u32::from(a);
        let over_white = |c: u8| ((u32::from(c) * a32 + 255 * (255 - a32) + 127) / 255) as u8;
        colour.0 = [over_white(r), over_white(g), over_white(b)];
        coverage.0 = [a];
        any_transparent |= a < u8::MAX;
    }
    (rgb, any_transparent.then_some(alpha))
}

/// As [`composite_over_white_8`], computed at 16 bits and rounded once to 8.
fn composite_over_white_16(rgba: &Rgba16Image) -> (RgbImage, Option<GrayImage>) {
    const MAX: u64 = u16::MAX as u64;
    const DENOMINATOR: u64 = MAX * MAX;
    let (width, height) = rgba.dimensions();
    let mut rgb = RgbImage::new(width, height);
    let mut alpha = GrayImage::new(width, height);
    let mut any_transparent = false;
    for ((source, colour), coverage) in rgba.pixels().zip(rgb.pixels_mut()).zip(alpha.pixels_mut())
    {
        let [r, g, b, a] = source.0;
        let a64 = u64::from(a);
        let over_white = |c: u16| {
            let numerator = (u64::from(c) * a64 + MAX * (MAX - a64)) * 255;
            ((numerator + DENOMINATOR / 2) / DENOMINATOR) as u8
        };
        colour.0 = [over_white(r), over_white(g), over_white(b)];
        coverage.0 = [((a64 * 255 + MAX / 2) / MAX) as u8];
        any_transparent |= a < u16::MAX;
    }
    (rgb, any_transparent.then_some(alpha))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_rgba_drops_the_alpha() {
        let image = DynamicImage::ImageRgba8(RgbaImage::from_pixel(2, 2, Rgba([10, 20, 30, 255])));
        let photo = photo_from_image(image, SourceFormat::Png);
        assert!(photo.alpha.is_none());
        assert_eq!(photo.rgb.get_pixel(1, 1).0, [10, 20, 30]);
    }

    #[test]
    fn half_transparent_black_becomes_mid_grey() {
        let image = DynamicImage::ImageRgba8(RgbaImage::from_pixel(1, 1, Rgba([0, 0, 0, 128])));
        let photo = photo_from_image(image, SourceFormat::Png);
        // 255 * (1 - 128/255) = 127
        assert_eq!(photo.rgb.get_pixel(0, 0).0, [127, 127, 127]);
        assert_eq!(photo.alpha.expect("alpha kept").get_pixel(0, 0).0, [128]);
    }

    #[test]
    fn sixteen_bit_alpha_rounds_once() {
        let mut image = Rgba16Image::new(2, 1);
        image.put_pixel(0, 0, Rgba([0x8080, 0, 65535, 65535]));
        image.put_pixel(1, 0, Rgba([0, 0, 0, 0]));
        let photo = photo_from_image(DynamicImage::ImageRgba16(image), SourceFormat::Png);
        assert_eq!(photo.rgb.get_pixel(0, 0).0, [128, 0, 255]);
        assert_eq!(photo.rgb.get_pixel(1, 0).0, [255, 255, 255]);
        let alpha = photo.alpha.expect("alpha kept");
        assert_eq!(
            (alpha.get_pixel(0, 0).0, alpha.get_pixel(1, 0).0),
            ([255], [0])
        );
    }

    #[test]
    fn truncation_phrases_are_recognised() {
        assert!(looks_truncated(
            "Format error decoding Png: Unexpected end of data"
        ));
        assert!(looks_truncated(
            "I/O errors Not enough bytes, expected 560 but found 162"
        ));
        assert!(!looks_truncated(
            "Format error decoding Png: invalid checksum"
        ));
    }

    #[test]
    fn jpeg_completeness_looks_past_the_last_scan() {
        let sos = [0xFF, 0xDA, 0x00, 0x08];
        let eoi = [0xFF, 0xD9];
        let complete = [&JPEG_START[..], &sos, &[0x12, 0xFF, 0x00, 0x34], &eoi].concat();
        assert!(jpeg_is_complete(&complete));
        assert!(!jpeg_is_complete(&complete[..complete.len() - 2]));
        // Trailing data after the end marker is fine.
        assert!(jpeg_is_complete(&[&complete[..], b"trailer"].concat()));
        // An end marker before the scan (an embedded thumbnail's) does not count.
        let thumbnail_then_cut = [&JPEG_START[..], &eoi, &sos, &[0x12, 0x34]].concat();
        assert!(!jpeg_is_complete(&thumbnail_then_cut));
    }
}
