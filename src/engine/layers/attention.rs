//! Multi-head scaled dot-product attention that never holds the whole score matrix.
//!
//! At SD's 64x64 latents self-attention has 4096 queries and 4096 keys per head: the full
//! `[batch, heads, 4096, 4096]` scores are 1 GB in f32 for a guided step, and training used to
//! keep several copies of them per layer. Here queries are processed in blocks sized so that
//! one block's scores and softmax stay within [`BLOCK_BYTES`]; the backward recomputes each
//! block's scores instead of storing them (as FlashAttention does, with plain matmuls).
//!
//! The softmax always runs in f32 for half-precision inputs; with `upcast` (SD 2.x) the
//! query-key product does too.

use candle_core::{DType, Result, Tensor};

use super::attention_cpu;
use super::norm::wide;
use crate::engine::autograd::{Backward, tracks_gradient, with_backward};

/// Memory for one block of attention scores and what is derived from them.
const BLOCK_BYTES: usize = 256 << 20;
/// Score-sized tensors alive at once: about 3 in the forward (scores, their f32 copy, the
/// probabilities), 8 in the backward (scores, probabilities and their gradients, each in the
/// compute and the accumulation dtype).
const FORWARD_SCORE_COPIES: usize = 3;
const BACKWARD_SCORE_COPIES: usize = 8;

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    upcast: bool,
    /// Bytes one block's score-sized tensors may take ([`BLOCK_BYTES`]).
    budget: usize,
}

impl Dims {
    /// Queries per block such that `copies` score-sized f32 tensors fit in the budget.
    fn block_rows(&self, copies: usize) -> usize {
        let per_row = self.batch * self.heads * self.keys * DType::F32.size_in_bytes() * copies;
        (self.budget / per_row.max(1)).clamp(1, self.queries.max(1))
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// The dtype of the query-key product.
    fn score_dtype(&self, dtype: DType) -> DType {
        if self.upcast { wide(dtype) } else { dtype }
    }

    /// `[batch, len, heads * head_dim]` to `[batch, heads, len, head_dim]`.
    fn split(&self, t: &Tensor) -> Result<Tensor> {
        let len = t.dim(1)?;
        t.reshape((self.batch, len, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// The inverse of [`Dims::split`].
    fn merge(&self, t: &Tensor) -> Result<Tensor> {
        let len = t.dim(2)?;
        t.transpose(1, 2)?
            .reshape((self.batch, len, self.heads * self.head_dim))
    }
}

/// Attention over `q` `[batch, queries, heads * head_dim]` and `k`, `v`
/// `[batch, keys, heads * head_dim]`; returns `[batch, queries, heads * head_dim]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, upcast: bool) -> Result<Tensor> {
    blocked_attention(q, k, v, heads, upcast, BLOCK_BYTES)
}

fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast: bool,
    budget: usize,
) -> Result<Tensor> {
    let (batch, queries, inner) = q.dims3()?;
    if heads == 0 || !inner.is_multiple_of(heads) {
        candle_core::bail!("attention: {inner} channels cannot be split into {heads} heads");
    }
    let dims = Dims {
        batch,
        heads,
        queries,
        keys: k.dim(1)?,
        head_dim: inner / heads,
        upcast,
        budget,
    };
    if !tracks_gradient(&[q, k, v]) {
        return forward(q, k, v, &dims);
    }
    let output = forward(&q.detach(), &k.detach(), &v.detach(), &dims)?;
    with_backward(&[q, k, v], output, AttentionBackward { dims })
}

/// Scaled queries and keys in the score dtype, values as they are, all split into heads.
fn prepare(q: &Tensor, k: &Tensor, v: &Tensor, dims: &Dims) -> Result<(Tensor, Tensor, Tensor)> {
    let score_dtype = dims.score_dtype(q.dtype());
    let q = (dims.split(q)?.to_dtype(score_dtype)? * dims.scale())?;
    let k = dims.split(k)?.to_dtype(score_dtype)?;
    Ok((q, k, dims.split(v)?))
}

/// Softmax over the last dimension in the accumulation dtype.
fn probabilities(q_block: &Tensor, k: &Tensor) -> Result<Tensor> {
    let scores = q_block.matmul(&k.t()?)?.to_dtype(wide(q_block.dtype()))?;
    if is_cpu_f32(&scores) {
        attention_cpu::softmax_last_dim(&scores)
    } else {
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

fn forward(q: &Tensor, k: &Tensor, v: &Tensor, dims: &Dims) -> Result<Tensor> {
    if [q, k, v].iter().all(|t| is_cpu_f32(t)) {
        return attention_cpu::attention(q, k, v, dims.heads, dims.scale());
    }
    let (q, k, v) = prepare(q, k, v, dims)?;
    let rows = dims.block_rows(FORWARD_SCORE_COPIES);
    let mut blocks = Vec::with_capacity(dims.queries.div_ceil(rows));
    for start in (0..dims.queries).step_by(rows) {
        let q_block = q.narrow(2, start, rows.min(dims.queries - start))?;
        let probs = probabilities(&q_block, &k)?.to_dtype(v.dtype())?;
        blocks.push(probs.matmul(&v)?);
    }
    let out = if blocks.len() == 1 {
        blocks.remove(0)
    } else {
        Tensor::cat(&blocks, 2)?
    };
    dims.merge(&out)
}

struct AttentionBackward {
    dims: Dims,
}

impl Backward for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let dims = &self.dims;
        let [wants_q, wants_k, wants_v] = [0, 1, 2].map(|i| inputs[i].track_op());
        if [inputs[0], inputs[1], inputs[2], output, grad]
            .iter()
            .all(|t| is_cpu_f32(t))
        {
            let wanted = attention_cpu::Wanted {
                q: wants_q,
                k: wants_k,
                v: wants_v,
            };
            let [q, k, v] = [0, 1, 2].map(|i| inputs[i].detach());
            let grads = attention_cpu::attention_backward(
                &q,
                &k,
                &v,
                output,
                grad,
                dims.heads,
                dims.scale(),
                wanted,
            )?;
            return Ok(grads.into());
        }
        let (q, k, v) = prepare(
            &inputs[0].detach(),
            &inputs[1].detach(),
            &inputs[2].detach(),
            dims,
        )?;
        let acc = wide(v.dtype());
        let grad_out = dims.split(grad)?;
        // delta_i = sum_j P_ij dP_ij = <dO_i, O_i>: the softmax backward's row term.
        let delta =
            (grad_out.to_dtype(acc)? * dims.split(output)?.to_dtype(acc)?)?.sum_keepdim(3)?;
        let rows = dims.block_rows(BACKWARD_SCORE_COPIES);
        let mut grad_q_blocks = Vec::new();
        let mut grad_k: Option<Tensor> = None;
        let mut grad_v: Option<Tensor> = None;
        let add = |sum: &mut Option<Tensor>, term: Tensor| -> Result<()> {
            let term = term.to_dtype(acc)?;
            *sum = Some(match sum.take() {
                Some(s) => (s + term)?,
                None => term,
            });
            Ok(())
        };
        for start in (0..dims.queries).step_by(rows) {
            let n = rows.min(dims.queries - start);
            let q_block = q.narrow(2, start, n)?;
            let probs = probabilities(&q_block, &k)?;
            let grad_out_block = grad_out.narrow(2, start, n)?;
            if wants_v {
                add(
                    &mut grad_v,
                    probs.to_dtype(v.dtype())?.t()?.matmul(&grad_out_block)?,
                )?;
            }
            if !(wants_q || wants_k) {
                continue;
            }
            let grad_probs = grad_out_block.matmul(&v.t()?)?.to_dtype(acc)?;
            let grad_scores = (probs * grad_probs.broadcast_sub(&delta.narrow(2, start, n)?)?)?
                .to_dtype(q.dtype())?;
            if wants_q {
                grad_q_blocks.push(grad_scores.matmul(&k)?);
            }
            if wants_k {
                // The queries were scaled before the product, so this is already d/dk.
                add(&mut grad_k, grad_scores.t()?.matmul(&q_block)?)?;
            }
        }
        let dtype = inputs[0].dtype();
        let grad_q = if wants_q {
            let g = if grad_q_blocks.len() == 1 {
                grad_q_blocks.remove(0)
            } else {
                Tensor::cat(&grad_q_blocks, 2)?
            };
            Some(dims.merge(&(g * dims.scale())?)?.to_dtype(dtype)?)
        } else {
            None
        };
        let merge = |g: Option<Tensor>, like: &Tensor| -> Result<Option<Tensor>> {
            g.map(|g| dims.merge(&g)?.to_dtype(like.dtype()))
                .transpose()
        };
        Ok(vec![
            grad_q,
            merge(grad_k, inputs[1])?,
            merge(grad_v, inputs[2])?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The textbook formula, whole score matrix and candle's autograd.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, nq, inner) = q.dims3()?;
        let d = inner / heads;
        let split = |t: &Tensor| -> Result<Tensor> {
            let n = t.dim(1)?;
            t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let scores = (split(q)?.matmul(&split(k)?.t()?)? / (d as f64).sqrt())?;
        let probs = candle_nn::ops::softmax(&scores, 3)?;
        probs
            .matmul(&split(v)?)?
            .transpose(1, 2)?
            .reshape((b, nq, inner))
    }

    fn random(shape: (usize, usize, usize), seed: u64) -> Result<Tensor> {
        crate::engine::noise::NoiseSource::from_seed(seed)
            .normal(shape, &Device::Cpu)?
            .to_dtype(DType::F64)
    }

    /// A budget of a few rows per block: several blocks, the last one ragged.
    const BUDGET: usize = 40_000;

    fn check(batch: usize, queries: usize, keys: usize, heads: usize) -> Result<()> {
        let q = Var::from_tensor(&random((batch, queries, heads * 8), 1)?)?;
        let k = Var::from_tensor(&random((batch, keys, heads * 8), 2)?)?;
        let v = Var::from_tensor(&random((batch, keys, heads * 8), 3)?)?;
        let weights = random((batch, queries, heads * 8), 4)?;
        let dims = Dims {
            batch,
            heads,
            queries,
            keys,
            head_dim: 8,
            upcast: false,
            budget: BUDGET,
        };
        let rows = dims.block_rows(BACKWARD_SCORE_COPIES);
        assert!(
            rows < queries && !queries.is_multiple_of(rows),
            "the test must use several blocks"
        );
        let ours = blocked_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            heads,
            false,
            BUDGET,
        )?;
        let theirs = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads)?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "forward differs by {diff}");
        let g_ours = (ours * &weights)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &weights)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let a = g_ours.get(var.as_tensor()).unwrap();
            let b = g_theirs.get(var.as_tensor()).unwrap();
            let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(
                diff <= 1e-12 * scale,
                "d{name} differs by {diff} (scale {scale})"
            );
        }
        Ok(())
    }

    #[test]
    fn blocked_attention_and_its_gradients_equal_the_textbook_formula() -> Result<()> {
        check(2, 101, 70, 2)
    }
}
