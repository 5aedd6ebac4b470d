//! `unitune generate`: text to image.

use std::path::PathBuf;

use anyhow::Result;

use super::args::{GenerateArgs, GlobalOptions};
use super::cancel::CancelFlag;
use super::checks::{check_common, check_prompt, output_path};
use super::model::load_service;
use super::outputs::announce;
use super::outputs::{Output, check_outputs, command_inputs};
use super::preview::{PreviewFile, check_preview_options, open_previews, preview_output};
use super::progress::{sampling_observer, step_bar, warn_if_truncated};
use crate::imaging;
use crate::service::{GenerateSpec, choose_seed};

pub fn generate_command(
    global: &GlobalOptions,
    args: &GenerateArgs,
    cancel: &CancelFlag,
) -> Result<()> {
    check_prompt(&args.prompt)?;
    check_common(&args.sampling)?;
    check_preview_options(&args.previews)?;
    let size = args.size.as_deref().map(imaging::parse_size).transpose()?;
    let seed = choose_seed(args.sampling.seed);
    // Every file this run will write, checked before anything is computed.
    let (path, existing) =
        output_path(&args.sampling, PathBuf::from(format!("unitune-{seed}.png")));
    let out = Output {
        flag: "--out",
        path: path.clone(),
        existing,
    };
    let preview = preview_output(&args.previews, &path, args.sampling.overwrite);
    let outputs: Vec<Output> = std::iter::once(out).chain(preview.clone()).collect();
    let inputs = command_inputs(global)?;
    check_outputs(
        &outputs,
        &inputs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    )?;

    let service = load_service(global, None)?;
    eprintln!("seed: {seed}");
    warn_if_truncated(&service, &args.prompt);
    let spec = GenerateSpec {
        prompt: args.prompt.clone(),
        seed,
        sampling_steps: args.sampling.sampling_steps,
        guidance_weight: args.sampling.guidance,
        size,
    };
    let previews = open_previews(global, &service, &args.previews);
    let mut preview =
        preview.and_then(|p| PreviewFile::new(&previews, args.previews.preview, p.path));
    if let Some(preview) = &preview {
        eprintln!("live preview: {}", preview.path().display());
    }
    let bar = step_bar("sampling");
    let mut observer = sampling_observer(&bar, cancel, preview.as_mut());
    let generated = service.generate(&spec, &mut observer);
    bar.finish_and_clear();
    let (image, recipe) = generated?;
    eprintln!("size: {}x{}", image.width(), image.height());
    imaging::export_image(&path, &image, None, &recipe.text_chunks(), existing)?;
    announce(&path);
    Ok(())
}
