//! What survives a restart: settings (model, brush, recent files, advanced values) and the
//! current work (photo, mask, prompt), written by a background thread ("unitune-autosave")
//! as soon as they change, so a crash or kill loses at most the last moment.
//!
//! eframe's own persistence saves only on a clean close and every 30 s; this writes on
//! change, and never on the UI thread.
//!
//! The work is a set of files (photo, its alpha, mask) under `session/`, named by the write
//! that made them, and a manifest (`session.json`) written last, atomically, that names the
//! set. A write that fails midway leaves the previous manifest and its files as they were, so
//! a restore never mixes a new photo with an old mask or prompt. Files no manifest names are
//! removed after the next complete write.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::imaging::{self, DecodeLimits, ExistingFile, PhotoMetadata};
use crate::jobs::{PAPER_SNAPSHOTS, PreviewMode, TrainMode, panic_text};

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
    /// With nothing painted, an edit changes only the region the prompt names.
    pub auto_region: bool,
    /// Saved by name (`full`, `attention`, `cross-kv`, `lora` or `lora:RANK`), as the
    /// settings files of earlier versions have it.
    #[serde(with = "train_mode_by_name")]
    pub train_mode: TrainMode,
    /// Fine-tuning steps after which snapshots are kept (the last is the tune's length).
    pub snapshot_steps: Vec<usize>,
    /// `auto`, `f32`, `f16` or `bf16` (see `engine::precision`).
    pub precision: String,
    /// Photos per fine-tuning pass: `auto` or a number.
    pub micro_batch: String,
    /// How the denoising is previewed on the canvas; a name this version does not know
    /// reads as the default, rather than losing every setting.
    #[serde(deserialize_with = "preview_or_default")]
    pub preview: PreviewMode,
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
            // The benchmark's finding (docs/edit-quality.md): at every fidelity the
            // automatic region succeeds as often and keeps more of the photo.
            auto_region: true,
            train_mode: TrainMode::Full,
            snapshot_steps: PAPER_SNAPSHOTS.to_vec(),
            precision: "auto".into(),
            micro_batch: "auto".into(),
            preview: PreviewMode::Fast,
        }
    }
}

fn preview_or_default<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<PreviewMode, D::Error> {
    let name = String::deserialize(deserializer)?;
    Ok(name.parse().unwrap_or(Settings::default().preview))
}

impl Settings {
    /// Puts `path` first in the recent files.
    pub fn remember_file(&mut self, path: &Path) {
        self.recent_files.retain(|p| p != path);
        self.recent_files.insert(0, path.to_path_buf());
        self.recent_files.truncate(RECENT_FILES);
    }
}

/// [`TrainMode`] as the text settings files hold; a name this version does not know reads as
/// the default (a settings file must never stop the editor from opening).
mod train_mode_by_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::jobs::TrainMode;

    pub fn serialize<S: Serializer>(mode: &TrainMode, out: S) -> Result<S::Ok, S::Error> {
        match mode {
            TrainMode::Lora { rank } if *rank != default_lora_rank() => {
                out.serialize_str(&format!("lora:{rank}"))
            }
            other => out.serialize_str(other.name()),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<TrainMode, D::Error> {
        let text = String::deserialize(input)?;
        Ok(parse(&text).unwrap_or(TrainMode::Full))
    }

    fn parse(text: &str) -> Option<TrainMode> {
        match text.split_once(':') {
            Some(("lora", rank)) => rank
                .trim()
                .parse()
                .ok()
                .map(|rank| TrainMode::Lora { rank }),
            _ => text.parse().ok(),
        }
    }

    /// The rank a bare `lora` means.
    fn default_lora_rank() -> usize {
        match "lora".parse() {
            Ok(TrainMode::Lora { rank }) => rank,
            _ => 4,
        }
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
    /// The photo's transparency, if it has any (saved with the photo).
    pub alpha: Option<Arc<GrayImage>>,
    /// With `alpha`: the colour the photo's file holds (not over white).
    pub file_rgb: Option<Arc<RgbImage>>,
    /// The photo file's ICC profile and EXIF (saved inside the photo's PNG).
    pub metadata: Arc<PhotoMetadata>,
    pub mask: Option<Arc<GrayImage>>,
}

/// Autosaved work read back at start.
pub struct RestoredSession {
    pub text: SessionText,
    pub photo: RgbImage,
    pub alpha: Option<GrayImage>,
    pub file_rgb: Option<RgbImage>,
    pub metadata: PhotoMetadata,
    pub mask: Option<GrayImage>,
}

/// `session.json`: the prompt, and the files of the set it belongs to. Written after them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct Manifest {
    #[serde(flatten)]
    text: SessionText,
    /// Counts complete writes; names the files a write adds (so they never overwrite the
    /// files the current manifest names).
    generation: u64,
    /// File names in the session folder. `None` in a manifest from before sets were named:
    /// then the photo is `photo.png` and the mask `mask.png`.
    photo_file: Option<String>,
    alpha_file: Option<String>,
    /// The file's own colour of a photo with transparency (absent in older sets).
    colour_file: Option<String>,
    mask_file: Option<String>,
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
        let manifest = read_manifest(&dir)?;
        let limits = DecodeLimits::default();
        let photo_file = manifest.photo_file.as_deref().unwrap_or(LEGACY_PHOTO);
        let saved = imaging::load_photo(&dir.join(photo_file), &limits).ok()?;
        let (photo, metadata) = (saved.rgb, saved.metadata);
        let file_rgb = manifest.colour_file.as_deref().and_then(|file| {
            let colour = imaging::load_photo(&dir.join(file), &limits).ok()?.rgb;
            (colour.dimensions() == photo.dimensions()).then_some(colour)
        });
        // Saved as a grey image of its own: the photo's colour is already composited, and
        // decoding an RGBA file would composite it again.
        let alpha = manifest.alpha_file.as_deref().and_then(|file| {
            let grey = imaging::load_photo(&dir.join(file), &limits).ok()?.rgb;
            (grey.dimensions() == photo.dimensions()).then(|| {
                GrayImage::from_fn(grey.width(), grey.height(), |x, y| {
                    image::Luma([grey.get_pixel(x, y).0[0]])
                })
            })
        });
        let mask_file = match &manifest.photo_file {
            Some(_) => manifest.mask_file.as_deref(),
            None => Some(LEGACY_MASK),
        };
        let mask = mask_file.and_then(|file| {
            imaging::load_mask(&dir.join(file), &limits, photo.width(), photo.height()).ok()
        });
        Some(RestoredSession {
            text: manifest.text,
            photo,
            file_rgb: file_rgb.filter(|_| alpha.is_some()),
            alpha,
            metadata,
            mask,
        })
    }
}

/// The names of a set written before sets were named.
const LEGACY_PHOTO: &str = "photo.png";
const LEGACY_MASK: &str = "mask.png";
const MANIFEST: &str = "session.json";

fn read_manifest(dir: &Path) -> Option<Manifest> {
    std::fs::read_to_string(dir.join(MANIFEST))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
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
                let mut writer = Writer::new(files);
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

/// The autosave thread's side: what the manifest on disk names, so unchanged images are not
/// written again.
struct Writer {
    files: StateFiles,
    /// The manifest last written (read from disk before the first write).
    written: Option<Manifest>,
    /// The photo version in `written.photo_file`.
    photo_written: Option<u64>,
    /// The mask in `written.mask_file` (held, so its address cannot be reused by a new one).
    mask_written: Option<Arc<GrayImage>>,
}

impl Writer {
    fn new(files: StateFiles) -> Self {
        Self {
            files,
            written: None,
            photo_written: None,
            mask_written: None,
        }
    }

    fn write(&mut self, work: Pending) -> Result<(), String> {
        let root = self.files.root.clone();
        let fail = |what: &str, err: &dyn std::fmt::Display| {
            format!(
                "autosave could not write {what} in {} ({err}); your work is still open",
                root.display()
            )
        };
        if let Some(settings) = work.settings {
            let text = serde_json::to_string_pretty(&settings).map_err(|e| fail("settings", &e))?;
            write_atomic(&self.files.settings(), text.as_bytes())
                .map_err(|e| fail("settings", &e))?;
        }
        if let Some(session) = work.session {
            self.write_session(session)
                .map_err(|(what, err)| fail(what, &err))?;
        }
        Ok(())
    }

    /// Writes the images that changed under new names, then the manifest naming the set, then
    /// removes what no manifest names any more.
    fn write_session(&mut self, session: SessionSnapshot) -> Result<(), (&'static str, String)> {
        let dir = self.files.session_dir();
        std::fs::create_dir_all(&dir).map_err(|e| ("the session", e.to_string()))?;
        let previous = match self.written.take() {
            Some(manifest) => manifest,
            None => read_manifest(&dir).unwrap_or_default(),
        };
        // Put back below once the new set is complete; until then a retry compares against
        // what is on disk.
        let generation = previous.generation + 1;
        let mut manifest = Manifest {
            text: session.text,
            generation,
            ..Manifest::default()
        };
        let photo_unchanged = previous.photo_file.is_some()
            && session.photo.as_ref().map(|(v, _)| *v) == self.photo_written;
        let (photo_written, mask_written) = (self.photo_written, self.mask_written.clone());
        let result = (|| {
            match &session.photo {
                Some(_) if photo_unchanged => {
                    manifest.photo_file = previous.photo_file.clone();
                    manifest.alpha_file = previous.alpha_file.clone();
                    manifest.colour_file = previous.colour_file.clone();
                }
                Some((_, photo)) => {
                    let name = format!("photo-{generation}.png");
                    // The profile and EXIF travel inside the photo's own PNG.
                    imaging::export_image_with_metadata(
                        &dir.join(&name),
                        photo,
                        None,
                        &session.metadata,
                        &[],
                        ExistingFile::Overwrite,
                    )
                    .map_err(|e| ("the photo", e.to_string()))?;
                    manifest.photo_file = Some(name);
                    if let Some(alpha) = &session.alpha {
                        let name = format!("alpha-{generation}.png");
                        write_grey_png(&dir.join(&name), alpha)
                            .map_err(|e| ("the photo's transparency", e))?;
                        manifest.alpha_file = Some(name);
                    }
                    if let Some(colour) = &session.file_rgb {
                        let name = format!("colour-{generation}.png");
                        write_png(&dir.join(&name), colour)
                            .map_err(|e| ("the photo's transparency", e))?;
                        manifest.colour_file = Some(name);
                    }
                }
                // Nothing to restore without a photo.
                None => return Ok(()),
            }
            manifest.mask_file = match &session.mask {
                // Unchanged since the last write (the prompt changed, say).
                Some(mask)
                    if previous.mask_file.is_some()
                        && mask_written.as_ref().is_some_and(|w| Arc::ptr_eq(w, mask)) =>
                {
                    previous.mask_file.clone()
                }
                Some(mask) => {
                    let name = format!("mask-{generation}.png");
                    write_grey_png(&dir.join(&name), mask).map_err(|e| ("the mask", e))?;
                    Some(name)
                }
                None => None,
            };
            let text = serde_json::to_string_pretty(&manifest)
                .map_err(|e| ("the prompt", e.to_string()))?;
            write_atomic(&dir.join(MANIFEST), text.as_bytes())
                .map_err(|e| ("the prompt", e.to_string()))
        })();
        match result {
            Ok(()) if manifest.photo_file.is_some() => {
                remove_unnamed_files(&dir, &manifest);
                self.photo_written = session.photo.as_ref().map(|(v, _)| *v);
                self.mask_written = session.mask.clone();
                self.written = Some(manifest);
                Ok(())
            }
            Ok(()) => {
                self.written = Some(previous);
                Ok(())
            }
            Err(error) => {
                // What the failed write added is removed by the next complete one.
                self.photo_written = photo_written;
                self.mask_written = mask_written;
                self.written = Some(previous);
                Err(error)
            }
        }
    }
}

fn write_png(path: &Path, image: &RgbImage) -> Result<(), String> {
    imaging::export_image(path, image, None, &[], ExistingFile::Overwrite)
        .map_err(|e| e.to_string())
}

fn write_grey_png(path: &Path, grey: &GrayImage) -> Result<(), String> {
    write_png(path, &imaging::gray_to_rgb(grey))
}

/// Best effort: a file left behind is removed after a later write.
fn remove_unnamed_files(dir: &Path, manifest: &Manifest) {
    let named = [
        Some(MANIFEST),
        manifest.photo_file.as_deref(),
        manifest.alpha_file.as_deref(),
        manifest.colour_file.as_deref(),
        manifest.mask_file.as_deref(),
    ];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name.ends_with(".png") || name.starts_with(".tmp");
        if ours && !named.contains(&Some(name.as_ref())) && entry.path().is_file() {
            let _ = std::fs::remove_file(entry.path());
        }
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

    fn snapshot(
        prompt: &str,
        photo: (u64, &Arc<RgbImage>),
        alpha: Option<&Arc<GrayImage>>,
        mask: Option<&Arc<GrayImage>>,
    ) -> Pending {
        Pending {
            settings: None,
            session: Some(SessionSnapshot {
                text: SessionText {
                    source: Some("/photos/a.png".into()),
                    prompt: prompt.into(),
                    baseline_prompt: String::new(),
                    fidelity: 0.25,
                },
                photo: Some((photo.0, photo.1.clone())),
                alpha: alpha.cloned(),
                file_rgb: None,
                metadata: Arc::default(),
                mask: mask.cloned(),
            }),
        }
    }

    fn png_files(files: &StateFiles) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(files.session_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".png"))
            .collect();
        names.sort();
        names
    }

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
        let Some(session) = snapshot(
            "a cat wearing sunglasses",
            (1, &photo),
            None,
            Some(&Arc::new(mask.clone())),
        )
        .session
        else {
            unreachable!()
        };
        saver.save_session(session);
        saver.flush();

        assert_eq!(files.load_settings(), settings);
        let restored = files.load_session().unwrap();
        assert_eq!(restored.text.prompt, "a cat wearing sunglasses");
        assert_eq!(restored.photo, *photo);
        assert!(restored.alpha.is_none());
        assert_eq!(restored.mask.unwrap(), mask);
    }

    /// Issue 11: the photo's transparency was dropped by autosave.
    #[test]
    fn a_photo_with_alpha_comes_back_with_its_alpha() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::new(dir.path());
        let photo = Arc::new(RgbImage::from_fn(5, 3, |x, y| {
            image::Rgb([(x * 40) as u8, (y * 70) as u8, 200])
        }));
        let alpha = Arc::new(GrayImage::from_fn(5, 3, |x, y| {
            image::Luma([(x * 60 + y * 5) as u8])
        }));
        Writer::new(files.clone())
            .write(snapshot("glass", (1, &photo), Some(&alpha), None))
            .unwrap();
        let restored = files.load_session().unwrap();
        assert_eq!(restored.photo, *photo, "the colour is not composited again");
        assert_eq!(restored.alpha.as_ref(), Some(&*alpha));
    }

    /// Issue 11: a write that fails midway (here the mask cannot be encoded, after the new
    /// photo was written) must leave the previous complete set restorable, never a mix of the
    /// new photo with the old prompt and mask.
    #[test]
    fn a_write_that_fails_midway_leaves_the_previous_set() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::new(dir.path());
        let old_photo = Arc::new(RgbImage::from_pixel(4, 4, image::Rgb([10, 10, 10])));
        let old_mask = Arc::new(GrayImage::from_pixel(4, 4, image::Luma([255])));
        let mut writer = Writer::new(files.clone());
        writer
            .write(snapshot("old", (1, &old_photo), None, Some(&old_mask)))
            .unwrap();

        let new_photo = Arc::new(RgbImage::from_pixel(4, 4, image::Rgb([250, 0, 0])));
        let unencodable = Arc::new(GrayImage::new(0, 0));
        let failed = writer.write(snapshot("new", (2, &new_photo), None, Some(&unencodable)));
        assert!(failed.is_err(), "the mask cannot be written");

        for restored in [files.load_session(), files.load_session()] {
            let restored = restored.expect("the previous set is restorable");
            assert_eq!(restored.text.prompt, "old");
            assert_eq!(restored.photo, *old_photo, "the photo of the old set");
            assert_eq!(restored.mask.as_ref(), Some(&*old_mask));
        }

        // The next complete write replaces the set and leaves only its files.
        writer
            .write(snapshot("new", (2, &new_photo), None, None))
            .unwrap();
        let restored = files.load_session().unwrap();
        assert_eq!(restored.text.prompt, "new");
        assert_eq!(restored.photo, *new_photo);
        assert!(restored.mask.is_none());
        assert_eq!(png_files(&files).len(), 1, "{:?}", png_files(&files));
    }

    #[test]
    fn a_set_written_before_sets_were_named_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::new(dir.path());
        let session = files.session_dir();
        std::fs::create_dir_all(&session).unwrap();
        let photo = RgbImage::from_pixel(4, 2, image::Rgb([1, 2, 3]));
        write_png(&session.join("photo.png"), &photo).unwrap();
        std::fs::write(
            session.join("session.json"),
            r#"{"source": null, "prompt": "old format", "baseline_prompt": "", "fidelity": 0.5}"#,
        )
        .unwrap();
        let restored = files.load_session().unwrap();
        assert_eq!(restored.text.prompt, "old format");
        assert_eq!(restored.photo, photo);
        assert!(restored.mask.is_none());
    }

    #[test]
    fn an_unchanged_image_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::new(dir.path());
        let mut writer = Writer::new(files.clone());
        let photo = Arc::new(RgbImage::new(4, 4));
        let mask = Arc::new(GrayImage::from_pixel(4, 4, image::Luma([200])));
        writer
            .write(snapshot("a", (1, &photo), None, Some(&mask)))
            .unwrap();
        let first = png_files(&files);
        assert_eq!(first, ["mask-1.png", "photo-1.png"]);
        writer
            .write(snapshot("b", (1, &photo), None, Some(&mask)))
            .unwrap();
        assert_eq!(
            png_files(&files),
            first,
            "same photo and mask: no new files"
        );
        writer
            .write(snapshot(
                "b",
                (1, &photo),
                None,
                Some(&Arc::new((*mask).clone())),
            ))
            .unwrap();
        assert_eq!(
            png_files(&files),
            ["mask-3.png", "photo-1.png"],
            "a new mask"
        );
        writer
            .write(snapshot("b", (1, &photo), None, None))
            .unwrap();
        assert_eq!(png_files(&files), ["photo-1.png"], "no mask, no file");
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
    fn the_training_mode_is_saved_by_name_and_old_names_still_read() {
        for (text, mode) in [
            ("full", TrainMode::Full),
            ("cross-kv", TrainMode::CrossKv),
            ("lora", TrainMode::Lora { rank: 4 }),
            ("lora:8", TrainMode::Lora { rank: 8 }),
            ("something-new", TrainMode::Full),
        ] {
            let json = format!(r#"{{"train_mode": "{text}"}}"#);
            let settings: Settings = serde_json::from_str(&json).unwrap();
            assert_eq!(settings.train_mode, mode, "{text}");
        }
        let settings = Settings {
            train_mode: TrainMode::Lora { rank: 8 },
            ..Settings::default()
        };
        let json = serde_json::to_string(&settings).unwrap();
        assert!(json.contains(r#""train_mode":"lora:8""#), "{json}");
        assert_eq!(serde_json::from_str::<Settings>(&json).unwrap(), settings);
    }

    #[test]
    fn the_preview_is_saved_by_name_and_an_unknown_one_reads_as_the_default() {
        for (json, mode) in [
            (r#"{"preview": "taesd"}"#, PreviewMode::Taesd),
            (r#"{"preview": "off"}"#, PreviewMode::Off),
            (r#"{"preview": "something-new"}"#, PreviewMode::Fast),
            ("{}", PreviewMode::Fast),
        ] {
            let settings: Settings = serde_json::from_str(json).unwrap();
            assert_eq!(settings.preview, mode, "{json}");
        }
        let settings = Settings {
            preview: PreviewMode::Taesd,
            ..Settings::default()
        };
        let json = serde_json::to_string(&settings).unwrap();
        assert!(json.contains(r#""preview":"taesd""#), "{json}");
        assert_eq!(serde_json::from_str::<Settings>(&json).unwrap(), settings);
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
