//! LoRA files in the kohya format, both ways: a file written by
//! tests/fixtures/make_lora_fixtures.py applied to the tiny SD 1.5 model reproduces diffusers'
//! `load_lora_weights` (UNet and text encoder, at weight 1 and 0.5) within 1e-4; exporting its
//! factors rewrites it name for name and bit for bit; a fine-tune in lora mode exported and
//! applied to the base model reproduces the fine-tuned UNet; the untrained values read back
//! for the adapter carry the LoRA; bad files are refused in one sentence. The same for SDXL's
//! kohya naming (tests/fixtures/make_sdxl_lora_fixtures.py), UNet and both text encoders.

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{Reference, assert_close, fixtures, max_abs_diff, model_files};
use unitune::engine::StableDiffusion;
use unitune::engine::edit::{CachePolicy, tune_photo};
use unitune::engine::finetune::{Adapter, Snapshot, TrainMode, TuneSettings};
use unitune::engine::lora::{
    KohyaLayer, LoraExportInfo, export_tuned, read_kohya_file, write_kohya_file,
};
use unitune::engine::noise::NoiseSource;
use unitune::engine::optim::OptimizerSettings;
use unitune::engine::unet::TextTime;
use unitune::model_files::{LoraChoice, ModelFiles};

/// diffusers applies the LoRA unfused (`W x + s B (A x)`); unitune merges it into `W` once.
/// The two orders of rounding differ by ~1e-6 here.
const TOLERANCE: f32 = 1e-4;

fn fixture_lora() -> PathBuf {
    fixtures().join("models/sd15-tiny-lora.safetensors")
}

fn files_with(loras: &[(&Path, f64)]) -> ModelFiles {
    ModelFiles {
        loras: loras
            .iter()
            .map(|(path, weight)| LoraChoice {
                path: path.to_path_buf(),
                weight: *weight,
            })
            .collect(),
        ..model_files("sd15-tiny")
    }
}

fn load_with(loras: &[(&Path, f64)]) -> unitune::engine::Result<StableDiffusion> {
    StableDiffusion::load(&files_with(loras), &Device::Cpu, DType::F32)
}

fn unet_out(model: &StableDiffusion, reference: &Reference) -> Tensor {
    model
        .unet
        .forward(
            &reference.f32("unet_in_sample"),
            &reference.f32("unet_in_timesteps"),
            &reference.f32("unet_in_encoder_hidden_states"),
        )
        .unwrap()
}

fn text_out(model: &StableDiffusion, reference: &Reference) -> Tensor {
    let ids = reference.tensor("te_in_ids").to_dtype(DType::U32).unwrap();
    model.text_encoders().unwrap().first.forward(&ids).unwrap()
}

#[test]
fn an_applied_lora_reproduces_diffusers_load_lora_weights() {
    let reference = Reference::load("lora");
    let lora = fixture_lora();
    for (weight, suffix) in [(0.0, "base"), (1.0, "lora"), (0.5, "lora_half")] {
        let model = load_with(&[(&lora, weight)]).unwrap();
        assert_close(
            &format!("UNet at LoRA weight {weight}"),
            &unet_out(&model, &reference),
            &reference.f32(&format!("unet_out_{suffix}")),
            TOLERANCE,
        );
        assert_close(
            &format!("text encoder at LoRA weight {weight}"),
            &text_out(&model, &reference),
            &reference.f32(&format!("te_out_{suffix}")),
            TOLERANCE,
        );
    }
    // The LoRA changes the outputs by far more than the tolerance (so the test can fail).
    let change = max_abs_diff(
        &reference.f32("unet_out_lora"),
        &reference.f32("unet_out_base"),
    );
    assert!(change > 100.0 * TOLERANCE, "{change}");
}

fn sdxl_lora() -> PathBuf {
    fixtures().join("models/sdxl-tiny-lora.safetensors")
}

fn load_sdxl_with(loras: &[(&Path, f64)]) -> unitune::engine::Result<StableDiffusion> {
    let files = ModelFiles {
        loras: files_with(loras).loras,
        ..model_files("sdxl-tiny")
    };
    StableDiffusion::load(&files, &Device::Cpu, DType::F32)
}

/// The UNet's output, with SDXL's added conditioning, on the fixture's inputs.
fn sdxl_unet_out(model: &StableDiffusion, reference: &Reference) -> Tensor {
    let text_time = TextTime {
        pooled: reference.f32("unet_in_text_embeds"),
        size_numbers: reference.f32("unet_in_time_ids"),
    };
    model
        .unet
        .forward_with(
            &reference.f32("unet_in_sample"),
            &reference.f32("unet_in_timesteps"),
            &reference.f32("unet_in_encoder_hidden_states"),
            Some(&text_time),
        )
        .unwrap()
}

/// The UNet's output and both text encoders' (penultimate states, pooled projection) on the
/// fixture's inputs, each named as the reference names it (without the `_base` / `_lora`
/// suffix).
fn sdxl_outputs(model: &StableDiffusion, reference: &Reference) -> Vec<(&'static str, Tensor)> {
    let unet = sdxl_unet_out(model, reference);
    let ids = reference.tensor("te_in_ids").to_dtype(DType::U32).unwrap();
    let encoders = model.text_encoders().unwrap();
    let first = encoders.first.encode_xl(&ids).unwrap();
    let second = encoders
        .second
        .as_ref()
        .expect("SDXL")
        .encode_xl(&ids)
        .unwrap();
    vec![
        ("unet_out", unet),
        ("te1_out_penultimate", first.penultimate),
        ("te2_out_penultimate", second.penultimate),
        ("te2_out_pooled", second.pooled.expect("projected")),
    ]
}

/// An SDXL LoRA in kohya's naming (the UNet's SGM paths, `lora_te1_`, `lora_te2_`), written
/// by tests/fixtures/make_sdxl_lora_fixtures.py, changes the UNet and both text encoders as
/// diffusers' `StableDiffusionXLPipeline.load_lora_weights` does; with the UNet's layers
/// under diffusers paths instead (as some tools write them) it is the same LoRA.
#[test]
fn an_sdxl_lora_reproduces_diffusers_load_lora_weights_in_the_unet_and_both_encoders() {
    let reference = Reference::load("sdxl-lora");
    for (weight, suffix) in [(0.0, "base"), (1.0, "lora")] {
        let model = load_sdxl_with(&[(&sdxl_lora(), weight)]).unwrap();
        // As loaded, then released (as while a fine-tune trains) and built again with the LoRA.
        for when in ["as loaded", "encoders built again"] {
            if when != "as loaded" {
                model.release_text_encoders();
                assert!(!model.text_encoders_resident());
            }
            for (name, output) in sdxl_outputs(&model, &reference) {
                assert_close(
                    &format!("{name} at LoRA weight {weight}, {when}"),
                    &output,
                    &reference.f32(&format!("{name}_{suffix}")),
                    TOLERANCE,
                );
            }
        }
    }
    for name in ["unet_out", "te1_out_penultimate", "te2_out_pooled"] {
        let change = max_abs_diff(
            &reference.f32(&format!("{name}_lora")),
            &reference.f32(&format!("{name}_base")),
        );
        assert!(change > 100.0 * TOLERANCE, "{name}: {change}");
    }

    let (layers, metadata) = read_kohya_file(&sdxl_lora()).unwrap();
    let renamed: Vec<KohyaLayer> = layers
        .into_iter()
        .map(|mut layer| {
            for entry in reference.json["layers"].as_array().unwrap() {
                let kohya = |key: &str| {
                    let module = entry[key].as_str().unwrap().replace('.', "_");
                    format!("lora_{}_{module}", entry["component"].as_str().unwrap())
                };
                if layer.name == kohya("module") {
                    layer.name = kohya("diffusers_module");
                }
            }
            layer
        })
        .collect();
    assert!(renamed.iter().any(|l| l.name.contains("down_blocks_1")));
    let dir = tempfile::tempdir().unwrap();
    let diffusers_named = dir.path().join("diffusers-named.safetensors");
    write_kohya_file(&diffusers_named, &renamed, &metadata).unwrap();
    let model = load_sdxl_with(&[(&diffusers_named, 1.0)]).unwrap();
    assert_close(
        "UNet with diffusers-named layers",
        &sdxl_unet_out(&model, &reference),
        &reference.f32("unet_out_lora"),
        TOLERANCE,
    );
}

/// A LoRA for the other family is refused in one sentence saying so, whichever way round.
#[test]
fn a_lora_for_the_other_family_is_refused_saying_which_it_is_for() {
    let on_sdxl = load_sdxl_with(&[(&fixture_lora(), 1.0)])
        .err()
        .expect("refused");
    assert!(
        on_sdxl
            .to_string()
            .contains("the LoRA is for SD 1.x/2.x and this model is SDXL"),
        "{on_sdxl}"
    );
    let on_sd15 = load_with(&[(&sdxl_lora(), 1.0)]).err().expect("refused");
    assert!(
        on_sd15
            .to_string()
            .contains("the LoRA is for SDXL and this model is SD 1.x/2.x"),
        "{on_sd15}"
    );
}

/// A lora-mode fine-tune of SDXL, exported under kohya's SDXL names and applied to the base
/// model, reproduces the fine-tuned UNet.
#[test]
fn an_exported_sdxl_lora_fine_tune_applied_to_the_base_reproduces_the_fine_tuned_unet() {
    let reference = Reference::load("sdxl-lora");
    let mut model = load_sdxl_with(&[]).unwrap();
    let base_out = sdxl_unet_out(&model, &reference);
    let settings = tiny_settings(TrainMode::Lora { rank: 2 });
    let policy = CachePolicy {
        cache: None,
        model_identity: "test",
    };
    let tuned = tune_photo(&mut model, &photo(), &settings, &policy, None, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    tuned.select(2).unwrap();
    let tuned_out = sdxl_unet_out(&model, &reference);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("photo.safetensors");
    let info = LoraExportInfo {
        output_name: "photo",
        base_model_name: "sdxl-tiny",
        base_model_fingerprint: "abc",
        recipe_json: "{}",
        token: "beikkpic",
        steps: 2,
        created_unix_secs: 0,
    };
    export_tuned(&tuned, &model.config, &path, &info).unwrap();
    let (layers, metadata) = read_kohya_file(&path).unwrap();
    assert!(
        layers
            .iter()
            .any(|l| l.name == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        "{:?}",
        layers.iter().map(|l| &l.name).collect::<Vec<_>>()
    );
    assert!(!layers.iter().any(|l| l.name.contains("down_blocks")));
    assert_eq!(metadata["ss_base_model_version"], "sdxl_base_v1-0");
    assert_eq!(
        metadata["modelspec.architecture"],
        "stable-diffusion-xl-v1-base/lora"
    );
    let applied = load_sdxl_with(&[(&path, 1.0)]).unwrap();
    let applied_out = sdxl_unet_out(&applied, &reference);
    assert!(
        max_abs_diff(&tuned_out, &base_out) > 1e-3,
        "the fine-tune changed nothing"
    );
    assert_close("base + exported SDXL LoRA", &applied_out, &tuned_out, 1e-5);
}

#[test]
fn the_weight_scales_the_change_linearly() {
    let reference = Reference::load("lora");
    let lora = fixture_lora();
    let weight_of =
        |name: &str, w: f64| load_with(&[(&lora, w)]).unwrap().unet_weights()[name].clone();
    let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let base = weight_of(name, 0.0);
    let one = (weight_of(name, 1.0) - &base).unwrap();
    let minus_two = (weight_of(name, -2.0) - &base).unwrap();
    assert!(max_abs_diff(&(one * -2.0).unwrap(), &minus_two) < 1e-6);
    // Two files apply in turn: the same one twice at 0.5 is once at 1.
    let twice = load_with(&[(&lora, 0.5), (&lora, 0.5)]).unwrap();
    assert_close(
        "the LoRA twice at 0.5",
        &unet_out(&twice, &reference),
        &reference.f32("unet_out_lora"),
        TOLERANCE,
    );
}

#[test]
fn exporting_the_fixtures_factors_rewrites_the_file_bit_for_bit() {
    let (layers, _) = read_kohya_file(&fixture_lora()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("again.safetensors");
    write_kohya_file(&path, &layers, &HashMap::new()).unwrap();
    let expected = candle_core::safetensors::load(fixture_lora(), &Device::Cpu).unwrap();
    let written = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut names: Vec<_> = written.keys().cloned().collect();
    names.sort();
    let mut expected_names: Vec<_> = expected.keys().cloned().collect();
    expected_names.sort();
    assert_eq!(names, expected_names);
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    for name in names {
        let (a, b) = (&written[&name], &expected[&name]);
        assert_eq!((a.dtype(), a.dims()), (b.dtype(), b.dims()), "{name}");
        assert_eq!(bits(a), bits(b), "{name}");
    }
}

fn tiny_settings(mode: TrainMode) -> TuneSettings {
    TuneSettings {
        mode,
        optimizer: OptimizerSettings {
            learning_rate: 1e-2,
            ..OptimizerSettings::default()
        },
        snapshot_steps: vec![2, 4],
        batch_size: 2,
        micro_batch_size: 2,
        seed: 3,
        ..TuneSettings::default()
    }
}

fn photo() -> image::RgbImage {
    let full = image::open(fixtures().join("photos/chelsea.png"))
        .unwrap()
        .to_rgb8();
    image::imageops::resize(&full, 16, 16, image::imageops::FilterType::Triangle)
}

#[test]
fn an_exported_lora_fine_tune_applied_to_the_base_reproduces_the_fine_tuned_unet() {
    let reference = Reference::load("lora");
    let mut model = load_with(&[]).unwrap();
    let base_out = unet_out(&model, &reference);
    let settings = tiny_settings(TrainMode::Lora { rank: 2 });
    let policy = CachePolicy {
        cache: None,
        model_identity: "test",
    };
    let tuned = tune_photo(&mut model, &photo(), &settings, &policy, None, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    tuned.select(2).unwrap();
    let tuned_out = unet_out(&model, &reference);
    assert!(
        max_abs_diff(&tuned_out, &base_out) > 1e-3,
        "the fine-tune changed nothing"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("photo.safetensors");
    let info = LoraExportInfo {
        output_name: "photo",
        base_model_name: "sd15-tiny",
        base_model_fingerprint: "abc",
        recipe_json: "{}",
        token: "beikkpic",
        steps: 2,
        created_unix_secs: 0,
    };
    export_tuned(&tuned, &model.config, &path, &info).unwrap();
    let applied = load_with(&[(&path, 1.0)]).unwrap();
    assert_close(
        "base + exported LoRA vs the fine-tuned snapshot",
        &unet_out(&applied, &reference),
        &tuned_out,
        1e-5,
    );

    // What tools display.
    let (layers, metadata) = read_kohya_file(&path).unwrap();
    let projections = model
        .unet_weights()
        .keys()
        .filter(|n| TrainMode::Lora { rank: 2 }.adapts(n))
        .count();
    assert_eq!(
        layers.len(),
        projections,
        "every attention projection of the tiny UNet"
    );
    assert!(layers.iter().all(|l| l.alpha == Some(2.0) && l.rank() == 2));
    for (key, value) in [
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "2"),
        ("ss_network_alpha", "2"),
        ("ss_base_model_version", "sd_v1"),
        ("ss_output_name", "photo"),
        ("modelspec.trigger_phrase", "beikkpic"),
        ("unitune.base_model_fingerprint", "abc"),
        ("unitune.steps", "2"),
    ] {
        assert_eq!(metadata.get(key).map(String::as_str), Some(value), "{key}");
    }

    // Only lora mode exports.
    let full = tiny_settings(TrainMode::CrossKv);
    let other = tune_photo(
        &mut model,
        &photo(),
        &TuneSettings {
            snapshot_steps: vec![1],
            ..full
        },
        &policy,
        None,
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let refused = export_tuned(
        &other,
        &model.config,
        &dir.path().join("no.safetensors"),
        &LoraExportInfo { steps: 1, ..info },
    )
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("only a fine-tune in lora mode"),
        "{refused}"
    );
    assert!(!dir.path().join("no.safetensors").exists());
}

#[test]
fn the_untrained_values_read_back_for_fine_tuning_carry_the_lora() {
    let reference = Reference::load("lora");
    let lora = fixture_lora();
    let mut model = load_with(&[(&lora, 1.0)]).unwrap();
    let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight".to_string();
    let read = model
        .read_unet_weights(std::slice::from_ref(&name))
        .unwrap();
    assert_eq!(
        max_abs_diff(&read[&name], &model.unet_weights()[&name]),
        0.0
    );
    // A fine-tune's snapshot 0 (the untrained weights, read back from the model's file) is
    // the model with its LoRA, not the file's bare weights.
    let adapter = Adapter::attach(
        &mut model,
        TrainMode::Attention,
        &mut NoiseSource::from_seed(1),
    )
    .unwrap();
    let zeros = adapter
        .vars()
        .iter()
        .map(|v| v.as_tensor().zeros_like().unwrap())
        .collect();
    adapter.load(&Snapshot::in_memory(1, zeros)).unwrap();
    adapter.load(adapter.base()).unwrap();
    assert_close(
        "snapshot 0 with the LoRA",
        &unet_out(&model, &reference),
        &reference.f32("unet_out_lora"),
        TOLERANCE,
    );
}

#[test]
fn the_model_fingerprint_follows_each_lora_and_its_weight() {
    let lora = fixture_lora();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.safetensors");
    let (mut layers, _) = read_kohya_file(&lora).unwrap();
    layers[0].alpha = Some(1.0);
    write_kohya_file(&other, &layers, &HashMap::new()).unwrap();
    let print = |loras: &[(&Path, f64)]| files_with(loras).fingerprint(None).unwrap();
    let plain = print(&[]);
    assert_eq!(plain, model_files("sd15-tiny").fingerprint(None).unwrap());
    let all = [
        plain,
        print(&[(&lora, 1.0)]),
        print(&[(&lora, 0.8)]),
        print(&[(&other, 1.0)]),
        print(&[(&lora, 1.0), (&other, 1.0)]),
        print(&[(&other, 1.0), (&lora, 1.0)]),
    ];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a, b);
        }
    }
}

/// Writes a LoRA file of `tensors` (f32) to `dir`.
fn write_lora(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>)]) -> PathBuf {
    let path = dir.join(name);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(key, shape)| {
            (
                key.to_string(),
                Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

/// A file with one rank-4 layer `name` for a 32-wide weight.
fn rank_4_layer(dir: &Path, file: &str, name: &str) -> PathBuf {
    write_lora(
        dir,
        file,
        &[
            (&format!("{name}.lora_down.weight"), vec![4, 32]),
            (&format!("{name}.lora_up.weight"), vec![32, 4]),
        ],
    )
}

/// The refusals, each one sentence naming what is wrong (the CLI's exit code 2 is checked
/// in tests/cli_unitune.rs).
pub fn bad_loras(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let pickle = dir.join("style.ckpt");
    std::fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
    let not_safetensors = dir.join("text.safetensors");
    std::fs::write(&not_safetensors, b"hello").unwrap();
    vec![
        (
            write_lora(
                dir,
                "wide.safetensors",
                &[
                    (&format!("{q}.lora_down.weight"), vec![4, 768]),
                    (&format!("{q}.lora_up.weight"), vec![320, 4]),
                ],
            ),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight, which has shape [32, 32]",
        ),
        (pickle, "is a pickle file"),
        (not_safetensors, "is not a safetensors file"),
        (
            write_lora(
                dir,
                "loha.safetensors",
                &[(&format!("{q}.hada_w1_a"), vec![4, 32])],
            ),
            "hada_w1_a",
        ),
        (
            rank_4_layer(dir, "ldm.safetensors", "lora_unet_input_blocks_1_1_proj_in"),
            "`lora_unet_input_blocks_1_1_proj_in`, which this model does not have",
        ),
        (
            rank_4_layer(
                dir,
                "sdxl.safetensors",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            ),
            "the LoRA is for SDXL and this model is SD 1.x/2.x",
        ),
        (
            write_lora(
                dir,
                "half.safetensors",
                &[(&format!("{q}.lora_down.weight"), vec![4, 32])],
            ),
            "lacks",
        ),
    ]
}

#[test]
fn bad_lora_files_are_refused_in_one_sentence_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    for (path, expected) in bad_loras(dir.path()) {
        let error = load_with(&[(&path, 1.0)]).err().expect("refused");
        let text = error.to_string();
        assert!(error.is_invalid_input(), "{text}");
        assert!(text.contains(expected), "{}: {text}", path.display());
        assert!(!text.contains('\n'), "{text}");
    }
}

#[test]
fn a_lora_export_to_a_read_only_folder_fails_in_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let layers = vec![KohyaLayer {
        name: "lora_unet_x".into(),
        down: Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap(),
        up: Tensor::ones((2, 1), DType::F32, &Device::Cpu).unwrap(),
        alpha: Some(1.0),
    }];
    let missing = dir.path().join("no-such-folder/out.safetensors");
    let text = write_kohya_file(&missing, &layers, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        text.starts_with("the LoRA was not saved to") && !text.contains('\n'),
        "{text}"
    );
}
