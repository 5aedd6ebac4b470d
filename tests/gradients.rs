//! The UNet's gradients: against PyTorch's autograd on the same loss, and against central
//! finite differences in f64. This is what candle's stock UNet gets silently wrong.
//!
//! Tolerances: vs PyTorch (f32 both sides) |ours - theirs| <= 1e-5 + 2e-3 * max|theirs| per
//! parameter tensor; vs finite differences (f64, step 1e-4) relative error <= 1e-4.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use common::{Reference, max_abs, max_abs_diff, model_dir};
use unitune::engine::conditioning::Conditioning;
use unitune::engine::config::{SchedulerConfig, UnetConfig};
use unitune::engine::finetune::denoising_loss;
use unitune::engine::scheduler::DdimScheduler;
use unitune::engine::unet::UNet;

struct Trainable {
    unet: UNet,
    vars: Vec<(String, Var)>,
    scheduler: DdimScheduler,
}

/// The fixture's UNet with every weight a trainable variable, in `dtype`.
fn trainable_unet(name: &str, dtype: DType) -> Trainable {
    let dir = model_dir(name);
    let config = UnetConfig::load(&dir.join("unet/config.json")).unwrap();
    let weights = std::fs::read_dir(dir.join("unet"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let loaded = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let mut vars = Vec::new();
    let mut tensors = HashMap::new();
    for (key, tensor) in loaded {
        let var = Var::from_tensor(&tensor.to_dtype(dtype).unwrap()).unwrap();
        tensors.insert(key.clone(), var.as_tensor().clone());
        vars.push((key, var));
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let unet = UNet::new(
        &config,
        VarBuilder::from_tensors(tensors, dtype, &Device::Cpu),
    )
    .unwrap();
    // The in-painting fixture is a UNet alone; it was trained against SD 1.5's schedule.
    let scheduler_dir = if dir.join("scheduler").exists() {
        dir.clone()
    } else {
        model_dir("sd15-tiny")
    };
    let scheduler = DdimScheduler::new(
        &SchedulerConfig::load(&scheduler_dir.join("scheduler/scheduler_config.json")).unwrap(),
    );
    Trainable {
        unet,
        vars,
        scheduler,
    }
}

struct Batch {
    latents: Tensor,
    noise: Tensor,
    timesteps: Vec<usize>,
    context: Tensor,
    conditioning: Option<Tensor>,
}

fn batch(reference: &Reference, dtype: DType) -> Batch {
    let t = |k: &str| reference.f32(k).to_dtype(dtype).unwrap();
    Batch {
        latents: t("train_latents"),
        noise: t("train_noise"),
        timesteps: reference
            .tensor("train_timesteps")
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as usize)
            .collect(),
        context: t("train_encoder_hidden_states"),
        conditioning: reference
            .tensors
            .contains_key("train_inpaint_cond")
            .then(|| t("train_inpaint_cond")),
    }
}

fn loss(model: &Trainable, b: &Batch) -> Tensor {
    denoising_loss(
        &model.unet,
        &model.scheduler,
        &b.latents,
        &b.noise,
        &b.timesteps,
        &Conditioning::context_only(b.context.clone()),
        b.conditioning.as_ref(),
    )
    .unwrap()
}

#[test]
fn gradients_match_pytorch_for_every_unet_parameter() {
    for name in ["sd15-tiny", "sd2-tiny", "unet-in9-tiny"] {
        let model = trainable_unet(name, DType::F32);
        let reference = Reference::load(name);
        let b = batch(&reference, DType::F32);
        let loss = loss(&model, &b);
        let expected_loss = reference
            .f32("train_loss")
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let got_loss = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got_loss - expected_loss).abs() <= 1e-5 * expected_loss.abs().max(1.0),
            "{name}: loss {got_loss} vs {expected_loss}"
        );

        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for (key, var) in &model.vars {
            let expected = reference.f32(&format!("grad.{key}"));
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient reached {key}"));
            let scale = max_abs(&expected);
            let diff = max_abs_diff(got, &expected);
            assert!(
                diff <= 1e-5 + 2e-3 * scale,
                "{name}: gradient of {key} off by {diff:e} (magnitude {scale:e})"
            );
            checked += 1;
        }
        let recorded = reference.json["train_grad_params"].as_u64().unwrap() as usize;
        assert_eq!(
            checked, recorded,
            "{name}: every parameter with a recorded gradient was checked"
        );
    }
}

fn set_element(var: &Var, index: usize, value: f64) {
    let mut values = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    values[index] = value;
    let tensor = Tensor::from_vec(values, var.as_tensor().shape(), &Device::Cpu).unwrap();
    var.set(&tensor).unwrap();
}

/// Checks `var`'s gradient in `grads` against a central finite difference of `loss` (f64):
/// at one coordinate, the one with the largest gradient, so the check is about the gradient's
/// value, not about rounding noise around zero. Returns the relative error (at most 1e-4).
fn check_finite_difference(
    key: &str,
    var: &Var,
    grads: &candle_core::backprop::GradStore,
    loss: impl Fn() -> f64,
) -> f64 {
    let step = 1e-4;
    let grad: Vec<f64> = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("no gradient reached {key}"))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (index, analytic) = grad
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .unwrap();
    let original = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[index];
    set_element(var, index, original + step);
    let up = loss();
    set_element(var, index, original - step);
    let down = loss();
    set_element(var, index, original);
    let numeric = (up - down) / (2.0 * step);
    let relative = (numeric - analytic).abs() / analytic.abs().max(1e-6);
    assert!(
        relative <= 1e-4,
        "{key}[{index}]: analytic {analytic:e} vs finite difference {numeric:e}"
    );
    relative
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    let name = "sd15-tiny";
    let model = trainable_unet(name, DType::F64);
    // An 8x8 latent keeps the 600 extra forwards quick; two samples, two timesteps.
    let normal = |seed: u64| {
        unitune::engine::noise::NoiseSource::from_seed(seed)
            .normal((2, 4, 8, 8), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let reference = Reference::load(name);
    let b = Batch {
        latents: normal(1),
        noise: normal(2),
        timesteps: vec![750, 42],
        context: reference
            .f32("train_encoder_hidden_states")
            .to_dtype(DType::F64)
            .unwrap(),
        conditioning: None,
    };
    let grads = loss(&model, &b).backward().unwrap();

    let mut worst: (f64, String) = (0.0, String::new());
    for (key, var) in &model.vars {
        let relative =
            check_finite_difference(key, var, &grads, || loss(&model, &b).to_scalar().unwrap());
        if relative > worst.0 {
            worst = (relative, key.clone());
        }
    }
    eprintln!(
        "worst relative finite-difference error: {:e} ({})",
        worst.0, worst.1
    );
}

/// SDXL's added-conditioning path (`add_embedding`, fed by the pooled embedding and the size
/// numbers) and the per-level transformer depth (the second transformer block of the deepest
/// levels) differentiate like finite differences in f64, through the tiny SDXL UNet's
/// denoising loss with `forward_with`.
#[test]
fn sdxl_added_conditioning_gradients_match_finite_differences_in_f64() {
    use unitune::engine::unet::TextTime;
    let model = trainable_unet("sdxl-tiny", DType::F64);
    let normal = |seed: u64, shape: &[usize]| {
        unitune::engine::noise::NoiseSource::from_seed(seed)
            .normal(shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (latents, noise) = (normal(1, &[2, 4, 8, 8]), normal(2, &[2, 4, 8, 8]));
    let context = normal(3, &[2, 77, 48]);
    let text_time = TextTime {
        pooled: normal(4, &[2, 32]),
        size_numbers: Tensor::new(
            &[
                [1024f64, 768., 0., 0., 64., 64.],
                [64., 64., 8., 16., 64., 64.],
            ],
            &Device::Cpu,
        )
        .unwrap(),
    };
    let timesteps = [750usize, 42];
    let loss = || {
        let noisy = model
            .scheduler
            .add_noise(&latents, &noise, &timesteps)
            .unwrap();
        let t = Tensor::new(&[750f64, 42.], &Device::Cpu).unwrap();
        let out = model
            .unet
            .forward_with(&noisy, &t, &context, Some(&text_time))
            .unwrap();
        (out - &noise).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let grads = loss().backward().unwrap();
    let checked: Vec<&(String, Var)> = model
        .vars
        .iter()
        .filter(|(key, _)| {
            key.starts_with("add_embedding.")
                || key.starts_with("time_embedding.")
                || key.contains("transformer_blocks.1.attn2.to_k")
        })
        .collect();
    assert!(checked.len() >= 10, "{} parameters", checked.len());
    for (key, var) in checked {
        check_finite_difference(key, var, &grads, || loss().to_scalar().unwrap());
    }
}
