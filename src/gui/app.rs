//! The editor's state, built at start, and its frame: read every thread's events, draw the
//! panels, apply the commands they return ([`super::commands`]), autosave what changed.
//!
//! Each flow keeps its logic in its own type: [`EditSession`] (the fine-tune, the variants,
//! the LoRA export: every job), [`ModelState`] (loading), [`Exports`], [`AutosaveState`],
//! [`CacheWindow`]. The app routes events to them and turns their answers into notices; the
//! only other `impl EditorApp` is [`EditorApp::apply`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use egui::{Context, Rect, TextureHandle};

use super::EditorOptions;
use super::autosave::AutosaveState;
use super::background::{Chore, ChoreResult, Chores, OpenId, OpenedPhoto};
use super::cache_window::CacheWindow;
use super::canvas::{Tool, View};
use super::commands::{self, Command};
use super::document::{Document, NewDocument, Opening, RecipeOffer};
use super::export::Exports;
use super::form::{EditForm, parse_ladder, variant_at};
use super::mask::Brush;
use super::model::ModelState;
use super::panels;
use super::persist::{Autosaver, RestoredSession, Settings, StateFiles};
use super::results::ResultFiles;
use super::session::{EditOrder, EditSession, SessionEnv, TuneStatus};
use super::textures;
use super::variants::{VariantSettings, VariantState};
use crate::jobs::{
    DEFAULT_THRESHOLD, JobId, LoadRequest, MicroBatch, ModelRequest, PreviewMode, Region,
    TrainingChoice, TuneSettings,
};
use crate::world;

#[derive(Debug, Clone, PartialEq)]
pub enum NoticeKind {
    Info,
    Error,
}

/// One sentence for the user, above the panels.
#[derive(Debug, Clone)]
pub struct Notice {
    pub text: String,
    pub kind: NoticeKind,
}

impl Notice {
    pub fn info(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            kind: NoticeKind::Info,
        }
    }

    pub fn error(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            kind: NoticeKind::Error,
        }
    }
}

pub struct EditorApp {
    pub(super) ctx: Context,
    pub(super) options: EditorOptions,
    pub(super) settings: Settings,
    pub(super) chores: Chores,
    pub(super) model: ModelState,
    pub(super) doc: Option<Document>,
    pub(super) next_version: u64,
    pub(super) opening: Opening,
    pub(super) form: EditForm,
    pub(super) session: EditSession,
    /// Where this run keeps its full-resolution results.
    pub(super) results: ResultFiles,
    pub(super) view: View,
    /// Give the prompt the keyboard next frame (after a photo opens).
    pub(super) focus_prompt: bool,
    pub(super) canvas_rect: Option<Rect>,
    pub(super) notice: Option<Notice>,
    /// An opened image's recipe, offered until used or dismissed.
    pub(super) recipe_offer: Option<RecipeOffer>,
    pub(super) exports: Exports,
    pub(super) autosave: AutosaveState,
    pub(super) cache_window: CacheWindow,
}

impl EditorApp {
    pub fn new(cc: &eframe::CreationContext<'_>, options: EditorOptions) -> Self {
        let ctx = cc.egui_ctx.clone();
        let settings = options.state.load_settings();
        let saver = Autosaver::start(options.state.clone()).ok();
        // The device's limit where eframe tells it (wgpu); egui's own value otherwise, which
        // each frame then corrects.
        let gpu_side = cc
            .wgpu_render_state
            .as_ref()
            .map(|s| s.device.limits().max_texture_dimension_2d as usize)
            .unwrap_or_else(|| ctx.input(|i| i.max_texture_side));
        let chores = Chores::new(options.dialogs.clone(), waker(&ctx), gpu_side);
        let form = EditForm::new(
            options
                .tune
                .as_ref()
                .map_or(&settings.snapshot_steps[..], |t| &t.snapshot_steps),
        );
        let results = ResultFiles::new(options.state.root());
        let mut app = Self {
            ctx,
            autosave: AutosaveState::new(saver, &settings),
            settings,
            chores,
            model: ModelState::new(),
            doc: None,
            next_version: 1,
            opening: Opening::default(),
            form,
            session: EditSession::default(),
            results,
            view: View::default(),
            canvas_rect: None,
            focus_prompt: false,
            notice: None,
            recipe_offer: None,
            exports: Exports::default(),
            cache_window: CacheWindow::default(),
            options,
        };
        if app.autosave.saver.is_none() {
            app.error("autosave could not start; save your work with Export");
        }
        app.chores.remove_stale_results(app.results.clone());
        let model = if app.options.model_was_chosen() {
            app.options.model.model.clone()
        } else {
            app.settings
                .model
                .clone()
                .unwrap_or_else(|| app.options.model.model.clone())
        };
        app.load_model(model, false);
        match app.options.photo.clone() {
            Some(path) => app.apply(Command::Open(path)),
            None => {
                let request = app.opening.start();
                app.chores
                    .restore_session(request, app.options.state.clone());
            }
        }
        app
    }

    /// The state folder (for tests and the About line).
    pub fn state_files(&self) -> &StateFiles {
        &self.options.state
    }

    /// The current notice, if any (tests read it).
    pub fn notice_text(&self) -> Option<&str> {
        self.notice.as_ref().map(|n| n.text.as_str())
    }

    /// True while a model load, an edit or a tune is under way.
    pub fn is_busy(&self) -> bool {
        self.model.loader.is_some()
            || self.session.is_running()
            || self.exports.running
            || self.opening.in_progress()
    }

    pub fn model_ready(&self) -> bool {
        self.model.runner.is_some()
    }

    /// What the loaded model is (its name, hash, device and precision), once it is ready.
    pub fn model_summary(&self) -> Option<&crate::jobs::ModelSummary> {
        self.model.summary()
    }

    /// Whether an opened image's recipe is on offer.
    pub fn recipe_offered(&self) -> bool {
        self.recipe_offer.is_some()
    }

    /// The variant shown now: its job and settings.
    pub fn shown_variant(&self) -> Option<(JobId, VariantSettings)> {
        self.session
            .variants
            .shown(self.form.fidelity)
            .map(|(_, v)| (v.job, v.settings.clone()))
    }

    pub fn finished_variants(&self) -> usize {
        self.session
            .variants
            .variants()
            .iter()
            .filter(|v| v.result().is_some())
            .count()
    }

    /// Where this run keeps its full-resolution results (tests look there).
    pub fn results_dir(&self) -> &std::path::Path {
        self.results.dir()
    }

    pub fn mask_is_empty(&self) -> bool {
        self.doc.as_ref().is_none_or(|d| d.mask.is_empty())
    }

    pub fn photo_size(&self) -> Option<(u32, u32)> {
        self.doc.as_ref().map(|d| d.photo.dimensions())
    }

    pub fn prompt(&self) -> &str {
        &self.form.prompt
    }

    pub fn set_prompt(&mut self, prompt: &str) {
        self.form.prompt = prompt.to_string();
    }

    /// Where the picture was drawn last frame, in points.
    pub fn canvas_rect(&self) -> Option<Rect> {
        self.canvas_rect
    }

    /// The step of the running fine-tune, if one runs.
    pub fn tune_step(&self) -> Option<usize> {
        match self.session.tune {
            TuneStatus::Running { step, .. } => Some(step),
            _ => None,
        }
    }

    /// The sampling step of the running variant, if one runs.
    pub fn sampling_step(&self) -> Option<usize> {
        self.session
            .variants
            .variants()
            .iter()
            .find_map(|v| match v.state {
                VariantState::Running { step, .. } => Some(step),
                _ => None,
            })
    }

    pub fn last_export(&self) -> Option<&PathBuf> {
        self.exports.last.as_ref()
    }

    /// Whether the cache window is reading or changing the cache (tests wait on it).
    pub fn cache_busy(&self) -> bool {
        self.cache_window.busy
    }

    /// The keys of the cache entries listed in the cache window.
    pub fn cache_keys(&self) -> Vec<String> {
        self.cache_window.keys()
    }

    /// Waits for the autosave thread to write everything (tests, and clean exit).
    pub fn flush_autosave(&mut self) {
        self.autosave();
        self.autosave.flush(&self.options.state);
    }

    pub(super) fn info(&mut self, text: impl Into<String>) {
        self.notify(Notice::info(text));
    }

    pub(super) fn error(&mut self, text: impl Into<String>) {
        self.notify(Notice::error(text));
    }

    /// Shows the notice, and echoes it to stderr: someone who started the editor from a
    /// terminal gets a log of what happened to paste into a bug report (and the smoke test
    /// reads it).
    fn notify(&mut self, notice: Notice) {
        eprintln!("unitune: {}", notice.text);
        self.notice = Some(notice);
    }

    fn on_chore(&mut self, result: ChoreResult) {
        match result {
            ChoreResult::PhotoOpened {
                request,
                path,
                result,
            } => self.on_photo_opened(request, path, result),
            ChoreResult::SessionRestored { request, restored } => {
                self.on_session_restored(request, restored)
            }
            ChoreResult::PhotoChosen(Some(path)) => self.apply(Command::Open(path)),
            ChoreResult::LoraPathChosen(Some(path), steps) => self.export_lora_to(path, steps),
            ChoreResult::LoraPathChosen(None, _)
            | ChoreResult::PhotoChosen(None)
            | ChoreResult::ModelChosen(None)
            | ChoreResult::CleanedUp => {}
            ChoreResult::ModelChosen(Some(path)) => {
                self.load_model(path.display().to_string(), false)
            }
            ChoreResult::Exported {
                path,
                result,
                request,
            } => {
                let notice = self.exports.finished(path, result, request);
                self.notify(notice);
            }
            ChoreResult::ExportAbandoned => self.exports.running = false,
            ChoreResult::VariantPrepared(prepared) => {
                let env = SessionEnv {
                    ctx: &self.ctx,
                    chores: &self.chores,
                    results: &self.results,
                };
                self.session.show_variant(prepared, &env);
            }
            ChoreResult::DisplayLoaded { job, display } => match display {
                Ok(display) if self.session.variants.find(job).is_some() => self
                    .session
                    .textures
                    .insert_display(&self.ctx, job, display),
                Ok(_) => {}
                // The thumbnail stands in; the export reports the file if it is needed.
                Err(message) => eprintln!("unitune: {message}"),
            },
            ChoreResult::CacheListed(listing) => self.cache_window.listed(listing, &self.ctx),
            ChoreResult::Failed { chore, message } => {
                let what = match chore {
                    Chore::Open(request) | Chore::Restore(request) => {
                        if !self.opening.finish(request) {
                            // A superseded request: nobody waits for it.
                            return;
                        }
                        "opening the photo"
                    }
                    Chore::Export => {
                        self.exports.running = false;
                        "exporting"
                    }
                    Chore::Dialog => "in the file dialog",
                    Chore::Display(job) => {
                        self.session
                            .variants
                            .update(job, VariantState::Failed(message.clone()));
                        "showing the result"
                    }
                    Chore::Cleanup => return,
                    Chore::Cache => {
                        self.cache_window.listing_failed();
                        "reading the snapshot cache"
                    }
                };
                self.error(format!(
                    "Something went wrong {what} ({message}); your work is unchanged."
                ));
            }
        }
    }

    fn on_photo_opened(
        &mut self,
        request: OpenId,
        path: PathBuf,
        result: Result<OpenedPhoto, String>,
    ) {
        if !self.opening.finish(request) {
            return;
        }
        let mut opened = match result {
            Ok(opened) => opened,
            // The current work stays as it was.
            Err(message) => return self.error(format!("Could not open that file: {message}")),
        };
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let Some(recipe) = opened.recipe.take() else {
            self.show_opened(path, opened);
            return self.info(format!("Opened {name}."));
        };
        let prompt = recipe.prompt.clone();
        if self.doc.is_some() {
            self.recipe_offer = Some(RecipeOffer {
                name: name.clone(),
                recipe,
                image: Some((path, opened)),
            });
            self.info(format!(
                "{name} holds the recipe it was made with (\"{prompt}\"): use its prompt and settings, or open it as the photo."
            ));
        } else {
            self.show_opened(path, opened);
            self.recipe_offer = Some(RecipeOffer {
                name: name.clone(),
                recipe,
                image: None,
            });
            self.info(format!(
                "Opened {name}. It holds the recipe it was made with (\"{prompt}\"): use its prompt and settings to edit another photo the same way."
            ));
        }
    }

    fn show_opened(&mut self, path: PathBuf, opened: OpenedPhoto) {
        self.settings.remember_file(&path);
        let photo = opened.photo;
        self.set_photo(NewDocument {
            source: Some(path),
            photo: photo.rgb,
            display: opened.display,
            alpha: photo.alpha,
            file_rgb: photo.file_rgb,
            metadata: photo.metadata,
            mask: None,
        });
    }

    /// Opens the image whose recipe is offered as the photo (the recipe stays on offer).
    pub(super) fn open_offered_image(&mut self) {
        let Some((path, opened)) = self.recipe_offer.as_mut().and_then(|o| o.image.take()) else {
            return;
        };
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        self.show_opened(path, opened);
        self.info(format!("Opened {name}."));
    }

    /// The offered recipe's prompt and settings become the next edit's.
    pub(super) fn use_offered_recipe(&mut self) {
        let Some(offer) = self.recipe_offer.take() else {
            return;
        };
        self.form.use_recipe(&offer.recipe, &mut self.settings);
        let note = match (offer.recipe.instruct, self.model.is_instruct()) {
            (true, false) => {
                " It was an instruction edit: load an InstructPix2Pix model to repeat it."
            }
            (false, true) => {
                " It was made by describing the result: load a Stable Diffusion model to repeat it."
            }
            _ => " Press Edit to make it again.",
        };
        self.info(format!(
            "Using the prompt and settings of {}.{note}",
            offer.name
        ));
    }

    fn on_session_restored(
        &mut self,
        request: OpenId,
        restored: Option<(RestoredSession, egui::ColorImage)>,
    ) {
        if !self.opening.finish(request) {
            return;
        }
        if let Some((restored, display)) = restored
            && self.doc.is_none()
        {
            self.form.prompt = restored.text.prompt.clone();
            self.form.baseline_prompt = restored.text.baseline_prompt.clone();
            self.form.fidelity = restored.text.fidelity.clamp(0.0, 1.0);
            self.set_photo(NewDocument {
                source: restored.text.source.clone(),
                photo: restored.photo,
                display,
                alpha: restored.alpha,
                file_rgb: restored.file_rgb,
                metadata: restored.metadata,
                mask: restored.mask,
            });
            self.info("Restored your last photo, mask and prompt.");
        }
    }

    /// Opens `new` as the photo: the last photo's edit and variants go.
    fn set_photo(&mut self, new: NewDocument) {
        if let Some(runner) = &self.model.runner {
            self.session.cancel_all(runner);
        }
        let version = self.next_version;
        self.next_version += 1;
        self.doc = Some(Document::new(&self.ctx, version, new));
        std::mem::take(&mut self.session).discard(&self.chores);
        self.view = View {
            tool: self.view.tool,
            ..View::default()
        };
        self.focus_prompt = true;
        self.save_session_now();
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
        let instruct = self.model.is_instruct();
        let table = self.model.fidelity_table();
        if self.doc.is_none() {
            return self.error("Open a photo first (File > Open, or drop one on the window).");
        }
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
        let seed = match self.form.seed() {
            Ok(seed) => seed,
            Err(message) => return self.error(message),
        };
        self.settings.snapshot_steps = tune.snapshot_steps.clone();
        let first = if self.form.advanced.custom {
            vec![
                self.form
                    .variant(seed, &tune.snapshot_steps, instruct, table),
            ]
        } else {
            EditSession::first_positions(self.form.fidelity)
                .into_iter()
                .map(|p| variant_at(p, seed, &tune.snapshot_steps, instruct, table))
                .collect()
        };
        let auto = self.settings.auto_region && !instruct;
        let region = self
            .doc
            .as_mut()
            .map_or(Region::All, |d| edit_region(&mut d.mask, auto));
        let order = EditOrder {
            prompt,
            baseline_prompt: self.form.baseline_prompt.trim().to_string(),
            region,
            tune,
            seed,
            sampling_steps: self.settings.sampling_steps,
            interpolate: self.settings.interpolate,
            instruct,
            table,
            first,
        };
        self.notice = None;
        let (Some(doc), Some(runner)) = (&self.doc, &mut self.model.runner) else {
            return;
        };
        let env = SessionEnv {
            ctx: &self.ctx,
            chores: &self.chores,
            results: &self.results,
        };
        if let Err(message) = self.session.start(order, &doc.photo_ref(), runner, &env) {
            self.error(message);
        }
    }

    pub(super) fn more_seeds(&mut self) {
        let instruct = self.model.is_instruct();
        let (Some(doc), Some(runner)) = (&self.doc, &mut self.model.runner) else {
            return;
        };
        let Some(edit) = &self.session.edit else {
            return self.error("Run an edit first; more seeds add variants to it.");
        };
        let variants = (0..2)
            .map(|_| {
                let seed = crate::jobs::choose_seed(None);
                self.form
                    .variant(seed, &edit.ladder, edit.instruct, edit.table)
            })
            .collect();
        if let Err(message) = self
            .session
            .more_seeds(variants, &doc.photo_ref(), instruct, runner)
        {
            self.error(message);
        }
    }

    pub(super) fn slider_released(&mut self) {
        let instruct = self.model.is_instruct();
        self.session.variants.follow_slider();
        let (Some(doc), Some(runner), Some(edit)) =
            (&self.doc, &mut self.model.runner, &self.session.edit)
        else {
            return;
        };
        if self.form.advanced.custom {
            return;
        }
        let settings = variant_at(
            self.form.fidelity,
            edit.seed,
            &edit.ladder,
            edit.instruct,
            edit.table,
        );
        if let Err(message) =
            self.session
                .slider_released(settings, &doc.photo_ref(), instruct, runner)
        {
            self.error(message);
        }
    }

    /// File > Export LoRA: asks where, then the engine thread writes the file.
    pub(super) fn ask_where_to_export_lora(&mut self) {
        let Some(steps) = self.session.lora_export_steps(self.form.fidelity) else {
            return self.error(
                "Export LoRA needs a finished fine-tune in the lora training mode (Advanced).",
            );
        };
        let stem = self.doc.as_ref().map_or("photo".to_string(), |d| d.stem());
        let directory = self.doc.as_ref().and_then(|d| d.folder());
        self.chores
            .pick_lora_path(directory, format!("{stem}-lora.safetensors"), steps);
    }

    fn export_lora_to(&mut self, path: PathBuf, steps: usize) {
        let photo_name = self.doc.as_ref().and_then(|d| d.file_name());
        let Some(runner) = self.model.runner.as_mut() else {
            return self.error("The model is not loaded; load it to export the LoRA.");
        };
        if let Err(message) = self.session.export_lora(path, steps, photo_name, runner) {
            self.error(message);
        }
    }

    /// Hands the photo, mask and prompt to the autosave thread now.
    pub(super) fn save_session_now(&mut self) {
        self.autosave.save_now(self.doc.as_mut(), &self.form);
    }

    /// Saves what changed since the last frame (typing, settings).
    fn autosave(&mut self) {
        if let Some(failure) = self
            .autosave
            .on_frame(self.doc.as_mut(), &self.form, &self.settings)
        {
            self.error(failure);
        }
    }

    /// `model` with every global flag the editor was started with, and the precision in
    /// effect: `--precision` until the user picks one in Advanced, else the saved choice.
    pub(super) fn model_request(&self, model: &str) -> ModelRequest {
        ModelRequest {
            model: model.to_owned(),
            precision: self
                .options
                .precision_override
                .unwrap_or_else(|| self.settings.precision.parse().unwrap_or_default()),
            ..self.options.model.clone()
        }
    }

    /// Loads `model` (downloading it only when the user agreed); the old runner's snapshots
    /// go with it.
    pub(super) fn load_model(&mut self, model: String, allow_download: bool) {
        self.session.forget_tune();
        let request = LoadRequest {
            model: self.model_request(&model),
            allow_download,
            snapshot_cache: self.options.snapshot_cache.clone(),
            preview: self.settings.preview,
        };
        self.model.load(request, waker(&self.ctx));
    }

    fn poll_loader(&mut self) {
        let flags = self.model_request("").flags_in_effect();
        if let Some(model) = self.model.poll(&flags) {
            self.settings.model = Some(model);
            if self.model.is_demo() && self.doc.is_none() && !self.opening.in_progress() {
                self.open_demo_scene();
            }
        }
        if let Some(notice) = self.model.preview_notice.take() {
            self.info(notice);
        }
    }

    /// With the demo model and nothing open, a scene of its world opens, with an edit to try
    /// in the prompt box: a newcomer can press Edit at once.
    fn open_demo_scene(&mut self) {
        let path = self.options.state.root().join("demo-scene.png");
        let written = std::fs::create_dir_all(self.options.state.root())
            .map_err(|e| e.to_string())
            .and_then(|()| {
                world::example_scene()
                    .render()
                    .save(&path)
                    .map_err(|e| e.to_string())
            });
        match written {
            Ok(()) => {
                if self.form.prompt.trim().is_empty() {
                    self.form.prompt = world::EXAMPLE_PROMPT.to_string();
                }
                self.apply(Command::Open(path));
            }
            Err(err) => self.error(format!(
                "cannot write the demo scene to {}: {err}",
                path.display()
            )),
        }
    }

    /// The preview setting changed: the runner switches at once; the tiny VAE, if the
    /// runner lacks it, comes with loading the model again.
    pub(super) fn set_preview(&mut self, mode: PreviewMode) {
        self.settings.preview = mode;
        match &self.model.runner {
            Some(runner) if mode == PreviewMode::Taesd && !runner.has_tiny_preview() => {
                let model = self.model.name();
                self.load_model(model, false);
            }
            Some(runner) => runner.set_preview(mode),
            None => {}
        }
    }

    /// Whether the compare key (Space, held while not typing) shows the original.
    pub(super) fn comparing(&self, ctx: &Context) -> bool {
        !ctx.egui_wants_keyboard_input() && ctx.input(|i| i.key_down(egui::Key::Space))
    }

    pub(super) fn brush(&self) -> Brush {
        Brush {
            size_px: self.settings.brush_size_px,
            softness: self.settings.brush_softness,
            erase: self.view.tool == Tool::Eraser,
        }
    }

    /// Everything but drawing: events from every thread, dropped files, shortcuts.
    fn update_state(&mut self, ctx: &Context) -> Vec<Command> {
        self.chores.set_gpu_side(ctx.input(|i| i.max_texture_side));
        self.poll_loader();
        if let Some(runner) = &self.model.runner {
            let env = SessionEnv {
                ctx: &self.ctx,
                chores: &self.chores,
                results: &self.results,
            };
            let notices = self.session.poll(runner, &env);
            for notice in notices {
                self.notify(notice);
            }
        }
        while let Some(result) = self.chores.try_next() {
            self.on_chore(result);
        }
        let mut commands = commands::shortcuts(ctx, self.settings.brush_size_px);
        if let Some(region) = self.session.take_estimated_region() {
            commands.push(Command::ShowRegion(region));
        }
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        // A checkpoint dropped anywhere (the model panel included) loads as the model; any
        // other file opens as the photo.
        if let Some(path) = dropped.into_iter().next() {
            commands.push(if is_checkpoint(&path) {
                Command::LoadModelFile(path)
            } else {
                Command::Open(path)
            });
        }
        if let Some(doc) = &mut self.doc
            && let Some(dirty) = doc.mask.take_dirty()
        {
            textures::update_mask(ctx, &mut doc.mask_texture, doc.mask.image(), Some(dirty));
        }
        self.session
            .keep_shown_display(self.form.fidelity, &self.chores);
        commands
    }

    /// The result (or live preview) to show over the photo, with the slider at `fidelity`.
    pub(super) fn shown_texture(&self, fidelity: f64) -> Option<&TextureHandle> {
        if let Some((_, variant)) = self.session.variants.shown(fidelity) {
            return self.session.textures.display(variant.job);
        }
        self.session.textures.live_preview.as_ref().map(|(_, t)| t)
    }
}

impl eframe::App for EditorApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        let mut commands = self.update_state(&ctx);
        // The panels see the app as it is and edit only the form; it is put back before any
        // command is applied.
        let mut form = std::mem::take(&mut self.form);
        commands.extend(panels::show(ui, self, &mut form));
        self.form = form;
        for command in commands {
            self.apply(command);
        }
        self.autosave();
        if self.is_busy() {
            // Progress text (elapsed, ETA) moves even between events.
            ctx.request_repaint_after(Duration::from_millis(250));
        }
    }

    fn on_exit(&mut self) {
        if let Some(runner) = &self.model.runner {
            self.session.cancel_all(runner);
        }
        self.autosave();
        self.autosave.finish();
        self.results.remove_all();
    }
}

/// Where the next edit may change the photo: with nothing painted by the user (the layer
/// empty, or still showing the last automatic region untouched) a fresh automatic region when
/// asked for, else everywhere; otherwise the painted mask.
fn edit_region(mask: &mut super::mask::MaskLayer, auto: bool) -> Region {
    if mask.is_empty() || mask.is_estimate() {
        return if auto {
            Region::Auto {
                threshold: DEFAULT_THRESHOLD,
            }
        } else {
            Region::All
        };
    }
    match mask.painted() {
        Some(mask) => Region::Mask {
            mask,
            name: "painted in the editor".to_owned(),
        },
        None => Region::All,
    }
}

/// Repaints the UI from any thread.
fn waker(ctx: &Context) -> Arc<dyn Fn() + Send + Sync> {
    let repaint = ctx.clone();
    Arc::new(move || repaint.request_repaint())
}

/// Whether a dropped file is a single-file model checkpoint rather than a photo.
fn is_checkpoint(path: &std::path::Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}
