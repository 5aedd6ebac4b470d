//! `--preview taesd|fast|off` end to end: the tiny VAE comes from a fake hub on loopback into
//! the Hugging Face cache (then from the cache alone), the preview file is the tiny decode of
//! the last step's x0 prediction, and a tiny VAE that cannot be had never fails the command.

mod common;
#[path = "common/fake_hub.rs"]
mod fake_hub;

use std::ops::ControlFlow;
use std::path::Path;
use std::process::Command;

use common::{load_model, model_dir};
use fake_hub::{FakeHub, FakeRepo};
use image::RgbImage;
use unitune::engine::preview::LatentPreview;
use unitune::engine::sampling::{SampleRequest, Start, StepView, sample};
use unitune::engine::taesd::TinyAutoencoder;
use unitune::model_files::TINY_VAE_REPO;

const SEED: &str = "4";
const STEPS: usize = 2;

struct Run {
    code: i32,
    stderr: String,
}

/// `unitune generate` with the tiny fixture model, the hub at `endpoint` and the cache in
/// `home`, isolated from the developer's environment.
fn generate(extra: &[&str], endpoint: &str, home: &Path, offline: bool) -> Run {
    let model = model_dir("sd15-tiny").display().to_string();
    let out = home.join("out.png").display().to_string();
    let steps = STEPS.to_string();
    let mut args = vec![
        "generate",
        "--prompt",
        "a photo of a cat",
        "--model",
        &model,
        "--seed",
        SEED,
        "--sampling-steps",
        &steps,
        "--size",
        "64x64",
        "--device",
        "cpu",
        "--overwrite",
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    let mut command = Command::new(env!("CARGO_BIN_EXE_unitune"));
    command
        .args(&args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", home.join("hub"))
        .env("HF_HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .current_dir(home);
    if offline {
        command.env("HF_HUB_OFFLINE", "1");
    } else {
        command.env_remove("HF_HUB_OFFLINE");
    }
    let output = command.output().expect("unitune runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn taesd_repo() -> FakeRepo {
    FakeRepo::from_folder(TINY_VAE_REPO, &model_dir("taesd-tiny"))
}

/// The x0 prediction of the last step of the run `generate` makes.
fn last_x0() -> (unitune::engine::StableDiffusion, candle_core::Tensor) {
    let model = load_model("sd15-tiny");
    let request = SampleRequest {
        prompt: "a photo of a cat",
        baseline_prompt: "",
        guidance_weight: 7.5,
        sampling_steps: STEPS,
        seed: SEED.parse().unwrap(),
        start: Start::Noise {
            width: 64,
            height: 64,
        },
    };
    let mut x0 = None;
    let mut observer = |view: &StepView| {
        x0 = Some(view.predicted_x0.clone());
        ControlFlow::Continue(())
    };
    sample(&model, &request, &mut observer).unwrap();
    (model, x0.expect("a step ran"))
}

fn read_rgb(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// The largest difference of one channel of one pixel (runs in two processes may round the
/// last bit of a float differently; 8-bit pixels then differ by one at most).
fn max_pixel_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn assert_ok(run: &Run) {
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

fn warnings(run: &Run) -> Vec<&str> {
    run.stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect()
}

#[test]
fn a_taesd_preview_is_the_tiny_decode_of_the_last_x0_and_the_tiny_vae_is_fetched_once() {
    let hub = FakeHub::start(vec![taesd_repo()]);
    let home = tempfile::tempdir().unwrap();
    let run = generate(&["--preview", "taesd"], &hub.url, home.path(), false);
    assert_ok(&run);
    assert!(warnings(&run).is_empty(), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("downloading diffusion_pytorch_model.safetensors"),
        "the download shows progress: {}",
        run.stderr
    );
    let preview_file = home.path().join("out-preview.png");
    assert!(run.stderr.contains("live preview:"), "{}", run.stderr);
    let preview = read_rgb(&preview_file);

    let (model, x0) = last_x0();
    let dir = model_dir("taesd-tiny");
    let tiny = TinyAutoencoder::load(
        &dir.join("config.json"),
        &dir.join("diffusion_pytorch_model.safetensors"),
        model.device(),
        model.dtype(),
    )
    .unwrap();
    let expected = model.tensor_to_image(&tiny.decode(&x0).unwrap()).unwrap();
    assert_eq!(
        preview.dimensions(),
        (64, 64),
        "taesd previews at image size"
    );
    assert!(max_pixel_diff(&preview, &expected) <= 1);
    // Not the final image: that one comes from the full VAE.
    let final_image = read_rgb(&home.path().join("out.png"));
    assert!(max_pixel_diff(&final_image, &preview) > 1);

    // Then from the cache alone, without asking the hub.
    let requests = hub.log().len();
    std::fs::remove_file(&preview_file).unwrap();
    let offline = generate(&["--preview", "taesd"], &hub.url, home.path(), true);
    assert_ok(&offline);
    assert!(warnings(&offline).is_empty(), "{}", offline.stderr);
    assert_eq!(hub.log().len(), requests, "the cache was enough");
    assert_eq!(read_rgb(&preview_file), preview);
}

#[test]
fn without_the_tiny_vae_the_fast_preview_stands_in_with_one_warning() {
    let (model, x0) = last_x0();
    let fast = LatentPreview::for_model(&model, 0)
        .unwrap()
        .render(&x0)
        .unwrap();
    let damaged = {
        let weights =
            std::fs::read(model_dir("taesd-tiny").join("diffusion_pytorch_model.safetensors"))
                .unwrap();
        taesd_repo().with_file(
            "diffusion_pytorch_model.safetensors",
            weights[..weights.len() / 3].to_vec(),
        )
    };
    // No such repo on the hub (404), offline with an empty cache, damaged weights.
    for (repos, offline, reason) in [
        (vec![], false, "was not found"),
        (vec![taesd_repo()], true, "offline"),
        (vec![damaged], false, "tiny VAE weights"),
    ] {
        let hub = FakeHub::start(repos);
        let home = tempfile::tempdir().unwrap();
        let run = generate(&["--preview", "taesd"], &hub.url, home.path(), offline);
        assert_ok(&run);
        let warned = warnings(&run);
        assert_eq!(warned.len(), 1, "{}", run.stderr);
        assert!(
            warned[0].contains("fast preview") && warned[0].contains(reason),
            "{reason}: {}",
            warned[0]
        );
        let preview = read_rgb(&home.path().join("out-preview.png"));
        // (This fixture's VAE is small enough that the fast preview is its own decode.)
        assert_eq!(preview.dimensions(), fast.dimensions());
        assert!(max_pixel_diff(&preview, &fast) <= 1, "{reason}");
        assert!(home.path().join("out.png").is_file());
    }
}

#[test]
fn preview_off_writes_no_preview_and_asks_for_nothing() {
    let hub = FakeHub::start(vec![taesd_repo()]);
    let home = tempfile::tempdir().unwrap();
    for extra in [&[][..], &["--preview", "off"][..]] {
        let run = generate(extra, &hub.url, home.path(), false);
        assert_ok(&run);
        assert!(home.path().join("out.png").is_file());
        assert!(!home.path().join("out-preview.png").exists());
        assert!(!run.stderr.contains("live preview"), "{}", run.stderr);
    }
    assert!(hub.log().is_empty(), "nothing was fetched");
}

#[test]
fn bad_preview_arguments_are_exit_code_2_with_one_line() {
    let home = tempfile::tempdir().unwrap();
    let elsewhere = home.path().join("p.png").display().to_string();
    for (extra, needle) in [
        (vec!["--preview", "blurry"], "blurry"),
        (vec!["--preview-out", elsewhere.as_str()], "--preview-out"),
        (
            vec!["--preview", "fast", "--preview-out", "p.gif"],
            "--preview-out",
        ),
    ] {
        let run = generate(&extra, "http://127.0.0.1:9", home.path(), true);
        assert_eq!(run.code, 2, "{extra:?}: {}", run.stderr);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{extra:?}: {}", run.stderr);
        assert!(
            lines[0].starts_with("error:") && lines[0].contains(needle),
            "{}",
            lines[0]
        );
    }
}
