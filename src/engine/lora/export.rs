//! A fine-tune in `lora` mode as a kohya-format LoRA file, with the metadata that
//! AUTOMATIC1111, ComfyUI and kohya's tools display.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::kohya::{KohyaLayer, write_kohya_file};
use super::{Component, LoraNames};
use crate::engine::config::{PipelineConfig, PredictionType, TextActivation};
use crate::engine::edit::TunedPhoto;
use crate::engine::error::{EngineError, Result};
use crate::engine::finetune::TrainMode;
use crate::engine::finite::all_finite_together;

const LORA_A: &str = ".lora_A.weight";
const LORA_B: &str = ".lora_B.weight";

/// What the metadata says about where a LoRA came from.
#[derive(Debug, Clone)]
pub struct LoraExportInfo<'a> {
    /// The file's name without extension (`ss_output_name`).
    pub output_name: &'a str,
    pub base_model_name: &'a str,
    /// The base model's fingerprint (SHA-256 of its files), so the LoRA can be matched to it.
    pub base_model_fingerprint: &'a str,
    /// The fine-tuning recipe, as JSON.
    pub recipe_json: &'a str,
    /// The rare token the photo is bound to (the trigger word).
    pub token: &'a str,
    /// Which snapshot: fine-tuning steps done.
    pub steps: usize,
    /// Seconds since 1970 (`modelspec.date`, `ss_training_finished_at`).
    pub created_unix_secs: u64,
}

/// The name tools show for a LoRA file: its file name without the extension.
pub fn output_name(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The adapter's factors (`<module>.lora_A.weight` [rank, in] and `.lora_B.weight`
/// [out, rank], UNet modules) as kohya layers named as `names` says. The project's UNet adds
/// `B (A x)` unscaled, so alpha = rank (scale 1) reproduces it exactly.
pub fn layers_from_adapter_values(
    values: &[(String, Tensor)],
    names: &LoraNames,
) -> Result<Vec<KohyaLayer>> {
    let by_name: HashMap<&str, &Tensor> = values.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut layers = Vec::new();
    for (name, down) in values {
        let Some(module) = name.strip_suffix(LORA_A) else {
            continue;
        };
        let up = by_name
            .get(format!("{module}{LORA_B}").as_str())
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "the fine-tune has {name} but no {module}{LORA_B}"
                ))
            })?;
        let rank = down.dims().first().copied().unwrap_or(0);
        layers.push(KohyaLayer {
            name: names.layer(Component::Unet, module),
            down: down.clone(),
            up: (*up).clone(),
            alpha: Some(rank as f64),
        });
    }
    if layers.is_empty() {
        return Err(EngineError::InvalidRequest(
            "the fine-tune holds no LoRA factors to export".into(),
        ));
    }
    Ok(layers)
}

/// The kohya `ss_*` keys, `modelspec.*` basics and unitune's own keys.
pub fn kohya_metadata(
    config: &PipelineConfig,
    rank: usize,
    info: &LoraExportInfo,
) -> HashMap<String, String> {
    let sdxl = config.unet.text_time.is_some();
    let sd2 = !sdxl && config.text_encoder.activation != TextActivation::QuickGelu;
    let v_prediction = config.scheduler.prediction_type == PredictionType::VPrediction;
    let side = config.native_image_side().unwrap_or(512);
    // What kohya's sd-scripts write for each base.
    let (base_version, architecture) = match (sdxl, sd2, v_prediction) {
        (true, _, _) => ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
        (false, false, _) => ("sd_v1", "stable-diffusion-v1/lora"),
        (false, true, false) => ("sd_v2", "stable-diffusion-v2-512/lora"),
        (false, true, true) => ("sd_v2", "stable-diffusion-v2-768-v/lora"),
    };
    let date = chrono_like_date(info.created_unix_secs);
    let title = format!("{} (UniTune)", info.output_name);
    let pairs = [
        ("ss_network_module", "networks.lora".to_string()),
        ("ss_network_dim", rank.to_string()),
        ("ss_network_alpha", rank.to_string()),
        ("ss_base_model_version", base_version.to_string()),
        ("ss_v2", if sd2 { "True" } else { "False" }.to_string()),
        ("ss_output_name", info.output_name.to_string()),
        ("ss_sd_model_name", info.base_model_name.to_string()),
        ("ss_resolution", format!("({side}, {side})")),
        ("ss_max_train_steps", info.steps.to_string()),
        (
            "ss_training_finished_at",
            info.created_unix_secs.to_string(),
        ),
        (
            "ss_training_comment",
            format!(
                "UniTune fine-tune on one photo; trigger word: {}",
                info.token
            ),
        ),
        (
            "ss_tag_frequency",
            serde_json::json!({ "unitune": { info.token: 1 } }).to_string(),
        ),
        ("modelspec.sai_model_spec", "1.0.0".to_string()),
        ("modelspec.architecture", architecture.to_string()),
        ("modelspec.implementation", "diffusers".to_string()),
        ("modelspec.title", title),
        ("modelspec.date", date),
        ("modelspec.resolution", format!("{side}x{side}")),
        (
            "modelspec.prediction_type",
            if v_prediction { "v" } else { "epsilon" }.to_string(),
        ),
        ("modelspec.trigger_phrase", info.token.to_string()),
        (
            "modelspec.description",
            format!(
                "UniTune fine-tune on one photo ({} steps) of {}; write \"{} <edit>\" as the prompt",
                info.steps, info.base_model_name, info.token
            ),
        ),
        ("unitune.token", info.token.to_string()),
        ("unitune.base_model", info.base_model_name.to_string()),
        (
            "unitune.base_model_fingerprint",
            info.base_model_fingerprint.to_string(),
        ),
        ("unitune.steps", info.steps.to_string()),
        ("unitune.recipe", info.recipe_json.to_string()),
        ("unitune.program", crate::build_info::describe()),
    ];
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// `YYYY-MM-DD` of a Unix time (UTC), as `modelspec.date` has it.
fn chrono_like_date(unix_secs: u64) -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Writes the snapshot after `info.steps` fine-tuning steps of `tuned` as a kohya-format LoRA
/// at `path` (atomically). Only a fine-tune in `lora` mode can be: the others change the
/// model's own weights, which no LoRA file holds.
pub fn export_tuned(
    tuned: &TunedPhoto,
    config: &PipelineConfig,
    path: &Path,
    info: &LoraExportInfo,
) -> Result<()> {
    let mode = tuned.adapter.mode();
    let TrainMode::Lora { rank } = mode else {
        return Err(EngineError::InvalidRequest(format!(
            "only a fine-tune in lora mode can be exported as a LoRA, and this one trained {mode} weights; fine-tune with --train lora"
        )));
    };
    let snapshot = tuned
        .snapshots
        .iter()
        .find(|s| s.steps == info.steps)
        .ok_or_else(|| {
            EngineError::InvalidRequest(format!(
                "there is no snapshot after {} fine-tuning steps to export (saved: {:?})",
                info.steps,
                tuned.snapshot_steps()
            ))
        })?;
    let values: Vec<(String, Tensor)> = tuned
        .adapter
        .names()
        .iter()
        .cloned()
        .zip(snapshot.tensors()?)
        .collect();
    let tensors: Vec<Tensor> = values.iter().map(|(_, t)| t.clone()).collect();
    if !all_finite_together(&tensors)? {
        return Err(EngineError::NotFinite(format!(
            "the snapshot after {} steps is not all numbers (its fine-tune diverged); it cannot be exported: fine-tune again with a lower --lr",
            info.steps
        )));
    }
    let layers = layers_from_adapter_values(&values, &LoraNames::for_unet(&config.unet))?;
    // Half-precision fine-tunes are written in the dtype they trained in; every tool reads
    // any float type.
    write_kohya_file(path, &layers, &kohya_metadata(config, rank, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(chrono_like_date(0), "1970-01-01");
        assert_eq!(chrono_like_date(951_782_400), "2000-02-29");
        assert_eq!(chrono_like_date(1_767_225_599), "2025-12-31");
    }
}
