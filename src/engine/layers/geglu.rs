//! The first half of the transformer's feed-forward: `value * gelu(gate)` where
//! `[value, gate] = x W^T + b` (diffusers' `GEGLU`), over blocks of tokens.
//!
//! The projection is the widest activation in the UNet: 8 x the channels, 42 MB per 64x64 latent
//! in f32, and composed from tensor ops its backward (the narrow into value and gate, GELU's
//! derivative, the concatenation back) allocates several of it. Here it is computed a block of
//! tokens at a time and never stored: the backward recomputes each block's projection and
//! differentiates it on the spot. Only the input and the (half as wide) output are kept.

use candle_core::{D, Result, Tensor};

use super::linear::Linear;
use super::norm::wide_sum;
use crate::engine::autograd::{Backward, param, tracks_gradient, with_backward};

/// Bytes one block's projection may take (f32), which bounds the memory of the whole op.
const BLOCK_BYTES: usize = 16 << 20;

/// Tokens per block for a projection `width` values wide.
fn block_rows(width: usize, rows: usize) -> usize {
    (BLOCK_BYTES / (width * 4).max(1)).clamp(1, rows.max(1))
}

/// `x` as `[rows, channels]` (contiguous), with the leading dimensions to restore.
fn rows_of(x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let channels = dims.last().copied().unwrap_or(1);
    Ok((x.contiguous()?.reshape(((), channels))?, dims))
}

/// The value and gate halves of one block's projection, `[rows, inner]` each.
///
/// They are projected separately (the weight's halves are contiguous rows, so this costs no
/// copy) rather than narrowed out of one `[rows, 2 * inner]` projection: candle runs an
/// element-wise op on all threads only over a contiguous tensor, and the gate as a view of
/// the whole projection took its exact GELU on one thread, about a tenth of an SDXL
/// sampling step on 2 cores.
fn value_and_gate(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let inner = w.dim(0)? / 2;
    let half = |start| affine(x, &w.narrow(0, start, inner)?, &b.narrow(0, start, inner)?);
    Ok((half(0)?, half(inner)?))
}

/// `value * gelu(gate)` of one block of tokens.
fn gated(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (value, gate) = value_and_gate(x, w, b)?;
    // Exact GELU as diffusers uses; the tanh approximation differs by ~1e-4.
    value * gate.gelu_erf()?
}

fn affine(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_matmul(&w.t()?)?.broadcast_add(b)
}

/// The GeGLU projection of `proj` (diffusers' `net.0.proj`) applied to `x` `[..., channels]`.
pub fn geglu(x: &Tensor, proj: &Linear) -> Result<Tensor> {
    let w = param(proj.weight());
    let b = match proj.bias() {
        Some(b) => param(b),
        None => candle_core::bail!("the GEGLU projection has no bias"),
    };
    let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
    blocked_geglu(x, &w, &b, block_rows(w.dim(0)?, rows))
}

/// [`geglu`] with `step` tokens per block.
fn blocked_geglu(x: &Tensor, w: &Tensor, b: &Tensor, step: usize) -> Result<Tensor> {
    let (rows_x, dims) = rows_of(x)?;
    let (rows, width) = (rows_x.dim(0)?, w.dim(0)?);
    let run = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
        let mut blocks = Vec::with_capacity(rows.div_ceil(step));
        for start in (0..rows).step_by(step) {
            let n = step.min(rows - start);
            blocks.push(gated(&x.narrow(0, start, n)?, w, b)?);
        }
        let out = if blocks.len() == 1 {
            blocks.remove(0)
        } else {
            Tensor::cat(&blocks, 0)?
        };
        let mut out_dims = dims.clone();
        let last = out_dims.len() - 1;
        out_dims[last] = width / 2;
        out.reshape(out_dims)
    };
    if !tracks_gradient(&[x, w, b]) {
        return run(&rows_x, w, b);
    }
    let output = run(&rows_x.detach(), &w.detach(), &b.detach())?;
    with_backward(&[x, w, b], output, GegluBackward { step })
}

struct GegluBackward {
    step: usize,
}

impl Backward for GegluBackward {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let [wants_x, wants_w, wants_b] = [0, 1, 2].map(|i| inputs[i].track_op());
        let (x, dims) = rows_of(&inputs[0].detach())?;
        let (w, b) = (inputs[1].detach(), inputs[2].detach());
        let (grad, _) = rows_of(grad)?;
        let rows = x.dim(0)?;
        let mut grad_x_blocks = Vec::new();
        let mut grad_w: Option<Tensor> = None;
        let mut grad_b: Option<Tensor> = None;
        let sum = |acc: &mut Option<Tensor>, term: Tensor| -> Result<()> {
            *acc = Some(match acc.take() {
                Some(a) => (a + term)?,
                None => term,
            });
            Ok(())
        };
        for start in (0..rows).step_by(self.step) {
            let n = self.step.min(rows - start);
            let x_block = x.narrow(0, start, n)?;
            let grad_block = grad.narrow(0, start, n)?;
            let (value, gate) = value_and_gate(&x_block, &w, &b)?;
            // d/dg gelu(g) = Phi(g) + g phi(g) = 0.5 (1 + erf(g / sqrt 2)) + g e^(-g^2/2) / sqrt(2 pi)
            let phi = ((gate.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt()))?;
            let cdf = (((&gate * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
            let gelu_slope = (&cdf + (&gate * &phi)?)?;
            let gelu = (&gate * &cdf)?;
            let grad_value = (&grad_block * &gelu)?;
            let grad_gate = ((&grad_block * &value)? * gelu_slope)?;
            let grad_projection = Tensor::cat(&[&grad_value, &grad_gate], 1)?;
            if wants_x {
                grad_x_blocks.push(grad_projection.matmul(&w)?);
            }
            if wants_w {
                sum(&mut grad_w, grad_projection.t()?.matmul(&x_block)?)?;
            }
            if wants_b {
                sum(&mut grad_b, wide_sum(&grad_projection, 0)?)?;
            }
        }
        let grad_x = if wants_x {
            let g = if grad_x_blocks.len() == 1 {
                grad_x_blocks.remove(0)
            } else {
                Tensor::cat(&grad_x_blocks, 0)?
            };
            Some(g.reshape(dims)?)
        } else {
            None
        };
        Ok(vec![grad_x, grad_w, grad_b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Blocks of 4 rows (74 rows: 18 full blocks and a ragged one) against the composed
    /// formula under candle's autograd, in f64.
    #[test]
    fn blocked_geglu_and_its_gradients_equal_the_formula() -> Result<()> {
        let device = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 37, 6), &device)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f64, 0.5, (10, 6), &device)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, 10, &device)?)?;
        let weights = Tensor::randn(0f64, 1.0, (2, 37, 5), &device)?;
        let ours = blocked_geglu(x.as_tensor(), w.as_tensor(), b.as_tensor(), 4)?;
        // diffusers' GEGLU: one projection, chunked into value and gate.
        let projection = x.as_tensor().broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let (value, gate) = (projection.narrow(2, 0, 5)?, projection.narrow(2, 5, 5)?);
        let theirs = (value * gate.gelu_erf()?)?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "forward differs by {diff}");
        let g_ours = (ours * &weights)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &weights)?.sum_all()?.backward()?;
        for (name, var) in [("x", &x), ("w", &w), ("b", &b)] {
            let a = g_ours.get(var.as_tensor()).unwrap();
            let e = g_theirs.get(var.as_tensor()).unwrap();
            let scale = e.abs()?.max_all()?.to_scalar::<f64>()?;
            let diff = (a - e)?.abs()?.max_all()?.to_scalar::<f64>()?;
            // candle's own GELU derivative uses 0.398942 for 1/sqrt(2 pi): 5e-8 relative off.
            assert!(
                diff <= 1e-6 * scale,
                "d{name} differs by {diff} (scale {scale})"
            );
        }
        Ok(())
    }
}
