//! UniTune's fine-tuning on one photo: which weights train, the training loop, and snapshots
//! that can be switched without reloading the model.

mod adapter;
mod cache;
mod mode;
mod tune;

pub use adapter::{Adapter, Snapshot};
pub use cache::{CacheLookup, SnapshotCache};
pub use mode::TrainMode;
pub use tune::{
    PAPER_SNAPSHOTS, RARE_TOKEN, ReconstructingObserver, TuneObserver, TuneProgress, TuneSettings,
    fine_tune,
};
