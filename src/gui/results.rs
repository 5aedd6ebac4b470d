//! Finished results kept on disk, so a long session of "More seeds" holds a bounded working
//! set in memory: each variant keeps its strip thumbnail, a few keep a downscaled display
//! texture, and the full-resolution result lives in the state folder until it is exported
//! (or the edit is replaced). No egui here.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use image::RgbImage;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};

use crate::imaging::{self, DecodeLimits};
use crate::jobs::JobId;

/// Folders of other editor runs older than this are removed at start (a crashed run's).
const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// A finished result at the photo's full size.
#[derive(Debug, Clone)]
pub enum StoredResult {
    /// In the state folder (the usual case).
    File(PathBuf),
    /// Kept in memory because it could not be written (a full disk): never lost for that.
    Memory(Arc<RgbImage>),
}

impl StoredResult {
    /// The full-resolution image (decodes the file: call it off the UI thread).
    pub fn load(&self) -> Result<Arc<RgbImage>, String> {
        match self {
            StoredResult::Memory(image) => Ok(image.clone()),
            StoredResult::File(path) => imaging::load_photo(path, &DecodeLimits::default())
                .map(|photo| Arc::new(photo.rgb))
                .map_err(|err| {
                    format!(
                        "the result kept in {} cannot be read ({}); run the edit again",
                        path.display(),
                        imaging::one_line(&err.to_string())
                    )
                }),
        }
    }

    pub fn file(&self) -> Option<&Path> {
        match self {
            StoredResult::File(path) => Some(path),
            StoredResult::Memory(_) => None,
        }
    }
}

/// This editor run's folder of results (`<state>/results/<process id>`).
#[derive(Debug, Clone)]
pub struct ResultFiles {
    dir: PathBuf,
}

impl ResultFiles {
    pub fn new(state_root: &Path) -> Self {
        Self {
            dir: state_root
                .join("results")
                .join(format!("run-{}", std::process::id())),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `image` (a fast PNG: it is read back by this run only); keeps it in memory when
    /// the disk refuses. Call it off the UI thread.
    pub fn store(&self, job: JobId, image: RgbImage) -> StoredResult {
        let path = self.dir.join(format!("variant-{job}.png"));
        match write_fast_png(&path, &image) {
            Ok(()) => StoredResult::File(path),
            Err(err) => {
                eprintln!(
                    "unitune: keeping a result in memory: cannot write {} ({err})",
                    path.display()
                );
                StoredResult::Memory(Arc::new(image))
            }
        }
    }

    /// Removes this run's folder (on exit), and other runs' folders left by a crash.
    pub fn remove_all(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Removes folders of earlier runs that did not exit cleanly (best effort).
    pub fn remove_stale(&self) {
        let Some(parent) = self.dir.parent() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_AFTER);
            if old && entry.path() != self.dir {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn write_fast_png(path: &Path, image: &RgbImage) -> std::io::Result<()> {
    use image::ImageEncoder;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let file = tempfile::NamedTempFile::new_in(dir)?;
    let encoder = PngEncoder::new_with_quality(
        BufWriter::new(file.as_file()),
        CompressionType::Fast,
        FilterType::Adaptive,
    );
    encoder
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(std::io::Error::other)?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_result_reads_back_exactly_and_is_removed_with_the_run() {
        let state = tempfile::tempdir().unwrap();
        let files = ResultFiles::new(state.path());
        let image = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 50, 9]));
        let stored = files.store(3, image.clone());
        assert!(stored.file().is_some_and(|p| p.starts_with(state.path())));
        assert_eq!(*stored.load().unwrap(), image);
        files.remove_all();
        assert!(stored.load().is_err());
    }

    #[test]
    fn a_result_that_cannot_be_written_stays_in_memory() {
        let state = tempfile::tempdir().unwrap();
        // A file where the results folder should be.
        std::fs::write(state.path().join("results"), b"").unwrap();
        let image = RgbImage::new(2, 2);
        let stored = ResultFiles::new(state.path()).store(1, image.clone());
        assert!(stored.file().is_none());
        assert_eq!(*stored.load().unwrap(), image);
    }
}
