//! UniTune's fine-tuning on one photo: which weights train, the training loop, and snapshots
//! that can be switched without reloading the model.

mod adapter;
mod cache;
mod loss;
mod loss_scale;
mod memory_plan;
mod mode;
mod segment_updates;
mod snapshot;
mod step;
mod tune;

pub use adapter::Adapter;
pub use cache::{CacheEntry, CacheLookup, DEFAULT_MAX_BYTES, ResumePoint, SnapshotCache};
pub use loss::denoising_loss;
pub use memory_plan::{
    choose_micro_batch, least_training_bytes, settings_that_fit, training_bytes,
};
pub use mode::{DEFAULT_LORA_RANK, TrainMode};
pub use snapshot::{IN_MEMORY_LIMIT_BYTES, Snapshot, write_safetensors};
pub use step::{TrainingBatch, training_pass};
pub use tune::time_left;
pub use tune::{
    PAPER_SNAPSHOTS, RARE_TOKEN, TrainingState, TuneObserver, TuneProgress, TuneSettings,
    fine_tune, fine_tune_from,
};
