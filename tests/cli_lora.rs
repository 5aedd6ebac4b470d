//! LoRA on the command line, end to end on the tiny fixture model: `--export-lora` and
//! `unitune export-lora` (from the cache, never training), `--lora FILE:WEIGHT` in recipes and
//! in the snapshot cache key, and bad files refused with exit code 2 and one line.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{Run, fixtures, model_dir, unitune};
use unitune::imaging::read_png_text;

fn model() -> String {
    model_dir("sd15-tiny").display().to_string()
}

fn photo() -> String {
    fixtures().join("photos/chelsea.png").display().to_string()
}

fn fixture_lora() -> String {
    fixtures()
        .join("models/sd15-tiny-lora.safetensors")
        .display()
        .to_string()
}

const LORA_TUNE: [&str; 8] = [
    "--train",
    "lora",
    "--lora-rank",
    "2",
    "--snapshots",
    "1,2",
    "--device",
    "cpu",
];

fn cache_entries(home: &Path) -> usize {
    std::fs::read_dir(home.join("cache/unitune/snapshots")).map_or(0, |d| d.count())
}

fn tensors(path: &Path) -> HashMap<String, Vec<u32>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let bits = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            (name, bits)
        })
        .collect()
}

fn assert_one_line_error(run: &Run, expected: &str) {
    assert_eq!(run.code, 2, "{}", run.stderr);
    let last = run.stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(expected),
        "expected one error line containing {expected:?}: {}",
        run.stderr
    );
    assert_eq!(run.stderr.matches("error:").count(), 1, "{}", run.stderr);
}

#[test]
fn tune_exports_a_lora_and_export_lora_rewrites_it_from_the_cache_without_training() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (m, p) = (model(), photo());
    let mut tune = vec!["tune", &p, "--model", &m, "--export-lora", "a.safetensors"];
    tune.extend_from_slice(&LORA_TUNE);
    let run = unitune(&tune, h);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("a.safetensors"), "{}", run.stdout);
    let exported = tensors(&h.join("a.safetensors"));
    assert!(
        exported.contains_key(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"
        ),
        "{:?}",
        exported.keys()
    );

    let export = |out: &str, extra: &[&str]| {
        let mut args = vec!["export-lora", &p, "--model", &m, "--out", out];
        args.extend_from_slice(&LORA_TUNE);
        args.extend_from_slice(extra);
        unitune(&args, h)
    };
    let again = export("b.safetensors", &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stderr.contains("using cached snapshots"),
        "{}",
        again.stderr
    );
    assert_eq!(tensors(&h.join("b.safetensors")), exported);
    let first = export("c.safetensors", &["--steps", "1"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_ne!(tensors(&h.join("c.safetensors")), exported);

    // Another recipe was never tuned: nothing is trained, nothing is written.
    let entries = cache_entries(h);
    let missing = export("d.safetensors", &["--tune-seed", "9"]);
    assert_one_line_error(&missing, "there is no cached fine-tune");
    assert!(!h.join("d.safetensors").exists());
    assert_eq!(cache_entries(h), entries);
}

#[test]
fn only_a_lora_mode_fine_tune_exports() {
    let home = tempfile::tempdir().unwrap();
    let (m, p) = (model(), photo());
    let run = unitune(
        &[
            "tune",
            &p,
            "--model",
            &m,
            "--train",
            "cross-kv",
            "--export-lora",
            "x.safetensors",
        ],
        home.path(),
    );
    assert_one_line_error(&run, "only from a fine-tune in lora mode, not cross-kv");
    let run = unitune(
        &[
            "tune",
            &p,
            "--model",
            &m,
            "--train",
            "lora",
            "--export-lora",
            "x.png",
        ],
        home.path(),
    );
    assert_one_line_error(&run, "must end in .safetensors");
}

#[test]
fn an_applied_lora_is_in_the_recipe_and_in_the_snapshot_cache_key() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (m, p, l) = (model(), photo(), fixture_lora());
    let with_lora = format!("{l}:0.8");
    let common = [
        "--model",
        &m,
        "--train",
        "cross-kv",
        "--snapshots",
        "1",
        "--device",
        "cpu",
    ];
    let tune = |extra: &[&str]| {
        let mut args = vec!["tune", &p];
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        unitune(&args, h)
    };
    let plain = tune(&[]);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    let styled = tune(&["--lora", &with_lora]);
    assert_eq!(styled.code, 0, "{}", styled.stderr);
    assert!(
        styled.stderr.contains("applied 1 LoRA(s)") && !styled.stderr.contains("using cached"),
        "a LoRA must not reuse the plain model's fine-tune: {}",
        styled.stderr
    );
    assert_eq!(cache_entries(h), 2);
    let other_weight = tune(&["--lora", &format!("{l}:0.5")]);
    assert_eq!(other_weight.code, 0, "{}", other_weight.stderr);
    assert!(
        !other_weight.stderr.contains("using cached"),
        "{}",
        other_weight.stderr
    );
    assert_eq!(cache_entries(h), 3);

    // The same LoRA and weight reuse their fine-tune; the edit's recipe names the LoRA.
    let mut edit = vec![
        "edit",
        &p,
        "--prompt",
        "a cat",
        "--tune-steps",
        "1",
        "--t0",
        "0.9",
        "--seed",
        "3",
        "--sampling-steps",
        "2",
        "--out",
        "styled.png",
        "--lora",
        &with_lora,
    ];
    edit.extend_from_slice(&common);
    let styled_edit = unitune(&edit, h);
    assert_eq!(styled_edit.code, 0, "{}", styled_edit.stderr);
    assert!(
        styled_edit.stderr.contains("using cached snapshots"),
        "{}",
        styled_edit.stderr
    );
    let text: HashMap<String, String> = read_png_text(&h.join("styled.png"))
        .unwrap()
        .into_iter()
        .collect();
    let recipe: serde_json::Value = serde_json::from_str(&text["unitune"]).unwrap();
    let lora = &recipe["loras"][0];
    assert_eq!(lora["file"], "sd15-tiny-lora.safetensors");
    assert_eq!(lora["weight"], 0.8);
    assert!(
        lora["hash"].as_str().unwrap().starts_with("sha256:"),
        "{lora}"
    );
    assert!(
        text["parameters"].contains("<lora:sd15-tiny-lora:0.8>"),
        "{}",
        text["parameters"]
    );
}

/// Writes a LoRA file of ones with these tensors.
fn write_lora(dir: &Path, name: &str, tensors: &[(&str, &[usize])]) -> PathBuf {
    let path = dir.join(name);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(key, shape)| {
            let t = Tensor::ones(*shape, DType::F32, &Device::Cpu).unwrap();
            (key.to_string(), t)
        })
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

#[test]
fn bad_lora_files_exit_with_code_2_and_one_line() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let (down, up) = (
        format!("{q}.lora_down.weight"),
        format!("{q}.lora_up.weight"),
    );
    let wide = write_lora(
        h,
        "wide.safetensors",
        &[(&down, &[4, 768]), (&up, &[320, 4])],
    );
    let unknown = write_lora(
        h,
        "dora.safetensors",
        &[(&format!("{q}.dora_scale"), &[1, 32])],
    );
    let pickle = h.join("style.pt");
    std::fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
    let m = model();
    let cases = [
        (wide.display().to_string(), "which has shape [32, 32]"),
        (unknown.display().to_string(), "dora_scale"),
        (pickle.display().to_string(), "is a pickle file"),
        (
            h.join("none.safetensors").display().to_string(),
            "no such file",
        ),
        (
            format!("{}:0.5", wide.display()),
            "made for another model family",
        ),
    ];
    for (lora, expected) in cases {
        let run = unitune(
            &[
                "generate", "--prompt", "a cat", "--model", &m, "--device", "cpu", "--lora", &lora,
            ],
            h,
        );
        assert_one_line_error(&run, expected);
    }
}
