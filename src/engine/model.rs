//! A whole Stable Diffusion pipeline loaded from a diffusers folder or a single-file
//! checkpoint: configs, tokenizer, text encoder, UNet, VAE and noise schedule, plus the
//! conversions between photos and latents.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use super::conditioning::Conditioning;
use super::config::{
    PipelineConfig, PredictionType, SchedulerConfig, TextActivation, TextEncoderConfig, UnetConfig,
    VaeConfig, projection_dim,
};
use super::error::{EngineError, Result};
use super::fidelity::{FidelityTable, STABLE_DIFFUSION, STABLE_DIFFUSION_XL};
use super::lora::{AppliedLoras, LoraNames, LoraTargets, WeightDeltas};
use super::noise::NoiseSource;
use super::scheduler::DdimScheduler;
use super::single_file::{
    self, Checkpoint, Family, NamedWeights, Naming, PredictionChoice, UnetVariant,
    UnetWeightsSource, WeightsFile,
};
use super::text_encoder::TextEncoder;
use super::tokenizer::{ClipTokenizer, TokenizedPrompt, TokenizerFiles};
use super::unet::{TextTime, UNet};
use super::vae::Vae;
use crate::model_files::{DiffusersFiles, ModelFiles, ModelLayout, SecondTextFiles, VaeFiles};

pub struct StableDiffusion {
    pub config: PipelineConfig,
    pub tokenizer: ClipTokenizer,
    /// SDXL's second tokenizer (which pads with `!`); `None` for SD 1.x/2.x.
    pub second_tokenizer: Option<ClipTokenizer>,
    /// The text encoders, built while prompts are encoded and released while the UNet trains.
    text: TextEncoderSlot,
    /// SDXL's `force_zeros_for_empty_prompt`: an empty baseline prompt is a zero context and
    /// pooled embedding rather than the encoding of "".
    zero_empty_prompt: bool,
    /// The UNet used for sampling. Fine-tuning swaps in one whose trainable weights are
    /// variables (see `finetune::Adapter`).
    pub unet: UNet,
    /// The UNet's weights by diffusers name (shared storage with `unet`, not a copy). While
    /// fine-tuning, the trained ones are the training variables.
    unet_weights: HashMap<String, Tensor>,
    /// Where the UNet's weights were read from: the untrained values are read back from it
    /// rather than kept in memory.
    unet_source: UnetWeightsSource,
    info: ModelInfo,
    /// The LoRAs applied at load (`ModelFiles::loras`): merged into the weights; the UNet's
    /// also into the untrained values `unet_source` reads back.
    loras: AppliedLoras,
    pub vae: Vae,
    pub scheduler: DdimScheduler,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
}

/// The text encoders: CLIP, and for SDXL OpenCLIP ViT-bigG with its projection.
pub struct TextEncoders {
    pub first: TextEncoder,
    pub second: Option<TextEncoder>,
}

/// The text encoders, and what builds them again after [`StableDiffusion::release_text_encoders`]:
/// their weights' source and the LoRAs merged into them at load.
struct TextEncoderSlot {
    built: Mutex<Option<Arc<TextEncoders>>>,
    first: ComponentWeights,
    second: Option<(TextEncoderConfig, usize, ComponentWeights)>,
}

/// Both encoders' tensors by name (the second's for SDXL), as LoRAs find their targets.
type TextTensors = (HashMap<String, Tensor>, Option<HashMap<String, Tensor>>);

const FIRST_TEXT_ENCODER: &str = "text encoder";
const SECOND_TEXT_ENCODER: &str = "second text encoder";

impl TextEncoderSlot {
    /// Every tensor each encoder reads, by name.
    fn read(
        &self,
        config: &TextEncoderConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<TextTensors> {
        let first = self
            .first
            .tensors(FIRST_TEXT_ENCODER, dtype, device, |vb| {
                TextEncoder::new(config, vb)
            })?;
        let second = self
            .second
            .as_ref()
            .map(|(config, projection_dim, source)| {
                source.tensors(SECOND_TEXT_ENCODER, dtype, device, |vb| {
                    TextEncoder::with_projection(config, *projection_dim, vb)
                })
            })
            .transpose()?;
        Ok((first, second))
    }

    /// Both encoders with `loras` merged in: at load (from `read`, the tensors the LoRAs
    /// were checked against, when there are LoRAs) and after a release.
    fn build(
        &self,
        config: &TextEncoderConfig,
        loras: &AppliedLoras,
        read: Option<TextTensors>,
        dtype: DType,
        device: &Device,
    ) -> Result<TextEncoders> {
        let (first_read, second_read) = read.map_or((None, None), |(f, s)| (Some(f), s));
        let first = build_merged(
            &self.first,
            FIRST_TEXT_ENCODER,
            &loras.text_encoder,
            first_read,
            (dtype, device),
            |vb| TextEncoder::new(config, vb),
        )?;
        let second = self
            .second
            .as_ref()
            .map(|(config, projection_dim, source)| {
                build_merged(
                    source,
                    SECOND_TEXT_ENCODER,
                    &loras.second_text_encoder,
                    second_read,
                    (dtype, device),
                    |vb| TextEncoder::with_projection(config, *projection_dim, vb),
                )
            })
            .transpose()?;
        Ok(TextEncoders { first, second })
    }
}

/// `build` over `source`'s tensors with `deltas` (LoRA changes) merged in, reading them only
/// when they are not in `read` already and there is something to merge.
fn build_merged<T>(
    source: &ComponentWeights,
    component: &'static str,
    deltas: &WeightDeltas,
    read: Option<HashMap<String, Tensor>>,
    (dtype, device): (DType, &Device),
    build: impl Fn(VarBuilder) -> candle_core::Result<T>,
) -> Result<T> {
    let mut weights = match read {
        Some(weights) => weights,
        None if deltas.is_empty() => return source.build(component, dtype, device, build),
        None => source.tensors(component, dtype, device, &build)?,
    };
    deltas.merge_into(&mut weights)?;
    Ok(build(VarBuilder::from_tensors(weights, dtype, device))?)
}

/// A prompt's text-encoder output `[1, 77, hidden]` (for SDXL both encoders' penultimate
/// states joined, `[1, 77, 768 + 1280]`), SDXL's pooled embedding, and how it was tokenized.
pub struct EncodedPrompt {
    pub embedding: Tensor,
    /// SDXL: the second encoder's projected end-of-text state, `[1, projection_dim]`.
    pub pooled: Option<Tensor>,
    pub tokens: TokenizedPrompt,
}

/// Memory-maps one safetensors file; `dtype` converts on load (fp16 files become f32 on CPU).
pub(super) fn open_weights<'a>(
    component: &'static str,
    file: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'a>> {
    // SAFETY: the file is mapped read-only and is not modified while the model lives; a model
    // folder being rewritten underneath a running program is outside what we can defend.
    unsafe { VarBuilder::from_mmaped_safetensors(&[file], dtype, device) }.map_err(|e| {
        EngineError::Weights {
            component,
            file: file.to_path_buf(),
            reason: e.to_string(),
        }
    })
}

pub(super) fn weights_error<'a>(
    component: &'static str,
    file: &'a Path,
) -> impl Fn(candle_core::Error) -> EngineError + 'a {
    move |e| EngineError::Weights {
        component,
        file: file.to_path_buf(),
        reason: e.to_string(),
    }
}

/// What `--model` and friends decide beyond the files themselves.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--prediction-type`: wins over a folder's scheduler config and a checkpoint's metadata.
    pub prediction_type: Option<PredictionType>,
}

/// What was loaded, for one line of output and the editor's model panel.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Which Stable Diffusion this is: read from a single file's tensors, or from what a
    /// folder's text encoders are.
    pub family: Family,
    /// A single-file checkpoint (its architecture detected), not a diffusers folder.
    pub single_file: bool,
    pub variant: UnetVariant,
    pub prediction: PredictionChoice,
    /// What the fidelity slider means for this model: the table its folder names, else
    /// Stable Diffusion's.
    pub fidelity_table: &'static FidelityTable,
}

impl ModelInfo {
    /// e.g. "SD 2.x (OpenCLIP text encoder), text-to-image, v_prediction (SD 2.x default...)".
    pub fn describe(&self) -> String {
        let described = if self.single_file {
            single_file::describe(self.family, self.variant, &self.prediction)
        } else {
            format!(
                "{} diffusers folder, {}, {}",
                self.family, self.variant, self.prediction
            )
        };
        if std::ptr::eq(self.fidelity_table, &STABLE_DIFFUSION) {
            described
        } else {
            let table = self.fidelity_table;
            format!(
                "{described}, fidelity table {} ({})",
                table.name, table.source
            )
        }
    }
}

/// A diffusers folder's `model_index.json`, when it is there and parses. The engine reads only
/// two optional keys from it, so a missing or unreadable index is no reason to refuse a model.
fn read_model_index(path: Option<&Path>) -> Option<serde_json::Value> {
    let bytes = std::fs::read(path?).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The built-in fidelity table a diffusers folder names in its `model_index.json`
/// (`"_unitune_fidelity_table": "demo"`; diffusers ignores keys starting with `_`). A
/// missing or unknown entry means the family's table (`default`).
fn fidelity_table_of(
    model_index: Option<&serde_json::Value>,
    default: &'static FidelityTable,
) -> &'static FidelityTable {
    model_index
        .and_then(|index| index.get("_unitune_fidelity_table")?.as_str())
        .and_then(FidelityTable::named)
        .unwrap_or(default)
}

/// One CLIP tokenizer of a diffusers folder; `pad_token` comes from the first of the optional
/// files that names one.
fn load_tokenizer(
    vocab: &Path,
    merges: &Path,
    special: [&Option<PathBuf>; 2],
    max_length: usize,
) -> Result<ClipTokenizer> {
    let special: Vec<&Path> = special
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .collect();
    ClipTokenizer::load(
        &TokenizerFiles {
            vocab,
            merges,
            special_tokens: &special,
        },
        max_length,
    )
}

/// Where a component's weights are: a diffusers component file, or named weights (a
/// single-file checkpoint or a standalone VAE file) read through a name map.
enum ComponentWeights {
    File(PathBuf),
    Named(NamedWeights),
}

impl ComponentWeights {
    /// Builds a component from its weights: `build` gets a `VarBuilder` over them.
    fn build<T>(
        &self,
        component: &'static str,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
    ) -> Result<T> {
        match self {
            ComponentWeights::File(file) => {
                let vb = open_weights(component, file, dtype, device)?;
                build(vb).map_err(weights_error(component, file))
            }
            ComponentWeights::Named(named) => {
                build(named.var_builder(dtype, device, None)).map_err(|e| named.error(e))
            }
        }
    }

    /// Every tensor `build` reads, by the (diffusers) name it asks for: to change them before
    /// building the component from them (LoRAs). Each is read once.
    fn tensors<T>(
        &self,
        component: &'static str,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
    ) -> Result<HashMap<String, Tensor>> {
        let named = match self {
            ComponentWeights::File(file) => NamedWeights::new(
                WeightsFile::open(file)?,
                Naming::Diffusers {
                    prefix: String::new(),
                },
            ),
            ComponentWeights::Named(named) => named.clone(),
        };
        let record = Arc::new(Mutex::new(HashMap::new()));
        build(named.var_builder(dtype, device, Some(record.clone())))
            .map_err(|e| named.error(e))?;
        let mut recorded = record.lock().map_err(|_| {
            EngineError::InvalidRequest(format!("reading the {component} weights failed"))
        })?;
        Ok(std::mem::take(&mut *recorded))
    }
}

/// SDXL's second text encoder before it is built.
struct SecondTextParts {
    config: TextEncoderConfig,
    projection_dim: usize,
    tokenizer: ClipTokenizer,
    weights: ComponentWeights,
}

/// The model without its VAE, which a `--vae` may replace.
struct Parts {
    unet: UnetConfig,
    text_encoder_config: TextEncoderConfig,
    scheduler: SchedulerConfig,
    tokenizer: ClipTokenizer,
    text_weights: ComponentWeights,
    second_text: Option<SecondTextParts>,
    /// See [`StableDiffusion::zero_empty_prompt`].
    zero_empty_prompt: bool,
    vae: (VaeConfig, ComponentWeights),
    unet_source: UnetWeightsSource,
    info: ModelInfo,
}

fn variant_of(unet: &UnetConfig) -> UnetVariant {
    match unet.in_channels {
        9 => UnetVariant::Inpainting,
        8 => UnetVariant::InstructPix2Pix,
        _ => UnetVariant::TextToImage,
    }
}

impl StableDiffusion {
    /// Loads every component; `dtype` is the compute precision of the UNet and the text encoder
    /// (see [`super::precision::Precision`]). The VAE computes in f32 instead of f16 when its
    /// config asks for it (`force_upcast`, as diffusers does: SD 1.x's VAE overflows in f16).
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(files, device, dtype, &LoadOptions::default())
    }

    /// [`Self::load`] with options: a diffusers folder or a single-file checkpoint, and a
    /// replacement VAE when `files.vae_replacement` names one.
    pub fn load_with(
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        options: &LoadOptions,
    ) -> Result<Self> {
        let parts = match &files.layout {
            ModelLayout::Diffusers(folder) => diffusers_parts(folder, options)?,
            ModelLayout::SingleFile { checkpoint } => checkpoint_parts(checkpoint, options)?,
        };
        let (vae_config, vae_weights) = match &files.vae_replacement {
            None => parts.vae,
            Some(VaeFiles::Folder { config, weights }) => (
                VaeConfig::load(config)?,
                ComponentWeights::File(weights.clone()),
            ),
            Some(VaeFiles::File { weights }) => {
                let (config, named) = single_file::open_vae_file(weights, parts.info.family)?;
                (config, ComponentWeights::Named(named))
            }
        };
        if vae_config.latent_channels != parts.unet.out_channels {
            return Err(EngineError::InvalidRequest(format!(
                "the VAE makes {}-channel latents but the UNet works on {}; the VAE does not \
                 belong to this model",
                vae_config.latent_channels, parts.unet.out_channels
            )));
        }
        let config = PipelineConfig {
            unet: parts.unet,
            vae: vae_config,
            text_encoder: parts.text_encoder_config,
            scheduler: parts.scheduler,
        };
        // The UNet's tensors are kept by name: fine-tuning rebuilds the UNet around them.
        let (mut unet, mut unet_weights) =
            parts.unet_source.build_unet(&config.unet, dtype, device)?;
        let (second_tokenizer, second_source) = match parts.second_text {
            Some(second) => (
                Some(second.tokenizer),
                Some((second.config, second.projection_dim, second.weights)),
            ),
            None => (None, None),
        };
        let text = TextEncoderSlot {
            built: Mutex::new(None),
            first: parts.text_weights,
            second: second_source,
        };
        let (loras, text_read) = if files.loras.is_empty() {
            (AppliedLoras::default(), None)
        } else {
            // LoRAs change weights: the models are built again around the merged tensors,
            // read once here for the LoRAs to find their targets in.
            let (text_weights, second_weights) = text.read(&config.text_encoder, dtype, device)?;
            let targets = LoraTargets {
                unet: &unet_weights,
                text_encoder: &text_weights,
                second_text_encoder: second_weights.as_ref(),
            };
            let names = LoraNames::for_unet(&config.unet);
            let loras = AppliedLoras::load(&files.loras, &names, &targets)?;
            loras.unet.merge_into(&mut unet_weights)?;
            unet = UNet::new(
                &config.unet,
                VarBuilder::from_tensors(unet_weights.clone(), dtype, device),
            )?;
            (loras, Some((text_weights, second_weights)))
        };
        let encoders = text.build(&config.text_encoder, &loras, text_read, dtype, device)?;
        *text.built.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(encoders));
        let unet_source = parts.unet_source.with_deltas(loras.unet.clone());
        let vae_dtype = if dtype == DType::F16 && config.vae.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let vae = vae_weights.build("VAE", vae_dtype, device, |vb| Vae::new(&config.vae, vb))?;
        let scheduler = DdimScheduler::new(&config.scheduler);
        Ok(Self {
            config,
            tokenizer: parts.tokenizer,
            second_tokenizer,
            text,
            zero_empty_prompt: parts.zero_empty_prompt,
            unet,
            unet_weights,
            unet_source,
            info: parts.info,
            loras,
            vae,
            scheduler,
            device: device.clone(),
            dtype,
            vae_dtype,
        })
    }

    /// The UNet's weights by diffusers name (the trained ones are variables while tuning).
    pub fn unet_weights(&self) -> &HashMap<String, Tensor> {
        &self.unet_weights
    }

    /// Replaces the UNet's weights and the sampling UNet built from them (fine-tuning).
    pub(crate) fn set_unet(&mut self, weights: HashMap<String, Tensor>, unet: UNet) {
        self.unet_weights = weights;
        self.unet = unet;
    }

    /// The named UNet weights (diffusers names) as the model file holds them, in the compute
    /// dtype, with the applied LoRAs merged in: the untrained values, without keeping a copy of
    /// them in memory. Works alike for a diffusers folder and a single-file checkpoint (see
    /// [`UnetWeightsSource`]).
    pub fn read_unet_weights(&self, names: &[String]) -> Result<HashMap<String, Tensor>> {
        self.unet_source.read(names, self.dtype, &self.device)
    }

    /// The LoRAs applied to the base weights (empty when none were chosen).
    pub fn loras(&self) -> &AppliedLoras {
        &self.loras
    }

    /// Where the UNet's untrained weights are read from.
    pub fn unet_source(&self) -> &UnetWeightsSource {
        &self.unet_source
    }

    /// The file the UNet was loaded from (a diffusers UNet file or the single-file checkpoint).
    pub fn unet_file(&self) -> &Path {
        self.unet_source.file()
    }

    /// What was loaded: family, variant, prediction type and why.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The dtype the VAE computes in (f32 where f16 would overflow).
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The latent shape `(channels, h, w)` for an image of `width` x `height` pixels.
    pub fn latent_dims(&self, width: usize, height: usize) -> Result<(usize, usize, usize)> {
        let multiple = self.config.pixel_multiple();
        if width == 0
            || height == 0
            || !width.is_multiple_of(multiple)
            || !height.is_multiple_of(multiple)
        {
            return Err(EngineError::InvalidRequest(format!(
                "image size {width}x{height} must be a non-zero multiple of {multiple} pixels for this model"
            )));
        }
        if let Some(side) = self.config.native_image_side() {
            // Self-attention memory grows with the square of the pixel count: 4x the native
            // area already needs ~16x its attention memory. Refuse before allocating.
            let max_area = 4 * side * side;
            if width * height > max_area {
                return Err(EngineError::InvalidRequest(format!(
                    "image size {width}x{height} is too large for this model, whose native size is {side}x{side}; use at most {} pixels, e.g. --size {}x{}",
                    max_area,
                    2 * side,
                    2 * side
                )));
            }
        }
        let factor = self.config.vae.downscale_factor();
        Ok((
            self.config.vae.latent_channels,
            height / factor,
            width / factor,
        ))
    }

    /// The text encoders, built again from their files (with the LoRAs applied at load) when
    /// they were released.
    pub fn text_encoders(&self) -> Result<Arc<TextEncoders>> {
        let mut built = self.text.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(encoders) = built.as_ref() {
            return Ok(encoders.clone());
        }
        let (config, dtype, device) = (&self.config.text_encoder, self.dtype, &self.device);
        let encoders = Arc::new(self.text.build(config, &self.loras, None, dtype, device)?);
        *built = Some(encoders.clone());
        Ok(encoders)
    }

    /// Lets the text encoders' memory go until a prompt is next encoded: fine-tuning encodes
    /// its one prompt first and never again, and SDXL's encoders are 1.6 GB in half
    /// precision (of the 7 GB a 12 GB card has beside SDXL's UNet and VAE for training).
    /// Building them again reads 0.25 GB (SD 1.5) to 1.6 GB (SDXL) from the model's files.
    pub fn release_text_encoders(&self) {
        let released = self
            .text
            .built
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(released);
        // Freed, their weights would stay with malloc (`memory::tune_allocator` keeps freed
        // memory for reuse) while the fine-tune's VAE encode after this allocates its large
        // activations afresh, beside them: about 0.8 GB of the 1.6 GB of SDXL's encoders was
        // still counted in that encode's peak (SDXL lora at 1024 px in f16).
        super::memory::release_free_memory();
    }

    /// Whether the text encoders are in memory now.
    pub fn text_encoders_resident(&self) -> bool {
        self.text
            .built
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Tokenizes and encodes one prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<EncodedPrompt> {
        let tokens = self.tokenizer.encode(prompt)?;
        let ids = Tensor::new(tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let encoders = self.text_encoders()?;
        let (Some(second_tokenizer), Some(second)) = (&self.second_tokenizer, &encoders.second)
        else {
            let embedding = encoders.first.forward(&ids)?;
            return Ok(EncodedPrompt {
                embedding,
                pooled: None,
                tokens,
            });
        };
        if self.zero_empty_prompt && prompt.trim().is_empty() {
            // SDXL base was trained with dropped captions as zeros, and diffusers guides
            // away from zeros when no negative prompt is given.
            let width = self.config.unet.cross_attention_dim;
            let pooled_dim = second.projection_dim().unwrap_or_default();
            return Ok(EncodedPrompt {
                embedding: Tensor::zeros((1, ids.dim(1)?, width), self.dtype, &self.device)?,
                pooled: Some(Tensor::zeros((1, pooled_dim), self.dtype, &self.device)?),
                tokens,
            });
        }
        let second_tokens = second_tokenizer.encode(prompt)?;
        let second_ids = Tensor::new(second_tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        // SDXL reads each encoder's penultimate layer (diffusers' `hidden_states[-2]`).
        let first = encoders.first.encode_xl(&ids)?;
        let second_out = second.encode_xl(&second_ids)?;
        let embedding = Tensor::cat(&[&first.penultimate, &second_out.penultimate], 2)?;
        Ok(EncodedPrompt {
            embedding,
            pooled: second_out.pooled,
            tokens,
        })
    }

    /// The UNet's conditioning for one encoded prompt at a latent size `(h, w)`: for SDXL,
    /// with the size numbers of an uncropped photo at the working size (original and target
    /// size both the working size in pixels, crop at 0, 0), as diffusers' pipelines pass
    /// them for an image of that size.
    pub fn condition(
        &self,
        encoded: &EncodedPrompt,
        latent_size: (usize, usize),
    ) -> Result<Conditioning> {
        let text_time = match &encoded.pooled {
            Some(pooled) if self.config.unet.text_time.is_some() => {
                let factor = self.config.vae.downscale_factor();
                let (h, w) = (
                    (latent_size.0 * factor) as f32,
                    (latent_size.1 * factor) as f32,
                );
                let size_numbers =
                    Tensor::new(&[[h, w, 0.0, 0.0, h, w]], &self.device)?.to_dtype(self.dtype)?;
                Some(TextTime {
                    pooled: pooled.clone(),
                    size_numbers,
                })
            }
            _ => None,
        };
        Ok(Conditioning {
            context: encoded.embedding.clone(),
            text_time,
        })
    }

    /// [`Self::encode_prompt`] then [`Self::condition`].
    pub fn conditioning(&self, prompt: &str, latent_size: (usize, usize)) -> Result<Conditioning> {
        self.condition(&self.encode_prompt(prompt)?, latent_size)
    }

    /// A photo as a `[1, 3, H, W]` tensor in [-1, 1].
    pub fn image_to_tensor(&self, image: &RgbImage) -> Result<Tensor> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let data: Vec<f32> = image
            .as_raw()
            .iter()
            .map(|&v| v as f32 / 127.5 - 1.0)
            .collect();
        Ok(Tensor::from_vec(data, (h, w, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_device(&self.device)?
            .to_dtype(self.vae_dtype)?)
    }

    /// A `[1, 3, H, W]` tensor in about [-1, 1] back to 8-bit pixels, rounded as diffusers does.
    pub fn tensor_to_image(&self, tensor: &Tensor) -> Result<RgbImage> {
        tensor_to_image(tensor)
    }

    /// Encodes a photo into scaled latents, sampling the latent distribution with `noise`.
    pub fn encode_image(&self, image: &RgbImage, noise: &mut NoiseSource) -> Result<Tensor> {
        let distribution = self.vae.encode(&self.image_to_tensor(image)?)?;
        let sample_noise = noise
            .normal(distribution.mean.shape(), &self.device)?
            .to_dtype(distribution.mean.dtype())?;
        Ok(
            (distribution.sample(&sample_noise)? * self.config.vae.scaling_factor)?
                .to_dtype(self.dtype)?,
        )
    }

    /// Decodes scaled latents `[1, c, h, w]` into a photo.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<RgbImage> {
        let decoded = self
            .vae
            .decode(&(latents.to_dtype(self.vae_dtype)? / self.config.vae.scaling_factor)?)?;
        self.tensor_to_image(&decoded)
    }
}

/// A `[1, 3, H, W]` tensor in about [-1, 1] to 8-bit pixels, rounded as diffusers does.
pub(crate) fn tensor_to_image(tensor: &Tensor) -> Result<RgbImage> {
    let (_, _, h, w) = tensor.dims4()?;
    let pixels = ((tensor.to_dtype(DType::F32)?.to_device(&Device::Cpu)? / 2.0)? + 0.5)?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // A NaN would become black (0) below, and a black image must never pass for a result.
    if pixels.iter().any(|v| !v.is_finite()) {
        return Err(EngineError::NotFinite(
            "the VAE's decoded image is not all numbers (it overflowed); decode in --precision f32"
                .into(),
        ));
    }
    let bytes = pixels
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| EngineError::InvalidRequest("decoded image has an unexpected size".into()))
}

/// The text encoder's weights in either key layout transformers writes: under `text_model.`
/// (every SD checkpoint, transformers before 5) or without it (transformers 5), as
/// transformers and diffusers themselves load both.
fn text_encoder_weights(path: &Path) -> ComponentWeights {
    const PREFIX: &str = "text_model.";
    let usual = || ComponentWeights::File(path.to_path_buf());
    // A file that cannot be read, is prefixed, or has neither layout takes the usual path,
    // which names what is wrong with it.
    let Ok(file) = WeightsFile::open(path) else {
        return usual();
    };
    if file.has_prefix(PREFIX) || !file.contains("embeddings.token_embedding.weight") {
        return usual();
    }
    ComponentWeights::Named(NamedWeights::new(
        file,
        Naming::Unprefixed {
            strip: PREFIX.to_owned(),
        },
    ))
}

/// A diffusers folder's configs, tokenizer and weight files.
fn diffusers_parts(files: &DiffusersFiles, options: &LoadOptions) -> Result<Parts> {
    let unet = UnetConfig::load(&files.unet_config)?;
    let text_encoder_config = TextEncoderConfig::load(&files.text_encoder_config)?;
    let mut scheduler = SchedulerConfig::load(&files.scheduler_config)?;
    let second_text = match &files.second_text {
        Some(second) => Some(second_text_parts(
            second,
            &unet,
            &text_encoder_config,
            &files.unet_config,
        )?),
        None if unet.text_time.is_some() => {
            return Err(EngineError::config(
                &files.unet_config,
                "addition_embed_type",
                "is \"text_time\" (Stable Diffusion XL), but the folder has no text_encoder_2 and tokenizer_2; download the whole model folder",
            ));
        }
        None => {
            if unet.cross_attention_dim != text_encoder_config.hidden_size {
                return Err(EngineError::config(
                    &files.unet_config,
                    "cross_attention_dim",
                    format!(
                        "({}) does not match the text encoder's hidden_size ({})",
                        unet.cross_attention_dim, text_encoder_config.hidden_size
                    ),
                ));
            }
            None
        }
    };
    let model_index = read_model_index(files.model_index.as_deref());
    let reason = match options.prediction_type {
        Some(flag) => {
            scheduler.prediction_type = flag;
            "--prediction-type"
        }
        None => "the model's scheduler_config.json",
    };
    let prediction = PredictionChoice {
        prediction_type: scheduler.prediction_type,
        reason: reason.to_owned(),
    };
    let tokenizer = load_tokenizer(
        &files.tokenizer_vocab,
        &files.tokenizer_merges,
        [&files.special_tokens_map, &files.tokenizer_config],
        text_encoder_config.max_position_embeddings,
    )?;
    Ok(Parts {
        info: ModelInfo {
            family: match (&second_text, text_encoder_config.activation) {
                (Some(_), _) => Family::Sdxl,
                // OpenCLIP's text tower (SD 2.x) uses exact GELU, OpenAI CLIP (SD 1.x) quick GELU.
                (None, TextActivation::Gelu) => Family::Sd2,
                (None, _) => Family::Sd1,
            },
            single_file: false,
            variant: variant_of(&unet),
            prediction,
            fidelity_table: fidelity_table_of(
                model_index.as_ref(),
                if second_text.is_some() {
                    &STABLE_DIFFUSION_XL
                } else {
                    &STABLE_DIFFUSION
                },
            ),
        },
        unet,
        text_encoder_config,
        scheduler,
        tokenizer,
        text_weights: text_encoder_weights(&files.text_encoder_weights),
        zero_empty_prompt: second_text.is_some()
            && force_zeros_for_empty_prompt(model_index.as_ref()),
        second_text,
        vae: (
            VaeConfig::load(&files.vae_config)?,
            ComponentWeights::File(files.vae_weights.clone()),
        ),
        unet_source: UnetWeightsSource::diffusers_file(&files.unet_weights)?,
    })
}

/// SDXL's second encoder and tokenizer, checked against the UNet: the context is both
/// encoders' widths joined, and the added embedding takes the second's projection.
fn second_text_parts(
    files: &SecondTextFiles,
    unet: &UnetConfig,
    first: &TextEncoderConfig,
    unet_config: &Path,
) -> Result<SecondTextParts> {
    let config = TextEncoderConfig::load(&files.config)?;
    let Some(projection_dim) = projection_dim(&files.config)? else {
        return Err(EngineError::config(
            &files.config,
            "projection_dim",
            "is missing: SDXL's second text encoder projects its pooled state",
        ));
    };
    if unet.cross_attention_dim != first.hidden_size + config.hidden_size {
        return Err(EngineError::config(
            unet_config,
            "cross_attention_dim",
            format!(
                "({}) is not the two text encoders' widths joined ({} + {})",
                unet.cross_attention_dim, first.hidden_size, config.hidden_size
            ),
        ));
    }
    match &unet.text_time {
        Some(text_time) if text_time.pooled_dim() == projection_dim => {}
        Some(text_time) => {
            return Err(EngineError::config(
                unet_config,
                "projection_class_embeddings_input_dim",
                format!(
                    "leaves {} for the pooled text embedding, but the second text encoder projects to {projection_dim}",
                    text_time.pooled_dim()
                ),
            ));
        }
        None => {
            return Err(EngineError::config(
                unet_config,
                "addition_embed_type",
                "is not \"text_time\", but the folder has SDXL's second text encoder",
            ));
        }
    }
    let tokenizer = load_tokenizer(
        &files.tokenizer_vocab,
        &files.tokenizer_merges,
        [&files.special_tokens_map, &files.tokenizer_config],
        config.max_position_embeddings,
    )?;
    Ok(SecondTextParts {
        weights: text_encoder_weights(&files.weights),
        config,
        projection_dim,
        tokenizer,
    })
}

/// SDXL's `force_zeros_for_empty_prompt` from `model_index.json`: true unless it says
/// otherwise (the pipeline's default, and SDXL base's setting; SDXL Refiner's is false).
fn force_zeros_for_empty_prompt(model_index: Option<&serde_json::Value>) -> bool {
    model_index
        .and_then(|index| index.get("force_zeros_for_empty_prompt")?.as_bool())
        .unwrap_or(true)
}

/// A single-file checkpoint: the architecture from its tensors, the bundled tokenizer (SDXL's
/// second tokenizer is the same vocabulary padded with `!`).
fn checkpoint_parts(file: &Path, options: &LoadOptions) -> Result<Parts> {
    let checkpoint = Checkpoint::open(file, options.prediction_type)?;
    let tokenizer = ClipTokenizer::bundled(
        checkpoint.family.pad_token(),
        checkpoint.text_encoder.max_position_embeddings,
    )?;
    let second_text = match checkpoint.second_text_encoder {
        Some(second) => Some(SecondTextParts {
            tokenizer: ClipTokenizer::bundled("!", second.config.max_position_embeddings)?,
            config: second.config,
            projection_dim: second.projection_dim,
            weights: ComponentWeights::Named(second.weights),
        }),
        None => None,
    };
    Ok(Parts {
        info: ModelInfo {
            family: checkpoint.family,
            single_file: true,
            variant: checkpoint.variant,
            prediction: checkpoint.prediction,
            fidelity_table: if second_text.is_some() {
                &STABLE_DIFFUSION_XL
            } else {
                &STABLE_DIFFUSION
            },
        },
        unet: checkpoint.unet,
        text_encoder_config: checkpoint.text_encoder,
        scheduler: checkpoint.scheduler,
        tokenizer,
        text_weights: ComponentWeights::Named(checkpoint.text_encoder_weights),
        // A single file has no model_index.json: SDXL base's setting (and the pipeline's
        // default) holds.
        zero_empty_prompt: second_text.is_some(),
        second_text,
        vae: (
            checkpoint.vae,
            ComponentWeights::Named(checkpoint.vae_weights),
        ),
        unet_source: UnetWeightsSource::new(checkpoint.unet_weights),
    })
}
