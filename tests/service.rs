//! The edit service on the tiny fixture model: one way to make an edit, whoever asks. The
//! command line and the jobs API make the same edit to the byte; recipes name the model and
//! photo without the folders they are in, AUTOMATIC1111's own rules read them, and a recipe
//! read back repeats the edit; a text encoder saved without the `text_model.` prefix loads.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{copy_dir, fixtures, model_dir, png_recipe, unitune};
use unitune::engine::finetune::TrainMode;
use unitune::imaging::{DecodeLimits, load_photo, read_png_text};
use unitune::jobs::{JobEvent, JobRequest, JobRunner, PreviewMode, RunnerOptions};
use unitune::model_files::NoProgress;
use unitune::service::{
    EditKnobs, EditService, EditSpec, GenerateSpec, MicroBatch, ModelRequest, TrainingChoice,
    WorkingSize,
};

/// AUTOMATIC1111's `re_param_code` (modules/infotext_utils.py), copied as it is there: the
/// rule A1111, Forge and civitai read a PNG's `parameters` with.
const A1111_PARAM_CODE: &str = r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#;

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A small photo written into `dir`.
fn small_photo(dir: &Path, name: &str, tint: u8) -> PathBuf {
    let path = dir.join(name);
    image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, tint])
    })
    .save(&path)
    .unwrap();
    path
}

/// The fine-tune both front ends run: 2 cross-kv steps, one photo per pass.
fn training() -> TrainingChoice {
    TrainingChoice {
        mode: TrainMode::CrossKv,
        snapshot_steps: vec![1, 2],
        micro_batch: MicroBatch::Fixed(1),
        ..TrainingChoice::default()
    }
}

const EDIT_FLAGS: [&str; 22] = [
    "--prompt",
    "a red apple",
    "--seed",
    "3",
    "--sampling-steps",
    "3",
    "--size",
    "64x64",
    "--tune-steps",
    "2",
    "--snapshots",
    "1,2",
    "--train",
    "cross-kv",
    "--micro-batch",
    "1",
    "--t0",
    "0.6",
    "--guidance",
    "2",
    "--device",
    "cpu",
];

/// Every event of job `id` until it ends.
fn wait_for(runner: &JobRunner, id: u64) -> JobEvent {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        assert!(Instant::now() < deadline, "job {id} did not end");
        if let Some(event) = runner.next_event_timeout(Duration::from_millis(200))
            && event.id() == id
            && event.is_final()
        {
            return event;
        }
    }
}

#[test]
fn the_command_line_and_the_jobs_api_make_the_same_edit() {
    let home = tempfile::tempdir().unwrap();
    let photo = small_photo(home.path(), "photo.png", 90);
    let out = home.path().join("cli.png");
    let mut args = vec!["edit", photo.to_str().unwrap()];
    args.extend(EDIT_FLAGS);
    let model = path_str(&model_dir("sd15-tiny"));
    let out_arg = path_str(&out);
    args.extend(["--model", &model, "--no-cache", "--out", &out_arg]);
    let run = unitune(&args, home.path());
    assert_eq!(run.code, 0, "{}", run.stderr);

    // The same edit through the jobs API, as the editor sends it.
    let options = RunnerOptions {
        preview_seed: 0,
        preview: PreviewMode::Off,
        tiny_preview: None,
    };
    let mut runner =
        JobRunner::start(common::load_service("sd15-tiny"), options, Box::new(|| {})).unwrap();
    let decoded = load_photo(&photo, &DecodeLimits::default()).unwrap();
    let image = Arc::new(decoded.rgb);
    let tune = runner
        .submit(JobRequest::Tune {
            photo: image.clone(),
            settings: training().settings(Some(2)).unwrap(),
            size: WorkingSize::Requested(64, 64),
        })
        .unwrap();
    assert!(matches!(wait_for(&runner, tune), JobEvent::Tuned { .. }));
    let edit = runner
        .submit(JobRequest::Edit(EditSpec {
            photo_name: Some("photo.png".into()),
            knobs: EditKnobs {
                tune_steps: Some(2),
                t0_fraction: Some(0.6),
                guidance_weight: Some(2.0),
                ..EditKnobs::default()
            },
            seed: 3,
            sampling_steps: 3,
            size: WorkingSize::Requested(64, 64),
            // The command line's default for a description.
            region: unitune::service::Region::Auto { threshold: 0.5 },
            ..EditSpec::new(image, "a red apple")
        }))
        .unwrap();
    let JobEvent::Finished { result, recipe, .. } = wait_for(&runner, edit) else {
        panic!("the job's edit did not finish");
    };
    let cli_image = image::open(&out).unwrap().to_rgb8();
    assert_eq!(
        cli_image.as_raw(),
        result.as_raw(),
        "the same pixels, byte for byte"
    );
    let cli_recipe = png_recipe(&out);
    let job_recipe = serde_json::to_value(&*recipe).unwrap();
    assert_eq!(cli_recipe, job_recipe, "the same recipe");
    assert_eq!(job_recipe["model"], "sd15-tiny");
    assert_eq!(job_recipe["tune_steps"], 2);
}

#[test]
fn no_exported_png_or_lora_names_the_folders_of_the_photo_model_or_mask() {
    let home = tempfile::tempdir().unwrap();
    // A folder name that is nowhere else: every file below it, none of it in any output.
    let private = home.path().join("private-folder-7c1e");
    let model = private.join("models").join("my-sd15");
    copy_dir(&model_dir("sd15-tiny"), &model);
    let photo = small_photo(&private, "holiday.png", 40);
    let mask = private.join("mask.png");
    image::GrayImage::from_fn(48, 40, |x, _| image::Luma([if x < 24 { 255 } else { 0 }]))
        .save(&mask)
        .unwrap();
    let outputs = home.path().join("out");
    std::fs::create_dir(&outputs).unwrap();
    let (out, lora) = (
        outputs.join("edit.png"),
        outputs.join("holiday.safetensors"),
    );
    let run = unitune(
        &[
            "edit",
            &path_str(&photo),
            "--prompt",
            "a red apple",
            "--mask",
            &path_str(&mask),
            "--model",
            &path_str(&model),
            "--train",
            "lora",
            "--snapshots",
            "1",
            "--micro-batch",
            "1",
            "--tune-steps",
            "1",
            "--sampling-steps",
            "2",
            "--size",
            "64x64",
            "--device",
            "cpu",
            "--export-lora",
            &path_str(&lora),
            "--out",
            &path_str(&out),
        ],
        home.path(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    for file in [&out, &lora] {
        let bytes = std::fs::read(file).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for leak in [
            private.to_str().unwrap(),
            "private-folder-7c1e",
            home.path().to_str().unwrap(),
        ] {
            assert!(
                !text.contains(leak),
                "{} contains {leak}",
                file.file_name().unwrap().to_string_lossy()
            );
        }
    }
    let recipe = png_recipe(&out);
    assert_eq!(recipe["model"], "my-sd15");
    assert_eq!(recipe["source_image"], "holiday.png");
    assert_eq!(recipe["mask"], "mask.png");
    let hash = recipe["model_hash"].as_str().unwrap();
    assert_eq!(hash.len(), 10);
    assert!(
        recipe["model_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with(hash)
    );
}

/// What AUTOMATIC1111's `parse_generation_parameters` reads from a `parameters` chunk: the
/// last line's `Key: value` pairs when it has at least three.
fn a1111_reads(parameters: &str) -> Vec<(String, String)> {
    let pattern = regex::Regex::new(A1111_PARAM_CODE).unwrap();
    let last = parameters.trim().lines().last().unwrap();
    let pairs: Vec<(String, String)> = pattern
        .captures_iter(last)
        .map(|c| (c[1].to_string(), c[2].to_string()))
        .collect();
    assert!(pairs.len() >= 3, "A1111 would not see parameters: {last}");
    pairs
}

#[test]
fn automatic1111s_rules_read_the_model_and_its_hash_and_a_single_file_hash_is_autov2() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("cat.png");
    let run = unitune(
        &[
            "generate",
            "--prompt",
            "a photo of a cat, at night",
            "--model",
            &path_str(&model_dir("sd15-tiny")),
            "--seed",
            "5",
            "--sampling-steps",
            "1",
            "--device",
            "cpu",
            "--out",
            &path_str(&out),
        ],
        home.path(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let text = read_png_text(&out).unwrap();
    let parameters = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    let pairs = a1111_reads(parameters);
    let field = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("A1111 reads no {key} from {parameters}"))
    };
    assert_eq!(field("Model"), "sd15-tiny");
    let recipe = png_recipe(&out);
    assert_eq!(field("Model hash"), recipe["model_hash"].as_str().unwrap());
    assert_eq!(field("Seed"), "5");
    assert!(parameters.starts_with("a photo of a cat, at night\n"));

    // A single-file checkpoint's hash is the first 10 hex digits of the file's SHA-256.
    let checkpoint = fixtures().join("models/sd15-ckpt-tiny.safetensors");
    {
        use sha2::Digest;
        let sha = sha2::Sha256::digest(std::fs::read(&checkpoint).unwrap());
        let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        let request = ModelRequest {
            device: unitune::engine::device::DeviceChoice::Cpu,
            hash_memo: None,
            ..ModelRequest::new(&path_str(&checkpoint))
        };
        let service = EditService::load(&request, None, &mut NoProgress).unwrap();
        assert_eq!(service.identity().hash, hex[..10]);
        assert_eq!(service.identity().name, "sd15-ckpt-tiny");
    }
}

#[test]
fn a_recipe_read_back_repeats_the_edit_on_another_photo_and_given_flags_win() {
    let home = tempfile::tempdir().unwrap();
    let first = small_photo(home.path(), "first.png", 90);
    let second = small_photo(home.path(), "second.png", 200);
    let model = path_str(&model_dir("sd15-tiny"));
    let made = home.path().join("made.png");
    let mut args = vec!["edit", first.to_str().unwrap()];
    args.extend(EDIT_FLAGS);
    let made_arg = path_str(&made);
    args.extend(["--model", &model, "--out", &made_arg]);
    assert_eq!(unitune(&args, home.path()).code, 0);

    // The recipe alone: the same edit of the second photo.
    let again = home.path().join("again.png");
    let run = unitune(
        &[
            "edit",
            &path_str(&second),
            "--recipe",
            &made_arg,
            "--size",
            "64x64",
            "--model",
            &model,
            "--device",
            "cpu",
            "--out",
            &path_str(&again),
        ],
        home.path(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (a, b) = (png_recipe(&made), png_recipe(&again));
    for key in [
        "prompt",
        "model_prompt",
        "seed",
        "sampling_steps",
        "guidance_weight",
        "t0_fraction",
        "tune_steps",
        "model_hash",
    ] {
        assert_eq!(a[key], b[key], "{key} repeats");
    }
    // The fine-tune repeats too, but for the micro-batch: a memory choice of the machine.
    for key in [
        "train",
        "learning_rate",
        "snapshot_steps",
        "batch_size",
        "token",
        "seed",
    ] {
        assert_eq!(a["tuning"][key], b["tuning"][key], "tuning's {key} repeats");
    }
    assert_eq!(b["source_image"], "second.png");

    // A flag given with the recipe wins over it.
    let seeded = home.path().join("seeded.png");
    let run = unitune(
        &[
            "edit",
            &path_str(&second),
            "--recipe",
            &made_arg,
            "--seed",
            "11",
            "--sampling-steps",
            "2",
            "--size",
            "64x64",
            "--model",
            &model,
            "--device",
            "cpu",
            "--out",
            &path_str(&seeded),
        ],
        home.path(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let c = png_recipe(&seeded);
    assert_eq!(
        (c["seed"].as_u64(), c["sampling_steps"].as_u64()),
        (Some(11), Some(2))
    );
    assert_eq!(c["tune_steps"], a["tune_steps"]);

    // An image without a recipe is refused in one line.
    let run = unitune(
        &["edit", &path_str(&second), "--recipe", &path_str(&second)],
        home.path(),
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("holds no recipe"), "{}", run.stderr);
}

#[test]
fn a_text_encoder_saved_without_the_text_model_prefix_gives_the_same_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let unprefixed = dir.path().join("sd15-unprefixed");
    copy_dir(&model_dir("sd15-tiny"), &unprefixed);
    let weights = unprefixed.join("text_encoder/model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(name, t)| (name.strip_prefix("text_model.").unwrap().to_owned(), t))
        .collect();
    candle_core::safetensors::save(&renamed, &weights).unwrap();

    let generate = |folder: &Path| {
        let request = ModelRequest {
            device: unitune::engine::device::DeviceChoice::Cpu,
            hash_memo: None,
            ..ModelRequest::new(&path_str(folder))
        };
        let service = EditService::load(&request, None, &mut NoProgress)
            .unwrap_or_else(|e| panic!("{} loads: {e}", folder.display()));
        let spec = GenerateSpec {
            prompt: "a photo of a cat".into(),
            seed: 4,
            sampling_steps: 2,
            guidance_weight: 3.0,
            size: None,
        };
        service
            .generate(&spec, &mut unitune::engine::sampling::no_observer())
            .unwrap()
            .0
    };
    assert_eq!(
        generate(&model_dir("sd15-tiny")).as_raw(),
        generate(&unprefixed).as_raw()
    );
}
