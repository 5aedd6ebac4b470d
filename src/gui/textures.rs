//! Images to GPU textures. Display copies are capped in size: a 50-megapixel photo would
//! exceed the GPU's texture limit, and the screen cannot show more pixels anyway.

use egui::{ColorImage, Context, TextureHandle, TextureOptions};
use image::{GrayImage, RgbImage};

use super::mask::PixelRect;

/// The longest side of a display texture (well under wgpu's guaranteed 8192).
const MAX_TEXTURE_SIDE: u32 = 4096;

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

/// The display copy of a full-size image. For a 12-megapixel photo this takes tens of
/// milliseconds (several frames), so photos and results are converted on a background thread
/// and only `upload`ed on the UI thread.
pub fn display_copy(image: &RgbImage) -> ColorImage {
    color_image(image, MAX_TEXTURE_SIDE)
}

/// Hands a prepared image to egui (a move; the GPU copy happens when the frame is painted).
pub fn upload(ctx: &Context, name: &str, image: ColorImage) -> TextureHandle {
    ctx.load_texture(name, image, TextureOptions::LINEAR)
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
