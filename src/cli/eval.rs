//! `unitune eval`: the edit-quality benchmark. Scenes of the demo world are edited by every
//! method and setting, each result is read back by the world's scorer, and success (the asked
//! change is there) and fidelity (what was not asked for is unchanged) are tallied per
//! setting, printed, written as JSON and drawn as a trade-off plot.
//!
//! Methods (one curve each; t0 sweeps over `--t0-values`):
//! - SDEdit: the model as it is, prompt alone (UniTune's baseline, the paper's figure 6);
//! - UniTune at each snapshot: "token prompt" from the photo fine-tuned that many steps;
//! - UniTune with prompt guidance (the scene's full caption as the baseline), with
//!   interpolation, and with a mask of the edited region, each at the middle snapshot;
//! - the fidelity slider at 0, 0.25, 0.5, 0.75 and 1, through the model's fidelity table.
//!
//! Also the paper's figure 3: the bare token, sampled from pure noise, at each snapshot
//! (snapshot 0 = the untuned model given the token), scored by how much of the scene it
//! reconstructs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use image::{GrayImage, RgbImage, imageops::FilterType};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::UsageError;
use super::args::{EvalArgs, EvalMethod, GlobalOptions};
use super::cancel::CancelFlag;
use super::checks::{check_sampling_steps, training_choice};
use super::model::{load_service, snapshot_cache};
use super::progress::{step_bar, tune_with_progress};
use crate::engine::fidelity::{EditParameters, FidelityTable};
use crate::engine::sampling::StepView;
use crate::imaging::{self, TradeOffCurve};
use crate::service::{
    EditKnobs, EditService, EditSpec, EstimatedRegion, Region, RegionScope, TuneRequest,
    WorkingSize,
};
use crate::world::{self, Column, Edit, Object, Row, Scene, Shape, Size};

/// The slider positions the benchmark measures.
pub const SLIDER_POSITIONS: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

/// One way of making an edit: a point on one method's curve.
#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    /// The curve: "SDEdit", "UniTune, 64 steps", "fidelity slider", ...
    pub method: String,
    /// The point on it: "t0 0.80", "fidelity 0.50".
    pub label: String,
    pub tune_steps: usize,
    pub t0_fraction: f64,
    pub guidance_weight: f64,
    pub prompt_guidance: bool,
    pub interpolate: bool,
    pub region: EvalRegion,
}

impl Setting {
    /// What the sample depends on besides the edit: two settings with the same key (the
    /// slider's low positions share a snapshot and t0; its middle is a point of the t0 sweep)
    /// make the same image from the same seed, so each edit makes it once.
    fn sample_key(&self) -> (usize, u64, u64, bool, bool, EvalRegion) {
        (
            self.tune_steps,
            self.t0_fraction.to_bits(),
            self.guidance_weight.to_bits(),
            self.prompt_guidance,
            self.interpolate,
            self.region,
        )
    }
}

/// Where a setting lets the edit change the scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalRegion {
    /// Everywhere.
    All,
    /// The region the world knows the edit changes (`Edit::mask`).
    Oracle,
    /// Estimated from the prompt (`--region auto`).
    Auto,
}

/// A setting's tally over every edit.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub method: String,
    pub label: String,
    pub tune_steps: usize,
    pub t0_fraction: f64,
    pub guidance_weight: f64,
    pub edits: usize,
    /// The share of edits whose asked change is there.
    pub success: f64,
    /// The mean share of unasked attributes that are unchanged.
    pub fidelity: f64,
    /// Bootstrap 95% intervals of the two (edits resampled with replacement).
    pub success_interval: (f64, f64),
    pub fidelity_interval: (f64, f64),
}

/// How well the automatic region found one edit's true region (at the middle snapshot).
#[derive(Debug, Clone, Serialize)]
pub struct RegionScore {
    pub scene: usize,
    pub edit: String,
    pub kind: &'static str,
    /// Intersection over union with the pixels the edit changes in the scene (`Edit::changed`).
    pub iou: f64,
    /// Share of the image at or above the threshold.
    pub coverage: f64,
    /// The difference's median over its mean (global from 0.75).
    pub evenness: f64,
    /// Judged global (evenness at least 0.75): the scope is the background or the whole photo.
    pub global: bool,
    /// Local, background or whole photo.
    pub scope: &'static str,
    /// The estimate's time over the time of one edit at the default fidelity.
    pub cost: f64,
}

/// Figure 3: how much of the scene the bare token gives back after so many steps.
#[derive(Debug, Clone, Serialize)]
pub struct Reconstruction {
    pub tune_steps: usize,
    pub scenes: usize,
    /// Mean share of the scene's attributes read back.
    pub agreement: f64,
    /// Scenes read back exactly.
    pub exact: usize,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    model: &'a str,
    fidelity_table: &'a str,
    scenes: usize,
    edits: usize,
    sampling_steps: usize,
    seed: u64,
    reconstruction: Vec<Reconstruction>,
    summary: Vec<Summary>,
    regions: Vec<RegionScore>,
    paired: Vec<PairedGain>,
    samples: Vec<SampleScore>,
}

/// The automatic region against no region at one slider position, edit by edit (the same
/// edits and seeds, so the differences are paired).
#[derive(Debug, Clone, Serialize)]
pub struct PairedGain {
    pub label: String,
    pub edits: usize,
    /// Mean of (fidelity with the region - without), and its bootstrap 95% interval.
    pub fidelity_gain: f64,
    pub fidelity_gain_interval: (f64, f64),
    /// Edits that succeed only with the region, and only without it.
    pub won: usize,
    pub lost: usize,
}

#[derive(Debug, Clone, Serialize)]
struct SampleScore {
    scene: usize,
    /// How the scene's photo was made: "rendered" or "sampled".
    source: &'static str,
    edit: String,
    method: String,
    label: String,
    success: bool,
    fidelity: f32,
}

pub fn eval_command(global: &GlobalOptions, args: &EvalArgs, cancel: &CancelFlag) -> Result<()> {
    check_eval_flags(args)?;
    let settings = training_choice(&args.training)?.settings(None)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut service = load_service(global, snapshot_cache(&args.training)?)?;
    let table = service.fidelity_table();
    let side = service.native_side();
    let plan = settings_plan(args, table, &settings.snapshot_steps);
    let mut cases = cases(args.scenes, args.seed);
    cases.extend(sampled_cases(&service, args.sampled_scenes, args, cancel)?);
    let edit_count: usize = cases.iter().map(|c| c.edits.len()).sum();
    eprintln!(
        "{} scenes, {edit_count} edits, {} settings each, fidelity table {}",
        cases.len(),
        plan.len(),
        table.name
    );

    let mut samples = Vec::new();
    let mut regions = Vec::new();
    let mut reconstructions: Vec<(usize, f32)> = Vec::new();
    let mut example_rows = Vec::new();
    // The pictures show the slider as an edit makes it by default: with the automatic region
    // when it is measured.
    let example_method = if args.methods.contains(&EvalMethod::AutoRegion) {
        SLIDER_AUTO
    } else {
        SLIDER
    };
    let (mut region_rows, mut region_labels) = (Vec::new(), Vec::new());
    let mut example_labels = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        eprintln!(
            "scene {} ({}): {}",
            index + 1,
            case.source,
            world::caption(&case.scene)
        );
        let working = Arc::new(to_working(&case.photo, side));
        let size = WorkingSize::AsIs;
        let request = TuneRequest {
            photo: &working,
            settings: &settings,
            size,
            reconstruct_every: None,
            lighter_mode_if_short: false,
        };
        let tuned = tune_with_progress(&mut service, &request, cancel)?;
        // Every sample of this scene: from its fine-tune, stopping between steps on Ctrl-C.
        let run = |service: &mut EditService, spec: &EditSpec| -> Result<RgbImage> {
            let mut observer = |_: &StepView| cancel.check();
            Ok(service.edit(spec, &mut observer)?.image)
        };
        for steps in std::iter::once(0).chain(tuned.snapshot_steps.iter().copied()) {
            let spec = reconstruction_spec(&working, &settings.token, steps, args, index);
            let read = world::read(&run(&mut service, &spec)?);
            reconstructions.push((steps, world::agreement(&case.scene, &read)));
        }
        let baseline = world::caption(&case.scene);
        let bar = step_bar(&format!("scene {}/{}", index + 1, cases.len()));
        bar.set_length((case.edits.len() * plan.len()) as u64);
        for (e, edit) in case.edits.iter().enumerate() {
            let prompt = &case.prompts[e];
            let mask = Arc::new(resize_mask(&edit.mask(&case.scene), side));
            if args.methods.contains(&EvalMethod::AutoRegion) {
                let spec = EditSpec {
                    knobs: EditKnobs {
                        fidelity: Some(0.5),
                        ..EditKnobs::default()
                    },
                    sampling_steps: args.sampling_steps,
                    size,
                    ..EditSpec::new(working.clone(), prompt)
                };
                let changed = resize_mask(&edit.changed(&case.scene), side);
                let (score, region) =
                    score_region(&mut service, &spec, &changed, args.region_threshold, cancel)?;
                region_rows.push(
                    [
                        working.as_ref().clone(),
                        imaging::gray_to_rgb(&region.difference),
                        imaging::gray_to_rgb(&region.mask),
                        imaging::gray_to_rgb(&changed),
                    ]
                    .map(|image| upscale(&imaging::resize_rgb(&image, side, side)))
                    .to_vec(),
                );
                region_labels.push(format!("\"{prompt}\""));
                regions.push(RegionScore {
                    scene: index,
                    edit: edit.describe(&case.scene),
                    kind: edit.kind(),
                    ..score
                });
            }
            let mut slider_row = vec![upscale(&working)];
            let mut record = |setting: &Setting, image: &RgbImage, score: &world::EditScore| {
                if setting.method == example_method {
                    slider_row.push(upscale(image));
                }
                samples.push(SampleScore {
                    scene: index,
                    source: case.source,
                    edit: edit.describe(&case.scene),
                    method: setting.method.clone(),
                    label: setting.label.clone(),
                    success: score.success,
                    fidelity: score.fidelity,
                });
                bar.inc(1);
            };
            let mut made = HashMap::new();
            for setting in &plan {
                if let Some((image, score)) = made.get(&setting.sample_key()) {
                    record(setting, image, score);
                    continue;
                }
                let spec = EditSpec {
                    baseline_prompt: setting.prompt_guidance.then(|| baseline.clone()),
                    knobs: EditKnobs {
                        tune_steps: Some(setting.tune_steps),
                        t0_fraction: Some(setting.t0_fraction),
                        guidance_weight: Some(setting.guidance_weight),
                        ..EditKnobs::default()
                    },
                    sampling_steps: args.sampling_steps,
                    seed: args.seed * 1000 + (index * 10 + e) as u64,
                    region: match setting.region {
                        EvalRegion::All => Region::All,
                        EvalRegion::Oracle => Region::Mask {
                            mask: mask.clone(),
                            name: "the edit's true region".to_owned(),
                        },
                        EvalRegion::Auto => Region::Auto {
                            threshold: args.region_threshold,
                        },
                    },
                    interpolate: setting.interpolate,
                    size,
                    ..EditSpec::new(working.clone(), prompt)
                };
                let image = run(&mut service, &spec)?;
                let score = world::score_edit(edit, &case.scene, &world::read(&image))
                    .expect("cases hold edits that apply");
                record(setting, &image, &score);
                made.insert(setting.sample_key(), (image, score));
            }
            example_labels.push(format!("\"{}\"", prompt));
            example_rows.push(slider_row);
        }
        bar.finish_and_clear();
    }

    let summary = summarize(&plan, &samples, args.seed);
    let reconstruction = summarize_reconstruction(&reconstructions);
    print_report(&summary, &reconstruction);
    print_regions(&regions);
    let paired = paired_region_gains(&samples, args.seed);
    print_paired(&paired);
    // Tables are read off the plain UniTune curves; without them there is nothing to propose.
    if args.methods.contains(&EvalMethod::Unitune) {
        print_proposed_table(&summary);
    }
    let curves = curves(&summary);
    let report = Report {
        model: &service.identity().name,
        fidelity_table: table.name,
        scenes: cases.len(),
        edits: edit_count,
        sampling_steps: args.sampling_steps,
        seed: args.seed,
        reconstruction,
        summary,
        regions,
        paired,
        samples,
    };
    let json = args.out.join("edit-quality.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    let plot = imaging::trade_off_plot(
        &curves,
        "success (the asked change is there)",
        "fidelity (the rest unchanged)",
    );
    save_png(&plot, &args.out.join("edit-quality.png"))?;
    if !region_rows.is_empty() {
        let columns = ["photo", "difference", "region", "what changes"].map(String::from);
        let shown = region_rows.len().min(EXAMPLE_ROWS);
        let grid = imaging::labelled_grid(
            &region_rows[..shown],
            &columns,
            &region_labels[..shown],
            None,
        )?;
        save_png(&grid, &args.out.join("region-examples.png"))?;
    }
    if example_rows.first().is_none_or(|row| row.len() == 1) {
        eprintln!("wrote {} and edit-quality.png", json.display());
        return Ok(());
    }
    save_slider_examples(&args.out, &example_rows, &example_labels)?;
    eprintln!(
        "wrote {}, edit-quality.png, slider-examples.png and example-edit.png",
        json.display()
    );
    Ok(())
}

/// Refuses bad eval flags before the model loads.
fn check_eval_flags(args: &EvalArgs) -> Result<()> {
    check_sampling_steps(args.sampling_steps)?;
    if args.scenes == 0 {
        return Err(UsageError("--scenes must be at least 1".into()).into());
    }
    if args.t0_values.is_empty() || args.t0_values.iter().any(|t| !(0.0..=1.0).contains(t)) {
        return Err(UsageError("--t0-values must be numbers between 0 and 1".into()).into());
    }
    if args.methods.is_empty() {
        return Err(UsageError("--methods must name at least one curve".into()).into());
    }
    if !(0.0..=1.0).contains(&args.region_threshold) {
        return Err(UsageError(format!(
            "--region-threshold must be between 0 and 1, got {}",
            args.region_threshold
        ))
        .into());
    }
    Ok(())
}

/// The slider's variants of every edit as one labelled grid (`slider-examples.png`), and the
/// first edit's row alone (`example-edit.png`, the README's picture).
fn save_slider_examples(out: &Path, rows: &[Vec<RgbImage>], labels: &[String]) -> Result<()> {
    let mut columns = vec!["photo".to_string()];
    columns.extend(SLIDER_POSITIONS.iter().map(|f| format!("fidelity {f}")));
    let shown = rows.len().min(EXAMPLE_ROWS);
    let examples = imaging::labelled_grid(&rows[..shown], &columns, &labels[..shown], None)?;
    save_png(&examples, &out.join("slider-examples.png"))?;
    let example = imaging::labelled_grid(&rows[..1], &columns, &[], None)?;
    save_png(&example, &out.join("example-edit.png"))
}

const SLIDER: &str = "fidelity slider";
/// The example pictures show the first edits only (the first four scenes'): a 72-edit run's
/// grids would be 10,000 pixels tall.
const EXAMPLE_ROWS: usize = 12;
const SLIDER_AUTO: &str = "fidelity slider + auto region";

/// Every setting each edit is made with, in the order of the curves (those `--methods` names).
fn settings_plan(args: &EvalArgs, table: &FidelityTable, snapshots: &[usize]) -> Vec<Setting> {
    let middle = table.parameters_for(0.5, snapshots).tune_steps;
    let wanted = |method: EvalMethod| args.methods.contains(&method);
    let sweep = |method: String, tune_steps: usize, options: (bool, bool, EvalRegion)| {
        args.t0_values
            .iter()
            .map(|&t0| Setting {
                method: method.clone(),
                label: format!("t0 {t0:.2}"),
                tune_steps,
                t0_fraction: t0,
                guidance_weight: args.guidance,
                prompt_guidance: options.0,
                interpolate: options.1,
                region: options.2,
            })
            .collect::<Vec<_>>()
    };
    let mut plan = Vec::new();
    if wanted(EvalMethod::Sdedit) {
        plan.extend(sweep("SDEdit".into(), 0, (false, false, EvalRegion::All)));
    }
    if wanted(EvalMethod::Unitune) {
        for &steps in snapshots {
            plan.extend(sweep(
                format!("UniTune, {steps} steps"),
                steps,
                (false, false, EvalRegion::All),
            ));
        }
    }
    if wanted(EvalMethod::PromptGuidance) {
        plan.extend(sweep(
            format!("UniTune {middle} + prompt guidance"),
            middle,
            (true, false, EvalRegion::All),
        ));
    }
    if wanted(EvalMethod::Interpolation) {
        plan.extend(sweep(
            format!("UniTune {middle} + interpolation"),
            middle,
            (false, true, EvalRegion::All),
        ));
    }
    if wanted(EvalMethod::Mask) {
        plan.extend(sweep(
            format!("UniTune {middle} + mask"),
            middle,
            (false, false, EvalRegion::Oracle),
        ));
    }
    if wanted(EvalMethod::AutoRegion) {
        plan.extend(sweep(
            format!("UniTune {middle} + auto region"),
            middle,
            (false, false, EvalRegion::Auto),
        ));
    }
    let slider = |method: &str, region: EvalRegion| {
        SLIDER_POSITIONS.map(|f| {
            let p = table.parameters_for(f, snapshots);
            Setting {
                method: method.into(),
                label: format!("fidelity {f:.2}"),
                tune_steps: p.tune_steps,
                t0_fraction: p.t0_fraction,
                guidance_weight: p.guidance_weight,
                prompt_guidance: false,
                interpolate: false,
                region,
            }
        })
    };
    if wanted(EvalMethod::Slider) {
        plan.extend(slider(SLIDER, EvalRegion::All));
    }
    if wanted(EvalMethod::AutoRegion) {
        plan.extend(slider(SLIDER_AUTO, EvalRegion::Auto));
    }
    plan
}

/// A scene and the edits made on it.
struct Case {
    scene: Scene,
    /// The photo: the scene rendered, or what the model drew for its caption.
    photo: RgbImage,
    /// "rendered" or "sampled" (drawn by the model, read back by the world's reader).
    source: &'static str,
    edits: Vec<Edit>,
    /// What each edit is asked with: its prompt ([`Edit::prompt`]), except the editor's
    /// suggestion for its demo scene.
    prompts: Vec<String>,
}

impl Case {
    fn new(scene: Scene, photo: RgbImage, source: &'static str, edits: Vec<Edit>) -> Self {
        let prompts = edits
            .iter()
            .map(|e| e.prompt(&scene).expect("cases hold edits that apply"))
            .collect();
        Self {
            scene,
            photo,
            source,
            edits,
            prompts,
        }
    }
}

/// The benchmark's scenes, each with a recolouring, a new background, and an added object
/// where a column is free: first the editor's example scene with its example edit (the
/// README's picture), then random ones fixed by `seed`.
fn cases(count: usize, seed: u64) -> Vec<Case> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let example = world::example_scene();
    let mut example_edits = edits_for(&example, &mut rng);
    example_edits.retain(|e| e.kind() != world::example_edit().kind());
    example_edits.insert(0, world::example_edit());
    let mut first = Case::new(example.clone(), example.render(), "rendered", example_edits);
    // Asked as the editor suggests it, so the example pictures show what a newcomer gets.
    first.prompts[0] = world::EXAMPLE_PROMPT.to_owned();
    let mut cases = vec![first];
    cases.extend((1..count).map(|_| {
        let scene = Scene::random(&mut rng);
        let edits = edits_for(&scene, &mut rng);
        Case::new(scene.clone(), scene.render(), "rendered", edits)
    }));
    cases
}

/// Tries per sampled scene: a drawing the reader finds no object in, or where no edit
/// applies, is drawn again with the next caption.
const SAMPLING_TRIES: usize = 10;

/// `count` scenes the model draws itself from random captions, read back by the world's
/// reader (so a default calibrated on rendered scenes is checked on the model's own
/// pictures, with their blur and off colours); the edits are those of the scene read back.
fn sampled_cases(
    service: &EditService,
    count: usize,
    args: &EvalArgs,
    cancel: &CancelFlag,
) -> Result<Vec<Case>> {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5a5a);
    let mut cases = Vec::new();
    let mut tries = 0;
    while cases.len() < count {
        tries += 1;
        if tries > count * SAMPLING_TRIES {
            anyhow::bail!(
                "the model drew {} readable scenes in {} tries; it does not draw its world well enough to benchmark on its own scenes",
                cases.len(),
                tries - 1
            );
        }
        let asked = Scene::random(&mut rng);
        let spec = crate::service::GenerateSpec {
            prompt: world::caption(&asked),
            seed: rng.random(),
            sampling_steps: args.sampling_steps,
            guidance_weight: args.guidance,
            size: None,
        };
        let mut observer = |_: &StepView| cancel.check();
        let (drawn, _) = service.generate(&spec, &mut observer)?;
        let scene = world::read(&drawn);
        if scene.objects.is_empty() {
            continue;
        }
        let edits = edits_for(&scene, &mut rng);
        if edits.is_empty() {
            continue;
        }
        cases.push(Case::new(scene, drawn, "sampled", edits));
    }
    Ok(cases)
}

fn edits_for(scene: &Scene, rng: &mut ChaCha8Rng) -> Vec<Edit> {
    let mut edits = Vec::new();
    let unused: Vec<world::Colour> = world::Colour::ALL
        .into_iter()
        .filter(|c| *c != scene.background && scene.objects.iter().all(|o| o.colour != *c))
        .collect();
    let pick = |rng: &mut ChaCha8Rng, from: &[world::Colour]| from[rng.random_range(0..from.len())];
    let object = scene.objects[rng.random_range(0..scene.objects.len())];
    edits.push(Edit::Recolour {
        column: object.column,
        colour: pick(rng, &unused),
    });
    edits.push(Edit::Background(pick(rng, &unused)));
    let free: Vec<Column> = Column::ALL
        .into_iter()
        .filter(|c| scene.object_in(*c).is_none())
        .collect();
    if !free.is_empty() {
        edits.push(Edit::Add(Object {
            shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
            colour: pick(rng, &unused),
            size: Size::Large,
            column: free[rng.random_range(0..free.len())],
            row: Row::Middle,
        }));
    }
    edits.retain(|e| e.apply(scene).is_some());
    edits
}

/// The bare token sampled from pure noise at snapshot `tune_steps` (paper figure 3).
fn reconstruction_spec(
    working: &Arc<RgbImage>,
    token: &str,
    tune_steps: usize,
    args: &EvalArgs,
    scene: usize,
) -> EditSpec {
    // The untuned model gets the token as its whole prompt; a snapshot puts it in front of
    // an empty one itself.
    let prompt = if tune_steps == 0 { token } else { "" };
    EditSpec {
        knobs: EditKnobs {
            tune_steps: Some(tune_steps),
            t0_fraction: Some(1.0),
            guidance_weight: Some(args.guidance),
            ..EditKnobs::default()
        },
        sampling_steps: args.sampling_steps,
        seed: args.seed * 1000 + scene as u64,
        size: WorkingSize::AsIs,
        ..EditSpec::new(working.clone(), prompt)
    }
}

fn summarize(plan: &[Setting], samples: &[SampleScore], seed: u64) -> Vec<Summary> {
    plan.iter()
        .map(|s| {
            let mine: Vec<&SampleScore> = samples
                .iter()
                .filter(|x| x.method == s.method && x.label == s.label)
                .collect();
            let successes: Vec<f64> = mine
                .iter()
                .map(|x| f64::from(u8::from(x.success)))
                .collect();
            let fidelities: Vec<f64> = mine.iter().map(|x| f64::from(x.fidelity)).collect();
            Summary {
                method: s.method.clone(),
                label: s.label.clone(),
                tune_steps: s.tune_steps,
                t0_fraction: s.t0_fraction,
                guidance_weight: s.guidance_weight,
                edits: mine.len(),
                success: mean(&successes),
                fidelity: mean(&fidelities),
                success_interval: bootstrap_interval(&successes, seed),
                fidelity_interval: bootstrap_interval(&fidelities, seed),
            }
        })
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Resamples drawn for a bootstrap interval.
const BOOTSTRAP_RESAMPLES: usize = 2000;

/// The percentile bootstrap 95% interval of the mean of `values` (resampled with
/// replacement, `BOOTSTRAP_RESAMPLES` times, from a fixed seed so reruns print the same).
pub fn bootstrap_interval(values: &[f64], seed: u64) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb007);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let total: f64 = (0..values.len())
                .map(|_| values[rng.random_range(0..values.len())])
                .sum();
            total / values.len() as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((means.len() - 1) as f64 * q).round() as usize];
    (at(0.025), at(0.975))
}

/// Each slider position's paired comparison of the automatic region with no region.
fn paired_region_gains(samples: &[SampleScore], seed: u64) -> Vec<PairedGain> {
    let find = |method: &str, of: &SampleScore| {
        samples.iter().find(|s| {
            s.method == method && s.label == of.label && s.scene == of.scene && s.edit == of.edit
        })
    };
    SLIDER_POSITIONS
        .iter()
        .filter_map(|f| {
            let label = format!("fidelity {f:.2}");
            let pairs: Vec<(&SampleScore, &SampleScore)> = samples
                .iter()
                .filter(|s| s.method == SLIDER && s.label == label)
                .filter_map(|plain| Some((plain, find(SLIDER_AUTO, plain)?)))
                .collect();
            if pairs.is_empty() {
                return None;
            }
            let gains: Vec<f64> = pairs
                .iter()
                .map(|(plain, auto)| f64::from(auto.fidelity - plain.fidelity))
                .collect();
            Some(PairedGain {
                label,
                edits: pairs.len(),
                fidelity_gain: mean(&gains),
                fidelity_gain_interval: bootstrap_interval(&gains, seed),
                won: pairs
                    .iter()
                    .filter(|(p, a)| a.success && !p.success)
                    .count(),
                lost: pairs
                    .iter()
                    .filter(|(p, a)| p.success && !a.success)
                    .count(),
            })
        })
        .collect()
}

fn print_paired(paired: &[PairedGain]) {
    if paired.is_empty() {
        return;
    }
    println!();
    println!(
        "automatic region against none, edit by edit (fidelity gain [95%], successes won/lost):"
    );
    for p in paired {
        println!(
            "  {:<14} {:+.3} [{:+.2},{:+.2}]  won {} lost {} of {}",
            p.label,
            p.fidelity_gain,
            p.fidelity_gain_interval.0,
            p.fidelity_gain_interval.1,
            p.won,
            p.lost,
            p.edits
        );
    }
}

/// Estimates `spec`'s automatic region and scores it against the true region `truth`, with
/// its cost relative to one edit at the same settings.
fn score_region(
    service: &mut EditService,
    spec: &EditSpec,
    truth: &GrayImage,
    threshold: f64,
    cancel: &CancelFlag,
) -> Result<(RegionScore, EstimatedRegion)> {
    let mut observer = |_: &StepView| cancel.check();
    let started = std::time::Instant::now();
    let region = service.estimate_region(spec, threshold, &mut observer)?;
    let estimate_time = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    service.edit(spec, &mut observer)?;
    let edit_time = started.elapsed().as_secs_f64();
    let score = RegionScore {
        scene: 0,
        edit: String::new(),
        kind: "",
        iou: imaging::mask_iou(&region.mask, truth),
        coverage: region.coverage,
        evenness: region.evenness,
        global: region.scope != RegionScope::Local,
        scope: region.scope.name(),
        cost: estimate_time / edit_time.max(1e-9),
    };
    Ok((score, region))
}

/// The automatic region per kind of edit: mean IoU with the true region, how often it was
/// judged global (and of those, how often the background), and its cost against one edit.
fn print_regions(regions: &[RegionScore]) {
    if regions.is_empty() {
        return;
    }
    println!();
    println!("automatic region at the default fidelity (against the true region):");
    let mut kinds: Vec<&str> = regions.iter().map(|r| r.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    for kind in kinds {
        let mine: Vec<&RegionScore> = regions.iter().filter(|r| r.kind == kind).collect();
        let ious: Vec<f64> = mine.iter().map(|r| r.iou).collect();
        println!(
            "  {kind:<11} IoU {:.3}  evenness {:.2}..{:.2}  global {}/{} (background {})  cost {:.1}% of an edit",
            mean(&ious),
            mine.iter()
                .map(|r| r.evenness)
                .fold(f64::INFINITY, f64::min),
            mine.iter().map(|r| r.evenness).fold(0.0, f64::max),
            mine.iter().filter(|r| r.global).count(),
            mine.len(),
            mine.iter().filter(|r| r.scope == "background").count(),
            100.0 * mean(&mine.iter().map(|r| r.cost).collect::<Vec<_>>())
        );
    }
}

fn summarize_reconstruction(all: &[(usize, f32)]) -> Vec<Reconstruction> {
    let mut steps: Vec<usize> = all.iter().map(|(s, _)| *s).collect();
    steps.sort_unstable();
    steps.dedup();
    steps
        .into_iter()
        .map(|s| {
            let mine: Vec<f32> = all.iter().filter(|x| x.0 == s).map(|x| x.1).collect();
            Reconstruction {
                tune_steps: s,
                scenes: mine.len(),
                agreement: mine.iter().map(|&a| a as f64).sum::<f64>() / mine.len() as f64,
                exact: mine.iter().filter(|&&a| a == 1.0).count(),
            }
        })
        .collect()
}

/// A fidelity table for this model, read off the measurements: the Pareto front of the plain
/// UniTune points (snapshot x t0, one guidance) that succeed at all, from most faithful
/// (fidelity 1) to most expressive (fidelity 0), made monotone (never fewer steps or a later
/// t0 at higher fidelity). `None` when no UniTune point ever succeeded.
pub fn propose_table(summary: &[Summary]) -> Option<Vec<(f64, EditParameters)>> {
    let candidates: Vec<&Summary> = summary
        .iter()
        .filter(|s| s.method.starts_with("UniTune, ") && s.success > 0.0)
        .collect();
    let dominated = |a: &Summary| {
        candidates.iter().any(|b| {
            b.success >= a.success
                && b.fidelity >= a.fidelity
                && (b.success > a.success || b.fidelity > a.fidelity)
        })
    };
    let mut front: Vec<&Summary> = candidates
        .iter()
        .copied()
        .filter(|a| !dominated(a))
        .collect();
    if front.is_empty() {
        return None;
    }
    // Most faithful first.
    front.sort_by(|a, b| b.fidelity.total_cmp(&a.fidelity));
    let last = front.len() - 1;
    let mut rows: Vec<(f64, EditParameters)> = SLIDER_POSITIONS
        .iter()
        .map(|&f| {
            let s = front[((1.0 - f) * last as f64).round() as usize];
            (
                f,
                EditParameters {
                    tune_steps: s.tune_steps,
                    t0_fraction: s.t0_fraction,
                    guidance_weight: s.guidance_weight,
                },
            )
        })
        .collect();
    for i in 1..rows.len() {
        let previous = rows[i - 1].1;
        let row = &mut rows[i].1;
        row.tune_steps = row.tune_steps.max(previous.tune_steps);
        row.t0_fraction = row.t0_fraction.min(previous.t0_fraction);
        row.guidance_weight = row.guidance_weight.min(previous.guidance_weight);
    }
    Some(rows)
}

fn print_proposed_table(summary: &[Summary]) {
    match propose_table(summary) {
        Some(rows) => {
            println!();
            println!("fidelity table these measurements suggest (src/engine/fidelity.rs):");
            for (f, p) in rows {
                println!(
                    "        row({f:.2}, {}, {:.2}, {:.1}),",
                    p.tune_steps, p.t0_fraction, p.guidance_weight
                );
            }
        }
        None => println!("\nno UniTune setting succeeded: no fidelity table to suggest"),
    }
}

fn print_report(summary: &[Summary], reconstruction: &[Reconstruction]) {
    println!("bare token from noise (paper figure 3): share of the scene reconstructed");
    for r in reconstruction {
        println!(
            "  {:>4} steps  {:.3}  ({} of {} scenes exact)",
            r.tune_steps, r.agreement, r.exact, r.scenes
        );
    }
    println!();
    println!(
        "{:<36} {:<14} {:>5} {:>5} {:>6} {:>20} {:>20} {:>5}",
        "method", "setting", "steps", "t0", "guid.", "success [95%]", "fidelity [95%]", "edits"
    );
    let with_interval =
        |value: f64, (low, high): (f64, f64)| format!("{value:.3} [{low:.2},{high:.2}]");
    for s in summary {
        println!(
            "{:<36} {:<14} {:>5} {:>5.2} {:>6.2} {:>20} {:>20} {:>5}",
            s.method,
            s.label,
            s.tune_steps,
            s.t0_fraction,
            s.guidance_weight,
            with_interval(s.success, s.success_interval),
            with_interval(s.fidelity, s.fidelity_interval),
            s.edits
        );
    }
}

/// One curve per method, its points in the plan's order.
fn curves(summary: &[Summary]) -> Vec<TradeOffCurve> {
    let mut curves: Vec<TradeOffCurve> = Vec::new();
    for s in summary {
        let point = (s.success, s.fidelity);
        match curves.iter_mut().find(|c| c.label == s.method) {
            Some(curve) => curve.points.push(point),
            None => curves.push(TradeOffCurve {
                label: s.method.clone(),
                points: vec![point],
            }),
        }
    }
    curves
}

/// The scene at the model's working size (nearest neighbour keeps its flat colours).
fn to_working(render: &RgbImage, side: u32) -> RgbImage {
    if render.width() == side {
        render.clone()
    } else {
        image::imageops::resize(render, side, side, FilterType::Nearest)
    }
}

fn resize_mask(mask: &GrayImage, side: u32) -> GrayImage {
    image::imageops::resize(mask, side, side, FilterType::Nearest)
}

/// Results drawn at 128 px, so the grid's labels fit over them.
fn upscale(image: &RgbImage) -> RgbImage {
    image::imageops::resize(image, 128, 128, FilterType::Nearest)
}

fn save_png(image: &RgbImage, path: &Path) -> Result<()> {
    image
        .save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_fixed_by_the_seed_and_every_edit_applies() {
        let a = cases(20, 1);
        let b = cases(20, 1);
        assert_eq!(
            a.iter().map(|c| &c.scene).collect::<Vec<_>>(),
            b.iter().map(|c| &c.scene).collect::<Vec<_>>()
        );
        assert_eq!(a[0].scene, world::example_scene());
        assert_eq!(a[0].edits[0], world::example_edit());
        for case in &a[1..] {
            assert!((2..=3).contains(&case.edits.len()), "{:?}", case.edits);
            for edit in &case.edits {
                assert!(edit.apply(&case.scene).is_some());
                assert!(edit.prompt(&case.scene).is_some());
            }
            let kinds: Vec<&str> = case.edits.iter().map(Edit::kind).collect();
            assert_eq!(&kinds[..2], &["recolour", "background"]);
            assert_eq!(kinds.len() == 3, case.scene.objects.len() < 3);
        }
    }

    #[test]
    fn the_summary_tallies_each_setting_and_curves_group_by_method() {
        let setting = |method: &str, label: &str| Setting {
            method: method.into(),
            label: label.into(),
            tune_steps: 0,
            t0_fraction: 0.5,
            guidance_weight: 7.5,
            prompt_guidance: false,
            interpolate: false,
            region: EvalRegion::All,
        };
        let plan = vec![setting("SDEdit", "t0 0.5"), setting("SDEdit", "t0 1.0")];
        let sample = |label: &str, success, fidelity| SampleScore {
            scene: 0,
            source: "rendered",
            edit: "e".into(),
            method: "SDEdit".into(),
            label: label.into(),
            success,
            fidelity,
        };
        let samples = vec![
            sample("t0 0.5", false, 1.0),
            sample("t0 0.5", true, 0.5),
            sample("t0 1.0", true, 0.25),
        ];
        let summary = summarize(&plan, &samples, 1);
        assert_eq!(summary[0].edits, 2);
        assert_eq!((summary[0].success, summary[0].fidelity), (0.5, 0.75));
        assert_eq!((summary[1].success, summary[1].fidelity), (1.0, 0.25));
        let curves = curves(&summary);
        assert_eq!(curves.len(), 1);
        assert_eq!(curves[0].points, vec![(0.5, 0.75), (1.0, 0.25)]);
    }

    #[test]
    fn the_bootstrap_interval_holds_the_mean_and_narrows_with_more_edits() {
        let few: Vec<f64> = (0..12).map(|i| f64::from(u8::from(i % 2 == 0))).collect();
        let many: Vec<f64> = (0..96).map(|i| f64::from(u8::from(i % 2 == 0))).collect();
        let (low, high) = bootstrap_interval(&few, 1);
        assert!(low < 0.5 && 0.5 < high, "({low}, {high})");
        // A proportion's interval shrinks as 1/sqrt(n): 96 edits about a third of 12's.
        let (low_many, high_many) = bootstrap_interval(&many, 1);
        let ratio = (high_many - low_many) / (high - low);
        assert!((0.25..0.45).contains(&ratio), "{ratio}");
        // About ±1.96 sqrt(0.25 / 12) = ±0.28 for 12 edits.
        assert!((0.4..0.7).contains(&(high - low)), "{}", high - low);
    }

    #[test]
    fn the_proposed_table_walks_the_pareto_front_monotonely() {
        let point = |tune_steps, t0, success, fidelity| Summary {
            method: format!("UniTune, {tune_steps} steps"),
            label: format!("t0 {t0}"),
            tune_steps,
            t0_fraction: t0,
            guidance_weight: 7.5,
            edits: 10,
            success,
            fidelity,
            success_interval: (success, success),
            fidelity_interval: (fidelity, fidelity),
        };
        let summary = vec![
            point(16, 1.0, 0.9, 0.3),
            point(16, 0.8, 0.6, 0.6),
            point(64, 0.8, 0.5, 0.8),
            point(128, 0.6, 0.2, 0.95),
            // On the front, but fewer steps than a less faithful point: raised to 64.
            point(32, 0.7, 0.35, 0.9),
            point(128, 0.5, 0.0, 1.0), // never succeeds: not a candidate
            point(32, 0.8, 0.4, 0.55), // dominated by (16, 0.8)
        ];
        let rows = propose_table(&summary).unwrap();
        let steps: Vec<usize> = rows.iter().map(|r| r.1.tune_steps).collect();
        let t0: Vec<f64> = rows.iter().map(|r| r.1.t0_fraction).collect();
        assert_eq!(steps, vec![16, 16, 64, 64, 128]);
        assert_eq!(t0, vec![1.0, 0.8, 0.8, 0.7, 0.6]);
        assert!(propose_table(&[point(16, 1.0, 0.0, 1.0)]).is_none());
    }
}
