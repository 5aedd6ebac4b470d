//! The picture in the middle: the photo or the shown variant, zoom and pan, the mask overlay
//! and brush, and before/after (hold Space, or drag the split line).

use egui::{Color32, Pos2, Rect, Sense, Stroke, TextureHandle, Ui, Vec2, pos2, vec2};

use super::commands::Command;
use super::limits;
use super::mask::Brush;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// Drag pans.
    Move,
    Brush,
    Eraser,
}

/// How the picture is framed, and the mask tools.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// 1 = the picture fits the panel.
    pub zoom: f32,
    /// Offset of the picture's centre from the panel's, in points.
    pub pan: Vec2,
    pub tool: Tool,
    pub show_mask: bool,
    /// Before/after split: the original left of this fraction of the picture's width.
    pub split: Option<f32>,
}

impl Default for View {
    fn default() -> Self {
        Self {
            zoom: 1.0,
            pan: Vec2::ZERO,
            tool: Tool::Move,
            show_mask: true,
            split: None,
        }
    }
}

/// What the canvas shows this frame.
pub struct Picture<'a> {
    pub original: &'a TextureHandle,
    /// The result (or live preview) to show over the original, if any.
    pub result: Option<&'a TextureHandle>,
    /// Holding the compare key shows the original alone.
    pub comparing: bool,
    pub mask_texture: Option<&'a TextureHandle>,
    pub mask_opacity: f32,
    /// The mask's width in pixels (at most the photo's: see `limits::MASK_MAX_SIDE`).
    pub mask_width: u32,
    /// A brush stroke is under way.
    pub stroking: bool,
}

/// Draws the picture; zoom, pan, the split line and painting come back as commands
/// (`SetView`, `PaintTo`, `EndStroke`).
pub fn show(ui: &mut Ui, current: &View, picture: &Picture, brush: &Brush) -> Vec<Command> {
    let mut commands = Vec::new();
    let mut view = current.clone();
    let (panel, response) = ui.allocate_exact_size(ui.available_size(), Sense::click_and_drag());
    let response = response.on_hover_text_at_pointer(match view.tool {
        Tool::Move => "Drag to pan, scroll to zoom",
        Tool::Brush => "Paint where the edit may change the photo",
        Tool::Eraser => "Erase the mask",
    });
    let painter = ui.painter_at(panel);
    painter.rect_filled(panel, 0.0, ui.visuals().extreme_bg_color);

    let image_size = picture.original.size_vec2();
    let fit = (panel.width() / image_size.x)
        .min(panel.height() / image_size.y)
        .max(1e-3);

    // Zoom toward the pointer with the scroll wheel or a pinch.
    if response.hovered() {
        let (scroll, pinch) = ui.input(|i| (i.smooth_scroll_delta.y, i.zoom_delta()));
        let factor = pinch * (scroll / 400.0).exp();
        if (factor - 1.0).abs() > 1e-4 {
            let old = view.zoom;
            view.zoom = (view.zoom * factor).clamp(*limits::ZOOM.start(), *limits::ZOOM.end());
            if let Some(pointer) = response.hover_pos() {
                let from_centre = pointer - panel.center() - view.pan;
                view.pan -= from_centre * (view.zoom / old - 1.0);
            }
        }
    }
    let scale = fit * view.zoom;
    let rect = Rect::from_center_size(panel.center() + view.pan, image_size * scale);

    let panning = response.dragged_by(egui::PointerButton::Middle)
        || response.dragged_by(egui::PointerButton::Secondary)
        || (view.tool == Tool::Move && response.dragged_by(egui::PointerButton::Primary));
    if panning {
        view.pan += response.drag_delta();
    }

    let uv = Rect::from_min_max(pos2(0.0, 0.0), pos2(1.0, 1.0));
    let shown = match picture.result {
        Some(result) if !picture.comparing => result,
        _ => picture.original,
    };
    painter.image(shown.id(), rect, uv, Color32::WHITE);
    if let (Some(split), Some(_)) = (view.split, picture.result)
        && !picture.comparing
    {
        let x = rect.left() + rect.width() * split;
        let left = Rect::from_min_max(rect.min, pos2(x, rect.bottom()));
        let left_uv = Rect::from_min_max(pos2(0.0, 0.0), pos2(split, 1.0));
        painter.image(picture.original.id(), left, left_uv, Color32::WHITE);
        painter.line_segment(
            [pos2(x, rect.top()), pos2(x, rect.bottom())],
            Stroke::new(2.0, Color32::WHITE),
        );
    }
    if let Some(mask_texture) = picture.mask_texture
        && view.show_mask
    {
        let alpha = (picture.mask_opacity.clamp(0.0, 1.0) * 255.0) as u8;
        painter.image(
            mask_texture.id(),
            rect,
            uv,
            Color32::from_white_alpha(alpha),
        );
    }

    // Dragging near the split line moves it.
    if let Some(split) = view.split.as_mut()
        && view.tool == Tool::Move
        && let Some(pointer) = response.interact_pointer_pos()
        && response.dragged_by(egui::PointerButton::Primary)
        && picture.result.is_some()
    {
        let x = rect.left() + rect.width() * *split;
        if (pointer.x - x).abs() < 24.0 {
            *split = ((pointer.x - rect.left()) / rect.width()).clamp(0.0, 1.0);
            view.pan -= response.drag_delta();
        }
    }

    let painting = matches!(view.tool, Tool::Brush | Tool::Eraser);
    if painting {
        let mask_scale = picture.mask_width as f32 / image_size.x;
        let to_mask = |p: Pos2| -> (f32, f32) {
            let local = (p - rect.min) / scale * mask_scale;
            (local.x, local.y)
        };
        let pressing = response.dragged_by(egui::PointerButton::Primary)
            || response.drag_started_by(egui::PointerButton::Primary)
            || response.clicked();
        let mut stroking = picture.stroking;
        if pressing && let Some(pointer) = response.interact_pointer_pos() {
            let (x, y) = to_mask(pointer);
            commands.push(Command::PaintTo { x, y });
            stroking = true;
        }
        if (response.drag_stopped()
            || response.clicked()
            || !ui.input(|i| i.pointer.primary_down()))
            && stroking
        {
            commands.push(Command::EndStroke);
        }
        if let Some(pointer) = response.hover_pos() {
            let radius = brush.size_px / mask_scale * scale / 2.0;
            painter.circle_stroke(pointer, radius, Stroke::new(1.5, Color32::WHITE));
            painter.circle_stroke(pointer, radius + 1.5, Stroke::new(1.0, Color32::BLACK));
        }
    }
    if view != *current {
        commands.insert(0, Command::SetView(view));
    }
    commands
}

/// A size for showing `texture` inside `max` keeping its aspect ratio.
pub fn fit_size(texture: &TextureHandle, max: Vec2) -> Vec2 {
    let size = texture.size_vec2();
    let s = (max.x / size.x).min(max.y / size.y);
    vec2(size.x * s, size.y * s)
}
