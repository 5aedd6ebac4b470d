//! The shipped demo model (`assets/demo-model`) edits its world the way UniTune says it should,
//! scored by the world's scorer through `unitune eval` (see docs/edit-quality.md for the full
//! benchmark this is a small slice of).

mod common;

use serde_json::Value;

/// Runs a small `unitune eval` on the demo model and returns its report.
fn small_eval(home: &std::path::Path) -> Value {
    let out = home.join("eval");
    let run = common::unitune(
        &[
            "eval",
            "--model",
            "demo",
            "--scenes",
            SCENES,
            "--snapshots",
            SNAPSHOTS,
            "--t0-values",
            T0_VALUES,
            "--sampling-steps",
            "10",
            "--out",
            out.to_str().unwrap(),
        ],
        home,
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    for picture in [
        "edit-quality.png",
        "slider-examples.png",
        "example-edit.png",
    ] {
        let image = image::open(out.join(picture)).expect(picture);
        assert!(image.width() > 64 && image.height() > 64, "{picture}");
    }
    serde_json::from_slice(&std::fs::read(out.join("edit-quality.json")).unwrap()).unwrap()
}

const SCENES: &str = "3";
const SNAPSHOTS: &str = "16,64";
const T0_VALUES: &str = "0.5,0.7,0.9,1.0";

fn summary<'a>(report: &'a Value, method: &str, label: &str) -> &'a Value {
    report["summary"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["method"] == method && s["label"] == label)
        .unwrap_or_else(|| panic!("no {method} {label} in the report"))
}

fn f(value: &Value) -> f64 {
    value.as_f64().unwrap()
}

/// SDEdit's fidelity at `success`, read off its curve (points in t0 order; success grows with
/// t0, fidelity falls) by linear interpolation between the two points around it.
fn sdedit_fidelity_at(report: &Value, success: f64) -> f64 {
    let mut points: Vec<(f64, f64)> = report["summary"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["method"] == "SDEdit")
        .map(|s| (f(&s["success"]), f(&s["fidelity"])))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let below = points.iter().rev().find(|p| p.0 <= success).copied();
    let above = points.iter().find(|p| p.0 >= success).copied();
    match (below, above) {
        (Some(a), Some(b)) if b.0 > a.0 => a.1 + (b.1 - a.1) * (success - a.0) / (b.0 - a.0),
        (Some(a), _) => a.1,
        (None, Some(b)) => b.1,
        (None, None) => panic!("SDEdit has no points"),
    }
}

#[test]
fn the_demo_model_learns_a_scene_and_unitune_keeps_more_of_it_than_sdedit() {
    let home = tempfile::tempdir().unwrap();
    let report = small_eval(home.path());

    // The paper's figure 3: from pure noise, the bare token gives back the scene it was
    // fine-tuned on; the untuned model, given the same token, does not.
    let agreement = |steps: u64| {
        report["reconstruction"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["tune_steps"] == steps)
            .map(|r| f(&r["agreement"]))
            .unwrap()
    };
    let (base, tuned) = (agreement(0), agreement(64));
    eprintln!("bare token: untuned {base:.3}, 64 steps {tuned:.3}");
    assert!(
        tuned >= base + MIN_RECONSTRUCTION_GAIN,
        "untuned {base}, tuned {tuned}"
    );

    // UniTune at the default fidelity keeps more of the scene than SDEdit does at the same
    // success rate.
    let unitune = summary(&report, "fidelity slider", "fidelity 0.50");
    let (success, fidelity) = (f(&unitune["success"]), f(&unitune["fidelity"]));
    let sdedit = sdedit_fidelity_at(&report, success);
    eprintln!("at success {success:.3}: UniTune keeps {fidelity:.3}, SDEdit {sdedit:.3}");
    assert!(success > 0.0, "the default edit succeeds at times");
    assert!(
        fidelity >= sdedit + MIN_FIDELITY_GAIN,
        "UniTune {fidelity} vs SDEdit {sdedit} at success {success}"
    );
}

/// Measured on this slice (3 scenes, 8 edits): see the constants' values in the test's output;
/// the margins leave room for another CPU's rounding.
const MIN_RECONSTRUCTION_GAIN: f64 = 0.2;
const MIN_FIDELITY_GAIN: f64 = 0.05;
