//! Helpers shared by the integration tests: fixture paths, reference data, comparisons.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use unitune::engine::StableDiffusion;
use unitune::model_files::{ModelFiles, locate_in_folder};

/// Copies a folder tree (a model folder, for tests that change or move one).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// One safetensors file's weights in f32 on the CPU, memory-mapped (a component loaded by
/// itself, outside a model folder's loader).
pub fn f32_weights(file: &std::path::Path) -> candle_nn::VarBuilder<'static> {
    // SAFETY: the fixture files are not modified while the tests run.
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &Device::Cpu) }
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

pub fn model_files(name: &str) -> ModelFiles {
    locate_in_folder(&model_dir(name)).expect("fixture model folder is complete")
}

/// The edit service with a fixture model on the CPU in f32, without a snapshot cache or a
/// hash memo (nothing outside the test's own files is written).
pub fn load_service(name: &str) -> unitune::service::EditService {
    let request = unitune::service::ModelRequest {
        device: unitune::engine::device::DeviceChoice::Cpu,
        precision: unitune::engine::precision::Precision::F32,
        hash_memo: None,
        hub: unitune::model_files::HubOptions {
            offline: true,
            ..Default::default()
        },
        ..unitune::service::ModelRequest::new(&model_dir(name).display().to_string())
    };
    unitune::service::EditService::load(&request, None, &mut unitune::model_files::NoProgress)
        .expect("fixture model loads")
}

pub fn load_model(name: &str) -> StableDiffusion {
    StableDiffusion::load(&model_files(name), &Device::Cpu, DType::F32)
        .expect("fixture model loads")
}

/// Reference tensors and JSON recorded by tests/fixtures/make_fixtures.py with diffusers.
pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub json: serde_json::Value,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        let dir = fixtures().join("reference");
        let tensors =
            candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
                .expect("reference tensors load");
        let text =
            std::fs::read_to_string(dir.join(format!("{name}.json"))).expect("reference json");
        Self {
            tensors,
            json: serde_json::from_str(&text).expect("reference json parses"),
        }
    }

    pub fn tensor(&self, key: &str) -> Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("reference has no tensor {key}"))
            .clone()
    }

    /// A reference tensor as f32 (integer tensors are converted).
    pub fn f32(&self, key: &str) -> Tensor {
        self.tensor(key).to_dtype(DType::F32).unwrap()
    }

    pub fn usize_list(&self, key: &str) -> Vec<usize> {
        self.json[key]
            .as_array()
            .unwrap_or_else(|| panic!("reference json has no list {key}"))
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `actual` matches `expected` within `tolerance` (absolute), naming what differs.
/// Set `UNITUNE_PRINT_DIFFS=1` to print every measured difference (to see the margins).
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f32) {
    let diff = max_abs_diff(actual, expected);
    if std::env::var_os("UNITUNE_PRINT_DIFFS").is_some() {
        eprintln!("{what}: max abs diff {diff:e} (tolerance {tolerance:e})");
    }
    assert!(
        diff <= tolerance,
        "{what}: max abs difference {diff:e} exceeds {tolerance:e} (reference magnitude {:e})",
        max_abs(expected)
    );
}

pub const MODELS: [&str; 2] = ["sd15-tiny", "sd2-tiny"];

/// The tiny InstructPix2Pix pipeline, assembled in `dir` as tests/fixtures/make_instruct_fixtures.py
/// assembles it: sd15-tiny with its UNet replaced by the 8-input-channel one.
pub fn instruct_model_dir(dir: &Path) -> PathBuf {
    let root = dir.join("ip2p-tiny");
    copy_dir(&model_dir("sd15-tiny"), &root);
    std::fs::remove_dir_all(root.join("unet")).unwrap();
    copy_dir(
        &model_dir("ip2p-unet-tiny").join("unet"),
        &root.join("unet"),
    );
    root
}

/// What a run of the `unitune` binary did.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `unitune` binary in `home`, with its snapshot and Hugging Face caches there and
/// the hub offline, so that runs never share state or touch the network.
pub fn unitune(args: &[&str], home: &Path) -> Run {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_unitune"))
        .args(args)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", home.join("hf"))
        .current_dir(home)
        .output()
        .expect("unitune runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The full recipe (the `unitune` text chunk) of an exported PNG.
pub fn png_recipe(path: &Path) -> serde_json::Value {
    let text = unitune::imaging::read_png_text(path).expect("the PNG has text chunks");
    let json = &text
        .iter()
        .find(|(k, _)| k == "unitune")
        .expect("the PNG has a recipe")
        .1;
    serde_json::from_str(json).expect("the recipe is JSON")
}
