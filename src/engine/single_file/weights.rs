//! Reading a component's tensors by diffusers name from a mapped safetensors file through a
//! [`Naming`]: each tensor is read from the map once and converted to the compute dtype once;
//! renaming costs nothing, a q/k/v part is a view of the fused tensor (one storage for the
//! three), a 1x1 convolution becomes a linear weight by a reshape. Every shape is checked
//! against what the engine's layer asks for, and a wrong or missing tensor is named as the
//! file names it.

use crate::engine::lora::WeightDeltas;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::names::{Naming, Source};
use crate::engine::config::UnetConfig;
use crate::engine::error::{EngineError, Result};
use crate::engine::unet::UNet;

/// One safetensors file with its header, mapped while something reads from it.
#[derive(Clone)]
pub struct WeightsFile {
    path: PathBuf,
    /// The mapping, alive only while a reader holds it ([`Self::map`]). A mapping kept for the
    /// model's lifetime (the UNet's file is, to read untrained weights back) keeps every page
    /// once read in the process's resident memory, a second copy of the weights beside the
    /// loaded tensors: 1.7 GB for SD 1.5's UNet in f16, 5 GB for SDXL's.
    mapped: Arc<Mutex<Weak<MmapedSafetensors>>>,
    shapes: Arc<HashMap<String, Vec<usize>>>,
    metadata: Arc<HashMap<String, String>>,
}

impl std::fmt::Debug for WeightsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightsFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl WeightsFile {
    /// Maps the file and reads its header (names, shapes, `__metadata__`).
    pub fn open(path: &Path) -> Result<Self> {
        let damaged = |reason: String| EngineError::Checkpoint {
            file: path.to_path_buf(),
            problem: format!("it cannot be read as a safetensors file ({reason})"),
        };
        // SAFETY: mapped read-only; the file is not modified while the model lives (a model
        // file rewritten underneath a running program is outside what we can defend).
        let mapped = unsafe { MmapedSafetensors::new(path) }.map_err(|e| damaged(e.to_string()))?;
        let shapes = mapped
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        let metadata = read_metadata(path).map_err(damaged)?;
        Ok(Self {
            path: path.to_path_buf(),
            mapped: Arc::new(Mutex::new(Weak::new())),
            shapes: Arc::new(shapes),
            metadata: Arc::new(metadata),
        })
    }

    /// The file mapped: the mapping a reader already holds, or a new one. Hold the result for
    /// a run of reads (one mapping and header parse for them all); the mapping goes when the
    /// last holder drops it.
    pub fn map(&self) -> candle_core::Result<Arc<MmapedSafetensors>> {
        let mut slot = self
            .mapped
            .lock()
            .map_err(|_| candle_core::Error::Msg("weights mapping poisoned".into()))?;
        if let Some(mapped) = slot.upgrade() {
            return Ok(mapped);
        }
        // SAFETY: as in `open`.
        let mapped = Arc::new(unsafe { MmapedSafetensors::new(&self.path) }?);
        *slot = Arc::downgrade(&mapped);
        Ok(mapped)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.shapes.keys().any(|name| name.starts_with(prefix))
    }

    /// The file's `__metadata__` strings.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// How many tensors have names starting with `prefix` and then a number: the count of
    /// consecutive indices 0, 1, ... for which `name(i)` exists.
    pub fn count(&self, name: impl Fn(usize) -> String) -> usize {
        (0..).take_while(|&i| self.contains(&name(i))).count()
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        self.map()?.load(name, device)
    }
}

/// The `__metadata__` of a safetensors file, read from its header only.
fn read_metadata(path: &Path) -> std::result::Result<HashMap<String, String>, String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    // The safetensors format caps the header at 100 MB.
    if len > 100_000_000 {
        return Err(format!("its header claims {len} bytes"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| e.to_string())?;
    Ok(json
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default())
}

/// One component's tensors in a file, by diffusers name.
#[derive(Debug, Clone)]
pub struct NamedWeights {
    pub(crate) file: WeightsFile,
    pub(crate) naming: Naming,
}

impl NamedWeights {
    pub fn new(file: WeightsFile, naming: Naming) -> Self {
        Self { file, naming }
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The file's name for the tensor the engine calls `name`, if the layout has one.
    pub fn file_name_of(&self, name: &str) -> Option<String> {
        self.naming.source(name).map(|s| s.name)
    }

    /// The shape the engine sees for `name` (after splitting or flattening), if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let source = self.naming.source(name)?;
        let mut dims = self.file.shape(&source.name)?.to_vec();
        if source.part.is_some() {
            *dims.first_mut()? /= 3;
        }
        if source.conv_1x1 && dims.len() == 4 {
            dims.truncate(2);
        }
        if source.transposed {
            dims.reverse();
        }
        Some(dims)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.naming
            .source(name)
            .is_some_and(|s| self.file.contains(&s.name))
    }

    fn locate(&self, name: &str) -> candle_core::Result<Source> {
        let source = self.naming.source(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("it has no place for the tensor {name}"))
        })?;
        if !self.file.contains(&source.name) {
            return Err(candle_core::Error::Msg(format!(
                "the tensor {} is missing",
                source.name
            )));
        }
        Ok(source)
    }

    /// Checks the file's shape of `source` against the `expected` shape the engine asks for.
    fn check_shape(&self, source: &Source, expected: &[usize]) -> candle_core::Result<()> {
        let found = self.file.shape(&source.name).unwrap_or_default();
        let mut wanted = expected.to_vec();
        if source.transposed {
            wanted.reverse();
        }
        if source.part.is_some()
            && let Some(rows) = wanted.first_mut()
        {
            *rows *= 3;
        }
        let flat_conv = source.conv_1x1 && found.len() == 4 && found[2..] == [1, 1];
        let ok = found == wanted.as_slice() || (flat_conv && found[..2] == wanted[..]);
        if ok {
            Ok(())
        } else {
            Err(candle_core::Error::Msg(format!(
                "the tensor {} has shape {found:?} where this architecture needs {wanted:?}",
                source.name
            )))
        }
    }

    /// The tensor the engine calls `name`, converted to `dtype` on `device`. `fused` keeps
    /// fused q/k/v tensors already read, so that their three parts share one storage.
    fn load(
        &self,
        name: &str,
        expected: Option<&Shape>,
        dtype: DType,
        device: &Device,
        fused: &Mutex<HashMap<String, Tensor>>,
    ) -> candle_core::Result<Tensor> {
        let source = self.locate(name)?;
        if let Some(expected) = expected {
            self.check_shape(&source, expected.dims())?;
        }
        let whole = match source.part {
            Some(_) => {
                let mut cache = fused
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("weights cache poisoned".into()))?;
                match cache.get(&source.name) {
                    Some(t) => t.clone(),
                    None => {
                        let t = self.file.load(&source.name, device)?.to_dtype(dtype)?;
                        cache.insert(source.name.clone(), t.clone());
                        t
                    }
                }
            }
            None => self.file.load(&source.name, device)?.to_dtype(dtype)?,
        };
        let mut tensor = match source.part {
            Some(part) => {
                let rows = whole.dim(0)? / 3;
                whole.narrow(0, part * rows, rows)?
            }
            None => whole,
        };
        if source.conv_1x1 && tensor.rank() == 4 {
            let (out, inp, _, _) = tensor.dims4()?;
            tensor = tensor.reshape((out, inp))?;
        }
        if source.transposed {
            tensor = tensor.t()?.contiguous()?;
        }
        Ok(tensor)
    }

    /// The named tensors in `dtype` on `device`.
    pub fn read(
        &self,
        names: &[String],
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let _held = self.file.map().map_err(|e| self.error(e))?;
        let fused = Mutex::new(HashMap::new());
        names
            .iter()
            .map(|name| {
                let t = self
                    .load(name, None, dtype, device, &fused)
                    .map_err(|e| self.error(e))?;
                Ok((name.clone(), t))
            })
            .collect()
    }

    /// The named tensor on the CPU in the file's own dtype (snapshot reads).
    pub fn read_host(&self, name: &str) -> Result<Tensor> {
        let source = self.locate(name).map_err(|e| self.error(e))?;
        // Held through the load below: one mapping for both.
        let mapped = self.file.map().map_err(|e| self.error(e))?;
        let dtype = mapped
            .get(&source.name)
            .map(|v| v.dtype())
            .map_err(|e| self.error(e))
            .and_then(|d| DType::try_from(d).map_err(|e| self.error(e)))?;
        let fused = Mutex::new(HashMap::new());
        self.load(name, None, dtype, &Device::Cpu, &fused)
            .map_err(|e| self.error(e))
    }

    /// A `VarBuilder` over these weights that checks each tensor's shape; with `record`, the
    /// tensors it hands out are kept by name (the UNet's, for fine-tuning).
    pub fn var_builder<'a>(
        &self,
        dtype: DType,
        device: &Device,
        record: Option<Arc<Mutex<HashMap<String, Tensor>>>>,
    ) -> VarBuilder<'a> {
        VarBuilder::from_backend(
            Box::new(Backend {
                weights: self.clone(),
                fused: Mutex::new(HashMap::new()),
                record,
                held: Mutex::new(None),
            }),
            dtype,
            device.clone(),
        )
    }

    /// A loading failure as one sentence naming the file.
    pub fn error(&self, error: impl std::fmt::Display) -> EngineError {
        EngineError::Checkpoint {
            file: self.path().to_path_buf(),
            problem: error.to_string(),
        }
    }
}

struct Backend {
    weights: NamedWeights,
    fused: Mutex<HashMap<String, Tensor>>,
    record: Option<Arc<Mutex<HashMap<String, Tensor>>>>,
    /// The file's mapping, from the first read until the builder is dropped.
    held: Mutex<Option<Arc<MmapedSafetensors>>>,
}

impl Backend {
    fn hold(&self) -> candle_core::Result<()> {
        let mut held = self
            .held
            .lock()
            .map_err(|_| candle_core::Error::Msg("weights mapping poisoned".into()))?;
        if held.is_none() {
            *held = Some(self.weights.file.map()?);
        }
        Ok(())
    }

    fn remember(&self, name: &str, t: &Tensor) {
        if let Some(record) = &self.record
            && let Ok(mut map) = record.lock()
        {
            map.insert(name.to_owned(), t.clone());
        }
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.hold()?;
        let t = self.weights.load(name, Some(&s), dtype, dev, &self.fused)?;
        self.remember(name, &t);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.hold()?;
        let t = self.weights.load(name, None, dtype, dev, &self.fused)?;
        self.remember(name, &t);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.contains(name)
    }
}

/// Where the UNet's untrained weights are read from by diffusers name: a diffusers
/// `unet/` weights file or a single-file checkpoint through its name map. The one place base
/// UNet values come from: loading ([`Self::build_unet`]) and fine-tuning putting trained
/// weights back ([`Self::read`]) both read through [`NamedWeights`]' one `load`.
#[derive(Debug, Clone)]
pub struct UnetWeightsSource {
    weights: NamedWeights,
    /// The applied LoRAs' changes, added to every tensor read back (none by default).
    deltas: WeightDeltas,
}

impl UnetWeightsSource {
    pub fn new(weights: NamedWeights) -> Self {
        Self {
            weights,
            deltas: WeightDeltas::default(),
        }
    }

    /// The same source with the applied LoRAs' changes added to what [`Self::read`] returns.
    pub fn with_deltas(self, deltas: WeightDeltas) -> Self {
        Self { deltas, ..self }
    }

    /// A diffusers `unet/diffusion_pytorch_model*.safetensors` file.
    pub fn diffusers_file(path: &Path) -> Result<Self> {
        Ok(Self::new(NamedWeights::new(
            WeightsFile::open(path)?,
            Naming::Diffusers {
                prefix: String::new(),
            },
        )))
    }

    /// Builds the UNet of `config` from these weights, checking every shape, and returns it
    /// with the tensors it holds by diffusers name (shared storage, not a copy).
    pub fn build_unet(
        &self,
        config: &UnetConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<(UNet, HashMap<String, Tensor>)> {
        let record = Arc::new(Mutex::new(HashMap::new()));
        let vb = self
            .weights
            .var_builder(dtype, device, Some(record.clone()));
        let unet = UNet::new(config, vb).map_err(|e| self.weights.error(e))?;
        let weights = record
            .lock()
            .map(|mut map| std::mem::take(&mut *map))
            .map_err(|_| self.weights.error("loading the UNet failed"))?;
        Ok((unet, weights))
    }

    /// The named tensors in `dtype` on `device`, with the applied LoRAs' changes.
    pub fn read(
        &self,
        names: &[String],
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let mut weights = self.weights.read(names, dtype, device)?;
        self.deltas.merge_into(&mut weights)?;
        Ok(weights)
    }

    /// One tensor on the CPU in the file's dtype, with the applied LoRAs' changes.
    pub fn read_host(&self, name: &str) -> Result<Tensor> {
        self.deltas.merged(name, self.weights.read_host(name)?)
    }

    /// The file the weights are read from.
    pub fn file(&self) -> &Path {
        self.weights.path()
    }

    pub fn weights(&self) -> &NamedWeights {
        &self.weights
    }
}
