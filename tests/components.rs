//! Each model component against diffusers/transformers on the tiny fixture models.
//!
//! Tolerance: 1e-4 absolute for single forwards in f32 (what is left is float summation
//! order); the brief's bar is 1e-3.

mod common;

use candle_core::{DType, Device};
use common::{MODELS, Reference, assert_close, load_model};

const TOLERANCE: f32 = 1e-4;

#[test]
fn tokenizer_ids_match_transformers() {
    for name in MODELS {
        let model = load_model(name);
        let reference = Reference::load(name);
        let cases = reference.json["tokens"].as_array().unwrap();
        assert!(cases.len() >= 5, "{name}: too few token cases");
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            let expected: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = model.tokenizer.encode(prompt).unwrap();
            assert_eq!(got.ids, expected, "{name}: ids for {prompt:?}");
        }
        // The long prompt is truncated and says by how much.
        let long = cases
            .iter()
            .map(|c| c["prompt"].as_str().unwrap())
            .max_by_key(|p| p.len())
            .unwrap();
        assert!(
            model.tokenizer.encode(long).unwrap().dropped_tokens > 0,
            "{name}: long prompt not reported as truncated"
        );
        assert_eq!(
            model
                .tokenizer
                .encode("a photo of a cat")
                .unwrap()
                .dropped_tokens,
            0
        );
    }
}

#[test]
fn text_embeddings_match_transformers() {
    for name in MODELS {
        let model = load_model(name);
        let reference = Reference::load(name);
        let ids = reference.tensor("token_ids").to_dtype(DType::U32).unwrap();
        let got = model.text_encoders().unwrap().first.forward(&ids).unwrap();
        assert_close(
            &format!("{name} text embeddings"),
            &got,
            &reference.f32("text_embeddings"),
            TOLERANCE,
        );
    }
}

#[test]
fn unet_forward_matches_diffusers_with_a_timestep_per_sample() {
    for name in MODELS {
        let model = load_model(name);
        let reference = Reference::load(name);
        let out = model
            .unet
            .forward(
                &reference.f32("unet_in_sample"),
                &reference.f32("unet_in_timesteps"),
                &reference.f32("unet_in_encoder_hidden_states"),
            )
            .unwrap();
        assert_close(
            &format!("{name} UNet"),
            &out,
            &reference.f32("unet_out"),
            TOLERANCE,
        );
    }
}

#[test]
fn nine_channel_inpainting_unet_loads_and_matches() {
    use unitune::engine::config::UnetConfig;
    use unitune::engine::unet::UNet;
    let dir = common::model_dir("unet-in9-tiny").join("unet");
    let config = UnetConfig::load(&dir.join("config.json")).unwrap();
    assert_eq!(config.in_channels, 9);
    let vb = common::f32_weights(&dir.join("diffusion_pytorch_model.safetensors"));
    let unet = UNet::new(&config, vb).unwrap();
    let reference = Reference::load("unet-in9-tiny");
    let out = unet
        .forward(
            &reference.f32("unet_in_sample"),
            &reference.f32("unet_in_timesteps"),
            &reference.f32("unet_in_encoder_hidden_states"),
        )
        .unwrap();
    assert_close("in9 UNet", &out, &reference.f32("unet_out"), TOLERANCE);
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    for name in MODELS {
        let model = load_model(name);
        let reference = Reference::load(name);
        let dist = model.vae.encode(&reference.f32("vae_in_image")).unwrap();
        assert_close(
            &format!("{name} VAE mean"),
            &dist.mean,
            &reference.f32("vae_enc_mean"),
            TOLERANCE,
        );
        assert_close(
            &format!("{name} VAE std"),
            &dist.std,
            &reference.f32("vae_enc_std"),
            TOLERANCE,
        );
        let decoded = model
            .vae
            .decode(&reference.f32("vae_dec_in_latent"))
            .unwrap();
        assert_close(
            &format!("{name} VAE decode"),
            &decoded,
            &reference.f32("vae_dec_out"),
            TOLERANCE,
        );
    }
}

#[test]
fn vae_encode_is_deterministic_under_a_seed() {
    use unitune::engine::noise::NoiseSource;
    let model = load_model("sd15-tiny");
    let image = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    let a = model
        .encode_image(&image, &mut NoiseSource::from_seed(3))
        .unwrap();
    let b = model
        .encode_image(&image, &mut NoiseSource::from_seed(3))
        .unwrap();
    let c = model
        .encode_image(&image, &mut NoiseSource::from_seed(4))
        .unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert!(
        common::max_abs_diff(&a, &c) > 0.0,
        "a different seed must sample differently"
    );
    // Sanity: the latent has the VAE's downscaled shape.
    assert_eq!(a.dims(), &[1, 4, 32, 32]);
}

/// SDXL's UNet (tests/fixtures/models/sdxl-tiny: three levels, the first without attention,
/// transformer depth (1, 1, 2), linear projections, `text_time` conditioning) against
/// diffusers: the added embedding alone and the whole forward. Dropping the pooled embedding
/// or swapping height and width in the size numbers moves the output far past the tolerance
/// (asserted, so the comparison is seen to be able to fail).
#[test]
fn sdxl_unet_with_its_added_conditioning_matches_diffusers() {
    use unitune::engine::unet::TextTime;
    let unet = sdxl_unet();
    let config = unet.config().clone();
    let text_time_config = config
        .text_time
        .expect("SDXL's UNet has text_time conditioning");
    assert_eq!(
        (
            text_time_config.time_embed_dim,
            text_time_config.pooled_dim()
        ),
        (8, 32)
    );
    assert!(config.down_blocks[0].attention.is_none());
    let reference = Reference::load("sdxl-tiny");
    let text_time = TextTime {
        pooled: reference.f32("tt_text_embeds"),
        size_numbers: reference.f32("tt_time_ids"),
    };
    let added = unet.text_time_embedding(&text_time, DType::F32).unwrap();
    assert_close(
        "SDXL added embedding",
        &added,
        &reference.f32("tt_aug_emb"),
        TOLERANCE,
    );
    let forward = |text_time: Option<&TextTime>| {
        unet.forward_with(
            &reference.f32("unet_in_sample"),
            &reference.f32("tt_timesteps"),
            &reference.f32("unet_in_encoder_hidden_states"),
            text_time,
        )
    };
    let expected = reference.f32("unet_out");
    assert_close(
        "SDXL UNet",
        &forward(Some(&text_time)).unwrap(),
        &expected,
        TOLERANCE,
    );

    let no_pooled = TextTime {
        pooled: text_time.pooled.zeros_like().unwrap(),
        ..text_time.clone()
    };
    let swapped_sizes = TextTime {
        size_numbers: text_time
            .size_numbers
            .index_select(
                &candle_core::Tensor::new(&[1u32, 0, 3, 2, 5, 4], &Device::Cpu).unwrap(),
                1,
            )
            .unwrap(),
        ..text_time.clone()
    };
    for (broken, what) in [(no_pooled, "no pooled"), (swapped_sizes, "width first")] {
        let out = forward(Some(&broken)).unwrap();
        let diff = common::max_abs_diff(&out, &expected);
        assert!(diff > 100.0 * TOLERANCE, "{what}: {diff}");
    }
    let refused = forward(None).unwrap_err().to_string();
    assert!(refused.contains("pooled text embedding"), "{refused}");
}

/// SDXL's two text encoders against transformers, as `StableDiffusionXLPipeline.encode_prompt`
/// reads them: each one's penultimate hidden states, joined into the context, and the second
/// one's projected end-of-text state (the pooled embedding). The last layer's states (what
/// SD 1.x reads) are seen to differ from the penultimate ones past the tolerance.
#[test]
fn sdxl_text_encoders_give_diffusers_context_and_pooled_embedding() {
    use unitune::engine::config::TextEncoderConfig;
    use unitune::engine::text_encoder::TextEncoder;
    let reference = Reference::load("sdxl-tiny");
    let load = |folder: &str, projection: Option<usize>| {
        let dir = common::model_dir("sdxl-tiny").join(folder);
        let config = TextEncoderConfig::load(&dir.join("config.json")).unwrap();
        let vb = common::f32_weights(&dir.join("model.safetensors"));
        match projection {
            Some(dim) => TextEncoder::with_projection(&config, dim, vb).unwrap(),
            None => TextEncoder::new(&config, vb).unwrap(),
        }
    };
    let first = load("text_encoder", None);
    let second = load("text_encoder_2", Some(32));
    let ids = |key: &str| reference.tensor(key).to_dtype(DType::U32).unwrap();
    let one = first.encode_xl(&ids("text_ids_1")).unwrap();
    let two = second.encode_xl(&ids("text_ids_2")).unwrap();
    assert!(one.pooled.is_none());
    assert_close(
        "SDXL text encoder 1, penultimate",
        &one.penultimate,
        &reference.f32("text_hidden_1"),
        TOLERANCE,
    );
    assert_close(
        "SDXL text encoder 2, penultimate",
        &two.penultimate,
        &reference.f32("text_hidden_2"),
        TOLERANCE,
    );
    let context = candle_core::Tensor::cat(&[&one.penultimate, &two.penultimate], 2).unwrap();
    assert_close(
        "SDXL context",
        &context,
        &reference.f32("text_context"),
        TOLERANCE,
    );
    assert_close(
        "SDXL pooled",
        two.pooled.as_ref().unwrap(),
        &reference.f32("text_pooled"),
        TOLERANCE,
    );
    let last = second.forward(&ids("text_ids_2")).unwrap();
    let diff = common::max_abs_diff(&last, &reference.f32("text_hidden_2"));
    assert!(
        diff > 100.0 * TOLERANCE,
        "the last layer is not the penultimate: {diff}"
    );
}

/// The whole SDXL model (`StableDiffusion::load` on the folder) encodes each prompt through
/// both tokenizers and encoders as `StableDiffusionXLPipeline.encode_prompt` does, and an
/// empty baseline as zeros, the pipeline's `force_zeros_for_empty_prompt` (the folder's
/// `model_index.json` says true); with it false, "" is encoded like any prompt.
#[test]
fn sdxl_model_encodes_prompts_as_the_pipeline_and_an_empty_baseline_as_zeros() {
    let reference = Reference::load("sdxl-tiny");
    let model = common::load_model("sdxl-tiny");
    assert_eq!(model.info().family.name(), "SDXL");
    assert_eq!(model.info().fidelity_table.name, "stable-diffusion-xl");
    let prompts: Vec<String> = reference.json["text_prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    let context = reference.f32("text_context");
    let pooled = reference.f32("text_pooled");
    for (i, prompt) in prompts.iter().enumerate() {
        let encoded = model.encode_prompt(prompt).unwrap();
        if prompt.is_empty() {
            let zeros = |t: &candle_core::Tensor| {
                t.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            };
            assert!(zeros(&encoded.embedding) && zeros(encoded.pooled.as_ref().unwrap()));
            continue;
        }
        let row = |t: &candle_core::Tensor| t.narrow(0, i, 1).unwrap();
        assert_close(
            &format!("context of {prompt:?}"),
            &encoded.embedding,
            &row(&context),
            TOLERANCE,
        );
        assert_close(
            &format!("pooled of {prompt:?}"),
            encoded.pooled.as_ref().unwrap(),
            &row(&pooled),
            TOLERANCE,
        );
    }

    let home = tempfile::tempdir().unwrap();
    let folder = home.path().join("sdxl-no-zeros");
    common::copy_dir(&common::model_dir("sdxl-tiny"), &folder);
    let index_path = folder.join("model_index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["force_zeros_for_empty_prompt"] = serde_json::Value::Bool(false);
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let files = unitune::model_files::locate_in_folder(&folder).unwrap();
    let model =
        unitune::engine::StableDiffusion::load(&files, &candle_core::Device::Cpu, DType::F32)
            .unwrap();
    let empty = prompts.iter().position(|p| p.is_empty()).unwrap();
    let encoded = model.encode_prompt("").unwrap();
    assert_close(
        "context of \"\" without force_zeros",
        &encoded.embedding,
        &context.narrow(0, empty, 1).unwrap(),
        TOLERANCE,
    );
}

/// The tiny SDXL fixture's UNet (f32, CPU).
fn sdxl_unet() -> unitune::engine::unet::UNet {
    use unitune::engine::config::UnetConfig;
    let dir = common::model_dir("sdxl-tiny").join("unet");
    let config = UnetConfig::load(&dir.join("config.json")).unwrap();
    let vb = common::f32_weights(&dir.join("diffusion_pytorch_model.safetensors"));
    unitune::engine::unet::UNet::new(&config, vb).unwrap()
}
