//! Scoring what a model made against the scene it should have made.
//!
//! A scene is a list of attributes: the background's colour, and for each column whether it
//! holds an object and, if it does, that object's colour, shape, size and row. An edit names
//! some of them (its *success* attributes: the recoloured object's colour, the added object's
//! presence and colour, the background); *fidelity* is the share of the others, everything the
//! edit did not ask to change, that are still as they were.

use serde::Serialize;

use super::edit::Edit;
use super::scene::{Column, Scene};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attribute {
    Background,
    Present(Column),
    Colour(Column),
    Shape(Column),
    Size(Column),
    Row(Column),
}

/// Every attribute of `scene`: an empty column has only its emptiness.
fn attributes(scene: &Scene) -> Vec<Attribute> {
    let mut out = vec![Attribute::Background];
    for column in Column::ALL {
        out.push(Attribute::Present(column));
        if scene.object_in(column).is_some() {
            out.extend([
                Attribute::Colour(column),
                Attribute::Shape(column),
                Attribute::Size(column),
                Attribute::Row(column),
            ]);
        }
    }
    out
}

fn same(attribute: Attribute, expected: &Scene, got: &Scene) -> bool {
    let pair = |c: Column| (expected.object_in(c), got.object_in(c));
    match attribute {
        Attribute::Background => expected.background == got.background,
        Attribute::Present(c) => expected.object_in(c).is_some() == got.object_in(c).is_some(),
        Attribute::Colour(c) => matches!(pair(c), (Some(a), Some(b)) if a.colour == b.colour),
        Attribute::Shape(c) => matches!(pair(c), (Some(a), Some(b)) if a.shape == b.shape),
        Attribute::Size(c) => matches!(pair(c), (Some(a), Some(b)) if a.size == b.size),
        Attribute::Row(c) => matches!(pair(c), (Some(a), Some(b)) if a.row == b.row),
    }
}

/// The share of `expected`'s attributes that `got` has: 1 for a perfect reconstruction.
pub fn agreement(expected: &Scene, got: &Scene) -> f32 {
    let all = attributes(expected);
    all.iter().filter(|&&a| same(a, expected, got)).count() as f32 / all.len() as f32
}

/// How one edit came out.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct EditScore {
    /// Everything the edit asked for is there.
    pub success: bool,
    /// The share of what the edit did not ask to change that is unchanged.
    pub fidelity: f32,
}

/// Scores `got` as the result of `edit` on `source`; `None` when the edit does not apply.
pub fn score_edit(edit: &Edit, source: &Scene, got: &Scene) -> Option<EditScore> {
    let expected = edit.apply(source)?;
    let (asked, free) = asked_and_free(edit);
    let success = asked.iter().all(|&a| same(a, &expected, got));
    let kept: Vec<Attribute> = attributes(&expected)
        .into_iter()
        .filter(|a| !asked.contains(a) && !free.contains(a))
        .collect();
    let fidelity = if kept.is_empty() {
        1.0
    } else {
        kept.iter().filter(|&&a| same(a, &expected, got)).count() as f32 / kept.len() as f32
    };
    Some(EditScore { success, fidelity })
}

/// The attributes an edit asks for, and those it leaves open (an added object's shape, size
/// and row are the model's to choose as far as success goes; they do not count either way).
fn asked_and_free(edit: &Edit) -> (Vec<Attribute>, Vec<Attribute>) {
    use Attribute::*;
    match *edit {
        Edit::Recolour { column, .. } => (vec![Present(column), Colour(column)], vec![]),
        Edit::Add(o) => (
            vec![Present(o.column), Colour(o.column)],
            vec![Shape(o.column), Size(o.column), Row(o.column)],
        ),
        Edit::Move { from, to } => (vec![Present(from), Present(to), Colour(to)], vec![]),
        Edit::Background(_) => (vec![Background], vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::super::scene::{Colour, Object, Row, Shape, Size};
    use super::*;

    fn scene() -> Scene {
        super::super::scene::two_object_scene()
    }

    #[test]
    fn agreement_counts_attributes() {
        let source = scene();
        assert_eq!(agreement(&source, &source), 1.0);
        // 1 background + 3 presences + 2 objects x 4 = 12 attributes.
        let mut got = source.clone();
        got.objects[0].shape = Shape::Square;
        assert_eq!(agreement(&source, &got), 11.0 / 12.0);
        got.objects.remove(1);
        assert_eq!(agreement(&source, &got), 6.0 / 12.0);
        got.background = Colour::White;
        assert_eq!(agreement(&source, &got), 5.0 / 12.0);
    }

    #[test]
    fn an_edit_scores_success_on_what_it_asks_and_fidelity_on_the_rest() {
        let source = scene();
        let edit = Edit::Recolour {
            column: Column::Left,
            colour: Colour::Yellow,
        };
        let perfect = edit.apply(&source).unwrap();
        assert_eq!(
            score_edit(&edit, &source, &perfect),
            Some(EditScore {
                success: true,
                fidelity: 1.0
            })
        );
        // Nothing changed: the edit failed, everything else was kept.
        assert_eq!(
            score_edit(&edit, &source, &source),
            Some(EditScore {
                success: false,
                fidelity: 1.0
            })
        );
        // Recoloured, but the other object went too: 10 kept attributes, 5 of them lost.
        let mut lost = perfect.clone();
        lost.objects.remove(1);
        assert_eq!(
            score_edit(&edit, &source, &lost),
            Some(EditScore {
                success: true,
                fidelity: 5.0 / 10.0
            })
        );

        let add = Edit::Add(Object {
            shape: Shape::Triangle,
            colour: Colour::Yellow,
            size: Size::Large,
            column: Column::Middle,
            row: Row::Middle,
        });
        // The model drew a small yellow circle at the top instead: still the asked addition.
        let mut drawn = add.apply(&source).unwrap();
        drawn.objects[1].shape = Shape::Circle;
        drawn.objects[1].size = Size::Small;
        drawn.objects[1].row = Row::Top;
        assert_eq!(score_edit(&add, &source, &drawn).unwrap().fidelity, 1.0);
        assert!(score_edit(&add, &source, &drawn).unwrap().success);

        let background = Edit::Background(Colour::White);
        let got = background.apply(&source).unwrap();
        assert!(score_edit(&background, &source, &got).unwrap().success);
        assert!(!score_edit(&background, &source, &source).unwrap().success);
        assert!(score_edit(&background, &source, &scene()).is_some());
        let no_fit = Edit::Recolour {
            column: Column::Middle,
            colour: Colour::Yellow,
        };
        assert_eq!(score_edit(&no_fit, &source, &source), None);
    }
}
