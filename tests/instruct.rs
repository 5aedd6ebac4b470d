//! Instruction edits (InstructPix2Pix) against diffusers' `StableDiffusionInstructPix2PixPipeline`
//! on a tiny 8-input-channel pipeline (tests/fixtures/make_instruct_fixtures.py), with the
//! pipeline's own starting latents.
//!
//! Tolerance: 1e-3 absolute on the latents after every step and on the decoded image (errors of
//! ~1e-5 per UNet call accumulate over guided steps at weight 7.5), 1e-4 on the photo's latents.

mod common;

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use common::{Reference, assert_close, instruct_model_dir, load_model, max_abs_diff};
use unitune::engine::StableDiffusion;
use unitune::engine::edit::{CachePolicy, tune_photo};
use unitune::engine::finetune::TuneSettings;
use unitune::engine::instruct::{InstructGuidance, InstructRequest, sample_instruct};
use unitune::engine::noise::NoiseSource;
use unitune::engine::sampling::{
    SampleRequest, Start, StepObserver, StepView, denoise, no_observer, sample,
};
use unitune::model_files::locate_in_folder;

const TOLERANCE: f32 = 1e-3;

fn instruct_model(dir: &tempfile::TempDir) -> StableDiffusion {
    let root = instruct_model_dir(dir.path());
    StableDiffusion::load(&locate_in_folder(&root).unwrap(), &Device::Cpu, DType::F32).unwrap()
}

#[derive(Default)]
struct Recorder {
    latents: Vec<Tensor>,
}

impl StepObserver for Recorder {
    fn observe(&mut self, view: &StepView) -> ControlFlow<()> {
        self.latents.push(view.latents.clone());
        ControlFlow::Continue(())
    }
}

/// The reference image as the 8-bit photo it was made from (x/255*2-1 inverts exactly).
fn reference_photo(reference: &Reference) -> image::RgbImage {
    let t = reference.f32("image").squeeze(0).unwrap();
    let (_, h, w) = t.dims3().unwrap();
    let values = ((t + 1.0).unwrap() * 127.5)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let bytes = values.iter().map(|v| v.round() as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes).unwrap()
}

#[test]
fn the_instruction_loop_matches_diffusers_step_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let model = instruct_model(&dir);
    let reference = Reference::load("ip2p-tiny");
    let params = &reference.json["params"];
    let instruction = params["instruction"].as_str().unwrap();
    let steps = params["num_inference_steps"].as_u64().unwrap() as usize;
    let timesteps = model.scheduler.timesteps(steps).unwrap();
    assert_eq!(timesteps, reference.usize_list("timesteps"));

    let photo = model.image_to_tensor(&reference_photo(&reference)).unwrap();
    let image_latents = model.vae.encode(&photo).unwrap().mean;
    assert_close(
        "photo latents",
        &image_latents,
        &reference.f32("image_latents"),
        1e-4,
    );

    for (prefix, text_weight) in [
        ("guided", params["guidance_scale"].as_f64().unwrap()),
        ("unguided", 1.0),
    ] {
        let guidance = InstructGuidance::new(
            &model,
            instruction,
            &image_latents,
            text_weight,
            params["image_guidance_scale"].as_f64().unwrap(),
        )
        .unwrap();
        let mut observer = Recorder::default();
        let last = denoise(
            &model,
            reference.f32("noise"),
            &timesteps,
            steps,
            &guidance,
            None,
            &mut observer,
        )
        .unwrap();
        for (i, latents) in observer.latents.iter().enumerate() {
            assert_close(
                &format!("{prefix} step {i} latents"),
                latents,
                &reference.f32(&format!("{prefix}_latents_{i}")),
                TOLERANCE,
            );
        }
        let decoded = model
            .vae
            .decode(&(last / model.config.vae.scaling_factor).unwrap())
            .unwrap();
        assert_close(
            &format!("{prefix} decoded"),
            &decoded,
            &reference.f32(&format!("{prefix}_decoded")),
            TOLERANCE,
        );
    }
}

fn request<'a>(photo: &'a image::RgbImage, image_guidance: f64) -> InstructRequest<'a> {
    InstructRequest {
        image: photo,
        instruction: "make it winter",
        text_guidance: 7.5,
        image_guidance,
        sampling_steps: 4,
        seed: 5,
        mask: None,
    }
}

#[test]
fn an_instruction_edit_starts_from_the_seeds_noise_and_uses_both_guidances() {
    let dir = tempfile::tempdir().unwrap();
    let model = instruct_model(&dir);
    let reference = Reference::load("ip2p-tiny");
    let photo = reference_photo(&reference);
    let out = sample_instruct(&model, &request(&photo, 1.5), &mut no_observer()).unwrap();

    // The same loop by hand: the seed's first draw is the starting noise.
    let (c, h, w) = model.latent_dims(32, 32).unwrap();
    let noise = NoiseSource::from_seed(5)
        .normal((1, c, h, w), &Device::Cpu)
        .unwrap();
    let image_latents = model
        .vae
        .encode(&model.image_to_tensor(&photo).unwrap())
        .unwrap()
        .mean;
    let guidance =
        InstructGuidance::new(&model, "make it winter", &image_latents, 7.5, 1.5).unwrap();
    let steps = model.scheduler.timesteps(4).unwrap();
    let by_hand = denoise(
        &model,
        noise,
        &steps,
        4,
        &guidance,
        None,
        &mut no_observer(),
    )
    .unwrap();
    assert_eq!(max_abs_diff(&out.latents, &by_hand), 0.0);

    let again = sample_instruct(&model, &request(&photo, 1.5), &mut no_observer()).unwrap();
    assert_eq!(out.image, again.image, "the same seed gives the same image");
    let stronger = sample_instruct(&model, &request(&photo, 2.5), &mut no_observer()).unwrap();
    assert!(
        max_abs_diff(&out.latents, &stronger.latents) > 1e-3,
        "image guidance changes the result"
    );
}

#[test]
fn a_masked_instruction_edit_holds_the_photo_outside_the_mask() {
    let dir = tempfile::tempdir().unwrap();
    let model = instruct_model(&dir);
    let reference = Reference::load("ip2p-tiny");
    let photo = reference_photo(&reference);
    // Right half may change.
    let mask =
        image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x >= 16 { 255 } else { 0 }]));
    let masked = InstructRequest {
        mask: Some(&mask),
        ..request(&photo, 1.5)
    };
    let out = sample_instruct(&model, &masked, &mut no_observer()).unwrap();
    let free = sample_instruct(&model, &request(&photo, 1.5), &mut no_observer()).unwrap();
    let photo_latents = (model
        .vae
        .encode(&model.image_to_tensor(&photo).unwrap())
        .unwrap()
        .mean
        * model.config.vae.scaling_factor)
        .unwrap();
    // Left latent columns (away from the blended edge) are the photo's, the right ones differ from it.
    let left = |t: &Tensor| t.narrow(3, 0, 6).unwrap();
    let right = |t: &Tensor| t.narrow(3, 10, 6).unwrap();
    assert!(max_abs_diff(&left(&out.latents), &left(&photo_latents)) < 1e-4);
    assert!(max_abs_diff(&right(&out.latents), &right(&photo_latents)) > 1e-2);
    assert!(max_abs_diff(&left(&free.latents), &left(&photo_latents)) > 1e-2);
}

#[test]
fn instructions_are_refused_clearly_where_they_cannot_run() {
    let photo = image::RgbImage::new(32, 32);
    let plain = load_model("sd15-tiny");
    let err = sample_instruct(&plain, &request(&photo, 1.5), &mut no_observer())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("InstructPix2Pix model") && err.contains("has 4"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let model = instruct_model(&dir);
    let empty = InstructRequest {
        instruction: "  ",
        ..request(&photo, 1.5)
    };
    let err = sample_instruct(&model, &empty, &mut no_observer())
        .unwrap_err()
        .to_string();
    assert!(err.contains("instruction is empty"), "{err}");
    // Describing the result (SDEdit, text-to-image) and fine-tuning need a text-to-image UNet.
    let describe = SampleRequest {
        prompt: "a snowy cat",
        baseline_prompt: "",
        guidance_weight: 7.5,
        sampling_steps: 2,
        seed: 1,
        start: Start::Noise {
            width: 32,
            height: 32,
        },
    };
    let err = sample(&model, &describe, &mut no_observer())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("InstructPix2Pix model: it edits by instruction"),
        "{err}"
    );
    let mut model = model;
    let settings = TuneSettings {
        snapshot_steps: vec![1],
        ..TuneSettings::default()
    };
    let policy = CachePolicy {
        cache: None,
        model_identity: "ip2p-tiny",
    };
    let err = tune_photo(&mut model, &photo, &settings, &policy, None, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err()
    .error
    .to_string();
    assert!(
        err.contains("InstructPix2Pix model: it edits by instruction"),
        "{err}"
    );

    let negative = request(&photo, -1.0);
    let err = sample_instruct(&model, &negative, &mut no_observer())
        .unwrap_err()
        .to_string();
    assert!(err.contains("image guidance"), "{err}");
}
