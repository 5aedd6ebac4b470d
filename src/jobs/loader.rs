//! Finding, downloading and loading a model on a named thread ("unitune-model-loader"), then
//! starting a [`JobRunner`] with it. The GUI starts one, polls its events each frame and
//! never waits on it.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use super::{JobRunner, PreviewMode, RunnerOptions, SnapshotCache};
use crate::engine::device::{DeviceChoice, open_device};
use crate::engine::memory::MemoryProbe;
use crate::engine::preview::TinyPreview;
use crate::imaging::one_line;
use crate::model_files::{self, DownloadProgress, HubOptions, ModelFilesError, TINY_VAE_REPO};
use crate::service::{EditService, ModelRequest, ModelSummary, ServiceError, resolve_files};

/// What to load and how far to go for it.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    /// The model and every global flag, as the command line's commands get them.
    pub model: ModelRequest,
    /// Whether a model missing from the machine may be downloaded (the user agreed to it).
    pub allow_download: bool,
    /// Where tunes keep their snapshots; `None` disables the cache.
    pub snapshot_cache: Option<SnapshotCache>,
    /// The previews the jobs send; `Taesd` also fetches the tiny VAE (cache first, then a
    /// download unless offline).
    pub preview: PreviewMode,
}

/// A model ready for jobs, and what it is.
pub struct ReadyModel {
    pub runner: JobRunner,
    /// What was loaded, its public name and hash.
    pub summary: ModelSummary,
    /// One line on why the tiny VAE preview could not be had (the fast one stands in).
    pub preview_notice: Option<String>,
}

/// How a download is going, for a progress bar.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadStatus {
    pub file: String,
    pub file_bytes_done: u64,
    pub file_bytes_total: Option<u64>,
    /// Bytes of every file downloaded so far in this run.
    pub bytes_done: u64,
    /// About how many bytes the whole download is, when known in advance.
    pub bytes_expected: Option<u64>,
    pub bytes_per_sec: f64,
    /// Time left for what is known to remain, at the speed so far.
    pub eta: Option<Duration>,
}

pub enum LoadEvent {
    Downloading(DownloadStatus),
    /// The files are all on the machine; the weights are being read.
    Loading {
        source: String,
    },
    Ready(Box<ReadyModel>),
    /// The model is not on this machine and downloading was not allowed: one sentence on
    /// what is missing and what to do, and the GPU's memory (which model to suggest).
    NotOnMachine {
        message: String,
        gpu_bytes: Option<u64>,
    },
    Failed {
        message: String,
    },
    Cancelled,
}

/// A model load in progress. Dropping it cancels the load.
pub struct ModelLoader {
    events: Receiver<LoadEvent>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Unwound out of hf-hub's progress callback to stop a file mid-download: hf-hub has no
/// other way to stop, and a 1.7 GB file would otherwise finish first. The partial file stays
/// in the cache and a later download resumes it.
struct DownloadCancelled;

impl ModelLoader {
    /// Starts loading. `waker` is called after each event (the GUI passes `request_repaint`);
    /// the runner it starts gets a copy.
    pub fn start(
        request: LoadRequest,
        waker: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Self> {
        // Progress may be dropped when the UI is behind; the final event never is (the
        // channel has room for it because the thread sends only one after progress stops).
        let (tx, rx) = bounded(32);
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("unitune-model-loader".into())
            .spawn(move || {
                let outbox = LoadOutbox { tx, waker };
                let event = match catch_unwind(AssertUnwindSafe(|| load(&request, &flag, &outbox)))
                {
                    Ok(event) => event,
                    Err(payload) if payload.is::<DownloadCancelled>() => LoadEvent::Cancelled,
                    Err(payload) => LoadEvent::Failed {
                        message: format!(
                            "loading the model failed unexpectedly ({}); try again",
                            super::panic_text(payload.as_ref())
                        ),
                    },
                };
                let event = match event {
                    LoadEvent::Failed { .. } if flag.load(Ordering::Relaxed) => {
                        LoadEvent::Cancelled
                    }
                    other => other,
                };
                outbox.send_final(event);
            })?;
        Ok(Self {
            events: rx,
            cancel,
            thread: Some(thread),
        })
    }

    /// Stops a download within a moment; a load already reading weights finishes first.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub fn try_next(&self) -> Option<LoadEvent> {
        self.events.try_recv().ok()
    }

    /// Waits up to `timeout` for the next event (tests; a GUI polls).
    pub fn next_event_timeout(&self, timeout: Duration) -> Option<LoadEvent> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Drop for ModelLoader {
    fn drop(&mut self) {
        self.cancel();
        // Not joined: the thread may be reading gigabytes of weights, and the UI must not
        // wait for it. It ends on its own, and its runner (if any) is dropped with the
        // channel, which stops the engine thread.
        self.thread.take();
    }
}

/// Where the loader's events go (the worker's own is `worker::Outbox`).
struct LoadOutbox {
    tx: Sender<LoadEvent>,
    waker: Arc<dyn Fn() + Send + Sync>,
}

impl LoadOutbox {
    fn offer(&self, event: LoadEvent) {
        let _ = self.tx.try_send(event);
        (self.waker)();
    }

    fn send_final(&self, event: LoadEvent) {
        // Blocks only while the UI has not read the progress before it; a UI that has gone
        // drops the receiver, which ends the wait.
        let _ = self.tx.send(event);
        (self.waker)();
    }
}

/// The memory of the GPU the model would run on; `None` on the CPU and where the device cannot
/// tell (Metal). Opening the device is what loading does first anyway.
fn gpu_memory(choice: DeviceChoice) -> Option<u64> {
    let device = open_device(choice).ok()?;
    if device.is_cpu() {
        return None;
    }
    MemoryProbe::new(&device).total_bytes()
}

fn load(request: &LoadRequest, cancel: &Arc<AtomicBool>, outbox: &LoadOutbox) -> LoadEvent {
    let failed = |message: String| LoadEvent::Failed { message };
    let spec = match model_files::parse_model_arg(&request.model.model) {
        Ok(spec) => spec,
        Err(err) => return failed(err.to_string()),
    };
    let model = ModelRequest {
        hub: HubOptions {
            offline: request.model.hub.offline || !request.allow_download,
            ..request.model.hub.clone()
        },
        ..request.model.clone()
    };
    let mut progress = LoaderProgress {
        outbox,
        cancel: cancel.clone(),
        started: Instant::now(),
        file: String::new(),
        file_done: 0,
        file_total: None,
        done: 0,
        expected: model_files::approximate_download_bytes(&spec),
        last_report: None,
    };
    let (spec, files) = match resolve_files(&model, &mut progress) {
        Ok(found) => found,
        Err(ServiceError::ModelFiles(e))
            if matches!(*e, ModelFilesError::NotCached { .. })
                && !request.allow_download
                && !request.model.hub.is_offline() =>
        {
            return LoadEvent::NotOnMachine {
                message: format!(
                    "{spec} is not on this machine yet; download it or choose a model folder"
                ),
                gpu_bytes: gpu_memory(request.model.device),
            };
        }
        Err(ServiceError::ModelFiles(e)) if matches!(*e, ModelFilesError::Cancelled) => {
            return LoadEvent::Cancelled;
        }
        Err(err) => return failed(one_line(&err.to_string())),
    };
    outbox.offer(LoadEvent::Loading {
        source: files.source.to_string(),
    });
    let service = match EditService::open(&model, &spec, &files, request.snapshot_cache.clone()) {
        Ok(service) => service,
        Err(err) => return failed(one_line(&err.to_string())),
    };
    if cancel.load(Ordering::Relaxed) {
        return LoadEvent::Cancelled;
    }
    let (tiny_preview, preview_notice) = if request.preview == PreviewMode::Taesd {
        match load_tiny_preview(&request.model.hub, &service, &mut progress) {
            Ok(tiny) => (Some(tiny), None),
            Err(reason) => (
                None,
                Some(format!(
                    "The tiny VAE preview ({TINY_VAE_REPO}) is not available ({reason}); showing the fast preview instead"
                )),
            ),
        }
    } else {
        (None, None)
    };
    if cancel.load(Ordering::Relaxed) {
        return LoadEvent::Cancelled;
    }
    let summary = service.summary().clone();
    let options = RunnerOptions {
        preview_seed: 0,
        preview: request.preview,
        tiny_preview,
    };
    let waker = outbox.waker.clone();
    let runner = match JobRunner::start(service, options, Box::new(move || waker())) {
        Ok(runner) => runner,
        Err(err) => return failed(format!("cannot start the engine thread: {err}")),
    };
    LoadEvent::Ready(Box::new(ReadyModel {
        runner,
        summary,
        preview_notice,
    }))
}

/// The tiny VAE for `model`'s previews, downloaded (with the model's progress) unless
/// offline; the reason in one line when it cannot be had.
fn load_tiny_preview(
    hub: &HubOptions,
    service: &EditService,
    progress: &mut dyn DownloadProgress,
) -> Result<TinyPreview, String> {
    let files =
        model_files::resolve_tiny_vae(hub, progress).map_err(|e| one_line(&e.to_string()))?;
    TinyPreview::load(&files.config, &files.weights, service.engine())
        .map_err(|e| one_line(&e.to_string()))
}

struct LoaderProgress<'a> {
    outbox: &'a LoadOutbox,
    cancel: Arc<AtomicBool>,
    started: Instant,
    file: String,
    file_done: u64,
    file_total: Option<u64>,
    done: u64,
    expected: Option<u64>,
    last_report: Option<Instant>,
}

/// How often a download reports, at most: often enough for a smooth bar.
const REPORT_EVERY: Duration = Duration::from_millis(100);

impl LoaderProgress<'_> {
    fn status(&self) -> DownloadStatus {
        let seconds = self.started.elapsed().as_secs_f64();
        let bytes_per_sec = if seconds > 0.0 {
            self.done as f64 / seconds
        } else {
            0.0
        };
        let remaining = match self.expected {
            Some(expected) => Some(expected.saturating_sub(self.done)),
            None => self.file_total.map(|t| t.saturating_sub(self.file_done)),
        };
        let eta = remaining
            .filter(|_| bytes_per_sec > 0.0)
            .map(|r| Duration::from_secs_f64(r as f64 / bytes_per_sec));
        DownloadStatus {
            file: self.file.clone(),
            file_bytes_done: self.file_done,
            file_bytes_total: self.file_total,
            bytes_done: self.done,
            bytes_expected: self.expected.map(|e| e.max(self.done)),
            bytes_per_sec,
            eta,
        }
    }
}

impl DownloadProgress for LoaderProgress<'_> {
    fn start_file(&mut self, name: &str, total_bytes: Option<u64>) {
        self.file = name.to_owned();
        self.file_done = 0;
        self.file_total = total_bytes;
        self.outbox.offer(LoadEvent::Downloading(self.status()));
    }

    fn advance(&mut self, bytes: u64) {
        if self.cancel.load(Ordering::Relaxed) {
            resume_unwind(Box::new(DownloadCancelled));
        }
        self.file_done += bytes;
        self.done += bytes;
        if self.last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
            self.last_report = Some(Instant::now());
            self.outbox.offer(LoadEvent::Downloading(self.status()));
        }
    }

    fn finish_file(&mut self) {}

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}
