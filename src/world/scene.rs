//! Scenes of the demo world and how they are drawn.
//!
//! A scene is a plain background with up to three objects, each in its own column (left,
//! middle, right), so objects never overlap and every one of them can be named by where it
//! is. The palette's colours are far apart in RGB (the closest two, orange and yellow, are 86
//! apart) and shapes are drawn without anti-aliasing, so the scorer reads a clean render back
//! exactly and a model's blurry one still by its nearest colours.

use image::{Rgb, RgbImage};
use rand::RngExt;
use serde::{Deserialize, Serialize};

/// Width and height of every scene, in pixels.
pub const SIZE: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Orange,
    Yellow,
    Green,
    Blue,
    Purple,
    White,
    Black,
}

impl Colour {
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Orange,
        Colour::Yellow,
        Colour::Green,
        Colour::Blue,
        Colour::Purple,
        Colour::White,
        Colour::Black,
    ];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [230, 30, 30],
            Colour::Orange => [245, 140, 20],
            Colour::Yellow => [245, 225, 30],
            Colour::Green => [30, 170, 60],
            Colour::Blue => [30, 70, 230],
            Colour::Purple => [150, 50, 200],
            Colour::White => [245, 245, 245],
            Colour::Black => [25, 25, 25],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    /// Half the object's width and height in pixels.
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 6.0,
            Size::Large => 9.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Column {
    Left,
    Middle,
    Right,
}

impl Column {
    pub const ALL: [Column; 3] = [Column::Left, Column::Middle, Column::Right];

    /// The x of the object's centre: 21 px apart, more than a large object is wide.
    pub fn centre(self) -> f32 {
        match self {
            Column::Left => 11.0,
            Column::Middle => 32.0,
            Column::Right => 53.0,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Row {
    Top,
    Middle,
    Bottom,
}

impl Row {
    pub const ALL: [Row; 3] = [Row::Top, Row::Middle, Row::Bottom];

    pub fn centre(self) -> f32 {
        match self {
            Row::Top => 13.0,
            Row::Middle => 32.0,
            Row::Bottom => 51.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub column: Column,
    pub row: Row,
}

impl Object {
    /// Whether the pixel whose centre is at (`x`, `y`) belongs to the object.
    fn covers(&self, x: f32, y: f32) -> bool {
        let r = self.size.radius();
        let dx = x - self.column.centre();
        let dy = y - self.row.centre();
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r && dy.abs() <= r,
            // Apex up, base 2r wide at the bottom: half the square's area.
            Shape::Triangle => dy.abs() <= r && dx.abs() <= (dy + r) / 2.0,
        }
    }
}

/// A background and up to three objects, at most one per column, ordered left to right.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scene {
    pub background: Colour,
    pub objects: Vec<Object>,
}

impl Scene {
    /// A scene drawn from the world's distribution: one to three objects in distinct
    /// columns, none the background's colour.
    pub fn random(rng: &mut impl RngExt) -> Scene {
        let background = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
        let count = rng.random_range(1..=3);
        let mut columns = Column::ALL.to_vec();
        while columns.len() > count {
            columns.remove(rng.random_range(0..columns.len()));
        }
        let objects = columns
            .into_iter()
            .map(|column| Object {
                shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
                colour: random_colour_except(rng, background),
                size: Size::ALL[rng.random_range(0..Size::ALL.len())],
                column,
                row: Row::ALL[rng.random_range(0..Row::ALL.len())],
            })
            .collect();
        Scene {
            background,
            objects,
        }
    }

    pub fn object_in(&self, column: Column) -> Option<&Object> {
        self.objects.iter().find(|o| o.column == column)
    }

    /// Keeps objects left to right, the order captions and comparisons rely on.
    pub fn sort(&mut self) {
        self.objects.sort_by_key(|o| o.column);
    }

    /// Which pixels (row-major) an object covers.
    pub fn render_coverage(&self) -> Vec<bool> {
        (0..SIZE * SIZE)
            .map(|i| {
                let (x, y) = ((i % SIZE) as f32 + 0.5, (i / SIZE) as f32 + 0.5);
                self.objects.iter().any(|o| o.covers(x, y))
            })
            .collect()
    }

    pub fn render(&self) -> RgbImage {
        RgbImage::from_fn(SIZE, SIZE, |x, y| {
            let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
            let colour = self
                .objects
                .iter()
                .find(|o| o.covers(cx, cy))
                .map_or(self.background, |o| o.colour);
            Rgb(colour.rgb())
        })
    }
}

/// The scene the editor opens with the demo model when no photo is open (and the README's
/// example): two objects and a free column, so every kind of edit applies to it.
pub fn example_scene() -> Scene {
    Scene {
        background: Colour::White,
        objects: vec![
            Object {
                shape: Shape::Circle,
                colour: Colour::Red,
                size: Size::Large,
                column: Column::Left,
                row: Row::Middle,
            },
            Object {
                shape: Shape::Square,
                colour: Colour::Blue,
                size: Size::Large,
                column: Column::Middle,
                row: Row::Middle,
            },
        ],
    }
}

/// The edit to try on [`example_scene`]: the caption of [`example_edit`]'s result. The whole
/// caption, not the edit's phrase ("a large green square in the middle"): a prompt that
/// leaves the circle out lets the model repaint it (blue, on the demo model, at every
/// position of the slider), one that names it keeps it.
pub const EXAMPLE_PROMPT: &str =
    "a large red circle on the left and a large green square in the middle, on a white background";

/// Makes the square in the middle of [`example_scene`] green: a recolouring, which the demo
/// model's UniTune edits make across the whole slider with the automatic region, keeping
/// the circle and the background (adding an object, it rarely does; docs/edit-quality.md).
pub fn example_edit() -> super::Edit {
    super::Edit::Recolour {
        column: Column::Middle,
        colour: Colour::Green,
    }
}

/// A small red circle on the left and a large blue square at the top right, on green: the
/// scene the world's unit tests describe in words and numbers.
#[cfg(test)]
pub(crate) fn two_object_scene() -> Scene {
    Scene {
        background: Colour::Green,
        objects: vec![
            Object {
                shape: Shape::Circle,
                colour: Colour::Red,
                size: Size::Small,
                column: Column::Left,
                row: Row::Middle,
            },
            Object {
                shape: Shape::Square,
                colour: Colour::Blue,
                size: Size::Large,
                column: Column::Right,
                row: Row::Top,
            },
        ],
    }
}

pub(crate) fn random_colour_except(rng: &mut impl RngExt, except: Colour) -> Colour {
    let others: Vec<Colour> = Colour::ALL.into_iter().filter(|&c| c != except).collect();
    others[rng.random_range(0..others.len())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn random_scenes_are_reproducible_and_follow_the_rules() {
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..200)
                .map(|_| Scene::random(&mut rng))
                .collect::<Vec<_>>()
        };
        let scenes = draw(7);
        assert_eq!(scenes, draw(7), "same seed, same scenes");
        assert_ne!(scenes, draw(8));
        for scene in &scenes {
            assert!((1..=3).contains(&scene.objects.len()));
            assert!(scene.objects.windows(2).all(|w| w[0].column < w[1].column));
            assert!(scene.objects.iter().all(|o| o.colour != scene.background));
        }
        // Every colour, shape, size, column and row turns up.
        let objects: Vec<&Object> = scenes.iter().flat_map(|s| &s.objects).collect();
        assert!(
            Colour::ALL
                .iter()
                .all(|c| objects.iter().any(|o| o.colour == *c))
        );
        assert!(
            Shape::ALL
                .iter()
                .all(|s| objects.iter().any(|o| o.shape == *s))
        );
        assert!(Row::ALL.iter().all(|r| objects.iter().any(|o| o.row == *r)));
        assert!(
            Size::ALL
                .iter()
                .all(|s| objects.iter().any(|o| o.size == *s))
        );
    }

    #[test]
    fn the_example_prompt_is_the_example_edits_result_in_words() {
        let after = example_edit().apply(&example_scene()).unwrap();
        assert_eq!(super::super::caption(&after), EXAMPLE_PROMPT);
    }

    #[test]
    fn shapes_cover_the_areas_their_geometry_says() {
        let area = |shape, size| {
            let scene = Scene {
                background: Colour::White,
                objects: vec![Object {
                    shape,
                    colour: Colour::Red,
                    size,
                    column: Column::Middle,
                    row: Row::Middle,
                }],
            };
            let image = scene.render();
            image.pixels().filter(|p| p.0 == Colour::Red.rgb()).count() as f32
        };
        for size in Size::ALL {
            let side = 2.0 * size.radius();
            let square = area(Shape::Square, size);
            assert!((square / (side * side) - 1.0).abs() < 0.2, "{square}");
            let circle = area(Shape::Circle, size) / square;
            assert!(
                (circle - std::f32::consts::FRAC_PI_4).abs() < 0.06,
                "{circle}"
            );
            let triangle = area(Shape::Triangle, size) / square;
            assert!((triangle - 0.5).abs() < 0.08, "{triangle}");
        }
    }
}
