//! `unitune generate`: text to image.

use std::path::PathBuf;

use anyhow::Result;

use super::args::{GenerateArgs, GlobalOptions};
use super::cancel::CancelFlag;
use super::preview::{PreviewFile, check_preview_options, open_previews, preview_path};
use super::session::{
    check_common, check_prompt, choose_seed, load_model, output_path, run_sampling,
};
use crate::engine::sampling::{SampleRequest, Start};
use crate::imaging;
use crate::recipe::Recipe;

pub fn generate_command(
    global: &GlobalOptions,
    args: &GenerateArgs,
    cancel: &CancelFlag,
) -> Result<()> {
    check_prompt(&args.prompt)?;
    check_common(&args.sampling)?;
    check_preview_options(&args.previews)?;
    let requested = args.size.as_deref().map(imaging::parse_size).transpose()?;
    let seed = choose_seed(args.sampling.seed);

    let loaded = load_model(global)?;
    let model = &loaded.model;
    let side = model.config.native_image_side().unwrap_or(512) as u32;
    let (width, height) = imaging::working_size(side, side, side, requested)?;
    eprintln!("seed: {seed}, size: {width}x{height}");

    let request = SampleRequest {
        prompt: &args.prompt,
        baseline_prompt: "",
        guidance_weight: args.sampling.guidance,
        sampling_steps: args.sampling.sampling_steps,
        seed,
        start: Start::Noise {
            width: width as usize,
            height: height as usize,
        },
    };
    let (path, existing) =
        output_path(&args.sampling, PathBuf::from(format!("unitune-{seed}.png")));
    let previews = open_previews(global, &loaded, &args.previews);
    let mut preview = PreviewFile::new(
        &previews,
        args.previews.preview,
        preview_path(&args.previews, &path),
    );
    if let Some(preview) = &preview {
        eprintln!("live preview: {}", preview.path().display());
    }
    let output = run_sampling(model, &request, "sampling", cancel, preview.as_mut())?;

    let recipe = Recipe {
        seed,
        sampling_steps: args.sampling.sampling_steps,
        guidance_weight: args.sampling.guidance,
        width,
        height,
        working_width: width,
        working_height: height,
        loras: loaded.loras.clone(),
        ..Recipe::new(
            "generate",
            &args.prompt,
            &loaded.name,
            loaded.prediction_type(),
            loaded.precision(),
        )
    };
    imaging::export_image(&path, &output.image, None, &recipe.text_chunks(), existing)?;
    println!("{}", path.display());
    Ok(())
}
