//! Reading and writing kohya-format LoRA files (tensor names and layout only; what the
//! layers adapt is worked out against a model in `deltas`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::engine::error::{EngineError, Result};
use crate::engine::finetune::write_safetensors;

const DOWN: &str = "lora_down.weight";
const UP: &str = "lora_up.weight";
const ALPHA: &str = "alpha";

/// One adapted layer as a file holds it.
#[derive(Debug, Clone)]
pub struct KohyaLayer {
    /// The kohya name, e.g. `lora_unet_mid_block_attentions_0_proj_in`.
    pub name: String,
    pub down: Tensor,
    pub up: Tensor,
    /// `None` when the file has no alpha (then alpha = rank: scale 1).
    pub alpha: Option<f64>,
}

impl KohyaLayer {
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }
}

/// The error for a file that is not a LoRA unitune can apply.
pub(super) fn refused(path: &Path, problem: impl Into<String>) -> EngineError {
    EngineError::Lora {
        file: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Why a key that is not plain LoRA cannot be applied.
fn unsupported_key(key: &str) -> String {
    let kind = if key.contains("dora_scale") {
        "a DoRA tensor"
    } else if [
        "hada_", "lokr_", "lora_mid", ".diff", "diff_b", ".w_norm", ".b_norm",
    ]
    .iter()
    .any(|k| key.contains(k))
    {
        "a LyCORIS (LoHa, LoKr, LoCon with a middle factor, or full-difference) tensor"
    } else {
        "not a plain LoRA tensor"
    };
    format!(
        "has the key `{key}`, which is {kind}; unitune applies plain kohya LoRAs (lora_down, lora_up and alpha per layer) only"
    )
}

/// A layer's tensors as they are found: down, up, alpha.
type Parts = (Option<Tensor>, Option<Tensor>, Option<f64>);

/// Reads a kohya-format LoRA file: its layers (factors on the CPU in f32) and metadata.
/// Pickle files are refused without being read: loading them can run code.
pub fn read_kohya_file(path: &Path) -> Result<(Vec<KohyaLayer>, HashMap<String, String>)> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if matches!(extension.as_str(), "ckpt" | "pt" | "pth" | "bin" | "pkl") {
        return Err(refused(
            path,
            "is a pickle file, which can run code when loaded; use the .safetensors version of the LoRA",
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| refused(path, format!("cannot be read ({e})")))?;
    let not_safetensors =
        |e: safetensors::SafeTensorError| refused(path, format!("is not a safetensors file ({e})"));
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(not_safetensors)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = SafeTensors::deserialize(&bytes).map_err(not_safetensors)?;

    // Grouped by layer name, in name order (the order layers apply in does not matter; a
    // fixed one keeps results bit-identical run to run).
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    let mut names = tensors.names();
    names.sort();
    for key in names {
        let (layer, suffix) = key.split_once('.').unwrap_or((key, ""));
        let prefixes = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"];
        if !prefixes.iter().any(|p| layer.starts_with(p)) || ![DOWN, UP, ALPHA].contains(&suffix) {
            return Err(refused(path, unsupported_key(key)));
        }
        let view = tensors
            .tensor(key)
            .map_err(|e| refused(path, format!("is damaged ({e})")))?;
        let tensor = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| refused(path, format!("has an unreadable tensor {key} ({e})")))?;
        let entry = parts.entry(layer.to_string()).or_default();
        match suffix {
            DOWN => entry.0 = Some(tensor),
            UP => entry.1 = Some(tensor),
            _ => {
                let alpha = match tensor.elem_count() {
                    1 => tensor.flatten_all()?.to_vec1::<f32>()?[0] as f64,
                    _ => {
                        return Err(refused(
                            path,
                            format!("has an alpha {key} that is not one number"),
                        ));
                    }
                };
                if !alpha.is_finite() {
                    return Err(refused(
                        path,
                        format!("has an alpha {key} that is not finite"),
                    ));
                }
                entry.2 = Some(alpha);
            }
        }
    }
    let mut layers = Vec::with_capacity(parts.len());
    for (name, (down, up, alpha)) in parts {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(refused(
                path,
                format!(
                    "lacks {name}.lora_down.weight or {name}.lora_up.weight (each layer needs both)"
                ),
            ));
        };
        layers.push(KohyaLayer {
            name,
            down,
            up,
            alpha,
        });
    }
    if layers.is_empty() {
        return Err(refused(path, "holds no LoRA layers"));
    }
    Ok((layers, metadata))
}

/// Writes `layers` as a kohya-format file at `path`, atomically (a temporary file renamed
/// when whole): `.lora_down.weight`, `.lora_up.weight` and `.alpha` (in the factors' dtype,
/// as kohya's scripts save it) per layer.
pub fn write_kohya_file(
    path: &Path,
    layers: &[KohyaLayer],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let mut tensors = Vec::with_capacity(layers.len() * 3);
    for layer in layers {
        tensors.push((format!("{}.{DOWN}", layer.name), layer.down.clone()));
        tensors.push((format!("{}.{UP}", layer.name), layer.up.clone()));
        if let Some(alpha) = layer.alpha {
            let alpha = Tensor::new(alpha as f32, &Device::Cpu)?.to_dtype(layer.down.dtype())?;
            tensors.push((format!("{}.{ALPHA}", layer.name), alpha));
        }
    }
    write_safetensors(path, &tensors, metadata).map_err(|e| {
        let reason = match e {
            EngineError::Cache(reason) => reason,
            other => other.to_string(),
        };
        EngineError::Write(format!(
            "the LoRA was not saved to {}: {reason}",
            path.display()
        ))
    })
}
