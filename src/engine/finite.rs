//! Whether tensors hold only finite numbers: a NaN or an infinity that gets into weights,
//! gradients or latents turns every later result into a black image, so it is caught where
//! it enters and named.

use candle_core::{DType, Tensor};

use super::error::Result;

/// True when every element of `tensor` is finite. One device-to-host read: `x - x` is 0 for a
/// finite `x` and NaN otherwise, and NaN survives the sum.
pub fn all_finite(tensor: &Tensor) -> Result<bool> {
    all_finite_together(std::slice::from_ref(tensor))
}

/// `x - x` for every element: 0 where finite, NaN elsewhere. Detached first: on a trained
/// variable the ops would record a graph, and each kept sum would hold its f32 copies alive
/// until all are summed (4 GB at once for SD 1.5's full fine-tune).
fn zero_where_finite(tensor: &Tensor) -> candle_core::Result<Tensor> {
    let wide = tensor.detach().to_dtype(DType::F32)?;
    wide.sub(&wide.clone())
}

/// True when every tensor is finite, read back once for all of them.
pub fn all_finite_together(tensors: &[Tensor]) -> Result<bool> {
    if tensors.is_empty() {
        return Ok(true);
    }
    let sums = tensors
        .iter()
        .map(|t| zero_where_finite(t)?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let zero = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?;
    Ok(zero == 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nan_and_infinity_are_found_and_large_finite_values_are_not() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        assert!(all_finite(&t(&[1.0, -3e38, 0.0])).unwrap());
        assert!(!all_finite(&t(&[1.0, f32::NAN])).unwrap());
        assert!(!all_finite(&t(&[f32::INFINITY, 1.0])).unwrap());
        assert!(!all_finite(&t(&[f32::NEG_INFINITY])).unwrap());
        let half = t(&[6e4]).to_dtype(DType::F16).unwrap();
        assert!(all_finite(&half).unwrap());
        assert!(all_finite_together(&[t(&[1.0]), t(&[2.0])]).unwrap());
        assert!(!all_finite_together(&[t(&[1.0]), t(&[f32::NAN])]).unwrap());
    }
}
