//! unitune: edit a photo by typing what it should become.
//!
//! Layers, each pointing only downwards:
//! - [`cli`]: the command line (the GUI will sit beside it); runs jobs on its own thread.
//! - [`jobs`]: the engine on a named worker thread, with bounded channels of progress,
//!   previews and results in plain types, for the GUI.
//! - [`engine`]: candle only: the models, the noise schedule, fine-tuning, sampling, edits.
//! - [`model_files`]: where a model's files come from (local folder, Hugging Face cache, download).
//! - [`imaging`]: decoding with limits, fitting to the model's resolution, atomic export.

pub mod build_info;
pub mod cli;
pub mod engine;
pub mod imaging;
pub mod jobs;
pub mod model_files;
