//! The edit service's error: whatever went wrong below it, in one sentence, and whether the
//! user's input or the machine is at fault.

use crate::engine::EngineError;
use crate::imaging::ImagingError;
use crate::model_files::ModelFilesError;

/// Boxed: the layers' errors carry paths and reasons, and results travel by value.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Engine(Box<EngineError>),
    #[error(transparent)]
    ModelFiles(Box<ModelFilesError>),
    #[error(transparent)]
    Imaging(Box<ImagingError>),
    /// Something asked of the service that cannot be done as asked: one sentence saying what
    /// to do instead.
    #[error("{0}")]
    Invalid(String),
}

impl From<EngineError> for ServiceError {
    fn from(error: EngineError) -> Self {
        Self::Engine(Box::new(error))
    }
}

impl From<ModelFilesError> for ServiceError {
    fn from(error: ModelFilesError) -> Self {
        Self::ModelFiles(Box::new(error))
    }
}

impl From<ImagingError> for ServiceError {
    fn from(error: ImagingError) -> Self {
        Self::Imaging(Box::new(error))
    }
}

impl ServiceError {
    /// True when the user's input (files, flags, settings) is at fault, not the machine.
    pub fn is_invalid_input(&self) -> bool {
        match self {
            ServiceError::Engine(e) => e.is_invalid_input(),
            ServiceError::ModelFiles(e) => e.is_invalid_input(),
            ServiceError::Imaging(e) => e.is_invalid_input(),
            ServiceError::Invalid(_) => true,
        }
    }

    /// True when the caller's observer stopped the work.
    pub fn is_cancelled(&self) -> bool {
        match self {
            ServiceError::Engine(e) => matches!(**e, EngineError::Cancelled),
            ServiceError::ModelFiles(e) => matches!(**e, ModelFilesError::Cancelled),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, ServiceError>;
