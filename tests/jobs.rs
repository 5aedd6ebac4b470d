//! The worker layer on the tiny fixture model: edits stream progress and previews and finish,
//! cancelling and superseding stop jobs within a step, bad requests fail with one line, and
//! the waker is called. Every wait is bounded by a deadline.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use image::{GrayImage, Luma, RgbImage};
use unitune::jobs::{
    EditKnobs, EditSpec, JobEvent, JobId, JobRequest, JobRunner, PreviewMode, RunnerOptions, Stage,
    TrainMode, TuneSettings, Waker, WorkingSize,
};

const DEADLINE: Duration = Duration::from_secs(120);

fn start_runner() -> (JobRunner, Arc<AtomicUsize>) {
    let wakes = Arc::new(AtomicUsize::new(0));
    let counter = wakes.clone();
    let runner = start_runner_with(Box::new(move || {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    (runner, wakes)
}

fn start_runner_with(waker: Waker) -> JobRunner {
    let options = RunnerOptions {
        preview_seed: 0,
        preview: PreviewMode::Fast,
        tiny_preview: None,
    };
    JobRunner::start(common::load_service("sd15-tiny"), options, waker)
        .expect("worker thread starts")
}

fn photo() -> RgbImage {
    RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, 128])
    })
}

fn edit(prompt: &str, t0_fraction: f64, sampling_steps: usize) -> JobRequest {
    JobRequest::Edit(EditSpec {
        knobs: EditKnobs {
            tune_steps: Some(0),
            t0_fraction: Some(t0_fraction),
            // 1 = no guidance: one UNet call per step keeps the tests quick.
            guidance_weight: Some(1.0),
            ..EditKnobs::default()
        },
        sampling_steps,
        seed: 1,
        size: WorkingSize::Requested(64, 64),
        ..EditSpec::new(Arc::new(photo()), prompt)
    })
}

/// `request` (an edit) sampled from the snapshot after `steps` fine-tuning steps.
fn with_tune_steps(mut request: JobRequest, steps: usize) -> JobRequest {
    if let JobRequest::Edit(spec) = &mut request {
        spec.knobs.tune_steps = Some(steps);
    }
    request
}

/// Every event until each of `ids` has ended; panics at the deadline.
fn events_until_done(runner: &JobRunner, ids: &[JobId]) -> Vec<JobEvent> {
    let deadline = Instant::now() + DEADLINE;
    let mut events = Vec::new();
    let mut open: Vec<JobId> = ids.to_vec();
    while !open.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "jobs {open:?} did not end; events: {events:?}"
        );
        if let Some(event) = runner.next_event_timeout(left.min(Duration::from_millis(200))) {
            if event.is_final() {
                open.retain(|&id| id != event.id());
            }
            events.push(event);
        }
    }
    events
}

fn final_event(events: &[JobEvent], id: JobId) -> &JobEvent {
    events
        .iter()
        .find(|e| e.id() == id && e.is_final())
        .expect("job ended")
}

fn sampling_steps_seen(events: &[JobEvent], id: JobId) -> Vec<usize> {
    events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Progress {
                id: i,
                stage: Stage::Sampling,
                step,
                ..
            } if *i == id => Some(*step),
            _ => None,
        })
        .collect()
}

#[test]
fn an_edit_streams_progress_and_previews_then_finishes() {
    let (mut runner, wakes) = start_runner();
    let start = Instant::now();
    let id = runner.submit(edit("a red apple", 0.5, 6)).unwrap();
    let events = events_until_done(&runner, &[id]);
    println!(
        "edit of 3 steps (with the preview fit): {:.2} s",
        start.elapsed().as_secs_f64()
    );

    match final_event(&events, id) {
        JobEvent::Finished { result, .. } => assert_eq!(result.dimensions(), (32, 32)),
        other => panic!("expected Finished, got {other:?}"),
    }
    // t0 = 0.5 of 6 steps runs the last 3. Progress is the latest step (a reader that falls
    // behind skips steps), so: increasing, up to the last.
    let steps = sampling_steps_seen(&events, id);
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&3), "{steps:?}");
    let previews: Vec<&RgbImage> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Preview { id: i, image } if *i == id => Some(image),
            _ => None,
        })
        .collect();
    assert!(!previews.is_empty(), "no preview arrived");
    // The fixture's VAE is small: its previews are its own decode, at the 64 x 64 working
    // size (a large VAE's fast preview is one pixel per latent).
    assert_eq!(previews[0].dimensions(), (64, 64));
    assert!(
        !matches!(events.last(), Some(JobEvent::Preview { .. })),
        "a preview came after the job ended"
    );
    // The worker wakes the UI after each send, so the last wake may trail the last event.
    let deadline = Instant::now() + Duration::from_secs(5);
    while wakes.load(Ordering::Relaxed) < events.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        wakes.load(Ordering::Relaxed) >= events.len(),
        "the waker was called {} times for {} events",
        wakes.load(Ordering::Relaxed),
        events.len()
    );
}

/// A waker that holds the worker after each event until the test has read it, so the test
/// knows exactly which step the worker has just finished when it cancels: "within one step"
/// can then be asserted as exactly that.
struct Lockstep {
    woke: crossbeam_channel::Receiver<()>,
    go: crossbeam_channel::Sender<()>,
}

/// A runner in lockstep with the test. Declare the runner first, so the `Lockstep` drops
/// first and releases the worker for good.
fn start_lockstep_runner() -> (JobRunner, Lockstep) {
    let (woke_tx, woke) = crossbeam_channel::bounded::<()>(0);
    let (go, go_rx) = crossbeam_channel::bounded::<()>(0);
    let runner = start_runner_with(Box::new(move || {
        if woke_tx.send(()).is_ok() {
            let _ = go_rx.recv();
        }
    }));
    (runner, Lockstep { woke, go })
}

impl Lockstep {
    /// Every event until job `id` ends; `cancel_after(event)` true cancels the job while the
    /// worker is held right after sending that event.
    fn run(
        &self,
        runner: &JobRunner,
        id: JobId,
        mut cancel_after: impl FnMut(&JobEvent) -> bool,
    ) -> Vec<JobEvent> {
        let mut events = Vec::new();
        loop {
            self.woke
                .recv_timeout(DEADLINE)
                .unwrap_or_else(|_| panic!("job {id} stalled; events: {events:?}"));
            let mut ended = false;
            while let Some(event) = runner.try_next_event() {
                if event.id() == id && cancel_after(&event) {
                    runner.cancel(id);
                }
                ended |= event.id() == id && event.is_final();
                events.push(event);
            }
            let _ = self.go.send(());
            if ended {
                return events;
            }
        }
    }
}

#[test]
fn cancel_stops_a_running_edit_within_one_step() {
    let (mut runner, lockstep) = start_lockstep_runner();
    let id = runner.submit(edit("a red apple", 1.0, 200)).unwrap();
    let events = lockstep.run(&runner, id, |event| {
        matches!(event, JobEvent::Progress { step: 2, .. })
    });
    assert!(matches!(
        final_event(&events, id),
        JobEvent::Cancelled { .. }
    ));
    assert_eq!(
        sampling_steps_seen(&events, id),
        [1, 2],
        "a step ran after the cancel"
    );
}

fn tune_request(snapshot_steps: &[usize]) -> JobRequest {
    JobRequest::Tune {
        photo: Arc::new(photo()),
        settings: TuneSettings {
            mode: TrainMode::CrossKv,
            snapshot_steps: snapshot_steps.to_vec(),
            batch_size: 1,
            micro_batch_size: 1,
            optimizer: unitune::engine::optim::OptimizerSettings {
                learning_rate: 1e-2,
                ..Default::default()
            },
            ..TuneSettings::default()
        },
        size: WorkingSize::Requested(64, 64),
    }
}

fn edit_after(tune_steps: usize) -> JobRequest {
    with_tune_steps(edit("a red apple", 0.5, 4), tune_steps)
}

fn result_of(runner: &mut JobRunner, request: JobRequest) -> Result<RgbImage, String> {
    let id = runner.submit(request).unwrap();
    match final_event(&events_until_done(runner, &[id]), id).clone() {
        JobEvent::Finished { result, .. } => Ok(result),
        JobEvent::Failed { message, .. } => Err(message),
        other => panic!("expected an edit's result, got {other:?}"),
    }
}

/// A tune cancelled after step 3 of 4: no fourth step; the snapshot after 2 steps was
/// reported and stays editable; an edit without fine-tuning gets the base weights, not the
/// half-trained ones.
#[test]
fn a_cancelled_tune_restores_the_base_weights_and_keeps_its_snapshots_editable() {
    let mut untouched = start_runner().0;
    let base_result = result_of(&mut untouched, edit_after(0)).unwrap();

    let (mut runner, lockstep) = start_lockstep_runner();
    let tune = runner.submit(tune_request(&[2, 4])).unwrap();
    let events = lockstep.run(&runner, tune, |event| {
        matches!(
            event,
            JobEvent::Progress {
                stage: Stage::Tuning,
                step: 3,
                ..
            }
        )
    });
    drop(lockstep);
    assert!(matches!(
        final_event(&events, tune),
        JobEvent::Cancelled { .. }
    ));
    let steps: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Progress { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, [1, 2, 3], "a step ran after the cancel");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, JobEvent::SnapshotKept { steps: 2, .. })),
        "{events:?}"
    );

    assert!(
        result_of(&mut runner, edit_after(0)).unwrap() == base_result,
        "an edit without fine-tuning used half-trained weights"
    );
    let tuned = result_of(&mut runner, edit_after(2)).expect("the kept snapshot is editable");
    assert!(tuned != base_result, "the kept snapshot changed nothing");
    let missing = result_of(&mut runner, edit_after(4)).unwrap_err();
    assert!(missing.contains("[2]"), "{missing}");
}

#[test]
fn a_cancelled_edit_gives_way_to_the_next_in_the_queue() {
    let (mut runner, _) = start_runner();
    let older = runner.submit(edit("a red apple", 1.0, 200)).unwrap();
    let newer = runner.submit(edit("a green pear", 0.5, 4)).unwrap();
    assert!(newer > older);
    runner.cancel(older);
    let events = events_until_done(&runner, &[older, newer]);
    assert!(
        matches!(final_event(&events, older), JobEvent::Cancelled { .. }),
        "{:?}",
        final_event(&events, older)
    );
    assert!(matches!(
        final_event(&events, newer),
        JobEvent::Finished { .. }
    ));
    assert!(sampling_steps_seen(&events, older).len() < 20);
}

#[test]
fn a_bad_request_fails_with_one_line_and_the_runner_goes_on() {
    let (mut runner, _) = start_runner();
    let bad = runner.submit(edit("   ", 0.5, 4)).unwrap();
    let events = events_until_done(&runner, &[bad]);
    match final_event(&events, bad) {
        JobEvent::Failed { message, .. } => {
            assert!(message.contains("prompt"), "{message}");
            assert!(!message.contains('\n'), "{message}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // Fine-tuning steps without a tune: refused, not a panic.
    let untuned = with_tune_steps(edit("a red apple", 0.5, 4), 2);
    let untuned = runner.submit(untuned).unwrap();
    let events = events_until_done(&runner, &[untuned]);
    assert!(
        matches!(final_event(&events, untuned), JobEvent::Failed { message, .. } if message.contains("tune it first"))
    );

    let good = runner.submit(edit("a red apple", 0.5, 4)).unwrap();
    let events = events_until_done(&runner, &[good]);
    assert!(matches!(
        final_event(&events, good),
        JobEvent::Finished { .. }
    ));
}

#[test]
fn a_tune_reports_its_loss_and_its_snapshots_serve_later_edits() {
    let (mut runner, _) = start_runner();
    let settings = TuneSettings {
        mode: TrainMode::CrossKv,
        snapshot_steps: vec![2],
        batch_size: 1,
        micro_batch_size: 1,
        ..TuneSettings::default()
    };
    let tune = runner
        .submit(JobRequest::Tune {
            photo: Arc::new(photo()),
            settings,
            size: WorkingSize::Requested(64, 64),
        })
        .unwrap();
    let tuned_edit = with_tune_steps(edit("a red apple", 0.5, 4), 2);
    let edit_id = runner.submit(tuned_edit).unwrap();
    let events = events_until_done(&runner, &[tune, edit_id]);
    let losses: Vec<f32> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Progress {
                stage: Stage::Tuning,
                loss,
                ..
            } => *loss,
            _ => None,
        })
        .collect();
    // One per step, unless the reader fell behind (progress is the latest step).
    assert!((1..=2).contains(&losses.len()), "{losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(matches!(
        final_event(&events, tune),
        JobEvent::Tuned { snapshot_steps, from_cache: false, .. } if snapshot_steps == &[2]
    ));
    assert!(matches!(
        final_event(&events, edit_id),
        JobEvent::Finished { .. }
    ));
}

/// Sends on its channel when dropped.
struct DropSignal(crossbeam_channel::Sender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

#[test]
fn stopping_in_the_background_returns_while_a_step_runs_and_then_frees_the_worker() {
    // The waker holds the worker inside its first step until `release` is dropped, so a
    // stop that waited for the step would never return.
    let (release, held) = crossbeam_channel::bounded::<()>(0);
    let (entered_tx, entered) = crossbeam_channel::bounded::<()>(1);
    let (freed_tx, freed) = crossbeam_channel::bounded::<()>(1);
    let signal = DropSignal(freed_tx);
    let mut runner = start_runner_with(Box::new(move || {
        let _ = &signal; // dropped with the worker's outbox
        let _ = entered_tx.try_send(());
        let _ = held.recv();
    }));
    runner.submit(edit("a red apple", 1.0, 50)).unwrap();
    entered
        .recv_timeout(DEADLINE)
        .expect("the edit reached its first step");

    let (returned_tx, returned) = crossbeam_channel::bounded::<()>(1);
    std::thread::spawn(move || {
        runner.stop_in_background();
        let _ = returned_tx.send(());
    });
    returned
        .recv_timeout(DEADLINE)
        .expect("stop_in_background returned while the worker was held in a step");
    assert!(
        freed.try_recv().is_err(),
        "the worker cannot have ended while held"
    );

    drop(release);
    freed
        .recv_timeout(DEADLINE)
        .expect("after the step the worker stopped and was freed");
}

#[test]
fn a_small_mask_is_scaled_to_the_photo_and_each_mask_keeps_its_own_scaling() {
    let (mut runner, _) = start_runner();
    // 16 x 16 masks for the 32 x 32 photo: the worker scales them (and reuses the scaling
    // for the variants that share one mask).
    let left = Arc::new(GrayImage::from_fn(16, 16, |x, _| {
        Luma([if x < 8 { 255 } else { 0 }])
    }));
    let right = Arc::new(GrayImage::from_fn(16, 16, |x, _| {
        Luma([if x < 8 { 0 } else { 255 }])
    }));
    let masked = |mask: &Arc<GrayImage>| {
        let mut request = edit("a red apple", 1.0, 3);
        if let JobRequest::Edit(spec) = &mut request {
            spec.region = unitune::service::Region::Mask {
                mask: mask.clone(),
                name: "painted".to_owned(),
            };
        }
        request
    };
    let ids = [
        runner.submit(masked(&left)).unwrap(),
        runner.submit(masked(&left)).unwrap(),
        runner.submit(masked(&right)).unwrap(),
    ];
    let events = events_until_done(&runner, &ids);
    let result = |id| match final_event(&events, id) {
        JobEvent::Finished { result, .. } => result.clone(),
        other => panic!("expected Finished, got {other:?}"),
    };
    let (first, again, flipped) = (result(ids[0]), result(ids[1]), result(ids[2]));
    assert_eq!(first, again, "the same mask and seed give the same pixels");

    // Beyond the mask edge (x = 16) plus the feather radius (2 px at this size), plus a
    // pixel for the scaling's blur, the photo is untouched.
    let original = photo();
    let unchanged = |image: &RgbImage, xs: std::ops::Range<u32>| {
        xs.flat_map(|x| (0..32).map(move |y| (x, y)))
            .all(|(x, y)| image.get_pixel(x, y) == original.get_pixel(x, y))
    };
    assert!(
        unchanged(&first, 20..32),
        "the left mask kept the right side"
    );
    assert!(
        unchanged(&flipped, 0..12),
        "the right mask kept the left side"
    );
    assert!(
        !unchanged(&first, 0..12),
        "the left mask changed the left side"
    );
    assert!(
        !unchanged(&flipped, 20..32),
        "the right mask changed the right side"
    );
}

/// Issue 11: progress is state, so a UI that stops reading (a busy or minimised window) must
/// not stall the worker. The edit sends more progress than the event queue holds (256), and
/// nothing is read until the worker has gone quiet. (The outbox's unit tests check the same
/// in milliseconds; 270 sampling steps take minutes in a debug build.)
#[test]
#[ignore = "minutes in a debug build: cargo test --test jobs -- --ignored"]
fn an_edit_with_more_steps_than_the_event_queue_finishes_while_nobody_reads() {
    let wakes = Arc::new(AtomicUsize::new(0));
    let counter = wakes.clone();
    let mut runner = start_runner_with(Box::new(move || {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    let steps = 270;
    let id = runner.submit(edit("a red apple", 1.0, steps)).unwrap();

    // Wait, reading nothing, until the worker has woken the UI for every step's progress and
    // preview and for the end (it sent everything), or has gone quiet for long (it is stuck
    // waiting for room). 270 steps take minutes on a busy CPU.
    let deadline = Instant::now() + 5 * DEADLINE;
    let mut last = (0, Instant::now());
    loop {
        assert!(
            Instant::now() < deadline,
            "the worker never finished nor stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
        let now = wakes.load(Ordering::Relaxed);
        if now > 2 * steps {
            break;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            break;
        }
    }

    // The job's end is the first thing the UI reads, not the backlog of its steps.
    let first = runner
        .next_event_timeout(Duration::from_secs(1))
        .expect("an event");
    assert!(
        matches!(first, JobEvent::Finished { id: i, .. } if i == id),
        "the edit finished on its own; first event: {first:?}"
    );
    let rest: Vec<JobEvent> = std::iter::from_fn(|| runner.try_next_event()).collect();
    assert!(
        sampling_steps_seen(&rest, id).is_empty(),
        "no progress after the end"
    );
}
