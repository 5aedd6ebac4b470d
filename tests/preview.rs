//! Live previews: the latent-to-RGB map fit to the model's own VAE stands in for a full
//! decode (area-averaged to latent resolution) far better than a grey image or a wrong map.

use std::time::Instant;

use candle_core::{DType, Device};
use image::RgbImage;
use unitune::engine::StableDiffusion;
use unitune::engine::noise::NoiseSource;
use unitune::engine::preview::LatentPreview;
use unitune::model_files::locate_in_folder;

fn load_tiny() -> StableDiffusion {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd15-tiny");
    let files = locate_in_folder(&dir).expect("fixture model folder is complete");
    StableDiffusion::load(&files, &Device::Cpu, DType::F32).expect("fixture model loads")
}

/// A smooth photo-like image: a diagonal colour gradient with a soft bright disc.
fn smooth_image(side: u32) -> RgbImage {
    RgbImage::from_fn(side, side, |x, y| {
        let (u, v) = (x as f32 / side as f32, y as f32 / side as f32);
        let d = ((u - 0.6).powi(2) + (v - 0.4).powi(2)).sqrt();
        let disc = (1.0 - d * 3.0).max(0.0);
        let px = |a: f32| (a.clamp(0.0, 1.0) * 255.0) as u8;
        image::Rgb([
            px(0.2 + 0.6 * u + 0.3 * disc),
            px(0.5 - 0.3 * v + 0.4 * disc),
            px(0.7 * (1.0 - u) * v + 0.2),
        ])
    })
}

/// Area average by `factor` in each direction.
fn downsample(image: &RgbImage, factor: u32) -> RgbImage {
    let (w, h) = (image.width() / factor, image.height() / factor);
    RgbImage::from_fn(w, h, |x, y| {
        let mut sum = [0u32; 3];
        for dy in 0..factor {
            for dx in 0..factor {
                let p = image.get_pixel(x * factor + dx, y * factor + dy);
                for c in 0..3 {
                    sum[c] += p[c] as u32;
                }
            }
        }
        let n = factor * factor;
        image::Rgb(sum.map(|s| ((s + n / 2) / n) as u8))
    })
}

fn mean_abs_error(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let total: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as i64 - y as i64).unsigned_abs())
        .sum();
    total as f64 / a.as_raw().len() as f64
}

#[test]
fn preview_approximates_the_full_decode() {
    let model = load_tiny();
    let preview = LatentPreview::fit(&model, 0).unwrap();
    let factor = model.config.vae.downscale_factor() as u32;

    let photo = smooth_image(64);
    let latents = model
        .encode_image(&photo, &mut NoiseSource::from_seed(1))
        .unwrap();

    let start = Instant::now();
    let decoded = model.decode_latents(&latents).unwrap();
    let decode_time = start.elapsed();
    let start = Instant::now();
    let rendered = preview.render(&latents).unwrap();
    let render_time = start.elapsed();
    let reference = downsample(&decoded, factor);
    assert_eq!(rendered.dimensions(), reference.dimensions());

    let grey = RgbImage::from_pixel(reference.width(), reference.height(), image::Rgb([128; 3]));
    // The same map with its colour channels rotated (R <- G <- B <- R): right numbers,
    // wrong colours. (Rotating the latent channels instead says nothing on this fixture: its
    // random-weight VAE decodes to noise whose only linear part is its mean colour, so the
    // fitted latent weights are near zero. With a trained VAE they carry the picture.)
    let rotate = |rgb: [f32; 3]| [rgb[1], rgb[2], rgb[0]];
    let wrong = LatentPreview::from_parts(
        preview.weights().iter().map(|&row| rotate(row)).collect(),
        rotate(preview.bias()),
        model.config.vae.scaling_factor,
    );
    let wrong_render = wrong.render(&latents).unwrap();

    let fit_error = mean_abs_error(&rendered, &reference);
    let grey_error = mean_abs_error(&grey, &reference);
    let wrong_error = mean_abs_error(&wrong_render, &reference);
    println!(
        "mean abs error (0-255): fitted {fit_error:.2}, grey {grey_error:.2}, rotated colours {wrong_error:.2}"
    );
    println!(
        "full decode {:.2} ms, preview {:.3} ms: {:.0}x faster",
        decode_time.as_secs_f64() * 1e3,
        render_time.as_secs_f64() * 1e3,
        decode_time.as_secs_f64() / render_time.as_secs_f64().max(1e-9)
    );
    assert!(
        fit_error * 1.6 < grey_error,
        "fitted {fit_error} vs grey {grey_error}"
    );
    assert!(
        fit_error * 1.6 < wrong_error,
        "fitted {fit_error} vs rotated {wrong_error}"
    );
}

/// Each latent pixel goes through the map on its own: a preview that ignored the latents (or
/// mixed up pixels or channels) fails here, which the fixture's random VAE cannot show (its
/// fitted weights are near zero; see above).
#[test]
fn render_maps_each_latent_pixel_through_the_map() {
    let preview = LatentPreview::from_parts(
        vec![
            [0.5, 0.0, 0.0],
            [0.0, 0.5, 0.0],
            [0.0, 0.0, 0.5],
            [0.25, 0.25, 0.25],
        ],
        [0.0, 0.1, -0.1],
        0.5,
    );
    // [1, 4, 1, 2]: pixel 0 then pixel 1 of each channel; scaled latents, divided by 0.5.
    let latents = candle_core::Tensor::from_vec(
        vec![0.25f32, -0.25, 0.0, 0.5, -0.5, 0.0, 0.2, 0.0],
        (1, 4, 1, 2),
        &Device::Cpu,
    )
    .unwrap();
    let image = preview.render(&latents).unwrap();
    let byte = |v: f32| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
    // Pixel 0: z = [0.5, 0, -1, 0.4]; pixel 1: z = [-0.5, 1, 0, 0].
    let expected = [
        [byte(0.25 + 0.1), byte(0.1 + 0.1), byte(-0.1 - 0.5 + 0.1)],
        [byte(-0.25), byte(0.1 + 0.5), byte(-0.1)],
    ];
    assert_eq!(image.get_pixel(0, 0).0, expected[0]);
    assert_eq!(image.get_pixel(1, 0).0, expected[1]);
}

#[test]
fn fitting_is_deterministic_for_a_seed() {
    let model = load_tiny();
    let a = LatentPreview::fit(&model, 7).unwrap();
    let b = LatentPreview::fit(&model, 7).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.weights().len(), model.config.vae.latent_channels);
}

#[test]
fn render_refuses_latents_of_the_wrong_shape() {
    let model = load_tiny();
    let preview = LatentPreview::fit(&model, 0).unwrap();
    let three_channels =
        candle_core::Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let error = preview.render(&three_channels).unwrap_err().to_string();
    assert!(error.contains("[1, 4, h, w]"), "{error}");
}

/// The demo model's fast preview shows a demo scene in its own colours: its VAE only ever saw
/// flat, saturated shapes and no linear map follows it (the fitted one drew the white
/// background as (221, 100, 216), mean error 62 of 255), so its small VAE decodes instead.
#[test]
fn the_demo_models_fast_preview_draws_its_scenes_in_their_colours() {
    let dir = unitune::model_files::demo_model_dir().unwrap();
    let files = unitune::model_files::locate_in_folder(&dir).unwrap();
    let model =
        StableDiffusion::load(&files, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let preview = LatentPreview::for_model(&model, 0).unwrap();
    let scene = unitune::world::example_scene().render();
    let latents = model
        .encode_image(&scene, &mut NoiseSource::from_seed(1))
        .unwrap();
    let rendered = preview.render(&latents).unwrap();
    assert!(preview.decodes_fully());
    let error = mean_abs_error(&rendered, &scene);
    let corner = rendered.get_pixel(0, 0);
    println!("demo scene: mean abs error {error:.1} of 255; background {corner:?}");
    assert!(error < 25.0, "mean abs error {error:.1}");
    assert!(
        corner.0.iter().all(|&c| c > 200),
        "the white background reads {corner:?}"
    );
}
