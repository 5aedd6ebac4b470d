//! GroupNorm, optionally followed by SiLU, as one pass over the data on the CPU.
//!
//! Written by hand because neither candle nor candle-nn has a group-norm kernel: composed from
//! tensor ops it reads and writes the activation about ten times (reshape, mean, subtract,
//! square, mean, divide, scale, shift, then SiLU's exponential and product), which made norms
//! the bulk of the VAE's time at 512x512 and a visible share of the UNet's. Here each
//! (sample, group) is one task: statistics in f64 in two reads, then one read and one write
//! that normalise, scale, shift and apply SiLU. f32, f16 and bf16; other dtypes and devices
//! use the composed version.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::contiguous_elements;
use rayon::prelude::*;

/// The element types the kernel handles, computed in f32.
trait Element: Copy + Send + Sync + 'static {
    fn load(self) -> f32;
    fn store(v: f32) -> Self;
}

impl Element for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

struct GroupNormSilu {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// True where [`group_norm`] runs: CPU tensors in a dtype the kernel handles.
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

/// GroupNorm of `x` `[batch, channels, ...]` with per-channel `weight` and `bias` (SiLU after
/// when `silu`); no gradient. Requires [`supported`].
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let op = GroupNormSilu { groups, eps, silu };
    x.contiguous()?.apply_op3_no_bwd(
        &weight.to_dtype(x.dtype())?.contiguous()?,
        &bias.to_dtype(x.dtype())?.contiguous()?,
        &op,
    )
}

impl GroupNormSilu {
    fn run<T: Element>(&self, x: &[T], w: &[T], b: &[T], shape: &Shape) -> Vec<T> {
        let dims = shape.dims();
        let (batch, channels) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let per_group_channels = channels / self.groups;
        let per_group = per_group_channels * spatial;
        let mut out = vec![T::store(0.0); batch * channels * spatial];
        out.par_chunks_mut(per_group)
            .zip(x.par_chunks(per_group))
            .enumerate()
            .for_each(|(task, (out, x))| {
                let group = task % self.groups;
                let n = x.len() as f64;
                let mean = x.iter().map(|v| f64::from(v.load())).sum::<f64>() / n;
                let variance = x
                    .iter()
                    .map(|v| (f64::from(v.load()) - mean).powi(2))
                    .sum::<f64>()
                    / n;
                let inv_std = 1.0 / (variance + self.eps).sqrt();
                for (c, (out, x)) in out.chunks_mut(spatial).zip(x.chunks(spatial)).enumerate() {
                    let channel = group * per_group_channels + c;
                    let scale = (f64::from(w[channel].load()) * inv_std) as f32;
                    let shift = (f64::from(b[channel].load()) - mean * f64::from(scale)) as f32;
                    if self.silu {
                        for (o, v) in out.iter_mut().zip(x) {
                            let y = v.load() * scale + shift;
                            *o = T::store(y / (1.0 + (-y).exp()));
                        }
                    } else {
                        for (o, v) in out.iter_mut().zip(x) {
                            *o = T::store(v.load() * scale + shift);
                        }
                    }
                }
            });
        out
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    contiguous_elements(data, layout, "group norm")
}

impl CustomOp3 for GroupNormSilu {
    fn name(&self) -> &'static str {
        "group-norm-silu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = x_layout.shape().clone();
        let dims = shape.dims();
        if dims.len() < 3 || self.groups == 0 || !dims[1].is_multiple_of(self.groups) {
            candle_core::bail!(
                "group norm: cannot split {dims:?} into {} groups",
                self.groups
            );
        }
        let storage = match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.run(
                    contiguous(x, x_layout)?,
                    contiguous(w, w_layout)?,
                    contiguous(b, b_layout)?,
                    &shape,
                ))
            }
            (CpuStorage::F16(x), CpuStorage::F16(w), CpuStorage::F16(b)) => {
                CpuStorage::F16(self.run(
                    contiguous(x, x_layout)?,
                    contiguous(w, w_layout)?,
                    contiguous(b, b_layout)?,
                    &shape,
                ))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(self.run(
                    contiguous(x, x_layout)?,
                    contiguous(w, w_layout)?,
                    contiguous(b, b_layout)?,
                    &shape,
                ))
            }
            _ => candle_core::bail!("group norm: unsupported dtype (use f32, f16 or bf16)"),
        };
        Ok((storage, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The textbook formula in f64 from candle's tensor ops.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, silu: bool) -> Tensor {
        let x = x.to_dtype(DType::F64).unwrap();
        let (batch, channels) = (x.dim(0).unwrap(), x.dim(1).unwrap());
        let g = x.reshape((batch, groups, ())).unwrap();
        let mean = g.mean_keepdim(2).unwrap();
        let centered = g.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(2).unwrap();
        let n = centered
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape(x.dims())
            .unwrap();
        let shape = (1, channels, 1, 1);
        let y = n
            .broadcast_mul(&w.to_dtype(DType::F64).unwrap().reshape(shape).unwrap())
            .unwrap()
            .broadcast_add(&b.to_dtype(DType::F64).unwrap().reshape(shape).unwrap())
            .unwrap();
        if silu { y.silu().unwrap() } else { y }
    }

    #[test]
    fn matches_the_formula_in_every_dtype_with_and_without_silu() -> Result<()> {
        let device = Device::Cpu;
        // An offset mean, as real activations have, tests the two-pass variance.
        let x = (Tensor::randn(0f32, 2.0, (2, 12, 5, 7), &device)? + 3.0)?;
        let w = Tensor::randn(1f32, 0.5, 12, &device)?;
        let b = Tensor::randn(0f32, 0.5, 12, &device)?;
        // Tolerances: f32 rounding, and f16 / bf16 storing the result (2^-11, 2^-8 relative).
        for (dtype, tolerance) in [
            (DType::F32, 1e-5),
            (DType::F16, 2e-3),
            (DType::BF16, 1.6e-2),
        ] {
            for silu in [false, true] {
                let expected = reference(&x.to_dtype(dtype)?, &w, &b, 3, silu);
                let got = group_norm(&x.to_dtype(dtype)?, &w, &b, 3, 1e-5, silu)?;
                assert_eq!(got.dtype(), dtype);
                let diff = (got.to_dtype(DType::F64)? - &expected)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f64>()?;
                let scale = expected.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(
                    diff <= tolerance * scale,
                    "{dtype:?}, silu {silu}: differs by {diff} (scale {scale})"
                );
            }
        }
        Ok(())
    }
}
