//! unitune: edit a photo by typing what it should become.
//!
//! Layers, each pointing only downwards:
//! - [`gui`]: the desktop editor (eframe/egui); the only module that knows egui. Its heavy
//!   work runs on [`jobs`] threads and its own named threads for files and dialogs.
//! - [`cli`]: the command line, beside the GUI; runs jobs on its own thread.
//! - [`jobs`]: the engine on a named worker thread, with bounded channels of progress,
//!   previews and results in plain types, for the GUI.
//! - [`engine`]: candle only: the models, the noise schedule, fine-tuning, sampling, edits.
//! - [`model_files`]: where a model's files come from (local folder, Hugging Face cache, download).
//! - [`imaging`]: decoding with limits, fitting to the model's resolution, atomic export.

pub mod build_info;
pub mod cli;
pub mod engine;
pub mod gui;
pub mod imaging;
pub mod jobs;
pub mod model_files;
pub mod recipe;
