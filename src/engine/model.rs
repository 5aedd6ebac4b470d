//! A whole Stable Diffusion pipeline loaded from a diffusers folder: configs, tokenizer, text
//! encoder, UNet, VAE and noise schedule, plus the conversions between photos and latents.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use super::config::{PipelineConfig, SchedulerConfig, TextEncoderConfig, UnetConfig, VaeConfig};
use super::error::{EngineError, Result};
use super::lora::AppliedLoras;
use super::noise::NoiseSource;
use super::scheduler::DdimScheduler;
use super::text_encoder::TextEncoder;
use super::tokenizer::{ClipTokenizer, TokenizedPrompt, TokenizerFiles};
use super::unet::UNet;
use super::vae::Vae;
use crate::model_files::ModelFiles;

pub struct StableDiffusion {
    pub config: PipelineConfig,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: TextEncoder,
    /// The UNet used for sampling. Fine-tuning swaps in one whose trainable weights are
    /// variables (see `finetune::Adapter`).
    pub unet: UNet,
    /// The UNet's weights by diffusers name (shared storage with `unet`, not a copy). While
    /// fine-tuning, the trained ones are the training variables.
    unet_weights: HashMap<String, Tensor>,
    /// Where the UNet's weights were read from: the untrained values are read back from it
    /// rather than kept in memory.
    unet_file: PathBuf,
    /// The LoRAs applied at load (`ModelFiles::loras`): merged into the weights, and into
    /// the untrained values read back from `unet_file`.
    loras: AppliedLoras,
    pub vae: Vae,
    pub scheduler: DdimScheduler,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
}

/// A prompt's text-encoder output `[1, 77, hidden]` and how it was tokenized.
pub struct EncodedPrompt {
    pub embedding: Tensor,
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

/// Reads tensors of one safetensors file (all when `names` is `None`), converted to `dtype` on
/// `device`, one tensor at a time (the file is mapped, never read whole into memory).
fn read_weights(
    component: &'static str,
    file: &Path,
    names: Option<&[String]>,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let error = weights_error(component, file);
    // SAFETY: as in `open_weights`.
    let mapped =
        unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.map_err(&error)?;
    let wanted: Vec<String> = match names {
        Some(names) => names.to_vec(),
        None => mapped.tensors().into_iter().map(|(name, _)| name).collect(),
    };
    wanted
        .into_iter()
        .map(|name| {
            let t = mapped
                .load(&name, device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(&error)?;
            Ok((name, t))
        })
        .collect()
}

impl StableDiffusion {
    /// Loads every component; `dtype` is the compute precision of the UNet and the text encoder
    /// (see [`super::precision::Precision`]). The VAE computes in f32 instead of f16 when its
    /// config asks for it (`force_upcast`, as diffusers does: SD 1.x's VAE overflows in f16).
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        let config = PipelineConfig {
            unet: UnetConfig::load(&files.unet_config)?,
            vae: VaeConfig::load(&files.vae_config)?,
            text_encoder: TextEncoderConfig::load(&files.text_encoder_config)?,
            scheduler: SchedulerConfig::load(&files.scheduler_config)?,
        };
        if config.unet.cross_attention_dim != config.text_encoder.hidden_size {
            return Err(EngineError::config(
                &files.unet_config,
                "cross_attention_dim",
                format!(
                    "({}) does not match the text encoder's hidden_size ({})",
                    config.unet.cross_attention_dim, config.text_encoder.hidden_size
                ),
            ));
        }
        let special: Vec<&Path> = [&files.special_tokens_map, &files.tokenizer_config]
            .into_iter()
            .flatten()
            .map(|p| p.as_path())
            .collect();
        let tokenizer = ClipTokenizer::load(
            &TokenizerFiles {
                vocab: &files.tokenizer_vocab,
                merges: &files.tokenizer_merges,
                special_tokens: &special,
            },
            config.text_encoder.max_position_embeddings,
        )?;

        // The UNet's tensors are kept by name: fine-tuning rebuilds the UNet around them.
        let mut unet_weights = read_weights("UNet", &files.unet_weights, None, dtype, device)?;
        let text_error = weights_error("text encoder", &files.text_encoder_weights);
        let (text_encoder, loras) = if files.loras.is_empty() {
            let text_vb = open_weights("text encoder", &files.text_encoder_weights, dtype, device)?;
            let encoder = TextEncoder::new(&config.text_encoder, text_vb).map_err(text_error)?;
            (encoder, AppliedLoras::default())
        } else {
            // LoRAs change weights: the text encoder is built from merged tensors.
            let mut text_weights = read_weights(
                "text encoder",
                &files.text_encoder_weights,
                None,
                dtype,
                device,
            )?;
            let loras = AppliedLoras::load(&files.loras, &unet_weights, &text_weights)?;
            loras.unet.merge_into(&mut unet_weights)?;
            loras.text_encoder.merge_into(&mut text_weights)?;
            let text_vb = VarBuilder::from_tensors(text_weights, dtype, device);
            let encoder = TextEncoder::new(&config.text_encoder, text_vb).map_err(text_error)?;
            (encoder, loras)
        };
        let unet = UNet::new(
            &config.unet,
            VarBuilder::from_tensors(unet_weights.clone(), dtype, device),
        )
        .map_err(weights_error("UNet", &files.unet_weights))?;
        let vae_dtype = if dtype == DType::F16 && config.vae.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let vae_vb = open_weights("VAE", &files.vae_weights, vae_dtype, device)?;
        let vae =
            Vae::new(&config.vae, vae_vb).map_err(weights_error("VAE", &files.vae_weights))?;
        let scheduler = DdimScheduler::new(&config.scheduler);
        Ok(Self {
            config,
            tokenizer,
            text_encoder,
            unet,
            unet_weights,
            unet_file: files.unet_weights.clone(),
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

    /// The named UNet weights as the model file holds them, in the compute dtype, with the
    /// applied LoRAs merged in: the untrained values, without keeping a copy of them in memory.
    pub fn read_unet_weights(&self, names: &[String]) -> Result<HashMap<String, Tensor>> {
        let mut weights = read_weights(
            "UNet",
            &self.unet_file,
            Some(names),
            self.dtype,
            &self.device,
        )?;
        self.loras.unet.merge_into(&mut weights)?;
        Ok(weights)
    }

    /// The LoRAs applied to the base weights (empty when none were chosen).
    pub fn loras(&self) -> &AppliedLoras {
        &self.loras
    }

    /// The safetensors file the UNet was loaded from.
    pub fn unet_file(&self) -> &Path {
        &self.unet_file
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

    /// Tokenizes and encodes one prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<EncodedPrompt> {
        let tokens = self.tokenizer.encode(prompt)?;
        let ids = Tensor::new(tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let embedding = self.text_encoder.forward(&ids)?;
        Ok(EncodedPrompt { embedding, tokens })
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
        .clamp(0f32, 1f32)?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes = pixels.iter().map(|v| (v * 255.0).round() as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| EngineError::InvalidRequest("decoded image has an unexpected size".into()))
}
