//! The edit session: the fine-tune of the open photo, the edit asked for, its variants and
//! their textures. Turns the form into jobs and the jobs' events into state.

use std::time::{Duration, Instant};

use super::app::EditorApp;
use super::background::PreparedVariant;
use super::textures::{self, VariantTextures};
use super::variants::{FIRST_POSITIONS, VariantSet, VariantSettings, VariantState};
use crate::jobs::{
    EditKind, EditKnobs, EditSpec, FidelityTable, JobEvent, JobId, JobRequest, MicroBatch, Stage,
    TrainingChoice, TuneSettings, WorkingSize, choose_seed, plan_edit, time_left,
};

/// The longest the UI spends reading job events per frame.
const EVENT_BUDGET: Duration = Duration::from_millis(4);

/// The values the side panel edits in place (plain values, autosaved when they change).
#[derive(Debug, Clone)]
pub struct EditForm {
    pub prompt: String,
    pub baseline_prompt: String,
    pub fidelity: f64,
    pub advanced: Advanced,
}

/// Values the Advanced section edits.
#[derive(Debug, Clone)]
pub struct Advanced {
    /// Use the values below instead of the slider's.
    pub custom: bool,
    pub tune_steps: usize,
    pub t0: f64,
    pub guidance: f64,
    /// Empty = a new random seed per edit.
    pub seed_text: String,
    /// The snapshot ladder, e.g. "16, 32, 64, 128".
    pub snapshot_text: String,
}

impl EditForm {
    pub fn new(snapshot_steps: &[usize]) -> Self {
        Self {
            prompt: String::new(),
            baseline_prompt: String::new(),
            fidelity: 0.5,
            advanced: Advanced {
                custom: false,
                tune_steps: 64,
                t0: 0.96,
                guidance: 9.0,
                seed_text: String::new(),
                snapshot_text: ladder_text(snapshot_steps),
            },
        }
    }
}

/// The fine-tune of the current photo.
#[derive(Default)]
pub enum TuneStatus {
    #[default]
    None,
    Running {
        job: JobId,
        step: usize,
        total: usize,
        loss: Option<f32>,
        started: Instant,
        /// Steps done before this job started (a stopped tune the cache continues), known
        /// from the first progress event.
        resumed_after: Option<usize>,
        /// Snapshots already kept (usable for edits even if the tune then stops).
        kept: Vec<usize>,
    },
    Done {
        snapshots: Vec<usize>,
        from_cache: bool,
        /// The tune stopped early; these are the snapshots it kept.
        partial: bool,
    },
}

impl TuneStatus {
    /// Time left at the pace so far.
    pub fn eta(&self) -> Option<Duration> {
        match self {
            TuneStatus::Running {
                step,
                total,
                started,
                resumed_after,
                ..
            } => {
                let before = resumed_after.unwrap_or(0);
                time_left(
                    started.elapsed(),
                    step.saturating_sub(before),
                    total.saturating_sub(before),
                )
            }
            _ => None,
        }
    }

    fn job(&self) -> Option<JobId> {
        match self {
            TuneStatus::Running { job, .. } => Some(*job),
            _ => None,
        }
    }
}

/// What an edit was asked with (kept so slider releases and more seeds match it).
#[derive(Debug, Clone)]
pub struct EditContext {
    pub prompt: String,
    pub baseline_prompt: String,
    pub photo_version: u64,
    /// At the mask layer's size (the worker scales it to the photo's).
    pub mask: Option<std::sync::Arc<image::GrayImage>>,
    /// The snapshots variants may use: the recipe's ladder, or what a stopped tune kept.
    pub ladder: Vec<usize>,
    pub seed: u64,
    pub sampling_steps: usize,
    pub interpolate: bool,
    /// An instruction for an InstructPix2Pix model: no fine-tuning, the slider sets the image
    /// guidance.
    pub instruct: bool,
    /// The model's fidelity table, for every variant of this edit.
    pub table: &'static FidelityTable,
}

/// The fine-tune, the edit and its variants, for the open photo.
#[derive(Default)]
pub struct EditSession {
    pub tune: TuneStatus,
    /// The photo version and recipe the worker's snapshots belong to.
    pub tuned_for: Option<(u64, TuneSettings)>,
    pub edit: Option<EditContext>,
    pub variants: VariantSet,
    pub textures: VariantTextures,
}

impl EditSession {
    pub fn is_running(&self) -> bool {
        !self.variants.pending_jobs().is_empty() || matches!(self.tune, TuneStatus::Running { .. })
    }
}

impl EditorApp {
    pub(super) fn poll_jobs(&mut self) {
        let Some(runner) = &self.model.runner else {
            return;
        };
        for event in runner.drain(EVENT_BUDGET) {
            self.on_job_event(event);
        }
    }

    fn on_job_event(&mut self, event: JobEvent) {
        let is_tune = Some(event.id()) == self.session.tune.job();
        match event {
            JobEvent::Progress {
                id,
                stage: Stage::Tuning,
                step,
                total,
                loss,
            } => {
                if let TuneStatus::Running {
                    job,
                    step: s,
                    total: t,
                    loss: l,
                    resumed_after,
                    ..
                } = &mut self.session.tune
                    && *job == id
                {
                    (*s, *t, *l) = (step, total, loss);
                    resumed_after.get_or_insert(step.saturating_sub(1));
                }
            }
            JobEvent::Progress {
                id,
                stage: Stage::Sampling,
                step,
                total,
                ..
            } => self
                .session
                .variants
                .update(id, VariantState::Running { step, total }),
            JobEvent::Preview { id, image } => {
                let tex = &mut self.session.textures;
                if is_tune {
                    match &mut tex.tune_preview {
                        Some(t) => t.set(textures::color_image(&image, 512), Default::default()),
                        None => {
                            tex.tune_preview =
                                Some(textures::thumbnail(&self.ctx, "tune-preview", &image, 512))
                        }
                    }
                } else if self.session.variants.find(id).is_some() {
                    let t = textures::thumbnail(&self.ctx, "live-preview", &image, 1024);
                    tex.live_preview = Some((id, t));
                }
            }
            JobEvent::SnapshotKept { id, steps } => self.on_snapshot_kept(id, steps),
            JobEvent::Tuned {
                snapshot_steps,
                from_cache,
                ..
            } => {
                self.session.tune = TuneStatus::Done {
                    snapshots: snapshot_steps,
                    from_cache,
                    partial: false,
                };
            }
            JobEvent::Finished {
                id, result, recipe, ..
            } => {
                // The variant stays pending (its live preview showing) until its display
                // copy is ready: see `show_variant`.
                if self.session.variants.find(id).is_some() {
                    self.chores
                        .prepare_variant(id, result, recipe, self.results.clone());
                }
            }
            JobEvent::LoraExported { path, .. } => {
                self.exports.lora_job = None;
                self.info(format!("LoRA written to {}.", path.display()));
            }
            JobEvent::Failed { id, message } if Some(id) == self.exports.lora_job => {
                self.exports.lora_job = None;
                self.error(format!("The LoRA was not written: {message}"));
            }
            JobEvent::Failed { id, message } => {
                if is_tune {
                    self.tune_stopped();
                    self.error(format!("Fine-tuning failed: {message}"));
                } else if self.session.variants.find(id).is_some() {
                    self.session
                        .variants
                        .update(id, VariantState::Failed(message.clone()));
                    self.error(format!("The edit failed: {message}"));
                }
            }
            JobEvent::Cancelled { id } => {
                if is_tune {
                    self.tune_stopped();
                }
                self.session.variants.update(id, VariantState::Cancelled);
                let tex = &mut self.session.textures;
                if tex.live_preview.as_ref().is_some_and(|(j, _)| *j == id) {
                    tex.live_preview = None;
                }
            }
        }
    }

    /// The tune kept the snapshot after `steps` steps: edits may use it even if the tune
    /// stops before its end.
    fn on_snapshot_kept(&mut self, id: JobId, steps: usize) {
        if let TuneStatus::Running { job, kept, .. } = &mut self.session.tune
            && *job == id
            && !kept.contains(&steps)
        {
            kept.push(steps);
        }
    }

    /// The tune was cancelled or failed: the snapshots it kept stay usable for this edit's
    /// variants (the slider and more seeds choose among them); queued variants that need a
    /// snapshot it did not reach cannot run. The next Edit tunes again (the cache resumes
    /// where this one stopped).
    fn tune_stopped(&mut self) {
        let mut kept = match &mut self.session.tune {
            TuneStatus::Running { kept, .. } => std::mem::take(kept),
            _ => Vec::new(),
        };
        kept.sort_unstable();
        self.session.textures.tune_preview = None;
        self.session.tuned_for = None;
        self.session.tune = if kept.is_empty() {
            TuneStatus::None
        } else {
            TuneStatus::Done {
                snapshots: kept.clone(),
                from_cache: false,
                partial: true,
            }
        };
        if let Some(runner) = &self.model.runner {
            for variant in self.session.variants.variants() {
                let steps = variant.settings.plan.tune_steps;
                if variant.is_pending() && steps > 0 && !kept.contains(&steps) {
                    runner.cancel(variant.job);
                }
            }
        }
        if let Some(edit) = &mut self.session.edit {
            edit.ladder = kept;
        }
    }

    pub(super) fn show_variant(&mut self, prepared: PreparedVariant) {
        let id = prepared.job;
        // A new edit or photo since it finished dropped it: its file goes too.
        let Some(variant) = self.session.variants.find(id) else {
            self.discard_result(prepared.result);
            return;
        };
        eprintln!("unitune: variant ready: {}", variant.settings.describe());
        self.session
            .textures
            .insert(&self.ctx, id, prepared.display, prepared.thumbnail);
        self.session.variants.update(
            id,
            VariantState::Done {
                result: prepared.result,
                recipe: prepared.recipe,
            },
        );
    }

    fn cancel_variants(&mut self) {
        if let Some(runner) = &self.model.runner {
            for job in self.session.variants.pending_jobs() {
                runner.cancel(job);
            }
        }
    }

    /// The fine-tuning recipe for the next tune: the mode, ladder and micro-batch chosen in
    /// Advanced, on top of the recipe the editor was started with.
    fn tune_settings(&self) -> Result<TuneSettings, String> {
        let micro_batch = self
            .settings
            .micro_batch
            .parse::<MicroBatch>()
            .unwrap_or_default();
        let choice = TrainingChoice {
            mode: self.settings.train_mode,
            snapshot_steps: parse_ladder(&self.form.advanced.snapshot_text)?,
            micro_batch,
            ..self.options.tune.clone().unwrap_or_default()
        };
        choice.settings(None).map_err(|e| e.to_string())
    }

    pub(super) fn start_edit(&mut self) {
        let prompt = self.form.prompt.trim().to_string();
        let Some(doc) = &self.doc else {
            return self.error("Open a photo first (File > Open, or drop one on the window).");
        };
        let instruct = self.model.is_instruct();
        let table = self.model.fidelity_table();
        if prompt.is_empty() {
            return self.error(if instruct {
                "Type how the photo should change, e.g. \"make it winter\"."
            } else {
                "Type what the photo should become, e.g. \"a cat wearing sunglasses\"."
            });
        }
        if self.model.runner.is_none() {
            return self.error("The model is not ready yet; see the Model section.");
        }
        let tune = match self.tune_settings() {
            Ok(tune) => tune,
            Err(message) => return self.error(message),
        };
        self.settings.snapshot_steps = tune.snapshot_steps.clone();
        let seed = match self.form.advanced.seed_text.trim() {
            "" => choose_seed(None),
            text => match text.parse::<u64>() {
                Ok(seed) => seed,
                Err(_) => {
                    return self.error(format!("The seed must be a whole number, not \"{text}\"."));
                }
            },
        };
        let version = doc.version;
        let photo = doc.photo.clone();
        let mask = self.doc.as_mut().and_then(|d| d.mask.painted());
        self.cancel_variants();
        let old = std::mem::take(&mut self.session.variants);
        self.discard_results(old);
        self.session.textures.clear_results();
        self.notice = None;
        self.session.edit = Some(EditContext {
            prompt,
            baseline_prompt: self.form.baseline_prompt.trim().to_string(),
            photo_version: version,
            mask,
            ladder: tune.snapshot_steps.clone(),
            seed,
            sampling_steps: self.settings.sampling_steps.max(1),
            interpolate: self.settings.interpolate,
            instruct,
            table,
        });
        // Later edits of the same photo reuse its snapshots; instructions need none.
        if !instruct && self.session.tuned_for.as_ref() != Some(&(version, tune.clone())) {
            let request = JobRequest::Tune {
                photo,
                settings: tune.clone(),
                size: WorkingSize::Fit,
            };
            if let Some(old) = self.session.tune.job()
                && let Some(runner) = &self.model.runner
            {
                runner.cancel(old);
            }
            let Some(job) = self.submit(request) else {
                return;
            };
            self.session.tune = TuneStatus::Running {
                job,
                step: 0,
                total: tune.total_steps(),
                loss: None,
                started: Instant::now(),
                resumed_after: None,
                kept: Vec::new(),
            };
            self.session.textures.tune_preview = None;
            self.session.tuned_for = Some((version, tune.clone()));
        }
        if self.form.advanced.custom {
            let settings = self.advanced_settings(seed);
            self.queue_variant(settings, false);
        } else {
            let fidelity = self.form.fidelity;
            let mut positions = vec![fidelity];
            positions.extend(
                FIRST_POSITIONS
                    .iter()
                    .copied()
                    .filter(|p| (p - fidelity).abs() > 0.1),
            );
            positions.truncate(FIRST_POSITIONS.len());
            for position in positions {
                let settings = settings_at(position, seed, &tune.snapshot_steps, instruct, table);
                self.queue_variant(settings, false);
            }
        }
        self.session.variants.follow_slider();
    }

    pub(super) fn more_seeds(&mut self) {
        let Some(edit) = &self.session.edit else {
            return self.error("Run an edit first; more seeds add variants to it.");
        };
        let ladder = edit.ladder.clone();
        let (instruct, table) = (edit.instruct, edit.table);
        for _ in 0..2 {
            let seed = choose_seed(None);
            let settings = if self.form.advanced.custom {
                self.advanced_settings(seed)
            } else {
                settings_at(self.form.fidelity, seed, &ladder, instruct, table)
            };
            self.queue_variant(settings, false);
        }
    }

    pub(super) fn slider_released(&mut self) {
        self.session.variants.follow_slider();
        if let Some(edit) = &self.session.edit
            && !self.form.advanced.custom
            && self.session.variants.needs_job_at(self.form.fidelity)
        {
            let settings = settings_at(
                self.form.fidelity,
                edit.seed,
                &edit.ladder,
                edit.instruct,
                edit.table,
            );
            self.queue_variant(settings, true);
        }
    }

    /// The Advanced section's values (for an instruction: its guidance, and the image
    /// guidance the slider sets).
    fn advanced_settings(&self, seed: u64) -> VariantSettings {
        let advanced = &self.form.advanced;
        let (kind, knobs) = if self.model.is_instruct() {
            let slider = settings_at(
                self.form.fidelity,
                seed,
                &[],
                true,
                self.model.fidelity_table(),
            );
            (
                EditKind::Instruct,
                EditKnobs {
                    guidance_weight: Some(advanced.guidance),
                    fidelity: None,
                    ..slider.plan.knobs()
                },
            )
        } else {
            (
                EditKind::Describe,
                EditKnobs {
                    fidelity: None,
                    tune_steps: Some(advanced.tune_steps),
                    t0_fraction: Some(advanced.t0),
                    guidance_weight: Some(advanced.guidance),
                    image_guidance: None,
                },
            )
        };
        VariantSettings {
            plan: plan_edit(kind, &knobs, self.model.fidelity_table(), &[]),
            seed,
        }
    }

    /// Submits one variant of the current edit.
    fn queue_variant(&mut self, settings: VariantSettings, from_slider: bool) {
        let Some(edit) = &self.session.edit else {
            return;
        };
        let Some(doc) = &self.doc else { return };
        if doc.version != edit.photo_version {
            return self.error("The photo changed since this edit; press Edit again.");
        }
        if edit.instruct != self.model.is_instruct() {
            // Instructions need an InstructPix2Pix model and descriptions the others; the
            // variants made so far stay to look at and export.
            return self.error("The model changed since this edit; press Edit again.");
        }
        let plan = &settings.plan;
        let request = JobRequest::Edit(EditSpec {
            photo: doc.photo.clone(),
            photo_name: doc
                .source
                .as_ref()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned()),
            mask: edit.mask.clone(),
            mask_name: edit
                .mask
                .as_ref()
                .map(|_| "painted in the editor".to_owned()),
            kind: plan.kind(),
            prompt: edit.prompt.clone(),
            baseline_prompt: (!edit.baseline_prompt.is_empty())
                .then(|| edit.baseline_prompt.clone()),
            knobs: plan.knobs(),
            seed: settings.seed,
            sampling_steps: edit.sampling_steps,
            interpolate: edit.interpolate,
            size: WorkingSize::Fit,
        });
        let Some(job) = self.submit(request) else {
            return;
        };
        if from_slider {
            if let Some(older) = self.session.variants.push_slider_request(job, settings)
                && let Some(runner) = &self.model.runner
            {
                runner.cancel(older);
            }
        } else {
            self.session.variants.push(job, settings);
        }
    }

    fn submit(&mut self, request: JobRequest) -> Option<JobId> {
        let runner = self.model.runner.as_mut()?;
        match runner.submit(request) {
            Ok(id) => Some(id),
            Err(err) => {
                self.error(format!("Cannot start the job: {err}."));
                None
            }
        }
    }

    pub(super) fn cancel_all(&mut self) {
        let Some(runner) = &self.model.runner else {
            return;
        };
        if let Some(job) = self.session.tune.job() {
            runner.cancel(job);
        }
        for job in self.session.variants.pending_jobs() {
            runner.cancel(job);
        }
    }

    /// The shown variant keeps its display texture; one dropped to save memory is read back.
    pub(super) fn keep_shown_display(&mut self) {
        let Some((_, variant)) = self.session.variants.shown(self.form.fidelity) else {
            return;
        };
        let (job, result) = (variant.job, variant.result().cloned());
        if let Some(result) = result
            && self.session.textures.shown(job)
        {
            self.chores.load_display(job, result);
        }
    }

    /// Removes the result files of variants no longer shown (off the UI thread).
    pub(super) fn discard_results(&mut self, variants: VariantSet) {
        let files = variants
            .into_results()
            .into_iter()
            .filter_map(|r| r.file().map(|p| p.to_path_buf()))
            .collect();
        self.chores.remove_files(files);
    }

    fn discard_result(&mut self, result: super::results::StoredResult) {
        if let Some(path) = result.file() {
            self.chores.remove_files(vec![path.to_path_buf()]);
        }
    }
}

/// The variant at slider `position`, using the snapshots in `ladder` (none = untuned); for
/// an instruction, the slider sets the image guidance.
fn settings_at(
    position: f64,
    seed: u64,
    ladder: &[usize],
    instruct: bool,
    table: &FidelityTable,
) -> VariantSettings {
    let kind = if instruct {
        EditKind::Instruct
    } else {
        EditKind::Describe
    };
    let knobs = EditKnobs {
        fidelity: Some(position),
        ..EditKnobs::default()
    };
    VariantSettings {
        plan: plan_edit(kind, &knobs, table, ladder),
        seed,
    }
}

pub(super) fn ladder_text(steps: &[usize]) -> String {
    steps
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// "16, 32, 64" to `[16, 32, 64]`, with a sentence when it cannot be read.
pub(super) fn parse_ladder(text: &str) -> Result<Vec<usize>, String> {
    let steps: Result<Vec<usize>, _> = text
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(str::parse::<usize>)
        .collect();
    match steps {
        Ok(steps) if !steps.is_empty() && steps[0] > 0 && steps.windows(2).all(|w| w[0] < w[1]) => {
            Ok(steps)
        }
        _ => Err(format!(
            "Fine-tuning snapshots must be increasing step counts like \"16, 32, 64, 128\", not \"{text}\"."
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladders_parse_or_explain() {
        assert_eq!(
            parse_ladder("16, 32,64 128").unwrap(),
            vec![16, 32, 64, 128]
        );
        assert!(parse_ladder("32, 16").is_err());
        assert!(parse_ladder("0, 4").is_err());
        assert!(parse_ladder("").is_err());
        assert_eq!(ladder_text(&[1, 2]), "1, 2");
    }
}
