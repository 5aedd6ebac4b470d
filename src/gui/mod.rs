//! The desktop editor: eframe/egui with the wgpu renderer. The only module that knows egui.
//!
//! - [`app::EditorApp`] owns the state and runs the frame; the panels get what they display
//!   and the form they edit ([`form`]), and return [`commands::Command`]s for every other
//!   change, which it applies in one place ([`commands`]). Every limit is in [`limits`].
//! - One type per flow, each with its logic: [`session`] (the fine-tune, variants, textures
//!   and the LoRA export: every job), [`model`] (loading), [`document`] (the open photo),
//!   [`export`], [`autosave`] (with [`persist`] on disk), [`cache_window`] (the snapshot
//!   cache).
//! - Heavy work never runs on the UI thread: the model loads and runs on [`crate::jobs`]
//!   threads, files and dialogs on [`background`] threads, autosave on [`persist`]'s thread.
//!   Each frame drains their channels for a bounded time.
//! - Memory stays bounded in a long session: full-resolution results live on disk
//!   ([`results`]), and only a few display textures stay on the GPU ([`textures`]).

mod app;
mod autosave;
mod background;
mod cache_window;
mod canvas;
mod commands;
mod document;
mod export;
mod form;
mod limits;
mod mask;
mod model;
mod panels;
mod persist;
mod results;
mod session;
mod textures;
mod variants;

use std::path::PathBuf;
use std::sync::Arc;

pub use app::EditorApp;
pub use background::{FileDialogs, SystemDialogs};
pub use commands::Command;
pub use persist::{Settings, StateFiles};

use crate::jobs::{DEFAULT_MODEL, ModelRequest, Precision, SnapshotCache, TrainingChoice};

/// How the editor starts.
pub struct EditorOptions {
    /// The model and every global flag (`--vae`, `--prediction-type`, `--device`, `--offline`,
    /// `--lora`), applied to every model the editor loads; the default model means "the last
    /// one used, else the default".
    pub model: ModelRequest,
    /// `--precision` when given: wins over the precision saved in Advanced until the user
    /// picks another there.
    pub precision_override: Option<Precision>,
    /// A photo to open at start (instead of restoring the autosaved work).
    pub photo: Option<PathBuf>,
    /// Where settings and autosaved work live.
    pub state: StateFiles,
    pub snapshot_cache: Option<SnapshotCache>,
    pub dialogs: Arc<dyn FileDialogs>,
    /// The fine-tuning recipe; `None` = the paper's, with the mode, ladder and micro-batch
    /// from the settings.
    pub tune: Option<TrainingChoice>,
}

impl EditorOptions {
    /// The options for `unitune [PHOTO]` with the global flags in `model`.
    pub fn new(model: ModelRequest, photo: Option<PathBuf>) -> Self {
        Self {
            precision_override: match model.precision {
                Precision::Auto => None,
                chosen => Some(chosen),
            },
            model,
            photo,
            state: StateFiles::new(StateFiles::default_root()),
            snapshot_cache: SnapshotCache::default_dir().map(SnapshotCache::new),
            dialogs: Arc::new(SystemDialogs),
            tune: None,
        }
    }

    /// Whether `--model` named a model (anything but the default).
    fn model_was_chosen(&self) -> bool {
        self.model.model != DEFAULT_MODEL
    }
}

/// Opens the editor window and runs until it is closed.
pub fn run(options: EditorOptions) -> anyhow::Result<()> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("unitune")
            .with_app_id("unitune")
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([720.0, 480.0])
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        ..Default::default()
    };
    eframe::run_native(
        "unitune",
        native,
        Box::new(move |cc| Ok(Box::new(EditorApp::new(cc, options)))),
    )
    .map_err(|err| {
        anyhow::anyhow!(
            "cannot open the editor window ({err}); the command-line tools (unitune edit --help) work without one"
        )
    })
}
