//! What the panels and shortcuts can ask for, and the one place it is applied:
//! [`EditorApp::apply`].

use std::path::PathBuf;

use egui::{Context, Key, KeyboardShortcut, Modifiers, Rect};

use super::app::EditorApp;
use super::canvas::Tool;
use crate::jobs::PreviewMode;

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
    /// A brush stroke ended.
    MaskChanged,
    SelectVariant(usize),
    Export,
    RetryExport,
    /// Ask where to write the current lora-mode fine-tune as a LoRA file.
    ExportLora,
    Undo,
    Redo,
    ClearMask,
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
    /// The live preview's kind changed.
    SetPreview(PreviewMode),
    DismissNotice,
    /// Use the offered recipe's prompt and settings for the next edit.
    UseRecipe,
    /// Open the image whose recipe is offered as the photo.
    OpenOfferedImage,
    ResetView,
    /// The prompt took the keyboard focus it was given.
    PromptFocused,
    /// Where the canvas was laid out this frame, in points.
    CanvasPlaced(Rect),
    ChooseTool(Tool),
    BrushSize(f32),
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
            Command::Open(path) => self.open_photo(path),
            Command::Edit => self.start_edit(),
            Command::Cancel => {
                self.cancel_all();
                self.model.cancel_download();
            }
            Command::MoreSeeds => self.more_seeds(),
            Command::SliderDragged => self.session.variants.follow_slider(),
            Command::MaskChanged => self.save_session_now(),
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
            Command::Export => self.export(),
            Command::RetryExport => self.retry_export(),
            Command::ExportLora => self.export_lora(),
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
            Command::SetPreview(mode) => self.set_preview(mode),
            Command::DismissNotice => {
                self.notice = None;
                self.recipe_offer = None;
            }
            Command::UseRecipe => self.use_offered_recipe(),
            Command::OpenOfferedImage => self.open_offered_image(),
            Command::ResetView => {
                self.view.zoom = 1.0;
                self.view.pan = egui::Vec2::ZERO;
            }
            Command::PromptFocused => self.focus_prompt = false,
            Command::CanvasPlaced(rect) => self.canvas_rect = Some(rect),
            Command::ChooseTool(tool) => self.view.tool = tool,
            Command::BrushSize(size) => self.settings.brush_size_px = size.clamp(2.0, 1024.0),
            Command::ShowCache => self.show_cache(),
            Command::HideCache => self.cache_window.open = false,
            Command::ConfirmClearCache(ask) => self.cache_window.confirm_clear = ask,
            Command::RemoveCacheEntry(key) => self.remove_cache_entry(key),
            Command::ClearCache => self.clear_cache(),
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
                commands.push(Command::BrushSize(brush_size_px / 1.25));
            }
            if i.key_pressed(Key::CloseBracket) {
                commands.push(Command::BrushSize(brush_size_px * 1.25));
            }
        });
    }
    commands
}
