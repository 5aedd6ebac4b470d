//! The `unitune` binary end to end on the tiny fixture model: outputs, exit codes (0 ok,
//! 2 invalid input, 1 other failure) and one-line `error:` messages for every bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{copy_dir, fixtures, model_dir};
use unitune::imaging::read_png_text;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn unitune(args: &[&str], cache: &Path) -> Run {
    let output: Output = Command::new(env!("CARGO_BIN_EXE_unitune"))
        .args(args)
        // Never touch the network or the developer's real caches (the snapshot cache and
        // the file-hash memo live in XDG_CACHE_HOME).
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache)
        .env("XDG_CACHE_HOME", cache.join("user-cache"))
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("unitune runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Asserts a failure with `code`, exactly one `error:` line containing `needle`, no panic.
fn assert_fails(run: &Run, code: i32, needle: &str) {
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(run.code, code, "exit code; stderr:\n{}", run.stderr);
    assert_eq!(
        errors.len(),
        1,
        "exactly one error line; stderr:\n{}",
        run.stderr
    );
    assert!(
        errors[0].to_lowercase().contains(&needle.to_lowercase()),
        "error line lacks {needle:?}: {}",
        errors[0]
    );
    assert!(
        !run.stderr.contains("panicked") && !run.stderr.contains("stack backtrace"),
        "{}",
        run.stderr
    );
}

fn model() -> String {
    model_dir("sd15-tiny").display().to_string()
}

fn photo() -> String {
    fixtures().join("photos/chelsea.png").display().to_string()
}

fn temp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn help_documents_the_commands() {
    let dir = temp();
    let run = unitune(&["--help"], dir.path());
    assert_eq!(run.code, 0);
    for word in ["generate", "edit", "--model", "--device"] {
        assert!(run.stdout.contains(word), "--help lacks {word}");
    }
    let run = unitune(&["edit", "--help"], dir.path());
    for word in [
        "--tune-steps",
        "--t0",
        "--guidance",
        "--seed",
        "--sampling-steps",
        "--out",
    ] {
        assert!(run.stdout.contains(word), "edit --help lacks {word}");
    }
}

#[test]
fn generate_writes_a_png_with_its_recipe_and_reproduces_by_seed() {
    let dir = temp();
    let out = |n: &str| dir.path().join(n);
    let args = |o: &PathBuf| {
        vec![
            "generate".to_string(),
            "--prompt".into(),
            "a photo of a cat".into(),
            "--model".into(),
            model(),
            "--seed".into(),
            "42".into(),
            "--sampling-steps".into(),
            "3".into(),
            "--device".into(),
            "cpu".into(),
            "--out".into(),
            path_str(o),
        ]
    };
    for name in ["a.png", "b.png"] {
        let a: Vec<String> = args(&out(name));
        let run = unitune(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            dir.path(),
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert!(run.stdout.contains(name));
    }
    let a = image::open(out("a.png")).unwrap().to_rgb8();
    let b = image::open(out("b.png")).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (64, 64));
    assert_eq!(a.as_raw(), b.as_raw(), "same seed, same pixels");

    let text = read_png_text(&out("a.png")).unwrap();
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let recipe: serde_json::Value = serde_json::from_str(&get("unitune")).unwrap();
    assert_eq!(recipe["seed"], 42);
    assert_eq!(recipe["prompt"], "a photo of a cat");
    assert_eq!(recipe["sampling_steps"], 3);
    assert!(
        recipe["revision"].is_string() && recipe["program"].as_str().unwrap().contains("unitune")
    );
    assert!(
        get("parameters").contains("Seed: 42") && get("parameters").starts_with("a photo of a cat")
    );
}

#[test]
fn edit_without_fine_tuning_returns_the_photo_size() {
    let dir = temp();
    let out = dir.path().join("edited.png");
    let run = unitune(
        &[
            "edit",
            &photo(),
            "--prompt",
            "a cat wearing sunglasses",
            "--tune-steps",
            "0",
            "--t0",
            "0.5",
            "--model",
            &model(),
            "--seed",
            "1",
            "--sampling-steps",
            "4",
            "--device",
            "cpu",
            "--out",
            &path_str(&out),
        ],
        dir.path(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let edited = image::open(&out).unwrap();
    assert_eq!(
        (edited.width(), edited.height()),
        (451, 300),
        "result at the photo's own size"
    );
    let text = read_png_text(&out).unwrap();
    assert!(
        text.iter()
            .any(|(k, v)| k == "unitune" && v.contains("\"t0_fraction\":0.5"))
    );
}

#[test]
fn an_existing_output_is_never_clobbered_silently() {
    let dir = temp();
    let out = dir.path().join("keep.png");
    std::fs::write(&out, b"precious").unwrap();
    let base = [
        "generate",
        "--prompt",
        "x",
        "--model",
        &model(),
        "--seed",
        "1",
        "--sampling-steps",
        "1",
        "--device",
        "cpu",
    ];
    let mut args = base.to_vec();
    let out_str = path_str(&out);
    args.extend(["--out", &out_str]);
    let run = unitune(&args, dir.path());
    assert_fails(&run, 2, "exists");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    args.push("--overwrite");
    assert_eq!(unitune(&args, dir.path()).code, 0);
    assert!(image::open(&out).is_ok());
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".part")
        })
        .count();
    assert_eq!(leftovers, 0, "no temp files left");
}

fn edit_with_model(model: &str, dir: &Path) -> Run {
    let out = path_str(&dir.join("out.png"));
    unitune(
        &[
            "edit",
            &photo(),
            "--prompt",
            "x",
            "--tune-steps",
            "0",
            "--model",
            model,
            "--sampling-steps",
            "1",
            "--device",
            "cpu",
            "--out",
            &out,
        ],
        dir,
    )
}

#[test]
fn bad_model_folders_are_input_errors() {
    let dir = temp();
    // A path that does not exist.
    assert_fails(
        &edit_with_model("./no/such/model", dir.path()),
        2,
        "no/such/model",
    );

    // Pickle weights only: refused, with the reason.
    let pickled = dir.path().join("pickled");
    copy_dir(&model_dir("sd15-tiny"), &pickled);
    std::fs::rename(
        pickled.join("unet/diffusion_pytorch_model.safetensors"),
        pickled.join("unet/diffusion_pytorch_model.bin"),
    )
    .unwrap();
    assert_fails(
        &edit_with_model(&path_str(&pickled), dir.path()),
        2,
        "safetensors",
    );

    // Truncated weights.
    let damaged = dir.path().join("damaged");
    copy_dir(&model_dir("sd15-tiny"), &damaged);
    let weights = damaged.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(
        &edit_with_model(&path_str(&damaged), dir.path()),
        2,
        "damaged",
    );

    // Weights that do not match the config.
    let mismatched = dir.path().join("mismatched");
    copy_dir(&model_dir("sd15-tiny"), &mismatched);
    std::fs::copy(
        model_dir("sd2-tiny").join("unet/config.json"),
        mismatched.join("unet/config.json"),
    )
    .unwrap();
    assert_fails(
        &edit_with_model(&path_str(&mismatched), dir.path()),
        2,
        "where this architecture needs",
    );

    // An architecture we do not run, named by its field.
    let unsupported = dir.path().join("unsupported");
    copy_dir(&model_dir("sd15-tiny"), &unsupported);
    let config_path = unsupported.join("unet/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["addition_embed_type"] = "text_image".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    assert_fails(
        &edit_with_model(&path_str(&unsupported), dir.path()),
        2,
        "addition_embed_type",
    );

    // A Stable Diffusion XL folder without its second text encoder: named as such, not as a
    // width mismatch.
    let half_sdxl = dir.path().join("half-sdxl");
    copy_dir(&model_dir("sdxl-tiny"), &half_sdxl);
    std::fs::remove_dir_all(half_sdxl.join("text_encoder_2")).unwrap();
    assert_fails(
        &edit_with_model(&path_str(&half_sdxl), dir.path()),
        2,
        "Stable Diffusion XL",
    );

    // A missing config.
    let missing = dir.path().join("missing");
    copy_dir(&model_dir("sd15-tiny"), &missing);
    std::fs::remove_file(missing.join("vae/config.json")).unwrap();
    assert_fails(
        &edit_with_model(&path_str(&missing), dir.path()),
        2,
        "config.json",
    );
}

#[test]
fn a_hub_id_missing_from_the_cache_offline_names_the_cache() {
    let dir = temp();
    let run = edit_with_model("someone/not-cached", dir.path());
    assert_fails(&run, 1, &path_str(dir.path()));
}

#[test]
fn bad_images_and_arguments_are_input_errors() {
    let dir = temp();
    let d = dir.path();
    let model = model();
    let run_edit = |image: &str, extra: &[&str]| {
        let mut args = vec![
            "edit",
            image,
            "--prompt",
            "x",
            "--tune-steps",
            "0",
            "--model",
            &model,
            "--sampling-steps",
            "1",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        unitune(&args, d)
    };

    assert_fails(
        &run_edit(&path_str(&d.join("missing.png")), &[]),
        2,
        "missing.png",
    );
    let corrupt = d.join("corrupt.png");
    let mut bytes = std::fs::read(fixtures().join("photos/chelsea.png")).unwrap();
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&corrupt, bytes).unwrap();
    assert_fails(&run_edit(&path_str(&corrupt), &[]), 2, "corrupt.png");
    let text = d.join("notes.png");
    std::fs::write(&text, "not an image").unwrap();
    assert_fails(&run_edit(&path_str(&text), &[]), 2, "notes.png");

    let p = photo();
    assert_fails(&run_edit(&p, &["--size", "500x300"]), 2, "64");
    assert_fails(&run_edit(&p, &["--t0", "1.5"]), 2, "t0");
    assert_fails(
        &run_edit(&p, &["--sampling-steps", "0"]),
        2,
        "sampling-steps",
    );
    assert_fails(
        &run_edit(&p, &["--out", &path_str(&d.join("x.bmp"))]),
        2,
        ".png",
    );
    assert_fails(
        &unitune(&["edit", &p, "--prompt", "", "--tune-steps", "0"], d),
        2,
        "prompt",
    );
    assert_fails(
        &unitune(&["edit", &p, "--prompt", "x", "--fidelity", "2"], d),
        2,
        "fidelity",
    );
    assert_fails(
        &unitune(&["edit", &p, "--prompt", "x", "--train", "everything"], d),
        2,
        "training mode",
    );
    assert_fails(
        &unitune(&["edit", &p, "--prompt", "x", "--snapshots", "0,16"], d),
        2,
        "above 0",
    );
    assert_fails(
        &unitune(&["edit", &p, "--prompt", "x", "--optimizer", "sgd"], d),
        2,
        "optimizer",
    );
    assert_fails(
        &unitune(
            &[
                "edit",
                &p,
                "--prompt",
                "x",
                "--tune-steps",
                "0",
                "--frobnicate",
            ],
            d,
        ),
        2,
        "frobnicate",
    );
    assert_fails(
        &unitune(&["edit", &p, "--tune-steps", "0"], d),
        2,
        "--prompt",
    );
    assert_fails(
        &unitune(&["generate", "--prompt", "x", "--device", "quantum"], d),
        2,
        "quantum",
    );
}

#[test]
fn an_unavailable_device_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = temp();
    let run = unitune(
        &[
            "generate",
            "--prompt",
            "x",
            "--model",
            &model(),
            "--device",
            "cuda",
        ],
        dir.path(),
    );
    assert_fails(&run, 2, "cuda");
}

#[test]
fn export_to_a_read_only_place_fails_without_leftovers() {
    let dir = temp();
    // Root ignores file permissions, so use a read-only filesystem when there is one.
    let target = Path::new("/proc/unitune-test-out.png");
    let run = unitune(
        &[
            "generate",
            "--prompt",
            "x",
            "--model",
            &model(),
            "--sampling-steps",
            "1",
            "--device",
            "cpu",
            "--out",
            &path_str(target),
        ],
        dir.path(),
    );
    assert_ne!(run.code, 0);
    assert_eq!(
        run.stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        1,
        "{}",
        run.stderr
    );
    assert!(!target.exists());
}

#[test]
fn a_prompt_over_77_tokens_is_truncated_with_a_warning() {
    let dir = temp();
    let long = "a very detailed photo of a small cat ".repeat(12);
    let out = path_str(&dir.path().join("long.png"));
    let run = unitune(
        &[
            "generate",
            "--prompt",
            &long,
            "--model",
            &model(),
            "--seed",
            "1",
            "--sampling-steps",
            "1",
            "--device",
            "cpu",
            "--out",
            &out,
        ],
        dir.path(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("warning: the prompt is too long"),
        "{}",
        run.stderr
    );
}
