//! Building blocks shared by the UNet, the VAE and the text encoder, named as in diffusers so
//! real checkpoints load as they are.
//!
//! Every layer has two paths. Inference (no input or parameter tracks a gradient, or inside
//! `autograd::no_grad`) runs candle's fastest kernels. Training runs one op per layer whose
//! hand-written backward computes only the gradients that are needed and keeps only the
//! layer's input (see `autograd`); each is checked against candle's autograd and finite
//! differences in tests.

mod attention;
mod attention_cpu;
mod conv;
mod conv_cpu;
mod geglu;
mod group_norm_cpu;
mod linear;
mod norm;

use candle_core::{D, Layout, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// The elements a CPU kernel's operand covers, which must be contiguous (the kernels' callers
/// make them so); `kernel` names the kernel in the error.
fn contiguous_elements<'a, T>(data: &'a [T], layout: &Layout, kernel: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{kernel}: operands must be contiguous"),
    }
}

pub use attention::attention;
pub use conv::{Conv2d, conv2d, conv2d_no_bias};
pub use geglu::geglu;
pub use linear::{Linear, linear, linear_no_bias};
pub use norm::{GroupNorm, LayerNorm, group_norm, wide};

/// diffusers' ResnetBlock2D with the "default" time-embedding mode (added, not scale-shift).
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

pub struct ResnetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `None` for the VAE's resnets, which take no time embedding.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    pub fn new(spec: &ResnetSpec, vb: VarBuilder) -> Result<Self> {
        let ResnetSpec {
            in_channels,
            out_channels,
            ..
        } = *spec;
        let time_emb_proj = match spec.temb_channels {
            Some(t) => Some(linear(t, out_channels, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if in_channels != out_channels {
            Some(conv2d(
                in_channels,
                out_channels,
                1,
                1,
                0,
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(spec.groups, in_channels, spec.eps, vb.pp("norm1"))?,
            conv1: conv2d(in_channels, out_channels, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(spec.groups, out_channels, spec.eps, vb.pp("norm2"))?,
            conv2: conv2d(out_channels, out_channels, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: spec.output_scale_factor,
        })
    }

    /// `temb` is the time embedding `[batch, temb_channels]` (ignored by the VAE's blocks).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Halves the resolution with a strided 3x3 convolution (`downsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
    /// The VAE pads only right and bottom, by one, then convolves without padding.
    pad_right_bottom: bool,
}

impl Downsample {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 2, padding, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Doubles the resolution (nearest neighbour), then a 3x3 convolution (`upsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(h * 2, w * 2)?)
    }
}
