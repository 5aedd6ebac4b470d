//! What fine-tuning a full-size UNet needs from autograd and candle's does not give:
//!
//! - **No-grad regions** ([`no_grad`]): layers read their parameters through [`param`], which
//!   detaches them inside such a region, so a forward pass records no graph even where the
//!   weights are training variables (candle has no such switch).
//! - **Operations with a hand-written backward** ([`with_backward`]): candle's backward
//!   computes the gradient of every input of every op, trained or frozen, and keeps each until
//!   the pass ends: a frozen convolution still pays for its weight's gradient, and adding a
//!   frozen bias keeps an activation-sized gradient alive. Our layers wrap their training
//!   path in an op whose backward computes only what is asked for (see `layers`).
//! - **Gradient checkpointing** ([`checkpoint`]): a segment's activations are recomputed during
//!   backward instead of being stored, and the gradients of the parameters inside it go
//!   straight into the caller's [`GradientSink`] (a [`GradientAccumulator`], or fine-tuning's
//!   update of each segment as its gradients arrive).
//!
//! candle keeps `Tensor::op` private, so no backward pass can be written outside candle; these
//! pieces plug into candle's own through its public custom-op interface.

mod checkpoint;
mod function;
mod gradients;

use std::cell::Cell;

use candle_core::Tensor;

pub use checkpoint::checkpoint;
pub use function::{Backward, with_backward};
pub use gradients::{GradientAccumulator, GradientSink, accumulate_gradients};

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// False inside [`no_grad`].
pub fn grad_enabled() -> bool {
    GRAD_ENABLED.with(Cell::get)
}

/// Runs `f` with gradient recording switched off on this thread (restored afterwards, also on
/// a panic or an early return).
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    with_grad_enabled(false, f)
}

fn with_grad_enabled<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(enabled)));
    f()
}

/// A parameter as a layer should use it: itself, or detached inside [`no_grad`].
pub fn param(t: &Tensor) -> Tensor {
    if grad_enabled() {
        t.clone()
    } else {
        t.detach()
    }
}

/// True when a gradient may have to flow through a computation on these tensors.
pub fn tracks_gradient(tensors: &[&Tensor]) -> bool {
    grad_enabled() && tensors.iter().any(|t| t.track_op())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn no_grad_detaches_parameters_and_restores_itself() {
        let w = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert!(param(w.as_tensor()).track_op());
        no_grad(|| {
            assert!(!grad_enabled());
            assert!(!param(w.as_tensor()).track_op());
            assert!(!tracks_gradient(&[w.as_tensor()]));
        });
        assert!(grad_enabled());
        let caught = std::panic::catch_unwind(|| no_grad(|| panic!("inside")));
        assert!(caught.is_err());
        assert!(grad_enabled(), "a panic inside no_grad left gradients off");
    }
}
