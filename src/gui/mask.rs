//! The in-painting mask the user paints: a grey image at the photo's size (white = may
//! change), soft round brush stamps, and undo/redo of whole strokes.
//!
//! Undo keeps the pixels a stroke changed (its bounding box before the stroke), not whole
//! copies of the mask, so a long history of small strokes on a large photo stays small.

use std::sync::Arc;

use image::GrayImage;

/// How far back undo goes.
const UNDO_LEVELS: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Brush {
    /// Diameter in photo pixels.
    pub size_px: f32,
    /// 0 = hard edge, 1 = the whole radius fades.
    pub softness: f32,
    /// Erase instead of paint.
    pub erase: bool,
}

/// A rectangle of pixels `[x0, x1) x [y0, y1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelRect {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl PixelRect {
    fn union(self, other: PixelRect) -> PixelRect {
        PixelRect {
            x0: self.x0.min(other.x0),
            y0: self.y0.min(other.y0),
            x1: self.x1.max(other.x1),
            y1: self.y1.max(other.y1),
        }
    }

    pub fn width(&self) -> u32 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> u32 {
        self.y1 - self.y0
    }
}

/// The pixels of `rect` as they were before an action.
#[derive(Debug, Clone)]
struct Patch {
    rect: PixelRect,
    pixels: GrayImage,
}

#[derive(Debug, Clone)]
pub struct MaskLayer {
    mask: GrayImage,
    undo: Vec<Patch>,
    redo: Vec<Patch>,
    /// The mask as it was when the current stroke began, and the area it has touched.
    stroke: Option<(GrayImage, Option<PixelRect>)>,
    last_point: Option<(f32, f32)>,
    /// Pixels changed since the texture was last updated.
    dirty: Option<PixelRect>,
    /// What [`MaskLayer::painted`] returned, until the next change (`None`: not computed).
    painted: Option<Option<Arc<GrayImage>>>,
    /// The mask is an automatic region, untouched since it was shown: the next edit estimates
    /// its own instead of taking this one as painted.
    from_estimate: bool,
}

impl MaskLayer {
    /// An empty (all black) mask for a photo of this size.
    pub fn new(width: u32, height: u32) -> Self {
        Self::from_image(GrayImage::new(width, height))
    }

    pub fn from_image(mask: GrayImage) -> Self {
        let (w, h) = mask.dimensions();
        Self {
            mask,
            undo: Vec::new(),
            redo: Vec::new(),
            stroke: None,
            last_point: None,
            dirty: Some(PixelRect {
                x0: 0,
                y0: 0,
                x1: w,
                y1: h,
            }),
            painted: None,
            from_estimate: false,
        }
    }

    pub fn image(&self) -> &GrayImage {
        &self.mask
    }

    /// True when nothing is painted: editing then uses no mask (the paper's mask-free edit).
    pub fn is_empty(&self) -> bool {
        self.mask.as_raw().iter().all(|&v| v == 0)
    }

    /// The mask for an edit and for autosave, shared rather than copied; `None` when nothing
    /// is painted. Kept until the next change, so saving the prompt on each keystroke neither
    /// copies nor rescans a large mask, and the autosave can tell it already wrote it.
    pub fn painted(&mut self) -> Option<Arc<GrayImage>> {
        if self.painted.is_none() {
            self.painted = Some((!self.is_empty()).then(|| Arc::new(self.mask.clone())));
        }
        self.painted.clone().flatten()
    }

    /// Shows an automatic region (white = may change), scaled to the layer; undoable like a
    /// stroke, and painting over it makes it the user's.
    pub fn show_estimate(&mut self, region: &GrayImage) {
        let (w, h) = self.mask.dimensions();
        let scaled = if region.dimensions() == (w, h) {
            region.clone()
        } else {
            crate::imaging::resize_gray(region, w, h)
        };
        self.whole_image_action(|mask| *mask = scaled);
        self.from_estimate = true;
    }

    /// True while the mask is an automatic region nobody has touched since it was shown.
    pub fn is_estimate(&self) -> bool {
        self.from_estimate
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    /// Pixels changed since the last call (for a partial texture update).
    pub fn take_dirty(&mut self) -> Option<PixelRect> {
        self.dirty.take()
    }

    /// Starts a stroke at `(x, y)` in photo pixels and stamps it.
    pub fn begin_stroke(&mut self, x: f32, y: f32, brush: &Brush) {
        self.end_stroke();
        self.stroke = Some((self.mask.clone(), None));
        self.last_point = None;
        self.stroke_to(x, y, brush);
    }

    /// Continues the stroke to `(x, y)`, stamping along the way so fast drags leave no gaps.
    pub fn stroke_to(&mut self, x: f32, y: f32, brush: &Brush) {
        if self.stroke.is_none() {
            self.begin_stroke(x, y, brush);
            return;
        }
        let from = self.last_point.unwrap_or((x, y));
        let spacing = (brush.size_px * 0.25).max(1.0);
        let distance = ((x - from.0).powi(2) + (y - from.1).powi(2)).sqrt();
        let stamps = (distance / spacing).ceil().max(1.0) as usize;
        for i in 1..=stamps {
            let t = i as f32 / stamps as f32;
            let point = (from.0 + (x - from.0) * t, from.1 + (y - from.1) * t);
            if let Some(rect) = self.stamp(point, brush) {
                self.touch(rect);
            }
        }
        self.last_point = Some((x, y));
    }

    /// Ends the stroke; it becomes one undo step. Returns whether anything changed.
    pub fn end_stroke(&mut self) -> bool {
        self.last_point = None;
        let Some((before, touched)) = self.stroke.take() else {
            return false;
        };
        let Some(rect) = touched else {
            return false;
        };
        self.push_undo(Patch {
            rect,
            pixels: crop(&before, rect),
        });
        true
    }

    pub fn is_stroking(&self) -> bool {
        self.stroke.is_some()
    }

    /// Paints nothing everywhere (undoable).
    pub fn clear(&mut self) {
        self.whole_image_action(|mask| mask.as_mut().fill(0));
    }

    /// Swaps what may change and what must stay (undoable).
    pub fn invert(&mut self) {
        self.whole_image_action(|mask| mask.as_mut().iter_mut().for_each(|v| *v = 255 - *v));
    }

    pub fn undo(&mut self) -> bool {
        self.end_stroke();
        match self.undo.pop() {
            Some(patch) => {
                let redo = self.swap_in(patch);
                self.redo.push(redo);
                true
            }
            None => false,
        }
    }

    pub fn redo(&mut self) -> bool {
        self.end_stroke();
        match self.redo.pop() {
            Some(patch) => {
                let undo = self.swap_in(patch);
                self.undo.push(undo);
                true
            }
            None => false,
        }
    }

    fn whole_image_action(&mut self, change: impl FnOnce(&mut GrayImage)) {
        self.end_stroke();
        let rect = self.full_rect();
        let before = self.mask.clone();
        change(&mut self.mask);
        self.push_undo(Patch {
            rect,
            pixels: before,
        });
        self.touch(rect);
    }

    fn full_rect(&self) -> PixelRect {
        PixelRect {
            x0: 0,
            y0: 0,
            x1: self.mask.width(),
            y1: self.mask.height(),
        }
    }

    fn push_undo(&mut self, patch: Patch) {
        self.undo.push(patch);
        if self.undo.len() > UNDO_LEVELS {
            self.undo.remove(0);
        }
        self.redo.clear();
    }

    /// Puts `patch` into the mask and returns what it replaced.
    fn swap_in(&mut self, mut patch: Patch) -> Patch {
        if patch.rect == self.full_rect() {
            // Undo of clear or invert: trade buffers instead of copying megapixels.
            std::mem::swap(&mut self.mask, &mut patch.pixels);
            self.touch(patch.rect);
            return patch;
        }
        let replaced = Patch {
            rect: patch.rect,
            pixels: crop(&self.mask, patch.rect),
        };
        // Row copies, not a write per pixel: a long stroke's patch can be large.
        // (`max(1)`: chunks of zero panic, and an empty mask has no rows anyway.)
        let width = (self.mask.width() as usize).max(1);
        let (x0, x1) = (patch.rect.x0 as usize, patch.rect.x1 as usize);
        let rows = self
            .mask
            .as_mut()
            .chunks_exact_mut(width)
            .skip(patch.rect.y0 as usize);
        for (row, saved) in rows.zip(patch.pixels.as_raw().chunks_exact((x1 - x0).max(1))) {
            row[x0..x1].copy_from_slice(saved);
        }
        self.touch(patch.rect);
        replaced
    }

    /// Every change to the pixels ends here.
    fn touch(&mut self, rect: PixelRect) {
        self.painted = None;
        self.from_estimate = false;
        self.dirty = Some(self.dirty.map_or(rect, |d| d.union(rect)));
        if let Some((_, touched)) = &mut self.stroke {
            *touched = Some(touched.map_or(rect, |t| t.union(rect)));
        }
    }

    /// One round stamp; returns the pixels it may have changed.
    fn stamp(&mut self, (cx, cy): (f32, f32), brush: &Brush) -> Option<PixelRect> {
        let radius = (brush.size_px / 2.0).max(0.5);
        let (w, h) = self.mask.dimensions();
        let x0 = (cx - radius).floor().max(0.0) as u32;
        let y0 = (cy - radius).floor().max(0.0) as u32;
        let x1 = ((cx + radius).ceil().max(0.0) as u32).min(w);
        let y1 = ((cy + radius).ceil().max(0.0) as u32).min(h);
        if x0 >= x1 || y0 >= y1 {
            return None;
        }
        // The inner radius is fully painted; the rest fades linearly to the edge.
        let hard = radius * (1.0 - brush.softness.clamp(0.0, 1.0));
        for y in y0..y1 {
            for x in x0..x1 {
                let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
                let strength = if d <= hard {
                    1.0
                } else if d >= radius {
                    0.0
                } else {
                    1.0 - (d - hard) / (radius - hard)
                };
                if strength <= 0.0 {
                    continue;
                }
                let pixel = self.mask.get_pixel_mut(x, y);
                let value = pixel.0[0] as f32;
                let target = if brush.erase { 0.0 } else { 255.0 };
                // Never undo earlier paint within one stroke: take the stronger of the two.
                let blended = value + (target - value) * strength;
                pixel.0[0] = if brush.erase {
                    blended.min(value).round() as u8
                } else {
                    blended.max(value).round() as u8
                };
            }
        }
        Some(PixelRect { x0, y0, x1, y1 })
    }
}

fn crop(image: &GrayImage, rect: PixelRect) -> GrayImage {
    image::imageops::crop_imm(image, rect.x0, rect.y0, rect.width(), rect.height()).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HARD: Brush = Brush {
        size_px: 6.0,
        softness: 0.0,
        erase: false,
    };

    #[test]
    fn a_stroke_paints_along_its_path_and_undo_redo_restore_it_exactly() {
        let mut layer = MaskLayer::new(40, 20);
        layer.begin_stroke(5.0, 10.0, &HARD);
        layer.stroke_to(35.0, 10.0, &HARD);
        assert!(layer.end_stroke());
        let painted = layer.image().clone();
        // No gaps along a fast drag; untouched rows stay black.
        for x in 5..35 {
            assert_eq!(painted.get_pixel(x, 10).0[0], 255, "gap at x={x}");
        }
        assert_eq!(painted.get_pixel(20, 0).0[0], 0);
        assert!(layer.undo());
        assert!(layer.is_empty());
        assert!(layer.redo());
        assert_eq!(layer.image(), &painted);
        assert!(!layer.redo());
    }

    #[test]
    fn soft_brushes_fade_and_the_eraser_removes() {
        let soft = Brush {
            size_px: 20.0,
            softness: 1.0,
            erase: false,
        };
        let mut layer = MaskLayer::new(40, 40);
        layer.begin_stroke(20.0, 20.0, &soft);
        layer.end_stroke();
        let centre = layer.image().get_pixel(20, 20).0[0];
        let edge = layer.image().get_pixel(27, 20).0[0];
        assert!(centre > 200 && edge > 0 && edge < centre, "{centre} {edge}");
        let eraser = Brush {
            erase: true,
            size_px: 40.0,
            softness: 0.0,
        };
        layer.begin_stroke(20.0, 20.0, &eraser);
        layer.end_stroke();
        assert!(layer.is_empty());
    }

    #[test]
    fn invert_and_clear_are_undoable_and_a_new_action_drops_redo() {
        let mut layer = MaskLayer::new(8, 8);
        layer.invert();
        assert!(layer.image().as_raw().iter().all(|&v| v == 255));
        layer.clear();
        assert!(layer.is_empty());
        layer.undo();
        assert!(layer.image().as_raw().iter().all(|&v| v == 255));
        layer.undo();
        assert!(layer.is_empty());

        // Whole-mask undo and redo round-trip a painted mask exactly, more than once.
        layer.begin_stroke(2.0, 3.0, &HARD);
        layer.end_stroke();
        let painted = layer.image().clone();
        layer.invert();
        let inverted = layer.image().clone();
        assert_ne!(painted, inverted);
        for _ in 0..2 {
            layer.undo();
            assert_eq!(*layer.image(), painted);
            layer.redo();
            assert_eq!(*layer.image(), inverted);
        }
        layer.begin_stroke(1.0, 1.0, &HARD);
        layer.end_stroke();
        assert!(!layer.can_redo());
    }

    #[test]
    fn the_painted_mask_is_shared_until_the_next_change() {
        let mut layer = MaskLayer::new(8, 8);
        assert!(layer.painted().is_none(), "nothing painted");
        layer.begin_stroke(2.0, 3.0, &HARD);
        layer.end_stroke();
        let first = layer.painted().unwrap();
        assert_eq!(*first, *layer.image());
        assert!(
            Arc::ptr_eq(&first, &layer.painted().unwrap()),
            "no new copy"
        );
        layer.begin_stroke(6.0, 6.0, &HARD);
        layer.end_stroke();
        let second = layer.painted().unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(*second, *layer.image());
        layer.undo();
        assert_eq!(*layer.painted().unwrap(), *first);
        layer.clear();
        assert!(layer.painted().is_none(), "cleared");
    }

    #[test]
    fn strokes_off_the_photo_change_nothing_and_add_no_undo_step() {
        let mut layer = MaskLayer::new(8, 8);
        layer.begin_stroke(-50.0, -50.0, &HARD);
        assert!(!layer.end_stroke());
        assert!(!layer.can_undo());
    }
}
