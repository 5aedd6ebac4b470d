//! Short jobs off the UI thread, each on its own named thread: decoding a photo, file
//! dialogs (rfd's dialogs block their thread), exporting, reading the autosaved session,
//! converting full-size photos and results into display copies and keeping results on disk,
//! and listing or clearing the snapshot cache.
//! Results come back over one bounded channel, and the waker repaints the window.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded};
use egui::ColorImage;
use image::{GrayImage, RgbImage};

use super::persist::{RestoredSession, StateFiles};
use super::results::{ResultFiles, StoredResult};
use super::textures;
use crate::imaging::{
    self, DecodeLimits, ExistingFile, Photo, PhotoMetadata, SourceFormat, one_line,
};
use crate::jobs::{CacheEntry, JobId, Recipe, RecipeSettings, SnapshotCache, panic_text};

/// Names one request to open a photo (or restore the autosaved one); newer ones are larger.
pub type OpenId = u64;

/// Opens file dialogs; the real one is rfd, tests script their answers.
pub trait FileDialogs: Send + Sync {
    fn pick_photo(&self, directory: Option<&Path>) -> Option<PathBuf>;
    fn pick_save_path(&self, directory: Option<&Path>, file_name: &str) -> Option<PathBuf>;
    fn pick_model_folder(&self) -> Option<PathBuf>;
    /// A single-file `.safetensors` checkpoint.
    fn pick_model_file(&self) -> Option<PathBuf>;
}

/// The system's dialogs (xdg portal on Linux, native on Windows and macOS).
pub struct SystemDialogs;

impl FileDialogs for SystemDialogs {
    fn pick_photo(&self, directory: Option<&Path>) -> Option<PathBuf> {
        let mut dialog = rfd::FileDialog::new()
            .set_title("Open a photo")
            .add_filter("Images", &["png", "jpg", "jpeg", "webp", "gif"]);
        if let Some(dir) = directory {
            dialog = dialog.set_directory(dir);
        }
        dialog.pick_file()
    }

    fn pick_save_path(&self, directory: Option<&Path>, file_name: &str) -> Option<PathBuf> {
        let mut dialog = rfd::FileDialog::new()
            .set_title("Export the edit")
            .set_file_name(file_name)
            .add_filter("PNG (keeps the recipe)", &["png"])
            .add_filter("JPEG", &["jpg", "jpeg"])
            .add_filter("WebP", &["webp"]);
        if let Some(dir) = directory {
            dialog = dialog.set_directory(dir);
        }
        dialog.save_file()
    }

    fn pick_model_folder(&self) -> Option<PathBuf> {
        rfd::FileDialog::new()
            .set_title("Choose a diffusers model folder")
            .pick_folder()
    }

    fn pick_model_file(&self) -> Option<PathBuf> {
        rfd::FileDialog::new()
            .set_title("Choose a Stable Diffusion checkpoint")
            .add_filter("Checkpoints", &["safetensors"])
            .pick_file()
    }
}

/// A finished edit on its way to a file.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// The full-resolution result, read on the export thread.
    pub image: StoredResult,
    /// The photo it was made from, over white (unchanged pixels still are).
    pub over_white: Arc<RgbImage>,
    pub alpha: Option<Arc<GrayImage>>,
    /// With `alpha`: the colour the photo's file holds.
    pub file_rgb: Option<Arc<RgbImage>>,
    /// The photo's ICC profile and EXIF.
    pub metadata: Arc<PhotoMetadata>,
    /// PNG text chunks (the recipe).
    pub text: Vec<(String, String)>,
    pub suggested_name: String,
    pub directory: Option<PathBuf>,
}

/// A decoded photo with its display copy, and the recipe it holds when unitune (or
/// AUTOMATIC1111) exported it.
pub struct OpenedPhoto {
    pub photo: Photo,
    pub display: ColorImage,
    /// Boxed: most photos hold none, and results travel by value.
    pub recipe: Option<Box<RecipeSettings>>,
}

/// A finished variant, kept on disk, with its display copy and strip thumbnail.
pub struct PreparedVariant {
    pub job: JobId,
    pub result: StoredResult,
    /// How it was made (passed through for the variant's export).
    pub recipe: Box<Recipe>,
    pub display: ColorImage,
    pub thumbnail: ColorImage,
}

/// What the cache window asks of the snapshot cache before listing it.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheChange {
    None,
    Remove(String),
    Clear,
}

/// The snapshot cache as listed for the cache window, most recently used first.
pub struct CacheListing {
    /// Each entry with its photo's thumbnail (decoded here, small), if it has one.
    pub entries: Vec<(CacheEntry, Option<ColorImage>)>,
    pub total_bytes: u64,
    pub max_bytes: u64,
    /// Why a removal failed, in one sentence.
    pub error: Option<String>,
}

pub enum ChoreResult {
    PhotoOpened {
        request: OpenId,
        path: PathBuf,
        result: Result<OpenedPhoto, String>,
    },
    SessionRestored {
        request: OpenId,
        restored: Option<(RestoredSession, ColorImage)>,
    },
    VariantPrepared(PreparedVariant),
    /// A result's display copy read back from disk.
    DisplayLoaded {
        job: JobId,
        display: Result<ColorImage, String>,
    },
    CacheListed(CacheListing),
    PhotoChosen(Option<PathBuf>),
    /// Where to write a LoRA file, with the snapshot it is for (`None`: the dialog was
    /// closed).
    LoraPathChosen(Option<PathBuf>, usize),
    ModelChosen(Option<PathBuf>),
    Exported {
        path: PathBuf,
        result: Result<(), String>,
        request: ExportRequest,
    },
    /// The save dialog was closed without a name.
    ExportAbandoned,
    CleanedUp,
    /// The chore panicked (or no thread could start for it); the UI resets what waited on it.
    Failed {
        chore: Chore,
        message: String,
    },
}

/// Which kind of chore a thread runs (names the thread, and says what a failure undoes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Chore {
    Open(OpenId),
    Restore(OpenId),
    Dialog,
    Export,
    /// The display copy of this job's variant.
    Display(JobId),
    /// Removing files no longer needed.
    Cleanup,
    /// Listing or changing the snapshot cache.
    Cache,
}

impl Chore {
    fn thread_name(self) -> &'static str {
        match self {
            Chore::Open(_) => "unitune-open",
            Chore::Restore(_) => "unitune-restore",
            Chore::Dialog => "unitune-dialog",
            Chore::Export => "unitune-export",
            Chore::Display(_) => "unitune-display",
            Chore::Cleanup => "unitune-cleanup",
            Chore::Cache => "unitune-cache",
        }
    }
}

pub struct Chores {
    tx: Sender<ChoreResult>,
    rx: Receiver<ChoreResult>,
    waker: Arc<dyn Fn() + Send + Sync>,
    dialogs: Arc<dyn FileDialogs>,
    /// The GPU's largest texture side, which display copies must fit.
    gpu_side: AtomicU32,
}

impl Chores {
    pub fn new(
        dialogs: Arc<dyn FileDialogs>,
        waker: Arc<dyn Fn() + Send + Sync>,
        gpu_side: usize,
    ) -> Self {
        let (tx, rx) = bounded(64);
        Self {
            tx,
            rx,
            waker,
            dialogs,
            gpu_side: AtomicU32::new(gpu_side as u32),
        }
    }

    /// The GPU's largest texture side, as egui reports it each frame.
    pub fn set_gpu_side(&self, side: usize) {
        self.gpu_side.store(side as u32, Ordering::Relaxed);
    }

    fn gpu_side(&self) -> u32 {
        self.gpu_side.load(Ordering::Relaxed)
    }

    pub fn try_next(&self) -> Option<ChoreResult> {
        self.rx.try_recv().ok()
    }

    /// Runs `work` on a new named thread; its result comes back through `try_next`. A panic
    /// (a decoder or a dialog library bug) comes back as `ChoreResult::Failed`, so nothing
    /// waits forever on a result that will not come.
    fn spawn(&self, chore: Chore, work: impl FnOnce() -> ChoreResult + Send + 'static) {
        let tx = self.tx.clone();
        let waker = self.waker.clone();
        let spawned = std::thread::Builder::new()
            .name(chore.thread_name().into())
            .spawn(move || {
                let result = catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|payload| {
                    ChoreResult::Failed {
                        chore,
                        message: one_line(&panic_text(payload.as_ref())),
                    }
                });
                let _ = tx.send(result);
                waker();
            });
        if let Err(err) = spawned {
            // Only when the system is out of threads.
            let _ = self.tx.try_send(ChoreResult::Failed {
                chore,
                message: format!("cannot start a background task: {err}"),
            });
        }
    }

    pub fn open_photo(&self, request: OpenId, path: PathBuf) {
        let gpu_side = self.gpu_side();
        self.spawn(Chore::Open(request), move || {
            let result = imaging::load_photo(&path, &DecodeLimits::default())
                .map(|photo| OpenedPhoto {
                    display: textures::display_copy(&photo.rgb, gpu_side),
                    // Only a PNG carries a recipe; an unreadable one is just a photo.
                    recipe: (photo.source_format == SourceFormat::Png)
                        .then(|| imaging::read_png_text(&path).ok())
                        .flatten()
                        .and_then(|chunks| RecipeSettings::from_text_chunks(&chunks))
                        .map(Box::new),
                    photo,
                })
                .map_err(|err| one_line(&err.to_string()));
            ChoreResult::PhotoOpened {
                request,
                path,
                result,
            }
        });
    }

    pub fn restore_session(&self, request: OpenId, files: StateFiles) {
        let gpu_side = self.gpu_side();
        self.spawn(Chore::Restore(request), move || {
            let restored = files.load_session().map(|restored| {
                let display = textures::display_copy(&restored.photo, gpu_side);
                (restored, display)
            });
            ChoreResult::SessionRestored { request, restored }
        });
    }

    /// Converts a finished variant for display and keeps the full result on disk; results
    /// come at the photo's full size.
    pub fn prepare_variant(
        &self,
        job: JobId,
        image: RgbImage,
        recipe: Box<Recipe>,
        results: ResultFiles,
    ) {
        let gpu_side = self.gpu_side();
        self.spawn(Chore::Display(job), move || {
            ChoreResult::VariantPrepared(PreparedVariant {
                job,
                display: textures::result_display_copy(&image, gpu_side),
                thumbnail: textures::color_image(&image, textures::THUMBNAIL_SIDE),
                result: results.store(job, image),
                recipe,
            })
        });
    }

    /// Reads a result back from disk for display (its texture was dropped to save memory).
    pub fn load_display(&self, job: JobId, result: StoredResult) {
        let gpu_side = self.gpu_side();
        self.spawn(Chore::Display(job), move || ChoreResult::DisplayLoaded {
            job,
            display: result
                .load()
                .map(|image| textures::result_display_copy(&image, gpu_side)),
        });
    }

    /// Removes files nothing needs any more (results of a replaced edit), off the UI thread.
    pub fn remove_files(&self, paths: Vec<PathBuf>) {
        if paths.is_empty() {
            return;
        }
        self.spawn(Chore::Cleanup, move || {
            for path in paths {
                let _ = std::fs::remove_file(path);
            }
            ChoreResult::CleanedUp
        });
    }

    /// Applies `change` to the snapshot cache, then lists it: all off the UI thread (a cache
    /// on a slow disk must not hold a frame up).
    pub fn list_cache(&self, cache: SnapshotCache, change: CacheChange) {
        self.spawn(Chore::Cache, move || {
            let changed = match change {
                CacheChange::None => Ok(()),
                CacheChange::Remove(key) => cache.remove(&key),
                CacheChange::Clear => cache.clear().map(|_| ()),
            };
            let mut entries = cache.entries();
            entries.reverse();
            let limits = DecodeLimits::default();
            ChoreResult::CacheListed(CacheListing {
                total_bytes: entries.iter().map(|e| e.bytes).sum(),
                max_bytes: cache.max_bytes(),
                entries: entries
                    .into_iter()
                    .map(|entry| {
                        let thumbnail = entry.thumbnail.as_deref().and_then(|path| {
                            let photo = imaging::load_photo(path, &limits).ok()?;
                            Some(textures::color_image(&photo.rgb, textures::THUMBNAIL_SIDE))
                        });
                        (entry, thumbnail)
                    })
                    .collect(),
                error: changed.err().map(|err| one_line(&err.to_string())),
            })
        });
    }

    /// Removes result folders of earlier runs that did not exit cleanly.
    pub fn remove_stale_results(&self, results: ResultFiles) {
        self.spawn(Chore::Cleanup, move || {
            results.remove_stale();
            ChoreResult::CleanedUp
        });
    }

    pub fn pick_photo(&self, directory: Option<PathBuf>) {
        let dialogs = self.dialogs.clone();
        self.spawn(Chore::Dialog, move || {
            ChoreResult::PhotoChosen(dialogs.pick_photo(directory.as_deref()))
        });
    }

    /// Asks where to write a LoRA of the snapshot after `steps` steps.
    pub fn pick_lora_path(&self, directory: Option<PathBuf>, suggested_name: String, steps: usize) {
        let dialogs = self.dialogs.clone();
        self.spawn(Chore::Dialog, move || {
            let path = dialogs.pick_save_path(directory.as_deref(), &suggested_name);
            let with_extension = path.map(|p| {
                if p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
                {
                    p
                } else {
                    p.with_extension("safetensors")
                }
            });
            ChoreResult::LoraPathChosen(with_extension, steps)
        });
    }

    pub fn pick_model_folder(&self) {
        let dialogs = self.dialogs.clone();
        self.spawn(Chore::Dialog, move || {
            ChoreResult::ModelChosen(dialogs.pick_model_folder())
        });
    }

    pub fn pick_model_file(&self) {
        let dialogs = self.dialogs.clone();
        self.spawn(Chore::Dialog, move || {
            ChoreResult::ModelChosen(dialogs.pick_model_file())
        });
    }

    /// Asks where to save, then writes the file, all off the UI thread.
    pub fn export(&self, request: ExportRequest) {
        let dialogs = self.dialogs.clone();
        self.spawn(Chore::Export, move || {
            let Some(path) =
                dialogs.pick_save_path(request.directory.as_deref(), &request.suggested_name)
            else {
                return ChoreResult::ExportAbandoned;
            };
            export_to(with_image_extension(path), request)
        });
    }

    /// Writes to `path` again (after the user freed space or fixed permissions).
    pub fn export_again(&self, path: PathBuf, request: ExportRequest) {
        self.spawn(Chore::Export, move || export_to(path, request));
    }
}

fn export_to(path: PathBuf, request: ExportRequest) -> ChoreResult {
    let result = request.image.load().and_then(|image| {
        let same_size = |size: (u32, u32)| size == image.dimensions();
        let original = imaging::Original {
            over_white: &request.over_white,
            alpha: request
                .alpha
                .as_deref()
                .filter(|a| same_size(a.dimensions())),
            file_rgb: request.file_rgb.as_deref(),
            metadata: &request.metadata,
        };
        // The dialog already asked before replacing an existing file.
        imaging::export_edit(
            &path,
            &image,
            &original,
            &request.text,
            ExistingFile::Overwrite,
        )
        .map_err(|err| one_line(&err.to_string()))
    });
    ChoreResult::Exported {
        path,
        result,
        request,
    }
}

/// A name typed without an extension becomes a PNG.
fn with_image_extension(path: PathBuf) -> PathBuf {
    if path.extension().is_some() {
        path
    } else {
        path.with_extension("png")
    }
}
