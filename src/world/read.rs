//! Reading an image of the demo world back into a scene, by colour segmentation.
//!
//! Every pixel takes its nearest palette colour. The background is the colour of most of the
//! image's frame (objects never reach it). Each column is read on its own, since the world
//! puts at most one object in each: the column's most common non-background colour, if it
//! covers enough pixels, is an object; its largest connected patch gives the row (centroid),
//! the size (extent) and the shape (how much of its bounding box it fills: a square all of
//! it, a circle pi/4, a triangle half). A clean render reads back exactly; a model's blurry
//! edges (red on yellow makes an orange rim) are a minority in their column and are outvoted.

use image::RgbImage;
use image::imageops::{FilterType, resize};

use super::scene::{Colour, Column, Object, Row, SIZE, Scene, Shape, Size};

/// Fewer pixels than this in a column is stray noise, not an object (a small circle covers
/// 113).
const MIN_OBJECT_PIXELS: usize = 40;

/// The x ranges of the three columns, each holding its object with room to spare.
const COLUMN_BANDS: [(u32, u32); 3] = [(0, 21), (21, 43), (43, 64)];

pub fn read(image: &RgbImage) -> Scene {
    let image = if image.dimensions() == (SIZE, SIZE) {
        image.clone()
    } else {
        resize(image, SIZE, SIZE, FilterType::Triangle)
    };
    let classes: Vec<Colour> = image.pixels().map(|p| nearest(p.0)).collect();
    let class = |x: u32, y: u32| classes[(y * SIZE + x) as usize];
    let background = majority(
        (0..SIZE)
            .flat_map(|i| [(i, 0), (i, SIZE - 1), (0, i), (SIZE - 1, i)])
            .map(|(x, y)| class(x, y)),
    )
    .expect("the frame has pixels");
    let objects = Column::ALL
        .into_iter()
        .filter_map(|column| read_column(&class, background, column))
        .collect();
    Scene {
        background,
        objects,
    }
}

/// The column whose band holds pixel column `x`.
pub(super) fn column_of(x: u32) -> Column {
    Column::ALL
        .into_iter()
        .find(|c| x < COLUMN_BANDS[c.index()].1)
        .unwrap_or(Column::Right)
}

fn read_column(
    class: &impl Fn(u32, u32) -> Colour,
    background: Colour,
    column: Column,
) -> Option<Object> {
    let (x0, x1) = COLUMN_BANDS[column.index()];
    let band = || (0..SIZE).flat_map(move |y| (x0..x1).map(move |x| (x, y)));
    let foreground: Vec<Colour> = band()
        .map(|(x, y)| class(x, y))
        .filter(|&c| c != background)
        .collect();
    if foreground.len() < MIN_OBJECT_PIXELS {
        return None;
    }
    let colour = majority(foreground.into_iter())?;
    let patch = largest_patch(
        &band()
            .filter(|&(x, y)| class(x, y) == colour)
            .collect::<Vec<_>>(),
    );
    if patch.len() < MIN_OBJECT_PIXELS {
        return None;
    }
    let (min_x, max_x) = min_max(patch.iter().map(|p| p.0));
    let (min_y, max_y) = min_max(patch.iter().map(|p| p.1));
    let (width, height) = (max_x - min_x + 1, max_y - min_y + 1);
    let centre_y = patch.iter().map(|p| p.1 as f32 + 0.5).sum::<f32>() / patch.len() as f32;
    let fill = patch.len() as f32 / (width * height) as f32;
    Some(Object {
        shape: if fill >= 0.9 {
            Shape::Square
        } else if fill >= 0.64 {
            Shape::Circle
        } else {
            Shape::Triangle
        },
        colour,
        // Small objects are 12 px across, large ones 18.
        size: if width.max(height) >= 15 {
            Size::Large
        } else {
            Size::Small
        },
        column,
        // Rows are centred at 13, 32 and 51.
        row: if centre_y < 22.5 {
            Row::Top
        } else if centre_y > 41.5 {
            Row::Bottom
        } else {
            Row::Middle
        },
    })
}

fn nearest(rgb: [u8; 3]) -> Colour {
    let distance = |c: Colour| {
        c.rgb()
            .iter()
            .zip(rgb)
            .map(|(&a, b)| (a as i32 - b as i32).pow(2))
            .sum::<i32>()
    };
    Colour::ALL
        .into_iter()
        .min_by_key(|&c| distance(c))
        .expect("the palette is not empty")
}

/// The most common colour; ties go to the palette's order.
fn majority(colours: impl Iterator<Item = Colour>) -> Option<Colour> {
    let mut counts = [0usize; Colour::ALL.len()];
    for c in colours {
        counts[c as usize] += 1;
    }
    let (best, &count) = counts
        .iter()
        .enumerate()
        .max_by_key(|&(i, &n)| (n, std::cmp::Reverse(i)))?;
    (count > 0).then_some(Colour::ALL[best])
}

/// The largest 4-connected set among these pixels.
fn largest_patch(pixels: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let inside: std::collections::HashSet<(u32, u32)> = pixels.iter().copied().collect();
    let mut seen = std::collections::HashSet::new();
    let mut best = Vec::new();
    for &start in pixels {
        if !seen.insert(start) {
            continue;
        }
        let mut patch = vec![start];
        let mut next = 0;
        while next < patch.len() {
            let (x, y) = patch[next];
            next += 1;
            let neighbours = [
                (x.wrapping_sub(1), y),
                (x + 1, y),
                (x, y.wrapping_sub(1)),
                (x, y + 1),
            ];
            for n in neighbours {
                if inside.contains(&n) && seen.insert(n) {
                    patch.push(n);
                }
            }
        }
        if patch.len() > best.len() {
            best = patch;
        }
    }
    best
}

fn min_max(values: impl Iterator<Item = u32>) -> (u32, u32) {
    values.fold((u32::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn every_attribute_of_every_clean_render_reads_back_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..500 {
            let scene = Scene::random(&mut rng);
            assert_eq!(read(&scene.render()), scene);
        }
        // And every combination of shape, size and row in each column, on two backgrounds.
        for background in [Colour::White, Colour::Black] {
            for shape in Shape::ALL {
                for size in Size::ALL {
                    for row in Row::ALL {
                        let objects = Column::ALL
                            .into_iter()
                            .map(|column| Object {
                                shape,
                                colour: Colour::Orange,
                                size,
                                column,
                                row,
                            })
                            .collect();
                        let scene = Scene {
                            background,
                            objects,
                        };
                        assert_eq!(read(&scene.render()), scene);
                    }
                }
            }
        }
    }

    #[test]
    fn blur_noise_and_another_size_do_not_change_the_reading() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..50 {
            let scene = Scene::random(&mut rng);
            let image = scene.render();
            // What a model draws: soft edges and some noise.
            let mut soft = image::imageops::blur(&image, 0.7);
            for (i, p) in soft.pixels_mut().enumerate() {
                let jitter = ((i * 7919) % 21) as i32 - 10;
                *p = Rgb(p.0.map(|v| (v as i32 + jitter).clamp(0, 255) as u8));
            }
            let read_back = read(&soft);
            assert_eq!(read_back.background, scene.background);
            let colours = |s: &Scene| {
                s.objects
                    .iter()
                    .map(|o| (o.column, o.colour, o.row))
                    .collect::<Vec<_>>()
            };
            assert_eq!(colours(&read_back), colours(&scene), "{scene:?}");
            // Twice the size, as the real SD VAE would give at 128 px.
            let big = resize(&image, 128, 128, FilterType::Nearest);
            assert_eq!(read(&big), scene);
        }
    }

    #[test]
    fn an_empty_background_has_no_objects_and_a_speck_is_not_one() {
        let mut image = RgbImage::from_pixel(SIZE, SIZE, Rgb(Colour::Blue.rgb()));
        for (x, y) in [(5, 5), (6, 5), (30, 40)] {
            image.put_pixel(x, y, Rgb(Colour::Red.rgb()));
        }
        assert_eq!(
            read(&image),
            Scene {
                background: Colour::Blue,
                objects: vec![]
            }
        );
    }
}
