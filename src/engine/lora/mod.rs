//! LoRA files in the kohya format that AUTOMATIC1111, ComfyUI and diffusers all load, in both
//! directions.
//!
//! A file holds, for each adapted layer, `<name>.lora_down.weight` (`[rank, in]`, or
//! `[rank, in, kh, kw]` for a convolution), `<name>.lora_up.weight` (`[out, rank]` or
//! `[out, rank, 1, 1]`) and `<name>.alpha` (a scalar; absent means alpha = rank). The name is
//! `lora_unet_` or `lora_te_` followed by the diffusers module path with `.` replaced by `_`
//! (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`). The layer's
//! weight changes by `weight * alpha / rank * up @ down`, `weight` being how strongly the
//! LoRA is applied (`--lora FILE:WEIGHT`).
//!
//! - Import ([`AppliedLoras`]): the changes are merged into the base weights once, when the
//!   model loads, so sampling and fine-tuning cost nothing extra. Underscores make the names
//!   ambiguous to split, so names are matched against the model's own weights instead of
//!   parsed. Every key must be understood: a file with keys of another kind (LyCORIS, DoRA,
//!   SDXL's two text encoders, LDM-style block names) is refused naming one of them, as is a
//!   file for another model family (a shape that does not fit, naming the tensor) and a
//!   pickle. Applying a LoRA partly would silently make another image than its author's.
//! - Export ([`export_tuned`]): a fine-tune in `lora` mode trains exactly such factors
//!   (`lora_A` = down, `lora_B` = up, applied with scale 1, so alpha = rank), which are
//!   written under kohya names with the metadata tools display.

mod deltas;
mod export;
mod kohya;

pub use deltas::{AppliedLoras, WeightDeltas};
pub use export::{
    LoraExportInfo, export_tuned, kohya_metadata, layers_from_adapter_values, output_name,
};
pub use kohya::{KohyaLayer, kohya_name, read_kohya_file, write_kohya_file};

/// The part of the model a LoRA layer changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Unet,
    TextEncoder,
}

impl Component {
    /// The kohya name prefix.
    pub fn prefix(self) -> &'static str {
        match self {
            Component::Unet => "lora_unet_",
            Component::TextEncoder => "lora_te_",
        }
    }
}
