//! Where the demo model is: `assets/demo-model`, a diffusers folder of 33 MB shipped with
//! unitune's source (see its README for how it was trained).
//!
//! Looked up at run time rather than compiled in: every test binary would otherwise carry
//! the weights. `cargo run` and `cargo install` (which builds from the kept source) find it
//! where the crate was built; a packaged app puts `assets/` next to the executable.

use std::path::{Path, PathBuf};

use super::error::ModelFilesError;

/// The environment variable that points at the demo model's folder, first of all places.
pub const DEMO_MODEL_ENV: &str = "UNITUNE_DEMO_MODEL";

/// The demo model's folder: `$UNITUNE_DEMO_MODEL`, else `assets/demo-model` next to the
/// executable, else in the source the program was built from.
pub fn demo_model_dir() -> Result<PathBuf, ModelFilesError> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os(DEMO_MODEL_ENV) {
        candidates.push(PathBuf::from(dir));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        candidates.push(exe_dir.join("assets").join("demo-model"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-model"));
    candidates
        .iter()
        .find(|dir| dir.join("model_index.json").is_file())
        .cloned()
        .ok_or(ModelFilesError::DemoModelMissing { looked: candidates })
}
