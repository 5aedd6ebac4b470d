//! The worker layer the GUI uses: one named thread owns the model and runs jobs one at a
//! time; requests go in over a bounded channel, events come back.
//!
//! - Kept snapshots, results, errors and each job's end travel on a bounded queue: never
//!   dropped. Only a handful are sent per job, so the queue never fills while the UI keeps up
//!   at all.
//! - Progress and previews are state, not history: each travels through a one-event slot
//!   where the newest replaces an unread one (latest wins), so a slow or minimised UI never
//!   holds the worker up.
//! - Every request gets an increasing [`JobId`] and runs in order; the caller decides what a
//!   newer request supersedes and cancels it: a queued job then never starts, a running one
//!   stops within one step.
//! - After every event the worker calls the waker (the GUI passes `request_repaint`).
//!
//! The public API has no candle or GUI types: images, plain numbers and the edit service's
//! plain requests. Every job is one call of the [`EditService`] the worker owns: the worker
//! maps a [`JobRequest`] onto it and its results onto [`JobEvent`]s, and composes nothing.

mod loader;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use image::RgbImage;

pub use loader::{DownloadStatus, LoadEvent, LoadRequest, ModelLoader, ReadyModel};

pub use crate::engine::config::PredictionType;
pub use crate::engine::device::DeviceChoice;
pub use crate::engine::edit::EditMethod;
pub use crate::engine::fidelity::{FidelityTable, STABLE_DIFFUSION};
pub use crate::engine::finetune::{CacheEntry, time_left};
pub use crate::engine::finetune::{PAPER_SNAPSHOTS, SnapshotCache, TrainMode, TuneSettings};
pub use crate::engine::instruct::DEFAULT_INSTRUCT_MODEL;
pub use crate::engine::precision::Precision;
pub use crate::engine::preview::PreviewMode;
use crate::engine::preview::{Previews, TinyPreview};
pub use crate::engine::region::{DEFAULT_THRESHOLD, RegionScope};
pub use crate::model_files::{
    DEFAULT_MODEL, DEMO_MODEL, HubOptions, LoraChoice, ModelSpec, SDXL_MODEL,
    approximate_download_bytes, demo_model_dir, license_notice, parse_model_arg, suggests_sdxl,
};
pub use crate::recipe::{Recipe, RecipeSettings, RegionSetting};
pub use crate::service::plan::FIDELITY_RANGE;
pub use crate::service::{
    EditKind, EditKnobs, EditPlan, EditService, EditSpec, EstimatedRegion, MicroBatch,
    ModelRequest, ModelSummary, Region, TrainingChoice, WorkingSize, choose_seed, plan_edit,
};

/// Names one request; later requests have larger ids.
pub type JobId = u64;

/// Called by the worker after each event it sends (the GUI passes `ctx.request_repaint`).
pub type Waker = Box<dyn Fn() + Send>;

/// How many requests may wait for the worker.
const REQUEST_QUEUE: usize = 16;
/// How many events that must arrive (kept snapshots, results, errors, ends) may wait for the
/// UI before the worker waits: far more than the queued jobs can send.
const EVENT_QUEUE: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Tuning,
    Sampling,
}

/// One piece of work for the model.
#[derive(Debug, Clone)]
pub enum JobRequest {
    /// Fine-tune on `photo` (or load its snapshots from the cache); later edits of the same
    /// photo may then pick a snapshot with `tune_steps`.
    Tune {
        /// Shared, so a caller holding a large photo queues jobs without copying it.
        photo: Arc<RgbImage>,
        settings: TuneSettings,
        size: WorkingSize,
    },
    /// One edit (see [`EditSpec`]); the result comes back at the photo's size with its recipe.
    /// A snapshot other than 0 needs a `Tune` of the same photo at the same size first.
    Edit(EditSpec),
    /// Write the snapshot after `steps` steps of the last tune (in lora mode) as a
    /// kohya-format LoRA file at `path`.
    ExportLora {
        path: PathBuf,
        steps: usize,
        /// The photo's file name, for the metadata (never its folder).
        photo_name: Option<String>,
    },
}

/// What the worker reports. Every job ends with exactly one of `Finished`, `Tuned`, `Failed`
/// or `Cancelled`; no progress or preview of a job arrives after its end. Progress and
/// previews may be skipped (the newest replaces an unread one); nothing else is.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Progress {
        id: JobId,
        stage: Stage,
        /// 1-based step just finished, of `total`.
        step: usize,
        total: usize,
        /// The fine-tuning loss of this step.
        loss: Option<f32>,
    },
    /// The newest only, at latent resolution (fast) or the working size (tiny VAE): an
    /// edit's current guess of its result, or a tune's current reconstruction of the photo
    /// (every few steps).
    Preview {
        id: JobId,
        image: RgbImage,
    },
    /// A tune kept the snapshot after `steps` steps: edits may use it from now on, even if the
    /// tune is cancelled or fails later (the worker keeps a stopped tune's snapshots).
    SnapshotKept {
        id: JobId,
        steps: usize,
    },
    /// An edit's result, at the photo's size.
    Finished {
        id: JobId,
        result: RgbImage,
        /// The size the model worked at, `(width, height)`.
        working_size: (u32, u32),
        /// How it was made, for its export (boxed: events travel by value).
        recipe: Box<Recipe>,
        /// The automatic region it used (white = may change), at the photo's size.
        region: Option<Box<EstimatedRegion>>,
    },
    /// A tune finished; edits of the photo may use these snapshot step counts.
    Tuned {
        id: JobId,
        snapshot_steps: Vec<usize>,
        from_cache: bool,
    },
    /// A LoRA file was written.
    LoraExported {
        id: JobId,
        path: PathBuf,
    },
    /// One sentence the user should read while the job goes on (a lighter training mode
    /// chosen to fit the GPU).
    Notice {
        id: JobId,
        message: String,
    },
    /// One sentence for the user.
    Failed {
        id: JobId,
        message: String,
    },
    Cancelled {
        id: JobId,
    },
}

impl JobEvent {
    pub fn id(&self) -> JobId {
        match self {
            JobEvent::Progress { id, .. }
            | JobEvent::Preview { id, .. }
            | JobEvent::SnapshotKept { id, .. }
            | JobEvent::Finished { id, .. }
            | JobEvent::Tuned { id, .. }
            | JobEvent::LoraExported { id, .. }
            | JobEvent::Notice { id, .. }
            | JobEvent::Failed { id, .. }
            | JobEvent::Cancelled { id } => *id,
        }
    }

    /// True for the one event that ends a job.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            JobEvent::Progress { .. } | JobEvent::Preview { .. } | JobEvent::SnapshotKept { .. }
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("{REQUEST_QUEUE} jobs are already waiting; wait for one to finish or cancel some")]
    QueueFull,
    #[error("the engine thread has stopped; restart the program")]
    WorkerGone,
}

/// Settings the worker keeps for every job.
pub struct RunnerOptions {
    /// Seed of the preview map's fit (see `engine::preview`).
    pub preview_seed: u64,
    /// Which preview the jobs send; [`JobRunner::set_preview`] changes it.
    pub preview: PreviewMode,
    /// The tiny VAE, for `PreviewMode::Taesd` (the fast preview stands in without it).
    pub tiny_preview: Option<TinyPreview>,
}

/// The preview mode the UI chose, shared with the worker, which reads it at every step.
#[derive(Clone)]
struct SharedPreviewMode(Arc<AtomicU8>);

impl SharedPreviewMode {
    fn new(mode: PreviewMode) -> Self {
        let shared = Self(Arc::new(AtomicU8::new(0)));
        shared.set(mode);
        shared
    }

    fn set(&self, mode: PreviewMode) {
        let index = PreviewMode::ALL
            .iter()
            .position(|m| *m == mode)
            .unwrap_or(0);
        self.0.store(index as u8, Ordering::Relaxed);
    }

    fn get(&self) -> PreviewMode {
        PreviewMode::ALL[self.0.load(Ordering::Relaxed) as usize % PreviewMode::ALL.len()]
    }
}

/// A request on its way to the worker.
struct Envelope {
    id: JobId,
    cancel: Arc<AtomicBool>,
    request: JobRequest,
}

/// Cancel flags of jobs not yet ended, shared with the worker (which removes ended ones).
type LiveJobs = Arc<Mutex<HashMap<JobId, Arc<AtomicBool>>>>;

fn lock_live(live: &LiveJobs) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<AtomicBool>>> {
    // A flag map is valid whatever panicked while holding it.
    live.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Owns the engine thread. Dropping it cancels every job and waits for the thread.
pub struct JobRunner {
    requests: Option<Sender<Envelope>>,
    events: Receiver<JobEvent>,
    progress: Receiver<JobEvent>,
    previews: Receiver<JobEvent>,
    live: LiveJobs,
    next_id: JobId,
    worker: Option<JoinHandle<()>>,
    preview_mode: SharedPreviewMode,
    has_tiny_preview: bool,
}

impl JobRunner {
    /// Starts the "unitune-engine" thread with `service` (the loaded model, its snapshot cache
    /// and fine-tunes). It first fits the preview map (a few VAE calls); jobs submitted
    /// meanwhile wait.
    pub fn start(
        service: EditService,
        options: RunnerOptions,
        waker: Waker,
    ) -> std::io::Result<Self> {
        let (request_tx, request_rx) = bounded(REQUEST_QUEUE);
        let (event_tx, event_rx) = bounded(EVENT_QUEUE);
        let (progress_slot, progress_rx) = worker::LatestSlot::new();
        let (preview_slot, preview_rx) = worker::LatestSlot::new();
        let live = LiveJobs::default();
        let preview_mode = SharedPreviewMode::new(options.preview);
        let has_tiny_preview = options.tiny_preview.is_some();
        let worker = worker::Worker {
            service,
            previews: Previews {
                fast: None,
                tiny: options.tiny_preview.clone(),
            },
            preview_mode: preview_mode.clone(),
            options,
            out: worker::Outbox {
                events: event_tx,
                progress: progress_slot,
                previews: preview_slot,
                waker,
            },
            live: live.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("unitune-engine".into())
            .spawn(move || worker.run(request_rx))?;
        Ok(Self {
            requests: Some(request_tx),
            events: event_rx,
            progress: progress_rx,
            previews: preview_rx,
            live,
            next_id: 1,
            worker: Some(handle),
            preview_mode,
            has_tiny_preview,
        })
    }

    /// Switches the previews of the running and later jobs (from their next step on).
    pub fn set_preview(&self, mode: PreviewMode) {
        self.preview_mode.set(mode);
    }

    /// Whether the tiny VAE was loaded with the model (without it, `Taesd` previews fast).
    pub fn has_tiny_preview(&self) -> bool {
        self.has_tiny_preview
    }

    /// Queues a request without blocking.
    pub fn submit(&mut self, request: JobRequest) -> Result<JobId, SubmitError> {
        let requests = self.requests.as_ref().ok_or(SubmitError::WorkerGone)?;
        let id = self.next_id;
        let cancel = Arc::new(AtomicBool::new(false));
        lock_live(&self.live).insert(id, cancel.clone());
        let envelope = Envelope {
            id,
            cancel,
            request,
        };
        if let Err(error) = requests.try_send(envelope) {
            lock_live(&self.live).remove(&id);
            return Err(match error {
                TrySendError::Full(_) => SubmitError::QueueFull,
                TrySendError::Disconnected(_) => SubmitError::WorkerGone,
            });
        }
        self.next_id += 1;
        Ok(id)
    }

    /// Asks job `id` to stop: a queued job never starts, a running one stops within a step
    /// and reports `Cancelled`. Ended or unknown ids are ignored.
    pub fn cancel(&self, id: JobId) {
        if let Some(flag) = lock_live(&self.live).get(&id) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// The next event if one is waiting: results and ends first, then the latest progress,
    /// then the latest preview.
    pub fn try_next_event(&self) -> Option<JobEvent> {
        self.events
            .try_recv()
            .ok()
            .or_else(|| self.progress.try_recv().ok())
            .or_else(|| self.previews.try_recv().ok())
    }

    /// Waits up to `timeout` for the next event (for the CLI and tests; a GUI polls).
    pub fn next_event_timeout(&self, timeout: Duration) -> Option<JobEvent> {
        if let Some(event) = self.try_next_event() {
            return Some(event);
        }
        crossbeam_channel::select! {
            recv(self.events) -> event => event.ok(),
            recv(self.progress) -> event => event.ok(),
            recv(self.previews) -> event => event.ok(),
            default(timeout) => None,
        }
    }

    /// Every waiting event, stopping early once `budget` is spent (call once per frame).
    pub fn drain(&self, budget: Duration) -> Vec<JobEvent> {
        let start = Instant::now();
        let mut out = Vec::new();
        while start.elapsed() < budget {
            match self.try_next_event() {
                Some(event) => out.push(event),
                None => break,
            }
        }
        out
    }

    /// Returns at once, where dropping the runner would wait: a short-lived thread drops it,
    /// which cancels every job, waits for the engine thread to finish its current step
    /// (seconds for a big model on a CPU) and frees the model. For a UI replacing its model.
    pub fn stop_in_background(self) {
        // If no thread can be started the closure, and the runner with it, drops here.
        let _ = std::thread::Builder::new()
            .name("unitune-engine-stop".into())
            .spawn(move || drop(self));
    }
}

/// What a caught panic said, for a one-line message.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

impl Drop for JobRunner {
    fn drop(&mut self) {
        for flag in lock_live(&self.live).values() {
            flag.store(true, Ordering::Relaxed);
        }
        // No more requests: the worker leaves its loop after the current job.
        self.requests = None;
        if let Some(handle) = self.worker.take() {
            // Keep draining so a worker waiting on a full event queue can finish.
            while !handle.is_finished() {
                let _ = self.next_event_timeout(Duration::from_millis(10));
            }
            let _ = handle.join();
        }
    }
}
