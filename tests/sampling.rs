//! Whole sampling loops against diffusers' img2img and txt2img pipelines (unrolled with
//! explicit noise), SDXL's through `StableDiffusionXLImg2ImgPipeline` and
//! `StableDiffusionXLPipeline` (both text encoders, the pooled embedding, the size numbers
//! and the zeroed empty prompt, all through the model's own prompt encoding), plus
//! reproducibility and cancellation.
//!
//! Tolerance: 1e-3 absolute on latents and decoded images after every step (errors of ~1e-5
//! per UNet call accumulate over 10 guided steps at weight 7.5).

mod common;

use std::ops::ControlFlow;

use candle_core::Tensor;
use common::{MODELS, Reference, assert_close, load_model};
use unitune::engine::sampling::{
    Guidance, SampleRequest, Start, StepObserver, StepView, denoise, no_observer, sample,
};
use unitune::engine::{EngineError, StableDiffusion};

const TOLERANCE: f32 = 1e-3;

/// The loops' models: SD 1.x, SD 2.x and SDXL.
const LOOP_MODELS: [&str; 3] = [MODELS[0], MODELS[1], "sdxl-tiny"];

/// A loop's prompt, negative prompt ("" when the reference gives none), guidance and steps.
fn params(reference: &Reference, key: &str) -> (String, String, f64, usize) {
    let p = &reference.json[key];
    (
        p["prompt"].as_str().unwrap().to_string(),
        p["negative_prompt"].as_str().unwrap_or("").to_string(),
        p["guidance_scale"].as_f64().unwrap(),
        p["num_inference_steps"].as_u64().unwrap() as usize,
    )
}

/// Latents' `(h, w)`.
fn latent_size(latents: &Tensor) -> (usize, usize) {
    let (_, _, h, w) = latents.dims4().unwrap();
    (h, w)
}

/// Collects every step's latents and x0 prediction.
#[derive(Default)]
struct Recorder {
    latents: Vec<Tensor>,
    x0: Vec<Tensor>,
}

impl StepObserver for Recorder {
    fn observe(&mut self, view: &StepView) -> ControlFlow<()> {
        self.latents.push(view.latents.clone());
        self.x0.push(view.predicted_x0.clone());
        ControlFlow::Continue(())
    }
}

#[test]
fn img2img_loop_matches_diffusers_step_by_step() {
    for name in LOOP_MODELS {
        let model = load_model(name);
        let reference = Reference::load(name);
        let (.., steps) = params(&reference, "img2img_params");
        let strength = reference.json["img2img_params"]["strength"]
            .as_f64()
            .unwrap();

        let timesteps = model.scheduler.sdedit_timesteps(steps, strength).unwrap();
        assert_eq!(
            timesteps,
            reference.usize_list("img2img_timesteps"),
            "{name}"
        );

        let dist = model.vae.encode(&reference.f32("img2img_image")).unwrap();
        let init = (dist.sample(&reference.f32("img2img_encode_noise")).unwrap()
            * model.config.vae.scaling_factor)
            .unwrap();
        assert_close(
            &format!("{name} init latents"),
            &init,
            &reference.f32("img2img_init_latents"),
            1e-4,
        );
        let start = model
            .scheduler
            .add_noise(&init, &reference.f32("img2img_noise"), &timesteps[..1])
            .unwrap();
        assert_close(
            &format!("{name} start latents"),
            &start,
            &reference.f32("img2img_latents_start"),
            1e-4,
        );

        // From diffusers' own start latents, so that each step is compared alone.
        let start = reference.f32("img2img_latents_start");
        assert_loop_matches(&model, &reference, name, "img2img", start, &timesteps);
    }
}

#[test]
fn txt2img_loop_matches_diffusers_step_by_step() {
    for name in LOOP_MODELS {
        let model = load_model(name);
        let reference = Reference::load(name);
        let (.., steps) = params(&reference, "txt2img_params");
        let timesteps = model.scheduler.timesteps(steps).unwrap();
        assert_eq!(
            timesteps,
            reference.usize_list("txt2img_timesteps"),
            "{name}"
        );
        let init = reference.f32("txt2img_init_noise");
        assert_loop_matches(&model, &reference, name, "txt2img", init, &timesteps);
    }
}

/// SDXL Turbo's way of sampling, through a model folder whose scheduler config asks for
/// trailing timesteps: 2 steps at guidance 0, which (as in diffusers) means the prompt alone,
/// not the baseline. Against `StableDiffusionXLPipeline` with the same config.
#[test]
fn a_turbo_style_sdxl_folder_samples_in_two_unguided_steps_as_diffusers() {
    let home = tempfile::tempdir().unwrap();
    let folder = home.path().join("sdxl-turbo-tiny");
    common::copy_dir(&common::model_dir("sdxl-tiny"), &folder);
    let config_path = folder.join("scheduler/scheduler_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["timestep_spacing"] = "trailing".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let files = unitune::model_files::locate_in_folder(&folder).unwrap();
    let model = unitune::engine::StableDiffusion::load(
        &files,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let reference = Reference::load("sdxl-tiny");
    let (_, _, guidance_weight, steps) = params(&reference, "turbo_params");
    assert_eq!(guidance_weight, 0.0);
    let timesteps = model.scheduler.timesteps(steps).unwrap();
    assert_eq!(timesteps, reference.usize_list("turbo_timesteps"));
    let init = reference.f32("turbo_init_noise");
    assert_loop_matches(&model, &reference, "sdxl-tiny", "turbo", init, &timesteps);
}

/// Runs the loop `{prefix}_params` describes from `start` over `timesteps` (guided by its
/// prompt and negative prompt, or not at guidance 1 or less) and checks every step's latents
/// and x0 prediction and the decoded result against diffusers' `{prefix}_*` tensors.
fn assert_loop_matches(
    model: &StableDiffusion,
    reference: &Reference,
    name: &str,
    prefix: &str,
    start: Tensor,
    timesteps: &[usize],
) {
    let (prompt, negative, guidance_weight, steps) = params(reference, &format!("{prefix}_params"));
    let guidance = Guidance::new(
        model,
        &prompt,
        &negative,
        guidance_weight,
        latent_size(&start),
    )
    .unwrap();
    let mut observer = Recorder::default();
    let last = denoise(
        model,
        start,
        timesteps,
        steps,
        &guidance,
        None,
        &mut observer,
    )
    .unwrap();
    let Recorder { latents, x0 } = observer;
    assert_eq!(latents.len(), timesteps.len(), "{name} {prefix}");
    for i in 0..timesteps.len() {
        assert_close(
            &format!("{name} {prefix} step {i} latents"),
            &latents[i],
            &reference.f32(&format!("{prefix}_latents_{i}")),
            TOLERANCE,
        );
        assert_close(
            &format!("{name} {prefix} step {i} x0"),
            &x0[i],
            &reference.f32(&format!("{prefix}_x0_{i}")),
            TOLERANCE,
        );
    }
    let decoded = model
        .vae
        .decode(&(last / model.config.vae.scaling_factor).unwrap())
        .unwrap();
    assert_close(
        &format!("{name} {prefix} decoded"),
        &decoded,
        &reference.f32(&format!("{prefix}_decoded")),
        TOLERANCE,
    );
}

fn photo() -> image::RgbImage {
    image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    })
}

fn edit_request<'a>(photo: &'a image::RgbImage, seed: u64, t0_fraction: f64) -> SampleRequest<'a> {
    SampleRequest {
        prompt: "beikkpic a cat wearing sunglasses",
        baseline_prompt: "",
        guidance_weight: 7.5,
        sampling_steps: 8,
        seed,
        start: Start::Photo {
            image: photo,
            t0_fraction,
            mask: None,
        },
    }
}

#[test]
fn the_same_seed_gives_the_same_image_bit_for_bit() {
    let model = load_model("sd15-tiny");
    let photo = photo();
    let a = sample(&model, &edit_request(&photo, 11, 0.7), &mut no_observer()).unwrap();
    let b = sample(&model, &edit_request(&photo, 11, 0.7), &mut no_observer()).unwrap();
    let c = sample(&model, &edit_request(&photo, 12, 0.7), &mut no_observer()).unwrap();
    assert_eq!(a.image.as_raw(), b.image.as_raw(), "same seed, same pixels");
    let (la, lb) = (
        a.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    assert_eq!(la, lb, "same seed, same latents bit for bit");
    assert_ne!(
        a.image.as_raw(),
        c.image.as_raw(),
        "another seed, another image"
    );

    let generate = |seed| SampleRequest {
        start: Start::Noise {
            width: 64,
            height: 64,
        },
        ..edit_request(&photo, seed, 1.0)
    };
    let g1 = sample(&model, &generate(5), &mut no_observer()).unwrap();
    let g2 = sample(&model, &generate(5), &mut no_observer()).unwrap();
    assert_eq!(g1.image.as_raw(), g2.image.as_raw());
}

#[test]
fn t0_zero_returns_the_photo_through_the_vae() {
    let model = load_model("sd15-tiny");
    let photo = photo();
    let mut steps_seen = 0;
    let mut count = |_: &StepView| {
        steps_seen += 1;
        ControlFlow::Continue(())
    };
    let out = sample(&model, &edit_request(&photo, 3, 0.0), &mut count).unwrap();
    assert!(out.timesteps.is_empty());
    assert_eq!(steps_seen, 0, "no denoising step runs at t0 = 0");
    let mut noise = unitune::engine::noise::NoiseSource::from_seed(3);
    let expected = model
        .decode_latents(&model.encode_image(&photo, &mut noise).unwrap())
        .unwrap();
    assert_eq!(out.image.as_raw(), expected.as_raw());
}

#[test]
fn the_observer_stops_sampling_within_one_step() {
    let model = load_model("sd15-tiny");
    let photo = photo();
    let mut calls = 0;
    let mut stop_after_two = |view: &StepView| {
        calls += 1;
        assert_eq!(view.total_steps, 8);
        if view.step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let result = sample(&model, &edit_request(&photo, 1, 1.0), &mut stop_after_two);
    assert!(matches!(result, Err(EngineError::Cancelled)));
    assert_eq!(calls, 2, "no step runs after the observer says stop");
}

/// Records the order of steps and stage boundaries, and stops at the `stop_at`-th call.
struct StageLog {
    calls: Vec<String>,
    stop_at: Option<usize>,
}

impl StageLog {
    fn record(&mut self, what: String) -> ControlFlow<()> {
        self.calls.push(what);
        if Some(self.calls.len()) == self.stop_at {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

impl StepObserver for StageLog {
    fn observe(&mut self, view: &StepView) -> ControlFlow<()> {
        self.record(format!("step {}", view.step))
    }

    fn proceed(&mut self) -> ControlFlow<()> {
        self.record("stage".into())
    }
}

/// Encoding the prompts and the photo, decoding, the full-size paste-back and the
/// interpolation are each a stage a stop can end at; a stop at any boundary runs nothing after
/// it. (At 512 px each of these costs about what a step does.)
#[test]
fn an_edit_can_be_stopped_between_any_two_stages() {
    use unitune::engine::edit::{EditRequest, edit_photo};
    let model = load_model("sd15-tiny");
    let photo = photo();
    let mask =
        image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]));
    let request = EditRequest {
        method: unitune::engine::edit::EditMethod::UniTune,
        original: &photo,
        working: &photo,
        prompt: "a cat",
        baseline_prompt: None,
        tune_steps: 0,
        t0_fraction: 0.5,
        guidance_weight: 1.0,
        sampling_steps: 4,
        seed: 1,
        mask: Some(&mask),
        interpolate: true,
    };
    let mut full = StageLog {
        calls: Vec::new(),
        stop_at: None,
    };
    edit_photo(&model, None, &request, &mut full).unwrap();
    assert_eq!(
        full.calls,
        [
            "stage", // prompts encoded
            "stage", // photo encoded
            "step 1", "step 2", "stage", // before the decode
            "stage", // before bringing the result to the photo's size
            "stage", // before the paste-back outside the mask
            "stage", // before the interpolation
        ]
    );
    for stop_at in 1..=full.calls.len() {
        let mut log = StageLog {
            calls: Vec::new(),
            stop_at: Some(stop_at),
        };
        let result = edit_photo(&model, None, &request, &mut log);
        assert!(
            matches!(result, Err(EngineError::Cancelled)),
            "a stop at call {stop_at} was ignored"
        );
        assert_eq!(log.calls.len(), stop_at, "{:?} ran on", log.calls);
    }
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let model = load_model("sd15-tiny");
    let photo = photo();
    let empty = SampleRequest {
        prompt: "  ",
        ..edit_request(&photo, 1, 0.5)
    };
    let err = sample(&model, &empty, &mut no_observer()).unwrap_err();
    assert!(
        err.is_invalid_input() && err.to_string().contains("prompt is empty"),
        "{err}"
    );
    let zero_steps = SampleRequest {
        sampling_steps: 0,
        ..edit_request(&photo, 1, 0.5)
    };
    assert!(
        sample(&model, &zero_steps, &mut no_observer())
            .unwrap_err()
            .to_string()
            .contains("at least 1")
    );
    let odd = SampleRequest {
        start: Start::Noise {
            width: 50,
            height: 64,
        },
        ..edit_request(&photo, 1, 0.5)
    };
    assert!(
        sample(&model, &odd, &mut no_observer())
            .unwrap_err()
            .to_string()
            .contains("multiple")
    );
    // sd15-tiny's native size is 32x32: 4x its area is the most it will sample.
    let huge = SampleRequest {
        start: Start::Noise {
            width: 128,
            height: 128,
        },
        ..edit_request(&photo, 1, 0.5)
    };
    assert!(
        sample(&model, &huge, &mut no_observer())
            .unwrap_err()
            .to_string()
            .contains("too large")
    );
    let bad_t0 = edit_request(&photo, 1, 1.5);
    assert!(
        sample(&model, &bad_t0, &mut no_observer())
            .unwrap_err()
            .to_string()
            .contains("t0")
    );
}

#[test]
fn outside_the_mask_the_latents_end_exactly_at_the_photo() {
    let model = load_model("sd15-tiny");
    let photo = photo();
    // Left half may change, right half must not.
    let mask =
        image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]));
    let masked = SampleRequest {
        start: Start::Photo {
            image: &photo,
            t0_fraction: 0.8,
            mask: Some(&mask),
        },
        ..edit_request(&photo, 4, 0.8)
    };
    let out = sample(&model, &masked, &mut no_observer()).unwrap();
    // The photo's latents are drawn first from the same seed, so they can be rebuilt here.
    let mut noise = unitune::engine::noise::NoiseSource::from_seed(4);
    let photo_latents = model.encode_image(&photo, &mut noise).unwrap();
    // Latent columns 0..16 are the left half (the tiny VAE halves the size); a 1-column
    // border is blended by the area-averaged latent mask.
    let kept = out.latents.narrow(3, 17, 15).unwrap();
    assert_eq!(
        common::max_abs_diff(&kept, &photo_latents.narrow(3, 17, 15).unwrap()),
        0.0
    );
    let edited = out.latents.narrow(3, 0, 15).unwrap();
    assert!(common::max_abs_diff(&edited, &photo_latents.narrow(3, 0, 15).unwrap()) > 0.1);

    // A mask of the wrong size is refused.
    let small = image::GrayImage::new(32, 32);
    let wrong = SampleRequest {
        start: Start::Photo {
            image: &photo,
            t0_fraction: 0.8,
            mask: Some(&small),
        },
        ..edit_request(&photo, 4, 0.8)
    };
    assert!(
        sample(&model, &wrong, &mut no_observer())
            .unwrap_err()
            .to_string()
            .contains("mask")
    );
}

#[test]
fn a_baseline_prompt_steers_guidance_and_weight_one_ignores_it() {
    let model = load_model("sd15-tiny");
    let photo = photo();
    let plain = sample(&model, &edit_request(&photo, 9, 0.9), &mut no_observer()).unwrap();
    let prompt_guided = SampleRequest {
        baseline_prompt: "a photo of a cat",
        ..edit_request(&photo, 9, 0.9)
    };
    let guided = sample(&model, &prompt_guided, &mut no_observer()).unwrap();
    assert!(
        common::max_abs_diff(&plain.latents, &guided.latents) > 1e-3,
        "the baseline prompt must change the result"
    );

    let unguided = |baseline| SampleRequest {
        baseline_prompt: baseline,
        guidance_weight: 1.0,
        ..edit_request(&photo, 9, 0.9)
    };
    let a = sample(&model, &unguided(""), &mut no_observer()).unwrap();
    let b = sample(&model, &unguided("a photo of a cat"), &mut no_observer()).unwrap();
    assert_eq!(common::max_abs_diff(&a.latents, &b.latents), 0.0);
}
