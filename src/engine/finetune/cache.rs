//! Fine-tuned snapshots on disk, so editing the same photo again never retrains.
//!
//! One folder per (model, precision, photo, recipe), named by the SHA-256 of all of them, with
//! one safetensors file per snapshot holding only what training changed, in the model's
//! compute precision. Each file is written as its snapshot is taken, streamed tensor by tensor
//! and atomically; a file that is damaged or does not match what it claims is ignored (and
//! rebuilt by the caller), never trusted. The folder's total size is capped: the least recently
//! used entries are removed first.
//!
//! A fine-tune that was stopped keeps its completed snapshots (a partial ladder) and, in
//! `resume.safetensors`, the trained values and optimizer state after its last whole step, so
//! that the next run of the same recipe continues where it stopped. `photo.png` is a small
//! copy of the photo, so that people can see what an entry is before removing it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use image::RgbImage;
use sha2::{Digest, Sha256};

use super::adapter::{Adapter, is_finite};
use super::snapshot::{IN_MEMORY_LIMIT_BYTES, MappedFile, Snapshot, write_safetensors};
use super::tune::{TrainingState, TuneSettings};
use crate::engine::error::{EngineError, Result};
use crate::engine::optim::OptimizerState;

/// Bump when the file layout or the training code changes what a recipe produces.
const FORMAT_VERSION: &str = "2";
/// The default cap: room for a few full fine-tunes of SD 1.5 in f16 (6.9 GB each) or
/// hundreds of LoRA or cross-kv ones.
/// In decimal gigabytes, as `--cache-size` counts them.
pub const DEFAULT_MAX_BYTES: u64 = 16_000_000_000;
/// Touched whenever an entry is used; its modification time orders eviction.
const USED_MARKER: &str = "last-used";
/// Where an interrupted fine-tune can continue from.
const RESUME_FILE: &str = "resume.safetensors";
/// The small copy of the photo shown in listings.
const THUMBNAIL_FILE: &str = "photo.png";
/// Longest side of that copy.
const THUMBNAIL_SIDE: u32 = 256;
/// Prefix of the tensors in the resume file: trained values, optimizer state.
const RESUME_WEIGHTS: &str = "weights.";
const RESUME_OPTIMIZER: &str = "optimizer.";

#[derive(Debug, Clone)]
pub struct SnapshotCache {
    dir: PathBuf,
    max_bytes: u64,
}

/// What `load` found.
#[derive(Debug)]
pub enum CacheLookup {
    Hit(Vec<Snapshot>),
    /// A fine-tune that was stopped: the snapshots it completed (the first of the ladder) and,
    /// when it was saved, where it can continue from.
    Partial {
        snapshots: Vec<Snapshot>,
        resume: Option<ResumePoint>,
    },
    Miss,
    /// A file was there but could not be trusted; the reason is for a warning.
    Damaged(String),
}

/// The saved state of a stopped fine-tune (see [`SnapshotCache::resume`]).
#[derive(Debug, Clone)]
pub struct ResumePoint {
    path: PathBuf,
    /// Whole steps done.
    pub steps: usize,
}

/// One cached fine-tune, for listing and eviction.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    pub key: String,
    pub dir: PathBuf,
    pub bytes: u64,
    pub last_used: SystemTime,
    /// A small copy of the photo, when the entry has one.
    pub thumbnail: Option<PathBuf>,
    /// Step counts of the snapshots it holds, ascending.
    pub snapshot_steps: Vec<usize>,
    /// Set when the fine-tune was stopped and can continue: its whole steps done.
    pub resumable_at: Option<usize>,
}

impl SnapshotCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    /// The same cache with another size cap.
    pub fn with_max_bytes(self, max_bytes: u64) -> Self {
        Self { max_bytes, ..self }
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// `<user cache folder>/unitune/snapshots` (e.g. `~/.cache/unitune/snapshots`).
    pub fn default_dir() -> Option<PathBuf> {
        dirs::cache_dir().map(|d| d.join("unitune").join("snapshots"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache key: model identity (its weights and compute precision), the photo's pixels
    /// at the working size, the recipe.
    pub fn key(model_identity: &str, photo: &RgbImage, settings: &TuneSettings) -> String {
        let mut hash = Sha256::new();
        hash.update(FORMAT_VERSION.as_bytes());
        hash.update([0]);
        hash.update(model_identity.as_bytes());
        hash.update([0]);
        hash.update(photo.width().to_le_bytes());
        hash.update(photo.height().to_le_bytes());
        hash.update(photo.as_raw());
        hash.update([0]);
        hash.update(recipe_text(settings).as_bytes());
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The folder of one entry.
    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The file of one snapshot of one entry.
    pub fn snapshot_path(&self, key: &str, steps: usize) -> PathBuf {
        self.entry_dir(key).join(format!("{steps}.safetensors"))
    }

    /// The snapshots stored under `key`, checked against `adapter` (names, shapes) and
    /// `settings` (the recipe and its snapshot steps). Small snapshots are read into memory
    /// (and checked to hold finite values); large ones are read when selected.
    ///
    /// The first snapshots of the ladder without the rest are a stopped fine-tune's
    /// (`Partial`); its resume point is offered when it comes after all of them.
    pub fn load(&self, key: &str, adapter: &Adapter, settings: &TuneSettings) -> CacheLookup {
        remove_stale_temporaries(&self.entry_dir(key));
        let mut snapshots = Vec::with_capacity(settings.snapshot_steps.len());
        for &steps in &settings.snapshot_steps {
            let path = self.snapshot_path(key, steps);
            if !path.exists() {
                break;
            }
            match read_snapshot(&path, key, steps, adapter, settings) {
                Ok(snapshot) => snapshots.push(snapshot),
                Err(reason) => {
                    return CacheLookup::Damaged(format!("{}: {reason}", path.display()));
                }
            }
        }
        if snapshots.len() == settings.snapshot_steps.len() {
            self.touch(key);
            return CacheLookup::Hit(snapshots);
        }
        let done = snapshots.last().map_or(0, |s| s.steps);
        let resume = self.resume_point(key).filter(|r| {
            // Every snapshot up to the resume point must be there, else the ladder would
            // keep a gap; then it is retrained from the start.
            let next_missing = settings.snapshot_steps[snapshots.len()];
            r.steps >= done && r.steps < next_missing
        });
        if snapshots.is_empty() && resume.is_none() {
            return CacheLookup::Miss;
        }
        self.touch(key);
        CacheLookup::Partial { snapshots, resume }
    }

    /// The resume file of `key` and its step, if there is one.
    fn resume_point(&self, key: &str) -> Option<ResumePoint> {
        let path = self.entry_dir(key).join(RESUME_FILE);
        let steps = MappedFile::open(&path)
            .ok()?
            .metadata()
            .ok()?
            .get("steps")?
            .parse()
            .ok()?;
        Some(ResumePoint { path, steps })
    }

    /// Saves where a stopped fine-tune stands: `adapter`'s values and `state`.
    pub fn store_resume(
        &self,
        key: &str,
        adapter: &Adapter,
        settings: &TuneSettings,
        state: &TrainingState,
    ) -> Result<PathBuf> {
        let entry = self.entry_dir(key);
        std::fs::create_dir_all(&entry)
            .map_err(|e| EngineError::Cache(format!("cannot write to {}: {e}", entry.display())))?;
        let mut metadata = entry_metadata(key, settings, state.steps);
        metadata.insert(
            "optimizer_steps".into(),
            state.optimizer.steps_taken.to_string(),
        );
        if let Some((scale, good_steps)) = state.loss_scale {
            metadata.insert("loss_scale".into(), format!("{scale:e}"));
            metadata.insert("loss_scale_good_steps".into(), good_steps.to_string());
        }
        let tensors: Vec<(String, candle_core::Tensor)> = adapter
            .named_values()
            .into_iter()
            .map(|(name, t)| (format!("{RESUME_WEIGHTS}{name}"), t))
            .chain(
                state
                    .optimizer
                    .tensors
                    .iter()
                    .map(|(name, t)| (format!("{RESUME_OPTIMIZER}{name}"), t.clone())),
            )
            .collect();
        let path = entry.join(RESUME_FILE);
        write_safetensors(&path, &tensors, &metadata)?;
        Ok(path)
    }

    /// Loads a resume point: writes its trained values into `adapter` and returns the state
    /// to continue from. An error means the file cannot be trusted (start again).
    pub fn resume(
        &self,
        key: &str,
        point: &ResumePoint,
        adapter: &Adapter,
        settings: &TuneSettings,
    ) -> Result<TrainingState> {
        let damaged =
            |reason: String| EngineError::Cache(format!("{}: {reason}", point.path.display()));
        let file = MappedFile::open(&point.path)?;
        let metadata = file.metadata()?;
        check_metadata(&metadata, key, point.steps, settings).map_err(damaged)?;
        let number = |name: &str| -> std::result::Result<f64, String> {
            metadata
                .get(name)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("its {name} is missing or not a number"))
        };
        let optimizer_steps = number("optimizer_steps").map_err(damaged)? as usize;
        let loss_scale = match metadata.contains_key("loss_scale") {
            true => Some((
                number("loss_scale").map_err(damaged)?,
                number("loss_scale_good_steps").map_err(damaged)? as usize,
            )),
            false => None,
        };
        let tensors = file.tensors()?;
        let mut weights = Vec::with_capacity(adapter.vars().len());
        for (name, var) in adapter.names().iter().zip(adapter.vars()) {
            let value = file
                .load(&tensors, &format!("{RESUME_WEIGHTS}{name}"))
                .map_err(|_| damaged(format!("it lacks {name}")))?;
            if value.dims() != var.dims() {
                return Err(damaged(format!(
                    "{name} has shape {:?}, expected {:?}",
                    value.dims(),
                    var.dims()
                )));
            }
            if !is_finite(&value)? {
                return Err(damaged(format!("{name} holds values that are not finite")));
            }
            weights.push(value);
        }
        let optimizer = tensors
            .names()
            .into_iter()
            .filter_map(|name| name.strip_prefix(RESUME_OPTIMIZER))
            .map(|name| {
                let value = file.load(&tensors, &format!("{RESUME_OPTIMIZER}{name}"))?;
                if !is_finite(&value)? {
                    return Err(damaged(format!(
                        "the optimizer's {name} holds values that are not finite"
                    )));
                }
                Ok((name.to_string(), value))
            })
            .collect::<Result<Vec<_>>>()?;
        adapter.load(&Snapshot::in_memory(point.steps, weights))?;
        adapter.mark_changed();
        Ok(TrainingState {
            steps: point.steps,
            optimizer: OptimizerState {
                steps_taken: optimizer_steps,
                tensors: optimizer,
            },
            loss_scale,
        })
    }

    /// Keeps a small copy of the photo in the entry, once (best effort: it only serves
    /// listings; the key already pins the photo, so an existing copy is the right one).
    pub fn store_thumbnail(&self, key: &str, photo: &RgbImage) {
        if self.entry_dir(key).join(THUMBNAIL_FILE).is_file() {
            return;
        }
        let (w, h) = photo.dimensions();
        let scale = (THUMBNAIL_SIDE as f64 / w.max(h).max(1) as f64).min(1.0);
        let (tw, th) = (
            ((w as f64 * scale).round() as u32).max(1),
            ((h as f64 * scale).round() as u32).max(1),
        );
        let thumbnail = crate::imaging::resize_rgb(photo, tw, th);
        let entry = self.entry_dir(key);
        let _ = std::fs::create_dir_all(&entry).and_then(|_| {
            let temp = tempfile::NamedTempFile::new_in(&entry)?;
            thumbnail
                .save_with_format(temp.path(), image::ImageFormat::Png)
                .map_err(std::io::Error::other)?;
            temp.persist(entry.join(THUMBNAIL_FILE))?;
            Ok(())
        });
    }

    /// The ladder is complete: the resume point is no longer needed.
    pub fn finish(&self, key: &str) {
        let _ = std::fs::remove_file(self.entry_dir(key).join(RESUME_FILE));
    }

    /// Writes the adapter's current values as snapshot `steps` of `key` (atomically, one tensor
    /// at a time) and returns the file.
    pub fn store(
        &self,
        key: &str,
        adapter: &Adapter,
        settings: &TuneSettings,
        steps: usize,
    ) -> Result<PathBuf> {
        let entry = self.entry_dir(key);
        std::fs::create_dir_all(&entry)
            .map_err(|e| EngineError::Cache(format!("cannot write to {}: {e}", entry.display())))?;
        let metadata = entry_metadata(key, settings, steps);
        let path = self.snapshot_path(key, steps);
        write_safetensors(&path, &adapter.named_values(), &metadata)?;
        self.touch(key);
        Ok(path)
    }

    /// Removes an entry.
    pub fn remove(&self, key: &str) -> Result<()> {
        let dir = self.entry_dir(key);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(EngineError::Cache(format!(
                "cannot remove {}: {e}",
                dir.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Removes every entry; returns how many entries and bytes were freed. Entries that
    /// cannot be removed are named in the error, after the others are gone.
    pub fn clear(&self) -> Result<(usize, u64)> {
        let mut freed = (0, 0);
        let mut failed = Vec::new();
        for entry in self.entries() {
            match self.remove(&entry.key) {
                Ok(()) => {
                    freed.0 += 1;
                    freed.1 += entry.bytes;
                }
                Err(e) => failed.push(e.to_string()),
            }
        }
        match failed.first() {
            None => Ok(freed),
            Some(first) => Err(EngineError::Cache(format!(
                "{} of the cache entries could not be removed ({first})",
                failed.len()
            ))),
        }
    }

    /// Marks an entry as just used.
    fn touch(&self, key: &str) {
        // Best effort: a read-only cache still serves hits, it just evicts in another order.
        let _ = std::fs::write(self.entry_dir(key).join(USED_MARKER), b"");
    }

    /// Every entry with its size, least recently used first.
    pub fn entries(&self) -> Vec<CacheEntry> {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut entries: Vec<CacheEntry> = read
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| {
                let dir = e.path();
                let files: Vec<_> = std::fs::read_dir(&dir)
                    .map(|r| r.flatten().collect())
                    .unwrap_or_default();
                let bytes = files
                    .iter()
                    .filter_map(|f| f.metadata().ok())
                    .map(|m| m.len())
                    .sum();
                let last_used = std::fs::metadata(dir.join(USED_MARKER))
                    .or_else(|_| std::fs::metadata(&dir))
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let mut snapshot_steps: Vec<usize> = files
                    .iter()
                    .filter_map(|f| {
                        f.file_name()
                            .to_str()?
                            .strip_suffix(".safetensors")?
                            .parse()
                            .ok()
                    })
                    .collect();
                snapshot_steps.sort_unstable();
                let key = e.file_name().to_string_lossy().into_owned();
                let thumbnail = Some(dir.join(THUMBNAIL_FILE)).filter(|p| p.is_file());
                CacheEntry {
                    resumable_at: self.resume_point(&key).map(|r| r.steps),
                    key,
                    dir,
                    bytes,
                    last_used,
                    thumbnail,
                    snapshot_steps,
                }
            })
            .collect();
        entries.sort_by_key(|e| e.last_used);
        entries
    }

    /// Removes the least recently used entries other than `keep` until the cache fits its
    /// cap; returns what was removed. An entry larger than the cap on its own stays.
    pub fn evict(&self, keep: &str) -> Vec<CacheEntry> {
        let entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        let mut removed = Vec::new();
        for entry in entries {
            if total <= self.max_bytes {
                break;
            }
            if entry.key == keep {
                continue;
            }
            if std::fs::remove_dir_all(&entry.dir).is_ok() {
                total -= entry.bytes;
                removed.push(entry);
            }
        }
        removed
    }
}

/// The recipe as it enters the key. The micro-batch size is not in it: it changes how the
/// batch is computed, not what it computes. Training without master weights is named only
/// when on, so the keys of every earlier recipe stay as they were.
fn recipe_text(settings: &TuneSettings) -> String {
    let mode = match settings.mode {
        super::TrainMode::Lora { rank } => format!("lora:{rank}"),
        other => other.name().to_string(),
    };
    let masters = if settings.optimizer.master_weights {
        ""
    } else {
        ";masters=off"
    };
    format!(
        "mode={mode};optimizer={};lr={:e};wd={:e};steps={:?};batch={};token={:?};seed={}{masters}",
        settings.optimizer.kind.as_str(),
        settings.optimizer.learning_rate,
        settings.optimizer.weight_decay,
        settings.snapshot_steps,
        settings.batch_size,
        settings.token,
        settings.seed,
    )
}

/// A file being written is modified all the time; one untouched for this long was left by a
/// program that was killed mid-write.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the temporary files of writes that never finished (a second Ctrl-C, a crash):
/// every file is written to a temporary name and renamed when whole, so these are never part
/// of an entry.
fn remove_stale_temporaries(entry: &Path) {
    let Ok(files) = std::fs::read_dir(entry) else {
        return;
    };
    for file in files.flatten() {
        let is_temporary = file.file_name().to_string_lossy().starts_with(".tmp");
        let stale = file
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_AFTER));
        if is_temporary && stale {
            let _ = std::fs::remove_file(file.path());
        }
    }
}

/// What every file of an entry says about itself.
fn entry_metadata(key: &str, settings: &TuneSettings, steps: usize) -> HashMap<String, String> {
    [
        ("unitune_key".to_string(), key.to_string()),
        ("recipe".to_string(), recipe_text(settings)),
        ("steps".to_string(), steps.to_string()),
    ]
    .into_iter()
    .collect()
}

/// Checks a file's [`entry_metadata`] against what it should be.
fn check_metadata(
    metadata: &HashMap<String, String>,
    key: &str,
    steps: usize,
    settings: &TuneSettings,
) -> std::result::Result<(), String> {
    if metadata.get("unitune_key").map(String::as_str) != Some(key)
        || metadata.get("steps") != Some(&steps.to_string())
    {
        return Err("it was written for another model, photo, recipe or step".into());
    }
    if metadata.get("recipe") != Some(&recipe_text(settings)) {
        return Err("its recipe does not match".into());
    }
    Ok(())
}

fn read_snapshot(
    path: &Path,
    key: &str,
    steps: usize,
    adapter: &Adapter,
    settings: &TuneSettings,
) -> std::result::Result<Snapshot, String> {
    let file = MappedFile::open(path).map_err(|e| e.to_string())?;
    let metadata = file.metadata().map_err(|e| e.to_string())?;
    check_metadata(&metadata, key, steps, settings)?;
    let tensors = file.tensors().map_err(|e| e.to_string())?;
    for (name, var) in adapter.names().iter().zip(adapter.vars()) {
        let view = tensors
            .tensor(name)
            .map_err(|_| format!("snapshot {steps} lacks {name}"))?;
        if view.shape() != var.dims() {
            return Err(format!(
                "{name} has shape {:?}, expected {:?}",
                view.shape(),
                var.dims()
            ));
        }
    }
    if adapter.parameter_bytes() > IN_MEMORY_LIMIT_BYTES {
        return Ok(Snapshot::in_file(
            steps,
            path.to_path_buf(),
            adapter.names().to_vec(),
        ));
    }
    let mut values = Vec::with_capacity(adapter.vars().len());
    for name in adapter.names() {
        let tensor = file.load(&tensors, name).map_err(|e| e.to_string())?;
        if !is_finite(&tensor).map_err(|e| e.to_string())? {
            return Err(format!("{name} holds values that are not finite"));
        }
        values.push(tensor);
    }
    Ok(Snapshot::in_memory(steps, values))
}
