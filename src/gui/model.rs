//! The model: loading it (and downloading, after the user agrees) on the loader's thread,
//! and the job runner it ends in.

use std::sync::Arc;

use crate::jobs::{
    DEMO_MODEL, DownloadStatus, FidelityTable, JobRunner, LoadEvent, LoadRequest, ModelLoader,
    ModelSummary, STABLE_DIFFUSION, demo_model_dir,
};

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
        /// The GPU's memory, when the model would run on one: SDXL is suggested first on a
        /// card that holds it.
        gpu_bytes: Option<u64>,
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

    /// Loads `request` on the loader's thread (`waker` repaints the UI as it goes); the
    /// model loaded before is stopped in the background, its snapshots with it.
    pub fn load(&mut self, request: LoadRequest, waker: Arc<dyn Fn() + Send + Sync>) {
        if let Some(old) = self.runner.take() {
            old.stop_in_background();
        }
        let model = request.model.model.clone();
        match ModelLoader::start(request, waker) {
            Ok(loader) => {
                self.loader = Some(loader);
                self.status = ModelStatus::Loading {
                    model,
                    detail: "looking for the model files".into(),
                };
            }
            Err(err) => {
                self.status = ModelStatus::Failed {
                    model,
                    message: format!("cannot start loading the model: {err}"),
                };
            }
        }
    }

    /// Reads the loader's events; returns the model's name once it is ready (to remember).
    /// `flags` are the global flags in effect, for the model panel.
    pub fn poll(&mut self, flags: &[String]) -> Option<String> {
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
                LoadEvent::NotOnMachine { message, gpu_bytes } => {
                    let status = ModelStatus::Missing {
                        model,
                        message,
                        gpu_bytes,
                    };
                    ended(self, status);
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
                    let status = ModelStatus::Missing {
                        model,
                        message,
                        gpu_bytes: None,
                    };
                    ended(self, status);
                    return None;
                }
            }
        }
        None
    }
}
