//! The editor's layout: menu bar, notice line, side panel (model, prompt, slider, mask,
//! Advanced), variant strip, canvas and the snapshot cache window. Panels read the app (what
//! they display) and edit the form in place ([`EditForm`]); every other change they ask for is
//! a [`Command`] the app applies in one place.

use egui::{Color32, ProgressBar, RichText, Ui};

use super::app::{EditorApp, NoticeKind};
use super::cache_window;
use super::canvas::{self, Picture, Tool};
use super::commands::Command;
use super::form::{EditForm, ladder_text};
use super::limits;
use super::model::ModelStatus;
use super::session::TuneStatus;
use super::variants::VariantState;
use crate::jobs::{
    DEFAULT_INSTRUCT_MODEL, DEFAULT_MODEL, DEMO_MODEL, Precision, PreviewMode, SDXL_MODEL,
    TrainMode, approximate_download_bytes, license_notice, parse_model_arg, suggests_sdxl,
};
use crate::world;

pub fn show(ui: &mut Ui, app: &EditorApp, form: &mut EditForm) -> Vec<Command> {
    let mut commands = Vec::new();
    egui::Panel::top("menu").show(ui, |ui| menu_bar(ui, app, form, &mut commands));
    if let Some(notice) = app.notice.clone() {
        egui::Panel::top("notice").show(ui, |ui| {
            ui.horizontal(|ui| {
                let color = match notice.kind {
                    NoticeKind::Error => ui.visuals().error_fg_color,
                    NoticeKind::Info => ui.visuals().text_color(),
                };
                ui.label(RichText::new(&notice.text).color(color));
                if app.exports.failed.is_some() && ui.button("Try again").clicked() {
                    commands.push(Command::RetryExport);
                }
                if let Some(offer) = &app.recipe_offer {
                    if ui
                        .button("Use its prompt and settings")
                        .on_hover_text(format!("The recipe {} was made with", offer.name))
                        .clicked()
                    {
                        commands.push(Command::UseRecipe);
                    }
                    if offer.image.is_some() && ui.button("Open it as the photo").clicked() {
                        commands.push(Command::OpenOfferedImage);
                    }
                }
                if ui.small_button("Dismiss").clicked() {
                    commands.push(Command::DismissNotice);
                }
            });
        });
    }
    egui::Panel::left("controls")
        .resizable(true)
        .default_size(320.0)
        .min_size(260.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| side_panel(ui, app, form, &mut commands));
        });
    if !app.session.variants.is_empty() {
        egui::Panel::bottom("strip")
            .resizable(false)
            .exact_size(210.0)
            .show(ui, |ui| strip(ui, app, form.fidelity, &mut commands));
    }
    egui::CentralPanel::default().show(ui, |ui| central(ui, app, form.fidelity, &mut commands));
    cache_window::show(ui.ctx(), &app.cache_window, &mut commands);
    commands
}

fn menu_bar(ui: &mut Ui, app: &EditorApp, form: &EditForm, commands: &mut Vec<Command>) {
    egui::MenuBar::new().ui(ui, |ui| {
        ui.menu_button("File", |ui| {
            if ui.button("Open...  (Ctrl+O)").clicked() {
                commands.push(Command::OpenDialog);
            }
            ui.menu_button("Open recent", |ui| {
                if app.settings.recent_files.is_empty() {
                    ui.label("No recent files");
                }
                for path in app.settings.recent_files.clone() {
                    if ui.button(path.display().to_string()).clicked() {
                        commands.push(Command::Open(path));
                    }
                }
            });
            if ui.button("Export...  (Ctrl+S)").clicked() {
                commands.push(Command::Export);
            }
            let lora_tuned = app.session.lora_export_steps(form.fidelity).is_some();
            if ui
                .add_enabled(lora_tuned, egui::Button::new("Export LoRA..."))
                .on_hover_text(
                    "The fine-tune as a LoRA file for AUTOMATIC1111, ComfyUI and diffusers",
                )
                .on_disabled_hover_text("Fine-tune with the lora training mode (Advanced) first")
                .clicked()
            {
                commands.push(Command::ExportLora);
            }
            ui.separator();
            if ui
                .button("Snapshot cache...")
                .on_hover_text("The fine-tunes kept on disk: sizes, photos, remove")
                .clicked()
            {
                commands.push(Command::ShowCache);
            }
        });
        ui.menu_button("Mask", |ui| {
            if ui.button("Undo stroke  (Ctrl+Z)").clicked() {
                commands.push(Command::Undo);
            }
            if ui.button("Redo stroke  (Ctrl+Shift+Z)").clicked() {
                commands.push(Command::Redo);
            }
            if ui.button("Clear mask").clicked() {
                commands.push(Command::ClearMask);
            }
            if ui.button("Invert mask").clicked() {
                commands.push(Command::InvertMask);
            }
        });
        ui.menu_button("Help", |ui| {
            ui.label("Keyboard shortcuts");
            ui.label("Enter in the prompt or Ctrl+Enter: Edit");
            ui.label("Esc: cancel · Ctrl+S: export · Ctrl+O: open");
            ui.label("Hold Space: show the original");
            ui.label("B brush · E eraser · V move · [ ] brush size");
            ui.label("Ctrl+Z / Ctrl+Shift+Z: undo / redo stroke · Ctrl+0: fit");
            ui.separator();
            ui.label(crate::build_info::describe());
        });
    });
}

fn side_panel(ui: &mut Ui, app: &EditorApp, form: &mut EditForm, commands: &mut Vec<Command>) {
    model_section(ui, app, commands);
    ui.separator();

    ui.heading("Edit");
    // An InstructPix2Pix model takes instructions; the others a description of the result.
    let (question, example) = if app.model.is_instruct() {
        ("How should the photo change?", "make it winter")
    } else if app.model.is_demo() {
        ("What should the photo become?", world::EXAMPLE_PROMPT)
    } else {
        ("What should the photo become?", "a cat wearing sunglasses")
    };
    let label = ui.label(question);
    let prompt = ui.add(
        egui::TextEdit::singleline(&mut form.prompt)
            .hint_text(example)
            .desired_width(f32::INFINITY),
    );
    let prompt = prompt.labelled_by(label.id);
    if app.focus_prompt {
        prompt.request_focus();
        // egui lets go of widget focus while the window itself lacks the keyboard (a window
        // that is focused only after it shows, as under Xvfb or some window managers), so the
        // request stands until a frame where the window has it.
        if ui.input(|i| i.focused) {
            commands.push(Command::PromptFocused);
        }
    }
    if prompt.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
        commands.push(Command::Edit);
    }
    let busy = app.session.is_running();
    ui.horizontal(|ui| {
        if ui.button(RichText::new("Edit").strong()).clicked() {
            commands.push(Command::Edit);
        }
        if ui
            .add_enabled(busy, egui::Button::new("Cancel"))
            .on_hover_text("Esc")
            .clicked()
        {
            commands.push(Command::Cancel);
        }
        if ui
            .add_enabled(app.session.edit.is_some(), egui::Button::new("More seeds"))
            .clicked()
        {
            commands.push(Command::MoreSeeds);
        }
    });
    progress_section(ui, app);

    ui.add_space(6.0);
    let slider = ui.add(
        egui::Slider::new(&mut form.fidelity, limits::FIDELITY)
            .text("Fidelity")
            .fixed_decimals(2),
    );
    ui.horizontal(|ui| {
        ui.small("more change");
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            ui.small("closer to the photo")
        });
    });
    if slider.drag_stopped() || (slider.changed() && !slider.dragged()) {
        commands.push(Command::SliderReleased);
    } else if slider.dragged() {
        // While dragging, the nearest finished variant shows (no job yet).
        commands.push(Command::SliderDragged);
    }
    if let Some((_, variant)) = app.session.variants.shown(form.fidelity) {
        ui.small(format!("Showing: {}", variant.settings.describe()));
    }
    ui.horizontal(|ui| {
        let mut split = app.view.split.is_some();
        if ui
            .checkbox(&mut split, "Split before/after")
            .on_hover_text("Drag the line on the picture; hold Space to see the original")
            .changed()
        {
            commands.push(Command::SetView(canvas::View {
                split: split.then_some(0.5),
                ..app.view.clone()
            }));
        }
    });

    ui.separator();
    mask_section(ui, app, commands);
    ui.separator();
    advanced_section(ui, app, form, commands);
}

fn model_section(ui: &mut Ui, app: &EditorApp, commands: &mut Vec<Command>) {
    ui.heading("Model");
    match &app.model.status {
        ModelStatus::Ready { summary, flags, .. } => {
            let identity = &summary.identity;
            ui.label(identity.name.as_str()).on_hover_text(format!(
                "Model hash {} (as AUTOMATIC1111 and civitai show it)",
                identity.hash
            ));
            ui.small(summary.description.as_str());
            ui.small(format!(
                "{} · on {} in {}",
                summary.source, summary.device, summary.precision
            ));
            if !flags.is_empty() {
                ui.small(format!("Started with {}", flags.join(" ")));
            }
            let instruct = &summary.instruct;
            if *instruct {
                ui.small("Edits by instruction (InstructPix2Pix): no learning step; the slider sets how closely the result keeps the photo.");
            }
            for lora in &identity.loras {
                ui.small(format!("with LoRA {} at {}", lora.file, lora.weight))
                    .on_hover_text(lora.hash.as_str());
            }
            ui.horizontal(|ui| {
                if ui.small_button("Choose another folder...").clicked() {
                    commands.push(Command::ChooseModelFolder);
                }
                if ui
                    .small_button("Checkpoint file...")
                    .on_hover_text("A single-file .safetensors checkpoint (or drop one here)")
                    .clicked()
                {
                    commands.push(Command::ChooseModelFile);
                }
            });
            // The other kind of edit is one model switch away.
            let (other, label, hint) = if *instruct {
                (
                    DEFAULT_MODEL,
                    "Use Stable Diffusion",
                    "Describe the result; the model learns your photo first (UniTune)",
                )
            } else {
                (
                    DEFAULT_INSTRUCT_MODEL,
                    "Use InstructPix2Pix",
                    "Edit by instruction (\"make it winter\") with timbrooks/instruct-pix2pix, downloaded after you accept its license",
                )
            };
            let offer_demo = app.model.demo_available && !app.model.is_demo();
            ui.horizontal(|ui| {
                if ui.small_button(label).on_hover_text(hint).clicked() {
                    commands.push(Command::SwitchModel(other.to_string()));
                }
                if offer_demo {
                    demo_button(ui, commands, true);
                }
            });
        }
        ModelStatus::Loading { model, detail } => {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label(format!("Loading {model}: {detail}"));
            });
        }
        ModelStatus::Downloading { model, status } => {
            ui.label(format!("Downloading {model}"));
            let total = status.bytes_expected.or(status.file_bytes_total);
            let done = if status.bytes_expected.is_some() {
                status.bytes_done
            } else {
                status.file_bytes_done
            };
            let fraction = total.map_or(0.0, |t| done as f32 / t.max(1) as f32);
            let eta = status
                .eta
                .map_or(String::new(), |e| format!(" · {} left", duration_text(e)));
            ui.add(ProgressBar::new(fraction).show_percentage().text(format!(
                "{} of {} · {}/s{eta}",
                bytes_text(done),
                total.map_or("?".into(), bytes_text),
                bytes_text(status.bytes_per_sec as u64)
            )));
            ui.small(&status.file);
            if ui.button("Cancel download").clicked() {
                commands.push(Command::CancelDownload);
            }
        }
        ModelStatus::Missing {
            model,
            message,
            gpu_bytes,
        } => {
            ui.label(message);
            other_family(ui, model, *gpu_bytes, commands);
            let spec = parse_model_arg(model).ok();
            if let Some(notice) = spec.as_ref().and_then(license_notice) {
                ui.collapsing("License (read before downloading)", |ui| {
                    egui::ScrollArea::vertical()
                        .max_height(160.0)
                        .show(ui, |ui| ui.small(notice));
                });
            }
            let size = spec
                .as_ref()
                .and_then(approximate_download_bytes)
                .map_or(String::new(), |b| format!(" (about {})", bytes_text(b)));
            ui.horizontal(|ui| {
                if ui
                    .button(format!("Accept license and download{size}"))
                    .clicked()
                {
                    commands.push(Command::DownloadModel);
                }
                if ui.button("Choose a model folder...").clicked() {
                    commands.push(Command::ChooseModelFolder);
                }
                if ui.button("Checkpoint file...").clicked() {
                    commands.push(Command::ChooseModelFile);
                }
            });
            if app.model.demo_available {
                demo_button(ui, commands, false);
            }
        }
        ModelStatus::Failed { message, .. } => {
            ui.colored_label(ui.visuals().error_fg_color, message);
            ui.horizontal(|ui| {
                if ui.button("Try again").clicked() {
                    commands.push(Command::RetryModel);
                }
                if ui.button("Choose a model folder...").clicked() {
                    commands.push(Command::ChooseModelFolder);
                }
                if ui.button("Checkpoint file...").clicked() {
                    commands.push(Command::ChooseModelFile);
                }
            });
            if app.model.demo_available {
                demo_button(ui, commands, false);
            }
        }
    }
}

/// Before either is downloaded, Stable Diffusion 1.5 and SDXL are offered beside each other:
/// SDXL first on a GPU that holds it (better edits, at 1024 px), SD 1.5 otherwise (a third of
/// the download, and it runs on smaller cards and on the CPU). Switching shows the other's
/// license and size before anything is fetched.
fn other_family(ui: &mut Ui, model: &str, gpu_bytes: Option<u64>, commands: &mut Vec<Command>) {
    let clicked = if model == DEFAULT_MODEL {
        let label = "Use Stable Diffusion XL";
        let hint = "Stable Diffusion XL base: better edits, at 1024 px; about 7 GB to download, for a GPU with 12 GB or more";
        match gpu_bytes {
            Some(gpu) if suggests_sdxl(gpu_bytes) => {
                ui.label(
                    RichText::new(format!(
                        "Your GPU has {}: Stable Diffusion XL makes better edits, at 1024 px.",
                        bytes_text(gpu)
                    ))
                    .strong(),
                );
                ui.button(label).on_hover_text(hint).clicked()
            }
            _ => ui.small_button(label).on_hover_text(hint).clicked(),
        }
        .then_some(SDXL_MODEL)
    } else if model == SDXL_MODEL {
        ui.small_button("Use Stable Diffusion 1.5")
            .on_hover_text(
                "About 2.1 GB to download; runs on GPUs with 6 GB and on the CPU, at 512 px",
            )
            .clicked()
            .then_some(DEFAULT_MODEL)
    } else {
        None
    };
    if let Some(other) = clicked {
        commands.push(Command::SwitchModel(other.to_string()));
    }
}

/// Loads the demo model: small, shipped with unitune, trained on coloured shapes; a whole edit
/// without downloading anything.
fn demo_button(ui: &mut Ui, commands: &mut Vec<Command>, small: bool) {
    let text = "Demo model (offline)";
    let button = if small {
        ui.small_button(text)
    } else {
        ui.button(text)
    };
    if button
        .on_hover_text(
            "A small model shipped with unitune, trained on scenes of coloured shapes: try a \
             whole edit now, without downloading anything",
        )
        .clicked()
    {
        commands.push(Command::SwitchModel(DEMO_MODEL.to_string()));
    }
}

fn progress_section(ui: &mut Ui, app: &EditorApp) {
    match &app.session.tune {
        TuneStatus::Running {
            step, total, loss, ..
        } => {
            let eta = app
                .session
                .tune
                .eta()
                .map_or(String::new(), |e| format!(" · {} left", duration_text(e)));
            let loss = loss.map_or(String::new(), |l| format!(" · loss {l:.4}"));
            ui.label("Learning the photo (first edit only)");
            ui.add(
                ProgressBar::new(*step as f32 / (*total).max(1) as f32)
                    .text(format!("step {step} of {total}{loss}{eta}")),
            );
            if let Some(preview) = &app.session.textures.tune_preview {
                ui.add(
                    egui::Image::new(preview)
                        .fit_to_exact_size(egui::vec2(96.0, 96.0))
                        .maintain_aspect_ratio(true),
                )
                .on_hover_text("The model's reconstruction of your photo so far");
            }
        }
        TuneStatus::Done {
            snapshots,
            from_cache,
            partial,
        } => {
            let how = match (*partial, *from_cache) {
                (true, _) => "Fine-tuning stopped early; usable",
                (false, true) => "Fine-tuned (from cache)",
                (false, false) => "Fine-tuned",
            };
            ui.small(format!(
                "{how}: snapshots after {} steps",
                ladder_text(snapshots)
            ));
        }
        TuneStatus::None => {}
    }
    let running = app
        .session
        .variants
        .variants()
        .iter()
        .find_map(|v| match v.state {
            VariantState::Running { step, total } => Some((step, total)),
            _ => None,
        });
    let queued = app
        .session
        .variants
        .variants()
        .iter()
        .filter(|v| matches!(v.state, VariantState::Queued))
        .count();
    if let Some((step, total)) = running {
        ui.add(
            ProgressBar::new(step as f32 / total.max(1) as f32)
                .text(format!("variant: step {step} of {total} · {queued} queued")),
        );
    } else if queued > 0 && !matches!(app.session.tune, TuneStatus::Running { .. }) {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(format!("{queued} variants queued"));
        });
    }
}

fn mask_section(ui: &mut Ui, app: &EditorApp, commands: &mut Vec<Command>) {
    ui.heading("Mask (optional)");
    ui.small(if app.settings.auto_region {
        "Paint where the edit may change the photo. Nothing painted: what the prompt names."
    } else {
        "Paint where the edit may change the photo. Nothing painted: the whole photo."
    });
    if let Some(on) = edited(app.settings.auto_region, |on| {
        ui.checkbox(on, "Change only what the prompt names")
            .on_hover_text(
                "With nothing painted, the edit finds the region the prompt changes and keeps \
                 the rest of the photo exactly; the region then shows here to touch up. \
                 A style or a new background changes the whole photo.",
            );
    }) {
        commands.push(Command::SetAutoRegion(on));
    }
    ui.horizontal(|ui| {
        for (tool, label) in [
            (Tool::Move, "Move (V)"),
            (Tool::Brush, "Brush (B)"),
            (Tool::Eraser, "Eraser (E)"),
        ] {
            if ui.selectable_label(app.view.tool == tool, label).clicked() {
                commands.push(Command::ChooseTool(tool));
            }
        }
    });
    let settings = &app.settings;
    if let Some(size) = edited(settings.brush_size_px, |size| {
        ui.add(
            egui::Slider::new(size, limits::BRUSH_SIZE_PX)
                .text("Brush size")
                .logarithmic(true),
        );
    }) {
        commands.push(Command::BrushSize(size));
    }
    if let Some(softness) = edited(settings.brush_softness, |softness| {
        ui.add(egui::Slider::new(softness, limits::FRACTION).text("Softness"));
    }) {
        commands.push(Command::BrushSoftness(softness));
    }
    if let Some(opacity) = edited(settings.mask_opacity, |opacity| {
        ui.add(egui::Slider::new(opacity, limits::FRACTION).text("Overlay opacity"));
    }) {
        commands.push(Command::MaskOpacity(opacity));
    }
    if let Some(show_mask) = edited(app.view.show_mask, |show| {
        ui.checkbox(show, "Show mask");
    }) {
        commands.push(Command::SetView(canvas::View {
            show_mask,
            ..app.view.clone()
        }));
    }
    let (can_undo, can_redo) = app
        .doc
        .as_ref()
        .map_or((false, false), |d| (d.mask.can_undo(), d.mask.can_redo()));
    ui.horizontal(|ui| {
        if ui
            .add_enabled(can_undo, egui::Button::new("Undo"))
            .clicked()
        {
            commands.push(Command::Undo);
        }
        if ui
            .add_enabled(can_redo, egui::Button::new("Redo"))
            .clicked()
        {
            commands.push(Command::Redo);
        }
        if ui.button("Clear").clicked() {
            commands.push(Command::ClearMask);
        }
        if ui.button("Invert").clicked() {
            commands.push(Command::InvertMask);
        }
    });
}

/// `value` as a widget drawn by `ui` edits a copy of it: the new value when it changed.
fn edited<T: Clone + PartialEq>(value: T, ui: impl FnOnce(&mut T)) -> Option<T> {
    let mut copy = value.clone();
    ui(&mut copy);
    (copy != value).then_some(copy)
}

fn advanced_section(
    ui: &mut Ui,
    app: &EditorApp,
    form: &mut EditForm,
    commands: &mut Vec<Command>,
) {
    egui::CollapsingHeader::new("Advanced").show(ui, |ui| {
        let advanced = &mut form.advanced;
        ui.checkbox(
            &mut advanced.custom,
            "Use these values instead of the slider",
        );
        ui.add_enabled_ui(advanced.custom, |ui| {
            ui.add(
                egui::Slider::new(&mut advanced.tune_steps, limits::TUNE_STEPS)
                    .text("Snapshot (steps)"),
            );
            ui.add(egui::Slider::new(&mut advanced.t0_fraction, limits::T0).text("t0 (SDEdit start)"));
            ui.add(egui::Slider::new(&mut advanced.guidance_weight, limits::GUIDANCE).text("Guidance"));
        });
        labelled_text(ui, "Seed (empty = random)", &mut advanced.seed_text);
        labelled_text(
            ui,
            "Baseline prompt (prompt guidance)",
            &mut form.baseline_prompt,
        );
        let settings = &app.settings;
        if let Some(steps) = edited(settings.sampling_steps, |steps| {
            ui.add(egui::Slider::new(steps, limits::SAMPLING_STEPS).text("Sampling steps"));
        }) {
            commands.push(Command::SetSamplingSteps(steps));
        }
        if let Some(on) = edited(settings.interpolate, |on| {
            ui.checkbox(on, "Interpolate toward the original");
        }) {
            commands.push(Command::SetInterpolate(on));
        }
        labelled_text(
            ui,
            "Fine-tuning snapshots",
            &mut form.advanced.snapshot_text,
        );
        if let Some(mode) = edited(settings.train_mode, |mode| {
            egui::ComboBox::from_label("Training mode")
                .selected_text(mode.name())
                .show_ui(ui, |ui| {
                    for option in [
                        TrainMode::Full,
                        TrainMode::Attention,
                        TrainMode::CrossKv,
                        TrainMode::Lora { rank: 4 },
                    ] {
                        ui.selectable_value(mode, option, option.name());
                    }
                });
        }) {
            commands.push(Command::SetTrainMode(mode));
        }
        if let Some(micro) = edited(settings.micro_batch.clone(), |micro| {
            egui::ComboBox::from_label("Micro-batch")
                .selected_text(micro.clone())
                .show_ui(ui, |ui| {
                    for option in ["auto", "1", "2", "4"] {
                        ui.selectable_value(micro, option.to_string(), option);
                    }
                });
        }) {
            commands.push(Command::SetMicroBatch(micro));
        }
        // What the model loads in now: `--precision`, until a choice here replaces it.
        let in_effect = app
            .options
            .precision_override
            .unwrap_or_else(|| settings.precision.parse().unwrap_or_default());
        if let Some(precision) = edited(in_effect, |precision| {
            egui::ComboBox::from_label("Precision")
                .selected_text(precision.as_str())
                .show_ui(ui, |ui| {
                    for option in Precision::ALL {
                        ui.selectable_value(precision, option, option.as_str());
                    }
                });
        }) {
            commands.push(Command::SetPrecision(precision));
        }
        if let Some(preview) = edited(settings.preview, |preview| {
            egui::ComboBox::from_label("Live preview")
                .selected_text(preview_label(*preview))
                .show_ui(ui, |ui| {
                    for option in PreviewMode::ALL {
                        ui.selectable_value(preview, option, preview_label(option));
                    }
                })
                .response
                .on_hover_text(
                    "Tiny VAE: madebyollin/taesd, close to the result (downloaded once, about 10 MB). \
                     Fast: a colour map, one pixel per latent. The result always comes from the full VAE.",
                );
        }) {
            commands.push(Command::SetPreview(preview));
        }
    });
}

fn preview_label(mode: PreviewMode) -> &'static str {
    match mode {
        PreviewMode::Taesd => "Tiny VAE (taesd)",
        PreviewMode::Fast => "Fast",
        PreviewMode::Off => "Off",
    }
}

fn labelled_text(ui: &mut Ui, label: &str, text: &mut String) {
    let label = ui.label(label);
    ui.add(egui::TextEdit::singleline(text).desired_width(f32::INFINITY))
        .labelled_by(label.id);
}

fn strip(ui: &mut Ui, app: &EditorApp, fidelity: f64, commands: &mut Vec<Command>) {
    let shown = app.session.variants.shown(fidelity).map(|(i, _)| i);
    egui::ScrollArea::horizontal().show(ui, |ui| {
        ui.horizontal(|ui| {
            for (index, variant) in app.session.variants.variants().iter().enumerate() {
                ui.vertical(|ui| {
                    ui.set_width(170.0);
                    let label = match &variant.state {
                        VariantState::Queued => "queued".to_string(),
                        VariantState::Running { step, total } => format!("step {step}/{total}"),
                        VariantState::Done { .. } => "done".to_string(),
                        VariantState::Failed(message) => format!("failed: {message}"),
                        VariantState::Cancelled => "cancelled".to_string(),
                    };
                    let s = &variant.settings;
                    let position = s
                        .fidelity()
                        .map_or("custom".into(), |f| format!("fidelity {f:.2}"));
                    let textures = &app.session.textures;
                    let texture = textures.thumbnails.get(&variant.job).or(textures
                        .live_preview
                        .as_ref()
                        .filter(|(j, _)| *j == variant.job)
                        .map(|(_, t)| t));
                    let name = format!("Variant {}: {position}", index + 1);
                    let response = match texture {
                        Some(texture) => {
                            let size = canvas::fit_size(texture, egui::vec2(160.0, 120.0));
                            ui.add(
                                egui::Button::image(
                                    egui::Image::new(texture).fit_to_exact_size(size),
                                )
                                .selected(shown == Some(index)),
                            )
                        }
                        None => ui.add_sized([160.0, 120.0], egui::Button::new(&label)),
                    };
                    let response = response.on_hover_text(format!("{name}\n{}", s.describe()));
                    if response.clicked() && variant.result().is_some() {
                        commands.push(Command::SelectVariant(index));
                    }
                    ui.small(format!("{position} · seed {}", s.seed));
                    ui.small(label);
                });
            }
        });
    });
}

fn central(ui: &mut Ui, app: &EditorApp, fidelity: f64, commands: &mut Vec<Command>) {
    let Some(doc) = app.doc.as_ref() else {
        ui.centered_and_justified(|ui| {
            let text = if app.is_busy() {
                "Opening..."
            } else {
                "Open a photo (File > Open, Ctrl+O) or drop one here"
            };
            if ui.button(RichText::new(text).size(18.0)).clicked() {
                commands.push(Command::OpenDialog);
            }
        });
        return;
    };
    let comparing = app.comparing(ui.ctx());
    let picture = Picture {
        original: &doc.texture,
        result: app.shown_texture(fidelity),
        comparing,
        mask_texture: doc.mask_texture.as_ref(),
        mask_opacity: app.settings.mask_opacity,
        mask_width: doc.mask.image().width(),
        stroking: doc.mask.is_stroking(),
    };
    commands.push(Command::CanvasPlaced(ui.available_rect_before_wrap()));
    commands.extend(canvas::show(ui, &app.view, &picture, &app.brush()));
    if comparing {
        ui.painter().text(
            ui.max_rect().left_top() + egui::vec2(8.0, 8.0),
            egui::Align2::LEFT_TOP,
            "Original",
            egui::FontId::proportional(16.0),
            Color32::WHITE,
        );
    }
}

pub(super) fn bytes_text(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.0} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

fn duration_text(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}
