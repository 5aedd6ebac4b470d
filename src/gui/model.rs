//! The model: loading it (and downloading, after the user agrees), and the job runner it
//! ends in.

use std::sync::Arc;

use super::app::EditorApp;
use super::commands::Command;

use crate::jobs::{
    DEMO_MODEL, DownloadStatus, FidelityTable, JobRunner, LoadEvent, LoadRequest, ModelLoader,
    ModelRequest, ModelSummary, PreviewMode, STABLE_DIFFUSION, demo_model_dir,
};
use crate::world;

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
        /// As `--model` takes it (to load it again).
        model: String,
        /// What was loaded: its public name and hash, device, precision, kind.
        summary: Box<ModelSummary>,
        /// The global flags in effect (`--precision f16`, `--vae ...`), for the panel.
        flags: Vec<String>,
    },
}

/// The model's status, the loader while it loads, and the runner once it has.
pub struct ModelState {
    pub status: ModelStatus,
    pub loader: Option<ModelLoader>,
    pub runner: Option<JobRunner>,
    /// Why the tiny VAE preview could not be had, until shown.
    pub preview_notice: Option<String>,
    /// Whether the demo model's folder is on this machine (looked up once, at start: the
    /// model panel offers it only then).
    pub demo_available: bool,
}

impl ModelState {
    pub fn new() -> Self {
        Self {
            status: ModelStatus::Loading {
                model: String::new(),
                detail: String::new(),
            },
            loader: None,
            runner: None,
            demo_available: demo_model_dir().is_ok(),
            preview_notice: None,
        }
    }

    /// The model asked for (or loaded).
    pub fn name(&self) -> String {
        match &self.status {
            ModelStatus::Loading { model, .. }
            | ModelStatus::Downloading { model, .. }
            | ModelStatus::Missing { model, .. }
            | ModelStatus::Failed { model, .. }
            | ModelStatus::Ready { model, .. } => model.clone(),
        }
    }

    /// Whether the loaded model edits by instruction (InstructPix2Pix).
    pub fn is_instruct(&self) -> bool {
        self.summary().is_some_and(|s| s.instruct)
    }

    /// Whether the demo model (`--model demo`) is loaded.
    pub fn is_demo(&self) -> bool {
        matches!(&self.status, ModelStatus::Ready { model, .. } if model == DEMO_MODEL)
    }

    /// What the loaded model is, once it is ready.
    pub fn summary(&self) -> Option<&ModelSummary> {
        match &self.status {
            ModelStatus::Ready { summary, .. } => Some(summary),
            _ => None,
        }
    }

    /// The loaded model's fidelity table (Stable Diffusion's while none is loaded).
    pub fn fidelity_table(&self) -> &'static FidelityTable {
        self.summary()
            .map_or(&STABLE_DIFFUSION, |s| s.fidelity_table)
    }

    pub fn cancel_download(&self) {
        if let Some(loader) = &self.loader {
            loader.cancel();
        }
    }

    /// Reads the loader's events; returns the model's name once it is ready (to remember).
    fn poll(&mut self, flags: &[String]) -> Option<String> {
        let loader = self.loader.as_ref()?;
        let events: Vec<LoadEvent> = std::iter::from_fn(|| loader.try_next()).collect();
        let model = self.name();
        for event in events {
            let ended = |state: &mut Self, status| {
                state.loader = None;
                state.status = status;
            };
            match event {
                LoadEvent::Downloading(status) => {
                    self.status = ModelStatus::Downloading {
                        model: model.clone(),
                        status,
                    }
                }
                LoadEvent::Loading { source } => {
                    self.status = ModelStatus::Loading {
                        model: model.clone(),
                        detail: format!("reading the weights ({source})"),
                    }
                }
                LoadEvent::Ready(ready) => {
                    let status = ModelStatus::Ready {
                        model: model.clone(),
                        summary: Box::new(ready.summary),
                        flags: flags.to_vec(),
                    };
                    ended(self, status);
                    self.preview_notice = ready.preview_notice;
                    self.runner = Some(ready.runner);
                    return Some(model);
                }
                LoadEvent::NotOnMachine { message } => {
                    ended(self, ModelStatus::Missing { model, message });
                    return None;
                }
                LoadEvent::Failed { message } => {
                    ended(self, ModelStatus::Failed { model, message });
                    return None;
                }
                LoadEvent::Cancelled => {
                    let message =
                        "download cancelled; what was downloaded is kept and resumes next time"
                            .into();
                    ended(self, ModelStatus::Missing { model, message });
                    return None;
                }
            }
        }
        None
    }
}

impl EditorApp {
    pub(super) fn load_model(&mut self, model: String, allow_download: bool) {
        if let Some(old) = self.model.runner.take() {
            old.stop_in_background();
        }
        // The new runner has none of the old one's snapshots.
        self.session.tuned_for = None;
        let request = LoadRequest {
            model: self.model_request(&model),
            allow_download,
            snapshot_cache: self.options.snapshot_cache.clone(),
            preview: self.settings.preview,
        };
        let repaint = self.ctx.clone();
        match ModelLoader::start(request, Arc::new(move || repaint.request_repaint())) {
            Ok(loader) => {
                self.model.loader = Some(loader);
                self.model.status = ModelStatus::Loading {
                    model,
                    detail: "looking for the model files".into(),
                };
            }
            Err(err) => {
                self.model.status = ModelStatus::Failed {
                    model,
                    message: format!("cannot start loading the model: {err}"),
                };
            }
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

    pub(super) fn poll_loader(&mut self) {
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
}
