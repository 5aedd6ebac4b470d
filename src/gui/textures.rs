//! Images to GPU textures. Display copies are capped in size: a 50-megapixel photo would
//! exceed the GPU's texture limit, and the screen cannot show more pixels anyway.

use std::collections::{HashMap, HashSet, VecDeque};

use egui::{ColorImage, Context, TextureHandle, TextureOptions};
use image::{GrayImage, RgbImage};

use super::mask::PixelRect;
use crate::jobs::JobId;

/// The longest side of a display texture (well under wgpu's guaranteed 8192).
const MAX_TEXTURE_SIDE: u32 = 4096;
/// The longest side of a result's display texture: sharp on a large screen at fit-to-window,
/// and a quarter of the photo's 4096 in memory.
pub const RESULT_DISPLAY_SIDE: u32 = 2048;
/// How many results keep a display texture; the others show their thumbnail until theirs is
/// read back from disk (see `results`).
pub const RESULT_DISPLAYS_KEPT: usize = 4;
/// Thumbnails in the strip, in pixels.
pub const THUMBNAIL_SIDE: u32 = 160;

/// `(width, height)` scaled down (never up) so the longer side is at most `max_side`.
pub fn capped_size(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let scale = (max_side as f32 / width.max(height) as f32).min(1.0);
    (
        ((width as f32 * scale).round() as u32).max(1),
        ((height as f32 * scale).round() as u32).max(1),
    )
}

pub fn color_image(image: &RgbImage, max_side: u32) -> ColorImage {
    let (w, h) = image.dimensions();
    let (nw, nh) = capped_size(w, h, max_side);
    let resized;
    let source = if (nw, nh) != (w, h) {
        resized = image::imageops::thumbnail(image, nw, nh);
        &resized
    } else {
        image
    };
    ColorImage::from_rgb(
        [source.width() as usize, source.height() as usize],
        source.as_raw(),
    )
}

/// The display copy of a full-size image, within `gpu_side` (the GPU's largest texture).
/// For a 12-megapixel photo this takes tens of milliseconds (several frames), so photos and
/// results are converted on a background thread and only `upload`ed on the UI thread.
pub fn display_copy(image: &RgbImage, gpu_side: u32) -> ColorImage {
    color_image(image, MAX_TEXTURE_SIDE.min(gpu_side))
}

/// The display copy of a finished result (see [`RESULT_DISPLAY_SIDE`]).
pub fn result_display_copy(image: &RgbImage, gpu_side: u32) -> ColorImage {
    color_image(image, RESULT_DISPLAY_SIDE.min(gpu_side))
}

/// The textures of one edit's variants: every strip thumbnail, the display textures of the
/// [`RESULT_DISPLAYS_KEPT`] results shown most recently, and the live previews.
#[derive(Default)]
pub struct VariantTextures {
    pub thumbnails: HashMap<JobId, TextureHandle>,
    /// Most recently shown last.
    displays: VecDeque<(JobId, TextureHandle)>,
    /// Display copies being read back from disk.
    loading: HashSet<JobId>,
    pub live_preview: Option<(JobId, TextureHandle)>,
    pub tune_preview: Option<TextureHandle>,
}

impl VariantTextures {
    /// Adds a result's textures, dropping the least recently shown display beyond the cap.
    pub fn insert(
        &mut self,
        ctx: &Context,
        job: JobId,
        display: ColorImage,
        thumbnail: ColorImage,
    ) {
        let name = format!("variant-{job}");
        self.thumbnails
            .insert(job, upload(ctx, &format!("{name}-thumbnail"), thumbnail));
        self.insert_display(ctx, job, display);
        if self.live_preview.as_ref().is_some_and(|(j, _)| *j == job) {
            self.live_preview = None;
        }
    }

    pub fn insert_display(&mut self, ctx: &Context, job: JobId, display: ColorImage) {
        self.loading.remove(&job);
        self.displays.retain(|(j, _)| *j != job);
        self.displays
            .push_back((job, upload(ctx, &format!("variant-{job}"), display)));
        while self.displays.len() > RESULT_DISPLAYS_KEPT {
            self.displays.pop_front();
        }
    }

    /// Drops every result's textures (a new edit); the tune's preview stays.
    pub fn clear_results(&mut self) {
        let tune_preview = self.tune_preview.take();
        *self = Self {
            tune_preview,
            ..Self::default()
        };
    }

    /// The display texture of `job`, else its thumbnail (while the display is read back).
    pub fn display(&self, job: JobId) -> Option<&TextureHandle> {
        self.displays
            .iter()
            .find(|(j, _)| *j == job)
            .map(|(_, t)| t)
            .or_else(|| self.thumbnails.get(&job))
    }

    /// `job` is shown: keeps its display longest. Returns true when its display must be read
    /// back (not kept, and not already on its way or failed to load).
    pub fn shown(&mut self, job: JobId) -> bool {
        match self.displays.iter().position(|(j, _)| *j == job) {
            Some(index) => {
                if let Some(entry) = self.displays.remove(index) {
                    self.displays.push_back(entry);
                }
                false
            }
            // A failed reload stays in `loading`: the thumbnail stands in, without retrying
            // every frame.
            None => self.loading.insert(job),
        }
    }
}

/// Hands a prepared image to egui (a move; the GPU copy happens when the frame is painted).
/// One larger than the GPU takes (prepared before the GPU's limit was known) is scaled down
/// here rather than fail.
pub fn upload(ctx: &Context, name: &str, image: ColorImage) -> TextureHandle {
    let gpu_side = ctx.input(|i| i.max_texture_side);
    let image = if image.width().max(image.height()) > gpu_side {
        shrink(&image, gpu_side as u32)
    } else {
        image
    };
    ctx.load_texture(name, image, TextureOptions::LINEAR)
}

/// `image` (opaque, as all display copies are) scaled to fit `side`.
fn shrink(image: &ColorImage, side: u32) -> ColorImage {
    let rgb = RgbImage::from_fn(image.width() as u32, image.height() as u32, |x, y| {
        let [r, g, b, _] = image.pixels[y as usize * image.width() + x as usize].to_array();
        image::Rgb([r, g, b])
    });
    color_image(&rgb, side)
}

/// A small image (a working-size preview) converted and uploaded at once.
pub fn thumbnail(ctx: &Context, name: &str, image: &RgbImage, side: u32) -> TextureHandle {
    upload(ctx, name, color_image(image, side))
}

/// The mask as a red overlay whose alpha is the mask value; the opacity is applied when
/// drawing, so changing it needs no upload.
///
/// Clear, invert and undo of those update the whole mask (up to 2048x1536) on the UI thread,
/// so this is a table lookup over row slices rather than a colour conversion per pixel.
fn mask_pixels(mask: &GrayImage, rect: PixelRect) -> ColorImage {
    let overlay: [egui::Color32; 256] =
        std::array::from_fn(|v| egui::Color32::from_rgba_unmultiplied(255, 40, 40, v as u8));
    // `max(1)`: chunks of zero panic, and an empty mask has no rows anyway.
    let width = (mask.width() as usize).max(1);
    let (x0, x1) = (rect.x0 as usize, rect.x1 as usize);
    let mut pixels = Vec::with_capacity((rect.width() * rect.height()) as usize);
    for row in mask
        .as_raw()
        .chunks_exact(width)
        .take(rect.y1 as usize)
        .skip(rect.y0 as usize)
    {
        pixels.extend(row[x0..x1].iter().map(|&v| overlay[v as usize]));
    }
    ColorImage::new([rect.width() as usize, rect.height() as usize], pixels)
}

/// Uploads the whole mask, or only `dirty` when the texture exists (a brush stroke touches a
/// small area, and re-uploading a large mask every frame of a drag would stutter).
pub fn update_mask(
    ctx: &Context,
    texture: &mut Option<TextureHandle>,
    mask: &GrayImage,
    dirty: Option<PixelRect>,
) {
    let full = PixelRect {
        x0: 0,
        y0: 0,
        x1: mask.width(),
        y1: mask.height(),
    };
    match (texture.as_mut(), dirty) {
        (Some(tex), Some(rect))
            if tex.size() == [mask.width() as usize, mask.height() as usize] =>
        {
            tex.set_partial(
                [rect.x0 as usize, rect.y0 as usize],
                mask_pixels(mask, rect),
                TextureOptions::LINEAR,
            );
        }
        (Some(_), None) => {}
        _ => {
            *texture =
                Some(ctx.load_texture("mask", mask_pixels(mask, full), TextureOptions::LINEAR));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_overlay_of_a_sub_rectangle_has_those_pixels_with_the_mask_as_alpha() {
        let mask = GrayImage::from_fn(7, 5, |x, y| image::Luma([(x * 37 + y * 11) as u8]));
        let rect = PixelRect {
            x0: 2,
            y0: 1,
            x1: 6,
            y1: 4,
        };
        let overlay = mask_pixels(&mask, rect);
        let empty = PixelRect {
            x0: 0,
            y0: 0,
            x1: 0,
            y1: 0,
        };
        assert_eq!(mask_pixels(&GrayImage::new(0, 0), empty).size, [0, 0]);
        assert_eq!(overlay.size, [4, 3]);
        for y in 0..3 {
            for x in 0..4 {
                let v = mask.get_pixel(x + 2, y + 1).0[0];
                assert_eq!(
                    overlay.pixels[(y * 4 + x) as usize],
                    egui::Color32::from_rgba_unmultiplied(255, 40, 40, v),
                    "pixel ({x}, {y})"
                );
            }
        }
    }
}
