//! The optimizer applied to each checkpointed segment's gradients as backward makes them, so
//! that no whole set of gradients ever exists (kohya's "fused backward pass", LOMO's idea).
//!
//! Why this and not the other ways to save the gradients' memory: it removes them entirely
//! (1.7 GB for SD 1.5's full fine-tune in f16, 5 GB for SDXL's) where summing in bf16 halves
//! f32 sums only, and it keeps the f32 masters and f16's loss scale, so the update is the one
//! the whole-batch step makes, to f32 rounding. It needs each variable's gradient to be whole
//! when it arrives, which holds only when one pass is the whole batch (several passes must
//! sum first) and each variable lives in one segment (the UNet's do; a second gradient for a
//! variable is refused by the optimizer rather than applied twice).
//!
//! f16's overflow check moves with it: a segment's gradients are checked before its update.
//! Backward reaches the segments from the output back, and an overflow poisons every segment
//! before it, so the first one that is not finite ends the updates of this attempt; the step
//! is then redone at a lower scale for the variables still waiting (the segments already
//! updated keep their update: it was made from finite, correctly unscaled gradients).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};

use crate::engine::autograd::GradientSink;
use crate::engine::finite::all_finite_together;
use crate::engine::optim::Optimizer;

/// A backward pass's sink that updates each arriving variable at once.
#[derive(Default)]
pub(super) struct SegmentUpdates {
    /// Lent by the run for the pass.
    optimizer: Optimizer,
    index: HashMap<TensorId, usize>,
    /// Multiplies each gradient before its update (one over the f16 loss scale).
    grad_scale: f64,
    /// Set at the first gradients that are not all finite; nothing is updated after it.
    overflowed: bool,
}

impl SegmentUpdates {
    pub fn new(optimizer: Optimizer, grad_scale: f64) -> Self {
        let index = optimizer
            .vars()
            .iter()
            .enumerate()
            .map(|(i, v): (usize, &Var)| (v.as_tensor().id(), i))
            .collect();
        Self {
            optimizer,
            index,
            grad_scale,
            overflowed: false,
        }
    }

    /// Whether some gradients were not finite (and what arrived from then on was dropped).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The optimizer back, with the updates of this pass applied.
    pub fn into_optimizer(self) -> Optimizer {
        self.optimizer
    }
}

impl GradientSink for SegmentUpdates {
    fn absorb(&mut self, store: &GradStore) -> candle_core::Result<()> {
        if self.overflowed {
            return Ok(());
        }
        // Variables an earlier attempt at this step already updated drop their gradient.
        let arrived: Vec<(usize, Tensor)> = self
            .index
            .iter()
            .filter(|(_, i)| !self.optimizer.is_updated(**i))
            .filter_map(|(id, &i)| store.get_id(*id).map(|g| (i, g.clone())))
            .collect();
        let grads: Vec<Tensor> = arrived.iter().map(|(_, g)| g.clone()).collect();
        if !all_finite_together(&grads).map_err(candle_core::Error::wrap)? {
            self.overflowed = true;
            return Ok(());
        }
        drop(grads);
        for (i, grad) in arrived {
            self.optimizer
                .update(i, &grad, self.grad_scale)
                .map_err(candle_core::Error::wrap)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::autograd::{accumulate_gradients, checkpoint, param};
    use crate::engine::optim::{OptimizerKind, OptimizerSettings};
    use candle_core::{DType, Device};

    /// Two checkpointed segments in a row, each with its own parameter: y = tanh(tanh(x a) b).
    fn loss(a: &Var, b: &Var, x: &Tensor) -> candle_core::Result<Tensor> {
        let segment = |w: &Var| {
            let w = w.as_tensor().clone();
            move |inputs: &[Tensor]| inputs[0].broadcast_mul(&param(&w))?.tanh()
        };
        // x is a constant, so a's segment runs plain and a's gradient comes with the pass's own
        // store at the end; b's input tracks a, so b's segment is checkpointed and its
        // gradient arrives first, from inside backward.
        let h = checkpoint(&[x], segment(a))?;
        checkpoint(&[&h], segment(b))?.sqr()?.sum_all()
    }

    fn vars() -> (Var, Var, Tensor) {
        let device = Device::Cpu;
        let a = Var::new(&[0.5f32, -1.5, 2.0], &device).unwrap();
        let b = Var::new(&[0.3f32, 0.2, -0.1], &device).unwrap();
        let x = Tensor::new(&[1f32, 2.0, 3.0], &device).unwrap();
        (a, b, x)
    }

    fn optimizer(vars: &[&Var]) -> Optimizer {
        let settings = OptimizerSettings {
            kind: OptimizerKind::AdamW,
            learning_rate: 1e-2,
            ..OptimizerSettings::default()
        };
        Optimizer::new(&settings, vars.iter().map(|v| (*v).clone()).collect()).unwrap()
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn updating_segment_by_segment_equals_one_whole_step() {
        let (a, b, x) = vars();
        let (a2, b2, _) = vars();

        // The whole step: gradients summed, then one update. The gradient scale is small
        // enough to matter beside AdamW's epsilon (the update is otherwise scale-free).
        let mut whole = optimizer(&[&a, &b]);
        let mut sums =
            crate::engine::autograd::GradientAccumulator::new(&[a.clone(), b.clone()], DType::F32);
        accumulate_gradients(&loss(&a, &b, &x).unwrap(), &mut sums).unwrap();
        let grads: Vec<Tensor> = sums.take().into_iter().map(Option::unwrap).collect();
        whole.step_scaled(&grads, 1e-9).unwrap();

        // Segment by segment: b's update lands while a's backward is still to come.
        let mut updates = SegmentUpdates::new(optimizer(&[&a2, &b2]), 1e-9);
        accumulate_gradients(&loss(&a2, &b2, &x).unwrap(), &mut updates).unwrap();
        assert!(!updates.overflowed());
        let mut fused = updates.into_optimizer();
        assert_eq!(fused.pending().count(), 0);
        fused.finish_step().unwrap();

        assert_eq!(fused.steps_taken(), 1);
        for (got, expected) in [(&a2, &a), (&b2, &b)] {
            assert_eq!(values(got), values(expected));
        }
        assert_ne!(values(&a), vars().0.as_tensor().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn an_overflow_stops_the_updates_and_a_redo_finishes_only_the_rest() {
        let (a, b, x) = vars();
        // An infinite loss scale: b's segment, first in backward, overflows, and a's after it.
        let mut updates = SegmentUpdates::new(optimizer(&[&a, &b]), 1.0);
        let scaled = (loss(&a, &b, &x).unwrap() * f64::INFINITY).unwrap();
        accumulate_gradients(&scaled, &mut updates).unwrap();
        assert!(updates.overflowed());
        let mut optimizer = updates.into_optimizer();
        assert!(!optimizer.step_begun());
        assert_eq!(values(&a), vars().0.as_tensor().to_vec1::<f32>().unwrap());

        // b updated in an attempt that then overflowed in a's segment: the redo updates a only.
        let b_before = values(&b);
        let b_grad = Tensor::new(&[1f32, 1.0, 1.0], &Device::Cpu).unwrap();
        optimizer.update(1, &b_grad, 1.0).unwrap();
        let b_after = values(&b);
        assert_ne!(b_after, b_before);
        let mut updates = SegmentUpdates::new(optimizer, 1.0);
        accumulate_gradients(&loss(&a, &b, &x).unwrap(), &mut updates).unwrap();
        let mut optimizer = updates.into_optimizer();
        assert_eq!(values(&b), b_after, "b took a second update in one step");
        assert!(optimizer.is_updated(0));
        optimizer.finish_step().unwrap();
        assert_eq!(optimizer.steps_taken(), 1);
    }
}
