//! Targets for safetensors files: a model's weights loaded the way the engine loads them, and
//! the fine-tuning snapshots it writes and maps back.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use unitune::engine::StableDiffusion;
use unitune::engine::finetune::{Snapshot, write_safetensors};
use unitune::model_files::locate_in_folder;

use crate::configs::tokenizer_seed;
use crate::harness::{Depth, Target};
use crate::mutate;

/// The weights files of the model under test, by component; an input starts with one byte
/// choosing which of them it replaces, and the rest of it is that file.
const WEIGHTS: [&str; 3] = [
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
];

fn sd15() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd15-tiny")
}

/// A copy of the sd15-tiny fixture with the small tokenizer of the tokenizer target (the
/// real vocabulary takes longer to load than everything else together).
fn model_folder_with_small_tokenizer(dir: &Path) {
    for file in [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ]
    .iter()
    .chain(WEIGHTS.iter())
    {
        let to = dir.join(file);
        std::fs::create_dir_all(to.parent().expect("has a folder")).expect("folder");
        std::fs::copy(sd15().join(file), &to).expect("fixture copies");
    }
    let seed = tokenizer_seed();
    let tokenizer = dir.join("tokenizer");
    std::fs::create_dir_all(&tokenizer).expect("folder");
    let json = |v: &serde_json::Value| serde_json::to_vec(v).expect("serializes");
    std::fs::write(tokenizer.join("vocab.json"), json(&seed["vocab"])).expect("write");
    std::fs::write(
        tokenizer.join("merges.txt"),
        seed["merges"].as_str().expect("merges text"),
    )
    .expect("write");
    std::fs::write(
        tokenizer.join("special_tokens_map.json"),
        json(&seed["special_tokens_map"]),
    )
    .expect("write");
    std::fs::write(
        tokenizer.join("tokenizer_config.json"),
        json(&seed["tokenizer_config"]),
    )
    .expect("write");
}

/// The JSON files of a model folder; an input of the `model_folder` target starts with one
/// byte choosing which of them it replaces.
const CONFIGS: [&str; 7] = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
];

/// Loads the whole pipeline from `dir` and, when it loads, makes one small edit's worth of
/// calls: a prompt, the latent size of a photo, an encode, a UNet step, a scheduler step and
/// a decode. The depth says how far it got.
fn load_and_run(dir: &Path) -> Depth {
    let Ok(files) = locate_in_folder(dir) else {
        return 0;
    };
    let Ok(model) = StableDiffusion::load(&files, &Device::Cpu, DType::F32) else {
        return 0;
    };
    let ran = (|| -> unitune::engine::Result<()> {
        let prompt = model.encode_prompt("a cat")?;
        let side = model.config.pixel_multiple();
        let (channels, h, w) = model.latent_dims(side, side)?;
        let photo = image::RgbImage::new(side as u32, side as u32);
        let mut noise = unitune::engine::noise::NoiseSource::from_seed(1);
        let latents = model.encode_image(&photo, &mut noise)?;
        assert_eq!(latents.dims(), &[1, channels, h, w]);
        let t = model.scheduler.timesteps(2)?[0];
        let timestep = Tensor::new(&[t as u32], &Device::Cpu)?;
        let output = model.unet.forward(&latents, &timestep, &prompt.embedding)?;
        let step = model.scheduler.step(&output, t, &latents, 2)?;
        model.decode_latents(&step.prev_sample)?;
        Ok(())
    })();
    1 + u32::from(ran.is_ok())
}

pub fn model_folder(check: fn(Target)) {
    let dir = tempfile::tempdir().expect("temporary folder");
    model_folder_with_small_tokenizer(dir.path());
    let seeds = CONFIGS
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let mut seed = vec![i as u8];
            seed.extend(std::fs::read(dir.path().join(file)).expect("seed config"));
            seed
        })
        .collect();
    let originals: Vec<Vec<u8>> = CONFIGS
        .iter()
        .map(|file| std::fs::read(dir.path().join(file)).expect("seed config"))
        .collect();
    let run = |input: &[u8]| -> Depth {
        let Some((&tag, file)) = input.split_first() else {
            return 0;
        };
        let index = usize::from(tag) % CONFIGS.len();
        let path = dir.path().join(CONFIGS[index]);
        std::fs::write(&path, file).expect("temporary file");
        let depth = load_and_run(dir.path());
        std::fs::write(&path, &originals[index]).expect("temporary file");
        depth
    };
    check(Target {
        name: "model_folder",
        seeds,
        mutate: mutate_tagged_json,
        run: &run,
    });
}

/// Keeps the file byte and mutates the JSON after it.
fn mutate_tagged_json(
    input: &[u8],
    seeds: &[Vec<u8>],
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Vec<u8> {
    let Some((&tag, file)) = input.split_first() else {
        return vec![0];
    };
    let files: Vec<Vec<u8>> = seeds
        .iter()
        .filter_map(|s| s.get(1..))
        .map(<[u8]>::to_vec)
        .collect();
    let mut out = vec![tag];
    out.extend(mutate::json(file, &files, rng));
    out
}

/// Keeps the component byte and mutates the file after it as safetensors.
fn mutate_tagged(input: &[u8], seeds: &[Vec<u8>], rng: &mut rand_chacha::ChaCha8Rng) -> Vec<u8> {
    let Some((&tag, file)) = input.split_first() else {
        return vec![0];
    };
    let files: Vec<Vec<u8>> = seeds
        .iter()
        .filter_map(|s| s.get(1..))
        .map(<[u8]>::to_vec)
        .collect();
    let mut out = vec![tag];
    out.extend(mutate::safetensors(file, &files, rng));
    out
}

pub fn model_weights(check: fn(Target)) {
    let dir = tempfile::tempdir().expect("temporary folder");
    model_folder_with_small_tokenizer(dir.path());
    let seeds = WEIGHTS
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let mut seed = vec![i as u8];
            seed.extend(std::fs::read(sd15().join(file)).expect("fixture weights"));
            seed
        })
        .collect();
    let run = |input: &[u8]| -> Depth {
        let Some((&tag, file)) = input.split_first() else {
            return 0;
        };
        let component = WEIGHTS[usize::from(tag) % WEIGHTS.len()];
        let path = dir.path().join(component);
        // Replaced, not rewritten in place: the previous input's model may still map it.
        let staged = path.with_extension("staged");
        std::fs::write(&staged, file).expect("temporary file");
        std::fs::rename(&staged, &path).expect("temporary file");
        let result = locate_in_folder(dir.path())
            .map_err(|e| e.to_string())
            .and_then(|files| {
                StableDiffusion::load(&files, &Device::Cpu, DType::F32).map_err(|e| e.to_string())
            });
        let depth = match result {
            Err(_) => 0,
            Ok(model) => {
                // Weights that load must also compute: a prompt, one UNet step, a decode.
                let ran = (|| -> unitune::engine::Result<()> {
                    let prompt = model.encode_prompt("a cat")?;
                    let latents = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu)?;
                    let t = Tensor::new(&[10u32], &Device::Cpu)?;
                    model.unet.forward(&latents, &t, &prompt.embedding)?;
                    model.decode_latents(&latents)?;
                    Ok(())
                })();
                1 + u32::from(ran.is_ok())
            }
        };
        // Put the fixture back for the next input, which may replace another component.
        std::fs::copy(sd15().join(component), &staged).expect("fixture copies");
        std::fs::rename(&staged, &path).expect("temporary file");
        depth
    };
    check(Target {
        name: "model_weights",
        seeds,
        mutate: mutate_tagged,
        run: &run,
    });
}

/// Single-file (LDM) checkpoints: the family and architecture are read from the tensors
/// themselves, so damaged names, shapes, dtypes and headers must all end in a refusal.
pub fn checkpoint_file(check: fn(Target)) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let fixtures = sd15()
        .parent()
        .expect("fixture models folder")
        .to_path_buf();
    let seeds = ["sd15-ckpt-tiny.safetensors", "sd2-ckpt-tiny.safetensors"]
        .iter()
        .map(|name| std::fs::read(fixtures.join(name)).expect("fixture checkpoint"))
        .collect();
    let path = dir.path().join("model.safetensors");
    let run = |input: &[u8]| -> Depth {
        // Replaced, not rewritten in place: the previous input's model may still map it.
        let staged = path.with_extension("staged");
        std::fs::write(&staged, input).expect("temporary file");
        std::fs::rename(&staged, &path).expect("temporary file");
        let Ok(files) = locate_in_folder(&path) else {
            return 0;
        };
        let Ok(model) = StableDiffusion::load(&files, &Device::Cpu, DType::F32) else {
            return 1;
        };
        // A checkpoint that loads must also compute: a prompt, one UNet step, a decode.
        let ran = (|| -> unitune::engine::Result<()> {
            let prompt = model.encode_prompt("a cat")?;
            let side = model.config.pixel_multiple();
            let (channels, h, w) = model.latent_dims(side, side)?;
            let latents = Tensor::zeros((1, channels, h, w), DType::F32, &Device::Cpu)?;
            let t = Tensor::new(&[10u32], &Device::Cpu)?;
            if model.config.unet.in_channels == channels {
                model.unet.forward(&latents, &t, &prompt.embedding)?;
            }
            model.decode_latents(&latents)?;
            Ok(())
        })();
        2 + u32::from(ran.is_ok())
    };
    check(Target {
        name: "checkpoint_file",
        seeds,
        mutate: mutate::safetensors,
        run: &run,
    });
}

pub fn snapshot_file(check: fn(Target)) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let keys = vec!["down.weight".to_string(), "up.bias".to_string()];
    let seed_path = dir.path().join("seed.safetensors");
    let tensors = [
        Tensor::arange(0f32, 12.0, &Device::Cpu)
            .and_then(|t| t.reshape((3, 4)))
            .expect("tensor"),
        Tensor::new(&[1.5f32, -2.0], &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F16))
            .expect("tensor"),
    ];
    let named: Vec<(String, Tensor)> = keys.iter().cloned().zip(tensors).collect();
    write_safetensors(&seed_path, &named, &Default::default()).expect("seed snapshot writes");
    let seeds = vec![std::fs::read(&seed_path).expect("seed snapshot reads")];
    let path = dir.path().join("snapshot.safetensors");
    let run = |input: &[u8]| -> Depth {
        std::fs::write(&path, input).expect("temporary file");
        let snapshot = Snapshot::in_file(1, path.clone(), keys.clone());
        match snapshot.tensors() {
            Ok(loaded) => {
                assert_eq!(loaded.len(), keys.len());
                1
            }
            Err(_) => 0,
        }
    };
    check(Target {
        name: "snapshot_file",
        seeds,
        mutate: mutate::safetensors,
        run: &run,
    });
}
