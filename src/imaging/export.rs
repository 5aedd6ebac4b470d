//! Saving results: format from the extension, PNG text metadata, and an atomic write that
//! leaves either the complete new file or nothing (and never a stray temporary file).

use std::borrow::Cow;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, GrayImage, ImageEncoder, ImageError, RgbImage};

use super::decode::{PhotoMetadata, one_line, open_for_reading};
use super::error::{ImagingError, parent_folder};

/// JPEG quality used for export: visually lossless for photos, about a third of a PNG's size.
pub const JPEG_QUALITY: u8 = 95;

/// What export does when the target file already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingFile {
    /// Leave the existing file untouched and fail with [`ImagingError::TargetExists`].
    Refuse,
    /// Replace it (atomically: readers see the old file or the new one, never a mix).
    Overwrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExportFormat {
    Png,
    Jpeg,
    WebP,
}

impl ExportFormat {
    fn from_path(path: &Path) -> Result<Self, ImagingError> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("png") => Ok(Self::Png),
            Some("jpg" | "jpeg") => Ok(Self::Jpeg),
            Some("webp") => Ok(Self::WebP),
            _ => Err(ImagingError::UnsupportedExportExtension {
                path: path.to_path_buf(),
            }),
        }
    }

    /// Whether the format stores an alpha channel (JPEG does not).
    fn keeps_alpha(self) -> bool {
        self != Self::Jpeg
    }

    fn name(self) -> &'static str {
        match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
            Self::WebP => "WebP",
        }
    }
}

/// Saves `rgb` to `path` in the format its extension names (`.png`, `.jpg`/`.jpeg`, `.webp`,
/// any case).
///
/// - PNG: lossless, with `alpha` as its alpha channel when given, and every `(key, value)` of
///   `text` as a text chunk before the pixels (tEXt when both are Latin-1, iTXt otherwise).
///   The app stores its recipe under `unitune` and an AUTOMATIC1111-style line under
///   `parameters`.
/// - JPEG: quality [`JPEG_QUALITY`]; no alpha (the colour is already composited over white)
///   and no text.
/// - WebP: lossless, with `alpha` when given; no text.
///
/// The file is encoded into a temporary file in the same folder, flushed and synced, then
/// renamed over `path`, so a failure at any point leaves no partial file, no temporary file,
/// and any existing file untouched. With [`ExistingFile::Refuse`] an existing `path` is an
/// error (checked again at the rename, so a file appearing meanwhile is not replaced either).
pub fn export_image(
    path: &Path,
    rgb: &RgbImage,
    alpha: Option<&GrayImage>,
    text: &[(String, String)],
    existing: ExistingFile,
) -> Result<(), ImagingError> {
    export_image_with_metadata(path, rgb, alpha, &PhotoMetadata::default(), text, existing)
}

/// The photo an edit was made from, as the edit's export needs it.
#[derive(Debug, Clone, Copy)]
pub struct Original<'a> {
    /// Its colour over white: what the model saw, and what an unchanged pixel still is.
    pub over_white: &'a RgbImage,
    pub alpha: Option<&'a GrayImage>,
    /// With `alpha`: the colour the file holds.
    pub file_rgb: Option<&'a RgbImage>,
    pub metadata: &'a PhotoMetadata,
}

/// Exports `result`, an edit of `original` at its size: with the photo's alpha, the file's own
/// colour wherever the edit left a pixel alone (see [`super::restore_transparency`]), and its
/// ICC profile and EXIF. Unchanged pixels come back byte for byte, alpha included; a JPEG
/// (no alpha) gets the colour over white, as the photo is shown.
pub fn export_edit(
    path: &Path,
    result: &RgbImage,
    original: &Original,
    text: &[(String, String)],
    existing: ExistingFile,
) -> Result<(), ImagingError> {
    // Without an alpha channel in the file, the colour over white is what the photo looks
    // like; the file's own colour under transparent pixels is arbitrary (often black).
    let alpha = original
        .alpha
        .filter(|_| ExportFormat::from_path(path).is_ok_and(ExportFormat::keeps_alpha));
    let colour = match (alpha, original.file_rgb) {
        (Some(alpha), Some(file_rgb)) => Cow::Owned(super::restore_transparency(
            result,
            original.over_white,
            file_rgb,
            alpha,
        )),
        _ => Cow::Borrowed(result),
    };
    export_image_with_metadata(path, &colour, alpha, original.metadata, text, existing)
}

/// [`export_image`] carrying a photo's ICC profile and EXIF into the file (PNG: `iCCP` and
/// `eXIf`; JPEG: APP2 and APP1; WebP: `ICCP` and `EXIF`), so that an edit keeps its photo's
/// colours on a colour-managed screen and its camera data.
pub fn export_image_with_metadata(
    path: &Path,
    rgb: &RgbImage,
    alpha: Option<&GrayImage>,
    metadata: &PhotoMetadata,
    text: &[(String, String)],
    existing: ExistingFile,
) -> Result<(), ImagingError> {
    let format = ExportFormat::from_path(path)?;
    if let Some(alpha) = alpha
        && alpha.dimensions() != rgb.dimensions()
    {
        return Err(ImagingError::AlphaSizeMismatch {
            path: path.to_path_buf(),
            width: rgb.width(),
            height: rgb.height(),
            alpha_width: alpha.width(),
            alpha_height: alpha.height(),
        });
    }
    if format == ExportFormat::Png
        && let Some((key, _)) = text.iter().find(|(key, _)| !is_valid_png_keyword(key))
    {
        return Err(ImagingError::InvalidTextKey {
            path: path.to_path_buf(),
            key: key.clone(),
        });
    }
    // Fail before spending time on encoding; the rename checks again.
    if existing == ExistingFile::Refuse && fs::symlink_metadata(path).is_ok() {
        return Err(ImagingError::TargetExists {
            path: path.to_path_buf(),
        });
    }
    write_atomically(path, existing, |out| match format {
        ExportFormat::Png => encode_png(out, rgb, alpha, metadata, text),
        ExportFormat::Jpeg => encode_jpeg(out, rgb, metadata),
        ExportFormat::WebP => encode_webp(out, rgb, alpha, metadata),
    })
    .map_err(|error| match error {
        WriteError::Imaging(error) => error,
        WriteError::Codec(detail) => ImagingError::EncodeFailed {
            path: path.to_path_buf(),
            format: format.name(),
            detail,
        },
    })
}

/// Why writing failed: an io error already mapped, or the encoder's own complaint.
#[derive(Debug)]
enum WriteError {
    Imaging(ImagingError),
    Codec(String),
}

/// An encoder's failure, with io errors kept apart so a full disk reads as one.
#[derive(Debug)]
enum EncodeError {
    Io(io::Error),
    Codec(String),
}

impl From<ImageError> for EncodeError {
    fn from(error: ImageError) -> Self {
        match error {
            ImageError::IoError(error) => Self::Io(error),
            other => Self::Codec(one_line(&other.to_string())),
        }
    }
}

impl From<png::EncodingError> for EncodeError {
    fn from(error: png::EncodingError) -> Self {
        match error {
            png::EncodingError::IoError(error) => Self::Io(error),
            other => Self::Codec(one_line(&other.to_string())),
        }
    }
}

impl From<io::Error> for EncodeError {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

/// Runs `encode` into a temporary file beside `path`, syncs it, and renames it to `path`.
/// The temporary file is removed on every failure (dropping a `NamedTempFile` deletes it).
fn write_atomically(
    path: &Path,
    existing: ExistingFile,
    encode: impl FnOnce(&mut dyn Write) -> Result<(), EncodeError>,
) -> Result<(), WriteError> {
    let io_error =
        |error: io::Error| WriteError::Imaging(ImagingError::from_export_io(path, error));
    let folder = parent_folder(path);
    match fs::metadata(folder) {
        Ok(metadata) if metadata.is_dir() => {}
        Ok(_) => return Err(io_error(io::Error::from(io::ErrorKind::NotFound))),
        Err(error) => return Err(io_error(error)),
    }

    remove_stale_parts(folder);
    let mut builder = tempfile::Builder::new();
    builder.prefix(PART_PREFIX).suffix(PART_SUFFIX);
    // NamedTempFile is private (0600) by default; ask for what a plain File::create gives
    // (0666 less the umask), since the temporary file becomes the user's image.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(fs::Permissions::from_mode(0o666));
    }
    // tempfile's error names the random temporary path; the user only needs the kind.
    let mut temp = builder
        .tempfile_in(folder)
        .map_err(|error| io_error(io::Error::from(error.kind())))?;
    if existing == ExistingFile::Overwrite
        && let Ok(metadata) = fs::metadata(path)
    {
        // Replacing a file keeps its permissions; failing to copy them is not worth an error.
        let _ = temp.as_file().set_permissions(metadata.permissions());
    }

    {
        let mut out = BufWriter::new(temp.as_file_mut());
        let encoded = encode(&mut out).and_then(|()| out.flush().map_err(EncodeError::Io));
        match encoded {
            Ok(()) => {}
            Err(EncodeError::Io(error)) => return Err(io_error(error)),
            Err(EncodeError::Codec(detail)) => return Err(WriteError::Codec(detail)),
        }
    }
    temp.as_file().sync_all().map_err(io_error)?;

    let persisted = match existing {
        ExistingFile::Refuse => temp.persist_noclobber(path),
        ExistingFile::Overwrite => temp.persist(path),
    };
    persisted.map_err(|error| io_error(error.error))?;
    sync_folder(folder);
    Ok(())
}

/// Temporary files of unitune's writes are named `.unitune-XXXXXX.part`.
const PART_PREFIX: &str = ".unitune-";
const PART_SUFFIX: &str = ".part";

/// How old one of unitune's temporary files must be before the next write into its folder
/// removes it: far longer than any write takes, so another unitune's write in progress is
/// never taken. Younger ones are left to the write that made them.
pub const STALE_PART_AGE: Duration = Duration::from_secs(10 * 60);

/// Removes what a write killed before its end (SIGKILL, a power cut) left in `folder`;
/// best effort: a file that cannot be removed is left.
fn remove_stale_parts(folder: &Path) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(PART_PREFIX) && name.ends_with(PART_SUFFIX)) {
            continue;
        }
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > STALE_PART_AGE);
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Makes the rename itself durable where the platform allows; best effort.
fn sync_folder(folder: &Path) {
    #[cfg(unix)]
    if let Ok(dir) = File::open(folder) {
        let _ = dir.sync_all();
    }
    #[cfg(not(unix))]
    let _ = folder;
}

fn encode_png(
    out: &mut dyn Write,
    rgb: &RgbImage,
    alpha: Option<&GrayImage>,
    metadata: &PhotoMetadata,
    text: &[(String, String)],
) -> Result<(), EncodeError> {
    let mut info = png::Info::with_size(rgb.width(), rgb.height());
    info.bit_depth = png::BitDepth::Eight;
    info.color_type = if alpha.is_some() {
        png::ColorType::Rgba
    } else {
        png::ColorType::Rgb
    };
    info.icc_profile = metadata.icc_profile.as_deref().map(Cow::Borrowed);
    info.exif_metadata = metadata.exif.as_deref().map(Cow::Borrowed);
    let mut encoder = png::Encoder::with_info(out, info)?;
    for (key, value) in text {
        if is_latin1(key) && is_latin1(value) {
            encoder.add_text_chunk(key.clone(), value.clone())?;
        } else {
            encoder.add_itxt_chunk(key.clone(), value.clone())?;
        }
    }
    let mut writer = encoder.write_header()?;
    match alpha {
        Some(alpha) => writer.write_image_data(&interleave_alpha(rgb, alpha))?,
        None => writer.write_image_data(rgb.as_raw())?,
    }
    writer.finish()?;
    Ok(())
}

/// Hands the photo's profile and EXIF to one of `image`'s encoders (each of ours supports
/// both; an encoder that would not is no reason to lose the edit).
fn with_metadata<E: ImageEncoder>(mut encoder: E, metadata: &PhotoMetadata) -> E {
    if let Some(icc) = &metadata.icc_profile {
        let _ = encoder.set_icc_profile(icc.clone());
    }
    if let Some(exif) = &metadata.exif {
        let _ = encoder.set_exif_metadata(exif.clone());
    }
    encoder
}

fn encode_jpeg(
    out: &mut dyn Write,
    rgb: &RgbImage,
    metadata: &PhotoMetadata,
) -> Result<(), EncodeError> {
    with_metadata(JpegEncoder::new_with_quality(out, JPEG_QUALITY), metadata).write_image(
        rgb.as_raw(),
        rgb.width(),
        rgb.height(),
        ExtendedColorType::Rgb8,
    )?;
    Ok(())
}

fn encode_webp(
    out: &mut dyn Write,
    rgb: &RgbImage,
    alpha: Option<&GrayImage>,
    metadata: &PhotoMetadata,
) -> Result<(), EncodeError> {
    let encoder = with_metadata(WebPEncoder::new_lossless(out), metadata);
    match alpha {
        Some(alpha) => encoder.write_image(
            &interleave_alpha(rgb, alpha),
            rgb.width(),
            rgb.height(),
            ExtendedColorType::Rgba8,
        )?,
        None => encoder.write_image(
            rgb.as_raw(),
            rgb.width(),
            rgb.height(),
            ExtendedColorType::Rgb8,
        )?,
    }
    Ok(())
}

/// RGBA bytes from a colour image and an alpha channel of the same size.
fn interleave_alpha(rgb: &RgbImage, alpha: &GrayImage) -> Vec<u8> {
    rgb.pixels()
        .zip(alpha.pixels())
        .flat_map(|(colour, coverage)| {
            let [r, g, b] = colour.0;
            [r, g, b, coverage.0[0]]
        })
        .collect()
}

fn is_latin1(text: &str) -> bool {
    text.chars().all(|c| u32::from(c) <= 0xFF)
}

/// A PNG keyword: 1 to 79 printable Latin-1 characters, without leading, trailing or
/// consecutive spaces (PNG specification, section 11.3.4.2).
fn is_valid_png_keyword(key: &str) -> bool {
    let printable = |c: char| matches!(u32::from(c), 0x20..=0x7E | 0xA1..=0xFF);
    (1..=79).contains(&key.chars().count())
        && key.chars().all(printable)
        && !key.starts_with(' ')
        && !key.ends_with(' ')
        && !key.contains("  ")
}

/// The PNG text chunk that marks a live preview as unitune's own file, which a later run may
/// replace (see `cli::outputs`).
pub const PREVIEW_MARK: &str = "unitune-preview";

/// `path` if nothing exists there, otherwise the first of `name-1.ext`, `name-2.ext`, ... that
/// does not exist (for default output names). Another program may take the name before it is
/// used: pair it with [`ExistingFile::Refuse`].
pub fn next_free_path(path: &Path) -> PathBuf {
    let is_taken = |candidate: &Path| fs::symlink_metadata(candidate).is_ok();
    if !is_taken(path) {
        return path.to_path_buf();
    }
    let Some(stem) = path.file_stem() else {
        return path.to_path_buf();
    };
    let extension = path.extension();
    let mut number: u64 = 1;
    loop {
        let mut name = stem.to_os_string();
        name.push(format!("-{number}"));
        if let Some(extension) = extension {
            name.push(".");
            name.push(extension);
        }
        let candidate = path.with_file_name(name);
        if !is_taken(&candidate) {
            return candidate;
        }
        number += 1;
    }
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'];

/// Every text chunk of the PNG at `path` as `(keyword, text)`: tEXt chunks first, then zTXt,
/// then iTXt, each in file order; chunks after the pixels are included.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>, ImagingError> {
    let mut file = open_for_reading(path)?;
    let unreadable = |source: io::Error| ImagingError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut signature = [0u8; 8];
    let is_png = match file.read_exact(&mut signature) {
        Ok(()) => signature == PNG_SIGNATURE,
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => false,
        Err(error) => return Err(unreadable(error)),
    };
    if !is_png {
        return Err(ImagingError::NotPng {
            path: path.to_path_buf(),
        });
    }
    file.seek(SeekFrom::Start(0)).map_err(unreadable)?;

    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_ignore_text_chunk(false);
    let png_error = |error: png::DecodingError| match error {
        png::DecodingError::IoError(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
            ImagingError::Truncated {
                path: path.to_path_buf(),
            }
        }
        png::DecodingError::IoError(error) => unreadable(error),
        other => ImagingError::Corrupt {
            path: path.to_path_buf(),
            detail: one_line(&other.to_string()),
        },
    };
    let mut reader = decoder.read_info().map_err(png_error)?;
    reader.finish().map_err(png_error)?;

    let info = reader.info();
    let mut entries = Vec::new();
    for chunk in &info.uncompressed_latin1_text {
        entries.push((chunk.keyword.clone(), chunk.text.clone()));
    }
    for chunk in &info.compressed_latin1_text {
        let mut chunk = chunk.clone();
        chunk.decompress_text().map_err(png_error)?;
        entries.push((chunk.keyword.clone(), chunk.get_text().map_err(png_error)?));
    }
    for chunk in &info.utf8_text {
        let mut chunk = chunk.clone();
        chunk.decompress_text().map_err(png_error)?;
        entries.push((chunk.keyword.clone(), chunk.get_text().map_err(png_error)?));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_follow_the_png_rules() {
        assert!(is_valid_png_keyword("unitune"));
        assert!(is_valid_png_keyword("parameters"));
        assert!(is_valid_png_keyword("Créé par"));
        for bad in [
            "",
            " lead",
            "trail ",
            "two  spaces",
            "tab\there",
            "猫",
            &"k".repeat(80),
        ] {
            assert!(!is_valid_png_keyword(bad), "{bad:?}");
        }
    }

    #[test]
    fn refused_rename_removes_the_temporary_file() {
        // Export checks for an existing target up front; this drives the rename itself into
        // the collision, as when another program creates the file during encoding.
        let dir = tempfile::tempdir().expect("temp dir");
        let target = dir.path().join("taken.png");
        fs::write(&target, b"first").expect("write");
        let result = write_atomically(&target, ExistingFile::Refuse, |out| {
            out.write_all(b"second")?;
            Ok(())
        });
        assert!(
            matches!(
                result,
                Err(WriteError::Imaging(ImagingError::TargetExists { .. }))
            ),
            "{result:?}"
        );
        assert_eq!(fs::read(&target).expect("read"), b"first");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["taken.png"]);
    }

    #[test]
    fn encoder_io_failure_maps_like_any_export_io_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = dir.path().join("full.png");
        let result = write_atomically(&target, ExistingFile::Overwrite, |_| {
            Err(EncodeError::Io(io::Error::from_raw_os_error(28)))
        });
        assert!(
            matches!(
                result,
                Err(WriteError::Imaging(ImagingError::DiskFull { .. }))
            ),
            "{result:?}"
        );
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 0);
    }
}
