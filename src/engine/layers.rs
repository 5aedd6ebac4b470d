//! Building blocks shared by the UNet, the VAE and the text encoder, named as in diffusers so
//! real checkpoints load as they are.
//!
//! Every block here has a correct backward pass. candle's fused softmax and LayerNorm kernels
//! have none (their gradients are silently missing), so those kernels are used only when
//! neither the input nor the weights are being tracked for gradients, which is every inference
//! call: inference is as fast as candle's own models, training is correct.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};

/// True when a gradient may have to flow through this computation.
pub fn tracks_gradient(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.track_op())
}

/// The dtype to accumulate in: f32 for half precision, the dtype itself otherwise.
pub fn wide(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// LayerNorm over the last dimension, with elementwise affine weights.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's fused kernel has no f64 version ("unsupported dtype").
        if x.dtype() != DType::F64 && !tracks_gradient(&[x, &self.weight, &self.bias]) {
            return candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            );
        }
        // Differentiable path from primitive ops; halves are computed in f32 like PyTorch.
        let dtype = x.dtype();
        let x = x.to_dtype(wide(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Softmax over the last dimension, fused when no gradient is needed.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Multi-head scaled dot-product attention.
///
/// `q` is `[batch, queries, heads * head_dim]`, `k` and `v` are `[batch, keys, heads * head_dim]`.
/// With `upcast`, scores and softmax run in f32 whatever the input dtype (SD 2.x needs this in
/// half precision to avoid overflow).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, upcast: bool) -> Result<Tensor> {
    let (batch, queries, inner) = q.dims3()?;
    let keys = k.dim(1)?;
    let head_dim = inner / heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((batch, len, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let dtype = q.dtype();
    let compute = if upcast { wide(dtype) } else { dtype };
    let q = (split(q, queries)?.to_dtype(compute)? * scale)?;
    let k = split(k, keys)?.to_dtype(compute)?;
    let v = split(v, keys)?;
    let scores = q.matmul(&k.t()?)?;
    let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((batch, queries, inner))?
        .to_dtype(dtype)
}

pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let config = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d(in_channels, out_channels, kernel, config, vb)
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
}

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
            Some(t) => Some(candle_nn::linear(t, out_channels, vb.pp("time_emb_proj"))?),
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
        let mut h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
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
