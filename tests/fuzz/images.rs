//! Targets for files a user opens: photos, masks, and PNGs whose recipe is read back.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use unitune::imaging::{
    DecodeLimits, ExistingFile, export_image, load_mask, load_photo_from_bytes, read_png_text,
};
use unitune::recipe::Recipe;

use crate::harness::{Depth, Target};
use crate::mutate;

fn fixture(relative: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative);
    std::fs::read(path).expect("fixture is readable")
}

/// Small limits: a mutated header claiming a huge image must be refused by the limits, and
/// the images that pass decode quickly.
fn limits() -> DecodeLimits {
    DecodeLimits {
        max_width: 2048,
        max_height: 2048,
        max_alloc_bytes: 64 << 20,
    }
}

fn encoded(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, format)
        .expect("the seed image encodes");
    bytes.into_inner()
}

/// Small images of every format and pixel type the decoder takes (small so that many
/// mutations run per second), plus the two fixture photos.
fn image_seeds() -> Vec<Vec<u8>> {
    let rgba = RgbaImage::from_fn(7, 5, |x, y| {
        Rgba([x as u8 * 30, y as u8 * 50, 90, 128 + x as u8])
    });
    let rgb = RgbImage::from_fn(9, 6, |x, y| Rgb([x as u8 * 25, y as u8 * 40, 200]));
    let deep: ImageBuffer<Rgba<u16>, Vec<u16>> = ImageBuffer::from_fn(4, 3, |x, y| {
        Rgba([x as u16 * 9000, y as u16 * 20000, 7, 40000])
    });
    let gray = DynamicImage::ImageLuma8(DynamicImage::ImageRgb8(rgb.clone()).into_luma8());
    let mut seeds = vec![
        encoded(&DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::Png),
        encoded(&DynamicImage::ImageRgba16(deep), ImageFormat::Png),
        encoded(&gray, ImageFormat::Png),
        encoded(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Jpeg),
        encoded(&DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::Gif),
        encoded(&DynamicImage::ImageRgba8(rgba), ImageFormat::WebP),
        encoded(&DynamicImage::ImageRgb8(rgb), ImageFormat::WebP),
    ];
    seeds.push(fixture("photos/rocket.jpg"));
    seeds.push(fixture("photos/chelsea.png"));
    seeds
}

pub fn photo_decode(check: fn(Target)) {
    let run = |input: &[u8]| -> Depth {
        match load_photo_from_bytes(input, "fuzz-input", &limits()) {
            Ok(photo) => {
                let (w, h) = photo.dimensions();
                assert_eq!(photo.rgb.as_raw().len(), (w * h * 3) as usize);
                1
            }
            Err(_) => 0,
        }
    };
    check(Target {
        name: "photo_decode",
        seeds: image_seeds(),
        mutate: mutate::image,
        run: &run,
    });
}

/// Writes `input` to a file in `dir` (the readers under test take paths).
fn as_file(dir: &Path, input: &[u8]) -> PathBuf {
    let path = dir.join("input");
    std::fs::write(&path, input).expect("the temporary file is writable");
    path
}

pub fn mask_load(check: fn(Target)) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let run = |input: &[u8]| -> Depth {
        let path = as_file(dir.path(), input);
        // The photo's size varies with the input, so masks are both shrunk and enlarged.
        let width = 1 + (input.len() % 37) as u32;
        let height = 1 + (input.len() / 37 % 23) as u32;
        match load_mask(&path, &limits(), width, height) {
            Ok(mask) => {
                assert_eq!(mask.dimensions(), (width, height));
                1
            }
            Err(_) => 0,
        }
    };
    check(Target {
        name: "mask_load",
        seeds: image_seeds(),
        mutate: mutate::image,
        run: &run,
    });
}

/// PNGs as the project's own exporter writes them (recipe in tEXt, or iTXt when the prompt is
/// not Latin-1), and one with a compressed zTXt chunk as other tools write.
fn recipe_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let rgb = RgbImage::from_fn(6, 4, |x, y| Rgb([x as u8 * 40, y as u8 * 60, 10]));
    let alpha = image::GrayImage::from_fn(6, 4, |x, _| image::Luma([x as u8 * 50]));
    let mut seeds = Vec::new();
    for (name, prompt, with_alpha) in [
        ("latin.png", "a photo of sks dog, watercolour", false),
        ("utf8.png", "猫 in the snow", true),
    ] {
        let mut recipe = Recipe::new("edit", prompt, "tests/sd15-tiny", "epsilon", "f32");
        recipe.baseline_prompt = "blurry".into();
        recipe.t0_fraction = Some(0.6);
        let path = dir.join(name);
        export_image(
            &path,
            &rgb,
            with_alpha.then_some(&alpha),
            &recipe.text_chunks(),
            ExistingFile::Overwrite,
        )
        .expect("the seed PNG exports");
        seeds.push(std::fs::read(&path).expect("the seed PNG reads"));
    }
    let mut ztxt = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut ztxt, 2, 2);
        encoder.set_color(png::ColorType::Rgb);
        encoder
            .add_ztxt_chunk("parameters".into(), "a cat\nSteps: 20, Seed: 1".into())
            .expect("zTXt chunk");
        let mut writer = encoder.write_header().expect("PNG header");
        writer.write_image_data(&[0; 12]).expect("PNG data");
    }
    seeds.push(ztxt);
    seeds
}

pub fn png_text(check: fn(Target)) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let seeds = recipe_seeds(dir.path());
    let run = |input: &[u8]| -> Depth {
        let path = as_file(dir.path(), input);
        match read_png_text(&path) {
            Ok(chunks) => {
                // The recipe is JSON in the `unitune` chunk; reading it back must not panic.
                for (key, text) in &chunks {
                    if key == "unitune" {
                        let _ = serde_json::from_str::<serde_json::Value>(text);
                    }
                }
                1 + u32::from(!chunks.is_empty())
            }
            Err(_) => 0,
        }
    };
    check(Target {
        name: "png_text",
        seeds,
        mutate: mutate::png,
        run: &run,
    });
}
