//! The editor's state and the one place where it changes: [`EditorApp::apply`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::{Context, Key, KeyboardShortcut, Modifiers, TextureHandle};
use image::{GrayImage, RgbImage};

use super::EditorOptions;
use super::background::{Chore, ChoreResult, Chores, ExportRequest, OpenedPhoto, PreparedVariant};
use super::canvas::{Tool, View};
use super::mask::{Brush, MaskLayer};
use super::panels;
use super::persist::{Autosaver, SessionSnapshot, SessionText, Settings, StateFiles};
use super::textures;
use super::variants::{FIRST_POSITIONS, VariantSet, VariantSettings, VariantState};
use crate::jobs::{
    DownloadStatus, JobEvent, JobId, JobRequest, JobRunner, LoadEvent, LoadRequest, ModelLoader,
    Stage, TrainMode, TuneSettings, parameters_for,
};
use crate::recipe::{Recipe, TuneRecipe};

/// The longest the UI spends reading job events per frame.
const EVENT_BUDGET: Duration = Duration::from_millis(4);
/// Thumbnails in the strip, in pixels.
const THUMBNAIL_SIDE: u32 = 160;
/// The mask is painted at most at this resolution (and scaled to the photo for the engine).
/// A brush mask needs no more: the engine sees it at its working size (512-768) and the
/// paste back feathers its edge, while each whole-mask upload (first stroke, clear,
/// invert) costs a UI frame time in proportion to its pixels.
const MASK_MAX_SIDE: u32 = 2048;

/// Everything the panels can ask for; applied in [`EditorApp::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    OpenDialog,
    Open(PathBuf),
    Edit,
    Cancel,
    MoreSeeds,
    /// The slider moves: show the nearest finished variant, start nothing.
    SliderDragged,
    /// The slider was released (or set by keyboard) at this position.
    SliderReleased,
    /// A brush stroke ended.
    MaskChanged,
    SelectVariant(usize),
    Export,
    RetryExport,
    Undo,
    Redo,
    ClearMask,
    InvertMask,
    DownloadModel,
    CancelDownload,
    ChooseModelFolder,
    RetryModel,
    DismissNotice,
    ResetView,
}

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

/// Where the model stands.
pub enum ModelStatus {
    Loading {
        model: String,
        detail: String,
    },
    Downloading {
        model: String,
        status: DownloadStatus,
    },
    /// Not on the machine: offer the download (after the license) or a folder.
    Missing {
        model: String,
        message: String,
    },
    Failed {
        model: String,
        message: String,
    },
    Ready {
        name: String,
        source: String,
        device: String,
        prediction_type: &'static str,
        precision: &'static str,
    },
}

/// The open photo and its mask.
pub struct Document {
    /// Changes whenever the photo does (autosave, and tunes, key on it).
    pub version: u64,
    pub source: Option<PathBuf>,
    pub photo: Arc<RgbImage>,
    pub alpha: Option<Arc<GrayImage>>,
    pub mask: MaskLayer,
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

/// The fine-tune of the current photo.
pub enum TuneStatus {
    None,
    Running {
        job: JobId,
        step: usize,
        total: usize,
        loss: Option<f32>,
        started: Instant,
    },
    Done {
        snapshots: Vec<usize>,
        from_cache: bool,
    },
}

/// What an edit was asked with (kept so slider releases and more seeds match it).
#[derive(Debug, Clone)]
pub struct EditContext {
    pub prompt: String,
    pub baseline_prompt: String,
    pub photo_version: u64,
    /// At the mask layer's size (the worker scales it to the photo's).
    pub mask: Option<Arc<GrayImage>>,
    pub tune: TuneSettings,
    pub seed: u64,
    pub sampling_steps: usize,
    pub interpolate: bool,
}

pub struct EditorApp {
    pub(super) ctx: Context,
    pub(super) options: EditorOptions,
    pub(super) settings: Settings,
    autosaver: Option<Autosaver>,
    chores: Chores,
    loader: Option<ModelLoader>,
    runner: Option<JobRunner>,
    pub(super) model: ModelStatus,
    pub(super) doc: Option<Document>,
    next_version: u64,
    pub(super) prompt: String,
    pub(super) baseline_prompt: String,
    pub(super) fidelity: f64,
    pub(super) advanced: Advanced,
    pub(super) tune: TuneStatus,
    /// The photo version and recipe the worker's snapshots belong to.
    tuned_for: Option<(u64, TuneSettings)>,
    pub(super) edit: Option<EditContext>,
    pub(super) variants: VariantSet,
    pub(super) thumbnails: HashMap<JobId, TextureHandle>,
    full_textures: HashMap<JobId, TextureHandle>,
    pub(super) live_preview: Option<(JobId, TextureHandle)>,
    pub(super) tune_preview: Option<TextureHandle>,
    pub(super) photo_texture: Option<TextureHandle>,
    pub(super) mask_texture: Option<TextureHandle>,
    pub(super) view: View,
    /// Give the prompt the keyboard next frame (after a photo opens).
    pub(super) focus_prompt: bool,
    pub(super) canvas_rect: Option<egui::Rect>,
    pub(super) notice: Option<Notice>,
    /// The export that failed, to try again.
    pub(super) failed_export: Option<(PathBuf, ExportRequest)>,
    pub(super) exporting: bool,
    pub(super) opening: bool,
    /// Where the last export went.
    pub(super) last_export: Option<PathBuf>,
    /// The session text last handed to autosave (to save only on change).
    saved_text: Option<SessionText>,
    saved_settings: Settings,
}

impl EditorApp {
    pub fn new(cc: &eframe::CreationContext<'_>, options: EditorOptions) -> Self {
        let ctx = cc.egui_ctx.clone();
        let repaint = ctx.clone();
        let waker: Arc<dyn Fn() + Send + Sync> = Arc::new(move || repaint.request_repaint());
        let settings = options.state.load_settings();
        let autosaver = Autosaver::start(options.state.clone()).ok();
        let chores = Chores::new(options.dialogs.clone(), waker.clone());
        let advanced = Advanced {
            custom: false,
            tune_steps: 64,
            t0: 0.96,
            guidance: 9.0,
            seed_text: String::new(),
            snapshot_text: ladder_text(
                options
                    .tune
                    .as_ref()
                    .map_or(&settings.snapshot_steps[..], |t| &t.snapshot_steps),
            ),
        };
        let mut app = Self {
            ctx,
            settings: settings.clone(),
            autosaver,
            chores,
            loader: None,
            runner: None,
            model: ModelStatus::Loading {
                model: String::new(),
                detail: String::new(),
            },
            doc: None,
            next_version: 1,
            prompt: String::new(),
            baseline_prompt: String::new(),
            fidelity: 0.5,
            advanced,
            tune: TuneStatus::None,
            tuned_for: None,
            edit: None,
            variants: VariantSet::default(),
            thumbnails: HashMap::new(),
            full_textures: HashMap::new(),
            live_preview: None,
            tune_preview: None,
            photo_texture: None,
            mask_texture: None,
            view: View::default(),
            canvas_rect: None,
            focus_prompt: false,
            notice: None,
            failed_export: None,
            exporting: false,
            opening: false,
            last_export: None,
            saved_text: None,
            saved_settings: settings,
            options,
        };
        if app.autosaver.is_none() {
            app.error("autosave could not start; save your work with Export");
        }
        let model = if app.options.model_was_chosen() {
            app.options.model.clone()
        } else {
            app.settings
                .model
                .clone()
                .unwrap_or_else(|| app.options.model.clone())
        };
        app.load_model(model, false);
        match app.options.photo.clone() {
            Some(path) => app.apply(Command::Open(path)),
            None => {
                app.opening = true;
                app.chores.restore_session(app.options.state.clone());
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
        self.loader.is_some()
            || matches!(self.tune, TuneStatus::Running { .. })
            || !self.variants.pending_jobs().is_empty()
            || self.exporting
            || self.opening
    }

    pub fn model_ready(&self) -> bool {
        self.runner.is_some()
    }

    /// The variant shown now: its job and settings.
    pub fn shown_variant(&self) -> Option<(JobId, VariantSettings)> {
        self.variants
            .shown(self.fidelity)
            .map(|(_, v)| (v.job, v.settings.clone()))
    }

    pub fn finished_variants(&self) -> usize {
        self.variants
            .variants()
            .iter()
            .filter(|v| v.image().is_some())
            .count()
    }

    pub fn mask_is_empty(&self) -> bool {
        self.doc.as_ref().is_none_or(|d| d.mask.is_empty())
    }

    pub fn photo_size(&self) -> Option<(u32, u32)> {
        self.doc.as_ref().map(|d| d.photo.dimensions())
    }

    pub fn prompt(&self) -> &str {
        &self.prompt
    }

    pub fn set_prompt(&mut self, prompt: &str) {
        self.prompt = prompt.to_string();
    }

    /// Where the picture was drawn last frame, in points.
    pub fn canvas_rect(&self) -> Option<egui::Rect> {
        self.canvas_rect
    }

    /// The step of the running fine-tune, if one runs.
    pub fn tune_step(&self) -> Option<usize> {
        match self.tune {
            TuneStatus::Running { step, .. } => Some(step),
            _ => None,
        }
    }

    /// The sampling step of the running variant, if one runs.
    pub fn sampling_step(&self) -> Option<usize> {
        self.variants.variants().iter().find_map(|v| match v.state {
            VariantState::Running { step, .. } => Some(step),
            _ => None,
        })
    }

    pub fn last_export(&self) -> Option<&PathBuf> {
        self.last_export.as_ref()
    }

    /// Waits for the autosave thread to write everything (tests, and clean exit).
    pub fn flush_autosave(&mut self) {
        self.autosave();
        if let Some(saver) = self.autosaver.take() {
            saver.flush();
        }
        self.autosaver = Autosaver::start(self.options.state.clone()).ok();
    }

    fn info(&mut self, text: impl Into<String>) {
        self.notify(text.into(), NoticeKind::Info);
    }

    fn error(&mut self, text: impl Into<String>) {
        self.notify(text.into(), NoticeKind::Error);
    }

    /// Shows the notice, and echoes it to stderr: someone who started the editor from a
    /// terminal gets a log of what happened to paste into a bug report (and the smoke test
    /// reads it).
    fn notify(&mut self, text: String, kind: NoticeKind) {
        eprintln!("unitune: {text}");
        self.notice = Some(Notice { text, kind });
    }

    // ---- model ----

    fn load_model(&mut self, model: String, allow_download: bool) {
        if let Some(old) = self.runner.take() {
            old.stop_in_background();
        }
        self.tuned_for = None;
        let request = LoadRequest {
            model: model.clone(),
            device: self.options.device,
            precision: self.settings.precision.parse().unwrap_or_default(),
            allow_download,
            hub: self.options.hub.clone(),
            snapshot_cache: self.options.snapshot_cache.clone(),
        };
        let repaint = self.ctx.clone();
        match ModelLoader::start(request, Arc::new(move || repaint.request_repaint())) {
            Ok(loader) => {
                self.loader = Some(loader);
                self.model = ModelStatus::Loading {
                    model,
                    detail: "looking for the model files".into(),
                };
            }
            Err(err) => {
                self.model = ModelStatus::Failed {
                    model,
                    message: format!("cannot start loading the model: {err}"),
                };
            }
        }
    }

    fn model_name(&self) -> String {
        match &self.model {
            ModelStatus::Loading { model, .. }
            | ModelStatus::Downloading { model, .. }
            | ModelStatus::Missing { model, .. }
            | ModelStatus::Failed { model, .. } => model.clone(),
            ModelStatus::Ready { name, .. } => name.clone(),
        }
    }

    fn poll_loader(&mut self) {
        let Some(loader) = &self.loader else { return };
        let mut events = Vec::new();
        while let Some(event) = loader.try_next() {
            events.push(event);
        }
        let model = self.model_name();
        for event in events {
            match event {
                LoadEvent::Downloading(status) => {
                    self.model = ModelStatus::Downloading {
                        model: model.clone(),
                        status,
                    }
                }
                LoadEvent::Loading { source } => {
                    self.model = ModelStatus::Loading {
                        model: model.clone(),
                        detail: format!("reading the weights ({source})"),
                    }
                }
                LoadEvent::Ready(loaded) => {
                    self.loader = None;
                    self.settings.model = Some(model.clone());
                    self.model = ModelStatus::Ready {
                        name: loaded.name.clone(),
                        source: loaded.source.clone(),
                        device: loaded.device.clone(),
                        prediction_type: loaded.prediction_type,
                        precision: loaded.precision,
                    };
                    self.runner = Some(loaded.runner);
                    return;
                }
                LoadEvent::NotOnMachine { message } => {
                    self.loader = None;
                    self.model = ModelStatus::Missing {
                        model: model.clone(),
                        message,
                    };
                    return;
                }
                LoadEvent::Failed { message } => {
                    self.loader = None;
                    self.model = ModelStatus::Failed {
                        model: model.clone(),
                        message,
                    };
                    return;
                }
                LoadEvent::Cancelled => {
                    self.loader = None;
                    self.model = ModelStatus::Missing {
                        model: model.clone(),
                        message:
                            "download cancelled; what was downloaded is kept and resumes next time"
                                .into(),
                    };
                    return;
                }
            }
        }
    }

    // ---- jobs ----

    fn poll_jobs(&mut self) {
        let Some(runner) = &self.runner else { return };
        let events = runner.drain(EVENT_BUDGET);
        for event in events {
            self.on_job_event(event);
        }
    }

    fn tune_job(&self) -> Option<JobId> {
        match self.tune {
            TuneStatus::Running { job, .. } => Some(job),
            _ => None,
        }
    }

    fn on_job_event(&mut self, event: JobEvent) {
        let is_tune = Some(event.id()) == self.tune_job();
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
                    ..
                } = &mut self.tune
                    && *job == id
                {
                    (*s, *t, *l) = (step, total, loss);
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
                if is_tune {
                    match &mut self.tune_preview {
                        Some(tex) => {
                            tex.set(textures::color_image(&image, 512), Default::default())
                        }
                        None => {
                            self.tune_preview =
                                Some(textures::thumbnail(&self.ctx, "tune-preview", &image, 512))
                        }
                    }
                } else if self.variants.find(id).is_some() {
                    let tex = textures::thumbnail(&self.ctx, "live-preview", &image, 1024);
                    self.live_preview = Some((id, tex));
                }
            }
            // A cancelled tune's kept snapshots are not offered yet: the editor retunes.
            JobEvent::SnapshotKept { .. } => {}
            JobEvent::Tuned {
                snapshot_steps,
                from_cache,
                ..
            } => {
                self.tune = TuneStatus::Done {
                    snapshots: snapshot_steps,
                    from_cache,
                };
            }
            JobEvent::Finished {
                id,
                result,
                working_size,
            } => {
                // The variant stays pending (its live preview showing) until its display
                // copy is ready: see `show_variant`.
                if self.variants.find(id).is_some() {
                    self.chores
                        .prepare_variant(id, result, working_size, THUMBNAIL_SIDE);
                }
            }
            JobEvent::Failed { id, message } => {
                if is_tune {
                    self.tune = TuneStatus::None;
                    self.tuned_for = None;
                    self.tune_preview = None;
                    // The edits queued behind it cannot use its snapshots.
                    self.cancel_variants();
                    self.error(format!("Fine-tuning failed: {message}"));
                } else if self.variants.find(id).is_some() {
                    self.variants
                        .update(id, VariantState::Failed(message.clone()));
                    self.error(format!("The edit failed: {message}"));
                }
            }
            JobEvent::Cancelled { id } => {
                if is_tune {
                    self.tune = TuneStatus::None;
                    self.tuned_for = None;
                }
                self.variants.update(id, VariantState::Cancelled);
                if self.live_preview.as_ref().is_some_and(|(j, _)| *j == id) {
                    self.live_preview = None;
                }
            }
        }
    }

    fn show_variant(&mut self, prepared: PreparedVariant) {
        let id = prepared.job;
        // A new edit or photo since it finished dropped it.
        let Some(variant) = self.variants.find(id) else {
            return;
        };
        let s = &variant.settings;
        eprintln!(
            "unitune: variant ready: {} fine-tuning steps, t0 {:.2}, guidance {:.1}, seed {}",
            s.tune_steps, s.t0, s.guidance, s.seed
        );
        let name = format!("variant-{id}");
        self.thumbnails.insert(
            id,
            textures::upload(&self.ctx, &format!("{name}-thumbnail"), prepared.thumbnail),
        );
        self.full_textures
            .insert(id, textures::upload(&self.ctx, &name, prepared.display));
        if self.live_preview.as_ref().is_some_and(|(j, _)| *j == id) {
            self.live_preview = None;
        }
        self.variants.update(
            id,
            VariantState::Done {
                image: prepared.image,
                working_size: prepared.working_size,
            },
        );
    }

    fn cancel_variants(&mut self) {
        if let Some(runner) = &self.runner {
            for job in self.variants.pending_jobs() {
                runner.cancel(job);
            }
        }
    }

    /// The fine-tuning recipe for the next tune.
    fn tune_settings(&self) -> Result<TuneSettings, String> {
        let mut settings = self.options.tune.clone().unwrap_or_default();
        settings.mode = self
            .settings
            .train_mode
            .parse::<TrainMode>()
            .map_err(|e| format!("training mode: {e}"))?;
        settings.snapshot_steps = parse_ladder(&self.advanced.snapshot_text)?;
        if let Ok(micro) = self.settings.micro_batch.parse::<usize>() {
            settings.micro_batch_size = micro;
            settings.auto_micro_batch = false;
        }
        settings.validate().map_err(|e| e.to_string())?;
        Ok(settings)
    }

    fn start_edit(&mut self) {
        let prompt = self.prompt.trim().to_string();
        let Some(doc) = &self.doc else {
            return self.error("Open a photo first (File > Open, or drop one on the window).");
        };
        if prompt.is_empty() {
            return self
                .error("Type what the photo should become, e.g. \"a cat wearing sunglasses\".");
        }
        if self.runner.is_none() {
            return self.error("The model is not ready yet; see the Model section.");
        }
        let tune = match self.tune_settings() {
            Ok(tune) => tune,
            Err(message) => return self.error(message),
        };
        self.settings.snapshot_steps = tune.snapshot_steps.clone();
        let seed = match self.advanced.seed_text.trim() {
            "" => rand::random::<u32>() as u64,
            text => match text.parse::<u64>() {
                Ok(seed) => seed,
                Err(_) => {
                    return self.error(format!("The seed must be a whole number, not \"{text}\"."));
                }
            },
        };
        let version = doc.version;
        let mask = self.doc.as_mut().expect("checked above").mask.painted();
        self.cancel_variants();
        self.variants = VariantSet::default();
        self.thumbnails.clear();
        self.full_textures.clear();
        self.live_preview = None;
        self.notice = None;
        self.edit = Some(EditContext {
            prompt,
            baseline_prompt: self.baseline_prompt.trim().to_string(),
            photo_version: version,
            mask,
            tune: tune.clone(),
            seed,
            sampling_steps: self.settings.sampling_steps.max(1),
            interpolate: self.settings.interpolate,
        });
        // Later edits of the same photo reuse its snapshots.
        if self.tuned_for.as_ref() != Some(&(version, tune.clone())) {
            let photo = self.doc.as_ref().expect("checked above").photo.clone();
            let request = JobRequest::Tune {
                photo,
                settings: tune.clone(),
                size: None,
            };
            if let Some(old) = self.tune_job()
                && let Some(runner) = &self.runner
            {
                runner.cancel(old);
            }
            match self.submit(request) {
                Some(job) => {
                    self.tune = TuneStatus::Running {
                        job,
                        step: 0,
                        total: tune.total_steps(),
                        loss: None,
                        started: Instant::now(),
                    };
                    self.tune_preview = None;
                    self.tuned_for = Some((version, tune.clone()));
                }
                None => return,
            }
        }
        if self.advanced.custom {
            let settings = VariantSettings {
                fidelity: None,
                tune_steps: self.advanced.tune_steps,
                t0: self.advanced.t0,
                guidance: self.advanced.guidance,
                seed,
            };
            self.queue_variant(settings, false);
        } else {
            let mut positions = vec![self.fidelity];
            positions.extend(
                FIRST_POSITIONS
                    .iter()
                    .copied()
                    .filter(|p| (p - self.fidelity).abs() > 0.1),
            );
            positions.truncate(FIRST_POSITIONS.len());
            for position in positions {
                let settings = self.settings_at(position, seed, &tune);
                self.queue_variant(settings, false);
            }
        }
        self.variants.follow_slider();
    }

    fn settings_at(&self, position: f64, seed: u64, tune: &TuneSettings) -> VariantSettings {
        let p = parameters_for(position, &tune.snapshot_steps);
        VariantSettings {
            fidelity: Some(position),
            tune_steps: p.tune_steps,
            t0: p.t0,
            guidance: p.guidance,
            seed,
        }
    }

    /// Submits one variant of the current edit.
    fn queue_variant(&mut self, settings: VariantSettings, from_slider: bool) {
        let Some(edit) = &self.edit else { return };
        let Some(doc) = &self.doc else { return };
        if doc.version != edit.photo_version {
            return self.error("The photo changed since this edit; press Edit again.");
        }
        let request = JobRequest::Edit {
            photo: doc.photo.clone(),
            mask: edit.mask.clone(),
            prompt: edit.prompt.clone(),
            baseline_prompt: (!edit.baseline_prompt.is_empty())
                .then(|| edit.baseline_prompt.clone()),
            tune_steps: settings.tune_steps,
            t0_fraction: settings.t0,
            guidance_weight: settings.guidance,
            sampling_steps: edit.sampling_steps,
            seed: settings.seed,
            interpolate: edit.interpolate,
            size: None,
        };
        let Some(job) = self.submit(request) else {
            return;
        };
        if from_slider {
            if let Some(older) = self.variants.push_slider_request(job, settings)
                && let Some(runner) = &self.runner
            {
                runner.cancel(older);
            }
        } else {
            self.variants.push(job, settings);
        }
    }

    fn submit(&mut self, request: JobRequest) -> Option<JobId> {
        let runner = self.runner.as_mut()?;
        match runner.submit(request) {
            Ok(id) => Some(id),
            Err(err) => {
                self.error(format!("Cannot start the job: {err}."));
                None
            }
        }
    }

    fn cancel_all(&mut self) {
        let Some(runner) = &self.runner else { return };
        if let Some(job) = self.tune_job() {
            runner.cancel(job);
        }
        for job in self.variants.pending_jobs() {
            runner.cancel(job);
        }
    }

    // ---- photo ----

    fn set_photo(
        &mut self,
        source: Option<PathBuf>,
        photo: RgbImage,
        display: egui::ColorImage,
        alpha: Option<GrayImage>,
        mask: Option<GrayImage>,
    ) {
        self.cancel_all();
        let (w, h) = photo.dimensions();
        let (mw, mh) = textures::capped_size(w, h, MASK_MAX_SIDE);
        let mask = match mask {
            Some(m) if m.dimensions() == (mw, mh) => MaskLayer::from_image(m),
            Some(m) => MaskLayer::from_image(crate::imaging::resize_gray(&m, mw, mh)),
            None => MaskLayer::new(mw, mh),
        };
        self.photo_texture = Some(textures::upload(&self.ctx, "photo", display));
        self.mask_texture = None;
        let version = self.next_version;
        self.next_version += 1;
        self.doc = Some(Document {
            version,
            source,
            photo: Arc::new(photo),
            alpha: alpha.map(Arc::new),
            mask,
        });
        self.variants = VariantSet::default();
        self.thumbnails.clear();
        self.full_textures.clear();
        self.live_preview = None;
        self.tune_preview = None;
        self.tune = TuneStatus::None;
        self.edit = None;
        self.view = View {
            tool: self.view.tool,
            ..View::default()
        };
        self.focus_prompt = true;
        self.save_session_now();
    }

    fn on_chore(&mut self, result: ChoreResult) {
        match result {
            ChoreResult::PhotoOpened { path, result } => {
                self.opening = false;
                match result {
                    Ok(OpenedPhoto { photo, display }) => {
                        self.settings.remember_file(&path);
                        self.set_photo(Some(path.clone()), photo.rgb, display, photo.alpha, None);
                        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                        self.info(format!("Opened {}.", name.unwrap_or_default()));
                    }
                    // The current work stays as it was.
                    Err(message) => self.error(format!("Could not open that file: {message}")),
                }
            }
            ChoreResult::SessionRestored(restored) => {
                self.opening = false;
                if let Some((restored, display)) = restored
                    && self.doc.is_none()
                {
                    self.prompt = restored.text.prompt.clone();
                    self.baseline_prompt = restored.text.baseline_prompt.clone();
                    self.fidelity = restored.text.fidelity.clamp(0.0, 1.0);
                    self.set_photo(
                        restored.text.source.clone(),
                        restored.photo,
                        display,
                        None,
                        restored.mask,
                    );
                    self.info("Restored your last photo, mask and prompt.");
                }
            }
            ChoreResult::PhotoChosen(Some(path)) => self.apply(Command::Open(path)),
            ChoreResult::PhotoChosen(None) | ChoreResult::ModelFolderChosen(None) => {}
            ChoreResult::ModelFolderChosen(Some(path)) => {
                self.load_model(path.display().to_string(), false)
            }
            ChoreResult::Exported {
                path,
                result,
                request,
            } => {
                self.exporting = false;
                match result {
                    Ok(()) => {
                        self.failed_export = None;
                        self.info(format!("Exported to {}.", path.display()));
                        self.last_export = Some(path);
                    }
                    Err(message) => {
                        self.error(format!(
                            "Export failed: {message}. The result is still here; free some space or choose another folder, then try again."
                        ));
                        self.failed_export = Some((path, request));
                    }
                }
            }
            ChoreResult::ExportAbandoned => self.exporting = false,
            ChoreResult::VariantPrepared(prepared) => self.show_variant(prepared),
            ChoreResult::Failed { chore, message } => {
                let what = match chore {
                    Chore::Open | Chore::Restore => {
                        self.opening = false;
                        "opening the photo"
                    }
                    Chore::Export => {
                        self.exporting = false;
                        "exporting"
                    }
                    Chore::Dialog => "in the file dialog",
                    Chore::Display(job) => {
                        self.variants
                            .update(job, VariantState::Failed(message.clone()));
                        "showing the result"
                    }
                };
                self.error(format!(
                    "Something went wrong {what} ({message}); your work is unchanged."
                ));
            }
        }
    }

    fn export_request(&self) -> Result<ExportRequest, String> {
        let (_, variant) = self
            .variants
            .shown(self.fidelity)
            .ok_or("Nothing to export yet: run an edit and wait for a result.")?;
        let VariantState::Done {
            image,
            working_size,
        } = &variant.state
        else {
            return Err("That variant is not finished yet.".into());
        };
        let edit = self.edit.as_ref().ok_or("Nothing to export yet.")?;
        let doc = self.doc.as_ref().ok_or("Nothing to export yet.")?;
        let (model, prediction_type, precision) = match &self.model {
            ModelStatus::Ready {
                name,
                prediction_type,
                precision,
                ..
            } => (name.clone(), *prediction_type, *precision),
            _ => return Err("The model is not loaded; load it to export with its recipe.".into()),
        };
        let settings = &variant.settings;
        let token = (settings.tune_steps > 0).then_some(edit.tune.token.as_str());
        let recipe = Recipe {
            model_prompt: crate::jobs::model_prompt(token, &edit.prompt),
            baseline_prompt: edit.baseline_prompt.clone(),
            seed: settings.seed,
            sampling_steps: edit.sampling_steps,
            guidance_weight: settings.guidance,
            t0: Some(settings.t0),
            fidelity: settings.fidelity,
            tune_steps: settings.tune_steps,
            tuning: (settings.tune_steps > 0).then(|| TuneRecipe::from_settings(&edit.tune)),
            mask: edit
                .mask
                .as_ref()
                .map(|_| "painted in the editor".to_string()),
            interpolate: edit.interpolate,
            width: image.width(),
            height: image.height(),
            working_width: working_size.0,
            working_height: working_size.1,
            source_image: doc.source.as_ref().map(|p| p.display().to_string()),
            ..Recipe::new("edit", &edit.prompt, &model, prediction_type, precision)
        };
        let stem = doc
            .source
            .as_ref()
            .and_then(|p| p.file_stem())
            .map_or("photo".to_string(), |s| s.to_string_lossy().into_owned());
        Ok(ExportRequest {
            image: image.clone(),
            alpha: doc.alpha.clone(),
            text: recipe.text_chunks(),
            suggested_name: format!("{stem}-{}.png", slug(&edit.prompt)),
            directory: doc
                .source
                .as_ref()
                .and_then(|p| p.parent().map(PathBuf::from)),
        })
    }

    // ---- commands ----

    pub fn apply(&mut self, command: Command) {
        match command {
            Command::OpenDialog => {
                let dir = self
                    .settings
                    .recent_files
                    .first()
                    .and_then(|p| p.parent().map(PathBuf::from));
                self.chores.pick_photo(dir);
            }
            Command::Open(path) => {
                self.opening = true;
                self.chores.open_photo(path);
            }
            Command::Edit => self.start_edit(),
            Command::Cancel => {
                self.cancel_all();
                if self.loader.is_some() {
                    self.apply(Command::CancelDownload);
                }
            }
            Command::MoreSeeds => {
                let Some(edit) = &self.edit else {
                    return self.error("Run an edit first; more seeds add variants to it.");
                };
                let tune = edit.tune.clone();
                for _ in 0..2 {
                    let seed = rand::random::<u32>() as u64;
                    let settings = if self.advanced.custom {
                        VariantSettings {
                            fidelity: None,
                            tune_steps: self.advanced.tune_steps,
                            t0: self.advanced.t0,
                            guidance: self.advanced.guidance,
                            seed,
                        }
                    } else {
                        self.settings_at(self.fidelity, seed, &tune)
                    };
                    self.queue_variant(settings, false);
                }
            }
            Command::SliderDragged => self.variants.follow_slider(),
            Command::MaskChanged => self.save_session_now(),
            Command::SliderReleased => {
                self.variants.follow_slider();
                if let Some(edit) = &self.edit
                    && !self.advanced.custom
                    && self.variants.needs_job_at(self.fidelity)
                {
                    let settings = self.settings_at(self.fidelity, edit.seed, &edit.tune.clone());
                    self.queue_variant(settings, true);
                }
            }
            Command::SelectVariant(index) => {
                self.variants.select(index);
                if let Some(f) = self
                    .variants
                    .variants()
                    .get(index)
                    .and_then(|v| v.settings.fidelity)
                {
                    self.fidelity = f;
                }
            }
            Command::Export => match self.export_request() {
                Ok(request) => {
                    self.exporting = true;
                    self.chores.export(request);
                }
                Err(message) => self.error(message),
            },
            Command::RetryExport => {
                if let Some((path, request)) = self.failed_export.take() {
                    self.exporting = true;
                    self.chores.export_again(path, request);
                }
            }
            Command::Undo | Command::Redo | Command::ClearMask | Command::InvertMask => {
                if let Some(doc) = &mut self.doc {
                    match command {
                        Command::Undo => doc.mask.undo(),
                        Command::Redo => doc.mask.redo(),
                        Command::ClearMask => {
                            doc.mask.clear();
                            true
                        }
                        _ => {
                            doc.mask.invert();
                            true
                        }
                    };
                    self.save_session_now();
                }
            }
            Command::DownloadModel => {
                let model = self.model_name();
                self.load_model(model, true);
            }
            Command::CancelDownload => {
                if let Some(loader) = &self.loader {
                    loader.cancel();
                }
            }
            Command::ChooseModelFolder => self.chores.pick_model_folder(),
            Command::RetryModel => {
                let model = self.model_name();
                self.load_model(model, false);
            }
            Command::DismissNotice => self.notice = None,
            Command::ResetView => {
                self.view.zoom = 1.0;
                self.view.pan = egui::Vec2::ZERO;
            }
        }
    }

    // ---- autosave ----

    fn session_text(&self) -> SessionText {
        SessionText {
            source: self.doc.as_ref().and_then(|d| d.source.clone()),
            prompt: self.prompt.clone(),
            baseline_prompt: self.baseline_prompt.clone(),
            fidelity: self.fidelity,
        }
    }

    /// Hands the photo, mask and prompt to the autosave thread.
    fn save_session_now(&mut self) {
        let text = self.session_text();
        let Some(doc) = &mut self.doc else { return };
        let snapshot = SessionSnapshot {
            text: text.clone(),
            photo: Some((doc.version, doc.photo.clone())),
            mask: doc.mask.painted(),
        };
        if let Some(saver) = &self.autosaver {
            saver.save_session(snapshot);
        }
        self.saved_text = Some(text);
    }

    /// Saves what changed since the last frame (typing, settings).
    fn autosave(&mut self) {
        if self.doc.is_some() && self.saved_text.as_ref() != Some(&self.session_text()) {
            self.save_session_now();
        }
        if self.settings != self.saved_settings {
            if let Some(saver) = &self.autosaver {
                saver.save_settings(&self.settings);
            }
            self.saved_settings = self.settings.clone();
        }
        let failures = self
            .autosaver
            .as_ref()
            .map(|s| s.failures())
            .unwrap_or_default();
        if let Some(message) = failures.into_iter().last() {
            self.error(message);
        }
    }

    // ---- frame ----

    fn handle_shortcuts(&mut self, ctx: &Context) -> Vec<Command> {
        let mut commands = Vec::new();
        let shortcut = |m: Modifiers, k: Key| KeyboardShortcut::new(m, k);
        ctx.input_mut(|i| {
            if i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::O)) {
                commands.push(Command::OpenDialog);
            }
            if i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::S)) {
                commands.push(Command::Export);
            }
            if i.consume_shortcut(&shortcut(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z))
                || i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::Y))
            {
                commands.push(Command::Redo);
            }
            if i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::Z)) {
                commands.push(Command::Undo);
            }
            if i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::Enter)) {
                commands.push(Command::Edit);
            }
            if i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::Num0)) {
                commands.push(Command::ResetView);
            }
            if i.consume_key(Modifiers::NONE, Key::Escape) {
                commands.push(Command::Cancel);
            }
        });
        // Single keys only while no text field has the keyboard.
        if !ctx.egui_wants_keyboard_input() {
            ctx.input(|i| {
                if i.key_pressed(Key::B) {
                    self.view.tool = Tool::Brush;
                }
                if i.key_pressed(Key::E) {
                    self.view.tool = Tool::Eraser;
                }
                if i.key_pressed(Key::V) {
                    self.view.tool = Tool::Move;
                }
                if i.key_pressed(Key::OpenBracket) {
                    self.settings.brush_size_px = (self.settings.brush_size_px / 1.25).max(2.0);
                }
                if i.key_pressed(Key::CloseBracket) {
                    self.settings.brush_size_px = (self.settings.brush_size_px * 1.25).min(1024.0);
                }
            });
        }
        commands
    }

    /// Whether the compare key (Space, held while not typing) shows the original.
    pub(super) fn comparing(&self, ctx: &Context) -> bool {
        !ctx.egui_wants_keyboard_input() && ctx.input(|i| i.key_down(Key::Space))
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
        self.poll_loader();
        self.poll_jobs();
        while let Some(result) = self.chores.try_next() {
            self.on_chore(result);
        }
        let mut commands = self.handle_shortcuts(ctx);
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        if let Some(path) = dropped.into_iter().next() {
            commands.push(Command::Open(path));
        }
        if let Some(doc) = &mut self.doc
            && let Some(dirty) = doc.mask.take_dirty()
        {
            textures::update_mask(ctx, &mut self.mask_texture, doc.mask.image(), Some(dirty));
        }
        commands
    }

    pub(super) fn shown_texture(&self) -> Option<&TextureHandle> {
        if let Some((_, variant)) = self.variants.shown(self.fidelity) {
            return self.full_textures.get(&variant.job);
        }
        self.live_preview.as_ref().map(|(_, t)| t)
    }

    pub(super) fn tune_eta(&self) -> Option<Duration> {
        match &self.tune {
            TuneStatus::Running {
                step,
                total,
                started,
                ..
            } if *step > 0 => Some(
                started
                    .elapsed()
                    .mul_f64((total.saturating_sub(*step)) as f64 / *step as f64),
            ),
            _ => None,
        }
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
        if let Some(saver) = self.autosaver.take() {
            saver.flush();
        }
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

/// A short file-name-safe version of a prompt.
fn slug(prompt: &str) -> String {
    let words: Vec<String> = prompt
        .split_whitespace()
        .take(6)
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric())
                .collect::<String>()
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        "edit".into()
    } else {
        words.join("-")
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

    #[test]
    fn slugs_are_safe_file_names() {
        assert_eq!(
            slug("A cat, wearing sunglasses!"),
            "a-cat-wearing-sunglasses"
        );
        assert_eq!(slug("  ../.. "), "edit");
    }
}
