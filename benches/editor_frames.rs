//! The editor's UI frame time while a fine-tune and sampling jobs run on the engine thread,
//! against idle frames of the same run (the baseline). Not a timed test: it prints.
//!
//! `cargo bench --bench editor_frames`. The frames are the app's whole egui pass (events,
//! layout, tessellation) driven by egui_kittest, without GPU submission.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use unitune::gui::{EditorApp, EditorOptions, Settings, StateFiles, SystemDialogs};
use unitune::jobs::{DeviceChoice, HubOptions, TuneSettings};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn frame_times(
    harness: &mut Harness<'_, EditorApp>,
    until: impl Fn(&EditorApp) -> bool,
) -> Vec<Duration> {
    let mut times = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !until(harness.state()) && Instant::now() < deadline {
        let start = Instant::now();
        harness.step();
        times.push(start.elapsed());
        // About 60 frames a second, as a real window would ask for.
        std::thread::sleep(Duration::from_millis(16).saturating_sub(start.elapsed()));
    }
    times
}

fn summary(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let median = times[times.len() / 2];
    let worst = *times.last().unwrap();
    (median, worst)
}

fn main() {
    let state = tempfile::tempdir().unwrap();
    let settings = Settings {
        sampling_steps: 30,
        ..Settings::default()
    };
    std::fs::write(
        state.path().join("settings.json"),
        serde_json::to_string(&settings).unwrap(),
    )
    .unwrap();
    let options = EditorOptions {
        model: fixtures().join("models/sd15-tiny").display().to_string(),
        device: DeviceChoice::Cpu,
        hub: HubOptions {
            offline: true,
            ..HubOptions::default()
        },
        photo: Some(fixtures().join("photos/chelsea.png")),
        state: StateFiles::new(state.path()),
        snapshot_cache: None,
        dialogs: Arc::new(SystemDialogs),
        tune: Some(TuneSettings {
            snapshot_steps: vec![8, 16],
            batch_size: 2,
            micro_batch_size: 2,
            ..TuneSettings::default()
        }),
    };
    let mut harness = Harness::builder()
        .with_size([1280.0, 800.0])
        .build_eframe(move |cc| EditorApp::new(cc, options));
    frame_times(&mut harness, |app| {
        app.model_ready() && app.photo_size().is_some() && !app.is_busy()
    });

    let start = Instant::now();
    let mut idle = Vec::new();
    while start.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        harness.step();
        idle.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    harness.state_mut().set_prompt("a cat wearing sunglasses");
    harness.state_mut().apply(unitune::gui::Command::Edit);
    let mut busy = frame_times(&mut harness, |app| !app.is_busy());
    let finished = harness.state().finished_variants();
    let (idle_median, idle_worst) = summary(&mut idle);
    let frames = busy.len();
    let (busy_median, busy_worst) = summary(&mut busy);
    println!(
        "editor frame time on {} cores (CPU, tiny model; {finished} variants, {frames} frames while jobs ran)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  baseline, idle frames:  median {idle_median:?}, worst {idle_worst:?}");
    println!("  while tuning+sampling:  median {busy_median:?}, worst {busy_worst:?}");
    println!(
        "  ratio to idle: median {:.2}x, worst {:.2}x; worst frame {} the 16 ms budget",
        busy_median.as_secs_f64() / idle_median.as_secs_f64(),
        busy_worst.as_secs_f64() / idle_worst.as_secs_f64(),
        if busy_worst <= Duration::from_millis(16) {
            "within"
        } else {
            "OVER"
        }
    );
}
