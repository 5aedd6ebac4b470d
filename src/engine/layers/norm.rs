//! GroupNorm and LayerNorm. Statistics are always computed in f32 (half precision would lose
//! the variance); the training path is one op with a hand-written backward that keeps only the
//! input, instead of the half-dozen activation-sized intermediates of the composed version.
//!
//! candle's fused LayerNorm kernel has no backward at all, so it serves only inference.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::group_norm_cpu;
use crate::engine::autograd::{Backward, param, tracks_gradient, with_backward};

/// The dtype to accumulate in: f32 for half precision, the dtype itself otherwise.
pub fn wide(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// `t` summed over `dims` in f32 when it is half precision, returned in its own dtype: a bias's
/// gradient sums thousands of values, which in f16 alone is off by about 1e-2.
pub(super) fn wide_sum<D: candle_core::shape::Dims>(t: &Tensor, dims: D) -> Result<Tensor> {
    t.to_dtype(wide(t.dtype()))?.sum(dims)?.to_dtype(t.dtype())
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension of `x` (in its own dtype).
fn standardize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(variance + eps)?.sqrt()?)
}

/// The input's gradient of `standardize`, given the standardized values and the gradient with
/// respect to them, both `[rows, n]` in the accumulation dtype.
fn standardize_backward(
    x: &Tensor,
    normalized: &Tensor,
    grad_normalized: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let inv_std = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let mean_grad = grad_normalized.mean_keepdim(D::Minus1)?;
    let mean_grad_dot = (grad_normalized * normalized)?.mean_keepdim(D::Minus1)?;
    grad_normalized
        .broadcast_sub(&mean_grad)?
        .sub(&normalized.broadcast_mul(&mean_grad_dot)?)?
        .broadcast_mul(&inv_std)
}

/// GroupNorm over `[batch, channels, ...]` with per-channel affine weights.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm: {channels} channels cannot be split into {groups} groups");
    }
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
        bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
        groups,
        eps,
    })
}

/// `x` `[batch, channels, ...]` as `[batch, groups, rest]` in the accumulation dtype.
fn grouped(x: &Tensor, groups: usize) -> Result<Tensor> {
    let batch = x.dim(0)?;
    x.to_dtype(wide(x.dtype()))?.reshape((batch, groups, ()))
}

/// `[channels]` as `[1, channels, 1, ...]` for an input of `rank`.
fn per_channel(t: &Tensor, rank: usize) -> Result<Tensor> {
    let mut dims = vec![1; rank];
    dims[1] = t.elem_count();
    t.reshape(dims)
}

fn group_norm_forward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if group_norm_cpu::supported(x) {
        return group_norm_cpu::group_norm(x, w, b, groups, eps, silu);
    }
    let y = standardize(&grouped(x, groups)?, eps)?
        .to_dtype(x.dtype())?
        .reshape(x.dims())?
        .broadcast_mul(&per_channel(w, x.rank())?)?
        .broadcast_add(&per_channel(b, x.rank())?)?;
    if silu { y.silu() } else { Ok(y) }
}

impl GroupNorm {
    /// `silu(group_norm(x))` in one pass where possible: every norm in the UNet's and the
    /// VAE's resnets is followed by SiLU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, true)
    }

    fn forward_with(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if x.rank() < 3 || x.dim(1)? != self.weight.elem_count() {
            candle_core::bail!(
                "GroupNorm expects [batch, {}, ...], got {:?}",
                self.weight.elem_count(),
                x.dims()
            );
        }
        let (w, b) = (param(&self.weight), param(&self.bias));
        if !tracks_gradient(&[x, &w, &b]) {
            return group_norm_forward(x, &w, &b, self.groups, self.eps, silu);
        }
        let (groups, eps) = (self.groups, self.eps);
        let output = group_norm_forward(&x.detach(), &w.detach(), &b.detach(), groups, eps, silu)?;
        with_backward(
            &[x, &w, &b],
            output,
            GroupNormBackward { groups, eps, silu },
        )
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false)
    }
}

struct GroupNormBackward {
    groups: usize,
    eps: f64,
    /// The op is `silu(group_norm(x))`.
    silu: bool,
}

impl Backward for GroupNormBackward {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w, b) = (inputs[0].detach(), inputs[1].detach(), inputs[2]);
        let (batch, channels) = (x.dim(0)?, x.dim(1)?);
        let acc = wide(x.dtype());
        let x_grouped = grouped(&x, self.groups)?;
        let normalized = standardize(&x_grouped, self.eps)?;
        // Per channel: [batch, channels, spatial].
        let mut grad_c = grad.to_dtype(acc)?.reshape((batch, channels, ()))?;
        let normalized_c = normalized.reshape((batch, channels, ()))?;
        if self.silu {
            // Through the SiLU first: d silu(n) / dn = s (1 + n (1 - s)), s = sigmoid(n).
            let n = normalized_c
                .broadcast_mul(&w.to_dtype(acc)?.reshape((1, channels, 1))?)?
                .broadcast_add(&b.detach().to_dtype(acc)?.reshape((1, channels, 1))?)?;
            let s = candle_nn::ops::sigmoid(&n)?;
            let slope = (&s * ((&n * (1.0 - &s)?)? + 1.0)?)?;
            grad_c = (grad_c * slope)?;
        }
        let grad_w = inputs[1]
            .track_op()
            .then(|| (&grad_c * &normalized_c)?.sum((0, 2))?.to_dtype(w.dtype()))
            .transpose()?;
        let grad_b = b
            .track_op()
            .then(|| grad_c.sum((0, 2))?.to_dtype(b.dtype()))
            .transpose()?;
        let grad_x = if inputs[0].track_op() {
            let grad_normalized = grad_c
                .broadcast_mul(&w.to_dtype(acc)?.reshape((1, channels, 1))?)?
                .reshape((batch, self.groups, ()))?;
            let g = standardize_backward(&x_grouped, &normalized, &grad_normalized, self.eps)?;
            Some(g.to_dtype(x.dtype())?.reshape(x.dims())?)
        } else {
            None
        };
        Ok(vec![grad_x, grad_w, grad_b])
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
            weight: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", Init::Const(0.0))?,
            eps,
        })
    }
}

fn layer_norm_forward(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    // candle's fused kernel (f32 statistics) has no f64 version ("unsupported dtype").
    if x.dtype() != DType::F64 {
        return candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32);
    }
    standardize(x, eps)?.broadcast_mul(w)?.broadcast_add(b)
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (param(&self.weight), param(&self.bias));
        if !tracks_gradient(&[x, &w, &b]) {
            return layer_norm_forward(x, &w, &b, self.eps);
        }
        let output = layer_norm_forward(&x.detach(), &w.detach(), &b.detach(), self.eps)?;
        with_backward(&[x, &w, &b], output, LayerNormBackward { eps: self.eps })
    }
}

struct LayerNormBackward {
    eps: f64,
}

impl Backward for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w, b) = (inputs[0].detach(), inputs[1].detach(), inputs[2]);
        let size = x.dim(D::Minus1)?;
        let acc = wide(x.dtype());
        let x_rows = x.to_dtype(acc)?.reshape(((), size))?;
        let normalized = standardize(&x_rows, self.eps)?;
        let grad_rows = grad.to_dtype(acc)?.reshape(((), size))?;
        let grad_w = inputs[1]
            .track_op()
            .then(|| (&grad_rows * &normalized)?.sum(0)?.to_dtype(w.dtype()))
            .transpose()?;
        let grad_b = b
            .track_op()
            .then(|| grad_rows.sum(0)?.to_dtype(b.dtype()))
            .transpose()?;
        let grad_x = if inputs[0].track_op() {
            let grad_normalized = grad_rows.broadcast_mul(&w.to_dtype(acc)?)?;
            let g = standardize_backward(&x_rows, &normalized, &grad_normalized, self.eps)?;
            Some(g.to_dtype(x.dtype())?.reshape(x.dims())?)
        } else {
            None
        };
        Ok(vec![grad_x, grad_w, grad_b])
    }
}
