//! A 2-D convolution whose training path differentiates only what trains (see `autograd`).
//!
//! The backward is written with forward convolutions and matmuls, the operations every candle
//! backend makes fast: the input's gradient is a convolution with the flipped, transposed
//! kernel, the weight's gradient one matmul against the input's patches. (candle's own backward
//! goes through `conv_transpose2d`, a naive kernel on CUDA, and always computes both.)

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::conv_cpu::TapConv;
use super::norm::wide_sum;
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
    // The weight first: a random model (`VarMap`) draws its values in this order.
    let mut conv = conv2d_no_bias(
        in_channels,
        out_channels,
        kernel,
        stride,
        padding,
        vb.clone(),
    )?;
    let bound = 1.0 / (in_channels as f64).sqrt();
    conv.bias = Some(vb.get_with_hints(
        out_channels,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?);
    Ok(conv)
}

/// A square convolution without a bias (`bias=False` in PyTorch), its `weight` under `vb`.
pub fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    if padding >= kernel.max(1) {
        candle_core::bail!("convolution padding {padding} must be below the kernel size {kernel}");
    }
    let weight = vb.get_with_hints(
        (out_channels, in_channels, kernel, kernel),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    Ok(Conv2d {
        weight,
        bias: None,
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
    if stride != 1 {
        return with_bias(x.conv2d(w, padding, stride, 1, 1)?, b);
    }
    let kernel = if x.device().is_cpu() {
        Kernel::Taps
    } else {
        Kernel::Candle
    };
    banded_conv(x, w, b, padding, kernel, kernel.band_rows(x, w, padding)?)
}

fn with_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

/// How the pieces of a stride-1 convolution are computed.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    /// [`shifted_matmul_conv`] (the CPU).
    Taps,
    /// candle's `conv2d`, which on CUDA and Metal copies every input pixel's `k * k`
    /// neighbourhood into one patch matrix (im2col) first.
    Candle,
}

impl Kernel {
    /// Output rows per band: as many as the kernel's budget holds ([`CPU_BAND_BYTES`],
    /// [`GPU_BAND_BYTES`]), at least one.
    fn band_rows(self, x: &Tensor, w: &Tensor, padding: usize) -> Result<usize> {
        let (batch, c_in, _, width) = x.dims4()?;
        let (c_out, _, k, _) = w.dims4()?;
        // What one output row holds while it is made: its output and its padded input row,
        // and with candle's kernel the patch matrix's k * k input rows.
        let (row_channels, budget) = match self {
            Kernel::Taps => (c_in.max(c_out), CPU_BAND_BYTES),
            Kernel::Candle => ((c_in * k * k).max(c_out), GPU_BAND_BYTES),
        };
        let row_bytes = batch * row_channels * (width + 2 * padding) * x.dtype().size_in_bytes();
        Ok((budget / row_bytes.max(1)).max(1))
    }
}

/// What a convolution may hold at once beyond its input and output; larger ones are made a
/// band of rows at a time (see [`banded_conv`]). On the CPU 64 MB keeps each band's matrix
/// products large (about 120 rows of a 1024 px image with 128 channels) and the memory it
/// saves is the machine's.
const CPU_BAND_BYTES: usize = 64 << 20;
/// On a GPU the patch matrix is 9 times the input: 512 MB leaves SDXL's UNet convolutions at
/// 1024 px in one or two pieces (launches and products as large as before) while the VAE's
/// 1024 px layers, whose patches would take up to 9.4 GB, go in bands of about 50 rows.
const GPU_BAND_BYTES: usize = 512 << 20;

/// A stride-1 convolution (with its bias) made `band` output rows at a time and written into
/// one output buffer: the same result as in one piece.
///
/// In one piece, a convolution on the CPU holds its input, the input's padded copy, the output
/// over padded rows, the cropped output and the output again with the bias added; candle's
/// convolution on a GPU holds a patch matrix 9 times its input (9.4 GB for a 256-channel
/// 1024 px layer in f32). At the VAE's 1024 px stages (0.5 to 1 GB per tensor) that made most
/// of SDXL's VAE encode and decode peaks, which decide whether a fine-tune and an edit fit a
/// 12 GB card. In bands only the input and the output are whole.
fn banded_conv(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    kernel: Kernel,
    band: usize,
) -> Result<Tensor> {
    let (batch, _, h, width) = x.dims4()?;
    let (c_out, _, k, _) = w.dims4()?;
    let (h_out, w_out) = (h + 2 * padding + 1 - k, width + 2 * padding + 1 - k);
    let taps = Taps::forward(w)?;
    // One piece: `slab` with `(top, bottom)` zero rows and `padding` zero columns around it.
    let piece = |slab: &Tensor, (top, bottom): (usize, usize)| -> Result<Tensor> {
        let y = match kernel {
            Kernel::Taps => shifted_matmul_conv(slab, &taps, (top, bottom), padding)?,
            Kernel::Candle if (top, bottom) == (padding, padding) => {
                slab.conv2d(w, padding, 1, 1, 1)?
            }
            Kernel::Candle => slab
                .pad_with_zeros(2, top, bottom)?
                .pad_with_zeros(3, padding, padding)?
                .conv2d(w, 0, 1, 1, 1)?,
        };
        with_bias(y, b)
    };
    if band >= h_out {
        return piece(x, (padding, padding));
    }
    let out = Tensor::zeros((batch, c_out, h_out, w_out), x.dtype(), x.device())?;
    for first in (0..h_out).step_by(band.max(1)) {
        let rows = band.min(h_out - first);
        // Output row r reads input rows r - padding to r - padding + k - 1; those outside the
        // image are the padding's zeros.
        let start = first as isize - padding as isize;
        let end = start + (rows + k - 1) as isize;
        let (lo, hi) = (start.max(0) as usize, end.min(h as isize) as usize);
        let (top, bottom) = ((lo as isize - start) as usize, (end - hi as isize) as usize);
        let y = piece(&x.narrow(2, lo, hi - lo)?, (top, bottom))?;
        out.slice_set(&y.contiguous()?, 2, first)?;
    }
    Ok(out)
}

/// Outputs per sample (over whole padded rows) below which a convolution copies its input's
/// windows into one patch matrix: 16x16 latents and smaller (see [`shifted_matmul_conv`]).
const SMALL_IMAGE_RUN: usize = 1024;

/// A square kernel's taps as `[out, in]` matrices, views into the weight (no copy).
struct Taps {
    /// The weight `[out, in, k * k]`.
    flat: Tensor,
    k: usize,
    /// The input gradient's kernel: flipped in space, in and out swapped.
    transposed: bool,
}

impl Taps {
    fn forward(w: &Tensor) -> Result<Self> {
        let (c_out, c_in, k, _) = w.dims4()?;
        Ok(Self {
            flat: w.reshape((c_out, c_in, k * k))?,
            k,
            transposed: false,
        })
    }

    /// The taps of the convolution that maps an output gradient to the input gradient.
    fn input_gradient(w: &Tensor) -> Result<Self> {
        Ok(Self {
            transposed: true,
            ..Self::forward(w)?
        })
    }

    fn outputs(&self) -> Result<usize> {
        self.flat.dim(if self.transposed { 1 } else { 0 })
    }

    fn tap(&self, dy: usize, dx: usize) -> Result<Tensor> {
        let k = self.k;
        if self.transposed {
            let index = (k - 1 - dy) * k + (k - 1 - dx);
            self.flat.narrow(2, index, 1)?.squeeze(2)?.t()
        } else {
            self.flat.narrow(2, dy * k + dx, 1)?.squeeze(2)
        }
    }
}

/// A stride-1 convolution on the CPU as one matrix multiply per kernel tap, without copying
/// patches (im2col) or weights (except on small images, below).
///
/// With the padded input flattened to rows of `Wp` pixels, the pixels tap `(dy, dx)` reads for
/// a run of outputs are one contiguous window starting `dy * Wp + dx` further on; so each tap
/// is `W[:, :, dy, dx] @ window` on a strided view of the input, and the taps' products are
/// summed. The product is computed over whole padded rows and the `k - 1` extra columns are
/// cut off at the end. candle's CPU convolution builds its patch tiles element by element,
/// which took a fifth of a UNet step; this is 15 to 45 % faster on the UNet's shapes
/// (measured at 64x64 latents with 320 and 640 channels).
///
/// Each tap's product is accumulated into the output by `gemm` (`conv_cpu::TapConv`); below
/// [`SMALL_IMAGE_RUN`] outputs per sample the windows are copied into one patch matrix instead
/// (measured at batch 2: 320 channels at 64x64 94 ms with accumulating taps, 121 ms with the
/// taps summed by candle's ops, 207 ms with patches; 1280 channels at 16x16 122 ms with taps,
/// 103 ms with patches; 2560 to 1280 at 8x8 90 ms against 52 ms).
///
/// `rows_padding` is the zero rows above and below the input (the padding, or for a band of a
/// larger image, what of it falls outside the image); `padding` the zero columns each side.
fn shifted_matmul_conv(
    x: &Tensor,
    taps: &Taps,
    rows_padding: (usize, usize),
    padding: usize,
) -> Result<Tensor> {
    let (batch, c_in, h, width) = x.dims4()?;
    let (c_out, k) = (taps.outputs()?, taps.k);
    if k == 1 && padding == 0 && rows_padding == (0, 0) {
        return taps
            .tap(0, 0)?
            .broadcast_left(batch)?
            .matmul(&x.reshape((batch, c_in, h * width))?)?
            .reshape((batch, c_out, h, width));
    }
    let rows = PaddedRows::new(x, rows_padding, padding, k)?;
    if !taps.transposed && rows.run() < SMALL_IMAGE_RUN {
        // Few outputs per tap: gathering the taps' strided weights for each small product
        // costs more than copying the windows (small at these sizes) into one patch matrix
        // that meets the weight as it is stored.
        let windows = (0..k * k)
            .map(|t| rows.window(t / k, t % k))
            .collect::<Result<Vec<_>>>()?;
        let patches = Tensor::stack(&windows, 2)?.reshape((batch, c_in * k * k, rows.run()))?;
        return rows.crop(
            &taps
                .flat
                .reshape((c_out, c_in * k * k))?
                .broadcast_left(batch)?
                .matmul(&patches)?,
        );
    }
    if matches!(x.dtype(), DType::F32 | DType::F16) && x.dtype() == taps.flat.dtype() {
        let op = TapConv {
            k,
            row: rows.row,
            run: rows.run(),
            transposed: taps.transposed,
        };
        return rows.crop(
            &rows
                .flat
                .contiguous()?
                .apply_op2_no_bwd(&taps.flat.contiguous()?, &op)?,
        );
    }
    // Other dtypes: the taps' products through candle's ops, summed.
    let mut sum: Option<Tensor> = None;
    for dy in 0..k {
        for dx in 0..k {
            let product = taps
                .tap(dy, dx)?
                .broadcast_left(batch)?
                .matmul(&rows.window(dy, dx)?)?;
            sum = Some(match sum {
                None => product,
                Some(s) => (s + product)?,
            });
        }
    }
    let sum = sum.ok_or_else(|| candle_core::Error::Msg("empty convolution kernel".into()))?;
    rows.crop(&sum)
}

/// An input padded for a stride-1 convolution and flattened into rows of `row` pixels, so that
/// each kernel tap reads one contiguous window of it (see [`shifted_matmul_conv`]).
struct PaddedRows {
    /// `[batch, channels, rows * row]`.
    flat: Tensor,
    row: usize,
    h_out: usize,
    w_out: usize,
}

impl PaddedRows {
    /// `(top, bottom)` zero rows and `padding` zero columns each side.
    fn new(x: &Tensor, (top, bottom): (usize, usize), padding: usize, k: usize) -> Result<Self> {
        let (batch, channels, h, width) = x.dims4()?;
        let row = width + 2 * padding;
        // One spare row at the bottom keeps the last tap's window inside the buffer.
        let rows = h + top + bottom + 1;
        let flat = x
            .pad_with_zeros(2, top, bottom + 1)?
            .pad_with_zeros(3, padding, padding)?
            .reshape((batch, channels, rows * row))?;
        Ok(Self {
            flat,
            row,
            h_out: rows - k,
            w_out: width + 2 * padding + 1 - k,
        })
    }

    /// The outputs' positions counted over whole padded rows.
    fn run(&self) -> usize {
        self.h_out * self.row
    }

    /// The outputs computed over whole padded rows, `[batch, channels, run]`, without the
    /// `k - 1` columns per row that are not outputs: `[batch, channels, h_out, w_out]`.
    fn crop(&self, over_rows: &Tensor) -> Result<Tensor> {
        let (batch, channels, _) = over_rows.dims3()?;
        over_rows
            .reshape((batch, channels, self.h_out, self.row))?
            .narrow(3, 0, self.w_out)?
            .contiguous()
    }

    /// What tap `(dy, dx)` reads for every output: `[batch, channels, run]`, a view.
    fn window(&self, dy: usize, dx: usize) -> Result<Tensor> {
        self.flat.narrow(2, dy * self.row + dx, self.run())
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
            grads.push(
                b.track_op()
                    .then(|| wide_sum(&grad, (0, 2, 3)))
                    .transpose()?,
            );
        }
        Ok(grads)
    }
}

impl ConvBackward {
    fn input_gradient(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let k = w.dim(2)?;
        if self.stride == 1 && grad.device().is_cpu() {
            let taps = Taps::input_gradient(w)?;
            let padding = k - 1 - self.padding;
            return shifted_matmul_conv(grad, &taps, (padding, padding), padding);
        }
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
            return convolve(grad, &flipped, None, 1, k - 1 - self.padding);
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
        if k == 1 {
            return grad
                .reshape((batch, c_out, h_out * w_out))?
                .matmul(&x.reshape((batch, c_in, h_out * w_out))?.transpose(1, 2)?)?
                .sum(0)?
                .reshape((c_out, c_in, 1, 1));
        }
        // Per tap, the output gradient against the window the tap read (both over whole padded
        // rows; the gradient is zero in the columns that are not outputs): no patch copies.
        let rows = PaddedRows::new(x, (self.padding, self.padding), self.padding, k)?;
        let grad_rows =
            grad.pad_with_zeros(3, 0, rows.row - w_out)?
                .reshape((batch, c_out, rows.run()))?;
        let mut taps = Vec::with_capacity(k * k);
        for dy in 0..k {
            for dx in 0..k {
                let window = rows.window(dy, dx)?;
                taps.push(grad_rows.matmul(&window.transpose(1, 2)?)?.sum(0)?);
            }
        }
        Tensor::stack(&taps, 2)?.reshape((c_out, c_in, k, k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use std::collections::HashMap;

    /// Largest differences, relative to the reference's largest magnitude, between our
    /// convolution of a `[2, 5, h, w]` input in `dtype` and candle's `conv2d` of the same values
    /// in `reference`, for the output and the gradients of x, w and b (ours through
    /// `with_backward`, candle's through its autograd).
    fn relative_differences(
        (dtype, reference): (DType, DType),
        (h, w): (usize, usize),
        (k, stride, padding): (usize, usize, usize),
    ) -> Result<[f64; 4]> {
        let device = Device::Cpu;
        let values = [
            Tensor::randn(0f64, 1.0, (2, 5, h, w), &device)?.to_dtype(dtype)?,
            Tensor::randn(0f64, 0.3, (7, 5, k, k), &device)?.to_dtype(dtype)?,
            Tensor::randn(0f64, 0.3, 7, &device)?.to_dtype(dtype)?,
        ];
        let [x, w, b] = values.clone().map(|t| Var::from_tensor(&t).unwrap());
        let [rx, rw, rb] =
            values.map(|t| Var::from_tensor(&t.to_dtype(reference).unwrap()).unwrap());
        let tensors = HashMap::from([
            ("weight".to_string(), w.as_tensor().clone()),
            ("bias".to_string(), b.as_tensor().clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, dtype, &device);
        let conv = conv2d(5, 7, k, stride, padding, vb)?;
        let ours = conv.forward(x.as_tensor())?;
        let theirs = rx
            .as_tensor()
            .conv2d(rw.as_tensor(), padding, stride, 1, 1)?
            .broadcast_add(&rb.as_tensor().reshape((1, 7, 1, 1))?)?;
        let relative = |a: &Tensor, e: &Tensor| -> Result<f64> {
            let (a, e) = (a.to_dtype(DType::F64)?, e.to_dtype(DType::F64)?);
            let scale = e.abs()?.max_all()?.to_scalar::<f64>()?;
            Ok((a - e)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
        };
        let mut out = [relative(&ours, &theirs)?, 0.0, 0.0, 0.0];
        let weights = Tensor::randn(0f64, 1.0, theirs.dims(), &device)?;
        let g_ours = (ours * weights.to_dtype(dtype)?)?.sum_all()?.backward()?;
        let g_theirs = (theirs * weights.to_dtype(reference)?)?
            .sum_all()?
            .backward()?;
        for (slot, (var, reference_var)) in
            out[1..].iter_mut().zip([(&x, &rx), (&w, &rw), (&b, &rb)])
        {
            *slot = relative(
                g_ours.get(var.as_tensor()).unwrap(),
                g_theirs.get(reference_var.as_tensor()).unwrap(),
            )?;
        }
        Ok(out)
    }

    const SHAPES: [(usize, usize, usize); 4] = [(3, 1, 1), (1, 1, 0), (3, 2, 1), (3, 1, 0)];

    /// Our convolution and its gradients against candle's `conv2d` under candle's autograd, in
    /// f64, for every shape the models use: 3x3 and 1x1 at stride 1, 3x3 at stride 2.
    #[test]
    fn forward_and_gradients_match_candles_convolution() -> Result<()> {
        for shape in SHAPES {
            let diffs = relative_differences((DType::F64, DType::F64), (8, 6), shape)?;
            assert!(diffs.iter().all(|d| *d <= 1e-12), "{shape:?}: {diffs:?}");
        }
        Ok(())
    }

    /// The CPU kernels of f32 and f16 (taps accumulated by `gemm` on images of at least
    /// `SMALL_IMAGE_RUN` outputs, one patch matrix below; the flipped taps of the input's
    /// gradient) against candle's convolution: within f32's rounding over sums of 45 products
    /// (1e-5 relative), and f16's (2^-11 per rounding, 1e-2 relative).
    #[test]
    fn the_cpu_kernels_match_candles_convolution_in_f32_and_f16() -> Result<()> {
        for size in [(8, 6), (40, 30)] {
            for shape in SHAPES {
                let diffs = relative_differences((DType::F32, DType::F64), size, shape)?;
                assert!(
                    diffs.iter().all(|d| *d <= 1e-5),
                    "f32 {size:?} {shape:?}: {diffs:?}"
                );
                let diffs = relative_differences((DType::F16, DType::F64), size, shape)?;
                assert!(
                    diffs.iter().all(|d| *d <= 1e-2),
                    "f16 {size:?} {shape:?}: {diffs:?}"
                );
            }
        }
        Ok(())
    }

    /// A convolution made in bands of rows (down to one row per band, and bands whose reach
    /// crosses the top or bottom edge) equals candle's in one piece, for 3x3 with and without
    /// padding and 1x1, in f64 and in f32 on an image large enough for the accumulating taps,
    /// with both kernels (the GPU's, candle's own, runs here on the CPU).
    #[test]
    fn a_convolution_in_bands_equals_one_in_one_piece() -> Result<()> {
        let device = Device::Cpu;
        for (dtype, (h, w), tolerance) in
            [(DType::F64, (9, 6), 1e-12), (DType::F32, (40, 60), 1e-5)]
        {
            let x = Tensor::randn(0f64, 1.0, (2, 5, h, w), &device)?.to_dtype(dtype)?;
            for (k, padding) in [(3, 1), (3, 0), (1, 0)] {
                let weight = Tensor::randn(0f64, 0.3, (7, 5, k, k), &device)?.to_dtype(dtype)?;
                let bias = Tensor::randn(0f64, 0.3, 7, &device)?.to_dtype(dtype)?;
                let theirs = x
                    .to_dtype(DType::F64)?
                    .conv2d(&weight.to_dtype(DType::F64)?, padding, 1, 1, 1)?
                    .broadcast_add(&bias.to_dtype(DType::F64)?.reshape((1, 7, 1, 1))?)?;
                let scale = theirs.abs()?.max_all()?.to_scalar::<f64>()?;
                for (kernel, rows_per_band) in [Kernel::Taps, Kernel::Candle]
                    .into_iter()
                    .flat_map(|kernel| [1, 2, 4, h].map(|rows| (kernel, rows)))
                {
                    let ours =
                        banded_conv(&x, &weight, Some(&bias), padding, kernel, rows_per_band)?;
                    assert_eq!(ours.dims(), theirs.dims());
                    let diff = (ours.to_dtype(DType::F64)? - &theirs)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f64>()?;
                    assert!(
                        diff <= tolerance * scale,
                        "{kernel:?} {dtype:?} k {k} padding {padding}, {rows_per_band} rows per band: {diff} (scale {scale})"
                    );
                }
            }
        }
        Ok(())
    }
}
