//! Targets for the JSON files of a model folder: each config is parsed and, when it parses,
//! the model it describes is built against the tiny fixture weights and run once on a tiny
//! input. A config that cannot work must be refused with an error naming the field, never
//! reach a division by zero or an index out of range.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use unitune::engine::config::{
    PipelineConfig, SchedulerConfig, TextEncoderConfig, UnetConfig, VaeConfig,
};
use unitune::engine::scheduler::DdimScheduler;
use unitune::engine::text_encoder::TextEncoder;
use unitune::engine::tokenizer::{ClipTokenizer, TokenizerFiles};
use unitune::engine::unet::UNet;
use unitune::engine::vae::Vae;

use crate::harness::{Depth, Target};
use crate::mutate;

const FIXTURE_MODELS: [&str; 3] = ["sd15-tiny", "sd2-tiny", "unet-in9-tiny"];

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

/// `<component>/<file>` of every fixture model that has it.
fn fixture_files(component: &str, file: &str) -> Vec<PathBuf> {
    FIXTURE_MODELS
        .iter()
        .map(|m| models_dir().join(m).join(component).join(file))
        .filter(|p| p.exists())
        .collect()
}

/// The seeds: each fixture model's config, plus the full-size architectures in `assets/arch`
/// (these parse but no fixture weights fit them).
fn config_seeds(component: &str, file: &str, arch_name: &str) -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = fixture_files(component, file)
        .iter()
        .map(|p| std::fs::read(p).expect("fixture config is readable"))
        .collect();
    for arch in ["sd15", "sd21"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("assets/arch")
            .join(arch)
            .join(arch_name);
        seeds.push(std::fs::read(path).expect("architecture config is readable"));
    }
    seeds
}

/// The weights of `component` in every fixture model, in f32 on the CPU.
fn fixture_weights(component: &str) -> Vec<HashMap<String, Tensor>> {
    let mut all = Vec::new();
    for model in FIXTURE_MODELS {
        let dir = models_dir().join(model).join(component);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
                    .expect("fixture weights load");
                let tensors = tensors
                    .into_iter()
                    .map(|(k, t)| (k, t.to_dtype(DType::F32).expect("to f32")))
                    .collect();
                all.push(tensors);
            }
        }
    }
    all
}

/// The sd15-tiny fixture's configs, into which one mutated config is put.
fn fixture_pipeline() -> PipelineConfig {
    let dir = models_dir().join("sd15-tiny");
    PipelineConfig {
        unet: UnetConfig::load(&dir.join("unet/config.json")).expect("fixture config"),
        vae: VaeConfig::load(&dir.join("vae/config.json")).expect("fixture config"),
        text_encoder: TextEncoderConfig::load(&dir.join("text_encoder/config.json"))
            .expect("fixture config"),
        scheduler: SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json"))
            .expect("fixture config"),
    }
}

/// The sizes the editor derives from the configs before loading anything else.
fn derived_sizes(pipeline: &PipelineConfig) {
    let _ = pipeline.native_image_side();
    let _ = pipeline.pixel_multiple();
    let _ = pipeline.unet.time_embed_dim();
    let _ = pipeline.vae.downscale_factor();
}

fn builder(weights: &HashMap<String, Tensor>) -> VarBuilder<'static> {
    VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu)
}

fn text(input: &[u8]) -> Option<&str> {
    std::str::from_utf8(input).ok()
}

const FILE: &str = "fuzz/config.json";

pub fn unet(check: fn(Target)) {
    let weights = fixture_weights("unet");
    let pipeline = fixture_pipeline();
    let run = |input: &[u8]| -> Depth {
        let Some(Ok(config)) = text(input).map(|t| UnetConfig::from_json(t, Path::new(FILE)))
        else {
            return 0;
        };
        derived_sizes(&PipelineConfig {
            unet: config.clone(),
            ..pipeline.clone()
        });
        let mut depth = 1;
        for w in &weights {
            let Ok(unet) = UNet::new(&config, builder(w)) else {
                continue;
            };
            depth = depth.max(2);
            // The smallest latent the UNet takes: one cell per block after all its halvings.
            let side = 1usize << config.downsample_count().min(4);
            let ran = (|| -> candle_core::Result<()> {
                let sample = Tensor::zeros(
                    (1, config.in_channels, side, side),
                    DType::F32,
                    &Device::Cpu,
                )?;
                let timesteps = Tensor::new(&[10u32], &Device::Cpu)?;
                let context =
                    Tensor::zeros((1, 3, config.cross_attention_dim), DType::F32, &Device::Cpu)?;
                let out = unet
                    .forward(&sample, &timesteps, &context)
                    .map_err(candle_core::Error::wrap)?;
                assert_eq!(out.dims()[0], 1);
                Ok(())
            })();
            if ran.is_ok() {
                depth = 3;
            }
        }
        depth
    };
    check(Target {
        name: "unet_config",
        seeds: config_seeds("unet", "config.json", "unet.json"),
        mutate: mutate::json,
        run: &run,
    });
}

pub fn vae(check: fn(Target)) {
    let weights = fixture_weights("vae");
    let pipeline = fixture_pipeline();
    let run = |input: &[u8]| -> Depth {
        let Some(Ok(config)) = text(input).map(|t| VaeConfig::from_json(t, Path::new(FILE))) else {
            return 0;
        };
        derived_sizes(&PipelineConfig {
            vae: config.clone(),
            ..pipeline.clone()
        });
        let mut depth = 1;
        for w in &weights {
            let Ok(vae) = Vae::new(&config, builder(w)) else {
                continue;
            };
            depth = depth.max(2);
            let factor = config.downscale_factor().min(16);
            let ran = (|| -> candle_core::Result<()> {
                let latents =
                    Tensor::zeros((1, config.latent_channels, 2, 2), DType::F32, &Device::Cpu)?;
                vae.decode(&latents).map_err(candle_core::Error::wrap)?;
                let image = Tensor::zeros(
                    (1, config.in_channels, 2 * factor, 2 * factor),
                    DType::F32,
                    &Device::Cpu,
                )?;
                vae.encode(&image).map_err(candle_core::Error::wrap)?;
                Ok(())
            })();
            if ran.is_ok() {
                depth = 3;
            }
        }
        depth
    };
    check(Target {
        name: "vae_config",
        seeds: config_seeds("vae", "config.json", "vae.json"),
        mutate: mutate::json,
        run: &run,
    });
}

pub fn text_encoder(check: fn(Target)) {
    let weights = fixture_weights("text_encoder");
    let run = |input: &[u8]| -> Depth {
        let Some(Ok(config)) =
            text(input).map(|t| TextEncoderConfig::from_json(t, Path::new(FILE)))
        else {
            return 0;
        };
        let mut depth = 1;
        for w in &weights {
            let Ok(encoder) = TextEncoder::new(&config, builder(w)) else {
                continue;
            };
            depth = depth.max(2);
            let ran = (|| -> candle_core::Result<()> {
                let length = config.max_position_embeddings.min(77);
                let last = config.vocab_size.saturating_sub(1) as u32;
                let ids: Vec<u32> = (0..length as u32).map(|i| i.min(last)).collect();
                let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                encoder.forward(&ids).map_err(candle_core::Error::wrap)?;
                Ok(())
            })();
            if ran.is_ok() {
                depth = 3;
            }
        }
        depth
    };
    check(Target {
        name: "text_encoder_config",
        seeds: config_seeds("text_encoder", "config.json", "text_encoder.json"),
        mutate: mutate::json,
        run: &run,
    });
}

pub fn scheduler(check: fn(Target)) {
    let run = |input: &[u8]| -> Depth {
        let Some(Ok(config)) = text(input).map(|t| SchedulerConfig::from_json(t, Path::new(FILE)))
        else {
            return 0;
        };
        let scheduler = DdimScheduler::new(&config);
        let mut depth = 1;
        let sample = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).expect("tensor");
        for steps in [1, 3, 50] {
            let Ok(timesteps) = scheduler.timesteps(steps) else {
                continue;
            };
            depth = depth.max(2);
            for t in timesteps {
                if scheduler.step(&sample, t, &sample, steps).is_ok() {
                    depth = 3;
                }
            }
            let _ = scheduler.sdedit_timesteps(steps, 0.5);
        }
        depth
    };
    check(Target {
        name: "scheduler_config",
        seeds: config_seeds("scheduler", "scheduler_config.json", "scheduler.json"),
        mutate: mutate::json,
        run: &run,
    });
}

/// A tokenizer folder in one JSON document, so that the JSON mutator edits every file of it:
/// a small vocabulary and merges (the real ones take a second to load), both special-token
/// files, the text encoder's length and a prompt.
pub fn tokenizer_seed() -> serde_json::Value {
    let sd15 = models_dir().join("sd15-tiny/tokenizer");
    let sd2 = models_dir().join("sd2-tiny/tokenizer");
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).expect("fixture file")).expect("fixture JSON")
    };
    serde_json::json!({
        "vocab": {
            "<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "!</w>": 3, "a": 4, "a</w>": 5,
            "c": 6, "t": 7, "ca": 8, "cat</w>": 9, "t</w>": 10, "o": 11, "d": 12, "g</w>": 13,
            "do": 14, "dog</w>": 15
        },
        "merges": "#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n",
        "special_tokens_map": read(sd15.join("special_tokens_map.json")),
        "tokenizer_config": read(sd2.join("tokenizer_config.json")),
        "max_length": 77,
        "prompt": "a cat!! dog"
    })
}

pub fn tokenizer(check: fn(Target)) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let sd2_special = {
        let mut seed = tokenizer_seed();
        seed["special_tokens_map"] = serde_json::from_slice(
            &std::fs::read(models_dir().join("sd2-tiny/tokenizer/special_tokens_map.json"))
                .expect("fixture file"),
        )
        .expect("fixture JSON");
        seed
    };
    let seeds = [tokenizer_seed(), sd2_special]
        .iter()
        .map(|v| serde_json::to_vec_pretty(v).expect("serializes"))
        .collect();
    let run = |input: &[u8]| -> Depth {
        let Ok(bundle) = serde_json::from_slice::<serde_json::Value>(input) else {
            return 0;
        };
        let file = |name: &str, value: Option<&serde_json::Value>| -> PathBuf {
            let path = dir.path().join(name);
            let bytes = match value {
                Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
                Some(other) => serde_json::to_vec(other).unwrap_or_default(),
                None => Vec::new(),
            };
            std::fs::write(&path, bytes).expect("temporary file");
            path
        };
        let vocab = file("vocab.json", bundle.get("vocab"));
        let merges = file("merges.txt", bundle.get("merges"));
        let special = file("special_tokens_map.json", bundle.get("special_tokens_map"));
        let config = file("tokenizer_config.json", bundle.get("tokenizer_config"));
        let max_length = bundle
            .get("max_length")
            .and_then(|v| v.as_u64())
            .unwrap_or(77)
            .min(4096) as usize;
        let special_files = [special.as_path(), config.as_path()];
        let files = TokenizerFiles {
            vocab: &vocab,
            merges: &merges,
            special_tokens: &special_files,
        };
        let Ok(tokenizer) = ClipTokenizer::load(&files, max_length) else {
            return 0;
        };
        let prompt = bundle.get("prompt").and_then(|p| p.as_str()).unwrap_or("");
        match tokenizer.encode(prompt) {
            Ok(tokens) => {
                assert_eq!(tokens.ids.len(), max_length);
                2
            }
            Err(_) => 1,
        }
    };
    check(Target {
        name: "tokenizer_files",
        seeds,
        mutate: mutate::json,
        run: &run,
    });
}

/// The `--model` argument: a folder or `owner/name[@revision]`.
pub fn model_arg(check: fn(Target)) {
    let seeds = [
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "owner/name@refs/pr/3",
        "o-1/n.2_x@v2",
        "./models/sd15",
        "~/models",
        "~",
        "..\\models",
        "/",
        "猫/犬@ß",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let run = |input: &[u8]| -> Depth {
        let Ok(arg) = std::str::from_utf8(input) else {
            return 0;
        };
        match unitune::model_files::parse_model_arg(arg) {
            Ok(spec) => {
                let _ = spec.to_string();
                1
            }
            Err(error) => {
                assert!(!error.to_string().is_empty());
                0
            }
        }
    };
    check(Target {
        name: "model_arg",
        seeds,
        mutate: mutate::bytes,
        run: &run,
    });
}

/// The tiny VAE's `config.json` (diffusers `AutoencoderTiny`): built against the fixture's
/// weights, then run on tiny latents and images.
pub fn tiny_vae(check: fn(Target)) {
    use unitune::engine::config::TinyVaeConfig;
    use unitune::engine::taesd::TinyAutoencoder;

    let dir = models_dir().join("taesd-tiny");
    let weights = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .expect("fixture weights load");
    let run = |input: &[u8]| -> Depth {
        let Some(Ok(config)) = text(input).map(|t| TinyVaeConfig::from_json(t, Path::new(FILE)))
        else {
            return 0;
        };
        let Ok(tiny) = TinyAutoencoder::new(config.clone(), builder(&weights), DType::F32) else {
            return 1;
        };
        let factor = config.encoder_downscale_factor().min(16);
        let ran = (|| -> unitune::engine::Result<()> {
            let latents =
                Tensor::zeros((1, config.latent_channels, 2, 2), DType::F32, &Device::Cpu)?;
            tiny.decode(&latents)?;
            let image = Tensor::zeros(
                (1, config.in_channels, 2 * factor, 2 * factor),
                DType::F32,
                &Device::Cpu,
            )?;
            tiny.encode(&image)?;
            Ok(())
        })();
        if ran.is_ok() { 3 } else { 2 }
    };
    // The fixture, and an empty config (taesd's full-size architecture, which the fixture's
    // weights do not fit).
    let seeds = vec![
        std::fs::read(dir.join("config.json")).expect("fixture config is readable"),
        b"{}".to_vec(),
    ];
    check(Target {
        name: "tiny_vae_config",
        seeds,
        mutate: mutate::json,
        run: &run,
    });
}
