//! Fine-tuned snapshots on disk, so editing the same photo again never retrains.
//!
//! One folder per (model, precision, photo, recipe), named by the SHA-256 of all of them, with
//! one safetensors file per snapshot holding only what training changed, in the model's
//! compute precision. Each file is written as its snapshot is taken, streamed tensor by tensor
//! and atomically; a file that is damaged or does not match what it claims is ignored (and
//! rebuilt by the caller), never trusted. The folder's total size is capped: the least recently
//! used entries are removed first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use image::RgbImage;
use sha2::{Digest, Sha256};

use super::adapter::{Adapter, is_finite};
use super::snapshot::{IN_MEMORY_LIMIT_BYTES, MappedFile, Snapshot, write_safetensors};
use super::tune::TuneSettings;
use crate::engine::error::{EngineError, Result};

/// Bump when the file layout or the training code changes what a recipe produces.
const FORMAT_VERSION: &str = "2";
/// The default cap: room for a few full fine-tunes of SD 1.5 in f16 (6.9 GB each) or
/// hundreds of LoRA or cross-kv ones.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 30;
/// Touched whenever an entry is used; its modification time orders eviction.
const USED_MARKER: &str = "last-used";

#[derive(Debug, Clone)]
pub struct SnapshotCache {
    dir: PathBuf,
    max_bytes: u64,
}

/// What `load` found.
#[derive(Debug)]
pub enum CacheLookup {
    Hit(Vec<Snapshot>),
    Miss,
    /// A file was there but could not be trusted; the reason is for a warning.
    Damaged(String),
}

/// One cached fine-tune, for listing and eviction.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    pub key: String,
    pub dir: PathBuf,
    pub bytes: u64,
    pub last_used: SystemTime,
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
    pub fn load(&self, key: &str, adapter: &Adapter, settings: &TuneSettings) -> CacheLookup {
        let mut snapshots = Vec::with_capacity(settings.snapshot_steps.len());
        for &steps in &settings.snapshot_steps {
            let path = self.snapshot_path(key, steps);
            if !path.exists() {
                return CacheLookup::Miss;
            }
            match read_snapshot(&path, key, steps, adapter, settings) {
                Ok(snapshot) => snapshots.push(snapshot),
                Err(reason) => {
                    return CacheLookup::Damaged(format!("{}: {reason}", path.display()));
                }
            }
        }
        self.touch(key);
        CacheLookup::Hit(snapshots)
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
        let metadata: HashMap<String, String> = [
            ("unitune_key".to_string(), key.to_string()),
            ("recipe".to_string(), recipe_text(settings)),
            ("steps".to_string(), steps.to_string()),
        ]
        .into_iter()
        .collect();
        let path = self.snapshot_path(key, steps);
        write_safetensors(&path, &adapter.named_values(), &metadata)?;
        self.touch(key);
        Ok(path)
    }

    /// Removes an entry (best effort: what cannot be removed is evicted later).
    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_dir_all(self.entry_dir(key));
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
                CacheEntry {
                    key: e.file_name().to_string_lossy().into_owned(),
                    dir,
                    bytes,
                    last_used,
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
/// batch is computed, not what it computes.
fn recipe_text(settings: &TuneSettings) -> String {
    let mode = match settings.mode {
        super::TrainMode::Lora { rank } => format!("lora:{rank}"),
        other => other.name().to_string(),
    };
    format!(
        "mode={mode};optimizer={};lr={:e};wd={:e};steps={:?};batch={};token={:?};seed={}",
        settings.optimizer.kind.as_str(),
        settings.optimizer.learning_rate,
        settings.optimizer.weight_decay,
        settings.snapshot_steps,
        settings.batch_size,
        settings.token,
        settings.seed,
    )
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
    if metadata.get("unitune_key").map(String::as_str) != Some(key)
        || metadata.get("steps") != Some(&steps.to_string())
    {
        return Err("it was written for another model, photo, recipe or step".into());
    }
    if metadata.get("recipe") != Some(&recipe_text(settings)) {
        return Err("its recipe does not match".into());
    }
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
