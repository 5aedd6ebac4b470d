//! LoRA layers matched to a model's weights, and merged into them.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::kohya::{KohyaLayer, read_kohya_file, refused};
use super::{Component, LoraNames};
use crate::engine::error::{EngineError, Result};
use crate::engine::finite::all_finite;
use crate::model_files::LoraChoice;

/// One LoRA layer's change to one weight: `scale * up @ down`, reshaped to the weight.
#[derive(Debug, Clone)]
struct Factors {
    /// `[out, rank]`, f32 on the CPU.
    up: Tensor,
    /// `[rank, in * kh * kw]`, f32 on the CPU.
    down: Tensor,
    /// The LoRA's weight times alpha / rank.
    scale: f64,
}

/// Changes to weights by diffusers name (one model part), from every applied LoRA in order.
/// Cheap to clone (the factors are shared).
#[derive(Debug, Clone, Default)]
pub struct WeightDeltas {
    by_weight: Arc<HashMap<String, Vec<Factors>>>,
}

impl WeightDeltas {
    pub fn is_empty(&self) -> bool {
        self.by_weight.is_empty()
    }

    /// Number of weights changed.
    pub fn len(&self) -> usize {
        self.by_weight.len()
    }

    /// Whether the weight `name` is changed.
    pub fn touches(&self, name: &str) -> bool {
        self.by_weight.contains_key(name)
    }

    /// `weight` (named `name`) with the changes added, in its own dtype and device. The sum is
    /// taken in f32, so that a half-precision weight is rounded once.
    pub fn merged(&self, name: &str, weight: Tensor) -> Result<Tensor> {
        let Some(changes) = self.by_weight.get(name) else {
            return Ok(weight);
        };
        let mut sum = weight.to_dtype(DType::F32)?;
        for factors in changes {
            let delta = (factors.up.matmul(&factors.down)? * factors.scale)?
                .reshape(weight.shape())?
                .to_device(weight.device())?;
            sum = (sum + delta)?;
        }
        let merged = sum.to_dtype(weight.dtype())?;
        // A weight like `FILE:1e15` makes finite factors overflow: refused here, not as a
        // black image after the whole edit.
        if !all_finite(&merged)? {
            return Err(EngineError::InvalidRequest(format!(
                "the LoRAs, at the weights given, make {name} overflow to infinity; use a weight closer to 1 (LoRAs are applied at -2 to 2)"
            )));
        }
        Ok(merged)
    }

    /// Adds the changes to the weights `weights` holds (others are left alone: a caller may
    /// hold a few weights only).
    pub fn merge_into(&self, weights: &mut HashMap<String, Tensor>) -> Result<()> {
        for (name, weight) in weights.iter_mut() {
            if self.touches(name) {
                *weight = self.merged(name, weight.clone())?;
            }
        }
        Ok(())
    }
}

/// The LoRAs applied to a model: the changes to its UNet and to its text encoders.
#[derive(Debug, Clone, Default)]
pub struct AppliedLoras {
    pub unet: WeightDeltas,
    pub text_encoder: WeightDeltas,
    /// SDXL's second text encoder.
    pub second_text_encoder: WeightDeltas,
}

/// A model part's weights by diffusers name (only their shapes are used).
pub struct LoraTargets<'a> {
    pub unet: &'a HashMap<String, Tensor>,
    pub text_encoder: &'a HashMap<String, Tensor>,
    /// SDXL's second text encoder.
    pub second_text_encoder: Option<&'a HashMap<String, Tensor>>,
}

impl AppliedLoras {
    /// Reads each chosen file and matches its layers, named as `names` says, to the weights
    /// of `targets`. Refuses, naming a key or tensor, any layer the model lacks or whose
    /// shape does not fit.
    pub fn load(choices: &[LoraChoice], names: &LoraNames, targets: &LoraTargets) -> Result<Self> {
        let parts = [
            (Component::Unet, Some(targets.unet)),
            (Component::TextEncoder, Some(targets.text_encoder)),
            (Component::SecondTextEncoder, targets.second_text_encoder),
        ];
        // Every name a file may use, to (part, weight name, shape).
        let mut index: HashMap<String, (usize, String, Vec<usize>)> = HashMap::new();
        for (part, (component, weights)) in parts.iter().enumerate() {
            for (name, tensor) in weights.iter().flat_map(|w| w.iter()) {
                let Some(module) = name.strip_suffix(".weight") else {
                    continue;
                };
                for layer in names.accepted(*component, module) {
                    index.insert(layer, (part, name.clone(), tensor.dims().to_vec()));
                }
            }
        }
        let mut changes: [HashMap<String, Vec<Factors>>; 3] = Default::default();
        for choice in choices {
            let (layers, _) = read_kohya_file(&choice.path)?;
            for layer in layers {
                let Some((part, target, shape)) = index.get(&layer.name) else {
                    let why = names.other_family(&layer.name).unwrap_or(
                        "which this model does not have; it was made for another kind of model",
                    );
                    return Err(refused(
                        &choice.path,
                        format!("changes `{}`, {why}", layer.name),
                    ));
                };
                let factors = fit(&layer, target, shape, choice.weight)
                    .map_err(|problem| refused(&choice.path, problem))?;
                changes[*part]
                    .entry(target.clone())
                    .or_default()
                    .push(factors);
            }
        }
        let [unet, text_encoder, second_text_encoder] = changes.map(|by_weight| WeightDeltas {
            by_weight: Arc::new(by_weight),
        });
        Ok(Self {
            unet,
            text_encoder,
            second_text_encoder,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.unet.is_empty() && self.text_encoder.is_empty() && self.second_text_encoder.is_empty()
    }
}

/// A 1x1 convolution's `[a, b, 1, 1]` as the matrix `[a, b]` it is; other shapes as they are.
fn as_matrix_dims(dims: &[usize]) -> &[usize] {
    match dims {
        [_, _, 1, 1] => &dims[..2],
        _ => dims,
    }
}

/// Checks a layer's factors against the weight `target` of shape `shape` and flattens them to
/// matrices.
fn fit(
    layer: &KohyaLayer,
    target: &str,
    shape: &[usize],
    weight: f64,
) -> std::result::Result<Factors, String> {
    let (down, up) = (layer.down.dims(), layer.up.dims());
    let rank = layer.rank();
    let weight_dims = as_matrix_dims(shape);
    let down_dims = as_matrix_dims(down);
    let up_dims = as_matrix_dims(up);
    let fits = rank > 0
        && up_dims.len() == 2
        && up_dims[0] == shape[0]
        && up_dims[1] == rank
        && down_dims.len() == weight_dims.len()
        && down_dims[1..] == weight_dims[1..];
    if !fits {
        return Err(format!(
            "does not fit this model: {} (down {down:?}, up {up:?}) cannot change {target}, which has shape {shape:?}; the LoRA was made for another model family",
            layer.name
        ));
    }
    for (part, tensor) in [
        ("lora_down.weight", &layer.down),
        ("lora_up.weight", &layer.up),
    ] {
        if !all_finite(tensor).map_err(|e| e.to_string())? {
            return Err(format!(
                "holds values that are not numbers (NaN or infinity) in {}.{part}; the file is damaged: download or export it again",
                layer.name
            ));
        }
    }
    if let Some(alpha) = layer.alpha
        && !alpha.is_finite()
    {
        return Err(format!(
            "holds an alpha that is not a number ({alpha}) in {}.alpha; the file is damaged: download or export it again",
            layer.name
        ));
    }
    let inner: usize = shape[1..].iter().product();
    let flatten = |t: &Tensor, dims: (usize, usize)| t.reshape(dims).map_err(|e| e.to_string());
    Ok(Factors {
        up: flatten(&layer.up, (shape[0], rank))?,
        down: flatten(&layer.down, (rank, inner))?,
        scale: weight * layer.alpha.unwrap_or(rank as f64) / rank as f64,
    })
}
