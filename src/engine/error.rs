//! The engine's errors: each says in one sentence what went wrong and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A `config.json` field the engine does not understand or cannot support.
    #[error("{file}: field `{field}` {problem}")]
    Config {
        file: PathBuf,
        field: String,
        problem: String,
    },

    /// A config file that is not valid JSON or lacks a required field.
    #[error(
        "{file} could not be read as a model config ({reason}); the model folder may be damaged, download it again"
    )]
    ConfigUnreadable { file: PathBuf, reason: String },

    /// Weights that are missing, truncated or do not match the config.
    #[error(
        "the {component} weights in {file} are damaged or do not match its config.json ({reason}); download the model again"
    )]
    Weights {
        component: &'static str,
        file: PathBuf,
        reason: String,
    },

    /// A single-file checkpoint or VAE file that cannot be loaded: a missing tensor, a wrong
    /// shape, a layout that is not Stable Diffusion's.
    #[error("{file} cannot be loaded: {problem}")]
    Checkpoint { file: PathBuf, problem: String },

    #[error(
        "the tokenizer files in {folder} could not be loaded ({reason}); download the model again"
    )]
    Tokenizer { folder: PathBuf, reason: String },

    /// Something the caller asked for that cannot be done, e.g. 0 sampling steps.
    #[error("{0}")]
    InvalidRequest(String),

    /// The requested device is not available in this build or on this machine.
    #[error("{0}")]
    Device(String),

    /// A LoRA file that cannot be applied to this model.
    #[error("the LoRA {} {problem}", file.display())]
    Lora { file: PathBuf, problem: String },

    /// A file the user asked for could not be written (a full disk, a read-only folder).
    #[error("{0}")]
    Write(String),

    /// The snapshot cache could not be written.
    #[error("{0}")]
    Cache(String),

    /// The step observer asked to stop.
    #[error("cancelled")]
    Cancelled,

    /// A computation's numbers stopped being numbers (NaN or infinity): one sentence on
    /// where, and what to change. Never handed on as a black image.
    #[error("{0}")]
    NotFinite(String),

    /// Reading, fitting or combining images failed.
    #[error(transparent)]
    Imaging(#[from] crate::imaging::ImagingError),

    /// The device had no memory left for the computation.
    #[error(
        "the GPU ran out of memory; use a lighter training mode (cross-kv or lora), a micro-batch of 1, half precision or a smaller working size"
    )]
    OutOfMemory,

    /// A tensor operation failed inside candle.
    #[error("the model computation failed: {0}")]
    Compute(candle_core::Error),
}

impl From<candle_core::Error> for EngineError {
    fn from(error: candle_core::Error) -> Self {
        if is_out_of_memory(&error) {
            EngineError::OutOfMemory
        } else {
            EngineError::Compute(error)
        }
    }
}

/// True for the allocation failures CUDA and Metal report (on the CPU, running out of memory
/// ends the process before any error can be returned).
fn is_out_of_memory(error: &candle_core::Error) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    [
        "out of memory",
        "out_of_memory",
        "failed to allocate",
        "outofmemory",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

impl EngineError {
    /// True when the user's input (model folder, arguments) is at fault, not the machine.
    pub fn is_invalid_input(&self) -> bool {
        if let EngineError::Imaging(e) = self {
            return e.is_invalid_input();
        }
        matches!(
            self,
            EngineError::Config { .. }
                | EngineError::ConfigUnreadable { .. }
                | EngineError::Weights { .. }
                | EngineError::Checkpoint { .. }
                | EngineError::Tokenizer { .. }
                | EngineError::Lora { .. }
                | EngineError::InvalidRequest(_)
                | EngineError::Device(_)
        )
    }

    pub(crate) fn config(file: &std::path::Path, field: &str, problem: impl Into<String>) -> Self {
        EngineError::Config {
            file: file.to_path_buf(),
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_out_of_memory_becomes_one_sentence_naming_what_to_change() {
        let cuda = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        );
        let error = EngineError::from(cuda);
        assert!(matches!(error, EngineError::OutOfMemory));
        let text = error.to_string();
        assert!(
            text.contains("micro-batch of 1") && text.contains("cross-kv"),
            "{text}"
        );
        let other = EngineError::from(candle_core::Error::Msg("shape mismatch".into()));
        assert!(matches!(other, EngineError::Compute(_)));
    }
}
