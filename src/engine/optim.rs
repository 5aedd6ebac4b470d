//! Optimisers for fine-tuning the UNet on one photo: Adafactor (the UniTune paper's choice,
//! learning rate 1e-4) and AdamW.
//!
//! Hand-written rather than taken from candle-nn: candle-nn has AdamW but no Adafactor, and
//! its `Optimizer::backward_step` takes the `GradStore` of a single backward pass, while
//! gradient accumulation needs to hand over gradients summed over several micro-batches.
//!
//! Each follows its reference operation by operation, so that tests can compare trajectories
//! at float32 precision: transformers' `transformers.optimization.Adafactor` with
//! `relative_step=False, scale_parameter=False, warmup_init=False, beta1=None,
//! decay_rate=-0.8, eps=(1e-30, 1e-3), clip_threshold=1.0`, and torch's single-tensor
//! `torch.optim.AdamW` (betas 0.9/0.999, eps 1e-8). Optimizer state is float32 on the
//! parameter's device whatever the parameter dtype; each update is computed in float32 and
//! written back in the parameter's own dtype, in place (`Var::set`), so every tensor that
//! shares a var's storage sees it. A half-precision parameter also gets a float32 master
//! copy that the updates accumulate in: an update of 1e-4 times a weight is below bf16's
//! resolution (2^-8) and would otherwise round away; without masters
//! ([`OptimizerSettings::master_weights`] off) the update is rounded in stochastically
//! instead (see `rounding`). A step can also be applied one variable at a time while backward
//! still runs ([`Optimizer::update`], then [`Optimizer::finish_step`]; see
//! `finetune::segment_updates`): every update is per variable, with no global norm, so the
//! result is the same.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor, Var};

use super::error::{EngineError, Result};
use super::rounding::StochasticRounding;

/// Adafactor's `decay_rate`: the second-moment decay at step t is `1 - t^decay_rate`.
const ADAFACTOR_DECAY_RATE: f64 = -0.8;
/// Adafactor's `eps[0]`, added to squared gradients.
const ADAFACTOR_EPS_SQUARED_GRAD: f64 = 1e-30;
/// Adafactor's `clip_threshold`: updates whose RMS exceeds it are scaled down to it.
const ADAFACTOR_CLIP_THRESHOLD: f64 = 1.0;
const ADAMW_BETA1: f64 = 0.9;
const ADAMW_BETA2: f64 = 0.999;
const ADAMW_EPS: f64 = 1e-8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    /// Factored second moments, no first moment: state is rows + columns per matrix.
    #[default]
    Adafactor,
    /// Two full-size moments per parameter.
    AdamW,
}

impl OptimizerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Adafactor => "adafactor",
            Self::AdamW => "adamw",
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "adafactor" => Ok(Self::Adafactor),
            "adamw" => Ok(Self::AdamW),
            other => Err(format!(
                "unknown optimizer `{other}` (use adafactor or adamw)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSettings {
    pub kind: OptimizerKind,
    pub learning_rate: f64,
    /// Decoupled weight decay: each step first multiplies the parameters by
    /// `1 - learning_rate * weight_decay`.
    pub weight_decay: f64,
    /// Keep a float32 master copy of each half-precision parameter for the updates to
    /// accumulate in (exact; 4 bytes per weight). Off, the half-precision weights are the only
    /// copy and each update is rounded into them stochastically (see `rounding`): what fits
    /// SDXL's full fine-tune on a 24 GB card, where the masters alone are 10 GB.
    pub master_weights: bool,
}

impl Default for OptimizerSettings {
    /// The UniTune paper's: Adafactor at learning rate 1e-4, no weight decay (and exact
    /// updates, in f32 master weights).
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adafactor,
            learning_rate: 1e-4,
            weight_decay: 0.0,
            master_weights: true,
        }
    }
}

/// Per-parameter state, all float32.
enum ParamState {
    Adafactor(SecondMoment),
    AdamW { exp_avg: Tensor, exp_avg_sq: Tensor },
}

/// Adafactor's running mean of squared gradients.
enum SecondMoment {
    /// For tensors of 2 or more dims: means over the last dim (`row`, shape `dims[..n-1]`)
    /// and the second-last dim (`col`, shape `dims[..n-2] + dims[n-1]`). For a conv weight
    /// [o, i, kh, kw] both are [o, i, kh]: the factoring is over the kernel dims.
    Factored { row: Tensor, col: Tensor },
    /// For scalars and vectors: the full running mean.
    Full(Tensor),
}

impl ParamState {
    fn new(kind: OptimizerKind, var: &Var) -> Result<Self> {
        let dims = var.dims();
        let zeros = |shape: Vec<usize>| Tensor::zeros(shape, DType::F32, var.device());
        Ok(match kind {
            OptimizerKind::Adafactor if dims.len() >= 2 => {
                let n = dims.len();
                let mut col_shape = dims[..n - 2].to_vec();
                col_shape.push(dims[n - 1]);
                Self::Adafactor(SecondMoment::Factored {
                    row: zeros(dims[..n - 1].to_vec())?,
                    col: zeros(col_shape)?,
                })
            }
            OptimizerKind::Adafactor => Self::Adafactor(SecondMoment::Full(zeros(dims.to_vec())?)),
            OptimizerKind::AdamW => Self::AdamW {
                exp_avg: zeros(dims.to_vec())?,
                exp_avg_sq: zeros(dims.to_vec())?,
            },
        })
    }

    fn bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Self::Adafactor(SecondMoment::Factored { row, col }) => bytes(row) + bytes(col),
            Self::Adafactor(SecondMoment::Full(exp_avg_sq)) => bytes(exp_avg_sq),
            Self::AdamW {
                exp_avg,
                exp_avg_sq,
            } => bytes(exp_avg) + bytes(exp_avg_sq),
        }
    }
}

/// An optimizer's state as named float32 tensors (`adafactor_row.3`, `master.3`, ..., numbered
/// by variable), for resuming an interrupted fine-tune (see [`Optimizer::state`]).
#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub steps_taken: usize,
    pub tensors: Vec<(String, Tensor)>,
}

pub struct Optimizer {
    settings: OptimizerSettings,
    vars: Vec<Var>,
    states: Vec<ParamState>,
    /// Float32 copies of the half-precision parameters (`None` for float32 ones).
    masters: Vec<Option<Tensor>>,
    /// Which variables the step in progress has updated (all false between steps).
    updated: Vec<bool>,
    /// How half-precision parameters without a master take their updates.
    rounding: StochasticRounding,
    steps_taken: usize,
}

/// An optimizer over no variables: what a run's field holds while its optimizer is lent to a
/// backward pass that updates segment by segment.
impl Default for Optimizer {
    fn default() -> Self {
        Self {
            settings: OptimizerSettings::default(),
            vars: Vec::new(),
            states: Vec::new(),
            masters: Vec::new(),
            updated: Vec::new(),
            rounding: StochasticRounding::default(),
            steps_taken: 0,
        }
    }
}

impl Optimizer {
    pub fn new(settings: &OptimizerSettings, vars: Vec<Var>) -> Result<Self> {
        if !(settings.learning_rate.is_finite() && settings.learning_rate >= 0.0) {
            return Err(EngineError::InvalidRequest(format!(
                "the learning rate must be a number of at least 0, not {}; try 1e-4",
                settings.learning_rate
            )));
        }
        if !(settings.weight_decay.is_finite() && settings.weight_decay >= 0.0) {
            return Err(EngineError::InvalidRequest(format!(
                "the weight decay must be a number of at least 0, not {}; try 0",
                settings.weight_decay
            )));
        }
        if let Some(var) = vars.iter().find(|v| !v.dtype().is_float()) {
            return Err(EngineError::InvalidRequest(format!(
                "only floating-point parameters can be optimised, not {:?} ones",
                var.dtype()
            )));
        }
        let states = vars
            .iter()
            .map(|var| ParamState::new(settings.kind, var))
            .collect::<Result<Vec<_>>>()?;
        let masters = vars
            .iter()
            .map(|var| match var.dtype() {
                DType::F16 | DType::BF16 if settings.master_weights => {
                    Ok(Some(var.as_detached_tensor().to_dtype(DType::F32)?))
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            settings: *settings,
            rounding: StochasticRounding::default(),
            updated: vec![false; vars.len()],
            vars,
            states,
            masters,
            steps_taken: 0,
        })
    }

    /// One update with one gradient per var, in the same order as `vars` (the caller sums
    /// micro-batch gradients for gradient accumulation). Gradients may be in any float dtype.
    pub fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// [`Self::step`] with each gradient multiplied by `grad_scale` once it is in f32: how an
    /// f16 loss scale is divided out without rounding the true, smaller gradients to f16
    /// (where those below 6e-5 lose precision and those below 6e-8 vanish). Variables the step
    /// in progress already updated ([`Self::update`]) keep that update.
    pub fn step_scaled(&mut self, grads: &[Tensor], grad_scale: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(EngineError::InvalidRequest(format!(
                "the optimizer got {} gradients for {} parameters; pass one gradient per parameter, in the same order",
                grads.len(),
                self.vars.len()
            )));
        }
        // Checked up front so that a bad call changes nothing.
        for (index, grad) in grads.iter().enumerate() {
            self.check_shape(index, grad)?;
        }
        for (index, grad) in grads.iter().enumerate() {
            if !self.updated[index] {
                self.update(index, grad, grad_scale)?;
            }
        }
        self.finish_step()
    }

    /// Updates variable `index` alone, as part of the step in progress (whose number is
    /// [`Self::steps_taken`] + 1 until [`Self::finish_step`]): how a step is applied segment
    /// by segment while backward still runs. Each variable takes one update per step; a second
    /// one is refused.
    pub fn update(&mut self, index: usize, grad: &Tensor, grad_scale: f64) -> Result<()> {
        self.check_shape(index, grad)?;
        if self.updated[index] {
            return Err(EngineError::InvalidRequest(format!(
                "parameter {index} was already updated in step {}; a step updates each parameter once",
                self.steps_taken + 1
            )));
        }
        let step = self.steps_taken + 1;
        let OptimizerSettings {
            learning_rate,
            weight_decay,
            ..
        } = self.settings;
        let var = &self.vars[index];
        let grad = grad.detach().to_dtype(DType::F32)?;
        let grad = if grad_scale == 1.0 {
            grad
        } else {
            grad.affine(grad_scale, 0.0)?
        };
        let master = &mut self.masters[index];
        let param = match master {
            Some(master) => master.clone(),
            None => var.as_detached_tensor().to_dtype(DType::F32)?,
        };
        let updated = match &mut self.states[index] {
            ParamState::Adafactor(second_moment) => {
                let update =
                    adafactor_update(second_moment, &grad, step)?.affine(learning_rate, 0.0)?;
                let param = if weight_decay != 0.0 {
                    (&param + param.affine(-weight_decay * learning_rate, 0.0)?)?
                } else {
                    param
                };
                (param - update)?
            }
            ParamState::AdamW {
                exp_avg,
                exp_avg_sq,
            } => {
                let param = if weight_decay != 0.0 {
                    param.affine(1.0 - learning_rate * weight_decay, 0.0)?
                } else {
                    param
                };
                // exp_avg.lerp_(grad, 1 - beta1): for a weight below 0.5 torch computes
                // self + weight * (end - self).
                *exp_avg = (&*exp_avg + (&grad - &*exp_avg)?.affine(1.0 - ADAMW_BETA1, 0.0)?)?;
                // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                *exp_avg_sq = (exp_avg_sq.affine(ADAMW_BETA2, 0.0)?
                    + (grad.affine(1.0 - ADAMW_BETA2, 0.0)? * &grad)?)?;
                let bias_correction1 = 1.0 - ADAMW_BETA1.powi(step_i32(step));
                let bias_correction2 = 1.0 - ADAMW_BETA2.powi(step_i32(step));
                let step_size = learning_rate / bias_correction1;
                let denom =
                    (exp_avg_sq.sqrt()? / bias_correction2.sqrt())?.affine(1.0, ADAMW_EPS)?;
                // param.addcdiv_(exp_avg, denom, value=-step_size)
                (param + (exp_avg.affine(-step_size, 0.0)? / denom)?)?
            }
        };
        match master {
            Some(master) => {
                var.set(&updated.to_dtype(var.dtype())?)?;
                *master = updated;
            }
            None => {
                // Without a master, an f32 parameter takes the update as it is and a half one
                // rounds it in stochastically, differently for each step and variable.
                let key = ((step as u64) << 24) ^ index as u64;
                var.set(&self.rounding.round(&updated, var.dtype(), key)?)?;
            }
        }
        self.updated[index] = true;
        Ok(())
    }

    /// Ends the step in progress once every variable took its update; an error names the
    /// first one that did not.
    pub fn finish_step(&mut self) -> Result<()> {
        if let Some(index) = self.pending().next() {
            return Err(EngineError::InvalidRequest(format!(
                "parameter {index} took no update in step {}",
                self.steps_taken + 1
            )));
        }
        self.updated.fill(false);
        self.steps_taken += 1;
        Ok(())
    }

    /// The variables the step in progress has not updated yet, by index.
    pub fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        self.updated
            .iter()
            .enumerate()
            .filter(|(_, done)| !**done)
            .map(|(index, _)| index)
    }

    /// True when the step in progress has updated some variables (so the weights are no
    /// longer those after the last whole step).
    pub fn step_begun(&self) -> bool {
        self.updated.iter().any(|done| *done)
    }

    /// Whether variable `index` took its update in the step in progress.
    pub fn is_updated(&self, index: usize) -> bool {
        self.updated[index]
    }

    fn check_shape(&self, index: usize, grad: &Tensor) -> Result<()> {
        let var = self.vars.get(index).ok_or_else(|| {
            EngineError::InvalidRequest(format!(
                "the optimizer has {} parameters, not {}",
                self.vars.len(),
                index + 1
            ))
        })?;
        if var.dims() != grad.dims() {
            return Err(EngineError::InvalidRequest(format!(
                "gradient {index} has shape {:?} but its parameter has shape {:?}",
                grad.dims(),
                var.dims()
            )));
        }
        Ok(())
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Everything the next update depends on besides the parameters and gradients: the
    /// moments, the float32 masters and the step count. Tensors are shared, not copied.
    pub fn state(&self) -> OptimizerState {
        let mut tensors = Vec::new();
        for (i, (state, master)) in self.states.iter().zip(&self.masters).enumerate() {
            let parts: Vec<(&str, &Tensor)> = match state {
                ParamState::Adafactor(SecondMoment::Factored { row, col }) => {
                    vec![("adafactor_row", row), ("adafactor_col", col)]
                }
                ParamState::Adafactor(SecondMoment::Full(exp_avg_sq)) => {
                    vec![("adafactor_full", exp_avg_sq)]
                }
                ParamState::AdamW {
                    exp_avg,
                    exp_avg_sq,
                } => vec![("adamw_exp_avg", exp_avg), ("adamw_exp_avg_sq", exp_avg_sq)],
            };
            let master = master.as_ref().map(|m| ("master", m));
            for (part, tensor) in parts.into_iter().chain(master) {
                tensors.push((format!("{part}.{i}"), tensor.clone()));
            }
        }
        OptimizerState {
            steps_taken: self.steps_taken,
            tensors,
        }
    }

    /// Continues from `state` (taken from an optimizer of the same kind over variables of the
    /// same shapes); checked whole before anything changes.
    pub fn restore(&mut self, state: &OptimizerState) -> Result<()> {
        let saved: std::collections::HashMap<&str, &Tensor> = state
            .tensors
            .iter()
            .map(|(name, t)| (name.as_str(), t))
            .collect();
        let expected = self.state();
        if expected.tensors.len() != saved.len() {
            return Err(EngineError::InvalidRequest(format!(
                "the saved optimizer state holds {} tensors, this optimizer {}",
                saved.len(),
                expected.tensors.len()
            )));
        }
        let mut restored = Vec::with_capacity(expected.tensors.len());
        for (name, current) in &expected.tensors {
            let value = saved.get(name.as_str()).ok_or_else(|| {
                EngineError::InvalidRequest(format!("the saved optimizer state lacks {name}"))
            })?;
            if value.dims() != current.dims() {
                return Err(EngineError::InvalidRequest(format!(
                    "the saved optimizer state's {name} has shape {:?}, expected {:?}",
                    value.dims(),
                    current.dims()
                )));
            }
            restored.push(value.to_dtype(DType::F32)?.to_device(current.device())?);
        }
        let mut values = restored.into_iter();
        for (state, master) in self.states.iter_mut().zip(&mut self.masters) {
            let mut next = || values.next().expect("counted above");
            match state {
                ParamState::Adafactor(SecondMoment::Factored { row, col }) => {
                    *row = next();
                    *col = next();
                }
                ParamState::Adafactor(SecondMoment::Full(exp_avg_sq)) => *exp_avg_sq = next(),
                ParamState::AdamW {
                    exp_avg,
                    exp_avg_sq,
                } => {
                    *exp_avg = next();
                    *exp_avg_sq = next();
                }
            }
            if let Some(master) = master {
                *master = next();
            }
        }
        self.steps_taken = state.steps_taken;
        self.updated.fill(false);
        Ok(())
    }

    pub fn steps_taken(&self) -> usize {
        self.steps_taken
    }

    /// Bytes of optimizer state held, master copies included (for the memory report).
    pub fn state_bytes(&self) -> usize {
        let masters: usize = self
            .masters
            .iter()
            .flatten()
            .map(|m| m.elem_count() * 4)
            .sum();
        self.states.iter().map(ParamState::bytes).sum::<usize>() + masters
    }
}

/// Step counts beyond i32 only matter to AdamW's bias corrections, which are 1 long before.
fn step_i32(step: usize) -> i32 {
    i32::try_from(step).unwrap_or(i32::MAX)
}

/// Adafactor's update before the learning rate, in transformers' order of operations;
/// advances the second-moment state.
fn adafactor_update(
    second_moment: &mut SecondMoment,
    grad: &Tensor,
    step: usize,
) -> Result<Tensor> {
    let beta2t = 1.0 - (step as f64).powf(ADAFACTOR_DECAY_RATE);
    let squared = grad.sqr()?.affine(1.0, ADAFACTOR_EPS_SQUARED_GRAD)?;
    let update = match second_moment {
        SecondMoment::Factored { row, col } => {
            let n = grad.rank();
            // exp_avg_sq_row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1 - beta2t),
            // likewise the columns with the mean over dim -2.
            *row = (row.affine(beta2t, 0.0)? + squared.mean(n - 1)?.affine(1.0 - beta2t, 0.0)?)?;
            *col = (col.affine(beta2t, 0.0)? + squared.mean(n - 2)?.affine(1.0 - beta2t, 0.0)?)?;
            // _approx_sq_grad: rsqrt(row / row.mean(-1)) outer rsqrt(col).
            let row_factor = row
                .broadcast_div(&row.mean_keepdim(n - 2)?)?
                .sqrt()?
                .recip()?
                .unsqueeze(n - 1)?;
            let col_factor = col.sqrt()?.recip()?.unsqueeze(n - 2)?;
            (row_factor.broadcast_mul(&col_factor)? * grad)?
        }
        SecondMoment::Full(exp_avg_sq) => {
            *exp_avg_sq = (exp_avg_sq.affine(beta2t, 0.0)? + squared.affine(1.0 - beta2t, 0.0)?)?;
            (exp_avg_sq.sqrt()?.recip()? * grad)?
        }
    };
    // update.div_((_rms(update) / clip_threshold).clamp_(min=1.0))
    let rms = (update.sqr()?.sum_all()?.sqrt()? / (update.elem_count() as f64).sqrt())?;
    let divisor = (rms / ADAFACTOR_CLIP_THRESHOLD)?.maximum(1.0)?;
    Ok(update.broadcast_div(&divisor)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for kind in [OptimizerKind::Adafactor, OptimizerKind::AdamW] {
            assert_eq!(kind.as_str().parse::<OptimizerKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
        }
        assert_eq!("AdamW".parse::<OptimizerKind>(), Ok(OptimizerKind::AdamW));
        let error = "sgd".parse::<OptimizerKind>().unwrap_err();
        assert!(error.contains("adafactor or adamw"), "{error}");
    }

    #[test]
    fn default_settings_are_the_papers() {
        let settings = OptimizerSettings::default();
        assert_eq!(settings.kind, OptimizerKind::Adafactor);
        assert_eq!(settings.learning_rate, 1e-4);
        assert_eq!(settings.weight_decay, 0.0);
    }

    /// A gradient scaled by 8 with `grad_scale` 1/8 (an f16 loss scale divided out) updates
    /// exactly as the gradient itself; half-precision gradients are widened first.
    #[test]
    fn a_scaled_gradient_updates_as_the_unscaled_one() -> Result<()> {
        let device = candle_core::Device::Cpu;
        let grad = Tensor::new(&[3e-4f32, -1e-6, 2.5e-2], &device)?;
        let scaled = (&grad * 8.0)?.to_dtype(DType::F16)?;
        let settings = OptimizerSettings {
            kind: OptimizerKind::AdamW,
            learning_rate: 1e-2,
            ..OptimizerSettings::default()
        };
        let updated = |scaled_step: bool| -> Result<Vec<f32>> {
            let var = Var::from_tensor(&Tensor::ones(3, DType::F32, &device)?)?;
            let mut optimizer = Optimizer::new(&settings, vec![var.clone()])?;
            if scaled_step {
                optimizer.step_scaled(std::slice::from_ref(&scaled), 1.0 / 8.0)?;
            } else {
                let rounded = scaled.to_dtype(DType::F32)?.affine(1.0 / 8.0, 0.0)?;
                optimizer.step(&[rounded])?;
            }
            Ok(var.as_tensor().to_vec1::<f32>()?)
        };
        assert_eq!(updated(true)?, updated(false)?);
        Ok(())
    }

    /// Three steps in one go and one step, a restore into a new optimizer, two more steps
    /// end at the same values, for both optimizers and with a half-precision master.
    #[test]
    fn a_restored_state_continues_exactly() -> Result<()> {
        let device = candle_core::Device::Cpu;
        let grads: Vec<Vec<Tensor>> = (0..3)
            .map(|step| {
                let matrix = Tensor::arange(0f32, 6.0, &device)?.reshape((2, 3))?;
                let vector = Tensor::new(&[0.5f32, -1.0, 2.0], &device)?;
                Ok(vec![
                    matrix.affine(0.1, step as f64)?,
                    vector.affine(1.0 + step as f64, 0.0)?,
                ])
            })
            .collect::<Result<_>>()?;
        let fresh_vars = || -> Result<Vec<Var>> {
            Ok(vec![
                Var::from_tensor(&Tensor::ones((2, 3), DType::F32, &device)?)?,
                Var::from_tensor(&Tensor::ones(3, DType::BF16, &device)?)?,
            ])
        };
        let values = |vars: &[Var]| -> Result<Vec<Vec<f32>>> {
            vars.iter()
                .map(|v| Ok(v.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
                .collect()
        };
        for kind in [OptimizerKind::Adafactor, OptimizerKind::AdamW] {
            let settings = OptimizerSettings {
                kind,
                learning_rate: 1e-2,
                weight_decay: 1e-2,
                ..OptimizerSettings::default()
            };
            let straight_vars = fresh_vars()?;
            let mut straight = Optimizer::new(&settings, straight_vars.clone())?;
            for g in &grads {
                straight.step(g)?;
            }

            let first_vars = fresh_vars()?;
            let mut first = Optimizer::new(&settings, first_vars.clone())?;
            first.step(&grads[0])?;
            let saved = first.state();
            let resumed_vars = fresh_vars()?;
            for (resumed, done) in resumed_vars.iter().zip(&first_vars) {
                resumed.set(done.as_tensor())?;
            }
            let mut resumed = Optimizer::new(&settings, resumed_vars.clone())?;
            resumed.restore(&saved)?;
            assert_eq!(resumed.steps_taken(), 1);
            for g in &grads[1..] {
                resumed.step(g)?;
            }
            assert_eq!(values(&resumed_vars)?, values(&straight_vars)?, "{kind}");

            // A state of another shape is refused, and changes nothing.
            let mut other = Optimizer::new(
                &settings,
                vec![Var::from_tensor(&Tensor::ones(
                    (3, 2),
                    DType::F32,
                    &device,
                )?)?],
            )?;
            assert!(other.restore(&saved).is_err());
            assert_eq!(other.steps_taken(), 0);
        }
        Ok(())
    }

    #[test]
    fn bad_settings_are_refused() {
        for (learning_rate, weight_decay) in [(-1e-4, 0.0), (f64::NAN, 0.0), (1e-4, -1.0)] {
            let settings = OptimizerSettings {
                learning_rate,
                weight_decay,
                ..Default::default()
            };
            assert!(matches!(
                Optimizer::new(&settings, Vec::new()),
                Err(EngineError::InvalidRequest(_))
            ));
        }
    }
}
