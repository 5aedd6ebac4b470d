//! Fine-tuned snapshots on disk, so editing the same photo again never retrains.
//!
//! One safetensors file per (model, photo, recipe), named by the SHA-256 of all three, holding
//! only what training changed (the trained tensors or the LoRA factors) for every snapshot.
//! Files are written atomically; a file that is damaged or does not match what it claims is
//! ignored (and rebuilt by the caller), never trusted.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use sha2::{Digest, Sha256};

use super::adapter::{Adapter, Snapshot};
use super::tune::TuneSettings;
use crate::engine::error::{EngineError, Result};

/// Bump when the file layout or the training code changes what a recipe produces.
const FORMAT_VERSION: &str = "1";

#[derive(Debug, Clone)]
pub struct SnapshotCache {
    dir: PathBuf,
}

/// What `load` found.
#[derive(Debug)]
pub enum CacheLookup {
    Hit(Vec<Snapshot>),
    Miss,
    /// A file was there but could not be trusted; the reason is for a warning.
    Damaged(String),
}

impl SnapshotCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `<user cache folder>/unitune/snapshots` (e.g. `~/.cache/unitune/snapshots`).
    pub fn default_dir() -> Option<PathBuf> {
        dirs::cache_dir().map(|d| d.join("unitune").join("snapshots"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache key: model identity, the photo's pixels at the working size, the recipe.
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

    pub fn path_for(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.safetensors"))
    }

    /// The snapshots stored under `key`, checked against `adapter` (names, shapes) and
    /// `settings` (the snapshot steps).
    pub fn load(&self, key: &str, adapter: &Adapter, settings: &TuneSettings) -> CacheLookup {
        let path = self.path_for(key);
        if !path.exists() {
            return CacheLookup::Miss;
        }
        match read_entry(&path, adapter, settings, key) {
            Ok(snapshots) => CacheLookup::Hit(snapshots),
            Err(reason) => CacheLookup::Damaged(format!("{}: {reason}", path.display())),
        }
    }

    /// Stores the snapshots under `key` atomically; returns the file.
    pub fn store(
        &self,
        key: &str,
        adapter: &Adapter,
        settings: &TuneSettings,
        snapshots: &[Snapshot],
    ) -> Result<PathBuf> {
        let io = |e: std::io::Error| {
            EngineError::Cache(format!("cannot write to {}: {e}", self.dir.display()))
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for snapshot in snapshots {
            for (name, tensor) in adapter.named(snapshot) {
                tensors.push((
                    format!("{}/{name}", snapshot.steps),
                    tensor.to_device(&Device::Cpu)?,
                ));
            }
        }
        let metadata: HashMap<String, String> = [
            ("unitune_key".to_string(), key.to_string()),
            ("recipe".to_string(), recipe_text(settings)),
            (
                "steps".to_string(),
                snapshots
                    .iter()
                    .map(|s| s.steps.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ]
        .into_iter()
        .collect();
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .map_err(|e| EngineError::Cache(format!("cannot serialise snapshots: {e}")))?;
        let path = self.path_for(key);
        let mut file = tempfile::NamedTempFile::new_in(&self.dir).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.as_file().sync_all().map_err(io)?;
        file.persist(&path).map_err(|e| io(e.error))?;
        Ok(path)
    }
}

fn recipe_text(settings: &TuneSettings) -> String {
    let mode = match settings.mode {
        super::TrainMode::Lora { rank } => format!("lora:{rank}"),
        other => other.name().to_string(),
    };
    format!(
        "mode={mode};optimizer={};lr={:e};wd={:e};steps={:?};batch={};micro={};token={:?};seed={}",
        settings.optimizer.kind.as_str(),
        settings.optimizer.learning_rate,
        settings.optimizer.weight_decay,
        settings.snapshot_steps,
        settings.batch_size,
        settings.micro_batch_size,
        settings.token,
        settings.seed,
    )
}

fn read_entry(
    path: &Path,
    adapter: &Adapter,
    settings: &TuneSettings,
    key: &str,
) -> std::result::Result<Vec<Snapshot>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("not a valid safetensors file ({e})"))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    if metadata.get("unitune_key").map(String::as_str) != Some(key) {
        return Err("it was written for another model, photo or recipe".into());
    }
    if metadata.get("recipe") != Some(&recipe_text(settings)) {
        return Err("its recipe does not match".into());
    }
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| e.to_string())?;
    let mut snapshots = Vec::with_capacity(settings.snapshot_steps.len());
    for &steps in &settings.snapshot_steps {
        let mut values = Vec::with_capacity(adapter.vars().len());
        for (name, var) in adapter.names().iter().zip(adapter.vars()) {
            let tensor = tensors
                .get(&format!("{steps}/{name}"))
                .ok_or_else(|| format!("snapshot {steps} lacks {name}"))?;
            if tensor.shape() != var.shape() {
                return Err(format!(
                    "{name} has shape {:?}, expected {:?}",
                    tensor.dims(),
                    var.dims()
                ));
            }
            let finite = tensor
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.sqr()?.sum_all()?.to_scalar::<f32>())
                .map_err(|e| e.to_string())?
                .is_finite();
            if !finite {
                return Err(format!("{name} holds values that are not finite"));
            }
            values.push(tensor.to_dtype(var.dtype()).map_err(|e| e.to_string())?);
        }
        snapshots.push(Snapshot {
            steps,
            tensors: values,
        });
    }
    Ok(snapshots)
}
