//! The one error type of the imaging layer.
//!
//! Every message is one sentence a user can act on: what went wrong, with the file's name, and
//! what to do about it. The CLI prints it as is and picks its exit code from
//! [`ImagingError::is_invalid_input`].

use std::io;
use std::path::{Path, PathBuf};

/// Formats the program can open, as named in messages.
pub(crate) const SUPPORTED_INPUTS: &str = "PNG, JPEG, WebP or GIF";

/// What went wrong while reading, fitting, or saving an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImagingError {
    /// The file to read does not exist.
    #[error("{} does not exist; check the file name and the folder it is in", .path.display())]
    NotFound { path: PathBuf },

    /// The path names a folder, not a file.
    #[error("{} is a folder, not an image file; give the path of a photo inside it", .path.display())]
    IsFolder { path: PathBuf },

    /// Reading the file failed below the image decoder (permissions, a failing disk, ...).
    #[error("could not read {} ({source}); check that the file is readable and try again", .path.display())]
    Unreadable { path: PathBuf, source: io::Error },

    /// The content is not an image in any format the program knows.
    #[error("{} is not an image this program can open; use a {SUPPORTED_INPUTS} file", .path.display())]
    NotAnImage { path: PathBuf },

    /// The content is an image, but in a format this build cannot decode.
    #[error("{} is a {format} image, which this program cannot open; convert it to {SUPPORTED_INPUTS} first", .path.display())]
    UnsupportedFormat { path: PathBuf, format: String },

    /// The decoder rejected the data.
    #[error("{} is damaged or uses a feature this program cannot read ({detail}); open it in another program and save it again as PNG or JPEG", .path.display())]
    Corrupt { path: PathBuf, detail: String },

    /// The file ends before the image does.
    #[error("{} is cut short (the file ends before the image does, as after an interrupted download or copy); copy the complete file again", .path.display())]
    Truncated { path: PathBuf },

    /// The header claims more pixels than [`crate::imaging::DecodeLimits`] allows.
    #[error("{} is {width}x{height} pixels, larger than the limit of {max_width}x{max_height}; scale it down in another program first", .path.display())]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        max_width: u32,
        max_height: u32,
    },

    /// Decoding would need more memory than [`crate::imaging::DecodeLimits`] allows.
    #[error("{} ({width}x{height} pixels) would need {} MiB to decode, more than the limit of {} MiB; scale it down in another program first", .path.display(), mib(*.needed_bytes), mib(*.limit_bytes))]
    TooMuchMemory {
        path: PathBuf,
        width: u32,
        height: u32,
        needed_bytes: u64,
        limit_bytes: u64,
    },

    /// The decoder itself ran past the memory limit (its header looked acceptable).
    #[error("{} needs more memory to decode than the limit of {} MiB allows; scale it down in another program first", .path.display(), mib(*.limit_bytes))]
    DecoderOverLimit { path: PathBuf, limit_bytes: u64 },

    /// The image has a zero width or height.
    #[error("{} has no pixels ({width}x{height}); use another image", .path.display())]
    NoPixels {
        path: PathBuf,
        width: u32,
        height: u32,
    },

    /// A size given as text (`--size`) could not be read.
    #[error("'{text}' is not a size; write it as WIDTHxHEIGHT in pixels, for example 512x512")]
    InvalidSizeText { text: String },

    /// A requested working size is not a multiple of 64 on both sides.
    #[error(
        "the size {width}x{height} cannot be used because both sides must be multiples of 64; try {suggested_width}x{suggested_height}"
    )]
    SizeNotMultipleOf64 {
        width: u32,
        height: u32,
        suggested_width: u32,
        suggested_height: u32,
    },

    /// A working size was asked for an image with a zero side.
    #[error(
        "cannot fit an image of {width}x{height} pixels to the model because it has no pixels; use another image"
    )]
    EmptyImage { width: u32, height: u32 },

    /// The mask is black (or nearly) everywhere, so nothing may change.
    #[error("the mask {} is black everywhere, so nothing in the photo could change; paint white where the photo may change", .path.display())]
    MaskEmpty { path: PathBuf },

    /// A mask was asked for at a zero size.
    #[error("cannot fit the mask {} to {width}x{height} pixels because that size has no pixels; this is a bug in the caller", .path.display())]
    MaskTargetEmpty {
        path: PathBuf,
        width: u32,
        height: u32,
    },

    /// The output name does not end in an extension the program can write.
    #[error("cannot save {} because its file type is not known; end the name in .png, .jpg, .jpeg or .webp", .path.display())]
    UnsupportedExportExtension { path: PathBuf },

    /// The output file exists and overwriting was not allowed.
    #[error("{} already exists and was left untouched; choose another name or allow overwriting", .path.display())]
    TargetExists { path: PathBuf },

    /// The folder to save into does not exist.
    #[error("cannot save {} because the folder {} does not exist; create it or choose another folder", .path.display(), .folder.display())]
    FolderMissing { path: PathBuf, folder: PathBuf },

    /// The folder to save into cannot be written.
    #[error("cannot save {} because its folder is read-only or not writable by you ({source}); choose another folder", .path.display())]
    ReadOnly { path: PathBuf, source: io::Error },

    /// The disk (or the user's quota) is full.
    #[error("cannot save {} because the disk is full ({source}); free some space and save again", .path.display())]
    DiskFull { path: PathBuf, source: io::Error },

    /// Any other failure while writing the output.
    #[error("cannot save {} ({source}); check the folder and try again", .path.display())]
    WriteFailed { path: PathBuf, source: io::Error },

    /// The image encoder refused the pixels (for example a JPEG wider than 65535 pixels).
    #[error("cannot save {} as {format} ({detail}); try saving as PNG instead", .path.display())]
    EncodeFailed {
        path: PathBuf,
        format: &'static str,
        detail: String,
    },

    /// The alpha channel handed to export does not match the colour image.
    #[error("cannot save {} because its transparency is {alpha_width}x{alpha_height} pixels but the picture is {width}x{height}; this is a bug in the caller", .path.display())]
    AlphaSizeMismatch {
        path: PathBuf,
        width: u32,
        height: u32,
        alpha_width: u32,
        alpha_height: u32,
    },

    /// A metadata key cannot be stored in a PNG text chunk.
    #[error("cannot save {} because the metadata key '{key}' is not a valid PNG keyword (1 to 79 Latin-1 characters, no leading, trailing or double spaces); this is a bug in the caller", .path.display())]
    InvalidTextKey { path: PathBuf, key: String },

    /// Metadata was asked from a file that is not a PNG.
    #[error("{} is not a PNG file, so it carries no PNG text; give the path of a PNG saved by this program", .path.display())]
    NotPng { path: PathBuf },

    /// Two images combined pixel by pixel differ in size (a bug in the caller).
    #[error(
        "cannot combine the {what} ({width}x{height} pixels) with the {other} ({other_width}x{other_height} pixels) because they differ in size; this is a bug in the caller"
    )]
    SizeMismatch {
        what: &'static str,
        width: u32,
        height: u32,
        other: &'static str,
        other_width: u32,
        other_height: u32,
    },

    /// The images or labels handed to the grid do not form a grid (a bug in the caller).
    #[error("cannot lay out the comparison grid because {detail}; this is a bug in the caller")]
    InvalidGrid { detail: String },
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1024 * 1024)
}

impl ImagingError {
    /// True when the problem lies in what the user gave (a missing, damaged, huge or
    /// unsupported image, a bad size, an empty mask, a bad output name, an output that already
    /// exists); false for failures of the machine or the program (unreadable file, read-only
    /// folder, full disk, encoder failure, a caller's bug). The CLI exits with 2 for the first
    /// kind and 1 for the second.
    pub fn is_invalid_input(&self) -> bool {
        match self {
            Self::NotFound { .. }
            | Self::IsFolder { .. }
            | Self::NotAnImage { .. }
            | Self::UnsupportedFormat { .. }
            | Self::Corrupt { .. }
            | Self::Truncated { .. }
            | Self::TooLarge { .. }
            | Self::TooMuchMemory { .. }
            | Self::DecoderOverLimit { .. }
            | Self::NoPixels { .. }
            | Self::InvalidSizeText { .. }
            | Self::SizeNotMultipleOf64 { .. }
            | Self::EmptyImage { .. }
            | Self::MaskEmpty { .. }
            | Self::UnsupportedExportExtension { .. }
            | Self::TargetExists { .. }
            | Self::FolderMissing { .. }
            | Self::NotPng { .. } => true,
            Self::Unreadable { .. }
            | Self::MaskTargetEmpty { .. }
            | Self::ReadOnly { .. }
            | Self::DiskFull { .. }
            | Self::WriteFailed { .. }
            | Self::EncodeFailed { .. }
            | Self::AlphaSizeMismatch { .. }
            | Self::InvalidTextKey { .. }
            | Self::SizeMismatch { .. }
            | Self::InvalidGrid { .. } => false,
        }
    }

    /// Classifies an io error met while saving `path`: a full disk or quota, a read-only or
    /// forbidden folder, a missing folder, an existing target, or anything else.
    ///
    /// Export uses it for every io failure; it is public so that other writers (and tests) map
    /// io errors the same way.
    pub fn from_export_io(path: &Path, error: io::Error) -> Self {
        let path = path.to_path_buf();
        match error.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Self::DiskFull {
                path,
                source: error,
            },
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Self::ReadOnly {
                path,
                source: error,
            },
            io::ErrorKind::NotFound => {
                let folder = parent_folder(&path).to_path_buf();
                Self::FolderMissing { path, folder }
            }
            io::ErrorKind::AlreadyExists => Self::TargetExists { path },
            _ => Self::WriteFailed {
                path,
                source: error,
            },
        }
    }
}

/// The folder a file lives in; `.` for a bare file name.
pub(crate) fn parent_folder(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_maps_to_disk_full_and_is_not_invalid_input() {
        let err =
            ImagingError::from_export_io(Path::new("out/a.png"), io::Error::from_raw_os_error(28));
        assert!(matches!(err, ImagingError::DiskFull { .. }), "{err:?}");
        assert!(!err.is_invalid_input());
        assert!(err.to_string().contains("out/a.png"));
        assert!(err.to_string().contains("disk is full"));
    }

    #[test]
    fn erofs_and_eacces_map_to_read_only() {
        for raw in [30, 13] {
            let err =
                ImagingError::from_export_io(Path::new("a.png"), io::Error::from_raw_os_error(raw));
            assert!(
                matches!(err, ImagingError::ReadOnly { .. }),
                "{raw}: {err:?}"
            );
        }
    }

    #[test]
    fn not_found_names_the_folder() {
        let err = ImagingError::from_export_io(
            Path::new("missing/dir/a.png"),
            io::Error::from(io::ErrorKind::NotFound),
        );
        match err {
            ImagingError::FolderMissing { folder, .. } => {
                assert_eq!(folder, Path::new("missing/dir"))
            }
            other => panic!("expected FolderMissing, got {other:?}"),
        }
        let err = ImagingError::from_export_io(
            Path::new("a.png"),
            io::Error::from(io::ErrorKind::NotFound),
        );
        assert!(
            err.to_string().contains("the folder . does not exist"),
            "{err}"
        );
    }

    #[test]
    fn messages_are_one_sentence() {
        let err = ImagingError::TooLarge {
            path: PathBuf::from("big.png"),
            width: 100_000,
            height: 100_000,
            max_width: 16384,
            max_height: 16384,
        };
        let text = err.to_string();
        assert!(
            text.contains("100000x100000") && text.contains("16384x16384"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        assert!(err.is_invalid_input());
        let err = ImagingError::TooMuchMemory {
            path: PathBuf::from("big.png"),
            width: 10,
            height: 10,
            needed_bytes: 3 * 1024 * 1024 + 1,
            limit_bytes: 1024 * 1024,
        };
        assert!(
            err.to_string().contains("need 4 MiB") && err.to_string().contains("limit of 1 MiB")
        );
    }
}
