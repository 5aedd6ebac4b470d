//! The engine thread: runs one job at a time and reports through the [`Outbox`].

use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use image::{GrayImage, RgbImage};

use super::{
    Envelope, JobEvent, JobId, JobRequest, LiveJobs, RunnerOptions, SharedPreviewMode, Stage, Waker,
};
use crate::engine::EngineError;
use crate::engine::edit::{
    CachePolicy, EditRequest, TuneEvent, TunedPhoto, edit_photo, tune_photo,
};
use crate::engine::lora::{LoraExportInfo, export_tuned};
use crate::engine::model::StableDiffusion;
use crate::engine::preview::{LatentPreview, PreviewThrottle, Previewer, Previews};
use crate::engine::sampling::{StepObserver, StepView};
use crate::imaging::{self, one_line};

/// How often a tune shows its reconstruction of the photo (one extra UNet call each).
const RECONSTRUCT_EVERY_STEPS: usize = 4;

/// The photo the model was last tuned on, at its working size, and its snapshots.
pub(super) struct Tuned {
    working: RgbImage,
    photo: TunedPhoto,
}

/// Where the worker's events go.
///
/// Events that must arrive (results, errors, ends) queue; progress and previews are state,
/// not history, so each goes into a one-event slot where the newest replaces an unread one:
/// a UI that stops reading (a minimised window) never holds the worker up.
pub(super) struct Outbox {
    pub events: Sender<JobEvent>,
    pub progress: LatestSlot,
    pub previews: LatestSlot,
    pub waker: Waker,
}

/// A one-event channel whose newest event replaces an unread one.
pub(super) struct LatestSlot {
    tx: Sender<JobEvent>,
    /// The reading end's twin, to take out an event the UI has not read yet.
    stale: Receiver<JobEvent>,
}

impl LatestSlot {
    /// The slot and the receiver the UI reads it from.
    pub fn new() -> (Self, Receiver<JobEvent>) {
        let (tx, rx) = bounded(1);
        let slot = Self {
            tx,
            stale: rx.clone(),
        };
        (slot, rx)
    }

    fn offer(&self, event: JobEvent) {
        if let Err(TrySendError::Full(event)) = self.tx.try_send(event) {
            let _ = self.stale.try_recv();
            // Only the worker sends, so the slot has room now (or the UI just emptied it).
            let _ = self.tx.try_send(event);
        }
    }

    fn clear(&self) {
        while self.stale.try_recv().is_ok() {}
    }
}

impl Outbox {
    /// Sends an event that must arrive (a kept snapshot, a result, an error, a job's end),
    /// waiting for room (the queue holds far more than a job sends). False when the UI has
    /// gone.
    fn send(&self, event: JobEvent) -> bool {
        debug_assert!(!matches!(
            event,
            JobEvent::Progress { .. } | JobEvent::Preview { .. }
        ));
        let sent = self.events.send(event).is_ok();
        (self.waker)();
        sent
    }

    /// Puts the job's latest step in its slot, replacing one the UI has not read.
    fn offer_progress(&self, event: JobEvent) {
        self.progress.offer(event);
        (self.waker)();
    }

    /// Puts a preview in its slot, replacing one the UI has not read.
    fn offer_preview(&self, event: JobEvent) {
        self.previews.offer(event);
        (self.waker)();
    }

    /// Empties both slots before a job's final event, so nothing of the job arrives after it.
    fn clear_slots(&self) {
        self.progress.clear();
        self.previews.clear();
    }
}

/// How a job ended, short of a panic.
enum Outcome {
    Edited {
        result: RgbImage,
        working_size: (u32, u32),
    },
    Tuned {
        snapshot_steps: Vec<usize>,
        from_cache: bool,
    },
    LoraExported {
        path: PathBuf,
    },
}

pub(super) struct Worker {
    pub model: StableDiffusion,
    pub options: RunnerOptions,
    pub tuned: Option<Tuned>,
    /// The fast map (fit when the worker starts) and the tiny VAE (if loaded).
    pub previews: Previews,
    pub preview_mode: SharedPreviewMode,
    pub out: Outbox,
    pub live: LiveJobs,
    /// The last mask scaled to its photo's size, with the mask it came from: one Edit queues
    /// several variants sharing one mask, and scaling it to a large photo is not free. Holding
    /// the source keeps its address from being reused, so `Arc::ptr_eq` identifies it.
    pub scaled_mask: Option<(Arc<GrayImage>, Arc<GrayImage>)>,
}

impl Worker {
    pub fn run(mut self, requests: Receiver<Envelope>) {
        // Without a preview map the jobs still run; they just send no previews (or only the
        // tiny VAE's).
        self.previews.fast = LatentPreview::fit(&self.model, self.options.preview_seed).ok();
        for Envelope {
            id,
            cancel,
            request,
        } in requests.iter()
        {
            let result = if cancel.load(Ordering::Relaxed) {
                Err(EngineError::Cancelled.to_string())
            } else {
                guarded(|| self.run_job(id, &cancel, request))
            };
            self.out.clear_slots();
            // What malloc kept for reuse during the job goes back to the system while idle.
            crate::engine::memory::release_free_memory();
            let event = match result {
                Ok(Outcome::Edited {
                    result,
                    working_size,
                }) => JobEvent::Finished {
                    id,
                    result,
                    working_size,
                },
                Ok(Outcome::Tuned {
                    snapshot_steps,
                    from_cache,
                }) => JobEvent::Tuned {
                    id,
                    snapshot_steps,
                    from_cache,
                },
                Ok(Outcome::LoraExported { path }) => JobEvent::LoraExported { id, path },
                Err(_) if cancel.load(Ordering::Relaxed) => JobEvent::Cancelled { id },
                Err(message) => JobEvent::Failed { id, message },
            };
            super::lock_live(&self.live).remove(&id);
            if !self.out.send(event) {
                return;
            }
        }
    }

    fn run_job(
        &mut self,
        id: JobId,
        cancel: &AtomicBool,
        request: JobRequest,
    ) -> Result<Outcome, EngineError> {
        match request {
            JobRequest::Tune {
                photo,
                settings,
                size,
            } => {
                let working = self.working_image(&photo, size)?;
                // The old snapshots belong to another photo or recipe.
                self.tuned = None;
                let out = &self.out;
                let preview = Previewing {
                    previews: &self.previews,
                    mode: &self.preview_mode,
                };
                let mut on_event = |event: TuneEvent| {
                    if let TuneEvent::SnapshotKept(steps) = event
                        && !out.send(JobEvent::SnapshotKept { id, steps })
                    {
                        cancel.store(true, Ordering::Relaxed);
                    }
                    if let TuneEvent::Progress(p) = event {
                        out.offer_progress(JobEvent::Progress {
                            id,
                            stage: Stage::Tuning,
                            step: p.step,
                            total: p.total_steps,
                            loss: Some(p.loss),
                        });
                        let rendered = p
                            .reconstruction
                            .as_ref()
                            .and_then(|latents| preview.now()?.render(latents).ok());
                        if let Some(image) = rendered {
                            out.offer_preview(JobEvent::Preview { id, image });
                        }
                    }
                    stop_if(cancel)
                };
                let policy = CachePolicy {
                    cache: self.options.cache.as_ref(),
                    model_identity: &self.options.model_identity,
                };
                let reconstruct_every = preview.now().map(|_| RECONSTRUCT_EVERY_STEPS);
                let tuned = match tune_photo(
                    &mut self.model,
                    &working,
                    &settings,
                    &policy,
                    reconstruct_every,
                    &mut on_event,
                ) {
                    Ok(tuned) => tuned,
                    Err(stopped) => {
                        // The snapshots completed before the stop stay editable.
                        self.tuned = stopped.partial.map(|photo| Tuned {
                            working,
                            photo: *photo,
                        });
                        return Err(stopped.error);
                    }
                };
                let outcome = Outcome::Tuned {
                    snapshot_steps: tuned.snapshot_steps(),
                    from_cache: tuned.from_cache,
                };
                self.tuned = Some(Tuned {
                    working,
                    photo: tuned,
                });
                Ok(outcome)
            }
            JobRequest::Edit {
                method,
                photo,
                mask,
                prompt,
                baseline_prompt,
                tune_steps,
                t0_fraction,
                guidance_weight,
                sampling_steps,
                seed,
                interpolate,
                size,
            } => {
                let working = self.working_image(&photo, size)?;
                let mask = mask.map(|m| self.mask_at(m, photo.dimensions()));
                let tuned = match &self.tuned {
                    // Snapshot 0 restores the base weights after any tune.
                    Some(t) if tune_steps == 0 || t.working == working => Some(&t.photo),
                    _ if tune_steps == 0 => None,
                    _ => {
                        return Err(EngineError::InvalidRequest(
                            "this photo has not been fine-tuned at this size yet; tune it first or use 0 fine-tuning steps".into(),
                        ));
                    }
                };
                let request = EditRequest {
                    method,
                    original: &photo,
                    working: &working,
                    prompt: &prompt,
                    baseline_prompt: baseline_prompt.as_deref(),
                    tune_steps,
                    t0: t0_fraction,
                    guidance: guidance_weight,
                    sampling_steps,
                    seed,
                    mask: mask.as_deref(),
                    interpolate,
                };
                let mut observer = EditObserver {
                    id,
                    out: &self.out,
                    preview: Previewing {
                        previews: &self.previews,
                        mode: &self.preview_mode,
                    },
                    throttle: PreviewThrottle::new(),
                    cancel,
                };
                let result = edit_photo(&self.model, tuned, &request, &mut observer)?;
                Ok(Outcome::Edited {
                    result,
                    working_size: working.dimensions(),
                })
            }
            JobRequest::ExportLora {
                path,
                steps,
                model_name,
                recipe_json,
            } => {
                let tuned = self.tuned.as_ref().ok_or_else(|| {
                    EngineError::InvalidRequest(
                        "nothing has been fine-tuned yet; run an edit with lora training first"
                            .into(),
                    )
                })?;
                let output_name = crate::engine::lora::output_name(&path);
                let info = LoraExportInfo {
                    output_name: &output_name,
                    base_model_name: &model_name,
                    base_model_fingerprint: &self.options.model_identity,
                    recipe_json: &recipe_json,
                    token: &tuned.photo.settings.token,
                    steps,
                    created_unix_secs: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                };
                export_tuned(&tuned.photo, &self.model.config, &path, &info)?;
                Ok(Outcome::LoraExported { path })
            }
        }
    }

    /// `mask` at `size`, scaled once per mask (see `scaled_mask`).
    fn mask_at(&mut self, mask: Arc<GrayImage>, (w, h): (u32, u32)) -> Arc<GrayImage> {
        if mask.dimensions() == (w, h) {
            return mask;
        }
        if let Some((source, scaled)) = &self.scaled_mask
            && Arc::ptr_eq(source, &mask)
            && scaled.dimensions() == (w, h)
        {
            return scaled.clone();
        }
        let scaled = Arc::new(imaging::resize_gray(&mask, w, h));
        self.scaled_mask = Some((mask, scaled.clone()));
        scaled
    }

    /// The photo fitted to the model's working size (as the CLI does).
    fn working_image(
        &self,
        photo: &RgbImage,
        size: Option<(u32, u32)>,
    ) -> Result<RgbImage, EngineError> {
        let side = self.model.config.native_image_side().unwrap_or(512) as u32;
        let (w, h) = imaging::working_size(photo.width(), photo.height(), side, size)
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        Ok(imaging::resize_rgb(photo, w, h))
    }
}

/// Streams an edit's steps and previews to the UI; stops the edit once it is cancelled, after
/// the current step or between stages (decoding, pasting back at full size).
struct EditObserver<'a> {
    id: JobId,
    out: &'a Outbox,
    preview: Previewing<'a>,
    throttle: PreviewThrottle,
    cancel: &'a AtomicBool,
}

/// The previews at hand and the mode the UI chose, which may change during a job.
#[derive(Clone, Copy)]
struct Previewing<'a> {
    previews: &'a Previews,
    mode: &'a SharedPreviewMode,
}

impl Previewing<'_> {
    /// The preview to send now, if any.
    fn now(&self) -> Option<Previewer<'_>> {
        self.previews.pick(self.mode.get())
    }
}

impl StepObserver for EditObserver<'_> {
    fn observe(&mut self, view: &StepView) -> ControlFlow<()> {
        self.out.offer_progress(JobEvent::Progress {
            id: self.id,
            stage: Stage::Sampling,
            step: view.step,
            total: view.total_steps,
            loss: None,
        });
        let preview = self.preview.now().filter(|_| self.throttle.due());
        if let Some(image) = preview.and_then(|p| self.throttle.render(p, view.predicted_x0).ok()) {
            self.out
                .offer_preview(JobEvent::Preview { id: self.id, image });
        }
        stop_if(self.cancel)
    }

    fn proceed(&mut self) -> ControlFlow<()> {
        stop_if(self.cancel)
    }
}

fn stop_if(cancel: &AtomicBool) -> ControlFlow<()> {
    if cancel.load(Ordering::Relaxed) {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}

/// Runs `job`, turning an error or a panic into one line for the user. The model may be left
/// half-changed by a panic; the next job still runs (a tune re-attaches its weights).
fn guarded<T>(job: impl FnOnce() -> Result<T, EngineError>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(job)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(one_line(&error.to_string())),
        Err(payload) => {
            let what = super::panic_text(payload.as_ref());
            Err(one_line(&format!(
                "the engine failed unexpectedly ({what}); try again, and report it if it repeats"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_one_line_message() {
        let result: Result<(), String> = guarded(|| panic!("boom\nsecond line"));
        let message = result.unwrap_err();
        assert!(message.contains("boom second line"), "{message}");
        assert!(!message.contains('\n'));
    }

    /// An outbox as `JobRunner::start` builds it, with the UI's ends of its channels.
    fn outbox(queue: usize) -> (Outbox, [Receiver<JobEvent>; 3]) {
        let (events, events_rx) = bounded(queue);
        let (progress, progress_rx) = LatestSlot::new();
        let (previews, previews_rx) = LatestSlot::new();
        let out = Outbox {
            events,
            progress,
            previews,
            waker: Box::new(|| {}),
        };
        (out, [events_rx, progress_rx, previews_rx])
    }

    fn progress(id: JobId, step: usize) -> JobEvent {
        JobEvent::Progress {
            id,
            stage: Stage::Sampling,
            step,
            total: 1000,
            loss: None,
        }
    }

    #[test]
    fn progress_nobody_reads_never_holds_the_worker_up_and_the_latest_wins() {
        let (out, [events, progress_rx, previews]) = outbox(4);
        let worker = std::thread::spawn(move || {
            for step in 1..=1000 {
                out.offer_progress(progress(7, step));
                out.offer_preview(JobEvent::Preview {
                    id: 7,
                    image: RgbImage::new(1, 1),
                });
            }
            out
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !worker.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the worker waited for a UI that does not read"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let out = worker.join().unwrap();
        assert!(events.is_empty(), "progress does not queue");
        match progress_rx.try_recv() {
            Ok(JobEvent::Progress { step, .. }) => assert_eq!(step, 1000, "the latest wins"),
            other => panic!("expected the last progress, got {other:?}"),
        }
        assert!(previews.try_recv().is_ok());
        out.offer_progress(progress(7, 1));
        out.clear_slots();
        assert!(
            progress_rx.is_empty() && previews.is_empty(),
            "an ended job leaves nothing"
        );
    }

    #[test]
    fn events_that_must_arrive_all_arrive_in_order() {
        let (out, [events, _progress, _previews]) = outbox(64);
        for id in 1..=3 {
            out.offer_progress(progress(id, 1));
            assert!(out.send(JobEvent::Failed {
                id,
                message: format!("failure {id}"),
            }));
        }
        let ids: Vec<JobId> = events.try_iter().map(|e| e.id()).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        drop(events);
        assert!(
            !out.send(JobEvent::Cancelled { id: 4 }),
            "a UI that has gone is reported"
        );
    }

    #[test]
    fn errors_become_one_line() {
        let result: Result<(), String> =
            guarded(|| Err(EngineError::InvalidRequest("bad\n  request".into())));
        assert_eq!(result.unwrap_err(), "bad request");
    }
}
