//! Edits of a scene: what the user asks for, the prompt that asks the model, and the scene that
//! should come out.

use image::{GrayImage, Luma};

use super::caption;
use super::read::column_of;
use super::scene::{Colour, Column, Object, SIZE, Scene};

/// One change to a scene, named by where it happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// The object in this column takes this colour.
    Recolour { column: Column, colour: Colour },
    /// This object appears (its column must be empty).
    Add(Object),
    /// The object in `from` moves to the empty column `to`, on the same row.
    Move { from: Column, to: Column },
    /// The background takes this colour.
    Background(Colour),
}

impl Edit {
    /// The scene the edit should produce; `None` where it does not apply to this scene (no
    /// object to recolour or move, the column to fill taken, a colour already there).
    pub fn apply(&self, scene: &Scene) -> Option<Scene> {
        let mut out = scene.clone();
        match *self {
            Edit::Recolour { column, colour } => {
                let object = out.objects.iter_mut().find(|o| o.column == column)?;
                if object.colour == colour || colour == scene.background {
                    return None;
                }
                object.colour = colour;
            }
            Edit::Add(object) => {
                if scene.object_in(object.column).is_some() || object.colour == scene.background {
                    return None;
                }
                out.objects.push(object);
                out.sort();
            }
            Edit::Move { from, to } => {
                if scene.object_in(to).is_some() {
                    return None;
                }
                out.objects.iter_mut().find(|o| o.column == from)?.column = to;
                out.sort();
            }
            Edit::Background(colour) => {
                if colour == scene.background || scene.objects.iter().any(|o| o.colour == colour) {
                    return None;
                }
                out.background = colour;
            }
        }
        Some(out)
    }

    /// The prompt, in the words of the captions: the changed part of the scene as it should
    /// become ("a small blue circle on the left", "on a white background").
    pub fn prompt(&self, scene: &Scene) -> Option<String> {
        let after = self.apply(scene)?;
        Some(match *self {
            Edit::Recolour { column, .. } => caption::object(after.object_in(column)?),
            Edit::Add(object) => caption::object(&object),
            Edit::Move { to, .. } => caption::object(after.object_in(to)?),
            Edit::Background(_) => caption::background(&after),
        })
    }

    /// What a person would type as an instruction: "make the circle blue".
    pub fn describe(&self, scene: &Scene) -> String {
        match *self {
            Edit::Recolour { column, colour } => match scene.object_in(column) {
                Some(o) => format!("make the {} {}", o.shape.name(), colour.name()),
                None => format!("recolour the empty {column:?} column"),
            },
            Edit::Add(o) => format!("add {}", caption::object(&o)),
            Edit::Move { from, to } => match scene.object_in(from) {
                Some(o) => format!(
                    "move the {} to the {}",
                    o.shape.name(),
                    format!("{to:?}").to_lowercase()
                ),
                None => format!("move from the empty {from:?} column"),
            },
            Edit::Background(colour) => format!("make the background {}", colour.name()),
        }
    }

    /// The columns whose content the edit changes (the background counts as none).
    pub fn touched_columns(&self) -> Vec<Column> {
        match *self {
            Edit::Recolour { column, .. } => vec![column],
            Edit::Add(o) => vec![o.column],
            Edit::Move { from, to } => vec![from, to],
            Edit::Background(_) => Vec::new(),
        }
    }

    /// Where the edit may change the image, for a masked edit (white = may change): the
    /// touched columns from top to bottom, or for a new background everything but the
    /// objects (with a 2 px margin, so their edges stay theirs).
    pub fn mask(&self, scene: &Scene) -> GrayImage {
        let columns = self.touched_columns();
        if !columns.is_empty() {
            return GrayImage::from_fn(SIZE, SIZE, |x, _| {
                let column = column_of(x);
                Luma([if columns.contains(&column) { 255 } else { 0 }])
            });
        }
        let covered = scene.render_coverage();
        GrayImage::from_fn(SIZE, SIZE, |x, y| {
            let near_object = (x.saturating_sub(2)..=(x + 2).min(SIZE - 1)).any(|nx| {
                (y.saturating_sub(2)..=(y + 2).min(SIZE - 1))
                    .any(|ny| covered[(ny * SIZE + nx) as usize])
            });
            Luma([if near_object { 0 } else { 255 }])
        })
    }

    /// Where the edit changes the rendered scene, grown by 2 px (the shapes' soft edges): the
    /// region an automatic estimate should find. ([`Edit::mask`] is what a person would
    /// paint, a whole column; a recoloured object fills about a third of it.) Empty where the
    /// edit does not apply.
    pub fn changed(&self, scene: &Scene) -> GrayImage {
        let before = scene.render();
        let after = self
            .apply(scene)
            .map_or_else(|| before.clone(), |s| s.render());
        let changed = |x: u32, y: u32| before.get_pixel(x, y) != after.get_pixel(x, y);
        GrayImage::from_fn(SIZE, SIZE, |x, y| {
            let near = (x.saturating_sub(2)..=(x + 2).min(SIZE - 1))
                .any(|nx| (y.saturating_sub(2)..=(y + 2).min(SIZE - 1)).any(|ny| changed(nx, ny)));
            Luma([if near { 255 } else { 0 }])
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Edit::Recolour { .. } => "recolour",
            Edit::Add(_) => "add",
            Edit::Move { .. } => "move",
            Edit::Background(_) => "background",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::scene::{Row, Shape, Size};
    use super::*;

    fn scene() -> Scene {
        Scene {
            background: Colour::Green,
            objects: vec![Object {
                shape: Shape::Circle,
                colour: Colour::Red,
                size: Size::Small,
                column: Column::Left,
                row: Row::Middle,
            }],
        }
    }

    #[test]
    fn each_edit_changes_only_what_it_names() {
        let scene = scene();
        let recolour = Edit::Recolour {
            column: Column::Left,
            colour: Colour::Blue,
        };
        let after = recolour.apply(&scene).unwrap();
        assert_eq!(after.objects[0].colour, Colour::Blue);
        assert_eq!(after.objects[0].shape, Shape::Circle);
        assert_eq!(
            recolour.prompt(&scene).unwrap(),
            "a small blue circle on the left"
        );
        assert_eq!(recolour.describe(&scene), "make the circle blue");

        let triangle = Object {
            shape: Shape::Triangle,
            colour: Colour::Yellow,
            size: Size::Large,
            column: Column::Right,
            row: Row::Middle,
        };
        let after = Edit::Add(triangle).apply(&scene).unwrap();
        assert_eq!(after.objects, vec![scene.objects[0], triangle]);
        assert_eq!(
            Edit::Add(triangle).describe(&scene),
            "add a large yellow triangle on the right"
        );

        let moved = Edit::Move {
            from: Column::Left,
            to: Column::Middle,
        };
        assert_eq!(
            moved.prompt(&scene).unwrap(),
            "a small red circle in the middle"
        );
        let background = Edit::Background(Colour::White);
        assert_eq!(background.apply(&scene).unwrap().objects, scene.objects);
        assert_eq!(background.prompt(&scene).unwrap(), "on a white background");
    }

    #[test]
    fn edits_that_do_not_fit_the_scene_are_refused() {
        let scene = scene();
        let nothing_there = Edit::Recolour {
            column: Column::Right,
            colour: Colour::Blue,
        };
        assert!(nothing_there.apply(&scene).is_none());
        assert!(
            Edit::Recolour {
                column: Column::Left,
                colour: Colour::Green
            }
            .apply(&scene)
            .is_none(),
            "the background's colour would make the object vanish"
        );
        let taken = Edit::Add(Object {
            column: Column::Left,
            ..scene.objects[0]
        });
        assert!(taken.apply(&scene).is_none());
        assert!(Edit::Background(Colour::Red).apply(&scene).is_none());
    }

    #[test]
    fn masks_cover_what_the_edit_changes_and_nothing_it_keeps() {
        let scene = scene();
        let white = |mask: &GrayImage, x, y| mask.get_pixel(x, y).0[0] == 255;
        let recolour = Edit::Recolour {
            column: Column::Left,
            colour: Colour::Blue,
        }
        .mask(&scene);
        assert!(white(&recolour, 11, 32) && white(&recolour, 3, 60));
        assert!(!white(&recolour, 32, 32) && !white(&recolour, 60, 5));
        let background = Edit::Background(Colour::White).mask(&scene);
        assert!(!white(&background, 11, 32), "the circle stays");
        assert!(!white(&background, 11 + 7, 32), "and its rim");
        assert!(white(&background, 40, 10) && white(&background, 11, 60));
    }
}
