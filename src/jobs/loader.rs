//! Finding, downloading and loading a model on a named thread ("unitune-model-loader"), then
//! starting a [`JobRunner`] with it. The GUI starts one, polls its events each frame and
//! never waits on it.

use crate::engine::fidelity::FidelityTable;
use crate::engine::instruct::is_instruct_model;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use super::{JobRunner, PreviewMode, RunnerOptions, SnapshotCache};
use crate::engine::StableDiffusion;
use crate::engine::device::{DeviceChoice, device_name, open_device};
use crate::engine::precision::{Precision, dtype_name};
use crate::engine::preview::TinyPreview;
use crate::imaging::one_line;
use crate::model_files::{
    self, DownloadProgress, HubOptions, LoraChoice, ModelFiles, ModelFilesError, ModelSpec,
    TINY_VAE_REPO,
};
use crate::recipe::LoraRecipe;

/// What to load and how far to go for it.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    /// A folder or hub id, as `--model` takes it.
    pub model: String,
    pub device: DeviceChoice,
    pub precision: Precision,
    /// Whether a model missing from the machine may be downloaded (the user agreed to it).
    pub allow_download: bool,
    pub hub: HubOptions,
    /// Where tunes keep their snapshots; `None` disables the cache.
    pub snapshot_cache: Option<SnapshotCache>,
    /// LoRA files applied to the model (`--lora`), in order.
    pub loras: Vec<LoraChoice>,
    /// The previews the jobs send; `Taesd` also fetches the tiny VAE (cache first, then a
    /// download unless offline).
    pub preview: PreviewMode,
}

/// A model ready for jobs, and how to describe it to the user.
pub struct LoadedModel {
    pub runner: JobRunner,
    /// How recipes name the model (the folder or hub id).
    pub name: String,
    /// Where the files came from, in words.
    pub source: String,
    /// The device it runs on, e.g. "cpu" or "cuda:0".
    pub device: String,
    /// What the UNet predicts ("epsilon", "v_prediction"), for recipes.
    pub prediction_type: &'static str,
    /// The compute precision ("f32", "f16", "bf16"), for recipes.
    pub precision: &'static str,
    /// An InstructPix2Pix model: edits are instructions, without fine-tuning.
    pub instruct: bool,
    /// What the fidelity slider means for this model.
    pub fidelity_table: &'static FidelityTable,
    /// The LoRAs applied to it, for recipes and the model panel.
    pub loras: Vec<LoraRecipe>,
    /// One line on why the tiny VAE preview could not be had (the fast one stands in).
    pub preview_notice: Option<String>,
    /// What was loaded: family (detected for a single file), variant, prediction type and
    /// why, in one line.
    pub description: String,
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
    Ready(Box<LoadedModel>),
    /// The model is not on this machine and downloading was not allowed: one sentence on
    /// what is missing and what to do.
    NotOnMachine {
        message: String,
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
                let outbox = Outbox { tx, waker };
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

struct Outbox {
    tx: Sender<LoadEvent>,
    waker: Arc<dyn Fn() + Send + Sync>,
}

impl Outbox {
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

fn load(request: &LoadRequest, cancel: &Arc<AtomicBool>, outbox: &Outbox) -> LoadEvent {
    let failed = |message: String| LoadEvent::Failed { message };
    let spec = match model_files::parse_model_arg(&request.model) {
        Ok(spec) => spec,
        Err(err) => return failed(err.to_string()),
    };
    let hub = HubOptions {
        offline: request.hub.offline || !request.allow_download,
        ..request.hub.clone()
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
    let files = match model_files::resolve(&spec, &hub, &mut progress) {
        Ok(files) => ModelFiles {
            loras: request.loras.clone(),
            ..files
        },
        Err(ModelFilesError::NotCached { .. })
            if !request.allow_download && !request.hub.is_offline() =>
        {
            return LoadEvent::NotOnMachine {
                message: format!(
                    "{spec} is not on this machine yet; download it or choose a model folder"
                ),
            };
        }
        Err(ModelFilesError::Cancelled) => return LoadEvent::Cancelled,
        Err(err) => return failed(one_line(&err.to_string())),
    };
    outbox.offer(LoadEvent::Loading {
        source: files.source.to_string(),
    });
    let device = match open_device(request.device) {
        Ok(device) => device,
        Err(err) => return failed(one_line(&err.to_string())),
    };
    let dtype = match request.precision.resolve(&device) {
        Ok(dtype) => dtype,
        Err(err) => return failed(one_line(&err.to_string())),
    };
    let model = match StableDiffusion::load(&files, &device, dtype) {
        Ok(model) => model,
        Err(err) => return failed(one_line(&err.to_string())),
    };
    if cancel.load(Ordering::Relaxed) {
        return LoadEvent::Cancelled;
    }
    // Read once per file and remembered: the snapshot cache follows the weights, not paths.
    let memo = crate::model_files::default_memo_path();
    let (model_identity, lora_hashes) = match files
        .fingerprint(memo.as_deref())
        .and_then(|identity| Ok((identity, files.lora_hashes(memo.as_deref())?)))
    {
        Ok(found) => found,
        Err(err) => return failed(one_line(&err.to_string())),
    };
    let loras = files
        .loras
        .iter()
        .zip(lora_hashes)
        .map(|(choice, hash)| LoraRecipe {
            file: choice.file_name(),
            hash,
            weight: choice.weight,
        })
        .collect();
    if cancel.load(Ordering::Relaxed) {
        return LoadEvent::Cancelled;
    }
    let (tiny_preview, preview_notice) = if request.preview == PreviewMode::Taesd {
        match load_tiny_preview(&request.hub, &model, &mut progress) {
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
    let prediction_type = model.config.scheduler.prediction_type.as_str();
    let instruct = is_instruct_model(&model);
    let fidelity_table = model.info().fidelity_table;
    let description = model.info().describe();
    let options = RunnerOptions {
        cache: request.snapshot_cache.clone(),
        model_identity,
        preview_seed: 0,
        preview: request.preview,
        tiny_preview,
    };
    let waker = outbox.waker.clone();
    let runner = match JobRunner::start(model, options, Box::new(move || waker())) {
        Ok(runner) => runner,
        Err(err) => return failed(format!("cannot start the engine thread: {err}")),
    };
    let name = match &spec {
        ModelSpec::Folder(path) => path.display().to_string(),
        ModelSpec::Hub { .. } | ModelSpec::Demo => spec.to_string(),
    };
    LoadEvent::Ready(Box::new(LoadedModel {
        runner,
        name,
        source: files.source.to_string(),
        device: device_name(&device),
        prediction_type,
        precision: dtype_name(dtype),
        instruct,
        fidelity_table,
        loras,
        preview_notice,
        description,
    }))
}

/// The tiny VAE for `model`'s previews, downloaded (with the model's progress) unless
/// offline; the reason in one line when it cannot be had.
fn load_tiny_preview(
    hub: &HubOptions,
    model: &StableDiffusion,
    progress: &mut dyn DownloadProgress,
) -> Result<TinyPreview, String> {
    let files =
        model_files::resolve_tiny_vae(hub, progress).map_err(|e| one_line(&e.to_string()))?;
    TinyPreview::load(&files.config, &files.weights, model).map_err(|e| one_line(&e.to_string()))
}

struct LoaderProgress<'a> {
    outbox: &'a Outbox,
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
