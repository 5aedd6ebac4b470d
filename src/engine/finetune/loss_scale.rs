//! Dynamic loss scaling for f16 training (as PyTorch's `GradScaler`): the loss is multiplied
//! before backward so that small gradients do not flush to zero in f16, and divided out of
//! the gradients before the update; a step whose gradients overflowed is redone at half the
//! scale. bf16 and f32 have f32's range and need none.

use candle_core::{DType, Tensor};

use crate::engine::error::{EngineError, Result};

const DIVERGED: &str = "fine-tuning diverged (the gradients stopped being finite numbers at every loss scale); lower the learning rate with --lr, or fine-tune in --precision f32";

/// The scale and its count of good steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct LossScaler {
    scale: f64,
    good_steps: usize,
}

/// What checking a step's scaled gradients found.
pub(super) enum Unscaled {
    /// Finite gradients: the update multiplies them by `factor` (one over the scale).
    Finite { factor: f64 },
    /// They overflowed: the scale was halved and the step must be redone.
    Overflowed,
}

impl LossScaler {
    /// 2^12: high enough for SD's small gradients, low enough that a first overflow is rare.
    const INITIAL: f64 = 4096.0;
    /// Grow the scale after this many steps without an overflow.
    const GROWTH_INTERVAL: usize = 50;
    /// Below this the gradients are not finite for another reason than range.
    const MINIMUM: f64 = 1.0 / 1024.0;

    /// A scaler for training in `dtype`: only f16 needs one.
    pub fn for_dtype(dtype: DType) -> Option<Self> {
        (dtype == DType::F16).then_some(Self {
            scale: Self::INITIAL,
            good_steps: 0,
        })
    }

    /// The scale and good-step count, as a stopped run keeps them to continue.
    pub fn state(&self) -> (f64, usize) {
        (self.scale, self.good_steps)
    }

    /// Continues from a kept state.
    pub fn restore(&mut self, (scale, good_steps): (f64, usize)) {
        self.scale = scale;
        self.good_steps = good_steps;
    }

    /// What the loss is multiplied by before backward.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Checks the step's gradients, still scaled, and says what divides the scale out of them.
    /// The division itself happens in the optimizer, per gradient in f32
    /// ([`crate::engine::optim::Optimizer::step_scaled`]): dividing here would need a second
    /// set of gradients, and in f16 would round away the small ones. An overflow halves the
    /// scale; one below the minimum is a divergence.
    pub fn unscale(&mut self, grads: &[Tensor]) -> Result<Unscaled> {
        self.record(all_finite(grads)?)
    }

    /// [`Self::unscale`] for a step whose gradients were checked elsewhere (segment by
    /// segment, as they arrived): `finite` is whether all of them were.
    pub fn record(&mut self, finite: bool) -> Result<Unscaled> {
        if !finite {
            self.scale /= 2.0;
            self.good_steps = 0;
            if self.scale < Self::MINIMUM {
                return Err(EngineError::InvalidRequest(DIVERGED.into()));
            }
            return Ok(Unscaled::Overflowed);
        }
        let factor = 1.0 / self.scale;
        self.good_steps += 1;
        if self.good_steps.is_multiple_of(Self::GROWTH_INTERVAL) {
            self.scale *= 2.0;
        }
        Ok(Unscaled::Finite { factor })
    }
}

/// True when every gradient is finite (one device-to-host read for all of them).
fn all_finite(grads: &[Tensor]) -> Result<bool> {
    // Squared in f32: a finite f16 gradient above 256 squares to infinity in f16.
    let norms = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = Tensor::stack(&norms, 0)?.sum_all()?.to_dtype(DType::F32)?;
    Ok(total.to_scalar::<f32>()?.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads(value: f32) -> Vec<Tensor> {
        vec![Tensor::full(value, 3, &Device::Cpu).unwrap()]
    }

    #[test]
    fn an_overflow_halves_the_scale_and_good_steps_grow_it() {
        let mut scaler = LossScaler::for_dtype(DType::F16).unwrap();
        assert!(LossScaler::for_dtype(DType::BF16).is_none());
        match scaler.unscale(&grads(8192.0)).unwrap() {
            Unscaled::Finite { factor } => assert_eq!(factor, 1.0 / 4096.0),
            Unscaled::Overflowed => panic!("finite gradients"),
        }
        // 300 squared is beyond f16's range; the gradient itself is not.
        let f16 = grads(300.0)[0].to_dtype(DType::F16).unwrap();
        assert!(matches!(
            scaler.unscale(&[f16]).unwrap(),
            Unscaled::Finite { .. }
        ));
        assert!(matches!(
            scaler.unscale(&grads(f32::INFINITY)).unwrap(),
            Unscaled::Overflowed
        ));
        assert_eq!(scaler.state(), (2048.0, 0));
        for _ in 0..LossScaler::GROWTH_INTERVAL {
            scaler.unscale(&grads(1.0)).unwrap();
        }
        assert_eq!(scaler.state(), (4096.0, LossScaler::GROWTH_INTERVAL));
    }

    #[test]
    fn gradients_that_never_become_finite_are_a_divergence() {
        let mut scaler = LossScaler::for_dtype(DType::F16).unwrap();
        let error = loop {
            match scaler.unscale(&grads(f32::NAN)) {
                Ok(Unscaled::Overflowed) => continue,
                Ok(Unscaled::Finite { .. }) => panic!("NaN is not finite"),
                Err(error) => break error,
            }
        };
        assert!(error.to_string().contains("--lr"), "{error}");
    }
}
