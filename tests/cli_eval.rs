//! `unitune eval` end to end on the tiny fixture model: every method and setting is run and
//! scored, the report, plot and example pictures are written, and bad flags are refused.
//! (The tiny model's weights are random, so its scores say nothing; the scorer itself is
//! tested on exact renders in `src/world`.)

mod common;

use common::{model_dir, unitune};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Runs `unitune eval` on the tiny model (cross-kv fine-tuning, one scene) with `extra`
/// flags; returns the run, its output folder and its report.
fn tiny_eval(home: &Path, extra: &[&str]) -> (common::Run, PathBuf, Value) {
    let out = home.join("eval");
    let model = model_dir("sd15-tiny").display().to_string();
    let mut args = vec![
        "eval", "--model", &model, "--device", "cpu", "--scenes", "1", "--train", "cross-kv",
    ];
    args.extend_from_slice(extra);
    args.extend(["--out", out.to_str().unwrap()]);
    let run = unitune(&args, home);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("edit-quality.json")).unwrap()).unwrap();
    (run, out, report)
}

/// The method of each summary line, in order.
fn methods(report: &Value) -> Vec<&str> {
    report["summary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["method"].as_str().unwrap())
        .collect()
}

#[test]
fn eval_scores_every_setting_and_writes_the_report_plot_and_examples() {
    let home = tempfile::tempdir().unwrap();
    let (run, out, report) = tiny_eval(
        home.path(),
        &[
            "--snapshots",
            "1,2",
            "--t0-values",
            "0.5,1.0",
            "--sampling-steps",
            "2",
        ],
    );
    let methods = methods(&report);
    // Two t0 values on SDEdit, each snapshot, prompt guidance, interpolation and the mask;
    // five slider positions.
    for (method, points) in [
        ("SDEdit", 2),
        ("UniTune, 1 steps", 2),
        ("UniTune, 2 steps", 2),
        ("fidelity slider", 5),
    ] {
        assert_eq!(
            methods.iter().filter(|m| **m == method).count(),
            points,
            "{method} in {methods:?}"
        );
    }
    for extra in ["prompt guidance", "interpolation", "mask"] {
        assert_eq!(methods.iter().filter(|m| m.ends_with(extra)).count(), 2);
    }
    // One scene, the example one: its example recolouring, a new background, an added object.
    let edits = report["edits"].as_u64().unwrap();
    assert_eq!(edits, 3);
    for summary in report["summary"].as_array().unwrap() {
        assert_eq!(summary["edits"].as_u64().unwrap(), edits);
        for score in ["success", "fidelity"] {
            let value = summary[score].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&value), "{summary}");
        }
    }
    let steps: Vec<u64> = report["reconstruction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["tune_steps"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 1, 2], "the untuned model and each snapshot");
    assert!(run.stdout.contains("bare token from noise"));

    let plot = image::open(out.join("edit-quality.png")).unwrap();
    assert_eq!((plot.width(), plot.height()), (1000, 640));
    // Photo and five slider positions per edit, at 128 px.
    let examples = image::open(out.join("slider-examples.png")).unwrap();
    assert!(examples.width() > 6 * 128 && examples.height() > edits as u32 * 128);
    let example = image::open(out.join("example-edit.png")).unwrap();
    assert!(example.width() > 6 * 128 && example.height() > 128);
}

#[test]
fn eval_measures_only_the_curves_methods_names() {
    let home = tempfile::tempdir().unwrap();
    let (run, out, report) = tiny_eval(
        home.path(),
        &[
            "--snapshots",
            "1",
            "--t0-values",
            "0.5",
            "--sampling-steps",
            "1",
            "--methods",
            "sdedit,mask",
        ],
    );
    let methods = methods(&report);
    assert_eq!(methods, ["SDEdit", "UniTune 1 + mask"]);
    assert!(out.join("edit-quality.png").is_file());
    // No slider measured: no slider pictures, and no table proposed from no UniTune curve.
    assert!(!out.join("slider-examples.png").exists());
    assert!(!run.stdout.contains("fidelity table"), "{}", run.stdout);
}

#[test]
fn eval_refuses_bad_flags_with_exit_code_2() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("eval").display().to_string();
    for bad in [
        vec!["--scenes", "0"],
        vec!["--t0-values", "1.5"],
        vec!["--sampling-steps", "0"],
        vec!["--methods", "sdedit,magic"],
    ] {
        let mut args = vec!["eval", "--out", &out];
        args.extend(bad.iter().copied());
        let run = unitune(&args, home.path());
        assert_eq!(run.code, 2, "{bad:?}: {}", run.stderr);
        assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    }
}
