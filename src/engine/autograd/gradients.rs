//! Where a backward pass's parameter gradients go: summed over one or more passes
//! ([`GradientAccumulator`]), or handed to any other [`GradientSink`] as they are made.
//!
//! Checkpointed segments differentiate themselves inside candle's backward pass and hand their
//! parameters' gradients to the sink at once (through a slot this module fills for the
//! duration of [`accumulate_gradients`]), so a segment's gradients never wait for the whole
//! pass to end: a sink may use them and let them go (fine-tuning's segment-by-segment update).

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, TensorId, Var};

thread_local! {
    /// The sink of the backward pass running on this thread, if any.
    static ACTIVE: RefCell<Option<Box<dyn GradientSink>>> = const { RefCell::new(None) };
}

/// Takes the gradients of a backward pass: once per checkpointed segment (that segment's
/// parameters), then once with the pass's own store (everything outside the segments).
pub trait GradientSink: Any {
    fn absorb(&mut self, store: &GradStore) -> Result<()>;
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

    /// The sums so far, in variable order (`None` where no gradient arrived); starts over.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        let empty = vec![None; self.sums.len()];
        std::mem::replace(&mut self.sums, empty)
    }
}

impl GradientSink for GradientAccumulator {
    /// Adds every gradient `store` holds for one of our variables.
    fn absorb(&mut self, store: &GradStore) -> Result<()> {
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
}

/// Backpropagates from `loss` and hands the parameter gradients to `sink`, including those of
/// checkpointed segments as each segment's backward makes them.
pub fn accumulate_gradients<S: GradientSink + Default>(loss: &Tensor, sink: &mut S) -> Result<()> {
    // The sink moves into the thread's slot for the pass (the segments' backward runs inside
    // candle's, out of reach of any reference) and back out when the pass ends, also on an
    // error or a panic.
    struct Reclaim<'a, S: GradientSink>(&'a mut S);
    impl<S: GradientSink> Drop for Reclaim<'_, S> {
        fn drop(&mut self) {
            let back = ACTIVE.with(|slot| slot.borrow_mut().take());
            if let Some(Ok(back)) = back.map(|sink| (sink as Box<dyn Any>).downcast::<S>()) {
                *self.0 = *back;
            }
        }
    }
    if ACTIVE.with(|slot| slot.borrow().is_some()) {
        candle_core::bail!("a backward pass is already accumulating gradients on this thread");
    }
    let installed: Box<dyn GradientSink> = Box::new(std::mem::take(sink));
    ACTIVE.with(|slot| *slot.borrow_mut() = Some(installed));
    let reclaim = Reclaim(sink);
    let store = loss.backward()?;
    drop(reclaim);
    sink.absorb(&store)
}

/// Hands a checkpointed segment's parameter gradients to the running pass's sink.
pub(super) fn absorb_into_active(store: &GradStore) -> Result<()> {
    ACTIVE.with(|slot| match slot.borrow_mut().as_mut() {
        Some(sink) => sink.absorb(store),
        None => candle_core::bail!(
            "a checkpointed segment was differentiated outside accumulate_gradients, so its parameters' gradients would be lost"
        ),
    })
}
