//! A linear layer whose training path differentiates only what trains (see `autograd`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::norm::wide_sum;
use crate::engine::autograd::{Backward, param, tracks_gradient, with_backward};

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    weight: Tensor,
    bias: Option<Tensor>,
}

/// A linear layer with a bias, named `weight` and `bias` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let bias = vb.get_with_hints(
        out_dim,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Linear {
        bias: Some(bias),
        ..linear_no_bias(in_dim, out_dim, vb)?
    })
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    Ok(Linear { weight, bias: None })
}

impl Linear {
    /// A layer from its tensors (LoRA factors are plain weight matrices).
    pub fn from_weight(weight: Tensor) -> Self {
        Self { weight, bias: None }
    }

    /// `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// `x @ w^T (+ b)` without a graph, batched as one matmul where the input allows it (a
/// broadcast matmul is much slower in candle).
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let y = if x.rank() > 2 && x.is_contiguous() {
        let rows = x.elem_count() / in_dim;
        let mut dims = x.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] = out_dim;
        x.reshape((rows, in_dim))?.matmul(&w.t()?)?.reshape(dims)?
    } else {
        x.broadcast_matmul(&w.t()?)?
    };
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = param(&self.weight);
        let b = self.bias.as_ref().map(param);
        let mut inputs = vec![x, &w];
        inputs.extend(b.as_ref());
        if !tracks_gradient(&inputs) {
            return affine(x, &w, b.as_ref());
        }
        let output = affine(
            &x.detach(),
            &w.detach(),
            b.as_ref().map(Tensor::detach).as_ref(),
        )?;
        with_backward(&inputs, output, LinearBackward)
    }
}

struct LinearBackward;

impl Backward for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (inputs[0], inputs[1]);
        let (out_dim, in_dim) = w.dims2()?;
        let rows = grad.elem_count() / out_dim;
        let grad_2d = grad.contiguous()?.reshape((rows, out_dim))?;
        let grad_x = if x.track_op() {
            Some(grad_2d.matmul(&w.detach())?.reshape(x.dims())?)
        } else {
            None
        };
        let grad_w = if w.track_op() {
            let x_2d = x.detach().contiguous()?.reshape((rows, in_dim))?;
            Some(grad_2d.t()?.matmul(&x_2d)?)
        } else {
            None
        };
        let mut grads = vec![grad_x, grad_w];
        if let Some(b) = inputs.get(2) {
            grads.push(b.track_op().then(|| wide_sum(&grad_2d, 0)).transpose()?);
        }
        Ok(grads)
    }
}
