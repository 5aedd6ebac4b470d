//! The fine-tuning optimisers against their references, recorded by
//! tests/fixtures/make_optimizer_fixtures.py: transformers' Adafactor (UniTune's settings,
//! lr 1e-4; and lr 0.1 with weight decay 0.01 so the update itself is checked to many
//! digits) and torch's AdamW (lr 1e-3, weight decay 1e-2), four steps of three float32
//! parameters of shapes [5], [4, 6] and [3, 2, 3, 3], with gradients that switch Adafactor's
//! update clipping on and off.
//!
//! Tolerance: after every step, each parameter within 1e-6 relative, i.e. the largest
//! elementwise difference is at most 1e-6 times the largest magnitude in the reference
//! tensor (float32 arithmetic in a slightly different order; the references are float32).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{fixtures, max_abs, max_abs_diff};
use unitune::engine::EngineError;
use unitune::engine::optim::{Optimizer, OptimizerKind, OptimizerSettings};

const PARAMS: [&str; 3] = ["p1", "p2", "p3"];
const STEPS: usize = 4;
const RELATIVE_TOLERANCE: f32 = 1e-6;

fn reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("reference/optimizers.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).expect("optimizer references load")
}

fn get(reference: &HashMap<String, Tensor>, key: &str) -> Tensor {
    reference
        .get(key)
        .unwrap_or_else(|| panic!("reference has no tensor {key}"))
        .clone()
}

fn settings(kind: OptimizerKind, learning_rate: f64, weight_decay: f64) -> OptimizerSettings {
    OptimizerSettings {
        kind,
        learning_rate,
        weight_decay,
        ..OptimizerSettings::default()
    }
}

/// Runs `config`'s four steps from its initial parameters and compares after each one.
fn check_against_reference(config: &str, settings: OptimizerSettings) {
    let reference = reference();
    let vars: Vec<Var> = PARAMS
        .iter()
        .map(|p| Var::from_tensor(&get(&reference, &format!("{config}.{p}.init"))).unwrap())
        .collect();
    let mut optimizer = Optimizer::new(&settings, vars).unwrap();
    for step in 0..STEPS {
        let grads: Vec<Tensor> = PARAMS
            .iter()
            .map(|p| get(&reference, &format!("{config}.{p}.grad.{step}")))
            .collect();
        optimizer.step(&grads).unwrap();
        assert_eq!(optimizer.steps_taken(), step + 1);
        for (p, var) in PARAMS.iter().zip(optimizer.vars()) {
            let before = if step == 0 {
                get(&reference, &format!("{config}.{p}.init"))
            } else {
                get(&reference, &format!("{config}.{p}.after.{}", step - 1))
            };
            let expected = get(&reference, &format!("{config}.{p}.after.{step}"));
            let diff = max_abs_diff(var.as_tensor(), &expected);
            let relative = diff / max_abs(&expected);
            if std::env::var_os("UNITUNE_PRINT_DIFFS").is_some() {
                let moved = max_abs_diff(&expected, &before);
                eprintln!(
                    "{config} {p} step {step}: relative diff {relative:e} (abs {diff:e}, largest change {moved:e})"
                );
            }
            assert!(
                relative <= RELATIVE_TOLERANCE,
                "{config} {p} after step {step}: relative difference {relative:e} exceeds {RELATIVE_TOLERANCE:e}"
            );
        }
    }
}

#[test]
fn adafactor_matches_transformers() {
    check_against_reference("adafactor", settings(OptimizerKind::Adafactor, 1e-4, 0.0));
}

#[test]
fn adafactor_with_large_steps_and_weight_decay_matches_transformers() {
    check_against_reference(
        "adafactor_big",
        settings(OptimizerKind::Adafactor, 0.1, 0.01),
    );
}

#[test]
fn adamw_matches_torch() {
    check_against_reference("adamw", settings(OptimizerKind::AdamW, 1e-3, 1e-2));
}

fn zeros_var(shape: &[usize]) -> Var {
    Var::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn adafactor_state_is_rows_plus_columns() {
    let adafactor = OptimizerSettings::default();
    let optimizer = Optimizer::new(&adafactor, vec![zeros_var(&[4, 6])]).unwrap();
    assert_eq!(optimizer.state_bytes(), (4 + 6) * 4);

    // Vectors keep a full second moment; a conv weight [3, 2, 3, 3] is factored over its
    // kernel dims: [3, 2, 3] rows + [3, 2, 3] columns.
    let vars = [&[5][..], &[4, 6], &[3, 2, 3, 3]].map(zeros_var).to_vec();
    let optimizer = Optimizer::new(&adafactor, vars.clone()).unwrap();
    assert_eq!(optimizer.state_bytes(), (5 + (4 + 6) + (18 + 18)) * 4);

    let adamw = settings(OptimizerKind::AdamW, 1e-3, 0.0);
    let optimizer = Optimizer::new(&adamw, vars).unwrap();
    assert_eq!(optimizer.state_bytes(), 2 * (5 + 24 + 54) * 4);
}

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let count: usize = shape.iter().product();
    // A small deterministic generator; the values only need to be varied.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

#[test]
fn zero_learning_rate_leaves_parameters_unchanged() {
    for kind in [OptimizerKind::Adafactor, OptimizerKind::AdamW] {
        let init = [seeded(&[5], 1), seeded(&[4, 6], 2)];
        let vars: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let mut optimizer = Optimizer::new(&settings(kind, 0.0, 0.01), vars).unwrap();
        for step in 0..3 {
            let grads = [seeded(&[5], 10 + step), seeded(&[4, 6], 20 + step)];
            optimizer.step(&grads).unwrap();
        }
        for (var, init) in optimizer.vars().iter().zip(&init) {
            assert_eq!(max_abs_diff(var.as_tensor(), init), 0.0, "{kind}");
        }
    }
}

#[test]
fn wrong_gradients_are_refused_and_change_nothing() {
    let init = seeded(&[4, 6], 3);
    let var = Var::from_tensor(&init).unwrap();
    let mut optimizer = Optimizer::new(&OptimizerSettings::default(), vec![var]).unwrap();

    let two = [seeded(&[4, 6], 4), seeded(&[4, 6], 5)];
    let error = optimizer.step(&two).unwrap_err();
    assert!(matches!(error, EngineError::InvalidRequest(_)), "{error}");
    assert!(
        error.to_string().contains("2 gradients for 1 parameters"),
        "{error}"
    );
    assert!(optimizer.step(&[]).is_err());

    let misshapen = optimizer.step(&[seeded(&[6, 4], 6)]).unwrap_err();
    assert!(
        matches!(misshapen, EngineError::InvalidRequest(_)),
        "{misshapen}"
    );

    assert_eq!(optimizer.steps_taken(), 0);
    assert_eq!(max_abs_diff(optimizer.vars()[0].as_tensor(), &init), 0.0);
}

#[test]
fn updates_are_in_place() {
    let var = Var::from_tensor(&seeded(&[4, 6], 7)).unwrap();
    let before = var.as_tensor().copy().unwrap();
    // What a model built from the var holds: a tensor sharing its storage.
    let shared = var.as_tensor().clone();
    let mut optimizer = Optimizer::new(&OptimizerSettings::default(), vec![var]).unwrap();
    optimizer.step(&[seeded(&[4, 6], 8)]).unwrap();
    assert!(max_abs_diff(&shared, &before) > 0.0);
    assert_eq!(max_abs_diff(&shared, optimizer.vars()[0].as_tensor()), 0.0);
}

#[test]
fn bf16_parameters_are_updated_in_f32_and_stay_bf16() {
    let init = seeded(&[4, 6], 9);
    let grads: Vec<Tensor> = (0..3).map(|s| seeded(&[4, 6], 30 + s)).collect();
    let run = |dtype: DType| {
        let var = Var::from_tensor(&init.to_dtype(dtype).unwrap()).unwrap();
        let settings = settings(OptimizerKind::Adafactor, 0.05, 0.0);
        let mut optimizer = Optimizer::new(&settings, vec![var]).unwrap();
        for grad in &grads {
            optimizer.step(&[grad.to_dtype(dtype).unwrap()]).unwrap();
        }
        // Rows and columns, plus the f32 master copy of a half-precision parameter.
        let master = if dtype == DType::F32 { 0 } else { 4 * 6 };
        assert_eq!(optimizer.state_bytes(), (4 + 6 + master) * 4);
        optimizer.vars()[0].as_tensor().clone()
    };
    let full = run(DType::F32);
    let half = run(DType::BF16);
    assert_eq!(half.dtype(), DType::BF16);
    // bf16 keeps 8 significant bits: within a few parts in a thousand of the f32 run.
    assert!(
        max_abs_diff(&half, &full) < 2e-2,
        "{}",
        max_abs_diff(&half, &full)
    );
    assert!(max_abs_diff(&half, &init) > 0.05);
}

/// The paper's learning rate moves a weight of 1 by about 1e-4 per step, far below bf16's
/// resolution there (2^-7): without an f32 master copy every update rounds away.
#[test]
fn small_updates_accumulate_in_the_master_copy_of_bf16_weights() {
    let ones = Tensor::ones((4, 6), DType::BF16, &Device::Cpu).unwrap();
    let var = Var::from_tensor(&ones).unwrap();
    let settings = settings(OptimizerKind::Adafactor, 1e-4, 0.0);
    let mut optimizer = Optimizer::new(&settings, vec![var]).unwrap();
    let grad = Tensor::ones((4, 6), DType::BF16, &Device::Cpu).unwrap();
    for _ in 0..200 {
        optimizer.step(std::slice::from_ref(&grad)).unwrap();
    }
    let moved = max_abs_diff(optimizer.vars()[0].as_tensor(), &ones);
    // 200 updates of 1e-4 make 0.02: a few bf16 steps.
    assert!(moved > 0.01, "bf16 weights moved by {moved}");
    assert_eq!(optimizer.vars()[0].dtype(), DType::BF16);
}

/// Without master copies the bf16 weights are the only copy, and the same 200 updates of 1e-4
/// (each a fortieth of bf16's spacing below 1.0) still move them by 0.02 on average, rounded
/// in stochastically; rounded to nearest they would never move.
#[test]
fn without_masters_small_updates_are_rounded_in_stochastically() {
    let ones = Tensor::ones((16, 64), DType::BF16, &Device::Cpu).unwrap();
    let var = Var::from_tensor(&ones).unwrap();
    let settings = OptimizerSettings {
        master_weights: false,
        ..settings(OptimizerKind::Adafactor, 1e-4, 0.0)
    };
    let mut optimizer = Optimizer::new(&settings, vec![var]).unwrap();
    assert_eq!(
        optimizer.state_bytes(),
        (16 + 64) * 4,
        "no master copy is kept"
    );
    let grad = Tensor::ones((16, 64), DType::BF16, &Device::Cpu).unwrap();
    for _ in 0..200 {
        optimizer.step(std::slice::from_ref(&grad)).unwrap();
    }
    let weights = optimizer.vars()[0].as_tensor();
    assert_eq!(weights.dtype(), DType::BF16);
    let mean = weights
        .to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // Each weight walks randomly around 0.98 by about 2 bf16 spacings (0.009); the mean of
    // 1024 by a thirtieth of that.
    assert!((mean - 0.98).abs() < 1e-3, "bf16 weights' mean {mean}");
}

/// 0.5 * sum((w - target)^2) for a matrix and a vector, via candle's own backward pass.
#[test]
fn adafactor_decreases_a_quadratic_loss() {
    let targets = [seeded(&[8, 16], 11), seeded(&[16], 12)];
    let vars = vec![
        Var::from_tensor(&seeded(&[8, 16], 13)).unwrap(),
        Var::from_tensor(&seeded(&[16], 14)).unwrap(),
    ];
    let loss_of = |vars: &[Var]| -> Tensor {
        let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (var, target) in vars.iter().zip(&targets) {
            let term = (var.as_tensor() - target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            total = (total + term).unwrap();
        }
        total.affine(0.5, 0.0).unwrap()
    };
    let settings = settings(OptimizerKind::Adafactor, 1e-2, 0.0);
    let mut optimizer = Optimizer::new(&settings, vars).unwrap();
    let mut losses = Vec::new();
    for _ in 0..50 {
        let loss = loss_of(optimizer.vars());
        losses.push(loss.to_scalar::<f32>().unwrap());
        let store = loss.backward().unwrap();
        let grads: Vec<Tensor> = optimizer
            .vars()
            .iter()
            .map(|v| store.get(v.as_tensor()).unwrap().clone())
            .collect();
        optimizer.step(&grads).unwrap();
    }
    let last = loss_of(optimizer.vars()).to_scalar::<f32>().unwrap();
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]),
        "the loss went up: {losses:?}"
    );
    assert!(
        last < 0.5 * losses[0],
        "loss {} -> {last} after 50 steps",
        losses[0]
    );
}
