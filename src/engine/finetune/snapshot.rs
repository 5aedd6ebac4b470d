//! The trained tensors after some number of fine-tuning steps, in memory or in a file.
//!
//! A full fine-tune's snapshot is a whole UNet (1.7 GB in f16 for SD 1.5), so large snapshots
//! live on disk and are read back tensor by tensor when selected; small ones (cross-kv, LoRA)
//! stay in memory too.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

use super::adapter::new_snapshot_id;
use crate::engine::error::{EngineError, Result};
use crate::engine::single_file::UnetWeightsSource;

/// Snapshots up to this size are also kept in host memory, so switching to them reads nothing.
pub const IN_MEMORY_LIMIT_BYTES: usize = 512 << 20;

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub steps: usize,
    /// Names these values (a clone is the same values), so that loading the snapshot the
    /// variables already hold can be skipped.
    id: u64,
    data: Data,
}

#[derive(Debug, Clone)]
enum Data {
    /// Host tensors in the adapter's variable order.
    Memory(Vec<Tensor>),
    /// Tensors named `keys[i]` (in variable order) in a safetensors file.
    File { path: PathBuf, keys: Vec<String> },
    /// The model's own UNet weights named `keys[i]` (diffusers names), read through the
    /// model's weights source (a diffusers file or a single-file checkpoint).
    Base {
        source: UnetWeightsSource,
        keys: Vec<String>,
    },
}

impl Snapshot {
    pub fn in_memory(steps: usize, tensors: Vec<Tensor>) -> Self {
        Self {
            steps,
            id: new_snapshot_id(),
            data: Data::Memory(tensors),
        }
    }

    pub fn in_file(steps: usize, path: PathBuf, keys: Vec<String>) -> Self {
        Self {
            steps,
            id: new_snapshot_id(),
            data: Data::File { path, keys },
        }
    }

    /// The untrained values of the model's UNet weights `keys`, read from `source` when
    /// selected.
    pub fn in_unet_source(steps: usize, source: UnetWeightsSource, keys: Vec<String>) -> Self {
        Self {
            steps,
            id: new_snapshot_id(),
            data: Data::Base { source, keys },
        }
    }

    pub(super) fn id(&self) -> u64 {
        self.id
    }

    /// The file the snapshot is read from, if it lives on disk only.
    pub fn file(&self) -> Option<&Path> {
        match &self.data {
            Data::File { path, .. } => Some(path),
            Data::Base { source, .. } => Some(source.file()),
            Data::Memory(_) => None,
        }
    }

    /// Calls `f(i, tensor)` for each tensor in variable order (host tensors; from a file one at
    /// a time, so a whole UNet is never in memory twice).
    pub fn for_each(&self, mut f: impl FnMut(usize, &Tensor) -> Result<()>) -> Result<()> {
        match &self.data {
            Data::Memory(tensors) => tensors.iter().enumerate().try_for_each(|(i, t)| f(i, t)),
            Data::File { path, keys } => {
                let file = MappedFile::open(path)?;
                let tensors = file.tensors()?;
                for (i, key) in keys.iter().enumerate() {
                    f(i, &file.load(&tensors, key)?)?;
                }
                Ok(())
            }
            Data::Base { source, keys } => {
                // One mapping for the whole read, dropped after it.
                let _held = source.weights().file.map()?;
                keys.iter()
                    .enumerate()
                    .try_for_each(|(i, key)| f(i, &source.read_host(key)?))
            }
        }
    }

    /// All tensors in host memory (reads the file if it lives on disk).
    pub fn tensors(&self) -> Result<Vec<Tensor>> {
        let mut all = Vec::new();
        self.for_each(|_, t| {
            all.push(t.clone());
            Ok(())
        })?;
        Ok(all)
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::Memory(tensors) => tensors.len(),
            Data::File { keys, .. } | Data::Base { keys, .. } => keys.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A read-only mapped safetensors file.
pub(crate) struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self> {
        let damaged = |reason: String| EngineError::Cache(format!("{}: {reason}", path.display()));
        let file = File::open(path).map_err(|e| damaged(e.to_string()))?;
        // SAFETY: mapped read-only; the file is ours (written atomically, never modified in
        // place). Another program truncating it under us is outside what we can defend.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| damaged(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
        })
    }

    fn damaged(&self, reason: impl std::fmt::Display) -> EngineError {
        EngineError::Cache(format!("{} is damaged ({reason})", self.path.display()))
    }

    /// The parsed file: checks that the header is valid and every tensor lies inside the file.
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map).map_err(|e| self.damaged(e))
    }

    /// The `__metadata__` strings.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, header) = SafeTensors::read_metadata(&self.map).map_err(|e| self.damaged(e))?;
        Ok(header.metadata().clone().unwrap_or_default())
    }

    /// One tensor on the CPU.
    pub fn load(&self, tensors: &SafeTensors<'_>, key: &str) -> Result<Tensor> {
        let view = tensors.tensor(key).map_err(|e| self.damaged(e))?;
        candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| self.damaged(e))
    }
}

fn safetensors_dtype(dtype: DType) -> Result<Dtype> {
    Ok(match dtype {
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        other => {
            return Err(EngineError::InvalidRequest(format!(
                "cannot store {other:?} tensors"
            )));
        }
    })
}

fn tensor_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    fn le<T: Copy>(values: Vec<T>, to_bytes: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
        values.into_iter().flat_map(to_bytes).collect()
    }
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F16 => le(t.to_vec1::<half::f16>()?, |v| v.to_le_bytes().to_vec()),
        DType::BF16 => le(t.to_vec1::<half::bf16>()?, |v| v.to_le_bytes().to_vec()),
        DType::F32 => le(t.to_vec1::<f32>()?, |v| v.to_le_bytes().to_vec()),
        DType::F64 => le(t.to_vec1::<f64>()?, |v| v.to_le_bytes().to_vec()),
        other => candle_core::bail!("cannot store {other:?} tensors"),
    })
}

/// Writes `(name, tensor)` pairs as a safetensors file at `path`, atomically, streaming one
/// tensor at a time from its device (the safetensors crate's writer takes its bytes through
/// an infallible `View::data`, which cannot report a failed device copy; so the few lines of
/// the format are written here).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let io =
        |e: std::io::Error| EngineError::Cache(format!("cannot write to {}: {e}", dir.display()));
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(metadata).unwrap_or_default(),
    );
    let mut offset = 0usize;
    for (name, t) in tensors {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": safetensors_dtype(t.dtype())?,
                "shape": t.dims(),
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| EngineError::Cache(e.to_string()))?;
    // The format pads the header with spaces to a multiple of 8 bytes.
    header.resize(header.len().next_multiple_of(8), b' ');

    let temp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let mut out = BufWriter::new(temp.as_file());
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&header).map_err(io)?;
    for (_, t) in tensors {
        out.write_all(&tensor_bytes(t)?).map_err(io)?;
    }
    out.flush().map_err(io)?;
    drop(out);
    temp.as_file().sync_all().map_err(io)?;
    temp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_read_back_exactly_in_every_dtype() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let base = Tensor::new(&[[1.5f32, -2.25, 3.0], [0.0, 1e-3, -7.0]], &Device::Cpu)?;
        let tensors: Vec<(String, Tensor)> = [DType::F16, DType::BF16, DType::F32, DType::F64]
            .iter()
            .map(|&d| (format!("{d:?}"), base.to_dtype(d).unwrap()))
            .collect();
        let metadata = HashMap::from([("k".to_string(), "v".to_string())]);
        write_safetensors(&path, &tensors, &metadata)?;
        let file = MappedFile::open(&path)?;
        assert_eq!(file.metadata()?, metadata);
        let parsed = file.tensors()?;
        for (name, t) in &tensors {
            let back = file.load(&parsed, name)?;
            assert_eq!(back.dtype(), t.dtype());
            assert_eq!(
                back.to_dtype(DType::F64)?.to_vec2::<f64>()?,
                t.to_dtype(DType::F64)?.to_vec2::<f64>()?
            );
        }
        // candle's own reader agrees.
        assert_eq!(
            candle_core::safetensors::load(&path, &Device::Cpu)?.len(),
            4
        );
        Ok(())
    }
}
