//! Half precision on the tiny fixtures: f16 sampling follows f32, f16 fine-tuning follows f32,
//! and what must stay wide does (the SD 1.x VAE, the optimizer's master weights).
//!
//! Tolerances, from f16's resolution (2^-11, about 5e-4 relative per rounding) compounded over
//! the UNet's layers and the denoising steps: final latents of a 10-step guided text-to-image
//! run within 1e-2 of the f32 run relative to the latents' largest magnitude (measured: 3e-3
//! on both models); each fine-tuning step's loss within 1e-3 relative of the f32 run
//! (measured: under 1e-4; summing the squared errors in f16 instead of f32 was off by 1e-2).

mod common;

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, max_abs_diff, model_files};
use unitune::engine::StableDiffusion;
use unitune::engine::finetune::{Adapter, TrainMode, TuneProgress, TuneSettings, fine_tune};
use unitune::engine::noise::NoiseSource;
use unitune::engine::optim::OptimizerSettings;
use unitune::engine::sampling::{SampleRequest, Start, no_observer, sample};

const SAMPLING_TOLERANCE: f64 = 1e-2;
const LOSS_TOLERANCE: f64 = 1e-3;

fn load(name: &str, dtype: DType) -> StableDiffusion {
    StableDiffusion::load(&model_files(name), &Device::Cpu, dtype).expect("fixture loads")
}

fn latents(model: &StableDiffusion) -> Tensor {
    let side = model.config.native_image_side().unwrap_or(64);
    let request = SampleRequest {
        prompt: "a photo of a cat",
        baseline_prompt: "",
        guidance_weight: 7.5,
        sampling_steps: 10,
        seed: 3,
        start: Start::Noise {
            width: side,
            height: side,
        },
    };
    sample(model, &request, &mut no_observer())
        .unwrap()
        .latents
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn f16_sampling_of_the_tiny_models_matches_f32() {
    for name in ["sd15-tiny", "sd2-tiny"] {
        let full = latents(&load(name, DType::F32));
        let half_model = load(name, DType::F16);
        assert_eq!(half_model.dtype(), DType::F16);
        let half = latents(&half_model);
        let relative = f64::from(max_abs_diff(&half, &full) / max_abs(&full));
        eprintln!("{name}: f16 vs f32 latents after 10 guided steps: {relative:e} relative");
        assert!(
            relative <= SAMPLING_TOLERANCE,
            "{name}: f16 latents differ from f32 by {relative:e} relative"
        );
    }
}

#[test]
fn the_vae_stays_f32_where_its_config_asks() {
    // sd15-tiny's VAE config says force_upcast, as SD 1.x's does (its decoder overflows in f16).
    let model = load("sd15-tiny", DType::F16);
    assert_eq!(model.vae_dtype(), DType::F32);
    assert_eq!(load("sd15-tiny", DType::F32).vae_dtype(), DType::F32);
}

fn tuning_photo() -> image::RgbImage {
    image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, (255 - (x + y) * 4) as u8])
    })
}

/// Cross-kv, 4 steps of batch 2 at lr 1e-3 (the tiny model learns at what SD needs 1e-4 for).
fn tuning_recipe(micro_batch_size: usize) -> TuneSettings {
    TuneSettings {
        mode: TrainMode::CrossKv,
        optimizer: OptimizerSettings {
            learning_rate: 1e-3,
            ..OptimizerSettings::default()
        },
        snapshot_steps: vec![2, 4],
        batch_size: 2,
        micro_batch_size,
        seed: 9,
        ..TuneSettings::default()
    }
}

fn tune(dtype: DType, settings: &TuneSettings) -> (Vec<f32>, StableDiffusion, Adapter) {
    let mut model = load("sd15-tiny", dtype);
    let adapter = Adapter::attach(
        &mut model,
        TrainMode::CrossKv,
        &mut NoiseSource::from_seed(1),
    )
    .unwrap();
    let photo = tuning_photo();
    let mut losses = Vec::new();
    let mut observer = |p: &TuneProgress| {
        losses.push(p.loss);
        ControlFlow::Continue(())
    };
    let snapshots = fine_tune(&model, &adapter, &photo, settings, &mut observer).unwrap();
    for snapshot in &snapshots {
        for t in snapshot.tensors().unwrap() {
            assert_eq!(t.dtype(), dtype, "snapshots keep the compute precision");
        }
    }
    (losses, model, adapter)
}

/// Every way a step's gradients reach the weights: summed in f32 over two passes, and
/// applied segment by segment from the one pass that is the whole batch (the loss scale
/// divided out in f32), into f32 master weights; and without masters, rounded into the f16
/// weights stochastically.
#[test]
fn f16_fine_tuning_follows_f32() {
    let without_masters = |settings: TuneSettings| TuneSettings {
        optimizer: OptimizerSettings {
            master_weights: false,
            ..settings.optimizer
        },
        ..settings
    };
    for (case, settings) in [
        ("micro-batch 1", tuning_recipe(1)),
        ("micro-batch 2", tuning_recipe(2)),
        ("no masters", without_masters(tuning_recipe(2))),
    ] {
        let (full, _, _) = tune(DType::F32, &settings);
        let (half, model, adapter) = tune(DType::F16, &settings);
        assert_eq!(half.len(), 4);
        eprintln!("{case}: losses f16 {half:?}, f32 {full:?}");
        for (step, (h, f)) in half.iter().zip(&full).enumerate() {
            let relative = f64::from((h - f).abs() / f.abs());
            assert!(
                relative <= LOSS_TOLERANCE,
                "{case}, step {}: f16 loss {h} vs f32 loss {f} ({relative:e} relative)",
                step + 1
            );
        }
        trained_weights_moved(&model, &adapter);
    }
}

fn trained_weights_moved(model: &StableDiffusion, adapter: &Adapter) {
    // The trained f16 weights moved away from the file's values.
    let trained = adapter.names()[0].clone();
    let base = model
        .read_unet_weights(std::slice::from_ref(&trained))
        .unwrap();
    let moved = max_abs_diff(&model.unet_weights()[&trained], &base[&trained]);
    assert!(moved > 0.0, "training left {trained} unchanged in f16");
}

/// In f16 a stopped fine-tune continues exactly too: the float32 master weights and the loss
/// scale are part of what is saved (without them the continued run drifts), and without
/// master weights the stochastic rounding repeats itself (it is keyed by step and weight).
#[test]
fn a_stopped_f16_fine_tune_continues_exactly() {
    use unitune::engine::edit::{CachePolicy, TuneEvent, tune_photo};
    use unitune::engine::finetune::SnapshotCache;
    let photo = tuning_photo();
    for master_weights in [true, false] {
        let settings = TuneSettings {
            auto_micro_batch: false,
            optimizer: OptimizerSettings {
                master_weights,
                ..tuning_recipe(2).optimizer
            },
            ..tuning_recipe(2)
        };
        let run = |cache: &SnapshotCache, stop_at: Option<usize>| {
            let mut model = load("sd15-tiny", DType::F16);
            let policy = CachePolicy {
                cache: Some(cache),
                model_identity: "sd15-tiny",
            };
            let result = tune_photo(
                &mut model,
                &photo,
                &settings,
                &policy,
                None,
                &mut |e| match e {
                    TuneEvent::Progress(p) if Some(p.step) == stop_at => ControlFlow::Break(()),
                    _ => ControlFlow::Continue(()),
                },
            );
            result.map(|tuned| {
                tuned.snapshots[1]
                    .tensors()
                    .unwrap()
                    .iter()
                    .map(|t| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap())
                    .map(|t| t.to_vec1::<f32>().unwrap())
                    .collect::<Vec<_>>()
            })
        };
        let straight_dir = tempfile::tempdir().unwrap();
        let straight = run(&SnapshotCache::new(straight_dir.path()), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path());
        assert!(run(&cache, Some(3)).is_err());
        let resumed = run(&cache, None).unwrap();
        assert!(
            resumed == straight,
            "the continued f16 run's last snapshot differs (master weights {master_weights})"
        );
    }
}
