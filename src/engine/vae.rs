//! The AutoencoderKL that maps images to latents and back (diffusers names and layout).
//!
//! Encoding returns the latent distribution's mean and standard deviation; sampling from it is
//! the caller's business with the program's own seeded noise, so an encode is reproducible.
//! (candle-transformers keeps them private and samples from an unseedable generator.)

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::VaeConfig;
use super::layers::{
    Conv2d, Downsample, GroupNorm, Linear, ResnetBlock, ResnetSpec, Upsample, attention, conv2d,
    group_norm, linear,
};

/// The VAE's resnets and attention use eps 1e-6 regardless of the config.
const VAE_EPS: f64 = 1e-6;

/// Single-head self-attention over pixels with a GroupNorm in front and a residual.
#[derive(Debug, Clone)]
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        // Checkpoints converted before diffusers 0.14 name these query/key/value/proj_attn.
        let linear = |new: &str, old: &str| {
            linear(channels, channels, vb.pp(new))
                .or_else(|_| linear(channels, channels, vb.pp(old)))
        };
        Ok(Self {
            group_norm: group_norm(groups, channels, VAE_EPS, vb.pp("group_norm"))?,
            to_q: linear("to_q", "query")?,
            to_k: linear("to_k", "key")?,
            to_v: linear("to_v", "value")?,
            to_out: linear("to_out.0", "proj_attn")?,
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = self.to_out.forward(&attention(&q, &k, &v, 1, true)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    first: ResnetBlock,
    attention: Option<AttentionBlock>,
    second: ResnetBlock,
}

impl MidBlock {
    fn new(channels: usize, groups: usize, with_attention: bool, vb: VarBuilder) -> Result<Self> {
        let spec = resnet_spec(channels, channels, groups);
        Ok(Self {
            first: ResnetBlock::new(&spec, vb.pp("resnets.0"))?,
            attention: if with_attention {
                Some(AttentionBlock::new(
                    channels,
                    groups,
                    vb.pp("attentions.0"),
                )?)
            } else {
                None
            },
            second: ResnetBlock::new(&spec, vb.pp("resnets.1"))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x, None)?;
        if let Some(attention) = &self.attention {
            h = attention.forward(&h)?;
        }
        self.second.forward(&h, None)
    }
}

fn resnet_spec(in_channels: usize, out_channels: usize, groups: usize) -> ResnetSpec {
    ResnetSpec {
        in_channels,
        out_channels,
        temb_channels: None,
        groups,
        eps: VAE_EPS,
        output_scale_factor: 1.0,
    }
}

#[derive(Debug, Clone)]
struct Stage {
    resnets: Vec<ResnetBlock>,
    resample: Option<Resample>,
}

#[derive(Debug, Clone)]
enum Resample {
    Down(Downsample),
    Up(Upsample),
}

impl Module for Stage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, None)?;
        }
        match &self.resample {
            Some(Resample::Down(down)) => down.forward(&h),
            Some(Resample::Up(up)) => up.forward(&h),
            None => Ok(h),
        }
    }
}

/// The latent distribution of an encoded image, already divided out of the quant conv.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    pub mean: Tensor,
    pub std: Tensor,
}

impl LatentDistribution {
    /// `mean + std * noise`, unscaled (multiply by the config's scaling factor for the UNet).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * noise)?
    }
}

#[derive(Debug, Clone)]
pub struct Vae {
    config: VaeConfig,
    encoder_conv_in: Conv2d,
    encoder_stages: Vec<Stage>,
    encoder_mid: MidBlock,
    encoder_norm_out: GroupNorm,
    encoder_conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder_conv_in: Conv2d,
    decoder_mid: MidBlock,
    decoder_stages: Vec<Stage>,
    decoder_norm_out: GroupNorm,
    decoder_conv_out: Conv2d,
}

impl Vae {
    pub fn new(config: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let c = config;
        let groups = c.norm_num_groups;
        let channels = &c.block_out_channels;
        let n = channels.len();
        let last = channels[n - 1];
        let latent = c.latent_channels;

        let enc = vb.pp("encoder");
        let mut encoder_stages = Vec::with_capacity(n);
        let mut out_channels = channels[0];
        for (i, &block_channels) in channels.iter().enumerate() {
            let vb = enc.pp(format!("down_blocks.{i}"));
            let in_channels = out_channels;
            out_channels = block_channels;
            let resnets = (0..c.layers_per_block)
                .map(|l| {
                    let resnet_in = if l == 0 { in_channels } else { out_channels };
                    ResnetBlock::new(
                        &resnet_spec(resnet_in, out_channels, groups),
                        vb.pp(format!("resnets.{l}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < n {
                Some(Resample::Down(Downsample::new(
                    out_channels,
                    0,
                    vb.pp("downsamplers.0"),
                )?))
            } else {
                None
            };
            encoder_stages.push(Stage { resnets, resample });
        }

        let dec = vb.pp("decoder");
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut decoder_stages = Vec::with_capacity(n);
        let mut out_channels = reversed[0];
        for (i, &block_channels) in reversed.iter().enumerate() {
            let vb = dec.pp(format!("up_blocks.{i}"));
            let in_channels = out_channels;
            out_channels = block_channels;
            let resnets = (0..c.layers_per_block + 1)
                .map(|l| {
                    let resnet_in = if l == 0 { in_channels } else { out_channels };
                    ResnetBlock::new(
                        &resnet_spec(resnet_in, out_channels, groups),
                        vb.pp(format!("resnets.{l}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < n {
                Some(Resample::Up(Upsample::new(
                    out_channels,
                    vb.pp("upsamplers.0"),
                )?))
            } else {
                None
            };
            decoder_stages.push(Stage { resnets, resample });
        }

        Ok(Self {
            config: c.clone(),
            encoder_conv_in: conv2d(c.in_channels, channels[0], 3, 1, 1, enc.pp("conv_in"))?,
            encoder_stages,
            encoder_mid: MidBlock::new(last, groups, c.mid_block_attention, enc.pp("mid_block"))?,
            encoder_norm_out: group_norm(groups, last, VAE_EPS, enc.pp("conv_norm_out"))?,
            encoder_conv_out: conv2d(last, 2 * latent, 3, 1, 1, enc.pp("conv_out"))?,
            quant_conv: if c.use_quant_conv {
                Some(conv2d(
                    2 * latent,
                    2 * latent,
                    1,
                    1,
                    0,
                    vb.pp("quant_conv"),
                )?)
            } else {
                None
            },
            post_quant_conv: if c.use_post_quant_conv {
                Some(conv2d(latent, latent, 1, 1, 0, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            decoder_conv_in: conv2d(latent, last, 3, 1, 1, dec.pp("conv_in"))?,
            decoder_mid: MidBlock::new(last, groups, c.mid_block_attention, dec.pp("mid_block"))?,
            decoder_stages,
            decoder_norm_out: group_norm(groups, channels[0], VAE_EPS, dec.pp("conv_norm_out"))?,
            decoder_conv_out: conv2d(channels[0], c.out_channels, 3, 1, 1, dec.pp("conv_out"))?,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Encodes images `[batch, 3, H, W]` in [-1, 1] into the latent distribution (unscaled).
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution> {
        let mut h = self.encoder_conv_in.forward(images)?;
        for stage in &self.encoder_stages {
            h = stage.forward(&h)?;
        }
        h = self.encoder_mid.forward(&h)?;
        h = self
            .encoder_conv_out
            .forward(&self.encoder_norm_out.forward_silu(&h)?)?;
        if let Some(quant) = &self.quant_conv {
            h = quant.forward(&h)?;
        }
        let latent = self.config.latent_channels;
        let mean = h.narrow(1, 0, latent)?;
        let logvar = h.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDistribution { mean, std })
    }

    /// Decodes unscaled latents into images in roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut h = match &self.post_quant_conv {
            Some(post) => post.forward(latents)?,
            None => latents.clone(),
        };
        h = self.decoder_conv_in.forward(&h)?;
        h = self.decoder_mid.forward(&h)?;
        for stage in &self.decoder_stages {
            h = stage.forward(&h)?;
        }
        self.decoder_conv_out
            .forward(&self.decoder_norm_out.forward_silu(&h)?)
    }
}
