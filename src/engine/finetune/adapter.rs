//! The trainable part of a UNet, shared by the UNet that trains and the UNet that samples.
//!
//! The trained weights are candle `Var`s. The training UNet reads them as variables (so
//! gradients reach them); the sampling UNet reads detached views of the same storage (so it
//! takes candle's fast fused kernels and records no graph). An optimizer step or a snapshot
//! switch writes into that storage in place and both UNets see it at once: switching
//! snapshots never reloads or copies the model.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;

use super::mode::TrainMode;
use crate::engine::error::{EngineError, Result};
use crate::engine::model::StableDiffusion;
use crate::engine::noise::NoiseSource;
use crate::engine::unet::UNet;

/// The trained tensors after some number of fine-tuning steps (only what training changes).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub steps: usize,
    /// Values in the adapter's variable order.
    pub tensors: Vec<Tensor>,
}

/// A copy in host memory: snapshots of a full fine-tune are whole UNets, and GPU memory is
/// for the model being trained.
fn host_copy(tensor: &Tensor) -> candle_core::Result<Tensor> {
    if tensor.device().is_cpu() {
        tensor.copy()
    } else {
        tensor.to_device(&candle_core::Device::Cpu)
    }
}

pub struct Adapter {
    mode: TrainMode,
    names: Vec<String>,
    vars: Vec<Var>,
    /// Snapshot 0: the values before training.
    base: Snapshot,
    training_unet: UNet,
}

impl Adapter {
    /// Makes `mode`'s weights of `model`'s UNet trainable and swaps in a sampling UNet that
    /// reads them. LoRA factors are initialised from `noise` (A) and zero (B), so the model is
    /// unchanged until it trains.
    pub fn attach(
        model: &mut StableDiffusion,
        mode: TrainMode,
        noise: &mut NoiseSource,
    ) -> Result<Self> {
        let weights = model.unet_weights();
        let mut sorted: Vec<&String> = weights.keys().collect();
        sorted.sort();
        let mut names = Vec::new();
        let mut vars = Vec::new();
        for name in sorted {
            let tensor = &weights[name];
            if mode.trains(name) {
                names.push(name.clone());
                // from_tensor copies: the loaded tensor stays untouched as snapshot 0.
                vars.push(Var::from_tensor(tensor)?);
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
                names.push(format!("{prefix}.lora_A.weight"));
                vars.push(Var::from_tensor(&a)?);
                names.push(format!("{prefix}.lora_B.weight"));
                vars.push(Var::from_tensor(&b)?);
            }
        }
        if vars.is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "training mode {mode} selects no weights of this UNet"
            )));
        }
        let base = Snapshot {
            steps: 0,
            tensors: vars
                .iter()
                .map(|v| host_copy(v.as_tensor()))
                .collect::<candle_core::Result<_>>()?,
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
        model.unet = UNet::new(&config, VarBuilder::from_tensors(sampling, dtype, &device))?;
        Ok(Self {
            mode,
            names,
            vars,
            base,
            training_unet,
        })
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

    /// Copies the current values.
    pub fn snapshot(&self, steps: usize) -> Result<Snapshot> {
        Ok(Snapshot {
            steps,
            tensors: self
                .vars
                .iter()
                .map(|v| host_copy(v.as_tensor()))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// The untrained values (snapshot 0).
    pub fn base(&self) -> &Snapshot {
        &self.base
    }

    /// Writes a snapshot's values into the shared weights (both UNets see them at once).
    pub fn load(&self, snapshot: &Snapshot) -> Result<()> {
        if snapshot.tensors.len() != self.vars.len() {
            return Err(EngineError::InvalidRequest(format!(
                "the snapshot holds {} tensors but this {} adapter has {}",
                snapshot.tensors.len(),
                self.mode,
                self.vars.len()
            )));
        }
        for ((var, value), name) in self.vars.iter().zip(&snapshot.tensors).zip(&self.names) {
            if var.shape() != value.shape() {
                return Err(EngineError::InvalidRequest(format!(
                    "snapshot tensor {name} has shape {:?}, expected {:?}",
                    value.dims(),
                    var.dims()
                )));
            }
            var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Snapshot values as named tensors, for saving.
    pub fn named(&self, snapshot: &Snapshot) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .cloned()
            .zip(snapshot.tensors.iter().cloned())
            .collect()
    }
}
