//! Stochastic rounding of f32 values to half precision, for weights trained without f32 master
//! copies (SDXL's full fine-tune on a 24 GB card: the masters alone are 10 GB).
//!
//! An update of 1e-4 times a weight is below half precision's resolution (2^-8 relative in
//! bf16, 2^-11 in f16), so rounding to nearest would drop it every step and the weights would
//! never move. Rounding up with probability equal to how far the value lies toward the upper
//! neighbour keeps every step's update in expectation (kohya's `--full_bf16` with Adafactor's
//! stochastic rounding does the same). Here: add uniform noise one unit in the last place wide,
//! then round to nearest, which is exactly that probability.
//!
//! Written here because candle has no such conversion. The noise is drawn once, seeded, into a
//! pool on the device and read at an offset that depends on the step and the variable, so a
//! resumed run rounds as the uninterrupted one did and no host-side random numbers are drawn
//! per step (2.6 billion per SDXL step would take longer than the step).

use std::f64::consts::LN_2;

use candle_core::{DType, Device, Result, Tensor};

use super::noise::NoiseSource;

/// Seed of the noise pool: fixed, so that rounding is reproducible across runs.
const POOL_SEED: u64 = 0x5352_6f75_6e64;
/// The pool's least length: a small tensor reads a fresh stretch of many values each step
/// (a pool as short as a bias would repeat its few values, and a small update, which rounds
/// up only on the few largest, would be lost or doubled).
const MIN_POOL: usize = 1 << 16;

/// Rounds to half precision stochastically; holds the noise pool of one device.
#[derive(Default)]
pub struct StochasticRounding {
    /// Uniform noise in [-0.5, 0.5), flat, at least as long as the largest tensor rounded.
    pool: Option<Tensor>,
}

impl StochasticRounding {
    /// `x` (f32) rounded to `dtype`: to one of its two neighbours there, the upper one with
    /// probability equal to how far `x` lies toward it. `key` picks the noise (use the step and
    /// the variable: the same key gives the same rounding). Other dtypes round as `to_dtype`.
    pub fn round(&mut self, x: &Tensor, dtype: DType, key: u64) -> Result<Tensor> {
        let (mantissa_bits, min_exponent) = match dtype {
            DType::BF16 => (7.0, -126.0),
            DType::F16 => (10.0, -14.0),
            _ => return x.to_dtype(dtype),
        };
        let x = x.to_dtype(DType::F32)?;
        // The spacing of `dtype`'s values around x: 2^(floor(log2 |x|) - mantissa bits), the
        // subnormal spacing below the smallest normal exponent.
        let exponent = (x.abs()?.log()? / LN_2)?.floor()?.maximum(min_exponent)?;
        let spacing = ((exponent - mantissa_bits)? * LN_2)?.exp()?;
        let noise = self
            .noise(x.elem_count(), x.device(), key)?
            .reshape(x.shape())?;
        let rounded = (&x + (noise * spacing)?)?.to_dtype(dtype)?;
        // A value `dtype` holds exactly stays as it is. At a power of two the values below
        // lie twice as close as those above, and noise one upper spacing wide would round a
        // weight that did not change (a norm's 1.0) down a quarter of the time.
        let nearest = x.to_dtype(dtype)?;
        let exact = nearest.to_dtype(DType::F32)?.eq(&x)?;
        exact.where_cond(&nearest, &rounded)
    }

    /// `n` values of the pool, starting at an offset chosen by `key`.
    fn noise(&mut self, n: usize, device: &Device, key: u64) -> Result<Tensor> {
        let pool = match &self.pool {
            Some(pool) if pool.elem_count() >= n && pool.device().same_device(device) => pool,
            _ => {
                let pool = NoiseSource::from_seed(POOL_SEED)
                    .uniform(n.max(MIN_POOL), device)?
                    .affine(1.0, -0.5)?;
                self.pool.insert(pool)
            }
        };
        let len = pool.elem_count();
        let offset = (splitmix64(key) % len as u64) as usize;
        if offset + n <= len {
            return pool.narrow(0, offset, n);
        }
        // Wrapped around the end of the pool.
        let head = len - offset;
        Tensor::cat(
            &[pool.narrow(0, offset, head)?, pool.narrow(0, 0, n - head)?],
            0,
        )
    }
}

/// A well-mixed 64-bit hash of `key` (SplitMix64's finaliser): nearby keys land far apart.
fn splitmix64(key: u64) -> u64 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Between two neighbours of `dtype`, the rounded values are only those two, and their
    /// mean over many keys is the value itself; rounding to nearest would give the lower
    /// neighbour every time.
    #[test]
    fn rounding_keeps_the_value_in_expectation() -> Result<()> {
        for (dtype, spacing) in [(DType::BF16, 2f32.powi(-7)), (DType::F16, 2f32.powi(-10))] {
            // 1.0 + 0.3 spacing, and a negative value 0.8 of the way from -2.0 to -2.0 - spacing.
            for (value, lower, upper) in [
                (1.0 + 0.3 * spacing, 1.0, 1.0 + spacing),
                (-2.0 - 1.6 * spacing, -2.0 - 2.0 * spacing, -2.0),
            ] {
                let x = Tensor::full(value, 4096, &Device::Cpu)?;
                let mut rounding = StochasticRounding::default();
                let mut sum = 0f64;
                let mut count = 0usize;
                for key in 0..16 {
                    let rounded = rounding.round(&x, dtype, key)?.to_dtype(DType::F32)?;
                    for v in rounded.to_vec1::<f32>()? {
                        assert!(v == lower || v == upper, "{dtype:?}: {v} for {value}");
                        sum += f64::from(v);
                        count += 1;
                    }
                }
                let mean = sum / count as f64;
                let error = (mean - f64::from(value)).abs() / f64::from(spacing);
                assert!(
                    error < 0.02,
                    "{dtype:?}: mean {mean} for {value}, off by {error} of a spacing"
                );
            }
        }
        Ok(())
    }

    /// The same key rounds the same way (a resumed run repeats the uninterrupted one); zero,
    /// exactly representable values (powers of two among them, where the spacing changes)
    /// and f32 are left as they are.
    #[test]
    fn rounding_is_reproducible_and_exact_where_it_can_be() -> Result<()> {
        let x = Tensor::new(&[0.0f32, 1.0, -0.5, 3.0e-3, 1.0 + 1.0e-3], &Device::Cpu)?;
        let x = x.broadcast_as((256, 5))?.contiguous()?;
        let mut a = StochasticRounding::default();
        let mut b = StochasticRounding::default();
        let ra = a.round(&x, DType::BF16, 42)?.to_dtype(DType::F32)?;
        let rb = b.round(&x, DType::BF16, 42)?.to_dtype(DType::F32)?;
        assert_eq!(ra.to_vec2::<f32>()?, rb.to_vec2::<f32>()?);
        // 256 draws each: an exact value that moved even once would show.
        for row in ra.to_vec2::<f32>()? {
            assert_eq!(&row[..3], &[0.0, 1.0, -0.5]);
        }
        let same = a.round(&x, DType::F32, 1)?;
        assert_eq!(same.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
        Ok(())
    }
}
