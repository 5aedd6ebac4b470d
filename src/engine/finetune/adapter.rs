//! The trainable part of a UNet, shared by the UNet that trains and the UNet that samples.
//!
//! The trained weights are candle `Var`s and replace the loaded tensors (one copy of the
//! weights, not two). The training UNet reads them as variables (so gradients reach them); the
//! sampling UNet reads detached views of the same storage (so it takes candle's fast fused
//! kernels and records no graph). An optimizer step or a snapshot switch writes into that
//! storage in place and both UNets see it at once: switching snapshots never reloads or
//! copies the model. The untrained values (snapshot 0) are read back from the model's file
//! when needed instead of being kept.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Tensor, Var};
use candle_nn::VarBuilder;

use super::mode::TrainMode;
use super::snapshot::Snapshot;
use crate::engine::error::{EngineError, Result};
use crate::engine::model::StableDiffusion;
use crate::engine::noise::NoiseSource;
use crate::engine::unet::UNet;

/// What the variables hold now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loaded {
    /// The snapshot with this identity.
    Snapshot(u64),
    /// Values no snapshot holds (training has moved them).
    Other,
}

pub struct Adapter {
    mode: TrainMode,
    names: Vec<String>,
    vars: Vec<Var>,
    /// Snapshot 0: the values before training.
    base: Snapshot,
    training_unet: UNet,
    loaded: Mutex<Loaded>,
}

/// Identities of snapshots' contents, so that loading the one already loaded costs nothing.
static NEXT_SNAPSHOT_ID: AtomicU64 = AtomicU64::new(1);

pub(super) fn new_snapshot_id() -> u64 {
    NEXT_SNAPSHOT_ID.fetch_add(1, Ordering::Relaxed)
}

impl Adapter {
    /// Makes `mode`'s weights of `model`'s UNet trainable and swaps in a sampling UNet that
    /// reads them. LoRA factors are initialised from `noise` (A) and zero (B), so the model is
    /// unchanged until it trains. Weights an earlier fine-tune trained go back to the values
    /// in the model's file first.
    pub fn attach(
        model: &mut StableDiffusion,
        mode: TrainMode,
        noise: &mut NoiseSource,
    ) -> Result<Self> {
        let mut weights = model.unet_weights().clone();
        // Weights an earlier fine-tune trained are variables. Those this mode trains again
        // keep their variable (no copy) and get the file's values below; the others go back
        // to plain tensors read from the file.
        let mut restore: Vec<String> = weights
            .iter()
            .filter(|(name, t)| t.is_variable() && !mode.trains(name))
            .map(|(name, _)| name.clone())
            .collect();
        restore.sort();
        if !restore.is_empty() {
            weights.extend(model.read_unet_weights(&restore)?);
        }
        let reused = weights
            .iter()
            .any(|(name, t)| t.is_variable() && mode.trains(name));

        let mut sorted: Vec<String> = weights.keys().cloned().collect();
        sorted.sort();
        let mut names = Vec::new();
        let mut vars = Vec::new();
        let mut lora_init = Vec::new();
        for name in &sorted {
            let tensor = weights[name].clone();
            if mode.trains(name) {
                // The variable replaces the loaded tensor, which is dropped once the UNets
                // are rebuilt below: the weights exist once. (An earlier fine-tune's variable
                // is taken as it is.)
                let var = Var::from_tensor(&tensor)?;
                weights.insert(name.clone(), var.as_tensor().clone());
                names.push(name.clone());
                vars.push(var);
            }
            if let TrainMode::Lora { rank } = mode
                && mode.adapts(name)
            {
                let (out_dim, in_dim) = tensor.dims2()?;
                if rank == 0 || rank > in_dim.min(out_dim) {
                    return Err(EngineError::InvalidRequest(format!(
                        "LoRA rank {rank} must be between 1 and {}",
                        in_dim.min(out_dim)
                    )));
                }
                let prefix = name.trim_end_matches(".weight");
                // PEFT's default: A random with variance 1/in, B zero.
                let a = (noise.normal((rank, in_dim), tensor.device())? / (in_dim as f64).sqrt())?
                    .to_dtype(tensor.dtype())?;
                let b = Tensor::zeros((out_dim, rank), tensor.dtype(), tensor.device())?;
                for (factor, value) in [("lora_A", a), ("lora_B", b)] {
                    names.push(format!("{prefix}.{factor}.weight"));
                    lora_init.push(value.to_device(&candle_core::Device::Cpu)?);
                    vars.push(Var::from_tensor(&value)?);
                }
            }
        }
        if vars.is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "training mode {mode} selects no weights of this UNet"
            )));
        }
        // LoRA trains new factors (small: kept); every other mode trains loaded weights,
        // whose untrained values the model file holds (plus the LoRAs applied at load).
        let base = if matches!(mode, TrainMode::Lora { .. }) {
            Snapshot::in_memory(0, lora_init)
        } else {
            Snapshot::in_unet_source(0, model.unet_source().clone(), names.clone())
        };

        let dtype = model.dtype();
        let device = model.device().clone();
        let with = |view: &dyn Fn(&Var) -> Tensor| -> HashMap<String, Tensor> {
            let mut map = weights.clone();
            for (name, var) in names.iter().zip(&vars) {
                map.insert(name.clone(), view(var));
            }
            map
        };
        let training = with(&|v: &Var| v.as_tensor().clone());
        let sampling = with(&|v: &Var| v.as_tensor().detach());
        let config = model.unet.config().clone();
        let training_unet = UNet::new(&config, VarBuilder::from_tensors(training, dtype, &device))?;
        let sampling_unet = UNet::new(&config, VarBuilder::from_tensors(sampling, dtype, &device))?;
        // The model keeps its own names only (LoRA factors live in the UNets), with the trained
        // ones as variables so that the next attach knows to restore them.
        model.set_unet(weights, sampling_unet);
        let adapter = Self {
            mode,
            names,
            vars,
            base,
            training_unet,
            loaded: Mutex::new(Loaded::Other),
        };
        if reused {
            adapter.load(&adapter.base)?;
        }
        adapter.set_loaded(Loaded::Snapshot(adapter.base.id()));
        Ok(adapter)
    }

    pub fn mode(&self) -> TrainMode {
        self.mode
    }

    /// The trainable variables, in a fixed order (sorted by name, LoRA A before B).
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The UNet whose trainable weights record gradients.
    pub fn training_unet(&self) -> &UNet {
        &self.training_unet
    }

    /// Number of trained values.
    pub fn parameter_count(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Bytes of the trained values in their dtype (the size of one snapshot).
    pub fn parameter_bytes(&self) -> usize {
        self.vars
            .iter()
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }

    fn set_loaded(&self, loaded: Loaded) {
        if let Ok(mut slot) = self.loaded.lock() {
            *slot = loaded;
        }
    }

    /// Training is about to change the values.
    pub(super) fn mark_changed(&self) {
        self.set_loaded(Loaded::Other);
    }

    /// A copy of the current values in host memory.
    pub fn snapshot(&self, steps: usize) -> Result<Snapshot> {
        let tensors = self
            .vars
            .iter()
            .map(|v| v.as_tensor().to_device(&candle_core::Device::Cpu)?.copy())
            .collect::<candle_core::Result<_>>()?;
        let snapshot = Snapshot::in_memory(steps, tensors);
        self.set_loaded(Loaded::Snapshot(snapshot.id()));
        Ok(snapshot)
    }

    /// The current values by name, on their device, for writing to a file.
    pub fn named_values(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .cloned()
            .zip(self.vars.iter().map(|v| v.as_tensor().detach()))
            .collect()
    }

    /// The untrained values (snapshot 0).
    pub fn base(&self) -> &Snapshot {
        &self.base
    }

    /// A snapshot of the values just stored at `path` (see [`Snapshot::in_file`]), which the
    /// variables hold now.
    pub fn stored_snapshot(&self, steps: usize, path: std::path::PathBuf) -> Snapshot {
        let snapshot = Snapshot::in_file(steps, path, self.names.clone());
        self.set_loaded(Loaded::Snapshot(snapshot.id()));
        snapshot
    }

    /// Writes a snapshot's values into the shared weights (both UNets see them at once).
    /// Loading the snapshot that is already loaded does nothing.
    pub fn load(&self, snapshot: &Snapshot) -> Result<()> {
        if self
            .loaded
            .lock()
            .is_ok_and(|l| *l == Loaded::Snapshot(snapshot.id()))
        {
            return Ok(());
        }
        if snapshot.len() != self.vars.len() {
            return Err(EngineError::InvalidRequest(format!(
                "the snapshot holds {} tensors but this {} adapter has {}",
                snapshot.len(),
                self.mode,
                self.vars.len()
            )));
        }
        // Whatever happens below, the values may be a mix: not the snapshot's.
        self.set_loaded(Loaded::Other);
        let from_file = snapshot.file().is_some();
        snapshot.for_each(|i, value| {
            let (var, name) = (&self.vars[i], &self.names[i]);
            if var.shape() != value.shape() {
                return Err(EngineError::InvalidRequest(format!(
                    "snapshot tensor {name} has shape {:?}, expected {:?}",
                    value.dims(),
                    var.dims()
                )));
            }
            if from_file && !is_finite(value)? {
                return Err(EngineError::Cache(format!(
                    "{name} in {} holds values that are not finite; the file is damaged",
                    snapshot
                        .file()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )));
            }
            var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)?;
            Ok(())
        })?;
        self.set_loaded(Loaded::Snapshot(snapshot.id()));
        Ok(())
    }
}

/// True when every value of `t` is finite.
pub(crate) fn is_finite(t: &Tensor) -> Result<bool> {
    Ok(t.to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()?
        .is_finite())
}
