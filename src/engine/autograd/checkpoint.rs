//! Gradient checkpointing: run a segment of the network without recording its activations, and
//! recompute them during backward (one extra forward of the segment, in exchange for keeping
//! only the segment's inputs).

use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

use super::function::{Backward, with_backward};
use super::gradients::absorb_into_active;
use super::{grad_enabled, no_grad, with_grad_enabled};

type Segment = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

/// `segment(inputs)`, with the segment's activations recomputed in backward instead of kept.
///
/// The gradients of the variables the segment reads reach the [`super::GradientSink`]
/// of the running [`super::accumulate_gradients`]; a plain `backward()` through a checkpoint is
/// an error. A segment must be deterministic (the UNet's are: no dropout).
pub fn checkpoint<F>(inputs: &[&Tensor], segment: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
{
    let owned: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
    if !grad_enabled() || !inputs.iter().any(|t| t.track_op()) {
        return segment(&owned);
    }
    let detached: Vec<Tensor> = owned.iter().map(Tensor::detach).collect();
    let output = no_grad(|| segment(&detached))?;
    with_backward(
        inputs,
        output,
        Recompute {
            segment: Arc::new(segment),
        },
    )
}

struct Recompute {
    segment: Arc<Segment>,
}

impl Backward for Recompute {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        // Fresh leaves for the inputs that need a gradient; the others stay constants.
        let leaves: Vec<Option<Var>> = inputs
            .iter()
            .map(|t| {
                t.track_op()
                    .then(|| Var::from_tensor(&t.detach()))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let args: Vec<Tensor> = inputs
            .iter()
            .zip(&leaves)
            .map(|(t, leaf)| match leaf {
                Some(var) => var.as_tensor().clone(),
                None => t.detach(),
            })
            .collect();
        let store = with_grad_enabled(true, || -> Result<_> {
            let output = (self.segment)(&args)?;
            seeded(&output, grad)?.backward()
        })?;
        absorb_into_active(&store)?;
        Ok(leaves
            .iter()
            .map(|leaf| {
                leaf.as_ref()
                    .and_then(|v| store.get(v.as_tensor()).cloned())
            })
            .collect())
    }
}

/// A scalar whose backward gives `output` the gradient `grad`: starts a backward pass from an
/// upstream gradient without multiplying it in.
fn seeded(output: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let zero = Tensor::zeros((), output.dtype(), output.device())?;
    with_backward(&[output], zero, Seed(grad.detach()))
}

struct Seed(Tensor);

impl Backward for Seed {
    fn name(&self) -> &'static str {
        "seed"
    }

    fn backward(&self, _: &[&Tensor], _: &Tensor, _: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(self.0.clone())])
    }
}

#[cfg(test)]
mod tests {
    use super::super::{GradientAccumulator, accumulate_gradients};
    use super::*;
    use candle_core::{DType, Device};

    /// tanh(x * w) * x, with w a parameter inside the segment.
    fn segment(w: &Tensor) -> impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static {
        let w = w.clone();
        move |inputs: &[Tensor]| {
            let x = &inputs[0];
            let w = super::super::param(&w);
            x.broadcast_mul(&w)?.tanh()? * x
        }
    }

    #[test]
    fn checkpointed_gradients_equal_plain_ones() -> Result<()> {
        let device = Device::Cpu;
        let w = Var::new(&[0.5f64, -1.5, 2.0], &device)?;
        let v = Var::new(&[0.3f64, 0.2, -0.1], &device)?;
        let x0 = Tensor::new(&[[1f64, 2.0, 3.0], [-1.0, 0.5, 0.25]], &device)?;
        let loss_with = |checkpointed: bool| -> Result<Tensor> {
            // v before the segment (its gradient flows through the segment's input), w inside.
            let x = x0.broadcast_add(v.as_tensor())?;
            let y = if checkpointed {
                checkpoint(&[&x], segment(w.as_tensor()))?
            } else {
                segment(w.as_tensor())(&[x])?
            };
            y.sqr()?.sum_all()
        };
        let plain = loss_with(false)?.backward()?;
        let mut accumulator = GradientAccumulator::new(&[w.clone(), v.clone()], DType::F64);
        accumulate_gradients(&loss_with(true)?, &mut accumulator)?;
        let sums = accumulator.take();
        for (var, sum) in [&w, &v].iter().zip(&sums) {
            let expected = plain.get(var.as_tensor()).unwrap().to_vec1::<f64>()?;
            let got = sum.as_ref().unwrap().to_vec1::<f64>()?;
            for (a, b) in got.iter().zip(&expected) {
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                    "{got:?} vs {expected:?}"
                );
            }
        }
        // The segment's parameter does not leak into a plain backward's store.
        assert!(loss_with(true)?.backward().is_err());
        Ok(())
    }
}
