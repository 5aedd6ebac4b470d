//! The CPU kernel of the shifted-matmul convolution (see `conv::shifted_matmul_conv`): every
//! kernel tap's product is accumulated into one output buffer by `gemm` itself.
//!
//! Written by hand because candle has no multiply-accumulate: through its ops each of the nine
//! taps of a 3x3 convolution allocated its own product and added it to the running sum, eight
//! extra passes over an output-sized buffer that took a fifth of a convolution at 64x64 latents.
//! Here each tap is one `gemm` call that reads its weights and input window in place through
//! strides and adds into the output.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, WithDType};
use gemm::Parallelism;

use super::contiguous_elements;

/// One convolution over an input padded and flattened into rows (`conv::PaddedRows`).
pub(super) struct TapConv {
    /// Kernel side.
    pub k: usize,
    /// Pixels per padded row.
    pub row: usize,
    /// Outputs counted over whole padded rows (`h_out * row`).
    pub run: usize,
    /// The weight `[a, b, k * k]` is used transposed and flipped: the input's gradient of a
    /// convolution with it (`b` outputs from `a` inputs) instead of the convolution itself.
    pub transposed: bool,
}

impl TapConv {
    /// `input` `[batch, c_in, len]`, `weight` `[.., .., k * k]`, both contiguous; returns
    /// `[batch, c_out, run]` and its shape.
    fn run<T: WithDType + 'static>(
        &self,
        input: &[T],
        (batch, c_in, len): (usize, usize, usize),
        weight: &[T],
        (w0, w1): (usize, usize),
    ) -> Result<(Vec<T>, Shape)> {
        let taps = self.k * self.k;
        // Element (o, i) of tap t's matrix (output channel o, input channel i) is at
        // `t + o * out_stride + i * in_stride` in the weight.
        let (c_out, out_stride, in_stride) = if self.transposed {
            (w1, taps, w1 * taps)
        } else {
            (w0, w1 * taps, taps)
        };
        let expected_in = if self.transposed { w0 } else { w1 };
        let reach = (self.k - 1) * (self.row + 1) + self.run;
        if expected_in != c_in || reach > len || weight.len() != w0 * w1 * taps {
            candle_core::bail!("cpu convolution: mismatched shapes");
        }
        let mut out = vec![T::zero(); batch * c_out * self.run];
        let threads = Parallelism::Rayon(candle_core::utils::get_num_threads());
        for b in 0..batch {
            for dy in 0..self.k {
                for dx in 0..self.k {
                    let t = dy * self.k + dx;
                    let tap = if self.transposed { taps - 1 - t } else { t };
                    let window = b * c_in * len + dy * self.row + dx;
                    // SAFETY: the weight holds `w0 * w1 * taps` values and the largest index
                    // reached is tap + (c_out - 1) * out_stride + (c_in - 1) * in_stride; the
                    // window of `c_in` rows of `run` values spaced `len` apart ends within the
                    // sample (checked above: `reach <= len`); the output slice is this
                    // sample's `c_out * run` values, written by this call alone.
                    unsafe {
                        gemm::gemm(
                            c_out,
                            self.run,
                            c_in,
                            out.as_mut_ptr().add(b * c_out * self.run),
                            1,
                            self.run as isize,
                            t > 0,
                            weight.as_ptr().add(tap),
                            in_stride as isize,
                            out_stride as isize,
                            input.as_ptr().add(window),
                            1,
                            len as isize,
                            T::one(),
                            T::one(),
                            false,
                            false,
                            false,
                            threads,
                        );
                    }
                }
            }
        }
        Ok((out, Shape::from((batch, c_out, self.run))))
    }
}

fn slice<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    contiguous_elements(data, layout, "cpu convolution")
}

impl CustomOp2 for TapConv {
    fn name(&self) -> &'static str {
        "tap-conv"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = input_layout.shape().dims3()?;
        let (w0, w1, taps) = weight_layout.shape().dims3()?;
        if taps != self.k * self.k {
            candle_core::bail!("cpu convolution: the kernel is not {0}x{0}", self.k);
        }
        match (input, weight) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let x = slice(x, input_layout)?;
                let w = slice(w, weight_layout)?;
                let (out, shape) = self.run(x, dims, w, (w0, w1))?;
                Ok((CpuStorage::F32(out), shape))
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                let x = slice(x, input_layout)?;
                let w = slice(w, weight_layout)?;
                let (out, shape) = self.run(x, dims, w, (w0, w1))?;
                Ok((CpuStorage::F16(out), shape))
            }
            _ => candle_core::bail!("cpu convolution: f32 or f16 operands of one dtype only"),
        }
    }
}
