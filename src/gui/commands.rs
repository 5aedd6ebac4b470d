//! What the panels, the canvas and the shortcuts can ask for, and the one place it is
//! applied: [`EditorApp::apply`]. The panels edit only the form in place; every other change
//! comes through here.

use std::path::PathBuf;

use egui::{Context, Key, KeyboardShortcut, Modifiers, Rect};

use super::app::EditorApp;
use super::background::CacheChange;
use super::canvas::{Tool, View};
use super::limits;
use crate::jobs::{Precision, PreviewMode, TrainMode};

/// Everything the panels can ask for; applied in [`EditorApp::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    OpenDialog,
    Open(PathBuf),
    Edit,
    Cancel,
    MoreSeeds,
    /// The slider moves: show the nearest finished variant, start nothing.
    SliderDragged,
    /// The slider was released (or set by keyboard) at this position.
    SliderReleased,
    SelectVariant(usize),
    Export,
    RetryExport,
    /// Ask where to write the current lora-mode fine-tune as a LoRA file.
    ExportLora,
    /// Paint (or erase) the mask up to this point, in mask pixels; starts a stroke.
    PaintTo {
        x: f32,
        y: f32,
    },
    /// The brush was lifted: the stroke becomes one undo step and is autosaved.
    EndStroke,
    Undo,
    Redo,
    ClearMask,
    /// Show an edit's automatic region in the mask layer (white = may change).
    ShowRegion(image::GrayImage),
    /// Whether an edit with nothing painted finds its region from the prompt.
    SetAutoRegion(bool),
    InvertMask,
    DownloadModel,
    CancelDownload,
    ChooseModelFolder,
    /// Load another model by hub id or folder (downloads wait for the user's consent).
    SwitchModel(String),
    /// Open the file dialog for a single-file `.safetensors` checkpoint.
    ChooseModelFile,
    /// Load this single-file checkpoint (dropped on the window).
    LoadModelFile(PathBuf),
    RetryModel,
    /// The compute precision chosen in Advanced (the model loads again in it).
    SetPrecision(Precision),
    /// The live preview's kind changed.
    SetPreview(PreviewMode),
    SetTrainMode(TrainMode),
    /// Photos per fine-tuning pass: `auto` or a number.
    SetMicroBatch(String),
    SetSamplingSteps(usize),
    SetInterpolate(bool),
    DismissNotice,
    /// Use the offered recipe's prompt and settings for the next edit.
    UseRecipe,
    /// Open the image whose recipe is offered as the photo.
    OpenOfferedImage,
    /// The canvas was zoomed, panned, or its split line moved; the mask shown or hidden.
    SetView(View),
    ResetView,
    /// The prompt took the keyboard focus it was given.
    PromptFocused,
    /// Where the canvas was laid out this frame, in points.
    CanvasPlaced(Rect),
    ChooseTool(Tool),
    BrushSize(f32),
    BrushSoftness(f32),
    MaskOpacity(f32),
    /// Open the snapshot cache window (which lists the cache in the background).
    ShowCache,
    HideCache,
    /// Remove one snapshot cache entry, by key.
    RemoveCacheEntry(String),
    /// Ask (true) or stop asking (false) whether to remove every snapshot cache entry.
    ConfirmClearCache(bool),
    /// Remove every snapshot cache entry (after the user confirmed).
    ClearCache,
}

impl EditorApp {
    pub fn apply(&mut self, command: Command) {
        match command {
            Command::OpenDialog => {
                let dir = self
                    .settings
                    .recent_files
                    .first()
                    .and_then(|p| p.parent().map(PathBuf::from));
                self.chores.pick_photo(dir);
            }
            Command::Open(path) => {
                let request = self.opening.start();
                self.chores.open_photo(request, path);
            }
            Command::Edit => self.start_edit(),
            Command::Cancel => {
                if let Some(runner) = &self.model.runner {
                    self.session.cancel_all(runner);
                }
                self.model.cancel_download();
            }
            Command::MoreSeeds => self.more_seeds(),
            Command::SliderDragged => self.session.variants.follow_slider(),
            Command::SliderReleased => self.slider_released(),
            Command::SelectVariant(index) => {
                self.session.variants.select(index);
                if let Some(f) = self
                    .session
                    .variants
                    .variants()
                    .get(index)
                    .and_then(|v| v.settings.fidelity())
                {
                    self.form.fidelity = f;
                }
            }
            Command::Export => {
                let started = self.exports.start(
                    &self.session,
                    self.doc.as_ref(),
                    self.form.fidelity,
                    &self.chores,
                );
                if let Err(message) = started {
                    self.error(message);
                }
            }
            Command::RetryExport => self.exports.retry(&self.chores),
            Command::ExportLora => self.ask_where_to_export_lora(),
            Command::PaintTo { x, y } => {
                let brush = self.brush();
                if let Some(doc) = &mut self.doc {
                    if doc.mask.is_stroking() {
                        doc.mask.stroke_to(x, y, &brush);
                    } else {
                        doc.mask.begin_stroke(x, y, &brush);
                    }
                }
            }
            Command::EndStroke => {
                if self.doc.as_mut().is_some_and(|d| d.mask.end_stroke()) {
                    self.save_session_now();
                }
            }
            Command::Undo | Command::Redo | Command::ClearMask | Command::InvertMask => {
                if let Some(doc) = &mut self.doc {
                    match command {
                        Command::Undo => doc.mask.undo(),
                        Command::Redo => doc.mask.redo(),
                        Command::ClearMask => {
                            doc.mask.clear();
                            true
                        }
                        _ => {
                            doc.mask.invert();
                            true
                        }
                    };
                    self.save_session_now();
                }
            }
            Command::DownloadModel => {
                let model = self.model.name();
                self.load_model(model, true);
            }
            Command::CancelDownload => self.model.cancel_download(),
            Command::ChooseModelFolder => self.chores.pick_model_folder(),
            Command::SwitchModel(model) => self.load_model(model, false),
            Command::ChooseModelFile => self.chores.pick_model_file(),
            Command::LoadModelFile(path) => self.load_model(path.display().to_string(), false),
            Command::RetryModel => {
                let model = self.model.name();
                self.load_model(model, false);
            }
            Command::SetPrecision(precision) => {
                // The user's choice now, over `--precision`; the weights are converted when
                // loaded, so the model loads again.
                self.settings.precision = precision.as_str().to_owned();
                self.options.precision_override = None;
                let model = self.model.name();
                self.load_model(model, false);
            }
            Command::SetPreview(mode) => self.set_preview(mode),
            Command::SetTrainMode(mode) => self.settings.train_mode = mode,
            Command::SetMicroBatch(micro) => self.settings.micro_batch = micro,
            Command::SetSamplingSteps(steps) => {
                self.settings.sampling_steps = steps.clamp(
                    *limits::SAMPLING_STEPS.start(),
                    *limits::SAMPLING_STEPS.end(),
                )
            }
            Command::SetInterpolate(on) => self.settings.interpolate = on,
            Command::SetAutoRegion(on) => {
                self.settings.auto_region = on;
                // An automatic region nobody touched goes with it: the layer shows what the
                // next edit uses.
                if let Some(doc) = &mut self.doc
                    && !on
                    && doc.mask.is_estimate()
                {
                    doc.mask.clear();
                    self.save_session_now();
                }
            }
            Command::ShowRegion(region) => {
                if let Some(doc) = &mut self.doc {
                    doc.mask.show_estimate(&region);
                    self.view.show_mask = true;
                    self.save_session_now();
                }
            }
            Command::DismissNotice => {
                self.notice = None;
                self.recipe_offer = None;
            }
            Command::UseRecipe => self.use_offered_recipe(),
            Command::OpenOfferedImage => self.open_offered_image(),
            Command::SetView(view) => self.view = view,
            Command::ResetView => {
                self.view.zoom = 1.0;
                self.view.pan = egui::Vec2::ZERO;
            }
            Command::PromptFocused => self.focus_prompt = false,
            Command::CanvasPlaced(rect) => self.canvas_rect = Some(rect),
            Command::ChooseTool(tool) => self.view.tool = tool,
            Command::BrushSize(size) => {
                self.settings.brush_size_px =
                    size.clamp(*limits::BRUSH_SIZE_PX.start(), *limits::BRUSH_SIZE_PX.end())
            }
            Command::BrushSoftness(softness) => {
                self.settings.brush_softness =
                    softness.clamp(*limits::FRACTION.start(), *limits::FRACTION.end())
            }
            Command::MaskOpacity(opacity) => {
                self.settings.mask_opacity =
                    opacity.clamp(*limits::FRACTION.start(), *limits::FRACTION.end())
            }
            Command::ShowCache => self
                .cache_window
                .show_cache(self.options.snapshot_cache.as_ref(), &self.chores),
            Command::HideCache => self.cache_window.open = false,
            Command::ConfirmClearCache(ask) => self.cache_window.confirm_clear = ask,
            Command::RemoveCacheEntry(key) => self.cache_window.change(
                CacheChange::Remove(key),
                self.options.snapshot_cache.as_ref(),
                &self.chores,
            ),
            Command::ClearCache => self.cache_window.change(
                CacheChange::Clear,
                self.options.snapshot_cache.as_ref(),
                &self.chores,
            ),
        }
    }
}

/// The keyboard shortcuts pressed this frame, as commands.
pub fn shortcuts(ctx: &Context, brush_size_px: f32) -> Vec<Command> {
    let mut commands = Vec::new();
    let shortcut = |m: Modifiers, k: Key| KeyboardShortcut::new(m, k);
    ctx.input_mut(|i| {
        if i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::O)) {
            commands.push(Command::OpenDialog);
        }
        if i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::S)) {
            commands.push(Command::Export);
        }
        if i.consume_shortcut(&shortcut(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z))
            || i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::Y))
        {
            commands.push(Command::Redo);
        }
        if i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::Z)) {
            commands.push(Command::Undo);
        }
        if i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::Enter)) {
            commands.push(Command::Edit);
        }
        if i.consume_shortcut(&shortcut(Modifiers::COMMAND, Key::Num0)) {
            commands.push(Command::ResetView);
        }
        if i.consume_key(Modifiers::NONE, Key::Escape) {
            commands.push(Command::Cancel);
        }
    });
    // Single keys only while no text field has the keyboard.
    if !ctx.egui_wants_keyboard_input() {
        ctx.input(|i| {
            for (key, tool) in [
                (Key::B, Tool::Brush),
                (Key::E, Tool::Eraser),
                (Key::V, Tool::Move),
            ] {
                if i.key_pressed(key) {
                    commands.push(Command::ChooseTool(tool));
                }
            }
            if i.key_pressed(Key::OpenBracket) {
                commands.push(Command::BrushSize(brush_size_px / limits::BRUSH_STEP));
            }
            if i.key_pressed(Key::CloseBracket) {
                commands.push(Command::BrushSize(brush_size_px * limits::BRUSH_STEP));
            }
        });
    }
    commands
}
