//! LoRA files in the kohya format that AUTOMATIC1111, ComfyUI and diffusers all load, in both
//! directions.
//!
//! A file holds, for each adapted layer, `<name>.lora_down.weight` (`[rank, in]`, or
//! `[rank, in, kh, kw]` for a convolution), `<name>.lora_up.weight` (`[out, rank]` or
//! `[out, rank, 1, 1]`) and `<name>.alpha` (a scalar; absent means alpha = rank). The layer's
//! weight changes by `weight * alpha / rank * up @ down`, `weight` being how strongly the
//! LoRA is applied (`--lora FILE:WEIGHT`). The names ([`LoraNames`]) are a prefix and the
//! module's path with `.` replaced by `_`:
//! - SD 1.x/2.x: `lora_unet_` + the diffusers path
//!   (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), `lora_te_` +
//!   the text encoder's transformers path;
//! - SDXL, as kohya's sd-scripts write it: `lora_unet_` + the SGM path
//!   (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; diffusers paths are read
//!   too, as ComfyUI reads them), `lora_te1_` and `lora_te2_` for the two text encoders.
//!
//! - Import ([`AppliedLoras`]): the changes are merged into the base weights once, when the
//!   model loads, so sampling and fine-tuning cost nothing extra. Underscores make the names
//!   ambiguous to split, so names are matched against the model's own weights instead of
//!   parsed. Every key must be understood: a file with keys of another kind (LyCORIS, DoRA)
//!   is refused naming one of them, as is a file for another model family (SDXL's names on
//!   SD 1.5 and back, or a shape that does not fit, naming the tensor) and a pickle. Applying
//!   a LoRA partly would silently make another image than its author's.
//! - Export ([`export_tuned`]): a fine-tune in `lora` mode trains exactly such factors
//!   (`lora_A` = down, `lora_B` = up, applied with scale 1, so alpha = rank), which are
//!   written under kohya names with the metadata tools display.

mod deltas;
mod export;
mod kohya;

pub use deltas::{AppliedLoras, LoraTargets, WeightDeltas};
pub use export::{
    LoraExportInfo, export_tuned, kohya_metadata, layers_from_adapter_values, output_name,
};
pub use kohya::{KohyaLayer, read_kohya_file, write_kohya_file};

use crate::engine::config::UnetConfig;
use crate::engine::single_file::UnetLayout;

/// The part of the model a LoRA layer changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Unet,
    /// The (first) text encoder.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG).
    SecondTextEncoder,
}

/// How a model's LoRA layers are named (see the module docs).
#[derive(Debug, Clone)]
pub enum LoraNames {
    /// SD 1.x and 2.x: diffusers paths, `lora_te_`.
    Sd,
    /// SDXL: the UNet's SGM paths, `lora_te1_` and `lora_te2_`.
    Sdxl(UnetLayout),
}

impl LoraNames {
    /// The naming for a model with this UNet: SDXL's when it takes the pooled text and size
    /// numbers (`text_time`).
    pub fn for_unet(unet: &UnetConfig) -> Self {
        if unet.text_time.is_none() {
            return LoraNames::Sd;
        }
        let levels: Vec<(usize, bool)> = unet
            .down_blocks
            .iter()
            .map(|b| (b.layers, b.attention.is_some()))
            .collect();
        LoraNames::Sdxl(UnetLayout::new("", &levels))
    }

    fn prefix(&self, component: Component) -> &'static str {
        match (self, component) {
            (_, Component::Unet) => "lora_unet_",
            (LoraNames::Sd, _) => "lora_te_",
            (LoraNames::Sdxl(_), Component::TextEncoder) => "lora_te1_",
            (LoraNames::Sdxl(_), Component::SecondTextEncoder) => "lora_te2_",
        }
    }

    /// The name a LoRA file gives the layer that changes `module` (a diffusers path such as
    /// `down_blocks.1.attentions.0.proj_in`): what export writes.
    pub fn layer(&self, component: Component, module: &str) -> String {
        let path = match (self, component) {
            (LoraNames::Sdxl(layout), Component::Unet) => layout
                .ldm_name(&format!("{module}.weight"))
                .and_then(|name| name.strip_suffix(".weight").map(str::to_owned))
                .unwrap_or_else(|| module.to_owned()),
            _ => module.to_owned(),
        };
        format!("{}{}", self.prefix(component), path.replace('.', "_"))
    }

    /// Every name a file may give that layer: what import accepts.
    fn accepted(&self, component: Component, module: &str) -> Vec<String> {
        let written = self.layer(component, module);
        let diffusers = format!("{}{}", self.prefix(component), module.replace('.', "_"));
        if written == diffusers {
            vec![written]
        } else {
            vec![written, diffusers]
        }
    }

    /// Why a file's layer `name` that this model lacks is there: it was made for the other
    /// family, when its prefix says so.
    fn other_family(&self, name: &str) -> Option<&'static str> {
        let sdxl_text = name.starts_with("lora_te1_") || name.starts_with("lora_te2_");
        match self {
            LoraNames::Sd if sdxl_text => {
                Some("which only SDXL has: the LoRA is for SDXL and this model is SD 1.x/2.x")
            }
            LoraNames::Sdxl(_) if name.starts_with("lora_te_") => {
                Some("which only SD 1.x/2.x has: the LoRA is for SD 1.x/2.x and this model is SDXL")
            }
            _ => None,
        }
    }
}
