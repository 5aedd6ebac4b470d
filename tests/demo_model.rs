//! The shipped demo model (`assets/demo-model`) edits its world the way UniTune says it should,
//! scored by the world's scorer through `unitune eval` (docs/edit-quality.md has the full
//! benchmark this is a small slice of: 2 scenes, 6 edits, SDEdit and the fidelity slider with
//! and without the automatic region).

mod common;

use serde_json::Value;

const SCENES: &str = "2";
/// The snapshots the demo table's rows use (`src/engine/fidelity.rs`).
const SNAPSHOTS: &str = "16,128";
const T0_VALUES: &str = "0.6,0.8,1.0";

/// Measured on this slice (AMD EPYC, 2 cores; the test prints them): the bare token gives
/// back 0.10 of a scene's attributes untuned and 0.94 after 128 steps; both new backgrounds
/// succeed at the default fidelity, keeping 0.61 of the rest, against SDEdit's 0.19 at the
/// same success (t0 1.0). The margins leave room for another CPU's rounding to flip an edit.
/// (A debug build takes about 12 minutes, 2 fine-tunes of 128 steps.)
const MIN_RECONSTRUCTION_GAIN: f64 = 0.4;
const MIN_FIDELITY_GAIN: f64 = 0.15;
/// Measured on this slice (AMD EPYC, 2 cores): at the default fidelity the automatic region
/// keeps 0.805 of what was not asked for against plain UniTune's 0.577, both at success 0.50
/// (3 of 6 edits); 0.65 before a new background's region was the photo's background and the
/// photo's objects all or nothing (the 77-edit benchmark's paired gain is in
/// docs/edit-quality.md).
const MIN_REGION_FIDELITY_GAIN: f64 = 0.15;

/// Measured (AMD EPYC, 2 cores): the suggested edit succeeds at every slider position and
/// keeps 9 of the 10 attributes it does not ask about (0.9); the phrase it replaced ("a large
/// green square in the middle") repainted the circle at every position (0.8).
const MIN_EXAMPLE_FIDELITY: f64 = 0.85;

/// Runs the slice and returns its report.
fn small_eval(home: &std::path::Path) -> Value {
    let out = home.join("eval");
    let run = common::unitune(
        &[
            "eval",
            "--model",
            "demo",
            "--device",
            "cpu",
            "--scenes",
            SCENES,
            "--snapshots",
            SNAPSHOTS,
            "--t0-values",
            T0_VALUES,
            "--methods",
            "sdedit,slider,auto-region",
            "--out",
            out.to_str().unwrap(),
        ],
        home,
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    eprintln!("{}", run.stdout);
    let example = image::open(out.join("example-edit.png")).expect("the example edit is drawn");
    assert!(
        example.width() > 6 * 128,
        "the photo and five slider positions"
    );
    serde_json::from_slice(&std::fs::read(out.join("edit-quality.json")).unwrap()).unwrap()
}

/// (success rate, mean fidelity) of one method and setting over the edits `which` selects.
fn tally(report: &Value, method: &str, label: &str, which: impl Fn(&str) -> bool) -> (f64, f64) {
    let mine: Vec<&Value> = report["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["method"] == method && s["label"] == label)
        .filter(|s| which(s["edit"].as_str().unwrap()))
        .collect();
    assert!(!mine.is_empty(), "no {method} {label} samples");
    let n = mine.len() as f64;
    let successes = mine.iter().filter(|s| s["success"] == true).count() as f64;
    let fidelity: f64 = mine.iter().map(|s| s["fidelity"].as_f64().unwrap()).sum();
    (successes / n, fidelity / n)
}

/// SDEdit's best fidelity at `success` over the selected edits: linear between its most
/// faithful t0 at or below that success and its most faithful at or above it (the nearest end
/// beyond them), so SDEdit is given every benefit of the doubt.
fn sdedit_fidelity_at(report: &Value, success: f64, which: impl Fn(&str) -> bool + Copy) -> f64 {
    let points: Vec<(f64, f64)> = T0_VALUES
        .split(',')
        .map(|t0| {
            let label = format!("t0 {:.2}", t0.parse::<f64>().unwrap());
            tally(report, "SDEdit", &label, which)
        })
        .collect();
    let most_faithful = |keep: &dyn Fn(f64) -> bool| {
        points
            .iter()
            .filter(|p| keep(p.0))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .copied()
    };
    let below = most_faithful(&|s| s <= success);
    let above = most_faithful(&|s| s >= success);
    match (below, above) {
        (Some(a), Some(b)) if b.0 > a.0 => a.1 + (b.1 - a.1) * (success - a.0) / (b.0 - a.0),
        (Some(a), _) => a.1,
        (None, Some(b)) => b.1,
        (None, None) => unreachable!("SDEdit has points"),
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
            .map(|r| r["agreement"].as_f64().unwrap())
            .unwrap()
    };
    let (base, tuned) = (agreement(0), agreement(128));
    eprintln!("bare token: untuned {base:.3}, 128 steps {tuned:.3}");
    assert!(
        tuned >= base + MIN_RECONSTRUCTION_GAIN,
        "untuned {base}, tuned {tuned}"
    );

    // A new background, at the default fidelity: UniTune keeps more of the scene than SDEdit
    // does at the same success. (Not every kind of edit: on this model UniTune rarely adds an
    // object where the photo has none; docs/edit-quality.md.)
    let background = |edit: &str| edit.starts_with("make the background");
    let (success, fidelity) = tally(&report, "fidelity slider", "fidelity 0.50", background);
    let sdedit = sdedit_fidelity_at(&report, success, background);
    eprintln!(
        "new background at success {success:.2}: UniTune keeps {fidelity:.3}, SDEdit {sdedit:.3}"
    );
    assert!(success >= 0.5, "the default edit succeeds");
    assert!(
        fidelity >= sdedit + MIN_FIDELITY_GAIN,
        "UniTune {fidelity} vs SDEdit {sdedit} at success {success}"
    );

    // Every edit at the default fidelity: the automatic region keeps more of the scene, and
    // succeeds as often.
    let every = |_: &str| true;
    let (plain_success, plain_fidelity) = tally(&report, "fidelity slider", "fidelity 0.50", every);
    let (auto_success, auto_fidelity) = tally(
        &report,
        "fidelity slider + auto region",
        "fidelity 0.50",
        every,
    );
    eprintln!(
        "default fidelity: plain success {plain_success:.2} fidelity {plain_fidelity:.3}, auto region success {auto_success:.2} fidelity {auto_fidelity:.3}"
    );
    assert!(
        auto_success >= plain_success,
        "auto region success {auto_success} vs {plain_success}"
    );
    assert!(
        auto_fidelity >= plain_fidelity + MIN_REGION_FIDELITY_GAIN,
        "auto region fidelity {auto_fidelity} vs {plain_fidelity}"
    );

    // The editor's first impression: its demo scene (the slice's first) with the prompt it
    // suggests turns the square green at the default settings, and keeps the circle red and
    // the background white along the whole slider.
    let example: Vec<&Value> = report["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["scene"] == 0
                && s["edit"] == "make the square green"
                && s["method"] == "fidelity slider + auto region"
        })
        .collect();
    assert_eq!(
        example.len(),
        5,
        "the slice starts with the editor's demo scene"
    );
    let default = example
        .iter()
        .find(|s| s["label"] == "fidelity 0.50")
        .unwrap();
    assert_eq!(default["success"], true, "{default}");
    let kept = example
        .iter()
        .map(|s| s["fidelity"].as_f64().unwrap())
        .sum::<f64>()
        / example.len() as f64;
    eprintln!("the suggested edit keeps {kept:.3} along the slider");
    assert!(kept >= MIN_EXAMPLE_FIDELITY, "{example:?}");
}
