//! The noise schedule and the deterministic DDIM sampler (eta = 0), computed exactly as
//! diffusers' `DDIMScheduler` does for the model's own scheduler config.
//!
//! The scheduler never sees the model: `step` takes the model's output and returns both the
//! previous sample and the predicted clean sample (the better preview).

use candle_core::{Device, Result as CandleResult, Tensor};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::error::{EngineError, Result};

/// What one denoising step produced.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The latents at the next (lower) timestep.
    pub prev_sample: Tensor,
    /// The model's current guess of the clean latents.
    pub predicted_x0: Tensor,
}

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    /// Cumulative products of (1 - beta), held as f32 values like diffusers' float32 tensor.
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig) -> Self {
        let betas = betas(config);
        let betas = if config.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        // float32 cumulative product, as torch.cumprod on a float32 tensor.
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut product = 1.0f32;
        for beta in &betas {
            product *= 1.0 - beta;
            alphas_cumprod.push(product);
        }
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Self {
            config: config.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    /// The timesteps of a full `steps`-step schedule, highest first.
    pub fn timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        let train = self.config.num_train_timesteps;
        if steps == 0 {
            return Err(EngineError::InvalidRequest(
                "the number of sampling steps must be at least 1".into(),
            ));
        }
        if steps > train {
            return Err(EngineError::InvalidRequest(format!(
                "{steps} sampling steps is more than this model's {train} training timesteps"
            )));
        }
        let timesteps: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => (0..steps)
                .rev()
                .map(|i| {
                    let t = if steps == 1 {
                        0.0
                    } else {
                        i as f64 * (train - 1) as f64 / (steps - 1) as f64
                    };
                    round_half_even(t)
                })
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = train / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                // np.round(np.arange(train, 0, -ratio)) - 1
                (0..steps)
                    .map(|i| round_half_even(train as f64 + i as f64 * -ratio) - 1)
                    .collect()
            }
        };
        timesteps
            .into_iter()
            .map(|t| {
                usize::try_from(t)
                    .ok()
                    .filter(|t| *t < train)
                    .ok_or_else(|| {
                        EngineError::InvalidRequest(format!(
                            "the scheduler config yields timestep {t}, outside 0..{train}; check steps_offset"
                        ))
                    })
            })
            .collect()
    }

    /// The tail of the schedule that SDEdit runs when starting from the noised photo.
    ///
    /// `t0_fraction` in [0, 1] says how far up the schedule to start, as diffusers' img2img
    /// `strength`: 0 runs no step (the photo comes back), 1 runs the whole schedule.
    pub fn sdedit_timesteps(&self, steps: usize, t0_fraction: f64) -> Result<Vec<usize>> {
        if !(0.0..=1.0).contains(&t0_fraction) {
            return Err(EngineError::InvalidRequest(format!(
                "t0 must be between 0 and 1, got {t0_fraction}"
            )));
        }
        let all = self.timesteps(steps)?;
        // Same float arithmetic as diffusers: int(num_inference_steps * strength).
        let run = ((steps as f64 * t0_fraction) as usize).min(steps);
        Ok(all[steps - run..].to_vec())
    }

    fn alpha_at(&self, timestep: usize) -> Result<f32> {
        self.alphas_cumprod.get(timestep).copied().ok_or_else(|| {
            EngineError::InvalidRequest(format!(
                "timestep {timestep} is outside this model's {} training timesteps",
                self.alphas_cumprod.len()
            ))
        })
    }

    /// `[batch, 1, 1, 1]` column of per-sample scalars, for broadcasting over latents.
    fn column(values: Vec<f32>, device: &Device) -> CandleResult<Tensor> {
        let n = values.len();
        Tensor::from_vec(values, (n, 1, 1, 1), device)
    }

    /// Noises clean latents to the given timesteps (one per batch element):
    /// `sqrt(a) * x0 + sqrt(1 - a) * noise`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (signal, noise_scale) = self.scales(timesteps, x0)?;
        Ok((x0.broadcast_mul(&signal)? + noise.broadcast_mul(&noise_scale)?)?)
    }

    /// The v-prediction target: `sqrt(a) * noise - sqrt(1 - a) * x0`.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (signal, noise_scale) = self.scales(timesteps, x0)?;
        Ok((noise.broadcast_mul(&signal)? - x0.broadcast_mul(&noise_scale)?)?)
    }

    /// What the model should have predicted for noised `x0`, per the prediction type.
    pub fn training_target(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        match self.config.prediction_type {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
            PredictionType::Sample => Ok(x0.clone()),
        }
    }

    fn scales(&self, timesteps: &[usize], like: &Tensor) -> Result<(Tensor, Tensor)> {
        let batch = like.dim(0)?;
        if timesteps.len() != batch {
            return Err(EngineError::InvalidRequest(format!(
                "{} timesteps for a batch of {batch}",
                timesteps.len()
            )));
        }
        let alphas = timesteps
            .iter()
            .map(|&t| self.alpha_at(t))
            .collect::<Result<Vec<f32>>>()?;
        let signal = alphas.iter().map(|a| a.sqrt()).collect();
        let noise = alphas.iter().map(|a| (1.0 - a).sqrt()).collect();
        let device = like.device();
        let dtype = like.dtype();
        Ok((
            Self::column(signal, device)?.to_dtype(dtype)?,
            Self::column(noise, device)?.to_dtype(dtype)?,
        ))
    }

    /// The timestep a DDIM step from `timestep` lands on in a `steps`-step schedule, or `None`
    /// past the end (diffusers: `t - train_timesteps // steps`, negative at the end).
    pub fn previous_timestep(&self, timestep: usize, steps: usize) -> Option<usize> {
        timestep.checked_sub(self.config.num_train_timesteps / steps.max(1))
    }

    /// One DDIM step (eta = 0) from `timestep` in a `steps`-step schedule.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        steps: usize,
    ) -> Result<StepOutput> {
        let alpha_t = self.alpha_at(timestep)?;
        let alpha_prev = match self.previous_timestep(timestep, steps) {
            Some(prev) => self.alpha_at(prev)?,
            None => self.final_alpha_cumprod,
        };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt() as f64, beta_t.sqrt() as f64);

        let (predicted_x0, predicted_eps) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = ((sample - (model_output * sqrt_b)?)? / sqrt_a)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = ((sample - (model_output * sqrt_a)?)? / sqrt_b)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = ((sample * sqrt_a)? - (model_output * sqrt_b)?)?;
                let eps = ((model_output * sqrt_a)? + (sample * sqrt_b)?)?;
                (x0, eps)
            }
        };
        let predicted_x0 = match self.config.clip_sample {
            Some(range) => predicted_x0.clamp(-range as f32, range as f32)?,
            None => predicted_x0,
        };
        let direction = (predicted_eps * ((1.0 - alpha_prev).sqrt() as f64))?;
        let prev_sample = ((&predicted_x0 * (alpha_prev.sqrt() as f64))? + direction)?;
        Ok(StepOutput {
            prev_sample,
            predicted_x0,
        })
    }
}

/// numpy's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

/// The betas in float32, as diffusers builds its tensors.
fn betas(config: &SchedulerConfig) -> Vec<f32> {
    let n = config.num_train_timesteps;
    if let Some(trained) = &config.trained_betas {
        return trained.iter().map(|b| *b as f32).collect();
    }
    let linspace = |start: f64, end: f64| -> Vec<f64> {
        if n == 1 {
            return vec![start];
        }
        let step = (end - start) / (n - 1) as f64;
        (0..n).map(|i| start + step * i as f64).collect()
    };
    match config.beta_schedule {
        BetaSchedule::Linear => linspace(config.beta_start, config.beta_end)
            .into_iter()
            .map(|b| b as f32)
            .collect(),
        BetaSchedule::ScaledLinear => linspace(config.beta_start.sqrt(), config.beta_end.sqrt())
            .into_iter()
            .map(|b| {
                let b = b as f32;
                b * b
            })
            .collect(),
        BetaSchedule::SquaredCosCapV2 => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
    }
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023), as diffusers'
/// `rescale_zero_terminal_snr`.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut product = 1.0f32;
    let mut sqrt_bar: Vec<f32> = betas
        .iter()
        .map(|b| {
            product *= 1.0 - b;
            product.sqrt()
        })
        .collect();
    let first = sqrt_bar[0];
    let last = *sqrt_bar.last().unwrap_or(&0.0);
    for v in &mut sqrt_bar {
        *v = (*v - last) * first / (first - last);
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_to_even_like_numpy() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(2.4), 2);
        assert_eq!(round_half_even(2.6), 3);
    }
}
