//! The recipe written into every exported image: everything needed to make it again.
//!
//! Two text chunks: `unitune` holds the full recipe as JSON; `parameters` holds the same in
//! AUTOMATIC1111's format, which most image tools (and the A1111/InvokeAI UIs) display.

use serde::Serialize;

use crate::build_info;
use crate::engine::finetune::TuneSettings;

/// How the model was fine-tuned on the photo.
#[derive(Debug, Clone, Serialize)]
pub struct TuneRecipe {
    pub train: String,
    pub optimizer: &'static str,
    pub learning_rate: f64,
    pub snapshot_steps: Vec<usize>,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub token: String,
    pub seed: u64,
}

impl TuneRecipe {
    pub fn from_settings(settings: &TuneSettings) -> Self {
        Self {
            train: settings.mode.to_string(),
            optimizer: settings.optimizer.kind.as_str(),
            learning_rate: settings.optimizer.learning_rate,
            snapshot_steps: settings.snapshot_steps.clone(),
            batch_size: settings.batch_size,
            micro_batch_size: settings.micro_batch_size,
            token: settings.token.clone(),
            seed: settings.seed,
        }
    }
}

/// A LoRA applied to the base model (`--lora FILE:WEIGHT`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraRecipe {
    /// The file's name.
    pub file: String,
    /// Its content hash, `sha256:<hex>`.
    pub hash: String,
    pub weight: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Recipe {
    pub mode: &'static str,
    /// What made the image: `unitune`, `sdedit` (no fine-tuning), `instruct-pix2pix` or
    /// `txt2img`.
    pub method: &'static str,
    pub prompt: String,
    /// What the model was given: the prompt with the rare token when fine-tuned.
    pub model_prompt: String,
    /// The prompt guidance pushes away from ("" = classifier-free guidance).
    pub baseline_prompt: String,
    pub seed: u64,
    pub sampling_steps: usize,
    pub sampler: &'static str,
    pub guidance_weight: f64,
    /// InstructPix2Pix's image guidance; absent for the other methods.
    pub image_guidance: Option<f64>,
    /// SDEdit start; absent for text-to-image and instructions.
    pub t0: Option<f64>,
    /// The fidelity knob, when it chose the settings.
    pub fidelity: Option<f64>,
    /// Which snapshot was sampled (0 = no fine-tuning).
    pub tune_steps: usize,
    pub tuning: Option<TuneRecipe>,
    pub mask: Option<String>,
    pub interpolate: bool,
    pub width: u32,
    pub height: u32,
    pub working_width: u32,
    pub working_height: u32,
    pub model: String,
    /// LoRAs applied to the model, in order (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRecipe>,
    pub prediction_type: &'static str,
    /// The number format the model computed in (`f32`, `f16`, `bf16`).
    pub precision: &'static str,
    pub source_image: Option<String>,
    pub program: String,
    pub revision: &'static str,
}

impl Recipe {
    /// A recipe for `prompt` on the model named `model` with everything else at its "not
    /// used" value; each command (and the editor) fills in what it did.
    pub fn new(
        mode: &'static str,
        prompt: &str,
        model: &str,
        prediction_type: &'static str,
        precision: &'static str,
    ) -> Self {
        Self {
            mode,
            method: if mode == "generate" {
                "txt2img"
            } else {
                "unitune"
            },
            prompt: prompt.to_string(),
            model_prompt: prompt.to_string(),
            baseline_prompt: String::new(),
            seed: 0,
            sampling_steps: 0,
            sampler: "DDIM",
            guidance_weight: 1.0,
            image_guidance: None,
            t0: None,
            fidelity: None,
            tune_steps: 0,
            tuning: None,
            mask: None,
            interpolate: false,
            width: 0,
            height: 0,
            working_width: 0,
            working_height: 0,
            model: model.to_string(),
            loras: Vec::new(),
            prediction_type,
            precision,
            source_image: None,
            program: program(),
            revision: build_info::GIT_REVISION,
        }
    }

    pub fn text_chunks(&self) -> Vec<(String, String)> {
        let json = serde_json::to_string(self).unwrap_or_default();
        vec![
            ("unitune".to_string(), json),
            ("parameters".to_string(), self.a1111_parameters()),
        ]
    }

    /// `prompt\nNegative prompt: ...\nSteps: ..., Sampler: ..., ...` as A1111 writes it.
    fn a1111_parameters(&self) -> String {
        let mut fields = vec![
            format!("Steps: {}", self.sampling_steps),
            format!("Sampler: {}", self.sampler),
            format!("CFG scale: {}", self.guidance_weight),
            format!("Seed: {}", self.seed),
            format!("Size: {}x{}", self.width, self.height),
            format!("Model: {}", self.model.replace(',', " ")),
            format!("Precision: {}", self.precision),
        ];
        if let Some(t0) = self.t0 {
            fields.push(format!("Denoising strength: {t0}"));
        }
        if let Some(image_guidance) = self.image_guidance {
            // A1111's name for InstructPix2Pix's image guidance.
            fields.push(format!("Image CFG scale: {image_guidance}"));
        }
        fields.push(format!("Method: {}", self.method));
        fields.push(format!("UniTune fine-tuning steps: {}", self.tune_steps));
        fields.push(format!(
            "Version: {}",
            build_info::describe().replace(',', "")
        ));
        let mut text = self.model_prompt.clone();
        // AUTOMATIC1111 names applied LoRAs in the prompt as `<lora:NAME:WEIGHT>`.
        for lora in &self.loras {
            let name = lora.file.strip_suffix(".safetensors").unwrap_or(&lora.file);
            text.push_str(&format!(" <lora:{name}:{}>", lora.weight));
        }
        if !self.baseline_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", self.baseline_prompt));
        }
        text.push('\n');
        text.push_str(&fields.join(", "));
        text
    }
}

pub fn program() -> String {
    build_info::describe()
}
