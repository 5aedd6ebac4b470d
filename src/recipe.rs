//! The recipe written into every exported image: everything needed to make it again, and
//! nothing about the machine it was made on (no folder of the photo, mask or model).
//!
//! Two text chunks: `unitune` holds the full recipe as JSON; `parameters` holds the same in
//! AUTOMATIC1111's format, which most image tools (and the A1111/InvokeAI UIs) display and
//! which A1111, Forge and civitai read `Model` and `Model hash` from.
//!
//! Both are read back ([`RecipeSettings::from_text_chunks`]): a PNG unitune exported gives its
//! whole recipe; one from AUTOMATIC1111 (or any tool writing its format) gives the prompt,
//! negative prompt, seed, steps, CFG scale and denoising strength.

use serde::{Deserialize, Serialize};

use crate::build_info;
use crate::engine::finetune::{TrainMode, TuneSettings};
use crate::engine::optim::{OptimizerKind, OptimizerSettings};
use crate::engine::region::DEFAULT_THRESHOLD;

/// The PNG text chunk holding the recipe as JSON.
pub const RECIPE_CHUNK: &str = "unitune";
/// The PNG text chunk AUTOMATIC1111 writes and reads its infotext from.
pub const A1111_CHUNK: &str = "parameters";

/// How the model was fine-tuned on the photo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneRecipe {
    pub train: String,
    pub optimizer: String,
    pub learning_rate: f64,
    pub snapshot_steps: Vec<usize>,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub token: String,
    pub seed: u64,
    /// False when the half-precision weights trained without f32 master copies (stochastic
    /// rounding); written only then, and true in recipes from before it existed.
    #[serde(default = "masters_kept", skip_serializing_if = "is_kept")]
    pub master_weights: bool,
}

fn masters_kept() -> bool {
    true
}

fn is_kept(master_weights: &bool) -> bool {
    *master_weights
}

impl TuneRecipe {
    pub fn from_settings(settings: &TuneSettings) -> Self {
        Self {
            train: settings.mode.to_string(),
            optimizer: settings.optimizer.kind.as_str().to_owned(),
            learning_rate: settings.optimizer.learning_rate,
            snapshot_steps: settings.snapshot_steps.clone(),
            batch_size: settings.batch_size,
            micro_batch_size: settings.micro_batch_size,
            token: settings.token.clone(),
            seed: settings.seed,
            master_weights: settings.optimizer.master_weights,
        }
    }

    /// The fine-tuning settings this recipe names, on top of `base` (for what it does not
    /// record: checkpointing, automatic micro-batches). `None` when a value cannot be read
    /// (a recipe from a newer or hand-edited file).
    pub fn settings(&self, base: &TuneSettings) -> Option<TuneSettings> {
        // `Display` writes "lora (rank 8)"; the mode's name is its first word.
        let (name, rank) = match self.train.split_once(" (rank ") {
            Some((name, rest)) => (name, rest.trim_end_matches(')').parse().ok()?),
            None => (self.train.as_str(), 4),
        };
        let mode = match name.parse::<TrainMode>().ok()? {
            TrainMode::Lora { .. } => TrainMode::Lora { rank },
            other => other,
        };
        let settings = TuneSettings {
            mode,
            optimizer: OptimizerSettings {
                kind: self.optimizer.parse::<OptimizerKind>().ok()?,
                learning_rate: self.learning_rate,
                master_weights: self.master_weights,
                ..base.optimizer
            },
            snapshot_steps: self.snapshot_steps.clone(),
            batch_size: self.batch_size,
            micro_batch_size: self.micro_batch_size,
            token: self.token.clone(),
            seed: self.seed,
            ..base.clone()
        };
        settings.validate().ok()?;
        Some(settings)
    }
}

/// A LoRA applied to the base model (`--lora FILE:WEIGHT`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRecipe {
    /// The file's name.
    pub file: String,
    /// Its content hash, `sha256:<hex>`.
    pub hash: String,
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// The command (or the editor's `edit`) that made the image.
    pub mode: String,
    /// What made the image: `unitune`, `sdedit` (no fine-tuning), `instruct-pix2pix` or
    /// `txt2img`.
    pub method: String,
    pub prompt: String,
    /// What the model was given: the prompt with the rare token when fine-tuned.
    pub model_prompt: String,
    /// The prompt guidance pushes away from ("" = classifier-free guidance).
    pub baseline_prompt: String,
    pub seed: u64,
    pub sampling_steps: usize,
    pub sampler: String,
    pub guidance_weight: f64,
    /// InstructPix2Pix's image guidance; absent for the other methods.
    pub image_guidance: Option<f64>,
    /// SDEdit start; absent for text-to-image and instructions.
    pub t0_fraction: Option<f64>,
    /// The fidelity knob, when it chose the settings.
    pub fidelity: Option<f64>,
    /// Which snapshot was sampled (0 = no fine-tuning).
    pub tune_steps: usize,
    pub tuning: Option<TuneRecipe>,
    /// The mask's file name, or how it was made ("painted in the editor").
    pub mask: Option<String>,
    /// Where the edit could change the photo: `all`, `mask` (the one named above) or `auto`
    /// (estimated from the prompt).
    #[serde(default = "region_all")]
    pub region: String,
    /// The automatic region's threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_threshold: Option<f64>,
    pub interpolate: bool,
    pub width: u32,
    pub height: u32,
    pub working_width: u32,
    pub working_height: u32,
    /// The model's name: a folder's or file's name, a hub id, or `demo` (never a path).
    pub model: String,
    /// Which Stable Diffusion the model is: "SD 1.x", "SD 2.x" or "SDXL" (absent in recipes
    /// written before SDXL ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_family: Option<String>,
    /// AUTOMATIC1111's `Model hash`: for a single file the first 10 hex digits of its
    /// SHA-256 (AutoV2), for a folder of its fingerprint.
    #[serde(default)]
    pub model_hash: String,
    /// SHA-256 of every file that made the weights (VAE and LoRAs included).
    #[serde(default)]
    pub model_fingerprint: String,
    /// The commit a hub model was resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_revision: Option<String>,
    /// The replacement VAE's name (`--vae`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    /// LoRAs applied to the model, in order (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRecipe>,
    pub prediction_type: String,
    /// The number format the model computed in (`f32`, `f16`, `bf16`).
    pub precision: String,
    /// The photo's file name (never its folder).
    pub source_image: Option<String>,
    pub program: String,
    pub revision: String,
}

impl Recipe {
    /// A recipe for `prompt` on the model named `model` with everything else at its "not
    /// used" value; the edit service fills in what it did.
    pub fn new(
        mode: &str,
        prompt: &str,
        model: &str,
        prediction_type: &str,
        precision: &str,
    ) -> Self {
        Self {
            mode: mode.to_owned(),
            method: if mode == "generate" {
                "txt2img"
            } else {
                "unitune"
            }
            .to_owned(),
            prompt: prompt.to_string(),
            model_prompt: prompt.to_string(),
            baseline_prompt: String::new(),
            seed: 0,
            sampling_steps: 0,
            sampler: "DDIM".to_owned(),
            guidance_weight: 1.0,
            image_guidance: None,
            t0_fraction: None,
            fidelity: None,
            tune_steps: 0,
            tuning: None,
            mask: None,
            region: region_all(),
            region_threshold: None,
            interpolate: false,
            width: 0,
            height: 0,
            working_width: 0,
            working_height: 0,
            model: model.to_string(),
            model_family: None,
            model_hash: String::new(),
            model_fingerprint: String::new(),
            model_revision: None,
            vae: None,
            loras: Vec::new(),
            prediction_type: prediction_type.to_owned(),
            precision: precision.to_owned(),
            source_image: None,
            program: program(),
            revision: build_info::GIT_REVISION.to_owned(),
        }
    }

    pub fn text_chunks(&self) -> Vec<(String, String)> {
        let json = serde_json::to_string(self).unwrap_or_default();
        vec![
            (RECIPE_CHUNK.to_string(), json),
            (A1111_CHUNK.to_string(), self.a1111_parameters()),
        ]
    }

    /// `prompt\nNegative prompt: ...\nSteps: ..., Sampler: ..., ...` as A1111 writes it.
    pub fn a1111_parameters(&self) -> String {
        // A1111 splits the last line at commas: values lose theirs.
        let plain = |text: &str| text.replace(',', " ");
        let mut fields = vec![
            format!("Steps: {}", self.sampling_steps),
            format!("Sampler: {}", self.sampler),
            format!("CFG scale: {}", self.guidance_weight),
            format!("Seed: {}", self.seed),
            format!("Size: {}x{}", self.width, self.height),
        ];
        if !self.model_hash.is_empty() {
            fields.push(format!("Model hash: {}", self.model_hash));
        }
        fields.push(format!("Model: {}", plain(&self.model)));
        if let Some(family) = &self.model_family {
            fields.push(format!("Model family: {family}"));
        }
        if let Some(vae) = &self.vae {
            fields.push(format!("VAE: {}", plain(vae)));
        }
        fields.push(format!("Precision: {}", self.precision));
        if let Some(t0) = self.t0_fraction {
            fields.push(format!("Denoising strength: {t0}"));
        }
        if let Some(image_guidance) = self.image_guidance {
            // A1111's name for InstructPix2Pix's image guidance.
            fields.push(format!("Image CFG scale: {image_guidance}"));
        }
        match self.region_threshold {
            Some(threshold) => fields.push(format!("Region: {} {threshold}", self.region)),
            None => fields.push(format!("Region: {}", self.region)),
        }
        fields.push(format!("Method: {}", self.method));
        fields.push(format!("UniTune fine-tuning steps: {}", self.tune_steps));
        fields.push(format!("Version: {}", plain(&build_info::describe())));
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

/// Recipes written before regions existed edited everywhere unless they name a mask.
fn region_all() -> String {
    "all".to_owned()
}

pub fn program() -> String {
    build_info::describe()
}

/// Where a recipe's edit could change the photo.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RegionSetting {
    All,
    /// A mask (the file itself is not in the recipe).
    Mask,
    /// Estimated from the prompt, at this threshold.
    Auto(f64),
}

/// What a PNG's metadata says about how it was made, to make it again: the whole recipe when
/// unitune wrote it, or what AUTOMATIC1111's infotext holds.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeSettings {
    /// The prompt as typed (without the rare token, for unitune's recipes).
    pub prompt: String,
    pub baseline_prompt: String,
    /// An instruction for InstructPix2Pix rather than a description.
    pub instruct: bool,
    pub seed: Option<u64>,
    pub sampling_steps: Option<usize>,
    pub guidance_weight: Option<f64>,
    pub t0_fraction: Option<f64>,
    pub fidelity: Option<f64>,
    pub tune_steps: Option<usize>,
    pub image_guidance: Option<f64>,
    pub interpolate: bool,
    /// Where the edit could change the photo, when the recipe says.
    pub region: Option<RegionSetting>,
    pub tuning: Option<TuneRecipe>,
    /// The model and its hash, as the file names them.
    pub model: Option<String>,
    pub model_hash: Option<String>,
    /// Which tool wrote it: "unitune" or "AUTOMATIC1111".
    pub written_by: &'static str,
}

impl RecipeSettings {
    /// Reads the settings from a PNG's text chunks: unitune's JSON when it is there and
    /// readable, else AUTOMATIC1111's `parameters`; `None` when neither is.
    pub fn from_text_chunks(chunks: &[(String, String)]) -> Option<Self> {
        let chunk = |key: &str| {
            chunks
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        if let Some(recipe) =
            chunk(RECIPE_CHUNK).and_then(|json| serde_json::from_str::<Recipe>(json).ok())
        {
            return Some(Self::from_recipe(&recipe));
        }
        chunk(A1111_CHUNK).and_then(Self::from_a1111)
    }

    fn from_recipe(recipe: &Recipe) -> Self {
        Self {
            prompt: recipe.prompt.clone(),
            baseline_prompt: recipe.baseline_prompt.clone(),
            instruct: recipe.method == "instruct-pix2pix",
            seed: Some(recipe.seed),
            sampling_steps: Some(recipe.sampling_steps),
            guidance_weight: Some(recipe.guidance_weight),
            t0_fraction: recipe.t0_fraction,
            fidelity: recipe.fidelity,
            tune_steps: Some(recipe.tune_steps),
            image_guidance: recipe.image_guidance,
            interpolate: recipe.interpolate,
            region: Some(match recipe.region.as_str() {
                "auto" => RegionSetting::Auto(recipe.region_threshold.unwrap_or(DEFAULT_THRESHOLD)),
                "mask" => RegionSetting::Mask,
                // Recipes from before regions existed name a mask when they had one.
                _ if recipe.mask.is_some() => RegionSetting::Mask,
                _ => RegionSetting::All,
            }),
            tuning: recipe.tuning.clone(),
            model: Some(recipe.model.clone()),
            model_hash: (!recipe.model_hash.is_empty()).then(|| recipe.model_hash.clone()),
            written_by: "unitune",
        }
    }

    /// AUTOMATIC1111's infotext, parsed as its `parse_generation_parameters` does: the last
    /// line holds the `Key: value` pairs when it has at least three, a `Negative prompt:` line
    /// starts the negative prompt, and the lines before it are the prompt.
    fn from_a1111(text: &str) -> Option<Self> {
        let mut lines: Vec<&str> = text.trim().split('\n').collect();
        let last = lines.pop()?;
        let fields = a1111_fields(last);
        let fields = if fields.len() >= 3 {
            fields
        } else {
            lines.push(last);
            Vec::new()
        };
        let (mut prompt, mut negative) = (Vec::new(), Vec::new());
        for line in lines {
            let line = line.trim();
            match line.strip_prefix("Negative prompt:") {
                Some(rest) => negative.push(rest.trim()),
                None if !negative.is_empty() => negative.push(line),
                None => prompt.push(line),
            }
        }
        let field = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let number = |key: &str| field(key).and_then(|v| v.trim().parse::<f64>().ok());
        let prompt = prompt.join("\n");
        if prompt.is_empty() && fields.is_empty() {
            return None;
        }
        Some(Self {
            prompt,
            baseline_prompt: negative.join("\n"),
            instruct: field("Image CFG scale").is_some(),
            seed: field("Seed").and_then(|v| v.trim().parse().ok()),
            sampling_steps: field("Steps").and_then(|v| v.trim().parse().ok()),
            guidance_weight: number("CFG scale"),
            t0_fraction: number("Denoising strength"),
            fidelity: None,
            tune_steps: field("UniTune fine-tuning steps").and_then(|v| v.trim().parse().ok()),
            image_guidance: number("Image CFG scale"),
            interpolate: false,
            // unitune's own field: `Region: auto 0.5`, `Region: mask`, `Region: all`.
            region: field("Region").map(|v| {
                let v = v.trim();
                match v.strip_prefix("auto") {
                    Some(t) => RegionSetting::Auto(t.trim().parse().unwrap_or(DEFAULT_THRESHOLD)),
                    None if v == "mask" => RegionSetting::Mask,
                    None => RegionSetting::All,
                }
            }),
            tuning: None,
            model: field("Model").map(str::to_owned),
            model_hash: field("Model hash").map(str::to_owned),
            written_by: "AUTOMATIC1111",
        })
    }
}

/// AUTOMATIC1111's pattern for one `Key: value` pair of its parameter line
/// (`re_param_code` in `modules/infotext_utils.py`), as A1111, Forge and civitai read it.
pub const A1111_FIELD_PATTERN: &str = r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#;

/// The `Key: value` pairs of an AUTOMATIC1111 parameter line, found with its own pattern; a
/// quoted value is unquoted as JSON (as its `unquote` does).
pub fn a1111_fields(line: &str) -> Vec<(String, String)> {
    static PATTERN: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
    let Some(pattern) = PATTERN
        .get_or_init(|| regex::Regex::new(A1111_FIELD_PATTERN).ok())
        .as_ref()
    else {
        return Vec::new();
    };
    pattern
        .captures_iter(line)
        .map(|c| {
            let key = c[1].to_owned();
            let value = &c[2];
            let unquoted = (value.len() >= 2 && value.starts_with('"') && value.ends_with('"'))
                .then(|| serde_json::from_str::<String>(value).ok())
                .flatten();
            (key, unquoted.unwrap_or_else(|| value.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        let mut recipe = Recipe::new(
            "edit",
            "a cat, wearing sunglasses",
            "my-sd15",
            "epsilon",
            "f16",
        );
        recipe.model_prompt = "beikkpic a cat, wearing sunglasses".into();
        recipe.baseline_prompt = "a cat".into();
        recipe.seed = 7;
        recipe.sampling_steps = 30;
        recipe.guidance_weight = 9.0;
        recipe.t0_fraction = Some(0.96);
        recipe.fidelity = Some(0.5);
        recipe.tune_steps = 64;
        recipe.model_hash = "0123456789".into();
        recipe.tuning = Some(TuneRecipe::from_settings(&TuneSettings {
            mode: TrainMode::Lora { rank: 8 },
            ..TuneSettings::default()
        }));
        recipe
    }

    #[test]
    fn a_unitune_recipe_reads_back_whole() {
        let read = RecipeSettings::from_text_chunks(&recipe().text_chunks()).expect("reads");
        assert_eq!(read.prompt, "a cat, wearing sunglasses");
        assert_eq!(read.baseline_prompt, "a cat");
        assert_eq!(
            (read.seed, read.sampling_steps, read.tune_steps),
            (Some(7), Some(30), Some(64))
        );
        assert_eq!((read.t0_fraction, read.fidelity), (Some(0.96), Some(0.5)));
        assert_eq!(read.model_hash.as_deref(), Some("0123456789"));
        let tuning = read
            .tuning
            .expect("tuning")
            .settings(&TuneSettings::default());
        assert_eq!(tuning.map(|t| t.mode), Some(TrainMode::Lora { rank: 8 }));
    }

    #[test]
    fn the_a1111_text_alone_gives_its_fields() {
        let chunks = vec![(A1111_CHUNK.to_string(), recipe().a1111_parameters())];
        let read = RecipeSettings::from_text_chunks(&chunks).expect("reads");
        assert_eq!(read.written_by, "AUTOMATIC1111");
        assert_eq!(read.prompt, "beikkpic a cat, wearing sunglasses");
        assert_eq!(read.baseline_prompt, "a cat");
        assert_eq!((read.seed, read.sampling_steps), (Some(7), Some(30)));
        assert_eq!(
            (read.guidance_weight, read.t0_fraction),
            (Some(9.0), Some(0.96))
        );
        assert_eq!(read.model.as_deref(), Some("my-sd15"));
        assert_eq!(read.model_hash.as_deref(), Some("0123456789"));
    }

    #[test]
    fn a1111_fields_follow_its_pattern() {
        let fields = a1111_fields(
            r#"Steps: 20, Sampler: Euler a, Lora hashes: "a: 1, b: 2", Model hash: 45dee52b, Size: 512x512"#,
        );
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["Steps", "Sampler", "Lora hashes", "Model hash", "Size"]
        );
        assert_eq!(fields[2].1, "a: 1, b: 2");
        assert_eq!(fields[1].1, "Euler a");
        assert!(a1111_fields("no pairs here").is_empty());
    }

    #[test]
    fn unreadable_chunks_give_nothing() {
        assert!(RecipeSettings::from_text_chunks(&[]).is_none());
        let broken = vec![(RECIPE_CHUNK.to_string(), "{not json".to_string())];
        assert!(RecipeSettings::from_text_chunks(&broken).is_none());
    }
}
