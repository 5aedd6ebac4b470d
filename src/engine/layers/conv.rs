//! A 2-D convolution whose training path differentiates only what trains (see `autograd`).
//!
//! The backward is written with forward convolutions and matmuls, the operations every candle
//! backend makes fast: the input's gradient is a convolution with the flipped, transposed
//! kernel, the weight's gradient one matmul against the input's patches. (candle's own backward
//! goes through `conv_transpose2d`, a naive kernel on CUDA, and always computes both.)

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::engine::autograd::{Backward, param, tracks_gradient, with_backward};

#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `[out, in, k, k]`.
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

/// A square convolution with a bias, named `weight` and `bias` under `vb`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get_with_hints(
        (out_channels, in_channels, kernel, kernel),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bound = 1.0 / (in_channels as f64).sqrt();
    let bias = vb.get_with_hints(
        out_channels,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    if padding >= kernel.max(1) {
        candle_core::bail!("convolution padding {padding} must be below the kernel size {kernel}");
    }
    Ok(Conv2d {
        weight,
        bias: Some(bias),
        stride,
        padding,
    })
}

fn convolve(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = x.conv2d(w, padding, stride, 1, 1)?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = param(&self.weight);
        let b = self.bias.as_ref().map(param);
        let mut inputs = vec![x, &w];
        inputs.extend(b.as_ref());
        if !tracks_gradient(&inputs) {
            return convolve(x, &w, b.as_ref(), self.stride, self.padding);
        }
        let detached_b = b.as_ref().map(Tensor::detach);
        let output = convolve(
            &x.detach(),
            &w.detach(),
            detached_b.as_ref(),
            self.stride,
            self.padding,
        )?;
        with_backward(
            &inputs,
            output,
            ConvBackward {
                stride: self.stride,
                padding: self.padding,
            },
        )
    }
}

struct ConvBackward {
    stride: usize,
    padding: usize,
}

impl Backward for ConvBackward {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (inputs[0].detach(), inputs[1].detach());
        let grad = grad.contiguous()?;
        let grad_x = if inputs[0].track_op() {
            Some(self.input_gradient(&x, &w, &grad)?)
        } else {
            None
        };
        let grad_w = if inputs[1].track_op() {
            Some(self.weight_gradient(&x, &w, &grad)?)
        } else {
            None
        };
        let mut grads = vec![grad_x, grad_w];
        if let Some(b) = inputs.get(2) {
            grads.push(b.track_op().then(|| grad.sum((0, 2, 3))).transpose()?);
        }
        Ok(grads)
    }
}

impl ConvBackward {
    fn input_gradient(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let k = w.dim(2)?;
        if self.stride == 1 {
            // A stride-1 convolution's input gradient is the "full" convolution of the output
            // gradient with the kernel flipped in space and with in/out channels swapped.
            let flipped = if k == 1 {
                w.transpose(0, 1)?.contiguous()?
            } else {
                let reversed: Vec<u32> = (0..k as u32).rev().collect();
                let reversed = Tensor::new(reversed.as_slice(), w.device())?;
                w.index_select(&reversed, 2)?
                    .index_select(&reversed, 3)?
                    .transpose(0, 1)?
                    .contiguous()?
            };
            return grad.conv2d(&flipped, k - 1 - self.padding, 1, 1, 1);
        }
        // Strided (the UNet's three downsamplers): the transposed convolution, with the output
        // padding that gives back the input's size.
        let restored = (grad.dim(2)? - 1) * self.stride + k - 2 * self.padding;
        let output_padding = x.dim(2)? - restored;
        grad.conv_transpose2d(w, self.padding, output_padding, self.stride, 1)
    }

    fn weight_gradient(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (c_out, c_in, k, _) = w.dims4()?;
        let (batch, _, h_out, w_out) = grad.dims4()?;
        if self.stride != 1 {
            // As candle does it: a convolution of the input with the output gradient, the
            // stride becoming a dilation. Only the downsamplers take this path.
            let g = x
                .transpose(0, 1)?
                .conv2d(&grad.transpose(0, 1)?, self.padding, 1, self.stride, 1)?
                .transpose(0, 1)?;
            return g.narrow(2, 0, k)?.narrow(3, 0, k);
        }
        // Patches of the (padded) input, one row per kernel tap: [batch, c_in * k * k, h * w].
        let patches = if k == 1 {
            x.reshape((batch, c_in, h_out * w_out))?
        } else {
            let padded = x
                .pad_with_zeros(2, self.padding, self.padding)?
                .pad_with_zeros(3, self.padding, self.padding)?;
            let mut taps = Vec::with_capacity(k * k);
            for dy in 0..k {
                for dx in 0..k {
                    taps.push(padded.narrow(2, dy, h_out)?.narrow(3, dx, w_out)?);
                }
            }
            Tensor::stack(&taps, 2)?.reshape((batch, c_in * k * k, h_out * w_out))?
        };
        grad.reshape((batch, c_out, h_out * w_out))?
            .matmul(&patches.transpose(1, 2)?)?
            .sum(0)?
            .reshape((c_out, c_in, k, k))
    }
}
