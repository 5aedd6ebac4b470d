//! `unitune edit` (fine-tune on the photo unless cached, then edit it by text, or by
//! instruction with an InstructPix2Pix model) and `unitune grid` (the paper's figure 10).
//! Both map their flags onto the edit service's [`EditSpec`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::UsageError;
use super::args::{EditArgs, GlobalOptions, GridArgs, RegionArg};
use super::cancel::CancelFlag;
use super::checks::{
    check_guidance, check_output_extension, check_prompt, check_sampling_steps, training_choice,
};
use super::model::{load_service, snapshot_cache};
use super::outputs::announce;
use super::outputs::{Output, check_outputs, command_inputs};
use super::preview::{PreviewFile, check_preview_options, open_previews, preview_output};
use super::progress::{sampling_observer, step_bar, tune_with_progress, warn_if_truncated};
use super::tune::{file_name, load_photo, requested_size, say_working_size, write_lora};
use crate::engine::edit::model_prompt;
use crate::engine::region;
use crate::engine::sampling::StepView;
use crate::imaging::{self, DecodeLimits};
use crate::recipe::{Recipe, RecipeSettings, RegionSetting};
use crate::service::plan::FIDELITY_RANGE;
use crate::service::{
    EditKind, EditKnobs, EditPlan, EditService, EditSpec, Edited, EstimatedRegion, Region,
    RegionScope, TrainingChoice, TuneRequest, WorkingSize, check_lora_export, choose_seed,
};

/// The most variants one `edit` makes (as AUTOMATIC1111's batch count): more is a typo, not
/// a plan.
const MAX_SAMPLES: usize = 100;

/// Which flags were given on the command line (not left at their defaults): those win over
/// a `--recipe`.
pub type Given<'a> = &'a dyn Fn(&str) -> bool;

/// Refuses bad edit flags before anything slow starts.
fn check_edit_flags(args: &EditArgs) -> Result<()> {
    if let Some(f) = args.fidelity
        && !FIDELITY_RANGE.contains(&f)
    {
        return Err(UsageError(format!("--fidelity must be between 0 and 1, got {f}")).into());
    }
    if args.instruct.is_none() && args.recipe.is_none() && args.image_guidance.is_some() {
        return Err(UsageError(
            "--image-guidance applies to instruction edits only (--instruct)".into(),
        )
        .into());
    }
    if let Some(image_guidance) = args.image_guidance
        && (!image_guidance.is_finite() || image_guidance < 0.0)
    {
        return Err(UsageError(format!(
            "--image-guidance must be a number of at least 0, got {image_guidance}"
        ))
        .into());
    }
    if let Some(t0) = args.t0
        && !(0.0..=1.0).contains(&t0)
    {
        return Err(UsageError(format!("--t0 must be between 0 and 1, got {t0}")).into());
    }
    if let Some(guidance) = args.guidance {
        check_guidance(guidance)?;
    }
    check_sampling_steps(args.sampling_steps)?;
    if let Some(threshold) = args.region_threshold
        && !(0.0..=1.0).contains(&threshold)
    {
        return Err(UsageError(format!(
            "--region-threshold must be between 0 and 1, got {threshold}"
        ))
        .into());
    }
    if !(1..=MAX_SAMPLES).contains(&args.samples) {
        return Err(UsageError(format!(
            "--samples must be between 1 and {MAX_SAMPLES}, not {}",
            args.samples
        ))
        .into());
    }
    if args
        .baseline_prompt
        .as_deref()
        .is_some_and(|b| b.trim().is_empty())
    {
        return Err(UsageError(
            "--baseline-prompt is empty; describe the photo as it is, or leave the flag out".into(),
        )
        .into());
    }
    if let Some(out) = &args.out {
        check_output_extension(out)?;
    }
    check_preview_options(&args.previews)
}

/// The recipe a `--recipe` PNG holds.
fn read_recipe(path: &Path) -> Result<RecipeSettings> {
    let chunks = imaging::read_png_text(path)?;
    RecipeSettings::from_text_chunks(&chunks).ok_or_else(|| {
        UsageError(format!(
            "--recipe {}: the image holds no recipe (unitune writes one into every PNG it exports)",
            path.display()
        ))
        .into()
    })
}

/// What the edit asks for once the flags and a `--recipe` are put together: flags given on
/// the command line win, the recipe fills in the rest.
struct Asked {
    kind: EditKind,
    prompt: String,
    baseline_prompt: Option<String>,
    knobs: EditKnobs,
    seed: u64,
    sampling_steps: usize,
    interpolate: bool,
    training: TrainingChoice,
    region: RegionArg,
    region_threshold: f64,
    /// The recipe's model and hash, to say when another model repeats it.
    recipe_model: Option<(String, String)>,
}

fn asked(args: &EditArgs, given: Given) -> Result<Asked> {
    let recipe = args.recipe.as_deref().map(read_recipe).transpose()?;
    let mut training = training_choice(&args.training)?;
    let (kind, prompt) = match (&args.instruct, &args.prompt, &recipe) {
        (Some(instruction), _, _) => (EditKind::Instruct, instruction.clone()),
        (None, Some(prompt), _) => (EditKind::Describe, prompt.clone()),
        (None, None, Some(r)) if r.instruct => (EditKind::Instruct, r.prompt.clone()),
        (None, None, Some(r)) => (EditKind::Describe, r.prompt.clone()),
        // clap asks for one of the three.
        (None, None, None) => (EditKind::Describe, String::new()),
    };
    let mut knobs = EditKnobs {
        fidelity: args.fidelity,
        tune_steps: args.tune_steps,
        t0_fraction: args.t0,
        guidance_weight: args.guidance,
        image_guidance: args.image_guidance,
    };
    let mut asked = Asked {
        kind,
        prompt,
        baseline_prompt: args.baseline_prompt.clone(),
        knobs,
        seed: choose_seed(args.seed),
        sampling_steps: args.sampling_steps,
        interpolate: args.interpolate,
        training: training.clone(),
        region: args.region.clone().unwrap_or(match kind {
            // The benchmark's finding (docs/edit-quality.md): at every fidelity the automatic
            // region succeeds as often and keeps more of the photo.
            EditKind::Describe => RegionArg::Auto,
            // Its estimate needs a text-to-image model; instructions edit everywhere.
            EditKind::Instruct => RegionArg::All,
        }),
        region_threshold: args.region_threshold.unwrap_or(region::DEFAULT_THRESHOLD),
        recipe_model: None,
    };
    let Some(recipe) = recipe else {
        return Ok(asked);
    };
    // A fidelity given now chooses the numbers itself; otherwise the recipe's own numbers
    // repeat the edit exactly, whatever this model's table would choose.
    if args.fidelity.is_none() {
        knobs.fidelity = recipe.fidelity;
        knobs.tune_steps = knobs.tune_steps.or(recipe.tune_steps);
        knobs.t0_fraction = knobs.t0_fraction.or(recipe.t0_fraction);
        knobs.guidance_weight = knobs.guidance_weight.or(recipe.guidance_weight);
        knobs.image_guidance = knobs.image_guidance.or(recipe.image_guidance);
    }
    if let Some(tuning) = &recipe.tuning
        && let Some(settings) = tuning.settings(&Default::default())
    {
        let from_recipe = TrainingChoice {
            mode: settings.mode,
            optimizer: settings.optimizer.kind,
            learning_rate: settings.optimizer.learning_rate,
            master_weights: settings.optimizer.master_weights,
            snapshot_steps: settings.snapshot_steps.clone(),
            batch_size: settings.batch_size,
            token: settings.token.clone(),
            seed: settings.seed,
            ..training.clone()
        };
        // Each training flag given now wins over the recipe's.
        if !given("train") && !given("lora_rank") {
            training.mode = from_recipe.mode;
        }
        if !given("optimizer") {
            training.optimizer = from_recipe.optimizer;
        }
        if !given("lr") {
            training.learning_rate = from_recipe.learning_rate;
        }
        if !given("no_master_weights") {
            training.master_weights = from_recipe.master_weights;
        }
        if !given("snapshots") {
            training.snapshot_steps = from_recipe.snapshot_steps;
        }
        if !given("token") {
            training.token = from_recipe.token;
        }
        if !given("tune_seed") {
            training.seed = from_recipe.seed;
        }
        training.batch_size = from_recipe.batch_size;
    }
    asked.knobs = knobs;
    asked.training = training;
    asked.baseline_prompt = asked
        .baseline_prompt
        .or_else(|| (!recipe.baseline_prompt.is_empty()).then(|| recipe.baseline_prompt.clone()));
    asked.seed = args.seed.or(recipe.seed).unwrap_or(asked.seed);
    if !given("sampling_steps") {
        asked.sampling_steps = recipe.sampling_steps.unwrap_or(asked.sampling_steps);
    }
    asked.interpolate |= recipe.interpolate;
    if args.region.is_none() {
        match recipe.region {
            Some(RegionSetting::Auto(threshold)) => {
                asked.region = RegionArg::Auto;
                asked.region_threshold = args.region_threshold.unwrap_or(threshold);
            }
            Some(RegionSetting::All) => asked.region = RegionArg::All,
            Some(RegionSetting::Mask) => {
                eprintln!(
                    "note: the recipe's edit was masked; give the mask with --region FILE to repeat it"
                );
            }
            None => {}
        }
    }
    asked.recipe_model = recipe.model.zip(recipe.model_hash);
    Ok(asked)
}

/// `photo.jpg` -> `photo-edit.png` in the current folder (the photo's folder may be
/// read-only, e.g. a camera card).
fn default_edit_path(image: &Path) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "photo".into());
    PathBuf::from(format!("{stem}-edit.png"))
}

/// `out.png` with sample index k of n: `out.png` for one sample, else `out-1.png`, `out-2.png`.
fn numbered(path: &Path, k: usize, n: usize) -> PathBuf {
    if n == 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{}.{}", k + 1, ext.to_string_lossy()),
        None => format!("{stem}-{}", k + 1),
    };
    path.with_file_name(name)
}

pub fn edit_command(
    global: &GlobalOptions,
    args: &EditArgs,
    given: Given,
    cancel: &CancelFlag,
) -> Result<()> {
    let asked = asked(args, given)?;
    check_prompt(&asked.prompt)?;
    check_edit_flags(args)?;
    check_region(args, &asked)?;
    check_training_flags(args, &asked.training)?;
    let size = requested_size(args.size.as_deref())?;

    let EditOutputs {
        samples,
        preview,
        region: region_out,
    } = edit_outputs(global, args)?;

    // Read the inputs before the slow parts, so a bad file fails at once.
    let photo = load_photo(&args.image)?;
    let (photo_w, photo_h) = photo.dimensions();
    let region = match &asked.region {
        RegionArg::All => Region::All,
        RegionArg::Auto => Region::Auto {
            threshold: asked.region_threshold,
        },
        RegionArg::File(path) => Region::Mask {
            mask: Arc::new(imaging::load_mask(
                path,
                &DecodeLimits::default(),
                photo_w,
                photo_h,
            )?),
            name: file_name(path).unwrap_or_else(|| "given".to_owned()),
        },
    };
    let mut service = load_service(global, snapshot_cache(&args.training)?)?;
    note_other_model(asked.recipe_model.as_ref(), &service);
    service.check_kind(asked.kind)?;
    let plan = service.plan(asked.kind, &asked.knobs, &asked.training.snapshot_steps);
    let settings = asked.training.settings(Some(plan.tune_steps))?;
    say_working_size(&service, (photo_w, photo_h), size)?;
    let (alpha, file_rgb, metadata) = (photo.alpha, photo.file_rgb, photo.metadata);
    let photo = Arc::new(photo.rgb);
    let original = imaging::Original {
        over_white: &photo,
        alpha: alpha.as_ref(),
        file_rgb: file_rgb.as_ref(),
        metadata: &metadata,
    };
    if plan.tune_steps > 0 {
        let request = TuneRequest {
            photo: &photo,
            settings: &settings,
            size,
            reconstruct_every: None,
            lighter_mode_if_short: true,
        };
        tune_with_progress(&mut service, &request, cancel)?;
        if let Some(path) = &args.export_lora {
            write_lora(
                &service,
                plan.tune_steps,
                path,
                &args.image,
                &settings.token,
            )?;
        }
    }
    let token = (plan.tune_steps > 0).then_some(settings.token.as_str());
    warn_if_truncated(&service, &model_prompt(token, &asked.prompt));
    say_edit_plan(&plan, asked.seed);

    let previews = open_previews(global, &service, &args.previews);
    let mut preview =
        preview.and_then(|p| PreviewFile::new(&previews, args.previews.preview, p.path));
    if let Some(preview) = &preview {
        eprintln!("live preview: {}", preview.path().display());
    }
    let spec = EditSpec {
        photo: Arc::clone(&photo),
        photo_name: file_name(&args.image),
        region,
        kind: asked.kind,
        prompt: asked.prompt.clone(),
        baseline_prompt: asked.baseline_prompt.clone(),
        knobs: asked.knobs,
        seed: asked.seed,
        sampling_steps: asked.sampling_steps,
        interpolate: asked.interpolate,
        size,
    };
    for (k, output) in samples.iter().enumerate() {
        let spec = EditSpec {
            seed: asked.seed + k as u64,
            ..spec.clone()
        };
        let bar = step_bar(&format!("sample {}/{}", k + 1, args.samples));
        let mut observer = sampling_observer(&bar, cancel, preview.as_mut());
        let edited = service.edit(&spec, &mut observer);
        bar.finish_and_clear();
        let edited = edited?;
        // Every sample has the same region (it depends on the prompt, not the seed).
        if k == 0
            && let Some(region) = &edited.region
        {
            say_region(region);
            if let Some(out) = &region_out {
                write_region(out, region)?;
            }
        }
        save_edit(output, &edited, &original)?;
    }
    Ok(())
}

/// Refuses bad training flags before anything slow starts; the run's length waits for the
/// model's table.
fn check_training_flags(args: &EditArgs, training: &TrainingChoice) -> Result<()> {
    let requested = training.settings(args.tune_steps)?;
    if let Some(path) = &args.export_lora {
        check_lora_export(path, &requested)?;
        // The tables never choose 0 steps (the ladder is never empty); only the flag can.
        if args.tune_steps == Some(0) {
            return Err(UsageError(
                "--export-lora needs a fine-tune, and --tune-steps 0 skips it".into(),
            )
            .into());
        }
    }
    Ok(())
}

/// Refuses region flags that cannot apply: a threshold or `--region-out` without an automatic
/// region, and an automatic region for an instruction.
fn check_region(args: &EditArgs, asked: &Asked) -> Result<()> {
    let auto = asked.region == RegionArg::Auto;
    if !auto && args.region_threshold.is_some() {
        return Err(UsageError("--region-threshold applies to --region auto".into()).into());
    }
    if !auto && args.region_out.is_some() {
        return Err(UsageError(
            "--region-out writes the automatic region; it needs --region auto".into(),
        )
        .into());
    }
    if auto && asked.kind == EditKind::Instruct {
        return Err(UsageError(
            "--region auto needs a description of the result, not an instruction; for an instruction, give the region as a mask file".into(),
        )
        .into());
    }
    Ok(())
}

/// Says so when a recipe is repeated with another model than the one that made it (its name
/// and hash), since the result will differ.
fn note_other_model(recipe_model: Option<&(String, String)>, service: &EditService) {
    let identity = service.identity();
    if let Some((model, hash)) = recipe_model
        && *hash != identity.hash
    {
        eprintln!(
            "note: the recipe was made with {model} (hash {hash}); repeating it with {} (hash {})",
            identity.name, identity.hash
        );
    }
}

/// Every file an edit writes besides the LoRA export (checked beside them).
struct EditOutputs {
    samples: Vec<Output>,
    preview: Option<Output>,
    /// `--region-out`.
    region: Option<Output>,
}

/// Every file an edit will write, checked before anything is computed: the numbered samples,
/// the live preview and the region, with the LoRA export checked beside them.
fn edit_outputs(global: &GlobalOptions, args: &EditArgs) -> Result<EditOutputs> {
    let base_out = args
        .out
        .clone()
        .unwrap_or_else(|| default_edit_path(&args.image));
    let samples: Vec<Output> = (0..args.samples)
        .map(|k| {
            let wanted = numbered(&base_out, k, args.samples);
            match &args.out {
                Some(_) => Output::new("--out", &wanted, args.overwrite),
                // Default names never replace anything: the next free one is taken.
                None => Output::new("--out", &imaging::next_free_path(&wanted), false),
            }
        })
        .collect();
    let preview = preview_output(&args.previews, &base_out, args.overwrite);
    let lora = args
        .export_lora
        .as_deref()
        .map(|path| Output::new("--export-lora", path, args.overwrite));
    if let Some(path) = &args.region_out {
        check_output_extension(path)?;
    }
    let region = args
        .region_out
        .as_deref()
        .map(|path| Output::new("--region-out", path, args.overwrite));
    let outputs: Vec<Output> = samples
        .iter()
        .cloned()
        .chain(preview.clone())
        .chain(lora)
        .chain(region.clone())
        .collect();
    let mut inputs = command_inputs(global)?;
    inputs.extend(
        [
            Some(args.image.clone()),
            args.region
                .as_ref()
                .and_then(RegionArg::file)
                .map(Path::to_path_buf),
            args.recipe.clone(),
        ]
        .into_iter()
        .flatten(),
    );
    check_outputs(
        &outputs,
        &inputs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    )?;
    Ok(EditOutputs {
        samples,
        preview,
        region,
    })
}

/// One line saying how the edit will be made.
fn say_edit_plan(plan: &EditPlan, seed: u64) {
    eprintln!("editing: {}, first seed {seed}", plan.describe());
}

/// Writes one sample with the photo's alpha, file colour and metadata, and says where.
/// One line on the automatic region: how much of the photo it is, or that it is all of it.
fn say_region(region: &EstimatedRegion) {
    match region.scope {
        RegionScope::Whole => eprintln!(
            "region: the whole photo (the prompt changes {:.0}% of it: a global edit)",
            region.coverage * 100.0
        ),
        RegionScope::Background => eprintln!(
            "region: the photo's background, {:.0}% of it (the prompt names a background); the objects on it are kept exactly",
            region.share() * 100.0
        ),
        RegionScope::Local => eprintln!(
            "region: {:.0}% of the photo; everything else is kept exactly",
            region.coverage * 100.0
        ),
    }
}

/// `--region-out`: the automatic region as a black-and-white PNG (white = may change).
fn write_region(output: &Output, region: &EstimatedRegion) -> Result<()> {
    let rgb = imaging::gray_to_rgb(&region.mask);
    imaging::export_image(&output.path, &rgb, None, &[], output.existing)
        .with_context(|| format!("the region was not saved to {}", output.path.display()))?;
    announce(&output.path);
    Ok(())
}

fn save_edit(output: &Output, edited: &Edited, original: &imaging::Original) -> Result<()> {
    let Output { path, existing, .. } = output;
    imaging::export_edit(
        path,
        &edited.image,
        original,
        &edited.recipe.text_chunks(),
        *existing,
    )
    .with_context(|| format!("the edit was not saved to {}", path.display()))?;
    announce(path);
    Ok(())
}

pub fn grid_command(global: &GlobalOptions, args: &GridArgs, cancel: &CancelFlag) -> Result<()> {
    check_prompt(&args.prompt)?;
    check_output_extension(&args.out)?;
    if args.t0_values.is_empty() || args.t0_values.iter().any(|t| !(0.0..=1.0).contains(t)) {
        return Err(UsageError("--t0-values must be numbers between 0 and 1".into()).into());
    }
    check_sampling_steps(args.sampling_steps)?;
    check_guidance(args.guidance)?;
    let settings = training_choice(&args.training)?.settings(None)?;
    let seed = choose_seed(args.seed);
    let size = requested_size(args.size.as_deref())?;
    let out = Output::new("--out", &args.out, args.overwrite);
    let mut inputs = command_inputs(global)?;
    inputs.push(args.image.clone());
    check_outputs(
        std::slice::from_ref(&out),
        &inputs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    )?;
    let photo = load_photo(&args.image)?;
    let mut service = load_service(global, snapshot_cache(&args.training)?)?;
    let (ww, wh) = service.working_size(photo.dimensions(), size)?;
    eprintln!("working size: {ww}x{wh}");
    let request = TuneRequest {
        photo: &photo.rgb,
        settings: &settings,
        size,
        reconstruct_every: None,
        lighter_mode_if_short: true,
    };
    let tuned = tune_with_progress(&mut service, &request, cancel)?;

    // Cells at the working size: the grid compares settings, not resolutions.
    let working = Arc::new(imaging::resize_rgb(&photo.rgb, ww, wh));
    let columns: Vec<usize> = std::iter::once(0).chain(tuned.snapshot_steps).collect();
    let bar = step_bar("grid");
    bar.set_length((columns.len() * args.t0_values.len()) as u64);
    let mut rows = Vec::with_capacity(args.t0_values.len());
    let mut first_recipe: Option<Recipe> = None;
    for &t0 in &args.t0_values {
        let mut row = Vec::with_capacity(columns.len());
        for &steps in &columns {
            let spec = EditSpec {
                photo_name: file_name(&args.image),
                knobs: EditKnobs {
                    tune_steps: Some(steps),
                    t0_fraction: Some(t0),
                    guidance_weight: Some(args.guidance),
                    ..EditKnobs::default()
                },
                seed,
                sampling_steps: args.sampling_steps,
                size: WorkingSize::AsIs,
                ..EditSpec::new(working.clone(), &args.prompt)
            };
            let mut observer = |_: &StepView| cancel.check();
            let edited = service.edit(&spec, &mut observer)?;
            if steps > 0 && first_recipe.is_none() {
                first_recipe = Some(edited.recipe);
            }
            row.push(edited.image);
            bar.inc(1);
        }
        rows.push(row);
    }
    bar.finish_and_clear();
    let column_labels: Vec<String> = columns
        .iter()
        .map(|s| {
            if *s == 0 {
                "no fine-tuning".to_string()
            } else {
                format!("{s} steps")
            }
        })
        .collect();
    let row_labels: Vec<String> = args
        .t0_values
        .iter()
        .map(|t| format!("t0 {t:.2}"))
        .collect();
    let title = format!("{} | guidance {} | seed {seed}", args.prompt, args.guidance);
    let grid = imaging::labelled_grid(&rows, &column_labels, &row_labels, Some(&title))?;
    // The fine-tuned cells' recipe, for the whole grid: every snapshot, every t0.
    let recipe = first_recipe.map(|cell| Recipe {
        mode: "grid".into(),
        t0_fraction: None,
        fidelity: None,
        tune_steps: settings.total_steps(),
        width: grid.width(),
        height: grid.height(),
        ..cell
    });
    let chunks = recipe.map(|r| r.text_chunks()).unwrap_or_default();
    imaging::export_image(&args.out, &grid, None, &chunks, out.existing)
        .with_context(|| format!("the grid was not saved to {}", args.out.display()))?;
    announce(&args.out);
    Ok(())
}
