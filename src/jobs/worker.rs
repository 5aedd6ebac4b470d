//! The engine thread: runs one job at a time and reports through the [`Outbox`].

use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use image::{GrayImage, RgbImage};

use super::{Envelope, JobEvent, JobId, JobRequest, LiveJobs, RunnerOptions, Stage, Waker};
use crate::engine::EngineError;
use crate::engine::edit::{
    CachePolicy, EditRequest, TuneEvent, TunedPhoto, edit_photo, tune_photo,
};
use crate::engine::model::StableDiffusion;
use crate::engine::preview::LatentPreview;
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
pub(super) struct Outbox {
    pub events: Sender<JobEvent>,
    pub previews: Sender<JobEvent>,
    /// The preview slot's other end, to take out a preview the UI has not read yet.
    pub stale_previews: Receiver<JobEvent>,
    pub waker: Waker,
}

impl Outbox {
    /// Sends a progress or final event, waiting for room. False when the UI has gone.
    fn send(&self, event: JobEvent) -> bool {
        let sent = self.events.send(event).is_ok();
        (self.waker)();
        sent
    }

    /// Puts a preview in the slot, replacing one the UI has not read.
    fn offer_preview(&self, event: JobEvent) {
        if let Err(TrySendError::Full(event)) = self.previews.try_send(event) {
            let _ = self.stale_previews.try_recv();
            let _ = self.previews.try_send(event);
        }
        (self.waker)();
    }

    /// Empties the preview slot, so no preview arrives after its job's final event.
    fn clear_previews(&self) {
        while self.stale_previews.try_recv().is_ok() {}
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
}

pub(super) struct Worker {
    pub model: StableDiffusion,
    pub options: RunnerOptions,
    pub tuned: Option<Tuned>,
    pub preview: Option<LatentPreview>,
    pub out: Outbox,
    pub live: LiveJobs,
    /// The last mask scaled to its photo's size, with the mask it came from: one Edit queues
    /// several variants sharing one mask, and scaling it to a large photo is not free. Holding
    /// the source keeps its address from being reused, so `Arc::ptr_eq` identifies it.
    pub scaled_mask: Option<(Arc<GrayImage>, Arc<GrayImage>)>,
}

impl Worker {
    pub fn run(mut self, requests: Receiver<Envelope>) {
        // Without a preview map the jobs still run; they just send no previews.
        self.preview = LatentPreview::fit(&self.model, self.options.preview_seed).ok();
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
            self.out.clear_previews();
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
                let preview = self.preview.as_ref();
                let mut on_event = |event: TuneEvent| {
                    if let TuneEvent::SnapshotKept(steps) = event
                        && !out.send(JobEvent::SnapshotKept { id, steps })
                    {
                        cancel.store(true, Ordering::Relaxed);
                    }
                    if let TuneEvent::Progress(p) = event {
                        let sent = out.send(JobEvent::Progress {
                            id,
                            stage: Stage::Tuning,
                            step: p.step,
                            total: p.total_steps,
                            loss: Some(p.loss),
                        });
                        if !sent {
                            cancel.store(true, Ordering::Relaxed);
                        }
                        let rendered = p
                            .reconstruction
                            .as_ref()
                            .and_then(|latents| preview?.render(latents).ok());
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
                let reconstruct_every = preview.map(|_| RECONSTRUCT_EVERY_STEPS);
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
                    preview: self.preview.as_ref(),
                    cancel,
                };
                let result = edit_photo(&self.model, tuned, &request, &mut observer)?;
                Ok(Outcome::Edited {
                    result,
                    working_size: working.dimensions(),
                })
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
    preview: Option<&'a LatentPreview>,
    cancel: &'a AtomicBool,
}

impl StepObserver for EditObserver<'_> {
    fn observe(&mut self, view: &StepView) -> ControlFlow<()> {
        let sent = self.out.send(JobEvent::Progress {
            id: self.id,
            stage: Stage::Sampling,
            step: view.step,
            total: view.total_steps,
            loss: None,
        });
        if !sent {
            self.cancel.store(true, Ordering::Relaxed);
        }
        if let Some(image) = self.preview.and_then(|p| p.render(view.predicted_x0).ok()) {
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

    #[test]
    fn errors_become_one_line() {
        let result: Result<(), String> =
            guarded(|| Err(EngineError::InvalidRequest("bad\n  request".into())));
        assert_eq!(result.unwrap_err(), "bad request");
    }
}
