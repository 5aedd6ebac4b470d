//! The engine thread: runs one job at a time on the edit service and reports through the
//! [`Outbox`].

use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use image::RgbImage;

use super::{
    Envelope, JobEvent, JobId, JobRequest, LiveJobs, RunnerOptions, SharedPreviewMode, Stage, Waker,
};
use crate::engine::edit::TuneEvent;
use crate::engine::preview::{LatentPreview, PreviewThrottle, Previewer, Previews};
use crate::engine::sampling::{StepObserver, StepView};
use crate::imaging::one_line;
use crate::recipe::Recipe;
use crate::service::{EditService, EstimatedRegion, ServiceError, TuneRequest};

/// How often a tune shows its reconstruction of the photo (one extra UNet call each).
const RECONSTRUCT_EVERY_STEPS: usize = 4;

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
        recipe: Box<Recipe>,
        region: Option<Box<EstimatedRegion>>,
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
    pub service: EditService,
    pub options: RunnerOptions,
    /// The fast map (fit when the worker starts) and the tiny VAE (if loaded).
    pub previews: Previews,
    pub preview_mode: SharedPreviewMode,
    pub out: Outbox,
    pub live: LiveJobs,
}

impl Worker {
    pub fn run(mut self, requests: Receiver<Envelope>) {
        // Without a preview map the jobs still run; they just send no previews (or only the
        // tiny VAE's).
        self.previews.fast =
            LatentPreview::for_model(self.service.engine(), self.options.preview_seed).ok();
        for Envelope {
            id,
            cancel,
            request,
        } in requests.iter()
        {
            let result = if cancel.load(Ordering::Relaxed) {
                Err("cancelled".to_string())
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
                    recipe,
                    region,
                }) => JobEvent::Finished {
                    id,
                    result,
                    working_size,
                    recipe,
                    region,
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
    ) -> Result<Outcome, ServiceError> {
        match request {
            JobRequest::Tune {
                photo,
                settings,
                size,
            } => {
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
                    if let TuneEvent::Notice(sentence) = event {
                        let message = sentence.to_owned();
                        if !out.send(JobEvent::Notice { id, message }) {
                            cancel.store(true, Ordering::Relaxed);
                        }
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
                let request = TuneRequest {
                    photo: &photo,
                    settings: &settings,
                    size,
                    reconstruct_every: preview.now().map(|_| RECONSTRUCT_EVERY_STEPS),
                    lighter_mode_if_short: true,
                };
                // A stopped tune's snapshots stay editable in the service.
                let tuned = self
                    .service
                    .tune(&request, &mut on_event)
                    .map_err(|stopped| stopped.error)?;
                Ok(Outcome::Tuned {
                    snapshot_steps: tuned.snapshot_steps,
                    from_cache: tuned.from_cache,
                })
            }
            JobRequest::Edit(spec) => {
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
                let edited = self.service.edit(&spec, &mut observer)?;
                Ok(Outcome::Edited {
                    result: edited.image,
                    working_size: edited.working_size,
                    recipe: Box::new(edited.recipe),
                    region: edited.region.map(Box::new),
                })
            }
            JobRequest::ExportLora {
                path,
                steps,
                photo_name,
            } => {
                self.service
                    .export_lora(&path, steps, photo_name.as_deref())?;
                Ok(Outcome::LoraExported { path })
            }
        }
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
fn guarded<T>(job: impl FnOnce() -> Result<T, ServiceError>) -> Result<T, String> {
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
            guarded(|| Err(ServiceError::Invalid("bad\n  request".into())));
        assert_eq!(result.unwrap_err(), "bad request");
    }
}
