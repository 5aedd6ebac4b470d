//! The editor's UI frame time while a fine-tune and sampling jobs run on the engine thread,
//! against idle frames of the same run (the baseline). Not a timed test: it prints.
//!
//! `cargo bench --bench editor_frames`. The frames are the app's whole egui pass (events,
//! layout, tessellation) driven by egui_kittest, without GPU submission. The photo is a
//! 12-megapixel upscale of the fixture, as a phone photo would be: the results come back at
//! that size, which is what makes displaying them costly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use unitune::gui::{EditorApp, EditorOptions, Settings, StateFiles, SystemDialogs};
use unitune::jobs::{DeviceChoice, HubOptions, MicroBatch, ModelRequest, TrainingChoice};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// One frame: how long it took, and what the app was doing after it (to tell where the
/// slow frames happen).
struct Frame {
    time: Duration,
    state: String,
}

fn frame_times(
    harness: &mut Harness<'_, EditorApp>,
    until: impl Fn(&EditorApp) -> bool,
) -> Vec<Frame> {
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !until(harness.state()) && Instant::now() < deadline {
        let start = Instant::now();
        harness.step();
        let time = start.elapsed();
        let app = harness.state();
        let state = format!(
            "frame {}: photo {:?}, tune step {:?}, sampling step {:?}, {} variants shown",
            frames.len(),
            app.photo_size(),
            app.tune_step(),
            app.sampling_step(),
            app.finished_variants()
        );
        frames.push(Frame { time, state });
        // About 60 frames a second, as a real window would ask for.
        std::thread::sleep(Duration::from_millis(16).saturating_sub(time));
    }
    frames
}

/// Frames of mask work on the idle editor: the first stroke (which creates the overlay
/// texture at mask size), a drag across the photo, invert and clear (whole-mask updates),
/// then undo of everything, so the edit that follows runs without a mask.
fn paint_frames(harness: &mut Harness<'_, EditorApp>) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut timed = |harness: &mut Harness<'_, EditorApp>, state: &str| {
        let start = Instant::now();
        harness.step();
        frames.push(Frame {
            time: start.elapsed(),
            state: state.into(),
        });
        std::thread::sleep(Duration::from_millis(10));
    };
    harness.get_by_label("Brush (B)").click();
    timed(harness, "brush chosen");
    let canvas = harness.state().canvas_rect().unwrap();
    let start = canvas.center() - egui::vec2(canvas.width() * 0.3, 0.0);
    harness.drag_at(start);
    timed(harness, "first stroke begins");
    for i in 1..=40 {
        let x = canvas.width() * 0.6 * i as f32 / 40.0;
        let y = (i as f32 / 4.0).sin() * canvas.height() * 0.2;
        harness.hover_at(start + egui::vec2(x, y));
        timed(harness, "stroke");
    }
    harness.drop_at(start + egui::vec2(canvas.width() * 0.6, 0.0));
    timed(harness, "stroke ends");
    harness.get_by_label("Invert").click();
    timed(harness, "invert");
    harness.get_by_label("Clear").click();
    timed(harness, "clear");
    for _ in 0..3 {
        harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Z);
        timed(harness, "undo");
    }
    assert!(harness.state().mask_is_empty(), "undo took the mask back");
    frames
}

/// Median and worst frame time; sorts `frames` slowest last.
fn summary(frames: &mut [Frame]) -> (Duration, Duration) {
    frames.sort_by_key(|f| f.time);
    let median = frames[frames.len() / 2].time;
    let worst = frames.last().unwrap().time;
    (median, worst)
}

/// Width and height of the photo the bench edits (12 megapixels).
const PHOTO_SIZE: (u32, u32) = (4000, 3000);

fn main() {
    let state = tempfile::tempdir().unwrap();
    let photo_path = state.path().join("photo-12mp.png");
    let fixture = image::open(fixtures().join("photos/chelsea.png"))
        .unwrap()
        .to_rgb8();
    image::imageops::resize(
        &fixture,
        PHOTO_SIZE.0,
        PHOTO_SIZE.1,
        image::imageops::FilterType::Triangle,
    )
    .save(&photo_path)
    .unwrap();
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
        model: ModelRequest {
            device: DeviceChoice::Cpu,
            hub: HubOptions {
                offline: true,
                ..HubOptions::default()
            },
            hash_memo: None,
            ..ModelRequest::new(&fixtures().join("models/sd15-tiny").display().to_string())
        },
        precision_override: None,
        photo: Some(photo_path),
        state: StateFiles::new(state.path()),
        snapshot_cache: None,
        dialogs: Arc::new(SystemDialogs),
        tune: Some(TrainingChoice {
            snapshot_steps: vec![8, 16],
            batch_size: 2,
            micro_batch: MicroBatch::Fixed(2),
            ..TrainingChoice::default()
        }),
    };
    let mut harness = Harness::builder()
        .with_size([1280.0, 800.0])
        .build_eframe(move |cc| EditorApp::new(cc, options));
    let mut opening = frame_times(&mut harness, |app| {
        app.model_ready() && app.photo_size().is_some() && !app.is_busy()
    });

    let start = Instant::now();
    let mut idle = Vec::new();
    while start.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        harness.step();
        idle.push(Frame {
            time: t.elapsed(),
            state: "idle".into(),
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut painting = paint_frames(&mut harness);
    harness.state_mut().set_prompt("a cat wearing sunglasses");
    harness.state_mut().apply(unitune::gui::Command::Edit);
    let mut busy = frame_times(&mut harness, |app| !app.is_busy());
    let finished = harness.state().finished_variants();
    let (open_median, open_worst) = summary(&mut opening);
    let (idle_median, idle_worst) = summary(&mut idle);
    let frames = busy.len();
    let (busy_median, busy_worst) = summary(&mut busy);
    let (paint_median, paint_worst) = summary(&mut painting);
    println!(
        "editor frame time on {} cores (CPU, tiny model, {}x{} photo; {finished} variants, {frames} frames while jobs ran)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        PHOTO_SIZE.0,
        PHOTO_SIZE.1,
    );
    println!("  baseline, idle frames:  median {idle_median:?}, worst {idle_worst:?}");
    println!("  opening photo + model:  median {open_median:?}, worst {open_worst:?}");
    println!("  painting the mask:      median {paint_median:?}, worst {paint_worst:?}");
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
    println!("  slowest frames while opening (the first is egui's own start-up):");
    for frame in opening.iter().rev().take(3) {
        println!("    {:?} ({})", frame.time, frame.state);
    }
    println!("  slowest frames while painting:");
    for frame in painting.iter().rev().take(3) {
        println!("    {:?} ({})", frame.time, frame.state);
    }
    println!("  slowest frames while jobs ran:");
    for frame in busy.iter().rev().take(5) {
        println!("    {:?} ({})", frame.time, frame.state);
    }
}
