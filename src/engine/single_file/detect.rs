//! What a single-file checkpoint is, read from its tensors: the family (SD 1.x with OpenAI
//! CLIP, SD 2.x with OpenCLIP, SDXL with both), the UNet's variant (in-painting with 9 input channels,
//! InstructPix2Pix with 8) and every architecture number the shapes tell. What they cannot
//! tell (head counts, activations, norm groups and eps, the noise schedule) follows the
//! family's convention, taken from the real configs in `assets/arch/`. The configs are then
//! built and validated by the same code that reads a diffusers folder's `config.json`.

use std::path::Path;

use serde_json::{Value, json};

use super::names::{Naming, UnetLayout};
use super::weights::{NamedWeights, WeightsFile};
use super::{Family, SecondTextEncoder, UnetVariant};
use crate::engine::config::{
    PredictionType, SchedulerConfig, TextEncoderConfig, UnetConfig, VaeConfig,
};
use crate::engine::error::{EngineError, Result};

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's (SGM's) text encoders: CLIP ViT-L in transformers' names, OpenCLIP ViT-bigG in its own.
const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// OpenCLIP ViT-H/14's text tower has 24 layers; SD 2.x reads the penultimate one's output,
/// so a file holding all 24 uses 23 (diffusers ignores `resblocks.23` by name). A file
/// converted from diffusers holds only the layers used.
const OPEN_CLIP_FULL_DEPTH: usize = 24;

/// The family's conventions: the real configs of SD 1.5, SD 2.1 and SDXL base.
struct Conventions {
    unet: &'static str,
    vae: &'static str,
    text_encoder: &'static str,
    scheduler: &'static str,
}

/// SDXL's second text encoder's convention (OpenCLIP ViT-bigG as `CLIPTextModelWithProjection`).
const SDXL_TEXT_ENCODER_2: &str = include_str!("../../../assets/arch/sdxl/text_encoder_2.json");

const SD1: Conventions = Conventions {
    unet: include_str!("../../../assets/arch/sd15/unet.json"),
    vae: include_str!("../../../assets/arch/sd15/vae.json"),
    text_encoder: include_str!("../../../assets/arch/sd15/text_encoder.json"),
    scheduler: include_str!("../../../assets/arch/sd15/scheduler.json"),
};

const SD2: Conventions = Conventions {
    unet: include_str!("../../../assets/arch/sd21/unet.json"),
    vae: include_str!("../../../assets/arch/sd21/vae.json"),
    text_encoder: include_str!("../../../assets/arch/sd21/text_encoder.json"),
    scheduler: include_str!("../../../assets/arch/sd21/scheduler.json"),
};

const SDXL: Conventions = Conventions {
    unet: include_str!("../../../assets/arch/sdxl/unet.json"),
    vae: include_str!("../../../assets/arch/sdxl/vae.json"),
    text_encoder: include_str!("../../../assets/arch/sdxl/text_encoder.json"),
    scheduler: include_str!("../../../assets/arch/sdxl/scheduler.json"),
};

impl Family {
    fn conventions(self) -> &'static Conventions {
        match self {
            Family::Sd1 => &SD1,
            Family::Sd2 => &SD2,
            Family::Sdxl => &SDXL,
        }
    }

    /// Attention heads of a UNet block of `channels`: SD 1.x has 8 everywhere, SD 2.x and
    /// SDXL heads 64 wide (SGM's `num_head_channels: 64`).
    fn unet_heads(self, channels: usize) -> usize {
        match self {
            Family::Sd1 => 8,
            Family::Sd2 | Family::Sdxl => (channels / 64).max(1),
        }
    }

    /// The UNet's sample size: 64 (512 px) for SD 1.x and SD 2.x base, 96 (768 px) for the
    /// v-prediction SD 2.x, 128 (1024 px) for SDXL.
    fn sample_size(self, prediction: PredictionType) -> usize {
        match (self, prediction) {
            (Family::Sdxl, _) => 128,
            (Family::Sd2, PredictionType::VPrediction) => 96,
            _ => 64,
        }
    }
}

fn convention(text: &str) -> Value {
    // The files are part of the program; a parse failure is a build mistake the tests catch.
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn set(value: &mut Value, fields: Value) {
    if let (Some(target), Value::Object(fields)) = (value.as_object_mut(), fields) {
        target.extend(fields);
    }
}

/// A problem with the file, as one sentence part.
fn problem(file: &Path, text: impl Into<String>) -> EngineError {
    EngineError::Checkpoint {
        file: file.to_path_buf(),
        problem: text.into(),
    }
}

/// The family, from the text encoder's layout.
pub(super) fn detect_family(file: &WeightsFile) -> Result<Family> {
    if file.contains(&format!(
        "{CLIP_PREFIX}text_model.embeddings.token_embedding.weight"
    )) {
        return Ok(Family::Sd1);
    }
    if file.contains(&format!("{OPEN_CLIP_PREFIX}token_embedding.weight")) {
        return Ok(Family::Sd2);
    }
    let has = |prefix: &str| file.has_prefix(prefix);
    if has(SDXL_CLIP_PREFIX) && has(SDXL_OPEN_CLIP_PREFIX) {
        return Ok(Family::Sdxl);
    }
    let what = if has("conditioner.embedders.0.model.") {
        "it is an SDXL refiner (its only text encoder is OpenCLIP), which refines finished \
         images rather than editing them; use an SDXL base checkpoint"
    } else if has("conditioner.embedders.") {
        "it looks like SDXL but lacks a text encoder: SDXL checkpoints hold both \
         conditioner.embedders.0.transformer.* (CLIP) and conditioner.embedders.1.model.* \
         (OpenCLIP)"
    } else if has(UNET_PREFIX) {
        "it has no text encoder (neither cond_stage_model.transformer.* for SD 1.x nor \
         cond_stage_model.model.* for SD 2.x)"
    } else {
        "it is not a Stable Diffusion checkpoint in the original layout (no \
         model.diffusion_model.*, first_stage_model.*, cond_stage_model.* tensors)"
    };
    Err(problem(file.path(), what))
}

/// The shape of a tensor the architecture cannot be read without.
fn required<'a>(file: &'a WeightsFile, name: &str) -> Result<&'a [usize]> {
    file.shape(name)
        .ok_or_else(|| problem(file.path(), format!("the tensor {name} is missing")))
}

fn dim(file: &WeightsFile, name: &str, index: usize, rank: usize) -> Result<usize> {
    let shape = required(file, name)?;
    if shape.len() != rank {
        return Err(problem(
            file.path(),
            format!("the tensor {name} has shape {shape:?}, which is not {rank}-dimensional"),
        ));
    }
    Ok(shape[index])
}

/// One down level of the UNet as the file holds it.
#[derive(Debug, Clone, Default)]
struct Level {
    channels: usize,
    resnets: usize,
    /// Transformer layers of its attention blocks; `None` without attention.
    depth: Option<usize>,
}

/// The UNet read from `model.diffusion_model.*`: its config and name map. `pooled_dim` is
/// SDXL's pooled text width (the second encoder's projection), which with the six size
/// numbers makes `label_emb`'s input.
pub(super) fn detect_unet(
    file: &WeightsFile,
    family: Family,
    prediction: PredictionType,
    pooled_dim: Option<usize>,
) -> Result<(UnetConfig, NamedWeights, UnetVariant)> {
    let p = UNET_PREFIX;
    let path = file.path();
    let conv_in = format!("{p}input_blocks.0.0.weight");
    let in_channels = dim(file, &conv_in, 1, 4)?;
    let conv_in_kernel = dim(file, &conv_in, 2, 4)?;
    let conv_out = format!("{p}out.2.weight");
    let out_channels = dim(file, &conv_out, 0, 4)?;
    let conv_out_kernel = dim(file, &conv_out, 2, 4)?;
    let variant = match in_channels {
        4 => UnetVariant::TextToImage,
        9 => UnetVariant::Inpainting,
        8 => UnetVariant::InstructPix2Pix,
        other => {
            return Err(problem(
                path,
                format!(
                    "its UNet takes {other} input channels ({conv_in}); Stable Diffusion UNets \
                     take 4, 9 (in-painting) or 8 (InstructPix2Pix)"
                ),
            ));
        }
    };
    let depth_at = |block: &str| {
        file.contains(&format!("{p}{block}.proj_in.weight"))
            .then(|| file.count(|t| format!("{p}{block}.transformer_blocks.{t}.norm1.weight")))
    };

    // input_blocks.0 is conv_in; then each level's resnets (+ attention), then its
    // downsampler, numbered on.
    let mut levels = vec![Level::default()];
    for k in 1.. {
        if file.contains(&format!("{p}input_blocks.{k}.0.op.weight")) {
            levels.push(Level::default());
            continue;
        }
        let conv = format!("{p}input_blocks.{k}.0.in_layers.2.weight");
        if !file.contains(&conv) {
            break;
        }
        let channels = dim(file, &conv, 0, 4)?;
        let depth = depth_at(&format!("input_blocks.{k}.1"));
        let Some(level) = levels.last_mut() else {
            break;
        };
        if level.resnets > 0 && (level.channels != channels || level.depth != depth) {
            return Err(problem(
                path,
                format!(
                    "its UNet block input_blocks.{k} differs from the other blocks of its level \
                     ({channels} channels), which unitune does not support"
                ),
            ));
        }
        level.channels = channels;
        level.depth = depth;
        level.resnets += 1;
    }
    if levels.iter().any(|l| l.resnets == 0) {
        return Err(problem(
            path,
            format!("its UNet has a level without resnet blocks ({p}input_blocks.*)"),
        ));
    }
    let first_attention = (1..)
        .take(64)
        .map(|k| format!("{p}input_blocks.{k}.1"))
        .find(|b| file.contains(&format!("{b}.proj_in.weight")))
        .unwrap_or_else(|| format!("{p}middle_block.1"));
    let proj_in = format!("{first_attention}.proj_in.weight");
    let use_linear_projection = required(file, &proj_in)?.len() == 2;
    let to_k = format!("{first_attention}.transformer_blocks.0.attn2.to_k.weight");
    let cross_attention_dim = dim(file, &to_k, 1, 2)?;

    let mid_depth = depth_at("middle_block.1");
    let last = levels.len() - 1;
    let mid_block = match (mid_depth, levels[last].depth) {
        (None, _) => {
            return Err(problem(
                path,
                format!("the tensor {p}middle_block.1.proj_in.weight is missing"),
            ));
        }
        (Some(mid), Some(own)) if mid != own => {
            return Err(problem(
                path,
                format!(
                    "its UNet's mid block has {mid} transformer layers but the last level \
                     has {own}, which unitune does not support"
                ),
            ));
        }
        (Some(mid), _) => mid,
    };

    let channels: Vec<usize> = levels.iter().map(|l| l.channels).collect();
    let kinds = |attention: &str, plain: &str| -> Vec<String> {
        levels
            .iter()
            .map(|l| if l.depth.is_some() { attention } else { plain }.to_owned())
            .collect()
    };
    let mut up_types = kinds("CrossAttnUpBlock2D", "UpBlock2D");
    up_types.reverse();
    let transformer_layers: Vec<usize> = levels
        .iter()
        .enumerate()
        .map(|(i, l)| l.depth.unwrap_or(if i == last { mid_block } else { 1 }))
        .collect();
    let mut config = convention(family.conventions().unet);
    set(
        &mut config,
        json!({
            "in_channels": in_channels,
            "out_channels": out_channels,
            "block_out_channels": channels,
            "down_block_types": kinds("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": up_types,
            "layers_per_block": levels.iter().map(|l| l.resnets).collect::<Vec<_>>(),
            "transformer_layers_per_block": transformer_layers,
            "attention_head_dim": channels.iter().map(|&c| family.unet_heads(c)).collect::<Vec<_>>(),
            "cross_attention_dim": cross_attention_dim,
            "use_linear_projection": use_linear_projection,
            "conv_in_kernel": conv_in_kernel,
            "conv_out_kernel": conv_out_kernel,
            "sample_size": family.sample_size(prediction),
        }),
    );
    if let Some(pooled_dim) = pooled_dim {
        set(&mut config, text_time(file, pooled_dim)?);
    }
    let config = UnetConfig::from_json(&config.to_string(), path)?;
    let layout = UnetLayout::new(
        p,
        &levels
            .iter()
            .map(|l| (l.resnets, l.depth.is_some()))
            .collect::<Vec<_>>(),
    );
    Ok((
        config,
        NamedWeights::new(file.clone(), Naming::LdmUnet(layout)),
        variant,
    ))
}

/// SDXL's added conditioning, read from `label_emb.0.0` (diffusers' `add_embedding.linear_1`):
/// its input is the pooled text followed by six size numbers, each embedded
/// `addition_time_embed_dim` wide.
fn text_time(file: &WeightsFile, pooled_dim: usize) -> Result<Value> {
    let name = format!("{UNET_PREFIX}label_emb.0.0.weight");
    let input = dim(file, &name, 1, 2)?;
    let per_number = input.checked_sub(pooled_dim).map(|rest| rest / 6);
    match per_number {
        Some(per_number) if per_number > 0 && pooled_dim + 6 * per_number == input => Ok(json!({
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": per_number,
            "projection_class_embeddings_input_dim": input,
        })),
        _ => Err(problem(
            file.path(),
            format!(
                "the tensor {name} takes {input} inputs, which is not the pooled text \
                 ({pooled_dim}) and six size embeddings"
            ),
        )),
    }
}

/// How a VAE's names are laid out in `file`: LDM (`encoder.down.0.block.0`) or diffusers
/// (`encoder.down_blocks.0.resnets.0`), bare or under `first_stage_model.`.
pub(super) fn vae_naming(file: &WeightsFile) -> Result<Naming> {
    for prefix in ["", VAE_PREFIX, "vae."] {
        if file.contains(&format!("{prefix}encoder.down.0.block.0.conv1.weight")) {
            let levels = file.count(|i| format!("{prefix}encoder.down.{i}.block.0.conv1.weight"));
            return Ok(Naming::LdmVae {
                prefix: prefix.to_owned(),
                levels,
            });
        }
        if file.contains(&format!(
            "{prefix}encoder.down_blocks.0.resnets.0.conv1.weight"
        )) {
            return Ok(Naming::Diffusers {
                prefix: prefix.to_owned(),
            });
        }
    }
    Err(problem(
        file.path(),
        format!(
            "it holds no VAE: the tensor {VAE_PREFIX}encoder.down.0.block.0.conv1.weight (or \
             encoder.down_blocks.0.resnets.0.conv1.weight) is missing"
        ),
    ))
}

/// The VAE (AutoencoderKL) read from its tensors through `naming`.
pub(super) fn detect_vae(
    file: &WeightsFile,
    naming: Naming,
    family: Family,
) -> Result<(VaeConfig, NamedWeights)> {
    let weights = NamedWeights::new(file.clone(), naming);
    let shape = |name: &str| -> Result<Vec<usize>> {
        weights.shape(name).ok_or_else(|| {
            let file_name = weights
                .file_name_of(name)
                .unwrap_or_else(|| name.to_owned());
            problem(file.path(), format!("the tensor {file_name} is missing"))
        })
    };
    let conv_in = shape("encoder.conv_in.weight")?;
    let mut channels = Vec::new();
    while let Some(s) = weights.shape(&format!(
        "encoder.down_blocks.{}.resnets.0.conv1.weight",
        channels.len()
    )) {
        channels.push(s[0]);
    }
    let layers = (0..)
        .take_while(|j| {
            weights.contains(&format!("encoder.down_blocks.0.resnets.{j}.conv1.weight"))
        })
        .count();
    let encoder_out = shape("encoder.conv_out.weight")?;
    let decoder_out = shape("decoder.conv_out.weight")?;
    let mut config = convention(family.conventions().vae);
    set(
        &mut config,
        json!({
            "in_channels": conv_in.get(1).copied().unwrap_or(3),
            "out_channels": decoder_out[0],
            "block_out_channels": channels,
            "down_block_types": vec!["DownEncoderBlock2D"; channels.len()],
            "up_block_types": vec!["UpDecoderBlock2D"; channels.len()],
            "layers_per_block": layers,
            "latent_channels": encoder_out[0] / 2,
            "use_quant_conv": weights.contains("quant_conv.weight"),
            "use_post_quant_conv": weights.contains("post_quant_conv.weight"),
            // diffusers' current names, or its old ones (query/key/value).
            "mid_block_add_attention": weights.contains("encoder.mid_block.attentions.0.to_q.weight")
                || weights.contains("encoder.mid_block.attentions.0.query.weight"),
        }),
    );
    let config = VaeConfig::from_json(&config.to_string(), file.path())?;
    Ok((config, weights))
}

/// The text encoder (CLIP for SD 1.x and SDXL's first, OpenCLIP for SD 2.x).
pub(super) fn detect_text_encoder(
    file: &WeightsFile,
    family: Family,
) -> Result<(TextEncoderConfig, NamedWeights)> {
    let (naming, token, position, layers, fc1) = match family {
        Family::Sd1 | Family::Sdxl => {
            let prefix = if family == Family::Sdxl {
                SDXL_CLIP_PREFIX
            } else {
                CLIP_PREFIX
            };
            let t = |name: &str| format!("{prefix}text_model.{name}");
            let layers = file.count(|i| t(&format!("encoder.layers.{i}.layer_norm1.weight")));
            (
                Naming::Diffusers {
                    prefix: prefix.to_owned(),
                },
                t("embeddings.token_embedding.weight"),
                t("embeddings.position_embedding.weight"),
                layers,
                t("encoder.layers.0.mlp.fc1.weight"),
            )
        }
        Family::Sd2 => {
            let t = |name: &str| format!("{OPEN_CLIP_PREFIX}{name}");
            let blocks = file.count(|i| t(&format!("transformer.resblocks.{i}.ln_1.weight")));
            let layers = if blocks == OPEN_CLIP_FULL_DEPTH {
                blocks - 1
            } else {
                blocks
            };
            (
                Naming::OpenClip {
                    prefix: OPEN_CLIP_PREFIX.to_owned(),
                },
                t("token_embedding.weight"),
                t("positional_embedding"),
                layers,
                t("transformer.resblocks.0.mlp.c_fc.weight"),
            )
        }
    };
    let config = text_encoder_config(
        file,
        convention(family.conventions().text_encoder),
        [&token, &position, &fc1],
        layers,
    )?;
    Ok((config, NamedWeights::new(file.clone(), naming)))
}

/// SDXL's second text encoder: OpenCLIP ViT-bigG with its projection. Every layer is kept (SDXL
/// reads the penultimate one's output and pools the last one's).
pub(super) fn detect_second_text_encoder(file: &WeightsFile) -> Result<SecondTextEncoder> {
    let t = |name: &str| format!("{SDXL_OPEN_CLIP_PREFIX}{name}");
    let layers = file.count(|i| t(&format!("transformer.resblocks.{i}.ln_1.weight")));
    let config = text_encoder_config(
        file,
        convention(SDXL_TEXT_ENCODER_2),
        [
            &t("token_embedding.weight"),
            &t("positional_embedding"),
            &t("transformer.resblocks.0.mlp.c_fc.weight"),
        ],
        layers,
    )?;
    // OpenCLIP keeps the projection as the matrix that multiplies from the right.
    let projection = t("text_projection");
    if dim(file, &projection, 0, 2)? != config.hidden_size {
        return Err(problem(
            file.path(),
            format!(
                "the tensor {projection} does not take the {}-wide text its encoder makes",
                config.hidden_size
            ),
        ));
    }
    Ok(SecondTextEncoder {
        projection_dim: dim(file, &projection, 1, 2)?,
        config,
        weights: NamedWeights::new(
            file.clone(),
            Naming::OpenClip {
                prefix: SDXL_OPEN_CLIP_PREFIX.to_owned(),
            },
        ),
    })
}

/// A CLIP text encoder's config: the `convention` with the sizes read from its token and
/// position embeddings and its first MLP (`[token, position, fc1]`).
fn text_encoder_config(
    file: &WeightsFile,
    mut config: Value,
    [token, position, fc1]: [&str; 3],
    layers: usize,
) -> Result<TextEncoderConfig> {
    let vocab_size = dim(file, token, 0, 2)?;
    let hidden = dim(file, token, 1, 2)?;
    let positions = dim(file, position, 0, 2)?;
    let intermediate = dim(file, fc1, 0, 2)?;
    set(
        &mut config,
        json!({
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            // CLIP's heads are 64 wide.
            "num_attention_heads": (hidden / 64).max(1),
            "max_position_embeddings": positions,
        }),
    );
    TextEncoderConfig::from_json(&config.to_string(), file.path())
}

/// The family's noise schedule with `prediction`.
pub(super) fn scheduler(
    family: Family,
    prediction: PredictionType,
    file: &Path,
) -> Result<SchedulerConfig> {
    let mut config = convention(family.conventions().scheduler);
    set(
        &mut config,
        json!({ "prediction_type": prediction.as_str() }),
    );
    SchedulerConfig::from_json(&config.to_string(), file)
}
