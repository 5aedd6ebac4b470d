//! unitune: edit a photo by typing what it should become.
//!
//! Layers, each importing only from those below it (`tests/layering.rs` checks every path):
//! - [`gui`]: the desktop editor (eframe/egui); the only module that knows egui. Its heavy
//!   work runs on the [`jobs`] worker thread and on its own named threads for files,
//!   dialogs and autosave.
//! - [`cli`]: the command line. With a command it calls the [`service`] directly on the
//!   calling thread (no worker threads; Ctrl-C sets a flag the engine checks between steps);
//!   without one it starts the editor ([`gui::run`]) with the same global flags.
//! - [`jobs`]: the edit service on a named worker thread, for the GUI: requests in over a
//!   bounded channel; results on a bounded queue, progress and previews latest-wins; plain
//!   types.
//! - [`service`]: the one way to make an edit: loading a model with every global flag, its
//!   public name and hash, the fidelity plan, seed, working size, fine-tuning choice, recipe
//!   and LoRA export. The CLI's commands and the jobs worker only map their input onto it.
//! - [`recipe`]: what an exported image says about how it was made, written and read back.
//! - [`engine`]: candle only: the models, the noise schedule, fine-tuning, sampling, edits.
//! - [`model_files`]: where a model's files come from (local folder, Hugging Face cache, download).
//! - [`imaging`]: decoding with limits, fitting to the model's resolution, atomic export.
//! - [`world`]: the demo world the demo model is trained on, and the scorer of its edits.

pub mod build_info;
pub mod cli;
pub mod engine;
pub mod gui;
pub mod imaging;
pub mod jobs;
pub mod model_files;
pub mod recipe;
pub mod service;
pub mod world;
