//! Summing the trained parameters' gradients over one or more backward passes.
//!
//! Checkpointed segments differentiate themselves inside candle's backward pass and hand their
//! parameters' gradients here at once (through a slot this module fills for the duration of
//! [`accumulate_gradients`]), so a segment's gradients never wait for the whole pass to end.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, TensorId, Var};

thread_local! {
    /// The accumulator of the backward pass running on this thread, if any.
    static ACTIVE: RefCell<Option<GradientAccumulator>> = const { RefCell::new(None) };
}

/// Running sums of the gradients of a fixed list of variables, in `dtype` (f32 for half
/// precision parameters, so that summing micro-batches loses nothing).
#[derive(Debug, Default)]
pub struct GradientAccumulator {
    index: HashMap<TensorId, usize>,
    sums: Vec<Option<Tensor>>,
    dtype: Option<DType>,
}

impl GradientAccumulator {
    pub fn new(vars: &[Var], dtype: DType) -> Self {
        Self {
            index: vars
                .iter()
                .enumerate()
                .map(|(i, v)| (v.as_tensor().id(), i))
                .collect(),
            sums: vec![None; vars.len()],
            dtype: Some(dtype),
        }
    }

    /// Sums from now on in `dtype`; only between steps (when there is nothing to convert).
    pub fn sum_in(&mut self, dtype: DType) {
        debug_assert!(self.sums.iter().all(Option::is_none));
        self.dtype = Some(dtype);
    }

    /// Adds every gradient `store` holds for one of our variables.
    pub(super) fn absorb(&mut self, store: &GradStore) -> Result<()> {
        for (id, &i) in &self.index {
            let Some(grad) = store.get_id(*id) else {
                continue;
            };
            let grad = match self.dtype {
                Some(dtype) => grad.to_dtype(dtype)?,
                None => grad.clone(),
            };
            self.sums[i] = Some(match self.sums[i].take() {
                None => grad.detach(),
                Some(sum) => (sum + grad)?.detach(),
            });
        }
        Ok(())
    }

    /// The sums so far, in variable order (`None` where no gradient arrived); starts over.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        let empty = vec![None; self.sums.len()];
        std::mem::replace(&mut self.sums, empty)
    }
}

/// Backpropagates from `loss` and adds the gradients of the accumulator's variables to it,
/// including those of checkpointed segments.
pub fn accumulate_gradients(loss: &Tensor, accumulator: &mut GradientAccumulator) -> Result<()> {
    struct Reclaim<'a>(&'a mut GradientAccumulator);
    impl Drop for Reclaim<'_> {
        fn drop(&mut self) {
            if let Some(back) = ACTIVE.with(|slot| slot.borrow_mut().take()) {
                *self.0 = back;
            }
        }
    }
    let installed = std::mem::take(accumulator);
    let previous = ACTIVE.with(|slot| slot.borrow_mut().replace(installed));
    if previous.is_some() {
        candle_core::bail!("a backward pass is already accumulating gradients on this thread");
    }
    let reclaim = Reclaim(accumulator);
    let store = loss.backward()?;
    drop(reclaim);
    accumulator.absorb(&store)
}

/// Hands a checkpointed segment's parameter gradients to the running accumulator.
pub(super) fn absorb_into_active(store: &GradStore) -> Result<()> {
    ACTIVE.with(|slot| match slot.borrow_mut().as_mut() {
        Some(accumulator) => accumulator.absorb(store),
        None => candle_core::bail!(
            "a checkpointed segment was differentiated outside accumulate_gradients, so its parameters' gradients would be lost"
        ),
    })
}
