//! `unitune generate`: text to image.

use std::path::PathBuf;

use anyhow::Result;

use super::args::{GenerateArgs, GlobalOptions};
use super::cancel::CancelFlag;
use super::recipe::{Recipe, program};
use super::session::{
    check_common, check_prompt, choose_seed, load_model, output_path, run_sampling,
};
use crate::engine::sampling::{SampleRequest, Start};
use crate::imaging;

pub fn generate_command(
    global: &GlobalOptions,
    args: &GenerateArgs,
    cancel: &CancelFlag,
) -> Result<()> {
    check_prompt(&args.prompt)?;
    check_common(&args.sampling)?;
    let requested = args.size.as_deref().map(imaging::parse_size).transpose()?;
    let seed = choose_seed(&args.sampling);

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
    let output = run_sampling(model, &request, "sampling", cancel)?;

    let recipe = Recipe {
        mode: "generate",
        prompt: args.prompt.clone(),
        model_prompt: args.prompt.clone(),
        baseline_prompt: String::new(),
        seed,
        sampling_steps: args.sampling.sampling_steps,
        sampler: "DDIM",
        guidance_weight: args.sampling.guidance,
        t0: None,
        fidelity: None,
        tune_steps: 0,
        tuning: None,
        mask: None,
        interpolate: false,
        width,
        height,
        working_width: width,
        working_height: height,
        model: loaded.name.clone(),
        prediction_type: model.config.scheduler.prediction_type.as_str(),
        source_image: None,
        program: program(),
        revision: crate::build_info::GIT_REVISION,
    };
    let (path, existing) =
        output_path(&args.sampling, PathBuf::from(format!("unitune-{seed}.png")));
    imaging::export_image(&path, &output.image, None, &recipe.text_chunks(), existing)?;
    println!("{}", path.display());
    Ok(())
}
