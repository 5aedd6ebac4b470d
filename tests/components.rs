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
        let got = model.text_encoder.forward(&ids).unwrap();
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
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
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
