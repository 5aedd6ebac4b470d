//! The desktop editor driven through egui_kittest with the tiny fixture model on the CPU:
//! every flow of the editor end to end, plus PNG snapshots of its main states.
//!
//! Jobs run on real threads, so the harness is stepped with a deadline (`run()` would panic
//! while the editor keeps asking for repaints).

mod common;
#[path = "common/fake_hub.rs"]
mod fake_hub;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui::{Key, Modifiers, Pos2};
use egui_kittest::kittest::Queryable;
use egui_kittest::{Harness, SnapshotOptions};
use unitune::gui::{Command, EditorApp, EditorOptions, FileDialogs, Settings, StateFiles};
use unitune::jobs::{
    DeviceChoice, HubOptions, MicroBatch, ModelRequest, Precision, TrainingChoice,
};

/// Answers file dialogs with prepared paths.
#[derive(Default)]
struct ScriptedDialogs {
    save_path: Mutex<Option<PathBuf>>,
    model_folder: Mutex<Option<PathBuf>>,
    /// The open dialog panics, as a buggy system dialog library might.
    open_panics: AtomicBool,
}

impl FileDialogs for ScriptedDialogs {
    fn pick_photo(&self, _directory: Option<&Path>) -> Option<PathBuf> {
        assert!(
            !self.open_panics.load(Ordering::Relaxed),
            "the open dialog broke"
        );
        None
    }
    fn pick_save_path(&self, _directory: Option<&Path>, _file_name: &str) -> Option<PathBuf> {
        self.save_path.lock().unwrap().clone()
    }
    fn pick_model_folder(&self) -> Option<PathBuf> {
        self.model_folder.lock().unwrap().clone()
    }
    fn pick_model_file(&self) -> Option<PathBuf> {
        self.model_folder.lock().unwrap().clone()
    }
}

struct Setup {
    state: tempfile::TempDir,
    hub_cache: tempfile::TempDir,
    dialogs: Arc<ScriptedDialogs>,
}

impl Setup {
    /// A fresh state folder whose settings make edits quick on the CPU.
    fn new(sampling_steps: usize) -> Self {
        let state = tempfile::tempdir().unwrap();
        let settings = Settings {
            sampling_steps,
            ..Settings::default()
        };
        std::fs::write(
            state.path().join("settings.json"),
            serde_json::to_string(&settings).unwrap(),
        )
        .unwrap();
        Self {
            state,
            hub_cache: tempfile::tempdir().unwrap(),
            dialogs: Arc::new(ScriptedDialogs::default()),
        }
    }

    fn options(&self, photo: Option<PathBuf>) -> EditorOptions {
        EditorOptions {
            // Relative (tests run in the crate root): the model panel, whose width follows its
            // widest line, then looks the same in every checkout (an absolute path made the
            // snapshots depend on where the repository was cloned).
            model: ModelRequest {
                device: DeviceChoice::Cpu,
                hub: HubOptions {
                    offline: true,
                    cache_dir: Some(self.hub_cache.path().to_path_buf()),
                    ..HubOptions::default()
                },
                hash_memo: None,
                ..ModelRequest::new("./tests/fixtures/models/sd15-tiny")
            },
            precision_override: None,
            photo,
            state: StateFiles::new(self.state.path()),
            snapshot_cache: None,
            dialogs: self.dialogs.clone(),
            tune: Some(TrainingChoice {
                snapshot_steps: vec![1, 2],
                batch_size: 1,
                micro_batch: MicroBatch::Fixed(1),
                ..TrainingChoice::default()
            }),
        }
    }

    fn editor(&self, photo: Option<PathBuf>) -> Harness<'static, EditorApp> {
        let options = self.options(photo);
        Harness::builder()
            .with_size([1100.0, 760.0])
            .build_eframe(move |cc| EditorApp::new(cc, options))
    }
}

fn photo(name: &str) -> PathBuf {
    common::fixtures().join("photos").join(name)
}

/// Steps the editor until `done` holds, failing after `limit`.
fn step_until(
    harness: &mut Harness<'_, EditorApp>,
    limit: Duration,
    what: &str,
    done: impl Fn(&EditorApp) -> bool,
) {
    let deadline = Instant::now() + limit;
    while !done(harness.state()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; notice: {:?}",
            harness.state().notice_text()
        );
        harness.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    harness.step();
}

/// Steps until a button labelled `label` is shown (30 s at most).
fn wait_for_button(harness: &mut Harness<'_, EditorApp>, label: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while harness
        .query_by_role_and_label(Role::Button, label)
        .is_none()
    {
        assert!(Instant::now() < deadline, "no button {label:?} offered");
        harness.step();
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Steps until the editor shows a notice starting with `prefix` (30 s at most); returns it.
fn wait_for_notice(harness: &mut Harness<'_, EditorApp>, prefix: &str) -> String {
    step_until(harness, Duration::from_secs(30), prefix, |app| {
        app.notice_text().is_some_and(|t| t.starts_with(prefix))
    });
    harness.state().notice_text().unwrap().to_string()
}

fn ready_with_photo(harness: &mut Harness<'_, EditorApp>) {
    step_until(harness, Duration::from_secs(60), "model and photo", |app| {
        app.model_ready() && app.photo_size().is_some()
    });
}

/// A file as winit hands it over when dropped on the window.
#[derive(Debug)]
struct DroppedPath(PathBuf);

impl egui::DroppedFile for DroppedPath {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

fn drop_file(harness: &mut Harness<'_, EditorApp>, path: PathBuf) {
    harness
        .input_mut()
        .dropped_files
        .push(Arc::new(DroppedPath(path)));
}

fn type_prompt(harness: &mut Harness<'_, EditorApp>, prompt: &str) {
    type_into(harness, "What should the photo become?", prompt);
}

fn type_into(harness: &mut Harness<'_, EditorApp>, label: &str, text: &str) {
    harness
        .get_by_role_and_label(Role::TextInput, label)
        .click();
    harness.step();
    harness
        .get_by_role_and_label(Role::TextInput, label)
        .type_text(text);
    harness.step();
}

fn click_edit(harness: &mut Harness<'_, EditorApp>) {
    harness.get_by_role_and_label(Role::Button, "Edit").click();
    harness.step();
}

fn all_variants_done(app: &EditorApp) -> bool {
    app.finished_variants() >= 4 && !app.is_busy()
}

#[test]
fn opens_a_photo_given_at_start_and_a_dropped_one_and_refuses_a_broken_file() {
    let setup = Setup::new(2);
    let mut harness = setup.editor(Some(photo("chelsea.png")));
    ready_with_photo(&mut harness);
    assert_eq!(harness.state().photo_size(), Some((451, 300)));

    drop_file(&mut harness, photo("rocket.jpg"));
    step_until(
        &mut harness,
        Duration::from_secs(30),
        "the dropped photo",
        |app| app.photo_size() == Some((640, 427)),
    );

    let broken = setup.state.path().join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    drop_file(&mut harness, broken);
    let notice = wait_for_notice(&mut harness, "Could not open");
    assert_eq!(
        harness.state().photo_size(),
        Some((640, 427)),
        "the open photo stays"
    );
    assert!(!notice.contains('\n'), "{notice}");
}

#[test]
fn a_panic_in_a_background_task_is_a_message_and_the_editor_goes_on() {
    let setup = Setup::new(2);
    let mut harness = setup.editor(Some(photo("chelsea.png")));
    ready_with_photo(&mut harness);
    setup.dialogs.open_panics.store(true, Ordering::Relaxed);
    harness.state_mut().apply(Command::OpenDialog);
    let notice = wait_for_notice(&mut harness, "Something went wrong in the file dialog");
    assert!(notice.contains("the open dialog broke"), "{notice}");
    assert_eq!(harness.state().photo_size(), Some((451, 300)), "work kept");

    // Still alive: a dropped photo opens.
    drop_file(&mut harness, photo("rocket.jpg"));
    step_until(
        &mut harness,
        Duration::from_secs(30),
        "the dropped photo",
        |app| app.photo_size() == Some((640, 427)),
    );
}

#[test]
fn edit_streams_variants_and_the_slider_browses_them_then_export_keeps_the_recipe() {
    let setup = Setup::new(2);
    let mut harness = setup.editor(Some(photo("chelsea.png")));
    ready_with_photo(&mut harness);

    // Nothing typed: a clear message, no job.
    click_edit(&mut harness);
    assert!(
        harness
            .state()
            .notice_text()
            .unwrap()
            .contains("Type what the photo")
    );
    assert!(!harness.state().is_busy());

    type_prompt(&mut harness, "a cat wearing sunglasses");
    harness.key_press(Key::Enter);
    harness.step();
    assert!(
        harness.state().is_busy(),
        "Enter in the prompt starts the edit"
    );
    step_until(
        &mut harness,
        Duration::from_secs(240),
        "four variants",
        all_variants_done,
    );
    let (first, settings) = harness.state().shown_variant().unwrap();
    assert_eq!(
        settings.fidelity(),
        Some(0.5),
        "the slider's position comes first"
    );

    // Drag the slider to the far left: the fidelity-0 variant shows at once.
    let slider = harness
        .get_by_role_and_label(Role::Slider, "Fidelity")
        .rect();
    harness.drag_at(slider.center());
    harness.step();
    let left = Pos2::new(slider.left() + 1.0, slider.center().y);
    harness.hover_at(left);
    harness.step();
    let (during, settings) = harness.state().shown_variant().unwrap();
    assert_ne!(during, first);
    assert_eq!(settings.fidelity(), Some(0.0));
    harness.drop_at(left);
    harness.step();
    assert!(
        !harness.state().is_busy(),
        "a computed position queues nothing"
    );

    // Release on a position not computed yet: exactly one new variant.
    let quarter = Pos2::new(slider.left() + slider.width() * 0.25, slider.center().y);
    harness.drag_at(quarter);
    harness.step();
    harness.drop_at(quarter);
    harness.step();
    step_until(
        &mut harness,
        Duration::from_secs(120),
        "the new variant",
        |app| app.finished_variants() == 5 && !app.is_busy(),
    );

    // Export with Ctrl+S to the path the dialog gives; the recipe is in the PNG.
    let out = setup.state.path().join("exported.png");
    *setup.dialogs.save_path.lock().unwrap() = Some(out.clone());
    harness.key_press_modifiers(Modifiers::COMMAND, Key::S);
    step_until(&mut harness, Duration::from_secs(30), "the export", |app| {
        app.last_export().is_some()
    });
    let recipe = common::png_recipe(&out);
    assert_eq!(recipe["prompt"], "a cat wearing sunglasses");
    assert_eq!(recipe["model_prompt"], "beikkpic a cat wearing sunglasses");
    assert_eq!(recipe["width"], 451);
    assert!(recipe["tuning"]["snapshot_steps"].is_array());
    let image = image::open(&out).unwrap();
    assert_eq!((image.width(), image.height()), (451, 300));
    // The photo and the model by name only: no folder of this machine in a shared file.
    assert_eq!(recipe["source_image"], "chelsea.png");
    assert_eq!(recipe["model"], "sd15-tiny");
    let bytes = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
    assert!(!bytes.contains(&common::fixtures().display().to_string()));
    assert!(!bytes.contains("tests/fixtures"));

    // The exported PNG dropped on the window offers its recipe, and leaves the photo open.
    type_prompt(&mut harness, " and a hat");
    drop_file(&mut harness, out.clone());
    step_until(
        &mut harness,
        Duration::from_secs(30),
        "the recipe offer",
        |app| app.recipe_offered(),
    );
    assert_eq!(harness.state().photo_size(), Some((451, 300)));
    harness
        .get_by_role_and_label(Role::Button, "Use its prompt and settings")
        .click();
    harness.step();
    assert_eq!(harness.state().prompt(), "a cat wearing sunglasses");
    assert!(!harness.state().recipe_offered());

    // A folder that cannot be written: one sentence, and the result stays to try again.
    let missing = setup.state.path().join("no-such-folder").join("x.png");
    *setup.dialogs.save_path.lock().unwrap() = Some(missing);
    harness.key_press_modifiers(Modifiers::COMMAND, Key::S);
    wait_for_notice(&mut harness, "Export failed");
    assert!(harness.state().shown_variant().is_some());
    harness.get_by_role_and_label(Role::Button, "Try again");
}

#[test]
fn escape_cancels_a_running_edit_within_a_step() {
    let setup = Setup::new(400);
    let mut harness = setup.editor(Some(photo("chelsea.png")));
    ready_with_photo(&mut harness);
    type_prompt(&mut harness, "pixel art");
    click_edit(&mut harness);
    step_until(
        &mut harness,
        Duration::from_secs(120),
        "sampling to start",
        |app| app.sampling_step().is_some_and(|s| s >= 1),
    );
    harness.key_press(Key::Escape);
    step_until(&mut harness, Duration::from_secs(30), "the cancel", |app| {
        !app.is_busy()
    });
    assert_eq!(harness.state().finished_variants(), 0);
}

#[test]
fn a_brush_stroke_paints_the_mask_and_undo_redo_take_it_back() {
    let setup = Setup::new(2);
    let mut harness = setup.editor(Some(photo("chelsea.png")));
    ready_with_photo(&mut harness);
    harness.get_by_label("Brush (B)").click();
    harness.step();
    let canvas = harness.state().canvas_rect().unwrap();
    let start = canvas.center();
    let end = start + egui::vec2(60.0, 20.0);
    harness.drag_at(start);
    harness.step();
    harness.hover_at(end);
    harness.step();
    harness.drop_at(end);
    harness.step();
    harness.step();
    assert!(
        !harness.state().mask_is_empty(),
        "the stroke painted the mask"
    );
    harness.key_press_modifiers(Modifiers::COMMAND, Key::Z);
    harness.step();
    assert!(harness.state().mask_is_empty(), "undo removed the stroke");
    harness.key_press_modifiers(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z);
    harness.step();
    assert!(!harness.state().mask_is_empty(), "redo brought it back");
}

#[test]
fn autosaved_work_comes_back_after_a_restart() {
    let setup = Setup::new(2);
    {
        let mut harness = setup.editor(Some(photo("chelsea.png")));
        ready_with_photo(&mut harness);
        type_prompt(&mut harness, "the house is blue");
        harness.state_mut().flush_autosave();
        // Dropped without a clean exit, as a crash would.
    }
    let mut harness = setup.editor(None);
    step_until(
        &mut harness,
        Duration::from_secs(60),
        "the restore",
        |app| app.photo_size().is_some(),
    );
    assert_eq!(harness.state().photo_size(), Some((451, 300)));
    assert_eq!(harness.state().prompt(), "the house is blue");
}

#[test]
fn a_missing_model_is_offered_for_download_and_then_loads() {
    let hub = fake_hub::FakeHub::start(vec![fake_hub::FakeRepo::from_folder(
        "tiny/sd15",
        &common::model_dir("sd15-tiny"),
    )]);
    let setup = Setup::new(2);
    let mut options = setup.options(None);
    options.model.model = "tiny/sd15".into();
    options.model.hub = hub.options(setup.hub_cache.path());
    let mut harness = Harness::builder()
        .with_size([1100.0, 760.0])
        .build_eframe(move |cc| EditorApp::new(cc, options));
    wait_for_button(&mut harness, "Accept license and download");
    assert!(!harness.state().model_ready());
    assert!(
        hub.log().is_empty(),
        "nothing is downloaded before the user agrees"
    );
    // Through accesskit, not the pointer: a pointer click lands where the button was in the
    // last frame, and once in CI it reached the demo model's button below it instead (the
    // demo loaded, no file was downloaded).
    harness
        .get_by_role_and_label(Role::Button, "Accept license and download")
        .click_accesskit();
    step_until(
        &mut harness,
        Duration::from_secs(60),
        "the downloaded model",
        |app| app.model_ready(),
    );
    assert_eq!(
        harness
            .state()
            .model_summary()
            .map(|s| s.identity.name.as_str()),
        Some("tiny/sd15"),
        "the downloaded model, not another one, is loaded"
    );
    assert!(!hub.resolved_files("tiny/sd15").is_empty());
}

/// SD 1.5, missing, offers SDXL beside it; switching shows SDXL's license and size, fetches
/// nothing until accepted, and then loads SDXL (the tiny one, served as SDXL base).
#[test]
fn the_model_panel_offers_sdxl_beside_sd15_with_its_license_first() {
    let hub = fake_hub::FakeHub::start(vec![fake_hub::FakeRepo::from_folder(
        unitune::jobs::SDXL_MODEL,
        &common::model_dir("sdxl-tiny"),
    )]);
    let setup = Setup::new(2);
    let mut options = setup.options(None);
    options.model.model = unitune::jobs::DEFAULT_MODEL.into();
    options.model.hub = hub.options(setup.hub_cache.path());
    let mut harness = Harness::builder()
        .with_size([1100.0, 760.0])
        .build_eframe(move |cc| EditorApp::new(cc, options));
    wait_for_button(&mut harness, "Use Stable Diffusion XL");
    assert!(
        harness.query_by_label_contains("about 2.1 GB").is_some(),
        "SD 1.5's own download is offered beside it"
    );
    harness
        .get_by_role_and_label(Role::Button, "Use Stable Diffusion XL")
        .click_accesskit();
    wait_for_button(&mut harness, "Use Stable Diffusion 1.5");
    assert!(harness.query_by_label_contains("about 7.0 GB").is_some());
    assert!(
        harness
            .query_by_label_contains("License (read before downloading)")
            .is_some()
    );
    assert!(
        hub.log().is_empty(),
        "nothing is fetched before the user agrees"
    );
    harness
        .get_by_label_contains("Accept license and download")
        .click_accesskit();
    step_until(
        &mut harness,
        Duration::from_secs(60),
        "SDXL downloaded and loaded",
        |app| app.model_ready(),
    );
    let summary = harness.state().model_summary().unwrap();
    assert_eq!(summary.identity.name, unitune::jobs::SDXL_MODEL);
    assert!(!hub.resolved_files(unitune::jobs::SDXL_MODEL).is_empty());
}

#[test]
fn the_demo_model_loads_offline_opens_a_scene_and_edits_it() {
    // No model on the machine, and no network.
    let setup = Setup::new(2);
    let mut options = setup.options(None);
    options.model.model = "tiny/not-downloaded".into();
    let mut harness = Harness::builder()
        .with_size([1100.0, 760.0])
        .build_eframe(move |cc| EditorApp::new(cc, options));
    wait_for_button(&mut harness, "Demo model (offline)");
    harness
        .get_by_role_and_label(Role::Button, "Demo model (offline)")
        .click();
    step_until(
        &mut harness,
        Duration::from_secs(60),
        "the demo model and its scene",
        |app| app.model_ready() && app.photo_size().is_some() && !app.is_busy(),
    );
    // A whole edit at once: a scene of its world is open and an edit is typed in.
    assert_eq!(harness.state().photo_size(), Some((64, 64)));
    assert_eq!(harness.state().prompt(), unitune::world::EXAMPLE_PROMPT);
    assert!(
        harness
            .query_by_label_contains("fidelity table demo")
            .is_some(),
        "the demo model's own fidelity table is used"
    );
    harness.snapshot_options("editor_demo_model", &tolerant(0));
    assert!(harness.state().mask_is_empty());
    click_edit(&mut harness);
    step_until(
        &mut harness,
        Duration::from_secs(240),
        "the demo edit's variants",
        all_variants_done,
    );
    let (_, settings) = harness.state().shown_variant().unwrap();
    let table = unitune::engine::fidelity::DEMO.parameters_for(0.5, &[1, 2]);
    assert_eq!(
        (settings.plan.t0_fraction, settings.plan.guidance_weight),
        (Some(table.t0_fraction), table.guidance_weight)
    );

    // The automatic region (on by default): with nothing painted, the first result's
    // region fills the mask layer, where it can be touched up.
    assert!(
        !harness.state().mask_is_empty(),
        "the automatic region is shown in the mask layer"
    );
    // Unticked, the untouched region goes too: the next edit may change the whole photo.
    harness
        .get_by_label("Change only what the prompt names")
        .click();
    harness.step();
    assert!(harness.state().mask_is_empty());
}

/// Snapshot tolerance: the CPU's float rounding may move a few result pixels by one level,
/// and the fine-tuning state shows a live step count, loss, time left and reconstruction
/// (which step the snapshot catches varies), so it allows about one small preview's area.
fn tolerant(max_failed_pixels: usize) -> SnapshotOptions {
    SnapshotOptions::new().max_failed_pixels(max_failed_pixels)
}

#[test]
fn snapshots_of_the_main_states() {
    let setup = Setup::new(2);
    let mut options = setup.options(None);
    options.tune = Some(TrainingChoice {
        snapshot_steps: vec![1, 2, 60],
        batch_size: 1,
        micro_batch: MicroBatch::Fixed(1),
        ..TrainingChoice::default()
    });
    let mut harness = Harness::builder()
        .with_size([1100.0, 760.0])
        .build_eframe(move |cc| EditorApp::new(cc, options));
    step_until(&mut harness, Duration::from_secs(60), "the model", |app| {
        app.model_ready() && !app.is_busy()
    });
    harness.snapshot_options("editor_empty", &tolerant(0));

    drop_file(&mut harness, photo("chelsea.png"));
    step_until(&mut harness, Duration::from_secs(30), "the photo", |app| {
        app.photo_size().is_some()
    });
    harness.snapshot_options("editor_photo_loaded", &tolerant(0));

    // A fixed seed, typed into Advanced, so the strip reads the same every run.
    harness.get_by_label("Advanced").click();
    harness.step();
    let seed = harness.get_by_role_and_label(Role::TextInput, "Seed (empty = random)");
    seed.click();
    harness.step();
    harness
        .get_by_role_and_label(Role::TextInput, "Seed (empty = random)")
        .type_text("7");
    harness.step();
    harness.get_by_label("Advanced").click();
    harness.step();

    type_prompt(&mut harness, "a cat wearing sunglasses");
    click_edit(&mut harness);
    step_until(
        &mut harness,
        Duration::from_secs(120),
        "fine-tuning",
        |app| app.tune_step().is_some_and(|s| s >= 8),
    );
    harness.snapshot_options("editor_fine_tuning", &tolerant(20_000));

    step_until(
        &mut harness,
        Duration::from_secs(600),
        "the variants",
        all_variants_done,
    );
    harness.snapshot_options("editor_results", &tolerant(2000));

    harness.get_by_label("Brush (B)").click();
    harness.step();
    let canvas = harness.state().canvas_rect().unwrap();
    harness.drag_at(canvas.center());
    harness.step();
    harness.hover_at(canvas.center() + egui::vec2(80.0, 30.0));
    harness.step();
    harness.drop_at(canvas.center() + egui::vec2(80.0, 30.0));
    harness.step();
    harness.step();
    harness.snapshot_options("editor_mask_painting", &tolerant(2000));
}

/// Writes a smooth test photo of `width` x `height` into the state folder.
fn write_photo(setup: &Setup, name: &str, width: u32, height: u32) -> PathBuf {
    let path = setup.state.path().join(name);
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 90])
    })
    .save(&path)
    .unwrap();
    path
}

/// Issue 11: open requests raced: the slower decode won, and the first to finish ended the
/// other's "opening". The newest request must win whichever decode finishes first.
#[test]
fn the_newest_photo_opened_wins_whichever_decode_finishes_first() {
    let setup = Setup::new(2);
    let big = write_photo(&setup, "big.png", 5000, 3500);
    let mut harness = setup.editor(Some(photo("chelsea.png")));
    ready_with_photo(&mut harness);

    // The small photo first, the big one second: the small one decodes first, but the big
    // one was asked for last. Until it is open the editor stays "opening".
    drop_file(&mut harness, photo("rocket.jpg"));
    harness.step();
    drop_file(&mut harness, big.clone());
    harness.step();
    let started = Instant::now();
    while harness.state().photo_size() != Some((5000, 3500)) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the big photo never opened"
        );
        assert_ne!(
            harness.state().photo_size(),
            Some((640, 427)),
            "an older request replaced the photo"
        );
        assert!(
            harness.state().is_busy(),
            "the newer photo is still opening"
        );
        harness.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    let big_decode = started.elapsed();

    // The big photo first, the small one second: the big decode finishes last, and must not
    // replace the small photo.
    drop_file(&mut harness, big);
    harness.step();
    drop_file(&mut harness, photo("rocket.jpg"));
    step_until(
        &mut harness,
        Duration::from_secs(30),
        "the small photo",
        |app| app.photo_size() == Some((640, 427)) && !app.is_busy(),
    );
    let waited = Instant::now();
    while waited.elapsed() < big_decode * 3 + Duration::from_secs(1) {
        harness.step();
        assert_eq!(
            harness.state().photo_size(),
            Some((640, 427)),
            "the older, slower decode replaced the newer photo"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Names and sizes of the textures the editor holds for variants' full views (not their
/// thumbnails).
fn variant_display_textures(harness: &Harness<'_, EditorApp>) -> Vec<(String, [usize; 2])> {
    let manager = harness.ctx.tex_manager();
    let manager = manager.read();
    manager
        .allocated()
        .filter(|(_, meta)| meta.name.starts_with("variant-") && !meta.name.ends_with("thumbnail"))
        .map(|(_, meta)| (meta.name.clone(), meta.size))
        .collect()
}

/// PNG files under `dir` (recursively) with their sizes.
fn png_sizes(dir: &Path) -> Vec<(u32, u32)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sizes = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sizes.extend(png_sizes(&path));
        } else if path.extension().is_some_and(|e| e == "png") {
            sizes.push(image::image_dimensions(&path).unwrap());
        }
    }
    sizes
}

/// Issue 11: every "More seeds" variant kept a full-resolution image and a full texture, so a
/// long session grew without bound. Full results now live in the state folder, a few
/// display textures stay, and export still writes the full-resolution result.
#[test]
fn many_variants_keep_a_bounded_working_set_and_export_the_full_result() {
    let setup = Setup::new(2);
    // Larger than a result's display copy, so the export shows it reads the full result.
    let (width, height) = (2600, 1730);
    let wide = write_photo(&setup, "wide.png", width, height);
    let mut harness = setup.editor(Some(wide));
    ready_with_photo(&mut harness);
    type_prompt(&mut harness, "a cat wearing sunglasses");
    click_edit(&mut harness);
    step_until(
        &mut harness,
        Duration::from_secs(300),
        "four variants",
        all_variants_done,
    );
    for round in 1..=3 {
        harness.state_mut().apply(Command::MoreSeeds);
        step_until(
            &mut harness,
            Duration::from_secs(300),
            "more seeds",
            |app| app.finished_variants() == 4 + 2 * round && !app.is_busy(),
        );
    }

    let displays = variant_display_textures(&harness);
    assert!(
        displays.len() <= 4,
        "10 variants keep {} full textures: {displays:?}",
        displays.len()
    );
    assert!(
        displays.iter().all(|(_, [w, h])| *w.max(h) <= 2048),
        "display copies are downscaled: {displays:?}"
    );
    let kept = png_sizes(&setup.state.path().join("results"));
    assert_eq!(
        kept.iter().filter(|s| **s == (width, height)).count(),
        10,
        "every result is kept at full size in the state folder: {kept:?}"
    );

    // The first variant's display was dropped; showing it reads it back from disk.
    harness.state_mut().apply(Command::SelectVariant(0));
    let (first, _) = harness.state().shown_variant().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !variant_display_textures(&harness)
        .iter()
        .any(|(name, _)| *name == format!("variant-{first}"))
    {
        assert!(Instant::now() < deadline, "the display was not read back");
        harness.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(variant_display_textures(&harness).len() <= 4);

    let out = setup.state.path().join("exported.png");
    *setup.dialogs.save_path.lock().unwrap() = Some(out.clone());
    harness.state_mut().apply(Command::Export);
    step_until(&mut harness, Duration::from_secs(60), "the export", |app| {
        app.last_export().is_some()
    });
    assert_eq!(
        image::image_dimensions(&out).unwrap(),
        (width, height),
        "the export is the full-resolution result"
    );
}

/// Issue 11 (item 3): the snapshot cache in the editor's menu: listed with sizes and photos
/// off the UI thread, one entry removed, then all cleared after a confirmation.
#[test]
fn the_cache_window_lists_removes_and_clears_snapshot_cache_entries() {
    let setup = Setup::new(2);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = unitune::jobs::SnapshotCache::new(cache_dir.path());
    let tuned_photo = image::RgbImage::from_pixel(64, 48, image::Rgb([200, 40, 40]));
    for key in ["first", "second"] {
        let dir = cache.entry_dir(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("16.safetensors"), vec![0u8; 3000]).unwrap();
        cache.store_thumbnail(key, &tuned_photo);
    }
    let mut options = setup.options(Some(photo("chelsea.png")));
    options.snapshot_cache = Some(cache.clone());
    let mut harness = Harness::builder()
        .with_size([1100.0, 760.0])
        .build_eframe(move |cc| EditorApp::new(cc, options));
    ready_with_photo(&mut harness);

    harness.get_by_label("File").click();
    for _ in 0..3 {
        // The menu opens over a frame or two.
        harness.step();
    }
    harness.get_by_label("Snapshot cache...").click();
    step_until(
        &mut harness,
        Duration::from_secs(30),
        "the listing",
        |app| !app.cache_busy() && app.cache_keys().len() == 2,
    );
    assert!(
        harness.query_by_label_contains("allowed").is_some(),
        "the total is shown against the cap"
    );
    harness.get_all_by_label("Remove").next().unwrap().click();
    step_until(
        &mut harness,
        Duration::from_secs(30),
        "the removal",
        |app| !app.cache_busy() && app.cache_keys().len() == 1,
    );
    assert_eq!(cache.entries().len(), 1, "removed from disk");

    harness.get_by_label("Clear all...").click();
    harness.step();
    harness.step();
    assert_eq!(
        cache.entries().len(),
        1,
        "nothing is cleared before the confirmation"
    );
    harness.get_by_label("Yes, clear all").click();
    step_until(&mut harness, Duration::from_secs(30), "the clear", |app| {
        !app.cache_busy() && app.cache_keys().is_empty()
    });
    assert!(cache.entries().is_empty());
}

#[test]
fn a_lora_applies_to_the_loaded_model_and_file_export_lora_writes_the_lora_fine_tune() {
    let setup = Setup::new(2);
    // The training mode is a setting of the editor (Advanced).
    let settings = Settings {
        sampling_steps: 2,
        train_mode: unitune::engine::finetune::TrainMode::Lora { rank: 2 },
        ..Settings::default()
    };
    std::fs::write(
        setup.state.path().join("settings.json"),
        serde_json::to_string(&settings).unwrap(),
    )
    .unwrap();
    let lora = common::fixtures().join("models/sd15-tiny-lora.safetensors");
    let mut options = setup.options(Some(photo("chelsea.png")));
    options.model.loras = vec![unitune::model_files::LoraChoice {
        path: lora,
        weight: 0.8,
    }];
    let mut harness = Harness::builder()
        .with_size([1100.0, 760.0])
        .build_eframe(move |cc| EditorApp::new(cc, options));
    ready_with_photo(&mut harness);
    harness.get_by_label("with LoRA sd15-tiny-lora.safetensors at 0.8");

    // Nothing is tuned yet: the menu item is off and the command says why.
    harness.state_mut().apply(Command::ExportLora);
    harness.step();
    assert!(
        harness
            .state()
            .notice_text()
            .unwrap()
            .contains("lora training mode"),
        "{:?}",
        harness.state().notice_text()
    );

    type_prompt(&mut harness, "a cat wearing sunglasses");
    click_edit(&mut harness);
    step_until(
        &mut harness,
        Duration::from_secs(300),
        "four variants",
        all_variants_done,
    );
    let out = setup.state.path().join("photo-lora.safetensors");
    *setup.dialogs.save_path.lock().unwrap() = Some(out.clone());
    harness.state_mut().apply(Command::ExportLora);
    let notice = wait_for_notice(&mut harness, "LoRA written to");
    assert!(notice.contains("photo-lora.safetensors"), "{notice}");
    let (layers, metadata) = unitune::engine::lora::read_kohya_file(&out).unwrap();
    assert!(layers.iter().all(|l| l.rank() == 2 && l.alpha == Some(2.0)));
    assert_eq!(metadata["ss_network_module"], "networks.lora");
    assert!(metadata["unitune.recipe"].contains("sd15-tiny-lora.safetensors"));
    // The same metadata as the command line's, and no folder of this machine in it.
    let recipe: serde_json::Value = serde_json::from_str(&metadata["unitune.recipe"]).unwrap();
    assert_eq!(recipe["source_image"], "chelsea.png");
    assert_eq!(recipe["precision"], "f32");
    assert!(recipe["working_width"].is_number() && recipe["model_hash"].is_string());
    let bytes = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
    assert!(
        !bytes.contains("tests/fixtures"),
        "a folder in the LoRA's metadata"
    );
}

/// Issue 21: every global flag reaches the editor (`unitune --precision f16` used to load
/// in the saved precision), and its model panel says which are in effect.
#[test]
fn the_global_flags_reach_the_editor_which_loads_in_f16_and_says_so() {
    use clap::Parser;
    let cli = unitune::cli::Cli::parse_from([
        "unitune",
        "--precision",
        "f16",
        "--device",
        "cpu",
        "--offline",
        "--prediction-type",
        "epsilon",
    ]);
    let options = unitune::cli::editor_options(&cli.global, None).unwrap();
    assert_eq!(options.precision_override, Some(Precision::F16));
    assert_eq!(options.model.device, DeviceChoice::Cpu);
    assert!(options.model.hub.offline);
    assert!(options.model.prediction_type.is_some());

    let setup = Setup::new(2);
    let options = EditorOptions {
        precision_override: Some(Precision::F16),
        ..setup.options(None)
    };
    let mut harness = Harness::builder()
        .with_size([1100.0, 760.0])
        .build_eframe(move |cc| EditorApp::new(cc, options));
    step_until(&mut harness, Duration::from_secs(60), "the model", |app| {
        app.model_ready()
    });
    assert_eq!(harness.state().model_summary().unwrap().precision, "f16");
    assert!(
        harness.query_by_label_contains("--precision f16").is_some(),
        "the model panel names the flag"
    );
}

/// Issue 12 (item 4): with an InstructPix2Pix model the edit box takes an instruction, no
/// fine-tune runs, the slider's variants differ in image guidance, and the export says so.
#[test]
fn an_instruct_model_edits_by_instruction_without_learning_the_photo() {
    let setup = Setup::new(2);
    let mut options = setup.options(None);
    // Under the crate root and named relatively when possible, so the snapshot's model line
    // reads the same on every machine.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("editor-instruct");
    let _ = std::fs::remove_dir_all(&target);
    let model = common::instruct_model_dir(&target);
    options.model.model = match model.strip_prefix(env!("CARGO_MANIFEST_DIR")) {
        Ok(relative) => format!("./{}", relative.display()),
        Err(_) => model.display().to_string(),
    };
    options.photo = Some(photo("chelsea.png"));
    let mut harness = Harness::builder()
        .with_size([1100.0, 760.0])
        .build_eframe(move |cc| EditorApp::new(cc, options));
    ready_with_photo(&mut harness);

    harness.get_by_label("Advanced").click();
    harness.step();
    type_into(&mut harness, "Seed (empty = random)", "7");
    harness.get_by_label("Advanced").click();
    harness.step();
    type_into(
        &mut harness,
        "How should the photo change?",
        "make it winter",
    );
    click_edit(&mut harness);
    step_until(
        &mut harness,
        Duration::from_secs(240),
        "four variants",
        |app| {
            assert!(
                app.tune_step().is_none(),
                "an instruction needs no fine-tune"
            );
            all_variants_done(app)
        },
    );
    let (_, settings) = harness.state().shown_variant().unwrap();
    assert_eq!(
        settings.plan.method,
        unitune::jobs::EditMethod::Instruct {
            image_guidance: 1.5
        },
        "the slider's middle is the published image guidance"
    );
    harness.snapshot_options("editor_instruct_results", &tolerant(2000));

    let out = setup.state.path().join("winter.png");
    *setup.dialogs.save_path.lock().unwrap() = Some(out.clone());
    harness.key_press_modifiers(Modifiers::COMMAND, Key::S);
    step_until(&mut harness, Duration::from_secs(30), "the export", |app| {
        app.last_export().is_some()
    });
    let recipe = common::png_recipe(&out);
    assert_eq!(recipe["method"], "instruct-pix2pix");
    assert_eq!(recipe["model_prompt"], "make it winter");
    assert_eq!(recipe["image_guidance"], 1.5);
    assert!(recipe["t0_fraction"].is_null() && recipe["tuning"].is_null());
}

#[test]
fn a_checkpoint_file_dropped_or_chosen_loads_and_the_model_panel_shows_its_family() {
    let setup = Setup::new(2);
    let mut harness = setup.editor(None);
    step_until(&mut harness, Duration::from_secs(60), "the model", |app| {
        app.model_ready() && !app.is_busy()
    });
    // Dropped on the window (the model panel included): a .safetensors file is a model.
    // Relative, so the model line reads the same on every machine.
    drop_file(
        &mut harness,
        PathBuf::from("./tests/fixtures/models/sd2-ckpt-tiny.safetensors"),
    );
    harness.step();
    step_until(
        &mut harness,
        Duration::from_secs(60),
        "the checkpoint",
        |app| app.model_ready() && !app.is_busy(),
    );
    assert!(
        harness.state().photo_size().is_none(),
        "not opened as a photo"
    );
    assert!(
        harness
            .query_by_label_contains("SD 2.x (OpenCLIP text encoder), text-to-image")
            .is_some(),
        "the detected family is shown"
    );
    harness.snapshot_options("editor_single_file", &tolerant(0));

    // The file dialog of the model panel.
    *setup.dialogs.model_folder.lock().unwrap() =
        Some(common::model_dir("sd15-ckpt-tiny.safetensors"));
    harness
        .get_by_role_and_label(Role::Button, "Checkpoint file...")
        .click();
    // The dialog answers on a background thread, then the model loads.
    let deadline = Instant::now() + Duration::from_secs(60);
    while harness
        .query_by_label_contains("SD 1.x (CLIP text encoder)")
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the chosen checkpoint did not load"
        );
        harness.step();
        std::thread::sleep(Duration::from_millis(5));
    }
}
