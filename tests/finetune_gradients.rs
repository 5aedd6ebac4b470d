//! Fine-tuning's gradients and bookkeeping on the tiny fixture model in f64: the weights each
//! training mode selects, every trained variable's gradient against finite differences,
//! frozen weights staying frozen, gradient accumulation, and attaching changing nothing.
//!
//! Tolerances: gradients vs central finite differences (f64, step 1e-4) at each variable's
//! largest-gradient coordinate, relative error <= 1e-4; snapshots after micro-batches of 1
//! vs 2, |a - b| <= 1e-6 * max|b| per tensor (reported losses within 1e-6 relative); frozen
//! weights and UNet outputs that must not change, bit for bit; checkpointed vs plain
//! gradients, relative 1e-12 (both f64, the recomputation is deterministic).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor, Var};
use common::model_files;
use unitune::engine::StableDiffusion;
use unitune::engine::autograd::{GradientAccumulator, accumulate_gradients};
use unitune::engine::conditioning::Conditioning;
use unitune::engine::finetune::denoising_loss;
use unitune::engine::finetune::{
    Adapter, RARE_TOKEN, Snapshot, TrainMode, TuneProgress, TuneSettings, fine_tune,
};
use unitune::engine::noise::NoiseSource;
use unitune::engine::optim::{OptimizerKind, OptimizerSettings};

const MODEL: &str = "sd15-tiny";
const LORA: TrainMode = TrainMode::Lora { rank: 2 };
/// sd15-tiny's transformer blocks: 2 in the down blocks, 1 in the middle, 3 in the up blocks.
const TRANSFORMER_BLOCKS: usize = 6;
const PROJECTIONS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
const FINITE_DIFFERENCE_STEP: f64 = 1e-4;
const GRADIENT_TOLERANCE: f64 = 1e-4;
const ACCUMULATION_TOLERANCE: f64 = 1e-6;

fn load() -> StableDiffusion {
    load_in(DType::F64)
}

fn load_in(dtype: DType) -> StableDiffusion {
    StableDiffusion::load(&model_files(MODEL), &Device::Cpu, dtype).expect("fixture loads")
}

/// The UNet's weights read straight from the file, converted to f64 (exactly) as the model
/// converts them.
fn weights_on_disk() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        &model_files(MODEL)
            .diffusers()
            .expect("a folder")
            .unet_weights,
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(name, t)| (name, t.to_dtype(DType::F64).unwrap()))
    .collect()
}

/// `Some((attention, projection, parameter))` for `...attn1.to_out.0.weight` and the like.
fn projection(name: &str) -> Option<(&'static str, &'static str, &'static str)> {
    for parameter in ["weight", "bias"] {
        let Some(rest) = name.strip_suffix(&format!(".{parameter}")) else {
            continue;
        };
        for attention in ["attn1", "attn2"] {
            for projection in PROJECTIONS {
                if rest.ends_with(&format!(".{attention}.{projection}")) {
                    return Some((attention, projection, parameter));
                }
            }
        }
    }
    None
}

/// The variable names `mode` implies, worked out from the file's names without `TrainMode`.
fn expected_names(mode: TrainMode, file: &HashMap<String, Tensor>) -> BTreeSet<String> {
    if mode == TrainMode::Full {
        return file.keys().cloned().collect();
    }
    let mut names = BTreeSet::new();
    for name in file.keys() {
        let Some((attention, projection, parameter)) = projection(name) else {
            continue;
        };
        match mode {
            TrainMode::Full | TrainMode::Attention => {
                names.insert(name.clone());
            }
            TrainMode::CrossKv => {
                if attention == "attn2"
                    && (projection == "to_k" || projection == "to_v")
                    && parameter == "weight"
                {
                    names.insert(name.clone());
                }
            }
            TrainMode::Lora { .. } => {
                if parameter == "weight" {
                    let prefix = name.trim_end_matches(".weight");
                    names.insert(format!("{prefix}.lora_A.weight"));
                    names.insert(format!("{prefix}.lora_B.weight"));
                }
            }
        }
    }
    names
}

/// Checks that `adapter` holds exactly the variables `mode` implies, with the right shapes.
fn assert_selection(mode: TrainMode, adapter: &Adapter, file: &HashMap<String, Tensor>) {
    let expected = expected_names(mode, file);
    let per_block = match mode {
        TrainMode::Full => None,
        // The q, k, v and out weights of attn1 and attn2, and both out biases.
        TrainMode::Attention => Some(10),
        // attn2's k and v weights.
        TrainMode::CrossKv => Some(2),
        // Two factors for each of the 8 projection weights.
        TrainMode::Lora { .. } => Some(16),
    };
    if let Some(per_block) = per_block {
        assert_eq!(
            expected.len(),
            per_block * TRANSFORMER_BLOCKS,
            "{mode}: variables for the fixture's {TRANSFORMER_BLOCKS} transformer blocks"
        );
    }
    let got: BTreeSet<String> = adapter.names().iter().cloned().collect();
    assert_eq!(got.len(), adapter.names().len(), "{mode}: duplicate names");
    assert_eq!(adapter.vars().len(), adapter.names().len());
    assert_eq!(got, expected, "{mode}: the trained variables");
    for (name, var) in adapter.names().iter().zip(adapter.vars()) {
        let dims = var.dims().to_vec();
        match (
            mode,
            name.strip_suffix(".lora_A.weight"),
            name.strip_suffix(".lora_B.weight"),
        ) {
            (TrainMode::Lora { rank }, Some(prefix), _) => {
                let (_, in_dim) = file[&format!("{prefix}.weight")].dims2().unwrap();
                assert_eq!(dims, [rank, in_dim], "{name}");
            }
            (TrainMode::Lora { rank }, _, Some(prefix)) => {
                let (out_dim, _) = file[&format!("{prefix}.weight")].dims2().unwrap();
                assert_eq!(dims, [out_dim, rank], "{name}");
            }
            _ => assert_eq!(dims, file[name].dims(), "{name}"),
        }
    }
}

struct Batch {
    latents: Tensor,
    noise: Tensor,
    timesteps: Vec<usize>,
    context: Tensor,
}

/// Two samples of 8x8 latents at two different timesteps, conditioned on the rare token.
fn batch(model: &StableDiffusion) -> Batch {
    let mut source = NoiseSource::from_seed(11);
    let mut normal = || {
        source
            .normal((2, 4, 8, 8), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    Batch {
        latents: normal(),
        noise: normal(),
        timesteps: vec![750, 42],
        context: rare_token_context(model),
    }
}

fn rare_token_context(model: &StableDiffusion) -> Tensor {
    let embedding = model.encode_prompt(RARE_TOKEN).unwrap().embedding;
    embedding.repeat((2, 1, 1)).unwrap()
}

fn loss(model: &StableDiffusion, adapter: &Adapter, b: &Batch) -> Tensor {
    denoising_loss(
        adapter.training_unet(),
        &model.scheduler,
        &b.latents,
        &b.noise,
        &b.timesteps,
        &Conditioning::context_only(b.context.clone()),
        None,
    )
    .unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u64> {
    values(t).into_iter().map(f64::to_bits).collect()
}

fn max_abs(t: &Tensor) -> f64 {
    values(t).into_iter().fold(0.0, |m, v| m.max(v.abs()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    values(a)
        .into_iter()
        .zip(values(b))
        .fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

fn set_element(var: &Var, index: usize, value: f64) {
    let mut v = values(var.as_tensor());
    v[index] = value;
    let tensor = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
    var.set(&tensor).unwrap();
}

/// Attaches `mode`, checks its selection, and checks every variable's gradient of the
/// denoising loss against a central finite difference.
fn check_gradients(mode: TrainMode) {
    let mut model = load();
    let adapter = Adapter::attach(&mut model, mode, &mut NoiseSource::from_seed(3)).unwrap();
    assert_selection(mode, &adapter, &weights_on_disk());
    if matches!(mode, TrainMode::Lora { .. }) {
        // B starts at zero, which would make every A's gradient zero: give it small values.
        let mut source = NoiseSource::from_seed(4);
        for (name, var) in adapter.names().iter().zip(adapter.vars()) {
            if name.ends_with(".lora_B.weight") {
                let b = (source.normal(var.shape(), &Device::Cpu).unwrap() * 0.1)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap();
                var.set(&b).unwrap();
            }
        }
    }
    let b = batch(&model);
    let grads = loss(&model, &adapter, &b).backward().unwrap();

    let mut worst = (0.0f64, String::new());
    for (name, var) in adapter.names().iter().zip(adapter.vars()) {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{mode}: no gradient reached {name}"));
        // The coordinate with the largest gradient, so the check is about the gradient's
        // value, not about rounding noise around zero.
        let (index, analytic) = values(grad)
            .into_iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        assert!(
            analytic != 0.0,
            "{mode}: the gradient of {name} is zero everywhere"
        );
        let original = values(var.as_tensor())[index];
        set_element(var, index, original + FINITE_DIFFERENCE_STEP);
        let up = loss(&model, &adapter, &b).to_scalar::<f64>().unwrap();
        set_element(var, index, original - FINITE_DIFFERENCE_STEP);
        let down = loss(&model, &adapter, &b).to_scalar::<f64>().unwrap();
        set_element(var, index, original);
        let numeric = (up - down) / (2.0 * FINITE_DIFFERENCE_STEP);
        let relative = (numeric - analytic).abs() / analytic.abs();
        if relative > worst.0 {
            worst = (relative, name.clone());
        }
        assert!(
            relative <= GRADIENT_TOLERANCE,
            "{mode}: {name}[{index}]: analytic {analytic:e} vs finite difference {numeric:e}"
        );
    }
    eprintln!(
        "{mode}: {} variables, worst relative finite-difference error {:e} ({})",
        adapter.vars().len(),
        worst.0,
        worst.1
    );
}

#[test]
fn attention_gradients_match_finite_differences() {
    check_gradients(TrainMode::Attention);
}

#[test]
fn cross_kv_gradients_match_finite_differences() {
    check_gradients(TrainMode::CrossKv);
}

#[test]
fn lora_gradients_match_finite_differences() {
    check_gradients(LORA);
}

/// A synthetic 16x16 photo (8x8 latents).
fn photo() -> image::RgbImage {
    image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 16) as u8, (y * 16) as u8, (255 - (x + y) * 8) as u8])
    })
}

fn tune_settings(mode: TrainMode, micro_batch_size: usize) -> TuneSettings {
    TuneSettings {
        mode,
        optimizer: OptimizerSettings {
            learning_rate: 1e-2,
            ..OptimizerSettings::default()
        },
        snapshot_steps: vec![2, 4],
        batch_size: 2,
        micro_batch_size,
        seed: 5,
        ..TuneSettings::default()
    }
}

fn quiet(_: &TuneProgress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// What the sampling UNet predicts for fixed inputs: two 8x8 latents at two timesteps.
fn unet_output(model: &StableDiffusion) -> Tensor {
    let latents = NoiseSource::from_seed(21)
        .normal((2, 4, 8, 8), &Device::Cpu)
        .unwrap()
        .to_dtype(model.dtype())
        .unwrap();
    let timesteps = Tensor::new(&[900f32, 300.0], &Device::Cpu).unwrap();
    model
        .unet
        .forward(&latents, &timesteps, &rare_token_context(model))
        .unwrap()
}

#[test]
fn training_changes_only_the_selected_weights() {
    let untouched = unet_output(&load());
    let file = weights_on_disk();
    for mode in [TrainMode::CrossKv, LORA] {
        let mut model = load();
        let adapter = Adapter::attach(&mut model, mode, &mut NoiseSource::from_seed(3)).unwrap();
        let settings = tune_settings(mode, 2);
        let snapshots = fine_tune(&model, &adapter, &photo(), &settings, &mut quiet).unwrap();
        let steps: Vec<usize> = snapshots.iter().map(|s| s.steps).collect();
        assert_eq!(steps, [2, 4], "{mode}: snapshot step counts");

        let selected = expected_names(mode, &file);
        let held = model.unet_weights();
        assert_eq!(held.len(), file.len(), "{mode}: UNet weight count");
        for (name, on_disk) in &file {
            // The trained weights are the variables themselves (one copy of the weights): only
            // the frozen ones must still hold the file's values.
            if selected.contains(name) {
                assert!(
                    held[name].is_variable(),
                    "{mode}: {name} is not the variable"
                );
            } else {
                assert!(
                    bits(&held[name]) == bits(on_disk),
                    "{mode}: frozen weight {name} changed during training"
                );
            }
        }

        let trained = unet_output(&model);
        let change = max_abs_diff(&trained, &untouched);
        eprintln!("{mode}: 4 steps changed the UNet's output by up to {change:e}");
        assert!(
            change > 1e-6,
            "{mode}: training did not change the sampling UNet's output ({change:e})"
        );
        adapter.load(adapter.base()).unwrap();
        for name in file.keys().filter(|n| selected.contains(*n)) {
            assert!(
                bits(&model.unet_weights()[name]) == bits(&file[name]),
                "{mode}: snapshot 0 did not restore {name} to the file's value"
            );
        }
        let restored = unet_output(&model);
        assert!(
            bits(&restored) == bits(&untouched),
            "{mode}: after loading snapshot 0 the UNet's output differs from the untouched model's by {:e}",
            max_abs_diff(&restored, &untouched)
        );
    }
}

/// Fine-tunes a fresh model; returns snapshot 0, the snapshots and each step's loss.
fn tune(
    mode: TrainMode,
    optimizer: OptimizerKind,
    micro_batch_size: usize,
) -> (Snapshot, Vec<Snapshot>, Vec<f32>) {
    let mut model = load();
    let adapter = Adapter::attach(&mut model, mode, &mut NoiseSource::from_seed(3)).unwrap();
    let mut losses = Vec::new();
    let mut observer = |p: &TuneProgress| {
        losses.push(p.loss);
        ControlFlow::Continue(())
    };
    let mut settings = tune_settings(mode, micro_batch_size);
    settings.optimizer.kind = optimizer;
    let snapshots = fine_tune(&model, &adapter, &photo(), &settings, &mut observer).unwrap();
    (adapter.base().clone(), snapshots, losses)
}

/// Adafactor's update is invariant to the gradient's scale, so it cannot tell whether the
/// accumulated gradient is the batch mean or a multiple of it; AdamW's epsilon can (a
/// gradient twice too large moves the small-gradient coordinates visibly). The optimizers
/// compute in f32, so in practice the two runs agree exactly.
#[test]
fn gradient_accumulation_matches_one_big_batch() {
    for (mode, optimizer) in [
        (TrainMode::Attention, OptimizerKind::Adafactor),
        (LORA, OptimizerKind::Adafactor),
        (TrainMode::Attention, OptimizerKind::AdamW),
    ] {
        let (base, whole, whole_losses) = tune(mode, optimizer, 2);
        let (_, accumulated, accumulated_losses) = tune(mode, optimizer, 1);
        assert_eq!(whole.len(), accumulated.len());
        let mut worst = 0.0f64;
        let mut moved = 0.0f64;
        for (a, b) in accumulated.iter().zip(&whole) {
            assert_eq!(a.steps, b.steps);
            let steps = b.steps;
            let (a, b) = (a.tensors().unwrap(), b.tensors().unwrap());
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                let scale = max_abs(y);
                let diff = max_abs_diff(x, y);
                worst = worst.max(diff / scale);
                assert!(
                    diff <= ACCUMULATION_TOLERANCE * scale,
                    "{mode}, {optimizer}: tensor {i} after {steps} steps differs by {diff:e} (magnitude {scale:e})"
                );
                moved = moved.max(max_abs_diff(y, &base.tensors().unwrap()[i]) / scale);
            }
        }
        // Otherwise the comparison would be of two untrained models.
        assert!(
            moved > 1e3 * ACCUMULATION_TOLERANCE,
            "{mode}, {optimizer}: training moved nothing ({moved:e})"
        );
        assert_eq!(whole_losses.len(), 4);
        for (a, b) in accumulated_losses.iter().zip(&whole_losses) {
            assert!(
                f64::from((a - b).abs()) <= ACCUMULATION_TOLERANCE * f64::from(b.abs()),
                "{mode}, {optimizer}: reported losses {accumulated_losses:?} vs {whole_losses:?}"
            );
        }
        eprintln!(
            "{mode}, {optimizer}: micro-batch 1 vs 2, worst relative snapshot difference {worst:e} (training moved values by up to {moved:e} relative)"
        );
    }
}

/// In f64 as everywhere here, and in f32, where sampling takes candle's fused kernels.
#[test]
fn attaching_changes_nothing_until_training() {
    let file = weights_on_disk();
    for dtype in [DType::F64, DType::F32] {
        for mode in [
            LORA,
            TrainMode::CrossKv,
            TrainMode::Attention,
            TrainMode::Full,
        ] {
            let mut model = load_in(dtype);
            let before = unet_output(&model);
            let adapter =
                Adapter::attach(&mut model, mode, &mut NoiseSource::from_seed(3)).unwrap();
            let after = unet_output(&model);
            assert!(
                bits(&after) == bits(&before),
                "{mode} ({dtype:?}): attaching changed the UNet's output by {:e}",
                max_abs_diff(&after, &before)
            );
            // Snapshot 0 holds the loaded weights (and for LoRA, zero B factors).
            for (name, value) in adapter
                .names()
                .iter()
                .zip(&adapter.base().tensors().unwrap())
            {
                if name.ends_with(".lora_B.weight") {
                    assert_eq!(max_abs(value), 0.0, "{mode}: {name} starts non-zero");
                } else if !name.ends_with(".lora_A.weight") {
                    assert!(
                        bits(value) == bits(&file[name]),
                        "{mode} ({dtype:?}): {name} in snapshot 0 is not the loaded weight"
                    );
                }
            }
        }
    }
}

/// Gradient checkpointing recomputes each resnet's and transformer's activations in backward:
/// the gradients must be those of the plain pass, for every training mode. Both are f64;
/// the recomputation is deterministic, so they agree to rounding (relative 1e-12).
#[test]
fn checkpointed_gradients_equal_plain_gradients_in_every_mode() {
    for mode in [
        TrainMode::Full,
        TrainMode::Attention,
        TrainMode::CrossKv,
        LORA,
    ] {
        let mut model = load();
        let adapter = Adapter::attach(&mut model, mode, &mut NoiseSource::from_seed(3)).unwrap();
        if matches!(mode, TrainMode::Lora { .. }) {
            let mut source = NoiseSource::from_seed(4);
            for (name, var) in adapter.names().iter().zip(adapter.vars()) {
                if name.ends_with(".lora_B.weight") {
                    let b = (source.normal(var.shape(), &Device::Cpu).unwrap() * 0.1)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap();
                    var.set(&b).unwrap();
                }
            }
        }
        let b = batch(&model);
        let loss_of = |unet: &unitune::engine::unet::UNet| {
            denoising_loss(
                unet,
                &model.scheduler,
                &b.latents,
                &b.noise,
                &b.timesteps,
                &Conditioning::context_only(b.context.clone()),
                None,
            )
            .unwrap()
        };
        let plain = loss_of(adapter.training_unet()).backward().unwrap();
        let mut accumulator = GradientAccumulator::new(adapter.vars(), DType::F64);
        let checkpointed_unet = adapter.training_unet().checkpointed(true);
        accumulate_gradients(&loss_of(&checkpointed_unet), &mut accumulator).unwrap();
        let sums = accumulator.take();
        let mut worst = 0.0f64;
        for ((name, var), sum) in adapter.names().iter().zip(adapter.vars()).zip(&sums) {
            let expected = plain
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{mode}: no plain gradient for {name}"));
            let got = sum
                .as_ref()
                .unwrap_or_else(|| panic!("{mode}: no checkpointed gradient for {name}"));
            let scale = max_abs(expected);
            assert!(scale > 0.0, "{mode}: {name}'s gradient is zero");
            let diff = max_abs_diff(got, expected);
            worst = worst.max(diff / scale);
            assert!(
                diff <= 1e-12 * scale,
                "{mode}: {name}: checkpointed gradient differs by {diff:e} (magnitude {scale:e})"
            );
        }
        eprintln!(
            "{mode}: {} variables, checkpointed vs plain worst relative difference {worst:e}",
            adapter.vars().len()
        );
    }
}
