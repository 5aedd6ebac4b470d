//! The edit session: the fine-tune of the open photo, the edit asked for, its variants and
//! their textures, and the LoRA export. All the job logic lives here: it turns what the form
//! asks into jobs for the runner, and the jobs' events into state and notices.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::Context;
use image::{GrayImage, RgbImage};

use super::app::Notice;
use super::background::{Chores, PreparedVariant};
use super::limits;
use super::results::ResultFiles;
use super::textures::{self, VariantTextures};
use super::variants::{FIRST_POSITIONS, VariantSet, VariantSettings, VariantState};
use crate::jobs::{
    EditSpec, FidelityTable, JobEvent, JobId, JobRequest, JobRunner, Region, RegionScope, Stage,
    TrainMode, TuneSettings, WorkingSize, time_left,
};

/// The longest the UI spends reading job events per frame.
const EVENT_BUDGET: Duration = Duration::from_millis(4);

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

    /// The snapshots kept so far (all of them once done).
    fn kept(&self) -> Vec<usize> {
        match self {
            TuneStatus::Done { snapshots, .. } => snapshots.clone(),
            TuneStatus::Running { kept, .. } => kept.clone(),
            TuneStatus::None => Vec::new(),
        }
    }
}

/// The open photo, as an edit's jobs need it.
pub struct PhotoRef<'a> {
    /// Changes whenever the photo does.
    pub version: u64,
    pub photo: &'a Arc<RgbImage>,
    /// The file name (for the recipe; never the folder).
    pub name: Option<String>,
}

/// One edit as the form asks for it.
pub struct EditOrder {
    pub prompt: String,
    pub baseline_prompt: String,
    /// Where the edit may change the photo; a painted mask at the mask layer's size (the
    /// worker scales it to the photo's).
    pub region: Region,
    pub tune: TuneSettings,
    pub seed: u64,
    pub sampling_steps: usize,
    pub interpolate: bool,
    /// An instruction for an InstructPix2Pix model: no fine-tuning, the slider sets the image
    /// guidance.
    pub instruct: bool,
    /// The model's fidelity table.
    pub table: &'static FidelityTable,
    /// The variants to queue first, in order.
    pub first: Vec<VariantSettings>,
}

/// What an edit was asked with (kept so slider releases and more seeds match it).
#[derive(Debug, Clone)]
pub struct EditContext {
    pub prompt: String,
    pub baseline_prompt: String,
    pub photo_version: u64,
    pub region: Region,
    /// An automatic region of this edit has been shown in the mask layer.
    pub region_shown: bool,
    /// The snapshots variants may use: the recipe's ladder, or what a stopped tune kept.
    pub ladder: Vec<usize>,
    pub seed: u64,
    pub sampling_steps: usize,
    pub interpolate: bool,
    pub instruct: bool,
    pub table: &'static FidelityTable,
}

/// Where the session's results and textures go: egui for textures, the chore threads for
/// files, the result folder.
pub struct SessionEnv<'a> {
    pub ctx: &'a Context,
    pub chores: &'a Chores,
    pub results: &'a ResultFiles,
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
    /// The automatic region the current edit's first result used, until the mask layer
    /// shows it (see [`EditSession::take_estimated_region`]).
    estimated_region: Option<GrayImage>,
    /// The job writing a LoRA file, while it runs.
    pub lora_job: Option<JobId>,
}

impl EditSession {
    pub fn is_running(&self) -> bool {
        !self.variants.pending_jobs().is_empty() || matches!(self.tune, TuneStatus::Running { .. })
    }

    /// The automatic region to show in the mask layer, once per edit: where the first result
    /// was allowed to change, for the user to see, touch up and edit again with.
    pub fn take_estimated_region(&mut self) -> Option<GrayImage> {
        self.estimated_region.take()
    }

    /// The runner's snapshots are gone (another model): the next edit tunes again.
    pub fn forget_tune(&mut self) {
        self.tuned_for = None;
    }

    /// Reads the runner's events for a bounded time; returns what the user should hear.
    pub fn poll(&mut self, runner: &JobRunner, env: &SessionEnv) -> Vec<Notice> {
        runner
            .drain(EVENT_BUDGET)
            .into_iter()
            .filter_map(|event| self.on_event(event, runner, env))
            .collect()
    }

    fn on_event(
        &mut self,
        event: JobEvent,
        runner: &JobRunner,
        env: &SessionEnv,
    ) -> Option<Notice> {
        let is_tune = Some(event.id()) == self.tune.job();
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
                } = &mut self.tune
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
                .variants
                .update(id, VariantState::Running { step, total }),
            JobEvent::Preview { id, image } => {
                let tex = &mut self.textures;
                if is_tune {
                    let side = limits::TUNE_PREVIEW_SIDE;
                    match &mut tex.tune_preview {
                        Some(t) => t.set(textures::color_image(&image, side), Default::default()),
                        None => {
                            tex.tune_preview =
                                Some(textures::thumbnail(env.ctx, "tune-preview", &image, side))
                        }
                    }
                } else if self.variants.find(id).is_some() {
                    let side = limits::LIVE_PREVIEW_SIDE;
                    let t = textures::thumbnail(env.ctx, "live-preview", &image, side);
                    tex.live_preview = Some((id, t));
                }
            }
            JobEvent::SnapshotKept { id, steps } => self.on_snapshot_kept(id, steps),
            JobEvent::Tuned {
                snapshot_steps,
                from_cache,
                ..
            } => {
                self.tune = TuneStatus::Done {
                    snapshots: snapshot_steps,
                    from_cache,
                    partial: false,
                };
            }
            JobEvent::Finished {
                id,
                result,
                recipe,
                region,
                ..
            } => {
                let mut scope = None;
                if let (Some(region), Some(edit)) = (region, &mut self.edit)
                    && self.variants.find(id).is_some()
                    && !edit.region_shown
                {
                    edit.region_shown = true;
                    scope = Some(region.scope);
                    self.estimated_region = Some(region.mask);
                }
                // The variant stays pending (its live preview showing) until its display
                // copy is ready: see `show_variant`.
                if self.variants.find(id).is_some() {
                    env.chores
                        .prepare_variant(id, result, recipe, env.results.clone());
                }
                match scope {
                    Some(RegionScope::Whole) => {
                        return Some(Notice::info(
                            "The prompt changes the whole photo (a style or the light), so all of it may change.",
                        ));
                    }
                    Some(RegionScope::Background) => {
                        return Some(Notice::info(
                            "The prompt names a background, so the background may change and the objects on it are kept.",
                        ));
                    }
                    _ => {}
                }
            }
            JobEvent::Notice { message, .. } => {
                return Some(Notice::info(format!("Note: {message}.")));
            }
            JobEvent::LoraExported { path, .. } => {
                self.lora_job = None;
                return Some(Notice::info(format!("LoRA written to {}.", path.display())));
            }
            JobEvent::Failed { id, message } if Some(id) == self.lora_job => {
                self.lora_job = None;
                return Some(Notice::error(format!(
                    "The LoRA was not written: {message}"
                )));
            }
            JobEvent::Failed { id, message } => {
                if is_tune {
                    self.tune_stopped(runner);
                    return Some(Notice::error(format!("Fine-tuning failed: {message}")));
                } else if self.variants.find(id).is_some() {
                    self.variants
                        .update(id, VariantState::Failed(message.clone()));
                    return Some(Notice::error(format!("The edit failed: {message}")));
                }
            }
            JobEvent::Cancelled { id } => {
                if is_tune {
                    self.tune_stopped(runner);
                }
                self.variants.update(id, VariantState::Cancelled);
                let tex = &mut self.textures;
                if tex.live_preview.as_ref().is_some_and(|(j, _)| *j == id) {
                    tex.live_preview = None;
                }
            }
        }
        None
    }

    /// The tune kept the snapshot after `steps` steps: edits may use it even if the tune
    /// stops before its end.
    fn on_snapshot_kept(&mut self, id: JobId, steps: usize) {
        if let TuneStatus::Running { job, kept, .. } = &mut self.tune
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
    fn tune_stopped(&mut self, runner: &JobRunner) {
        let mut kept = match &mut self.tune {
            TuneStatus::Running { kept, .. } => std::mem::take(kept),
            _ => Vec::new(),
        };
        kept.sort_unstable();
        self.textures.tune_preview = None;
        self.tuned_for = None;
        self.tune = if kept.is_empty() {
            TuneStatus::None
        } else {
            TuneStatus::Done {
                snapshots: kept.clone(),
                from_cache: false,
                partial: true,
            }
        };
        for variant in self.variants.variants() {
            let steps = variant.settings.plan.tune_steps;
            if variant.is_pending() && steps > 0 && !kept.contains(&steps) {
                runner.cancel(variant.job);
            }
        }
        if let Some(edit) = &mut self.edit {
            edit.ladder = kept;
        }
    }

    /// A finished variant's display copy is ready: it shows, unless a new edit or photo has
    /// dropped it since (then its file goes too).
    pub fn show_variant(&mut self, prepared: PreparedVariant, env: &SessionEnv) {
        let id = prepared.job;
        let Some(variant) = self.variants.find(id) else {
            if let Some(path) = prepared.result.file() {
                env.chores.remove_files(vec![path.to_path_buf()]);
            }
            return;
        };
        eprintln!("unitune: variant ready: {}", variant.settings.describe());
        self.textures
            .insert(env.ctx, id, prepared.display, prepared.thumbnail);
        self.variants.update(
            id,
            VariantState::Done {
                result: prepared.result,
                recipe: prepared.recipe,
            },
        );
    }

    /// Starts an edit of `photo`: the variants of the last one are dropped, the photo is
    /// fine-tuned unless its snapshots for this recipe are there already, and the first
    /// variants are queued (behind the tune).
    pub fn start(
        &mut self,
        order: EditOrder,
        photo: &PhotoRef,
        runner: &mut JobRunner,
        env: &SessionEnv,
    ) -> Result<(), String> {
        self.cancel_variants(runner);
        let old = std::mem::take(&mut self.variants);
        discard_results(old, env.chores);
        self.textures.clear_results();
        let tune = order.tune;
        self.edit = Some(EditContext {
            prompt: order.prompt,
            baseline_prompt: order.baseline_prompt,
            photo_version: photo.version,
            region: order.region,
            region_shown: false,
            ladder: tune.snapshot_steps.clone(),
            seed: order.seed,
            sampling_steps: order.sampling_steps.max(1),
            interpolate: order.interpolate,
            instruct: order.instruct,
            table: order.table,
        });
        // Later edits of the same photo reuse its snapshots; instructions need none.
        if !order.instruct && self.tuned_for.as_ref() != Some(&(photo.version, tune.clone())) {
            if let Some(old) = self.tune.job() {
                runner.cancel(old);
            }
            let request = JobRequest::Tune {
                photo: photo.photo.clone(),
                settings: tune.clone(),
                size: WorkingSize::Fit,
            };
            let job = submit(runner, request)?;
            self.tune = TuneStatus::Running {
                job,
                step: 0,
                total: tune.total_steps(),
                loss: None,
                started: Instant::now(),
                resumed_after: None,
                kept: Vec::new(),
            };
            self.textures.tune_preview = None;
            self.tuned_for = Some((photo.version, tune));
        }
        for settings in order.first {
            self.queue_variant(settings, false, photo, order.instruct, runner)?;
        }
        self.variants.follow_slider();
        Ok(())
    }

    /// The slider positions an edit computes first: where the slider is, then the ends and
    /// three quarters (those not within 0.1 of it), four in all.
    pub fn first_positions(fidelity: f64) -> Vec<f64> {
        let mut positions = vec![fidelity];
        positions.extend(
            FIRST_POSITIONS
                .iter()
                .copied()
                .filter(|p| (p - fidelity).abs() > 0.1),
        );
        positions.truncate(FIRST_POSITIONS.len());
        positions
    }

    /// Queues `settings` (each with its own seed) as more variants of the current edit.
    pub fn more_seeds(
        &mut self,
        variants: Vec<VariantSettings>,
        photo: &PhotoRef,
        instruct: bool,
        runner: &mut JobRunner,
    ) -> Result<(), String> {
        if self.edit.is_none() {
            return Err("Run an edit first; more seeds add variants to it.".into());
        }
        for settings in variants {
            self.queue_variant(settings, false, photo, instruct, runner)?;
        }
        Ok(())
    }

    /// The slider was released at `settings`' position: computes it, unless a variant there
    /// is done or on its way; a newer release supersedes an older one still pending.
    pub fn slider_released(
        &mut self,
        settings: VariantSettings,
        photo: &PhotoRef,
        instruct: bool,
        runner: &mut JobRunner,
    ) -> Result<(), String> {
        self.variants.follow_slider();
        let needed = settings
            .fidelity()
            .is_some_and(|f| self.variants.needs_job_at(f));
        if self.edit.is_some() && needed {
            self.queue_variant(settings, true, photo, instruct, runner)?;
        }
        Ok(())
    }

    /// Submits one variant of the current edit.
    fn queue_variant(
        &mut self,
        settings: VariantSettings,
        from_slider: bool,
        photo: &PhotoRef,
        instruct_now: bool,
        runner: &mut JobRunner,
    ) -> Result<(), String> {
        let Some(edit) = &self.edit else {
            return Ok(());
        };
        if photo.version != edit.photo_version {
            return Err("The photo changed since this edit; press Edit again.".into());
        }
        if edit.instruct != instruct_now {
            // Instructions need an InstructPix2Pix model and descriptions the others; the
            // variants made so far stay to look at and export.
            return Err("The model changed since this edit; press Edit again.".into());
        }
        let plan = &settings.plan;
        let request = JobRequest::Edit(EditSpec {
            photo: photo.photo.clone(),
            photo_name: photo.name.clone(),
            region: edit.region.clone(),
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
        let job = submit(runner, request)?;
        if from_slider {
            if let Some(older) = self.variants.push_slider_request(job, settings) {
                runner.cancel(older);
            }
        } else {
            self.variants.push(job, settings);
        }
        Ok(())
    }

    fn cancel_variants(&self, runner: &JobRunner) {
        for job in self.variants.pending_jobs() {
            runner.cancel(job);
        }
    }

    /// Cancels the tune and every variant not yet finished.
    pub fn cancel_all(&self, runner: &JobRunner) {
        if let Some(job) = self.tune.job() {
            runner.cancel(job);
        }
        self.cancel_variants(runner);
    }

    /// The shown variant keeps its display texture; one dropped to save memory is read back.
    pub fn keep_shown_display(&mut self, fidelity: f64, chores: &Chores) {
        let Some((_, variant)) = self.variants.shown(fidelity) else {
            return;
        };
        let (job, result) = (variant.job, variant.result().cloned());
        if let Some(result) = result
            && self.textures.shown(job)
        {
            chores.load_display(job, result);
        }
    }

    /// Drops everything of this session (a new photo): its result files go.
    pub fn discard(self, chores: &Chores) {
        discard_results(self.variants, chores);
    }

    /// The snapshot File > Export LoRA writes, when the photo's fine-tune is in lora mode:
    /// the one the variant shown at `fidelity` used, else the last one kept.
    pub fn lora_export_steps(&self, fidelity: f64) -> Option<usize> {
        let (_, tune) = self.tuned_for.as_ref()?;
        if !matches!(tune.mode, TrainMode::Lora { .. }) || self.lora_job.is_some() {
            return None;
        }
        let kept = self.tune.kept();
        let shown = self
            .variants
            .shown(fidelity)
            .map(|(_, v)| v.settings.plan.tune_steps)
            .filter(|steps| kept.contains(steps));
        shown.or_else(|| kept.iter().max().copied())
    }

    /// Asks the engine thread (which holds the fine-tune and writes the same metadata as the
    /// command line) to write the snapshot after `steps` steps as a LoRA file.
    pub fn export_lora(
        &mut self,
        path: PathBuf,
        steps: usize,
        photo_name: Option<String>,
        runner: &mut JobRunner,
    ) -> Result<(), String> {
        let request = JobRequest::ExportLora {
            path,
            steps,
            photo_name,
        };
        let job = runner
            .submit(request)
            .map_err(|err| format!("The LoRA was not written: {err}"))?;
        self.lora_job = Some(job);
        Ok(())
    }
}

fn submit(runner: &mut JobRunner, request: JobRequest) -> Result<JobId, String> {
    runner
        .submit(request)
        .map_err(|err| format!("Cannot start the job: {err}."))
}

/// Removes the result files of variants no longer shown (off the UI thread).
fn discard_results(variants: VariantSet, chores: &Chores) {
    let files = variants
        .into_results()
        .into_iter()
        .filter_map(|r| r.file().map(|p| p.to_path_buf()))
        .collect();
    chores.remove_files(files);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_starts_where_the_slider_is_then_fills_in_the_range() {
        assert_eq!(EditSession::first_positions(0.5), vec![0.5, 0.0, 1.0, 0.75]);
        assert_eq!(EditSession::first_positions(0.3), vec![0.3, 0.5, 0.0, 1.0]);
        assert_eq!(
            EditSession::first_positions(0.95),
            vec![0.95, 0.5, 0.0, 0.75]
        );
    }
}
