//! What survives a restart: settings (model, brush, recent files, advanced values) and the
//! current work (photo, mask, prompt), written by a background thread ("unitune-autosave")
//! as soon as they change, so a crash or kill loses at most the last moment.
//!
//! eframe's own persistence saves only on a clean close and every 30 s; this writes on
//! change, atomically (temporary file + rename), and never on the UI thread.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::imaging::{self, DecodeLimits, ExistingFile};
use crate::jobs::{PAPER_SNAPSHOTS, panic_text};

/// How many recent files the File menu lists.
pub const RECENT_FILES: usize = 10;

/// The user's preferences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The model last loaded successfully (a folder or hub id).
    pub model: Option<String>,
    pub recent_files: Vec<PathBuf>,
    pub brush_size_px: f32,
    pub brush_softness: f32,
    pub mask_opacity: f32,
    pub sampling_steps: usize,
    pub interpolate: bool,
    /// `full`, `attention`, `cross-kv` or `lora`.
    pub train_mode: String,
    /// Fine-tuning steps after which snapshots are kept (the last is the tune's length).
    pub snapshot_steps: Vec<usize>,
    /// `auto`, `f32`, `f16` or `bf16` (see `engine::precision`).
    pub precision: String,
    /// Photos per fine-tuning pass: `auto` or a number.
    pub micro_batch: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: None,
            recent_files: Vec::new(),
            brush_size_px: 48.0,
            brush_softness: 0.5,
            mask_opacity: 0.5,
            sampling_steps: 50,
            interpolate: false,
            train_mode: "full".into(),
            snapshot_steps: PAPER_SNAPSHOTS.to_vec(),
            precision: "auto".into(),
            micro_batch: "auto".into(),
        }
    }
}

impl Settings {
    /// Puts `path` first in the recent files.
    pub fn remember_file(&mut self, path: &Path) {
        self.recent_files.retain(|p| p != path);
        self.recent_files.insert(0, path.to_path_buf());
        self.recent_files.truncate(RECENT_FILES);
    }
}

/// The current work, as autosaved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionText {
    /// Where the photo was opened from (the photo itself is saved beside this).
    pub source: Option<PathBuf>,
    pub prompt: String,
    pub baseline_prompt: String,
    pub fidelity: f64,
}

/// The current work handed to the autosave thread. Images are shared, not copied.
#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    pub text: SessionText,
    /// The photo and a number that changes when it does (it is rewritten only then).
    pub photo: Option<(u64, Arc<RgbImage>)>,
    pub mask: Option<Arc<GrayImage>>,
}

/// Autosaved work read back at start.
pub struct RestoredSession {
    pub text: SessionText,
    pub photo: RgbImage,
    pub mask: Option<GrayImage>,
}

/// The files under the state folder.
#[derive(Debug, Clone)]
pub struct StateFiles {
    root: PathBuf,
}

impl StateFiles {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `UNITUNE_STATE_DIR`, else the platform's local data folder.
    pub fn default_root() -> PathBuf {
        std::env::var_os("UNITUNE_STATE_DIR")
            .map(PathBuf::from)
            .or_else(|| dirs::data_local_dir().map(|d| d.join("unitune")))
            .unwrap_or_else(|| PathBuf::from(".unitune"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn settings(&self) -> PathBuf {
        self.root.join("settings.json")
    }

    fn session_dir(&self) -> PathBuf {
        self.root.join("session")
    }

    /// Settings from disk; defaults when missing or unreadable (a damaged file must not stop
    /// the editor from opening).
    pub fn load_settings(&self) -> Settings {
        std::fs::read_to_string(self.settings())
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// The autosaved work, if there is a photo to restore. Decodes PNGs: call it off the UI
    /// thread.
    pub fn load_session(&self) -> Option<RestoredSession> {
        let dir = self.session_dir();
        let text: SessionText = std::fs::read_to_string(dir.join("session.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())?;
        let limits = DecodeLimits::default();
        let photo = imaging::load_photo(&dir.join("photo.png"), &limits)
            .ok()?
            .rgb;
        let mask = imaging::load_mask(
            &dir.join("mask.png"),
            &limits,
            photo.width(),
            photo.height(),
        )
        .ok();
        Some(RestoredSession { text, photo, mask })
    }
}

/// What the autosave thread has yet to write; the newest of each kind replaces the older.
#[derive(Default)]
struct Pending {
    settings: Option<Settings>,
    session: Option<SessionSnapshot>,
}

/// Hands changes to the autosave thread without waiting for the disk.
pub struct Autosaver {
    pending: Arc<Mutex<Pending>>,
    wake: Option<Sender<()>>,
    failures: Receiver<String>,
    thread: Option<JoinHandle<()>>,
}

impl Autosaver {
    pub fn start(files: StateFiles) -> std::io::Result<Self> {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (wake_tx, wake_rx) = bounded::<()>(1);
        let (fail_tx, fail_rx) = bounded(8);
        let shared = pending.clone();
        let thread = std::thread::Builder::new()
            .name("unitune-autosave".into())
            .spawn(move || {
                let mut writer = Writer {
                    files,
                    photo_written: None,
                    mask_written: None,
                };
                let mut write_pending = || {
                    let work = std::mem::take(&mut *lock(&shared));
                    if let Err(message) = surviving_panics(|| writer.write(work)) {
                        let _ = fail_tx.try_send(message);
                    }
                };
                // Ends when the Autosaver drops its sender, after writing what is pending.
                while wake_rx.recv().is_ok() {
                    write_pending();
                }
                write_pending();
            })?;
        Ok(Self {
            pending,
            wake: Some(wake_tx),
            failures: fail_rx,
            thread: Some(thread),
        })
    }

    pub fn save_settings(&self, settings: &Settings) {
        lock(&self.pending).settings = Some(settings.clone());
        self.wake();
    }

    pub fn save_session(&self, session: SessionSnapshot) {
        lock(&self.pending).session = Some(session);
        self.wake();
    }

    /// One sentence per failed write since the last call.
    pub fn failures(&self) -> Vec<String> {
        self.failures.try_iter().collect()
    }

    fn wake(&self) {
        if let Some(wake) = &self.wake {
            // Full means a wake-up is already on its way; it will see this change.
            let _ = wake.try_send(());
        }
    }

    /// Writes everything pending and waits for the disk (on exit, and in tests).
    pub fn flush(mut self) {
        self.wake = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Autosaver {
    fn drop(&mut self) {
        // Let the thread finish the last write; it ends on its own.
        self.wake = None;
    }
}

/// Runs one write, turning a panic (an encoder bug, say) into a message: a dead autosave
/// thread would silently stop saving for the rest of the session.
fn surviving_panics(write: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(write)).unwrap_or_else(|payload| {
        Err(format!(
            "autosave failed unexpectedly ({}); your work is still open",
            panic_text(payload.as_ref())
        ))
    })
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Writer {
    files: StateFiles,
    /// The version of the photo already on disk.
    photo_written: Option<u64>,
    /// The mask already on disk (held, so its address cannot be reused by a new one).
    mask_written: Option<Arc<GrayImage>>,
}

impl Writer {
    fn write(&mut self, work: Pending) -> Result<(), String> {
        let fail = |what: &str, err: &dyn std::fmt::Display| {
            format!(
                "autosave could not write {what} in {} ({err}); your work is still open",
                self.files.root.display()
            )
        };
        if let Some(settings) = work.settings {
            let text = serde_json::to_string_pretty(&settings).map_err(|e| fail("settings", &e))?;
            write_atomic(&self.files.settings(), text.as_bytes())
                .map_err(|e| fail("settings", &e))?;
        }
        let dir = self.files.session_dir();
        if let Some(session) = work.session {
            std::fs::create_dir_all(&dir).map_err(|e| fail("the session", &e))?;
            if let Some((version, photo)) = &session.photo
                && self.photo_written != Some(*version)
            {
                imaging::export_image(
                    &dir.join("photo.png"),
                    photo,
                    None,
                    &[],
                    ExistingFile::Overwrite,
                )
                .map_err(|e| fail("the photo", &e))?;
                self.photo_written = Some(*version);
            }
            match &session.mask {
                // Unchanged since the last write (the prompt changed, say).
                Some(mask)
                    if self
                        .mask_written
                        .as_ref()
                        .is_some_and(|w| Arc::ptr_eq(w, mask)) => {}
                Some(mask) => {
                    let rgb = image::DynamicImage::ImageLuma8((**mask).clone()).to_rgb8();
                    imaging::export_image(
                        &dir.join("mask.png"),
                        &rgb,
                        None,
                        &[],
                        ExistingFile::Overwrite,
                    )
                    .map_err(|e| fail("the mask", &e))?;
                    self.mask_written = Some(mask.clone());
                }
                None => {
                    let _ = std::fs::remove_file(dir.join("mask.png"));
                    self.mask_written = None;
                }
            }
            // Written last: a session.json always has its photo beside it.
            let text =
                serde_json::to_string_pretty(&session.text).map_err(|e| fail("the prompt", &e))?;
            write_atomic(&dir.join("session.json"), text.as_bytes())
                .map_err(|e| fail("the prompt", &e))?;
        }
        Ok(())
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_work_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::new(dir.path());
        assert_eq!(files.load_settings(), Settings::default());
        assert!(files.load_session().is_none());

        let saver = Autosaver::start(files.clone()).unwrap();
        let mut settings = Settings::default();
        settings.remember_file(Path::new("/photos/a.png"));
        settings.brush_size_px = 12.0;
        saver.save_settings(&settings);
        let photo = Arc::new(RgbImage::from_pixel(6, 4, image::Rgb([10, 20, 30])));
        let mut mask = GrayImage::new(6, 4);
        mask.put_pixel(2, 1, image::Luma([255]));
        saver.save_session(SessionSnapshot {
            text: SessionText {
                source: Some("/photos/a.png".into()),
                prompt: "a cat wearing sunglasses".into(),
                baseline_prompt: String::new(),
                fidelity: 0.25,
            },
            photo: Some((1, photo.clone())),
            mask: Some(Arc::new(mask.clone())),
        });
        saver.flush();

        assert_eq!(files.load_settings(), settings);
        let restored = files.load_session().unwrap();
        assert_eq!(restored.text.prompt, "a cat wearing sunglasses");
        assert_eq!(restored.photo, *photo);
        assert_eq!(restored.mask.unwrap(), mask);
    }

    #[test]
    fn an_unchanged_mask_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::new(dir.path());
        let mask_file = files.session_dir().join("mask.png");
        let mut writer = Writer {
            files,
            photo_written: None,
            mask_written: None,
        };
        let photo = Arc::new(RgbImage::new(4, 4));
        let mask = Arc::new(GrayImage::from_pixel(4, 4, image::Luma([200])));
        let work = |mask: Option<Arc<GrayImage>>| Pending {
            settings: None,
            session: Some(SessionSnapshot {
                text: SessionText::default(),
                photo: Some((1, photo.clone())),
                mask,
            }),
        };
        writer.write(work(Some(mask.clone()))).unwrap();
        assert!(mask_file.exists());
        std::fs::remove_file(&mask_file).unwrap();
        writer.write(work(Some(mask.clone()))).unwrap();
        assert!(!mask_file.exists(), "the same mask is not written twice");
        writer.write(work(Some(Arc::new((*mask).clone())))).unwrap();
        assert!(mask_file.exists(), "a new mask is written");
        writer.write(work(None)).unwrap();
        assert!(!mask_file.exists(), "no mask, no file");
    }

    #[test]
    fn a_panicking_write_becomes_a_message() {
        let failed = surviving_panics(|| panic!("png encoder bug"));
        let message = failed.unwrap_err();
        assert!(message.contains("png encoder bug"), "{message}");
        assert!(message.contains("your work is still open"), "{message}");
        assert_eq!(
            surviving_panics(|| Err("disk full".into())),
            Err("disk full".into())
        );
        assert_eq!(surviving_panics(|| Ok(())), Ok(()));
    }

    #[test]
    fn damaged_settings_fall_back_to_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("settings.json"), "{ not json").unwrap();
        assert_eq!(
            StateFiles::new(dir.path()).load_settings(),
            Settings::default()
        );
    }
}
