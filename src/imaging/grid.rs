//! A labelled grid of results, as in the paper's figure 10 (fine-tuning steps across, SDEdit
//! start down): one image to save or share that shows how the knobs change the edit.
//!
//! Text is drawn with the public-domain 8x8 bitmap font of the `font8x8` crate (Basic Latin,
//! Latin-1 and Greek; any other character shows as `?`), so no font file is needed.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

use super::ImagingError;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const TEXT: Rgb<u8> = Rgb([24, 24, 24]);
/// Glyphs are this many pixels square before scaling.
const GLYPH_PX: u32 = 8;
/// Gap between cells and around the grid, in glyph pixels (scaled like the glyphs).
const GAP_UNITS: u32 = 4;
/// Cells at least this large on both sides get glyphs (and gaps) twice as large.
const LARGE_CELL_PX: u32 = 256;
/// The row-label column is at most one cell wide, or this many characters if that is wider.
const MIN_ROW_LABEL_CHARS: u32 = 16;
/// What a cut label ends in.
const ELLIPSIS: &str = "...";

/// Lays `cells` out as a grid (`cells[row][column]`, all the same size) on white, with
/// `column_labels` above the columns, `row_labels` left of the rows and `title` above all, in
/// dark bitmap text.
///
/// An empty `column_labels` or `row_labels` leaves that strip out; otherwise there must be
/// one label per column and per row. Labels are on one line (control characters show as
/// spaces); one too long for its place is cut and ends in "...".
///
/// With `s` = 2 when the cells are at least 256 pixels on both sides and 1 otherwise, the
/// text is `8s` pixels high and the gap `g` = `4s`. For `R` rows and `C` columns of `W` x `H`
/// cells the image is
/// - wide: `g + [L + g] + C·W + (C-1)·g + g`, where `L`, present with row labels, is the
///   longest row label's width (`8s` per character) but at most `max(W, 16·8s)`;
/// - high: `g + [8s + g] + [8s + g] + R·H + (R-1)·g + g`, the brackets present with a title
///   and with column labels respectively.
///
/// Fails (as [`ImagingError::InvalidGrid`]) on no rows or no columns, rows of different
/// lengths, cells of different sizes or with no pixels, label counts that do not match, or a
/// grid too large for one image.
pub fn labelled_grid(
    cells: &[Vec<RgbImage>],
    column_labels: &[String],
    row_labels: &[String],
    title: Option<&str>,
) -> Result<RgbImage, ImagingError> {
    let layout = Layout::new(cells, column_labels, row_labels, title)?;
    let mut canvas = RgbImage::from_pixel(layout.width, layout.height, BACKGROUND);
    let glyph = GLYPH_PX * layout.scale;

    if let Some(title) = title {
        let max_px = layout.width - 2 * layout.gap;
        let text = fit_label(title, max_px, glyph);
        let x = layout.gap + (max_px - text_width(&text, glyph)) / 2;
        draw_text(&mut canvas, &text, x, layout.gap, layout.scale, TEXT);
    }
    for (column, label) in column_labels.iter().enumerate() {
        let text = fit_label(label, layout.cell_width, glyph);
        let x = layout.column_x(column) + (layout.cell_width - text_width(&text, glyph)) / 2;
        draw_text(&mut canvas, &text, x, layout.header_y, layout.scale, TEXT);
    }
    for (row, label) in row_labels.iter().enumerate() {
        let text = fit_label(label, layout.row_label_width, glyph);
        let y = layout.row_y(row) + layout.cell_height.saturating_sub(glyph) / 2;
        draw_text(&mut canvas, &text, layout.gap, y, layout.scale, TEXT);
    }
    for (row, images) in cells.iter().enumerate() {
        for (column, cell) in images.iter().enumerate() {
            let (x, y) = (layout.column_x(column), layout.row_y(row));
            image::imageops::replace(&mut canvas, cell, i64::from(x), i64::from(y));
        }
    }
    Ok(canvas)
}

/// Where everything goes; every position fits in the canvas.
struct Layout {
    scale: u32,
    gap: u32,
    cell_width: u32,
    cell_height: u32,
    /// Width of the row-label strip (0 without row labels).
    row_label_width: u32,
    /// Left edge of the first column.
    cells_x: u32,
    /// Top of the column labels.
    header_y: u32,
    /// Top of the first row.
    cells_y: u32,
    width: u32,
    height: u32,
}

impl Layout {
    fn new(
        cells: &[Vec<RgbImage>],
        column_labels: &[String],
        row_labels: &[String],
        title: Option<&str>,
    ) -> Result<Self, ImagingError> {
        let invalid = |detail: String| ImagingError::InvalidGrid { detail };
        let columns = cells.first().map_or(0, Vec::len);
        if columns == 0 {
            return Err(invalid("it has no images".to_string()));
        }
        for (row, images) in cells.iter().enumerate() {
            if images.len() != columns {
                return Err(invalid(format!(
                    "row {} has {} but row 1 has {columns}",
                    row + 1,
                    counted(images.len(), "image")
                )));
            }
        }
        let (cell_width, cell_height) = cells[0][0].dimensions();
        if cell_width == 0 || cell_height == 0 {
            return Err(invalid(format!(
                "its images have no pixels ({cell_width}x{cell_height})"
            )));
        }
        for (row, images) in cells.iter().enumerate() {
            for (column, cell) in images.iter().enumerate() {
                let (w, h) = cell.dimensions();
                if (w, h) != (cell_width, cell_height) {
                    return Err(invalid(format!(
                        "the image in row {}, column {} is {w}x{h} pixels but the first is {cell_width}x{cell_height}",
                        row + 1,
                        column + 1
                    )));
                }
            }
        }
        let rows = cells.len();
        for (what, labels, count) in [
            ("column", column_labels, columns),
            ("row", row_labels, rows),
        ] {
            if !labels.is_empty() && labels.len() != count {
                return Err(invalid(format!(
                    "it has {} for {}",
                    counted(labels.len(), &format!("{what} label")),
                    counted(count, what)
                )));
            }
        }

        let scale = if cell_width.min(cell_height) >= LARGE_CELL_PX {
            2
        } else {
            1
        };
        let glyph = u64::from(GLYPH_PX * scale);
        let gap = u64::from(GAP_UNITS * scale);
        let row_label_width = if row_labels.is_empty() {
            0
        } else {
            let longest = row_labels
                .iter()
                .map(|label| label.chars().count() as u64)
                .max()
                .unwrap_or(0);
            (longest * glyph).min(u64::from(cell_width).max(u64::from(MIN_ROW_LABEL_CHARS) * glyph))
        };
        let cells_x = gap
            + if row_labels.is_empty() {
                0
            } else {
                row_label_width + gap
            };
        let title_height = if title.is_some() { glyph + gap } else { 0 };
        let header_y = gap + title_height;
        let cells_y = header_y
            + if column_labels.is_empty() {
                0
            } else {
                glyph + gap
            };
        let span = |count: usize, side: u32| {
            let count = count as u64;
            count * u64::from(side) + (count - 1) * gap
        };
        let width = cells_x + span(columns, cell_width) + gap;
        let height = cells_y + span(rows, cell_height) + gap;
        // Row labels may make the strip wider than a cell, never wider than u32; the canvas
        // itself must fit in memory as one buffer.
        let fits = |side: u64| u32::try_from(side).ok();
        let too_large = || {
            invalid(format!(
                "it would be {width}x{height} pixels, too large for one image"
            ))
        };
        let (Some(width32), Some(height32)) = (fits(width), fits(height)) else {
            return Err(too_large());
        };
        if width.saturating_mul(height).saturating_mul(3) > MAX_CANVAS_BYTES {
            return Err(too_large());
        }
        // Everything below is at most `width` or `height`, so it fits in u32.
        Ok(Self {
            scale,
            gap: gap as u32,
            cell_width,
            cell_height,
            row_label_width: row_label_width as u32,
            cells_x: cells_x as u32,
            header_y: header_y as u32,
            cells_y: cells_y as u32,
            width: width32,
            height: height32,
        })
    }

    fn column_x(&self, column: usize) -> u32 {
        self.cells_x + column as u32 * (self.cell_width + self.gap)
    }

    fn row_y(&self, row: usize) -> u32 {
        self.cells_y + row as u32 * (self.cell_height + self.gap)
    }
}

/// The largest grid made, in bytes of RGB: 2 GiB, far beyond any sensible grid, and short
/// of what would exhaust a desktop's memory.
const MAX_CANVAS_BYTES: u64 = 2 << 30;

/// "1 image", "2 images".
fn counted(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// `text` on one line, cut to fit `max_px` with glyphs `glyph_px` wide: the characters that
/// fit before "..." when it is too long, or as much of "..." as fits in a tiny place.
fn fit_label(text: &str, max_px: u32, glyph_px: u32) -> Vec<char> {
    let chars: Vec<char> = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let fits = (max_px / glyph_px) as usize;
    if chars.len() <= fits {
        return chars;
    }
    let ellipsis: Vec<char> = ELLIPSIS.chars().collect();
    if fits <= ellipsis.len() {
        return ellipsis[..fits].to_vec();
    }
    let mut cut: Vec<char> = chars[..fits - ellipsis.len()].to_vec();
    while cut.last().is_some_and(|c| c.is_whitespace()) {
        cut.pop();
    }
    cut.extend(ellipsis);
    cut
}

fn text_width(text: &[char], glyph_px: u32) -> u32 {
    text.len() as u32 * glyph_px
}

/// Draws `text` with its top-left corner at (`x`, `y`), each font pixel `scale` pixels
/// square; whatever falls outside the canvas is left out.
/// Draws `text` with its top left at (`x`, `y`), each glyph pixel `scale` pixels wide.
pub(super) fn draw_text(
    canvas: &mut RgbImage,
    text: &[char],
    x: u32,
    y: u32,
    scale: u32,
    colour: Rgb<u8>,
) {
    let glyph_px = GLYPH_PX * scale;
    for (index, &c) in text.iter().enumerate() {
        let left = x + index as u32 * glyph_px;
        for (row, bits) in glyph(c).iter().enumerate() {
            for column in 0..GLYPH_PX {
                // Bit 0 is the leftmost pixel.
                if bits & (1 << column) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let px = left + column * scale + dx;
                        let py = y + row as u32 * scale + dy;
                        if px < canvas.width() && py < canvas.height() {
                            canvas.put_pixel(px, py, colour);
                        }
                    }
                }
            }
        }
    }
}

/// The 8x8 bitmap of `c`: eight rows, top first.
fn glyph(c: char) -> [u8; 8] {
    font8x8::BASIC_FONTS
        .get(c)
        .or_else(|| font8x8::LATIN_FONTS.get(c))
        .or_else(|| font8x8::GREEK_FONTS.get(c))
        .or_else(|| font8x8::BASIC_FONTS.get('?'))
        .unwrap_or([0; 8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fitted(text: &str, max_chars: u32) -> String {
        fit_label(text, max_chars * 8, 8).into_iter().collect()
    }

    #[test]
    fn labels_are_cut_with_an_ellipsis() {
        assert_eq!(fitted("t0 = 0.9", 8), "t0 = 0.9");
        assert_eq!(fitted("fine-tuning steps", 8), "fine-...");
        assert_eq!(fitted("a b c d e", 6), "a b...");
        assert_eq!(fitted("abcdef", 2), "..");
        assert_eq!(fitted("abcdef", 0), "");
        assert_eq!(fitted("two\nlines", 20), "two lines");
    }

    #[test]
    fn glyphs_cover_latin_greek_and_fall_back() {
        assert_ne!(glyph('A'), [0; 8]);
        assert_ne!(glyph('é'), [0; 8]);
        assert_ne!(glyph('α'), [0; 8]);
        assert_eq!(glyph('猫'), glyph('?'));
        assert_eq!(glyph(' '), [0; 8]);
    }
}
