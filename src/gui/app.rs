//! The editor's state, built at start, and its frame: read every thread's events, draw the
//! panels, apply the commands they return ([`super::commands`]), autosave what changed.
//!
//! Each flow lives in its own file, as `impl EditorApp` blocks: [`super::model`] (loading
//! the model), [`super::document`] (opening photos), [`super::session`] (tune, variants and
//! their textures), [`super::export`], [`super::autosave`], [`super::cache_window`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use egui::{Context, Rect, TextureHandle};

use super::EditorOptions;
use super::autosave::AutosaveState;
use super::background::{Chore, ChoreResult, Chores};
use super::cache_window::CacheWindow;
use super::canvas::{Tool, View};
use super::commands::{self, Command};
use super::document::{Document, Opening, RecipeOffer};
use super::export::ExportState;
use super::mask::Brush;
use super::model::ModelState;
use super::panels;
use super::persist::{Autosaver, Settings, StateFiles};
use super::results::ResultFiles;
use super::session::{EditForm, EditSession, TuneStatus};
use super::textures;
use super::variants::{VariantSettings, VariantState};
use crate::jobs::JobId;

#[derive(Debug, Clone, PartialEq)]
pub enum NoticeKind {
    Info,
    Error,
}

#[derive(Debug, Clone)]
pub struct Notice {
    pub text: String,
    pub kind: NoticeKind,
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
    pub(super) exports: ExportState,
    pub(super) autosave: AutosaveState,
    pub(super) cache_window: CacheWindow,
}

impl EditorApp {
    pub fn new(cc: &eframe::CreationContext<'_>, options: EditorOptions) -> Self {
        let ctx = cc.egui_ctx.clone();
        let repaint = ctx.clone();
        let waker: Arc<dyn Fn() + Send + Sync> = Arc::new(move || repaint.request_repaint());
        let settings = options.state.load_settings();
        let saver = Autosaver::start(options.state.clone()).ok();
        // The device's limit where eframe tells it (wgpu); egui's own value otherwise, which
        // each frame then corrects.
        let gpu_side = cc
            .wgpu_render_state
            .as_ref()
            .map(|s| s.device.limits().max_texture_dimension_2d as usize)
            .unwrap_or_else(|| ctx.input(|i| i.max_texture_side));
        let chores = Chores::new(options.dialogs.clone(), waker, gpu_side);
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
            exports: ExportState::default(),
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
            None => app.restore_session(),
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

    pub(super) fn info(&mut self, text: impl Into<String>) {
        self.notify(text.into(), NoticeKind::Info);
    }

    pub(super) fn error(&mut self, text: impl Into<String>) {
        self.notify(text.into(), NoticeKind::Error);
    }

    /// Shows the notice, and echoes it to stderr: someone who started the editor from a
    /// terminal gets a log of what happened to paste into a bug report (and the smoke test
    /// reads it).
    fn notify(&mut self, text: String, kind: NoticeKind) {
        eprintln!("unitune: {text}");
        self.notice = Some(Notice { text, kind });
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
            ChoreResult::LoraPathChosen(Some(path), steps) => self.write_lora(path, steps),
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
            } => self.on_exported(path, result, request),
            ChoreResult::ExportAbandoned => self.exports.running = false,
            ChoreResult::VariantPrepared(prepared) => self.show_variant(prepared),
            ChoreResult::DisplayLoaded { job, display } => match display {
                Ok(display) if self.session.variants.find(job).is_some() => self
                    .session
                    .textures
                    .insert_display(&self.ctx, job, display),
                Ok(_) => {}
                // The thumbnail stands in; the export reports the file if it is needed.
                Err(message) => eprintln!("unitune: {message}"),
            },
            ChoreResult::CacheListed(listing) => self.cache_window.listed(listing),
            ChoreResult::Failed { chore, message } => {
                let what = match chore {
                    Chore::Open(request) | Chore::Restore(request) => {
                        if !self.on_open_failed(request) {
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
        self.poll_jobs();
        while let Some(result) = self.chores.try_next() {
            self.on_chore(result);
        }
        let mut commands = commands::shortcuts(ctx, self.settings.brush_size_px);
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
        self.keep_shown_display();
        commands
    }

    /// The result (or live preview) to show over the photo.
    pub(super) fn shown_texture(&self) -> Option<&TextureHandle> {
        if let Some((_, variant)) = self.session.variants.shown(self.form.fidelity) {
            return self.session.textures.display(variant.job);
        }
        self.session.textures.live_preview.as_ref().map(|(_, t)| t)
    }
}

impl eframe::App for EditorApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        let mut commands = self.update_state(&ctx);
        commands.extend(panels::show(ui, self));
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
        self.cancel_all();
        self.autosave();
        if let Some(saver) = self.autosave.saver.take() {
            saver.flush();
        }
        self.results.remove_all();
    }
}

/// Whether a dropped file is a single-file model checkpoint rather than a photo.
fn is_checkpoint(path: &std::path::Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}
