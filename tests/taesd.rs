//! The tiny autoencoder (diffusers' `AutoencoderTiny`, TAESD) against diffusers, and as the
//! preview of a model's denoising: references from tests/fixtures/make_taesd_fixtures.py.

mod common;
#[path = "common/fake_hub.rs"]
mod fake_hub;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{Reference, assert_close, load_model, model_dir};
use image::RgbImage;
use unitune::engine::config::{TinyVaeConfig, VaeConfig};
use unitune::engine::preview::{LatentPreview, PreviewMode, Previews, TinyPreview};
use unitune::engine::sampling::{SampleRequest, Start, StepView, sample};
use unitune::engine::taesd::TinyAutoencoder;
use unitune::engine::vae::Vae;
use unitune::jobs::{
    EditKnobs, EditSpec, JobEvent, JobRequest, JobRunner, RunnerOptions, WorkingSize,
};

/// diffusers computes in float32 too; the tiny decoder is 8 convolutions deep.
const TOLERANCE: f32 = 1e-4;

fn fixture() -> (PathBuf, PathBuf) {
    let dir = model_dir("taesd-tiny");
    (
        dir.join("config.json"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
}

fn load_tiny() -> TinyAutoencoder {
    let (config, weights) = fixture();
    TinyAutoencoder::load(&config, &weights, &Device::Cpu, DType::F32).expect("fixture loads")
}

#[test]
fn decodes_and_encodes_like_diffusers() {
    let tiny = load_tiny();
    let reference = Reference::load("taesd-tiny");
    let decoded = tiny.decode(&reference.f32("dec_in_latent")).unwrap();
    assert_close("decode", &decoded, &reference.f32("dec_out"), TOLERANCE);
    let encoded = tiny.encode(&reference.f32("enc_in_image")).unwrap();
    assert_close("encode", &encoded, &reference.f32("enc_out"), TOLERANCE);
}

#[test]
fn a_preview_is_the_tiny_decode_of_the_steps_x0_prediction() {
    let model = load_model("sd15-tiny");
    let (config, weights) = fixture();
    let previews = Previews {
        fast: Some(LatentPreview::fit(&model, 0).unwrap()),
        tiny: Some(TinyPreview::load(&config, &weights, &model).unwrap()),
    };
    let tiny = load_tiny();
    let request = SampleRequest {
        prompt: "a photo of a cat",
        baseline_prompt: "",
        guidance_weight: 7.5,
        sampling_steps: 3,
        seed: 5,
        start: Start::Noise {
            width: 32,
            height: 32,
        },
    };
    let mut steps = 0;
    let mut observer = |view: &StepView| {
        let preview = previews
            .pick(PreviewMode::Taesd)
            .unwrap()
            .render(view.predicted_x0)
            .unwrap();
        // taesd's scaling factor is 1: the UNet's latents go in as they are.
        let decoded = tiny.decode(view.predicted_x0).unwrap();
        let expected = model.tensor_to_image(&decoded).unwrap();
        assert_eq!(preview.dimensions(), (32, 32), "full image size");
        assert_eq!(preview, expected, "step {}", view.step);
        let fast = previews.pick(PreviewMode::Fast).unwrap();
        assert_eq!(
            fast.render(view.predicted_x0).unwrap().dimensions(),
            (16, 16)
        );
        steps += 1;
        ControlFlow::Continue(())
    };
    sample(&model, &request, &mut observer).unwrap();
    assert_eq!(steps, 3);
    assert!(previews.pick(PreviewMode::Off).is_none());
    let without_tiny = Previews {
        tiny: None,
        ..previews.clone()
    };
    assert!(
        matches!(
            without_tiny.pick(PreviewMode::Taesd),
            Some(unitune::engine::preview::Previewer::Fast(_))
        ),
        "the fast preview stands in for a missing tiny VAE"
    );
}

#[test]
fn a_tiny_vae_for_other_latents_is_refused_in_one_sentence() {
    // sd2-tiny's VAE scales by 8; the fixture's tiny VAE by 2.
    let model = load_model("sd2-tiny");
    let (config, weights) = fixture();
    let error = TinyPreview::load(&config, &weights, &model)
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot preview this model"), "{error}");
    assert!(!error.contains('\n'));
}

#[test]
fn damaged_files_are_one_sentence_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (config, weights) = fixture();
    let truncated = dir.path().join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let error = TinyAutoencoder::load(&config, &truncated, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("tiny VAE weights") && error.contains("diffusion_pytorch_model"),
        "{error}"
    );
    assert!(!error.contains('\n'), "{error}");
    let bad_config = dir.path().join("config.json");
    std::fs::write(&bad_config, r#"{"act_fn": "tanh"}"#).unwrap();
    let error = TinyAutoencoder::load(&bad_config, &weights, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`act_fn`") && !error.contains('\n'),
        "{error}"
    );
}

#[test]
fn bad_input_shapes_are_errors_not_panics() {
    let tiny = load_tiny();
    let three_channels = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(tiny.decode(&three_channels).is_err());
    let odd = Tensor::zeros((1, 3, 7, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(tiny.encode(&odd).is_err());
}

#[test]
fn the_tiny_vae_is_downloaded_once_then_read_from_the_cache_and_a_missing_file_is_named() {
    use unitune::model_files::{HubOptions, NoProgress, TINY_VAE_REPO, resolve_tiny_vae};
    let repo = fake_hub::FakeRepo::from_folder(TINY_VAE_REPO, &model_dir("taesd-tiny"));
    let hub = fake_hub::FakeHub::start(vec![repo.clone()]);
    let cache = tempfile::tempdir().unwrap();
    let files = resolve_tiny_vae(&hub.options(cache.path()), &mut NoProgress).unwrap();
    let snapshot = cache
        .path()
        .join("models--madebyollin--taesd/snapshots")
        .join(&repo.sha);
    assert_eq!(files.config, snapshot.join("config.json"));
    assert_eq!(
        std::fs::read(&files.weights).unwrap(),
        repo.files["diffusion_pytorch_model.safetensors"]
    );
    let requests = hub.log().len();
    let offline = HubOptions {
        offline: true,
        ..hub.options(cache.path())
    };
    assert_eq!(resolve_tiny_vae(&offline, &mut NoProgress).unwrap(), files);
    assert_eq!(hub.log().len(), requests, "the cache was enough");

    let mut incomplete = repo.clone();
    incomplete.files.remove("config.json");
    let hub = fake_hub::FakeHub::start(vec![incomplete]);
    let empty = tempfile::tempdir().unwrap();
    let error = resolve_tiny_vae(&hub.options(empty.path()), &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("madebyollin/taesd") && error.contains("has no config.json"),
        "{error}"
    );
    let error = resolve_tiny_vae(
        &HubOptions {
            offline: true,
            ..hub.options(empty.path())
        },
        &mut NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("offline") && error.contains("config.json"),
        "{error}"
    );
    assert!(!error.contains("unet"), "not the pipeline's files: {error}");
}

/// The editor's worker sends the tiny VAE's previews (image size) while the mode is taesd,
/// the fast map's (latent size) when switched to fast, and none when switched off.
#[test]
fn the_worker_previews_with_the_mode_the_ui_chose() {
    let service = common::load_service("sd15-tiny");
    let (config, weights) = fixture();
    let tiny = TinyPreview::load(&config, &weights, service.engine()).unwrap();
    let options = RunnerOptions {
        preview_seed: 0,
        preview: PreviewMode::Taesd,
        tiny_preview: Some(tiny),
    };
    let mut runner = JobRunner::start(service, options, Box::new(|| {})).unwrap();
    assert!(runner.has_tiny_preview());
    let edit = || {
        let photo = Arc::new(RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, 90])
        }));
        JobRequest::Edit(EditSpec {
            knobs: EditKnobs {
                tune_steps: Some(0),
                t0_fraction: Some(1.0),
                guidance_weight: Some(1.0),
                ..EditKnobs::default()
            },
            sampling_steps: 3,
            seed: 1,
            size: WorkingSize::Requested(64, 64),
            ..EditSpec::new(photo, "a photo of a cat")
        })
    };
    let preview_sizes = |runner: &mut JobRunner| {
        let id = runner.submit(edit()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut sizes = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "the edit did not end");
            match runner.next_event_timeout(Duration::from_millis(200)) {
                Some(JobEvent::Preview { image, .. }) => sizes.push(image),
                Some(event) if event.is_final() && event.id() == id => {
                    assert!(matches!(event, JobEvent::Finished { .. }), "{event:?}");
                    return sizes;
                }
                _ => {}
            }
        }
    };
    let dimensions =
        |images: &[RgbImage]| images.iter().map(RgbImage::dimensions).collect::<Vec<_>>();
    let tiny = preview_sizes(&mut runner);
    assert!(
        !tiny.is_empty() && tiny.iter().all(|i| i.dimensions() == (64, 64)),
        "{:?}",
        dimensions(&tiny)
    );
    runner.set_preview(PreviewMode::Fast);
    // The fixture's VAE is small, so its fast preview is its own decode: the same size as
    // the tiny VAE's, other pixels (the same edit, the same steps).
    let fast = preview_sizes(&mut runner);
    assert!(
        !fast.is_empty() && fast.iter().all(|i| i.dimensions() == (64, 64)),
        "{:?}",
        dimensions(&fast)
    );
    assert_ne!(fast[0], tiny[0], "the fast preview is not the tiny VAE's");
    runner.set_preview(PreviewMode::Off);
    assert!(preview_sizes(&mut runner).is_empty());
}

/// Milliseconds per call of `f`, the best of `runs` after one warm-up.
fn best_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// Per-step preview cost at 512 px (64 x 64 latents) on this machine: taesd's real
/// architecture and SD 1.5's VAE with random weights (time does not depend on the values).
/// `cargo test --release --test taesd -- --ignored --nocapture`
#[test]
#[ignore = "a measurement; run in release"]
fn preview_cost_at_512_px() {
    let device = Device::Cpu;
    let random = |map: &VarMap| VarBuilder::from_varmap(map, DType::F32, &device);
    let taesd_map = VarMap::new();
    let taesd = TinyAutoencoder::new(
        TinyVaeConfig::from_json("{}", Path::new("taesd")).unwrap(),
        random(&taesd_map),
        DType::F32,
    )
    .unwrap();
    let vae_json = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/arch/sd15/vae.json"),
    )
    .unwrap();
    let vae_map = VarMap::new();
    let vae = Vae::new(
        &VaeConfig::from_json(&vae_json, Path::new("vae")).unwrap(),
        random(&vae_map),
    )
    .unwrap();
    let fast = LatentPreview::from_parts(vec![[0.3, 0.2, 0.1]; 4], [0.0; 3], 0.18215);
    let latents = Tensor::randn(0f32, 1f32, (1, 4, 64, 64), &device).unwrap();
    let tiny_ms = best_ms(5, || {
        taesd.decode(&latents).unwrap();
    });
    let fast_ms = best_ms(5, || {
        fast.render(&latents).unwrap();
    });
    let vae_ms = best_ms(2, || {
        vae.decode(&latents).unwrap();
    });
    println!(
        "64x64 latents on {} threads: taesd decode {tiny_ms:.1} ms, full VAE decode {vae_ms:.0} ms, fast linear preview {fast_ms:.2} ms",
        candle_core::utils::get_num_threads()
    );
}
