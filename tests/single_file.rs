//! Single-file checkpoints (the original LDM layout) against the same weights as diffusers
//! folders: tests/fixtures/make_single_file_fixtures.py wrote both with diffusers' own
//! conversion and checked them with `from_single_file`. Damaged files are made here, from
//! the good ones.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{Run, copy_dir, model_dir, unitune};
use safetensors::tensor::TensorView;
use unitune::engine::StableDiffusion;
use unitune::engine::config::{PredictionType, TextEncoderConfig, UnetConfig, VaeConfig};
use unitune::engine::model::LoadOptions;
use unitune::engine::noise::NoiseSource;
use unitune::engine::single_file::{Checkpoint, Family, UnetVariant};
use unitune::model_files::{ModelFilesError, ModelLayout, VaeFiles, locate_in_folder, locate_vae};

fn single(name: &str) -> PathBuf {
    model_dir(&format!("{name}.safetensors"))
}

fn load(path: &Path) -> StableDiffusion {
    let files = locate_in_folder(path).expect("fixture located");
    StableDiffusion::load(&files, &Device::Cpu, DType::F32).expect("fixture loads")
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// What to do with one tensor when rewriting a file.
#[derive(Clone)]
enum Edit {
    Keep,
    Drop,
    /// Zeros of this shape instead.
    Reshape(Vec<usize>),
    /// The same tensor under another name.
    Rename(String),
}

/// Copies a safetensors file, editing tensors and setting the metadata.
fn rewrite(
    src: &Path,
    dst: &Path,
    metadata: Option<HashMap<String, String>>,
    edit: impl Fn(&str) -> Edit,
) {
    let bytes = std::fs::read(src).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned = Vec::new();
    for (mut name, view) in file.tensors() {
        let (shape, data) = match edit(&name) {
            Edit::Keep => (view.shape().to_vec(), view.data().to_vec()),
            Edit::Rename(new) => {
                name = new;
                (view.shape().to_vec(), view.data().to_vec())
            }
            Edit::Drop => continue,
            Edit::Reshape(shape) => {
                let n: usize = shape.iter().product::<usize>() * (view.dtype().bitsize() / 8);
                (shape, vec![0u8; n])
            }
        };
        owned.push((name, view.dtype(), shape, data));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, dst).unwrap();
}

/// Each single file with the diffusers folder holding the same weights.
const CHECKPOINTS: [(&str, &str); 3] = [
    ("sd15-ckpt-tiny", "sd15-ckpt-tiny"),
    ("sd2-ckpt-tiny", "sd2-ckpt-tiny"),
    ("sdxl-ckpt-tiny", "sdxl-tiny"),
];

#[test]
fn the_architecture_read_from_the_tensors_is_the_folders_config() {
    for ((name, folder), (family, pad)) in CHECKPOINTS.into_iter().zip([
        (Family::Sd1, "<|endoftext|>"),
        (Family::Sd2, "!"),
        (Family::Sdxl, "<|endoftext|>"),
    ]) {
        let folder = model_dir(folder);
        let checkpoint = Checkpoint::open(&single(name), None).expect("checkpoint opens");
        assert_eq!(checkpoint.family, family, "{name}");
        assert_eq!(checkpoint.family.pad_token(), pad);
        assert_eq!(checkpoint.variant, UnetVariant::TextToImage);
        let mut unet = UnetConfig::load(&folder.join("unet/config.json")).unwrap();
        let mut vae = VaeConfig::load(&folder.join("vae/config.json")).unwrap();
        if family == Family::Sdxl {
            // The native size is no tensor's shape: a file means SDXL's 1024 px, where the
            // tiny folder says 32 px to keep the tests that use its default size fast.
            assert_eq!(checkpoint.unet.sample_size, Some(128));
            unet.sample_size = Some(128);
            vae.sample_size = checkpoint.vae.sample_size;
        }
        assert_eq!(checkpoint.unet, unet, "{name} UNet");
        assert_eq!(checkpoint.vae, vae, "{name} VAE");
        let text = TextEncoderConfig::load(&folder.join("text_encoder/config.json")).unwrap();
        assert_eq!(checkpoint.text_encoder, text, "{name} text encoder");
        let second = checkpoint.second_text_encoder.as_ref();
        assert_eq!(second.is_some(), family == Family::Sdxl, "{name}");
        if let Some(second) = second {
            let config = folder.join("text_encoder_2/config.json");
            assert_eq!(second.config, TextEncoderConfig::load(&config).unwrap());
            assert_eq!(second.projection_dim, 32);
        }
    }
}

#[test]
fn loading_the_single_file_gives_the_folders_weights_prompts_and_images() {
    for (name, folder) in CHECKPOINTS {
        let folder = load(&model_dir(folder));
        let file = load(&single(name));
        // Every UNet weight, by the same diffusers name, bit for bit.
        let (a, b) = (folder.unet_weights(), file.unet_weights());
        assert_eq!(a.len(), b.len(), "{name}: UNet tensor count");
        for (key, value) in a {
            assert!(same(value, &b[key]), "{name}: UNet {key} differs");
        }
        // Re-reading by name (what fine-tuning does) gives the same values too.
        let names: Vec<String> = a.keys().take(20).cloned().collect();
        let reread = file.read_unet_weights(&names).unwrap();
        for key in &names {
            assert!(same(&reread[key], &a[key]), "{name}: re-read {key} differs");
        }
        // Tokenizer and text encoder (SD 2.x: OpenCLIP's fused projections split).
        for prompt in ["a photo of a cat", "wow!! a HOUSE, 123"] {
            let (p, q) = (
                folder.encode_prompt(prompt).unwrap(),
                file.encode_prompt(prompt).unwrap(),
            );
            assert_eq!(p.tokens, q.tokens, "{name}: tokens of {prompt:?}");
            assert!(same(&p.embedding, &q.embedding), "{name}: embedding");
            // SDXL's pooled text, from the second encoder's transposed projection.
            match (&p.pooled, &q.pooled) {
                (Some(p), Some(q)) => assert!(same(p, q), "{name}: pooled"),
                (None, None) => {}
                _ => panic!("{name}: only one has a pooled embedding"),
            }
        }
        // An empty baseline is zeros for SDXL, the encoding of "" otherwise, alike.
        let (p, q) = (
            folder.encode_prompt("").unwrap(),
            file.encode_prompt("").unwrap(),
        );
        assert!(same(&p.embedding, &q.embedding), "{name}: empty prompt");
        // The UNet's prediction with the whole conditioning (SDXL: the size numbers too).
        let latents = NoiseSource::from_seed(4)
            .normal((1, 4, 8, 8), &Device::Cpu)
            .unwrap();
        let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
        let predict = |model: &StableDiffusion| {
            let encoded = model.encode_prompt("a photo of a cat").unwrap();
            let conditioning = model.condition(&encoded, (8, 8)).unwrap();
            conditioning.predict(&model.unet, &latents, &t).unwrap()
        };
        assert!(same(&predict(&folder), &predict(&file)), "{name}: UNet");
        assert_eq!(folder.info().family, file.info().family, "{name}");
        // VAE both ways.
        let latents = NoiseSource::from_seed(5)
            .normal((1, 4, 8, 8), &Device::Cpu)
            .unwrap();
        assert_eq!(
            folder.decode_latents(&latents).unwrap(),
            file.decode_latents(&latents).unwrap(),
            "{name}: decoded image"
        );
        let photo = folder.decode_latents(&latents).unwrap();
        assert!(same(
            &folder
                .encode_image(&photo, &mut NoiseSource::from_seed(1))
                .unwrap(),
            &file
                .encode_image(&photo, &mut NoiseSource::from_seed(1))
                .unwrap()
        ));
        assert_eq!(
            folder.config.scheduler.prediction_type,
            file.config.scheduler.prediction_type
        );
    }
}

#[test]
fn in_painting_and_instruct_pix2pix_unets_are_told_by_their_input_channels() {
    let dir = tempfile::tempdir().unwrap();
    for (channels, variant) in [
        (9, UnetVariant::Inpainting),
        (8, UnetVariant::InstructPix2Pix),
    ] {
        let path = dir.path().join(format!("in{channels}.safetensors"));
        rewrite(&single("sd15-ckpt-tiny"), &path, None, |name| {
            if name == "model.diffusion_model.input_blocks.0.0.weight" {
                Edit::Reshape(vec![32, channels, 3, 3])
            } else {
                Edit::Keep
            }
        });
        let checkpoint = Checkpoint::open(&path, None).expect("opens");
        assert_eq!(checkpoint.variant, variant);
        assert_eq!(checkpoint.unet.in_channels, channels);
        let model = load(&path);
        assert_eq!(model.info().variant, variant);
        assert!(model.info().describe().contains(&variant.to_string()));
    }
}

#[test]
fn the_prediction_type_comes_from_the_flag_then_the_metadata_then_the_family() {
    let sd2 = single("sd2-ckpt-tiny");
    let default = Checkpoint::open(&sd2, None).unwrap();
    assert_eq!(
        default.prediction.prediction_type,
        PredictionType::VPrediction
    );
    assert!(default.prediction.reason.contains("SD 2.x default"));
    assert_eq!(default.unet.sample_size, Some(96), "768 px");

    let dir = tempfile::tempdir().unwrap();
    for (key, value, expected) in [
        (
            "modelspec.prediction_type",
            "epsilon",
            PredictionType::Epsilon,
        ),
        ("ss_v_parameterization", "False", PredictionType::Epsilon),
    ] {
        let path = dir.path().join("meta.safetensors");
        let metadata = HashMap::from([(key.to_owned(), value.to_owned())]);
        rewrite(&sd2, &path, Some(metadata), |_| Edit::Keep);
        let checkpoint = Checkpoint::open(&path, None).unwrap();
        assert_eq!(checkpoint.prediction.prediction_type, expected, "{key}");
        assert!(checkpoint.prediction.reason.contains(key), "{key}");
        assert_eq!(checkpoint.unet.sample_size, Some(64), "512 px base model");
        // The flag wins over the metadata.
        let flagged = Checkpoint::open(&path, Some(PredictionType::VPrediction)).unwrap();
        assert_eq!(
            flagged.prediction.prediction_type,
            PredictionType::VPrediction
        );
        assert_eq!(flagged.prediction.reason, "--prediction-type");
    }
    // SD 1.x defaults to epsilon; v-prediction SD 1.x files say so in their metadata.
    let sd15 = single("sd15-ckpt-tiny");
    let plain = Checkpoint::open(&sd15, None).unwrap();
    assert_eq!(plain.prediction.prediction_type, PredictionType::Epsilon);
    let path = dir.path().join("v.safetensors");
    let metadata = HashMap::from([("modelspec.prediction_type".to_owned(), "v".to_owned())]);
    rewrite(&sd15, &path, Some(metadata), |_| Edit::Keep);
    let model = load(&path);
    assert_eq!(
        model.config.scheduler.prediction_type,
        PredictionType::VPrediction
    );
    // The flag also overrides a folder's scheduler config.
    let files = locate_in_folder(&model_dir("sd15-ckpt-tiny")).unwrap();
    let options = LoadOptions {
        prediction_type: Some(PredictionType::VPrediction),
    };
    let model = StableDiffusion::load_with(&files, &Device::Cpu, DType::F32, &options).unwrap();
    assert_eq!(
        model.config.scheduler.prediction_type,
        PredictionType::VPrediction
    );
}

/// A VAE file in LDM names without prefix, as `vae-ft-mse-840000-ema-pruned.safetensors`.
/// The VAE of the single file `checkpoint`, alone in LDM names, as VAE files are shared.
fn ldm_vae_file(dir: &Path, checkpoint: &str) -> PathBuf {
    let path = dir.join(format!("{checkpoint}-vae.safetensors"));
    let bytes = std::fs::read(single(checkpoint)).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> = file
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            name.strip_prefix("first_stage_model.")
                .map(|rest| (rest.to_owned(), view))
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn a_replacement_vae_decodes_like_the_folder_whose_vae_was_replaced() {
    let dir = tempfile::tempdir().unwrap();
    // The reference: sd15-ckpt-tiny's folder with sd2-ckpt-tiny's vae/.
    let swapped = dir.path().join("swapped");
    copy_dir(&model_dir("sd15-ckpt-tiny"), &swapped);
    std::fs::remove_dir_all(swapped.join("vae")).unwrap();
    copy_dir(&model_dir("sd2-ckpt-tiny/vae"), &swapped.join("vae"));
    let reference = load(&swapped);
    let latents = NoiseSource::from_seed(9)
        .normal((1, 4, 8, 8), &Device::Cpu)
        .unwrap();
    let expected = reference.decode_latents(&latents).unwrap();
    let own = load(&single("sd15-ckpt-tiny"))
        .decode_latents(&latents)
        .unwrap();
    assert_ne!(own, expected, "the two fixtures' VAEs must differ");

    let sd2_vae = model_dir("sd2-ckpt-tiny/vae");
    for vae in [
        ldm_vae_file(dir.path(), "sd2-ckpt-tiny"),
        single("sd2-ckpt-tiny"),
        sd2_vae.join("diffusion_pytorch_model.fp16.safetensors"),
        sd2_vae.clone(),
        model_dir("sd2-ckpt-tiny"),
    ] {
        for model in [single("sd15-ckpt-tiny"), model_dir("sd15-ckpt-tiny")] {
            let mut files = locate_in_folder(&model).unwrap();
            files.vae_replacement = Some(locate_vae(&vae).expect("VAE located"));
            let loaded =
                StableDiffusion::load(&files, &Device::Cpu, DType::F32).unwrap_or_else(|e| {
                    panic!("{} with --vae {}: {e}", model.display(), vae.display())
                });
            assert_eq!(
                loaded.decode_latents(&latents).unwrap(),
                expected,
                "{} with --vae {}",
                model.display(),
                vae.display()
            );
        }
    }
    assert!(matches!(
        locate_vae(&sd2_vae).unwrap(),
        VaeFiles::Folder { .. }
    ));
}

/// An SDXL VAE file given with `--vae` is read with SDXL's conventions (scaling 0.13025, not
/// SD's 0.18215), for a folder and for a single file alike.
#[test]
fn an_sdxl_vae_file_replaces_an_sdxl_models_vae_with_sdxls_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let vae = ldm_vae_file(dir.path(), "sdxl-ckpt-tiny");
    let latents = NoiseSource::from_seed(9)
        .normal((1, 4, 8, 8), &Device::Cpu)
        .unwrap();
    let expected = load(&model_dir("sdxl-tiny"))
        .decode_latents(&latents)
        .unwrap();
    for model in [model_dir("sdxl-tiny"), single("sdxl-ckpt-tiny")] {
        let mut files = locate_in_folder(&model).unwrap();
        files.vae_replacement = Some(locate_vae(&vae).expect("VAE located"));
        let loaded = StableDiffusion::load(&files, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(
            loaded.config.vae.scaling_factor,
            0.13025,
            "{}",
            model.display()
        );
        assert_eq!(
            loaded.decode_latents(&latents).unwrap(),
            expected,
            "{}",
            model.display()
        );
    }
}

#[test]
fn the_fine_tune_cache_key_follows_the_checkpoint_and_the_vae() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("model.safetensors");
    std::fs::copy(single("sd15-ckpt-tiny"), &copy).unwrap();
    let files = locate_in_folder(&copy).unwrap();
    assert!(matches!(files.layout, ModelLayout::SingleFile { .. }));
    let key = files.fingerprint(None).unwrap();
    let original = locate_in_folder(&single("sd15-ckpt-tiny")).unwrap();
    assert_eq!(
        original.fingerprint(None).unwrap(),
        key,
        "a copy is the same model"
    );

    let mut with_vae = files.clone();
    with_vae.vae_replacement = Some(locate_vae(&model_dir("sd2-ckpt-tiny/vae")).unwrap());
    assert_ne!(with_vae.fingerprint(None).unwrap(), key);

    rewrite(&single("sd15-ckpt-tiny"), &copy, None, |name| {
        if name == "model.diffusion_model.out.2.bias" {
            Edit::Reshape(vec![4])
        } else {
            Edit::Keep
        }
    });
    assert_ne!(files.fingerprint(None).unwrap(), key, "changed weights");
}

#[test]
fn pickle_files_and_folders_of_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pickle = dir.path().join("v1-5-pruned.ckpt");
    std::fs::write(&pickle, b"not really weights").unwrap();
    let err = locate_in_folder(&pickle).expect_err("pickle");
    assert!(
        matches!(err, ModelFilesError::PickleCheckpoint { .. }),
        "{err:?}"
    );
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("pickle"));
    let err = locate_vae(&pickle).expect_err("pickle VAE");
    assert!(
        matches!(err, ModelFilesError::PickleCheckpoint { .. }),
        "{err:?}"
    );

    std::fs::copy(single("sd15-ckpt-tiny"), dir.path().join("m.safetensors")).unwrap();
    let err = locate_in_folder(dir.path()).expect_err("folder of checkpoints");
    assert!(
        matches!(err, ModelFilesError::CheckpointInFolder { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("m.safetensors"));
}

fn generate(model: &Path, extra: &[&str], out: &str, home: &Path) -> Run {
    let model = model.display().to_string();
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "-p",
        "a photo of a cat",
        "--size",
        "64x64",
        "--seed",
        "3",
        "--sampling-steps",
        "3",
        "--device",
        "cpu",
        "-o",
        out,
    ];
    args.extend_from_slice(extra);
    unitune(&args, home)
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

#[test]
fn damaged_checkpoints_exit_with_2_and_one_line_naming_the_problem() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let to_q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight";
    let ff = "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight";
    let in_proj = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight";
    let xl_in_proj = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight";
    let label_emb = "model.diffusion_model.label_emb.0.0.weight";
    // (model, damaged file, tensor, what is done to it, what the error line must name)
    let cases: [(&str, &str, &str, Edit, &[&str]); 5] = [
        (
            "sd15-ckpt-tiny",
            "missing.safetensors",
            to_q,
            Edit::Drop,
            &[to_q, "missing"],
        ),
        (
            "sd15-ckpt-tiny",
            "shape.safetensors",
            ff,
            Edit::Reshape(vec![64, 7]),
            &[ff, "[64, 7]", "[64, 256]"],
        ),
        (
            "sd2-ckpt-tiny",
            "fused.safetensors",
            in_proj,
            Edit::Reshape(vec![47, 16]),
            &[in_proj, "[47, 16]", "[48, 16]"],
        ),
        (
            "sdxl-ckpt-tiny",
            "xl-missing.safetensors",
            xl_in_proj,
            Edit::Drop,
            &[xl_in_proj, "missing"],
        ),
        (
            "sdxl-ckpt-tiny",
            "xl-label.safetensors",
            label_emb,
            Edit::Reshape(vec![128, 70]),
            &[label_emb, "70 inputs", "six size"],
        ),
    ];
    for (name, file, target, edit, needles) in cases {
        let path = h.join(file);
        rewrite(&single(name), &path, None, |n| {
            if n == target {
                edit.clone()
            } else {
                Edit::Keep
            }
        });
        let run = generate(&path, &[], "out.png", h);
        assert_eq!(run.code, 2, "{file}: {}", run.stderr);
        let errors: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{}", run.stderr);
        for needle in needles {
            assert!(
                errors[0].contains(needle),
                "{file}: {needle} not in {}",
                errors[0]
            );
        }
    }
    let pickle = h.join("model.ckpt");
    std::fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
    let run = generate(&pickle, &[], "out.png", h);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap();
    assert!(
        line.contains("model.ckpt") && line.contains("pickle"),
        "{line}"
    );
}

#[test]
fn the_cli_generates_the_same_image_from_the_file_as_from_the_folder() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    for name in ["sd15-ckpt-tiny", "sd2-ckpt-tiny"] {
        let folder = generate(&model_dir(name), &[], "folder.png", h);
        assert_eq!(folder.code, 0, "{}", folder.stderr);
        let file = generate(&single(name), &[], "file.png", h);
        assert_eq!(file.code, 0, "{}", file.stderr);
        assert_eq!(
            pixels(&h.join("folder.png")),
            pixels(&h.join("file.png")),
            "{name}"
        );
        std::fs::remove_file(h.join("folder.png")).unwrap();
        std::fs::remove_file(h.join("file.png")).unwrap();
    }
    // The line saying what was detected and which prediction type was chosen, and why.
    let run = generate(
        &single("sd2-ckpt-tiny"),
        &["--prediction-type", "epsilon"],
        "e.png",
        h,
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("model: SD 2.x") && l.contains("epsilon (--prediction-type)")),
        "{}",
        run.stderr
    );
    // --vae with the LDM file as the folder with that VAE.
    let dir = tempfile::tempdir().unwrap();
    let vae = ldm_vae_file(dir.path(), "sd2-ckpt-tiny")
        .display()
        .to_string();
    let swapped = dir.path().join("swapped");
    copy_dir(&model_dir("sd15-ckpt-tiny"), &swapped);
    std::fs::remove_dir_all(swapped.join("vae")).unwrap();
    copy_dir(&model_dir("sd2-ckpt-tiny/vae"), &swapped.join("vae"));
    assert_eq!(generate(&swapped, &[], "swapped.png", h).code, 0);
    let run = generate(&single("sd15-ckpt-tiny"), &["--vae", &vae], "vae.png", h);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(pixels(&h.join("swapped.png")), pixels(&h.join("vae.png")));
}

#[test]
fn a_fine_tuned_edit_from_the_file_matches_the_folders() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let photo = common::fixtures()
        .join("photos/chelsea.png")
        .display()
        .to_string();
    let mut outputs = Vec::new();
    for model in [model_dir("sd15-ckpt-tiny"), single("sd15-ckpt-tiny")] {
        let m = model.display().to_string();
        let out = h.join(format!("edit-{}.png", outputs.len()));
        let o = out.display().to_string();
        let run = unitune(
            &[
                "edit",
                &photo,
                "--prompt",
                "a cat wearing sunglasses",
                "--model",
                &m,
                "--tune-steps",
                "2",
                "--train",
                "cross-kv",
                "--snapshots",
                "1,2",
                "--t0",
                "0.9",
                "--seed",
                "3",
                "--sampling-steps",
                "3",
                "--size",
                "64x64",
                "--device",
                "cpu",
                "-o",
                &o,
            ],
            h,
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
        outputs.push(pixels(&out));
    }
    assert_eq!(outputs[0], outputs[1]);
}

#[test]
fn fine_tuning_reads_the_untrained_weights_back_through_the_name_map() {
    use unitune::engine::finetune::{Adapter, TrainMode};
    let mut folder = load(&model_dir("sd15-ckpt-tiny"));
    let mut file = load(&single("sd15-ckpt-tiny"));
    let mut noise = NoiseSource::from_seed(1);
    let a = Adapter::attach(&mut folder, TrainMode::Attention, &mut noise).unwrap();
    let b = Adapter::attach(&mut file, TrainMode::Attention, &mut noise).unwrap();
    assert_eq!(a.names(), b.names());
    // The base snapshot (the untrained values) is read from the model's own file.
    assert_eq!(b.base().file(), Some(single("sd15-ckpt-tiny").as_path()));
    let (ta, tb) = (a.base().tensors().unwrap(), b.base().tensors().unwrap());
    assert_eq!(ta.len(), tb.len());
    for ((name, x), y) in a.names().iter().zip(&ta).zip(&tb) {
        let (x, y) = (
            x.to_dtype(DType::F32).unwrap(),
            y.to_dtype(DType::F32).unwrap(),
        );
        assert!(same(&x, &y), "base {name} differs");
    }
}

/// SDXL's refiner (OpenCLIP as embedder 0, no CLIP) is told apart from the base model and
/// refused in one sentence, as is a base file missing one of its encoders.
#[test]
fn sdxl_files_without_both_text_encoders_are_refused_naming_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let refiner = dir.path().join("refiner.safetensors");
    rewrite(&single("sdxl-ckpt-tiny"), &refiner, None, |name| match name
        .strip_prefix("conditioner.embedders.1.")
    {
        Some(rest) => Edit::Rename(format!("conditioner.embedders.0.{rest}")),
        None if name.starts_with("conditioner.embedders.0.") => Edit::Drop,
        None => Edit::Keep,
    });
    let error = Checkpoint::open(&refiner, None).unwrap_err().to_string();
    assert!(error.contains("SDXL refiner"), "{error}");
    let no_open_clip = dir.path().join("no-open-clip.safetensors");
    rewrite(&single("sdxl-ckpt-tiny"), &no_open_clip, None, |name| {
        if name.starts_with("conditioner.embedders.1.") {
            Edit::Drop
        } else {
            Edit::Keep
        }
    });
    let error = Checkpoint::open(&no_open_clip, None)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("lacks a text encoder") && error.contains("embedders.1"),
        "{error}"
    );
}
