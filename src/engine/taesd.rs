//! The tiny autoencoder (diffusers' `AutoencoderTiny`, madebyollin's TAESD): plain 3x3
//! convolutions and ReLUs, no attention and no norms, so a decode costs a small fraction of
//! the full VAE's. It previews the denoising; the full VAE still makes the final image.
//!
//! Parameters keep diffusers' names: `encoder.layers.{i}` and `decoder.layers.{i}` index one
//! `nn.Sequential` each, in which activations and upsamplings take indices too (they hold no
//! weights, so those indices are skipped in the file).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use super::config::{TinyActivation, TinyVaeConfig};
use super::error::{EngineError, Result};
use super::layers::{Conv2d, conv2d, conv2d_no_bias};
use super::model::{open_weights, weights_error};

/// The decoder's soft clamp of its input, `tanh(x / 3) * 3`, as diffusers' `DecoderTiny`.
const LATENT_CLAMP: f64 = 3.0;

/// diffusers' `AutoencoderTinyBlock`: three convolutions with activations between them, a
/// residual, and a ReLU after the sum (always a ReLU, whatever `act_fn` says).
#[derive(Debug, Clone)]
struct TinyBlock {
    convs: [Conv2d; 3],
    act: TinyActivation,
}

impl TinyBlock {
    fn new(
        channels: usize,
        act: TinyActivation,
        vb: candle_nn::VarBuilder,
    ) -> candle_core::Result<Self> {
        // `conv.0`, `conv.2`, `conv.4`: the activations sit at 1 and 3. Input and output
        // widths are equal in every tiny autoencoder, so the skip is the identity.
        let conv = |i: usize| conv2d(channels, channels, 3, 1, 1, vb.pp(format!("conv.{i}")));
        Ok(Self {
            convs: [conv(0)?, conv(2)?, conv(4)?],
            act,
        })
    }
}

impl Module for TinyBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let [first, second, third] = &self.convs;
        let h = activate(&first.forward(x)?, self.act)?;
        let h = activate(&second.forward(&h)?, self.act)?;
        (third.forward(&h)? + x)?.relu()
    }
}

fn activate(x: &Tensor, act: TinyActivation) -> candle_core::Result<Tensor> {
    match act {
        TinyActivation::Relu => x.relu(),
        TinyActivation::Silu => x.silu(),
        TinyActivation::Gelu => x.gelu_erf(),
        // x * tanh(softplus(x)); softplus overflows to inf only where tanh is 1 anyway.
        TinyActivation::Mish => x.mul(&x.exp()?.affine(1.0, 1.0)?.log()?.tanh()?),
    }
}

/// One entry of an encoder's or decoder's `layers` sequence.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Act(TinyActivation),
    Block(TinyBlock),
    /// Nearest-neighbour upsampling by this factor.
    Upsample(usize),
}

impl Module for Layer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Layer::Conv(conv) => conv.forward(x),
            Layer::Act(act) => activate(x, *act),
            Layer::Block(block) => block.forward(x),
            Layer::Upsample(factor) => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(h * factor, w * factor)
            }
        }
    }
}

fn run(layers: &[Layer], x: Tensor) -> candle_core::Result<Tensor> {
    layers.iter().try_fold(x, |h, layer| layer.forward(&h))
}

/// diffusers' `EncoderTiny`: per stage a convolution (stride 2 after the first stage) and its
/// blocks, then a convolution to the latent channels.
fn encoder_layers(c: &TinyVaeConfig, vb: candle_nn::VarBuilder) -> candle_core::Result<Vec<Layer>> {
    let mut layers = Vec::new();
    let index = |layers: &Vec<Layer>| vb.pp(layers.len().to_string());
    for (stage, (&channels, &blocks)) in c
        .encoder_block_out_channels
        .iter()
        .zip(&c.num_encoder_blocks)
        .enumerate()
    {
        let conv = if stage == 0 {
            conv2d(c.in_channels, channels, 3, 1, 1, index(&layers))?
        } else {
            conv2d_no_bias(channels, channels, 3, 2, 1, index(&layers))?
        };
        layers.push(Layer::Conv(conv));
        for _ in 0..blocks {
            let block = TinyBlock::new(channels, c.act_fn, index(&layers))?;
            layers.push(Layer::Block(block));
        }
    }
    let last = c.encoder_block_out_channels[c.encoder_block_out_channels.len() - 1];
    let out = conv2d(last, c.latent_channels, 3, 1, 1, index(&layers))?;
    layers.push(Layer::Conv(out));
    Ok(layers)
}

/// diffusers' `DecoderTiny`: a convolution from the latents and an activation, then per
/// stage its blocks, an upsampling (not after the last) and a convolution (with a bias and
/// to the output channels only in the last stage).
fn decoder_layers(c: &TinyVaeConfig, vb: candle_nn::VarBuilder) -> candle_core::Result<Vec<Layer>> {
    let index = |layers: &Vec<Layer>| vb.pp(layers.len().to_string());
    let channels = &c.decoder_block_out_channels;
    let mut layers = vec![Layer::Conv(conv2d(
        c.latent_channels,
        channels[0],
        3,
        1,
        1,
        vb.pp("0"),
    )?)];
    layers.push(Layer::Act(c.act_fn));
    let stages = channels.len();
    for (stage, (&width, &blocks)) in channels.iter().zip(&c.num_decoder_blocks).enumerate() {
        for _ in 0..blocks {
            let block = TinyBlock::new(width, c.act_fn, index(&layers))?;
            layers.push(Layer::Block(block));
        }
        let conv = if stage + 1 < stages {
            layers.push(Layer::Upsample(c.upsampling_scaling_factor));
            conv2d_no_bias(width, width, 3, 1, 1, index(&layers))?
        } else {
            conv2d(width, c.out_channels, 3, 1, 1, index(&layers))?
        };
        layers.push(Layer::Conv(conv));
    }
    Ok(layers)
}

/// A tiny autoencoder loaded from a diffusers folder's `config.json` and weights.
#[derive(Debug, Clone)]
pub struct TinyAutoencoder {
    config: TinyVaeConfig,
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
    dtype: DType,
}

impl TinyAutoencoder {
    /// Reads the config and the weights (converted to `dtype` on `device`).
    pub fn load(
        config_file: &Path,
        weights_file: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let config = TinyVaeConfig::load(config_file)?;
        let vb = open_weights("tiny VAE", weights_file, dtype, device)?;
        Self::new(config, vb, dtype).map_err(weights_error("tiny VAE", weights_file))
    }

    /// Builds the model from weights named as diffusers names them.
    pub fn new(
        config: TinyVaeConfig,
        vb: candle_nn::VarBuilder,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            encoder: encoder_layers(&config, vb.pp("encoder.layers"))?,
            decoder: decoder_layers(&config, vb.pp("decoder.layers"))?,
            config,
            dtype,
        })
    }

    pub fn config(&self) -> &TinyVaeConfig {
        &self.config
    }

    /// The dtype the weights were loaded in (inputs are converted to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `AutoencoderTiny.decode`: latents `[batch, latent_channels, h, w]` as the pipeline
    /// passes them (already divided by `scaling_factor`) to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_input(latents, self.config.latent_channels, 1, "latents")?;
        let x = latents.to_dtype(self.dtype)?;
        let clamped = ((&x / LATENT_CLAMP)?.tanh()? * LATENT_CLAMP)?;
        // The decoder works in [0, 1]; diffusers maps its output back to [-1, 1].
        Ok(run(&self.decoder, clamped)?.affine(2.0, -1.0)?)
    }

    /// `AutoencoderTiny.encode`: images `[batch, in_channels, H, W]` in [-1, 1] to latents.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let factor = self.config.encoder_downscale_factor();
        self.check_input(images, self.config.in_channels, factor, "images")?;
        // The encoder works on images in [0, 1].
        let x = images.to_dtype(self.dtype)?.affine(0.5, 0.5)?;
        Ok(run(&self.encoder, x)?)
    }

    fn check_input(&self, x: &Tensor, channels: usize, multiple: usize, what: &str) -> Result<()> {
        let ok = match x.dims() {
            &[batch, c, h, w] => {
                batch > 0
                    && c == channels
                    && h > 0
                    && w > 0
                    && h % multiple == 0
                    && w % multiple == 0
            }
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(EngineError::InvalidRequest(format!(
                "the tiny VAE needs {what} of shape [batch, {channels}, h, w] with sides a multiple of {multiple}, got {:?}",
                x.dims()
            )))
        }
    }
}
