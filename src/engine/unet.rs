//! The project's own differentiable UNet (diffusers `UNet2DConditionModel`), built from the
//! model's `config.json` with diffusers' parameter names.
//!
//! Why not candle-transformers' UNet: its fused softmax and LayerNorm have no backward, it
//! takes one timestep per batch, and it ignores `norm_num_groups` in resnets; fine-tuning
//! needs all three right.

use candle_core::{DType, Module, Result, Tensor, Var};
use candle_nn::VarBuilder;

use super::autograd::{checkpoint, grad_enabled};
use super::config::{BlockAttention, TextTimeConfig, UnetConfig};
use super::layers::{
    Conv2d, Downsample, GroupNorm, Linear, ResnetBlock, ResnetSpec, Upsample, conv2d, group_norm,
    linear,
};
use super::transformer::{SpatialTransformer, SpatialTransformerSpec};

/// Sinusoidal timestep features, one row per batch element (diffusers `get_timestep_embedding`).
///
/// Computed in f32 exactly as diffusers orders the operations, so large timesteps match.
pub fn timestep_features(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let ln_max_period = (10000f64).ln() as f32;
    let divisor = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-ln_max_period * i as f32) / divisor).exp())
        .collect();
    let device = timesteps.device();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (first, second) = if flip_sin_to_cos {
        (args.cos()?, args.sin()?)
    } else {
        (args.sin()?, args.cos()?)
    };
    let emb = Tensor::cat(&[first, second], 1)?;
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

#[derive(Debug, Clone)]
struct TimeEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl Module for TimeEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// SDXL's added conditioning for one batch (see [`super::config::TextTimeConfig`]).
#[derive(Debug, Clone)]
pub struct TextTime {
    /// The second text encoder's projected end-of-text state, `[batch, pooled_dim]`.
    pub pooled: Tensor,
    /// `[batch, 6]`: original height and width, crop top and left, target height and width,
    /// in pixels.
    pub size_numbers: Tensor,
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample>,
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample>,
}

#[derive(Debug, Clone)]
struct MidBlock {
    first: ResnetBlock,
    layers: Vec<(SpatialTransformer, ResnetBlock)>,
}

#[derive(Debug, Clone)]
pub struct UNet {
    config: UnetConfig,
    time_embedding: TimeEmbedding,
    /// SDXL's `add_embedding` (linear, SiLU, linear) for [`TextTime`].
    add_embedding: Option<TimeEmbedding>,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Recompute each resnet's and transformer's activations in backward instead of keeping
    /// them (see [`UNet::checkpointed`]).
    checkpointing: bool,
}

impl UNet {
    pub fn new(config: &UnetConfig, vb: VarBuilder) -> Result<Self> {
        let c = config;
        let time_dim = c.time_embed_dim();
        let first_channels = c.block_out_channels[0];
        let time_embedding = TimeEmbedding {
            linear_1: linear(first_channels, time_dim, vb.pp("time_embedding.linear_1"))?,
            linear_2: linear(time_dim, time_dim, vb.pp("time_embedding.linear_2"))?,
        };
        let add_embedding = match &c.text_time {
            Some(text_time) => Some(TimeEmbedding {
                linear_1: linear(
                    text_time.input_dim,
                    time_dim,
                    vb.pp("add_embedding.linear_1"),
                )?,
                linear_2: linear(time_dim, time_dim, vb.pp("add_embedding.linear_2"))?,
            }),
            None => None,
        };
        let conv_in = conv2d(
            c.in_channels,
            first_channels,
            c.conv_in_kernel,
            1,
            c.conv_in_kernel / 2,
            vb.pp("conv_in"),
        )?;
        let resnet = |in_channels: usize, out_channels: usize, vb: VarBuilder| {
            ResnetBlock::new(
                &ResnetSpec {
                    in_channels,
                    out_channels,
                    temb_channels: Some(time_dim),
                    groups: c.norm_num_groups,
                    eps: c.norm_eps,
                    output_scale_factor: 1.0,
                },
                vb,
            )
        };
        let transformer = |channels: usize, attention: &BlockAttention, vb: VarBuilder| {
            SpatialTransformer::new(
                &SpatialTransformerSpec {
                    channels,
                    heads: attention.heads,
                    layers: attention.transformer_layers,
                    context_dim: c.cross_attention_dim,
                    groups: c.norm_num_groups,
                    linear_projection: c.use_linear_projection,
                    upcast_attention: c.upcast_attention,
                },
                vb,
            )
        };

        let n = c.down_blocks.len();
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_channels = first_channels;
        for (i, block) in c.down_blocks.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let in_channels = out_channels;
            out_channels = block.out_channels;
            let mut resnets = Vec::with_capacity(block.layers);
            let mut attentions = Vec::new();
            for layer in 0..block.layers {
                let resnet_in = if layer == 0 {
                    in_channels
                } else {
                    out_channels
                };
                resnets.push(resnet(
                    resnet_in,
                    out_channels,
                    vb.pp(format!("resnets.{layer}")),
                )?);
                if let Some(attention) = &block.attention {
                    attentions.push(transformer(
                        out_channels,
                        attention,
                        vb.pp(format!("attentions.{layer}")),
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample::new(
                    out_channels,
                    c.downsample_padding,
                    vb.pp("downsamplers.0"),
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let last_channels = *c.block_out_channels.last().unwrap_or(&first_channels);
        let mid_block = match &c.mid_block {
            None => None,
            Some(attention) => {
                let vb = vb.pp("mid_block");
                let mid_resnet = |i: usize| {
                    ResnetBlock::new(
                        &ResnetSpec {
                            in_channels: last_channels,
                            out_channels: last_channels,
                            temb_channels: Some(time_dim),
                            groups: c.norm_num_groups,
                            eps: c.norm_eps,
                            output_scale_factor: c.mid_block_scale_factor,
                        },
                        vb.pp(format!("resnets.{i}")),
                    )
                };
                Some(MidBlock {
                    first: mid_resnet(0)?,
                    layers: vec![(
                        transformer(last_channels, attention, vb.pp("attentions.0"))?,
                        mid_resnet(1)?,
                    )],
                })
            }
        };

        // Up blocks mirror the down blocks; each resnet also takes one skip connection.
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_channels = reversed[0];
        for (i, block) in c.up_blocks.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let prev_out = out_channels;
            out_channels = reversed[i];
            let in_channels = reversed[(i + 1).min(n - 1)];
            let mut resnets = Vec::with_capacity(block.layers);
            let mut attentions = Vec::new();
            for layer in 0..block.layers {
                let skip = if layer + 1 == block.layers {
                    in_channels
                } else {
                    out_channels
                };
                let resnet_in = if layer == 0 { prev_out } else { out_channels };
                resnets.push(resnet(
                    resnet_in + skip,
                    out_channels,
                    vb.pp(format!("resnets.{layer}")),
                )?);
                if let Some(attention) = &block.attention {
                    attentions.push(transformer(
                        out_channels,
                        attention,
                        vb.pp(format!("attentions.{layer}")),
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample::new(out_channels, vb.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            config: c.clone(),
            time_embedding,
            add_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                c.norm_num_groups,
                first_channels,
                c.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(
                first_channels,
                c.out_channels,
                c.conv_out_kernel,
                1,
                c.conv_out_kernel / 2,
                vb.pp("conv_out"),
            )?,
            checkpointing: false,
        })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// The same UNet (same weights, no copy) with gradient checkpointing per resnet and per
    /// transformer, as diffusers' `enable_gradient_checkpointing`: training keeps only each
    /// block's input and recomputes the rest during backward, about one extra forward pass
    /// for a fraction of the memory. Gradients must then be taken with
    /// `autograd::accumulate_gradients`.
    pub fn checkpointed(&self, on: bool) -> UNet {
        UNet {
            checkpointing: on,
            ..self.clone()
        }
    }

    fn resnet(&self, resnet: &ResnetBlock, h: &Tensor, temb: &Tensor) -> Result<Tensor> {
        if !self.checkpointing {
            return resnet.forward(h, Some(temb));
        }
        let resnet = resnet.clone();
        checkpoint(&[h, temb], move |x| resnet.forward(&x[0], Some(&x[1])))
    }

    fn transformer(
        &self,
        attention: &SpatialTransformer,
        h: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        if !self.checkpointing {
            return attention.forward(h, context);
        }
        let attention = attention.clone();
        checkpoint(&[h, context], move |x| attention.forward(&x[0], &x[1]))
    }

    /// Predicts noise (or v, or x0, per the scheduler's prediction type).
    ///
    /// `sample` is `[batch, in_channels, h, w]` with h and w multiples of
    /// 2^(blocks - 1); `timesteps` holds one timestep per batch element (`[batch]`, any
    /// numeric dtype); `context` is the text encoder's output `[batch, 77, cross_attention_dim]`.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, None)
    }

    /// What the time embedding gains from SDXL's added conditioning (diffusers'
    /// `aug_emb` for `addition_embed_type: "text_time"`), `[batch, time_embed_dim]`.
    pub fn text_time_embedding(&self, text_time: &TextTime, dtype: DType) -> Result<Tensor> {
        let (Some(config), Some(add_embedding)) = (&self.config.text_time, &self.add_embedding)
        else {
            candle_core::bail!(
                "this UNet takes no pooled text embedding or size numbers (it is not SDXL's)"
            );
        };
        let (batch, numbers) = text_time.size_numbers.dims2()?;
        if numbers != TextTimeConfig::SIZE_NUMBERS {
            candle_core::bail!("SDXL's size conditioning is 6 numbers per image, got {numbers}");
        }
        let pooled_dim = text_time.pooled.dim(1)?;
        if text_time.pooled.dim(0)? != batch || pooled_dim != config.pooled_dim() {
            candle_core::bail!(
                "the pooled text embedding is {:?}, the UNet expects [{batch}, {}]",
                text_time.pooled.dims(),
                config.pooled_dim()
            );
        }
        // As diffusers: each number through the same sinusoid as the timesteps, in f32, the
        // rows joined per image after the pooled embedding, then cast to the UNet's dtype.
        let sizes = timestep_features(
            &text_time.size_numbers.flatten_all()?,
            config.time_embed_dim,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .reshape((batch, numbers * config.time_embed_dim))?;
        let joined = Tensor::cat(&[&text_time.pooled.to_dtype(DType::F32)?, &sizes], 1)?;
        add_embedding.forward(&joined.to_dtype(dtype)?)
    }

    /// [`Self::forward`] with SDXL's added conditioning, which an SDXL UNet requires and
    /// any other refuses.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        text_time: Option<&TextTime>,
    ) -> Result<Tensor> {
        let (batch, channels, height, width) = sample.dims4()?;
        if self.config.text_time.is_some() && text_time.is_none() {
            candle_core::bail!(
                "this UNet is SDXL's and needs the pooled text embedding and the size numbers"
            );
        }
        let multiple = 1usize << self.config.downsample_count();
        if channels != self.config.in_channels {
            candle_core::bail!(
                "the UNet takes {} input channels but was given {channels}",
                self.config.in_channels
            );
        }
        if height % multiple != 0 || width % multiple != 0 {
            candle_core::bail!("latent size {height}x{width} is not a multiple of {multiple}");
        }
        if timesteps.elem_count() != batch {
            candle_core::bail!(
                "expected one timestep per batch element ({batch}), got {}",
                timesteps.elem_count()
            );
        }

        let features = timestep_features(
            &timesteps.flatten_all()?,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(sample.dtype())?;
        let mut temb = self.time_embedding.forward(&features)?;
        if let Some(text_time) = text_time {
            temb = (temb + self.text_time_embedding(text_time, sample.dtype())?)?;
        }

        // A checkpointed segment is differentiated only when one of its inputs tracks a
        // gradient. Making the input a leaf makes every segment's input one, so that segments
        // whose only trainable weights are inside them (cross-kv, LoRA) are checkpointed too.
        let sample = if self.checkpointing && grad_enabled() && !sample.track_op() {
            Var::from_tensor(sample)?.into_inner()
        } else {
            sample.clone()
        };
        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for (i, resnet) in block.resnets.iter().enumerate() {
                h = self.resnet(resnet, &h, &temb)?;
                if let Some(attention) = block.attentions.get(i) {
                    h = self.transformer(attention, &h, context)?;
                }
                skips.push(h.clone());
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h)?;
                skips.push(h.clone());
            }
        }

        if let Some(mid) = &self.mid_block {
            h = self.resnet(&mid.first, &h, &temb)?;
            for (attention, resnet) in &mid.layers {
                h = self.transformer(attention, &h, context)?;
                h = self.resnet(resnet, &h, &temb)?;
            }
        }

        for block in &self.up_blocks {
            for (i, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    candle_core::Error::Msg("UNet skip connections ran out".into())
                })?;
                h = self.resnet(resnet, &Tensor::cat(&[&h, &skip], 1)?, &temb)?;
                if let Some(attention) = block.attentions.get(i) {
                    h = self.transformer(attention, &h, context)?;
                }
            }
            if let Some(up) = &block.upsampler {
                h = up.forward(&h)?;
            }
        }

        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}
