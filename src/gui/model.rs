//! The model: loading it (and downloading, after the user agrees), and the job runner it
//! ends in.

use std::sync::Arc;

use super::app::EditorApp;
use crate::jobs::{DownloadStatus, JobRunner, LoadEvent, LoadRequest, ModelLoader};

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
        /// Family, variant and prediction type, in one line.
        description: String,
    },
}

/// The model's status, the loader while it loads, and the runner once it has.
pub struct ModelState {
    pub status: ModelStatus,
    pub loader: Option<ModelLoader>,
    pub runner: Option<JobRunner>,
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
        }
    }

    /// The model asked for (or loaded).
    pub fn name(&self) -> String {
        match &self.status {
            ModelStatus::Loading { model, .. }
            | ModelStatus::Downloading { model, .. }
            | ModelStatus::Missing { model, .. }
            | ModelStatus::Failed { model, .. } => model.clone(),
            ModelStatus::Ready { name, .. } => name.clone(),
        }
    }

    pub fn cancel_download(&self) {
        if let Some(loader) = &self.loader {
            loader.cancel();
        }
    }

    /// Reads the loader's events; returns the model's name once it is ready (to remember).
    fn poll(&mut self) -> Option<String> {
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
                LoadEvent::Ready(loaded) => {
                    let status = ModelStatus::Ready {
                        name: loaded.name.clone(),
                        source: loaded.source.clone(),
                        device: loaded.device.clone(),
                        prediction_type: loaded.prediction_type,
                        precision: loaded.precision,
                        description: loaded.description.clone(),
                    };
                    ended(self, status);
                    self.runner = Some(loaded.runner);
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

    pub(super) fn poll_loader(&mut self) {
        if let Some(model) = self.model.poll() {
            self.settings.model = Some(model);
        }
    }
}
