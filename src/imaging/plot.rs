//! A line plot of trade-off curves (both axes 0 to 1), for `unitune eval`.
//!
//! Hand-written on the same 8x8 bitmap font as the grid's labels: the plot needs lines,
//! markers, a legend and axis labels, and the plotting crates (plotters and its kin) would
//! bring font loading and a second drawing stack for that one picture.

use image::{Rgb, RgbImage};

use super::grid::draw_text;

/// One method's points (x, y), in the order they are joined.
#[derive(Debug, Clone, PartialEq)]
pub struct TradeOffCurve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 640;
const LEFT: u32 = 80;
const TOP: u32 = 30;
const PLOT: u32 = 540;
const LEGEND_X: u32 = LEFT + PLOT + 40;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([24, 24, 24]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
/// Distinct colours for up to twelve curves (then they repeat).
const COLOURS: [[u8; 3]; 12] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [0, 0, 0],
    [255, 200, 0],
];

/// Draws the curves on a 0..1 x 0..1 plot with a legend; points outside are clamped.
pub fn trade_off_plot(curves: &[TradeOffCurve], x_label: &str, y_label: &str) -> RgbImage {
    let mut canvas = RgbImage::from_pixel(WIDTH, HEIGHT, WHITE);
    for i in 0..=4 {
        let v = i as f64 / 4.0;
        let (x, y) = to_pixel(v, v);
        line(
            &mut canvas,
            (x, TOP as i32),
            (x, (TOP + PLOT) as i32),
            GRID,
            1,
        );
        line(
            &mut canvas,
            (LEFT as i32, y),
            ((LEFT + PLOT) as i32, y),
            GRID,
            1,
        );
        text(
            &mut canvas,
            &format!("{v:.2}"),
            x - 16,
            (TOP + PLOT + 8) as i32,
            INK,
        );
        text(
            &mut canvas,
            &format!("{v:.2}"),
            LEFT as i32 - 44,
            y - 4,
            INK,
        );
    }
    let (x0, y0) = (LEFT as i32, (TOP + PLOT) as i32);
    line(&mut canvas, (x0, y0), (x0 + PLOT as i32, y0), INK, 2);
    line(&mut canvas, (x0, y0), (x0, TOP as i32), INK, 2);
    text(
        &mut canvas,
        x_label,
        LEFT as i32,
        (TOP + PLOT + 28) as i32,
        INK,
    );
    text(&mut canvas, y_label, 8, 10, INK);

    for (index, curve) in curves.iter().enumerate() {
        let colour = Rgb(COLOURS[index % COLOURS.len()]);
        let pixels: Vec<(i32, i32)> = curve.points.iter().map(|&(x, y)| to_pixel(x, y)).collect();
        for pair in pixels.windows(2) {
            line(&mut canvas, pair[0], pair[1], colour, 2);
        }
        for &(x, y) in &pixels {
            square(&mut canvas, x, y, 3, colour);
        }
        let legend_y = TOP as i32 + 10 + index as i32 * 20;
        square(&mut canvas, LEGEND_X as i32, legend_y + 4, 5, colour);
        text(
            &mut canvas,
            &curve.label,
            LEGEND_X as i32 + 14,
            legend_y,
            INK,
        );
    }
    canvas
}

fn to_pixel(x: f64, y: f64) -> (i32, i32) {
    let clamp = |v: f64| {
        if v.is_finite() {
            v.clamp(0.0, 1.0)
        } else {
            0.0
        }
    };
    (
        LEFT as i32 + (clamp(x) * PLOT as f64).round() as i32,
        (TOP + PLOT) as i32 - (clamp(y) * PLOT as f64).round() as i32,
    )
}

fn text(canvas: &mut RgbImage, text: &str, x: i32, y: i32, colour: Rgb<u8>) {
    let chars: Vec<char> = text.chars().collect();
    draw_text(canvas, &chars, x.max(0) as u32, y.max(0) as u32, 1, colour);
}

fn put(canvas: &mut RgbImage, x: i32, y: i32, colour: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < canvas.width() && (y as u32) < canvas.height() {
        canvas.put_pixel(x as u32, y as u32, colour);
    }
}

fn square(canvas: &mut RgbImage, x: i32, y: i32, half: i32, colour: Rgb<u8>) {
    for dy in -half..=half {
        for dx in -half..=half {
            put(canvas, x + dx, y + dy, colour);
        }
    }
}

/// A straight line `width` pixels thick (Bresenham, each point a small square).
fn line(canvas: &mut RgbImage, from: (i32, i32), to: (i32, i32), colour: Rgb<u8>, width: i32) {
    let (mut x, mut y) = from;
    let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
    let (sx, sy) = (if x < to.0 { 1 } else { -1 }, if y < to.1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        square(canvas, x, y, (width - 1) / 2, colour);
        if (x, y) == to {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_land_where_their_values_say_in_their_curve_colour() {
        let curves = vec![
            TradeOffCurve {
                label: "a".into(),
                points: vec![(0.0, 0.0), (1.0, 1.0)],
            },
            TradeOffCurve {
                label: "b".into(),
                points: vec![(0.5, 0.25)],
            },
        ];
        let plot = trade_off_plot(&curves, "x", "y");
        let at = |x: f64, y: f64| {
            let (px, py) = to_pixel(x, y);
            *plot.get_pixel(px as u32, py as u32)
        };
        assert_eq!(at(0.0, 0.0), Rgb(COLOURS[0]));
        assert_eq!(at(1.0, 1.0), Rgb(COLOURS[0]));
        assert_eq!(at(0.5, 0.5), Rgb(COLOURS[0]), "the line between them");
        assert_eq!(at(0.5, 0.25), Rgb(COLOURS[1]));
        assert_eq!(at(0.6, 0.1), WHITE, "nothing where no curve goes");
        assert_eq!(at(0.75, 0.1), GRID, "grid lines at the quarters");
    }
}
