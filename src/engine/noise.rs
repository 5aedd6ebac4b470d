//! The program's own seeded random source: every random number a run uses comes from here.
//!
//! Noise is drawn on the CPU from ChaCha8 (portable, same stream on every platform) with
//! rand_distr's standard normal, then moved to the device, so a seed gives the same image
//! bit for bit on one machine and the same noise on any machine.

use candle_core::{Device, Result, Shape, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub struct NoiseSource {
    rng: ChaCha8Rng,
}

impl NoiseSource {
    pub fn from_seed(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Standard normal f32 noise of `shape`, on `device`.
    pub fn normal(&mut self, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| self.rng.sample::<f32, _>(StandardNormal))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)
    }

    /// Uniform f32 noise in [0, 1) of `shape`, on `device`.
    pub fn uniform(&mut self, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| self.rng.random::<f32>())
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)
    }

    /// A uniform integer in `0..end` (training timesteps).
    pub fn below(&mut self, end: usize) -> usize {
        self.rng.random_range(0..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_other_seed_other_noise() -> Result<()> {
        let a = NoiseSource::from_seed(7).normal((2, 3), &Device::Cpu)?;
        let b = NoiseSource::from_seed(7).normal((2, 3), &Device::Cpu)?;
        let c = NoiseSource::from_seed(8).normal((2, 3), &Device::Cpu)?;
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        assert_ne!(a.to_vec2::<f32>()?, c.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn noise_is_standard_normal() -> Result<()> {
        let n = NoiseSource::from_seed(1).normal(100_000, &Device::Cpu)?;
        let mean = n.mean_all()?.to_scalar::<f32>()?;
        let var = n.sqr()?.mean_all()?.to_scalar::<f32>()? - mean * mean;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
        Ok(())
    }
}
