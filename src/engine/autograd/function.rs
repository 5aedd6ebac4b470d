//! An operation whose forward is ordinary tensor code, run without a graph, and whose backward
//! is written by hand: the custom-autograd-function pattern, on candle's custom ops.
//!
//! candle's custom ops compute their forward on raw storage; ours is already computed, so the
//! op hands over a copy of the result's storage (one memcpy of the output, small next to the
//! matmul or convolution that produced it) and keeps nothing else.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape,
    Storage, Tensor,
};

use super::grad_enabled;

/// The backward half of an operation built with [`with_backward`].
pub trait Backward: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// One gradient per input, in order; `None` for an input that needs none (compute a
    /// gradient only for inputs whose `track_op()` is true: that is the whole point).
    /// `output` and `grad` come detached; detach the inputs before computing with them, or
    /// the gradients will hold on to the graph (and everything it keeps alive).
    fn backward(
        &self,
        inputs: &[&Tensor],
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>>;
}

/// Returns `output` (computed by the caller from detached inputs) as the result of an op on
/// `inputs` (one to three tensors) whose gradient `backward` computes. When no input tracks a
/// gradient the output is returned as it is.
pub fn with_backward<B: Backward>(
    inputs: &[&Tensor],
    output: Tensor,
    backward: B,
) -> Result<Tensor> {
    if !grad_enabled() || !inputs.iter().any(|t| t.track_op()) {
        return Ok(output);
    }
    // The op's result is laid out contiguously from offset 0; hand over storage that is.
    let output = if output.is_contiguous() && output.layout().start_offset() == 0 {
        output
    } else {
        output.copy()?
    };
    let node = Node {
        output: Mutex::new(Some(output)),
        backward,
    };
    match inputs {
        [a] => a.apply_op1(node),
        [a, b] => a.apply_op2(b, node),
        [a, b, c] => a.apply_op3(b, c, node),
        _ => candle_core::bail!(
            "{}: an op takes one to three inputs, not {}",
            node.backward.name(),
            inputs.len()
        ),
    }
}

struct Node<B> {
    /// Taken by the forward, which candle calls exactly once.
    output: Mutex<Option<Tensor>>,
    backward: B,
}

impl<B: Backward> Node<B> {
    fn take(&self) -> Result<Tensor> {
        let taken = self.output.lock().map(|mut slot| slot.take());
        match taken {
            Ok(Some(t)) => Ok(t),
            _ => candle_core::bail!("{}: forward ran twice", self.backward.name()),
        }
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let output = self.take()?;
        let (storage, layout) = output.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, output.shape().clone())),
            _ => candle_core::bail!("{}: output is not on the CPU", self.backward.name()),
        }
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        let output = self.take()?;
        let (storage, layout) = output.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, output.shape().clone())),
            _ => candle_core::bail!("{}: output is not on the CUDA device", self.backward.name()),
        }
    }

    fn metal(&self) -> Result<(MetalStorage, Shape)> {
        let output = self.take()?;
        let (storage, layout) = output.storage_and_layout();
        match &*storage {
            Storage::Metal(s) => Ok((s.try_clone(layout)?, output.shape().clone())),
            _ => candle_core::bail!(
                "{}: output is not on the Metal device",
                self.backward.name()
            ),
        }
    }

    fn gradients<const N: usize>(
        &self,
        inputs: [&Tensor; N],
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let grads = self
            .backward
            .backward(&inputs, &output.detach(), &grad.detach())?;
        let count = grads.len();
        grads.try_into().map_err(|_| {
            candle_core::Error::Msg(format!(
                "{}: backward returned {count} gradients for {N} inputs",
                self.backward.name()
            ))
        })
    }
}

impl<B: Backward> CustomOp1 for Node<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(&self, a: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [ga] = self.gradients([a], res, grad)?;
        Ok(ga)
    }
}

impl<B: Backward> CustomOp2 for Node<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.gradients([a, b], res, grad)?;
        Ok((ga, gb))
    }
}

impl<B: Backward> CustomOp3 for Node<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.gradients([a, b, c], res, grad)?;
        Ok((ga, gb, gc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// y = a * b with a hand-written backward that only differentiates what tracks.
    struct Product;

    impl Backward for Product {
        fn name(&self) -> &'static str {
            "product"
        }
        fn backward(
            &self,
            inputs: &[&Tensor],
            _: &Tensor,
            grad: &Tensor,
        ) -> Result<Vec<Option<Tensor>>> {
            let (a, b) = (inputs[0], inputs[1]);
            Ok(vec![
                a.track_op().then(|| grad * b).transpose()?,
                b.track_op().then(|| grad * a).transpose()?,
            ])
        }
    }

    #[test]
    fn hand_written_backward_matches_candles() -> Result<()> {
        let a = Var::new(&[1f64, 2.0, 3.0], &Device::Cpu)?;
        let b = Tensor::new(&[4f64, -5.0, 6.0], &Device::Cpu)?;
        let output = (a.as_tensor().detach() * &b)?;
        let y = with_backward(&[a.as_tensor(), &b], output, Product)?;
        assert!(y.track_op());
        let ours = (y.sqr()?.sum_all()?).backward()?;
        let reference = ((a.as_tensor() * &b)?.sqr()?.sum_all()?).backward()?;
        assert_eq!(
            ours.get(a.as_tensor()).unwrap().to_vec1::<f64>()?,
            reference.get(a.as_tensor()).unwrap().to_vec1::<f64>()?
        );
        // The frozen input gets no gradient at all.
        assert!(ours.get(&b).is_none());
        Ok(())
    }

    /// y = exp(a), whose backward uses the output.
    struct Exp;

    impl Backward for Exp {
        fn name(&self) -> &'static str {
            "exp"
        }
        fn backward(
            &self,
            _: &[&Tensor],
            output: &Tensor,
            grad: &Tensor,
        ) -> Result<Vec<Option<Tensor>>> {
            Ok(vec![Some((grad * output)?)])
        }
    }

    /// A backward computed from the (tracked) output would make the gradient a graph node that
    /// keeps every intermediate of the backward alive (it once kept all of attention's blocks).
    #[test]
    fn gradients_never_hold_on_to_the_graph() -> Result<()> {
        let a = Var::new(&[0.5f64, -1.0], &Device::Cpu)?;
        let y = with_backward(&[a.as_tensor()], a.as_tensor().detach().exp()?, Exp)?;
        let grads = (y * 3.0)?.sum_all()?.backward()?;
        let g = grads.get(a.as_tensor()).unwrap();
        assert!(!g.track_op(), "the gradient is still part of a graph");
        let expected: Vec<f64> = [0.5f64, -1.0].iter().map(|v| 3.0 * v.exp()).collect();
        assert_eq!(g.to_vec1::<f64>()?, expected);
        Ok(())
    }

    #[test]
    fn untracked_inputs_give_the_output_as_it_is() -> Result<()> {
        let a = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        let y = with_backward(&[&a], a.clone(), Product)?;
        assert!(!y.track_op());
        Ok(())
    }
}
