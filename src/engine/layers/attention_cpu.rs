//! Attention and softmax kernels for the CPU, in f32.
//!
//! Written by hand because candle's CPU path made self-attention at 64x64 latents take 1.5 s of
//! an 18 s UNet step: its softmax calls a scalar `expf` per score (268 million of them per
//! layer for a guided step) and the query-key product writes the scores to memory and reads
//! them back three times. Here each (sample, head) is one task that walks its queries in
//! blocks small enough to stay in the core's cache: scores of a block by one matrix multiply
//! (candle's own `gemm`), a softmax with an exponential the compiler vectorises, then the
//! product with the values. Nothing the size of the score matrix ever reaches memory.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::contiguous_elements;

/// Queries per block: 32 rows of 4096 scores are 512 KiB, within a core's L2 cache.
const BLOCK_ROWS: usize = 64;
/// Lanes of the vectorised reductions (one AVX-512 register of f32).
const LANES: usize = 16;

/// `e^x` for `x <= 0` to about 2e-7 relative, in plain arithmetic the compiler turns into SIMD
/// (Cody-Waite range reduction and a degree-6 Taylor polynomial, as the usual vector math
/// libraries do). Below -87 the result is 0 instead of a subnormal.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer with two additions,
    // which vectorise on every x86-64 (a `round` call would not).
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n, n in [-126, 0], as the float with exponent n.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Softmax of one row in place, with the widest vectors the CPU has (the program is built
/// for baseline x86-64, whose 4-lane SSE2 would leave most of AVX-512's width unused).
fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { softmax_row_avx512(row) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { softmax_row_avx2(row) };
        }
    }
    softmax_row_portable(row);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(row: &mut [f32]) {
    softmax_row_portable(row);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    softmax_row_portable(row);
}

#[inline(always)]
fn softmax_row_portable(row: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    let max = chunks.remainder().iter().fold(
        lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        |m, &v| m.max(v),
    );
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, v) in sums.iter_mut().zip(chunk.iter_mut()) {
            *v = exp_nonpositive(*v - max);
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_nonpositive(*v - max);
        sum += *v;
    }
    let inverse = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inverse;
    }
}

/// `dst = scale * lhs @ rhs` for `(m, n, k)`, or `dst += ...` with `accumulate`; each operand
/// is a pointer with its (row, column) strides. Single-threaded: the callers parallelise over
/// heads.
///
/// # Safety
/// Every element the shapes and strides reach must be inside its allocation, and no other
/// thread may touch the elements of `dst` it reaches.
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize, usize),
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    scale: f32,
    accumulate: bool,
) {
    // SAFETY: as promised by the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2 as isize,
            dst.1 as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("cpu attention: expected f32");
    };
    contiguous_elements(data, layout, "cpu attention")
}

/// `softmax(scale q k^T) v` per head, reading `q` `[batch, queries, heads * dim]` and `k`, `v`
/// `[batch, keys, heads * dim]` (f32, CPU) in place, heads and all: no copies to split or
/// merge the heads. No gradient.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let op = HeadAttention {
        heads,
        scale: scale as f32,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

struct HeadAttention {
    heads: usize,
    scale: f32,
}

/// The output buffer, shared by tasks that each write their own head's columns.
struct Shared(*mut f32);
// SAFETY: tasks write disjoint elements (see `cpu_fwd`).
unsafe impl Sync for Shared {}

impl CustomOp3 for HeadAttention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, queries, width) = q_layout.shape().dims3()?;
        let keys = k_layout.shape().dims3()?.1;
        let heads = self.heads;
        if heads == 0
            || !width.is_multiple_of(heads)
            || k_layout.shape().dims3()? != (batch, keys, width)
            || v_layout.shape() != k_layout.shape()
        {
            candle_core::bail!("cpu attention: mismatched shapes");
        }
        let dim = width / heads;
        let (q, k, v) = (
            contiguous(q, q_layout)?,
            contiguous(k, k_layout)?,
            contiguous(v, v_layout)?,
        );
        let mut out = vec![0f32; batch * queries * width];
        let shared = Shared(out.as_mut_ptr());
        (0..batch * heads).into_par_iter().for_each(|task| {
            let shared = &shared;
            let (b, h) = (task / heads, task % heads);
            // Head h of sample b: rows `width` apart, starting at column h * dim.
            let q = q[b * queries * width + h * dim..].as_ptr();
            let k = k[b * keys * width + h * dim..].as_ptr();
            let v = v[b * keys * width + h * dim..].as_ptr();
            let mut scores = vec![0f32; BLOCK_ROWS * keys];
            for start in (0..queries).step_by(BLOCK_ROWS) {
                let rows = BLOCK_ROWS.min(queries - start);
                // SAFETY: the query rows start..start+rows, the keys and the values of this
                // head lie inside their tensors; scores is rows x keys; this task alone writes
                // the output's columns h * dim.. of sample b.
                unsafe {
                    let q = q.add(start * width);
                    matmul(
                        (rows, keys, dim),
                        (scores.as_mut_ptr(), keys, 1),
                        (q, width, 1),
                        (k, 1, width),
                        self.scale,
                        false,
                    );
                    scores[..rows * keys]
                        .chunks_exact_mut(keys)
                        .for_each(softmax_row);
                    let out = shared.0.add(b * queries * width + start * width + h * dim);
                    matmul(
                        (rows, dim, keys),
                        (out, width, 1),
                        (scores.as_ptr(), keys, 1),
                        (v, width, 1),
                        1.0,
                        false,
                    );
                }
            }
        });
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }
}

/// Which input gradients [`attention_backward`] computes.
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    pub q: bool,
    pub k: bool,
    pub v: bool,
}

/// The gradients of [`attention`] with respect to `q`, `k` and `v` (those `wanted`), from the
/// output `out` and its gradient `grad_out`, all `[batch, tokens, heads * dim]` f32 on the CPU.
///
/// FlashAttention's backward on the CPU: per head and block of queries, the scores and
/// probabilities are recomputed in a cache-sized buffer, `dV += P^T dO`, `dP = dO V^T`,
/// `dS = P (dP - rowsum(dO O))`, `dQ = scale dS K`, `dK += scale dS^T Q`; nothing the size of
/// the score matrix is ever stored.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    grad_out: &Tensor,
    heads: usize,
    scale: f64,
    wanted: Wanted,
) -> Result<[Option<Tensor>; 3]> {
    let (batch, queries, width) = q.dims3()?;
    let keys = k.dim(1)?;
    if heads == 0 || !width.is_multiple_of(heads) {
        candle_core::bail!("cpu attention: {width} channels cannot be split into {heads} heads");
    }
    let dim = width / heads;
    let vec = |t: &Tensor| -> Result<Vec<f32>> { t.contiguous()?.flatten_all()?.to_vec1::<f32>() };
    let (q, k, v, o, d_o) = (vec(q)?, vec(k)?, vec(v)?, vec(out)?, vec(grad_out)?);
    if k.len() != batch * keys * width
        || v.len() != k.len()
        || o.len() != q.len()
        || d_o.len() != q.len()
    {
        candle_core::bail!("cpu attention backward: mismatched shapes");
    }
    let scale = scale as f32;
    let mut grad_q = vec![0f32; if wanted.q { q.len() } else { 0 }];
    let mut grad_k = vec![0f32; if wanted.k { k.len() } else { 0 }];
    let mut grad_v = vec![0f32; if wanted.v { v.len() } else { 0 }];
    let (dq_out, dk_out, dv_out) = (
        Shared(grad_q.as_mut_ptr()),
        Shared(grad_k.as_mut_ptr()),
        Shared(grad_v.as_mut_ptr()),
    );
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (dq_out, dk_out, dv_out) = (&dq_out, &dk_out, &dv_out);
        let (b, h) = (task / heads, task % heads);
        let q_at = b * queries * width + h * dim;
        let kv_at = b * keys * width + h * dim;
        let (q, k, v) = (&q[q_at..], &k[kv_at..], &v[kv_at..]);
        let (o, d_o) = (&o[q_at..], &d_o[q_at..]);
        // delta_i = <dO_i, O_i>, the softmax backward's row term.
        let delta: Vec<f32> = (0..queries)
            .map(|i| {
                let row = i * width;
                d_o[row..row + dim]
                    .iter()
                    .zip(&o[row..row + dim])
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect();
        let mut probs = vec![0f32; BLOCK_ROWS * keys];
        let mut grad_scores = vec![0f32; BLOCK_ROWS * keys];
        // This head's dK and dV, summed over all query blocks ([keys, dim], dense).
        let mut dk = vec![0f32; if wanted.k { keys * dim } else { 0 }];
        let mut dv = vec![0f32; if wanted.v { keys * dim } else { 0 }];
        for start in (0..queries).step_by(BLOCK_ROWS) {
            let rows = BLOCK_ROWS.min(queries - start);
            let (q_block, d_o_block) = (q[start * width..].as_ptr(), d_o[start * width..].as_ptr());
            // SAFETY (all the products below): every operand is this head's slice of its
            // tensor, read with the strides of the [tokens, heads * dim] layout, or one of this
            // task's own dense buffers; the only shared output, dQ, is written at this head's
            // columns and this block's rows, which no other task touches.
            unsafe {
                matmul(
                    (rows, keys, dim),
                    (probs.as_mut_ptr(), keys, 1),
                    (q_block, width, 1),
                    (k.as_ptr(), 1, width),
                    scale,
                    false,
                );
            }
            let probs = &mut probs[..rows * keys];
            probs.chunks_exact_mut(keys).for_each(softmax_row);
            if wanted.v {
                // dV += P^T dO: P^T is P read with swapped strides.
                unsafe {
                    matmul(
                        (keys, dim, rows),
                        (dv.as_mut_ptr(), dim, 1),
                        (probs.as_ptr(), 1, keys),
                        (d_o_block, width, 1),
                        1.0,
                        true,
                    );
                }
            }
            if !(wanted.q || wanted.k) {
                continue;
            }
            let grad_scores = &mut grad_scores[..rows * keys];
            unsafe {
                matmul(
                    (rows, keys, dim),
                    (grad_scores.as_mut_ptr(), keys, 1),
                    (d_o_block, width, 1),
                    (v.as_ptr(), 1, width),
                    1.0,
                    false,
                );
            }
            for (i, (ds, p)) in grad_scores
                .chunks_exact_mut(keys)
                .zip(probs.chunks_exact(keys))
                .enumerate()
            {
                let d = delta[start + i];
                for (ds, p) in ds.iter_mut().zip(p) {
                    *ds = p * (*ds - d);
                }
            }
            if wanted.q {
                unsafe {
                    matmul(
                        (rows, dim, keys),
                        (dq_out.0.add(q_at + start * width), width, 1),
                        (grad_scores.as_ptr(), keys, 1),
                        (k.as_ptr(), width, 1),
                        scale,
                        false,
                    );
                }
            }
            if wanted.k {
                unsafe {
                    matmul(
                        (keys, dim, rows),
                        (dk.as_mut_ptr(), dim, 1),
                        (grad_scores.as_ptr(), 1, keys),
                        (q_block, width, 1),
                        scale,
                        true,
                    );
                }
            }
        }
        for (dense, shared) in [(&dk, dk_out), (&dv, dv_out)] {
            for (j, row) in dense.chunks_exact(dim).enumerate() {
                // SAFETY: this head's columns of row j of sample b, written by this task only.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        row.as_ptr(),
                        shared.0.add(kv_at + j * width),
                        dim,
                    );
                }
            }
        }
    });
    let device = candle_core::Device::Cpu;
    let tensor = |data: Vec<f32>, len: usize, wanted: bool| -> Result<Option<Tensor>> {
        wanted
            .then(|| Tensor::from_vec(data, (batch, len, width), &device))
            .transpose()
    };
    Ok([
        tensor(grad_q, queries, wanted.q)?,
        tensor(grad_k, keys, wanted.k)?,
        tensor(grad_v, keys, wanted.v)?,
    ])
}

/// Softmax over the last dimension of a contiguous f32 CPU tensor; no gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "cpu-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(x, layout)?;
        let last = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = x.to_vec();
        out.par_chunks_mut(last).for_each(softmax_row);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device};

    #[test]
    fn the_vectorised_exponential_is_accurate() {
        for i in 0..=100_000 {
            let x = -90.0 * i as f32 / 100_000.0;
            let (got, expected) = (exp_nonpositive(x), x.exp());
            let tolerance = 3e-7 * expected + 1e-37;
            assert!(
                (got - expected).abs() <= tolerance,
                "exp({x}) = {got}, not {expected}"
            );
        }
    }

    #[test]
    fn softmax_and_attention_match_candles_ops() -> Result<()> {
        let device = Device::Cpu;
        // 70 keys: several lanes and a remainder; 45 queries: blocks and a ragged last one.
        let q = (Tensor::randn(0f32, 1.0, (2, 3, 45, 8), &device)? * 3.0)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 70, 8), &device)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 70, 8), &device)?;
        let scores = q.matmul(&k.t()?)?;
        let expected = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let diff = (softmax_last_dim(&scores)? - &expected)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "softmax differs by {diff}");
        // The same heads in the [batch, tokens, heads * dim] layout the kernel reads, scale 0.5.
        let merge = |t: &Tensor| {
            t.transpose(1, 2)
                .unwrap()
                .reshape((2, t.dim(2).unwrap(), 24))
                .unwrap()
        };
        let expected = merge(&candle_nn::ops::softmax(&(&scores * 0.5)?, D::Minus1)?.matmul(&v)?);
        let got = attention(&merge(&q), &merge(&k), &merge(&v), 3, 0.5)?;
        let diff = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "attention differs by {diff}");
        Ok(())
    }

    /// The backward against candle's autograd through the textbook formula, in f32: 150
    /// queries make two full blocks and a ragged one; 70 keys a lane remainder.
    #[test]
    fn the_backward_matches_autograd() -> Result<()> {
        let device = Device::Cpu;
        let (batch, heads, dim, queries, keys) = (2, 3, 8, 150, 70);
        let width = heads * dim;
        let q = candle_core::Var::from_tensor(&Tensor::randn(
            0f32,
            1.0,
            (batch, queries, width),
            &device,
        )?)?;
        let k = candle_core::Var::from_tensor(&Tensor::randn(
            0f32,
            1.0,
            (batch, keys, width),
            &device,
        )?)?;
        let v = candle_core::Var::from_tensor(&Tensor::randn(
            0f32,
            1.0,
            (batch, keys, width),
            &device,
        )?)?;
        let weights = Tensor::randn(0f32, 1.0, (batch, queries, width), &device)?;
        let split = |t: &Tensor| -> Result<Tensor> {
            let n = t.dim(1)?;
            t.reshape((batch, n, heads, dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = 0.35;
        let scores = (split(q.as_tensor())?.matmul(&split(k.as_tensor())?.t()?)? * scale)?;
        let out = candle_nn::ops::softmax(&scores, D::Minus1)?
            .matmul(&split(v.as_tensor())?)?
            .transpose(1, 2)?
            .reshape((batch, queries, width))?;
        let grads = (&out * &weights)?.sum_all()?.backward()?;
        let wanted = Wanted {
            q: true,
            k: true,
            v: true,
        };
        let ours = attention_backward(
            &q.as_tensor().detach(),
            &k.as_tensor().detach(),
            &v.as_tensor().detach(),
            &out.detach(),
            &weights,
            heads,
            scale,
            wanted,
        )?;
        for (name, var, got) in [
            ("q", &q, &ours[0]),
            ("k", &k, &ours[1]),
            ("v", &v, &ours[2]),
        ] {
            let expected = grads.get(var.as_tensor()).unwrap();
            let got = got.as_ref().unwrap();
            let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "d{name} differs by {diff} (scale {scale})"
            );
        }
        // Only what is asked for is computed.
        let only_v = Wanted {
            q: false,
            k: false,
            v: true,
        };
        let some = attention_backward(
            &q.as_tensor().detach(),
            &k.as_tensor().detach(),
            &v.as_tensor().detach(),
            &out.detach(),
            &weights,
            heads,
            scale,
            only_v,
        )?;
        assert!(some[0].is_none() && some[1].is_none());
        let diff = (some[2].as_ref().unwrap() - ours[2].as_ref().unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
