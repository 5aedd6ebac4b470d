//! What a scene says in words: the captions the demo model learns from, and the phrases edit
//! prompts are made of.
//!
//! One grammar for both, so that an edit prompt ("a small yellow triangle on the right",
//! "on a white background") is exactly a part of some caption the model was trained on.

use rand::RngExt;

use super::scene::{Column, Object, Row, Scene};

/// "on the left", "at the top right", "in the middle", ...
pub fn position(column: Column, row: Row) -> &'static str {
    match (row, column) {
        (Row::Middle, Column::Left) => "on the left",
        (Row::Middle, Column::Middle) => "in the middle",
        (Row::Middle, Column::Right) => "on the right",
        (Row::Top, Column::Left) => "at the top left",
        (Row::Top, Column::Middle) => "at the top",
        (Row::Top, Column::Right) => "at the top right",
        (Row::Bottom, Column::Left) => "at the bottom left",
        (Row::Bottom, Column::Middle) => "at the bottom",
        (Row::Bottom, Column::Right) => "at the bottom right",
    }
}

/// "a small red circle on the left".
pub fn object(o: &Object) -> String {
    format!(
        "a {} {} {} {}",
        o.size.name(),
        o.colour.name(),
        o.shape.name(),
        position(o.column, o.row)
    )
}

/// "on a green background".
pub fn background(scene: &Scene) -> String {
    format!("on a {} background", scene.background.name())
}

/// Everything in the scene: "a small red circle on the left and a large blue square at the
/// top right, on a green background".
pub fn full(scene: &Scene) -> String {
    join(
        &scene.objects.iter().collect::<Vec<_>>(),
        Some(background(scene)),
    )
}

/// A caption that leaves some of the scene out (objects, the background or both, never
/// everything): the model learns that what a caption does not name can be anything, which
/// is what lets an edit prompt name only the change.
pub fn partial(scene: &Scene, rng: &mut impl RngExt) -> String {
    loop {
        let objects: Vec<&Object> = scene
            .objects
            .iter()
            .filter(|_| rng.random_bool(0.5))
            .collect();
        let background = rng.random_bool(0.5).then(|| background(scene));
        if !objects.is_empty() || background.is_some() {
            return join(&objects, background);
        }
    }
}

fn join(objects: &[&Object], background: Option<String>) -> String {
    let phrases: Vec<String> = objects.iter().map(|o| object(o)).collect();
    let objects = match phrases.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    };
    match (objects.is_empty(), background) {
        (_, None) => objects,
        (true, Some(background)) => background,
        (false, Some(background)) => format!("{objects}, {background}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::scene::{Colour, Shape, Size};
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn two_objects() -> Scene {
        super::super::scene::two_object_scene()
    }

    #[test]
    fn the_full_caption_says_everything_in_order() {
        let mut scene = two_objects();
        assert_eq!(
            full(&scene),
            "a small red circle on the left and a large blue square at the top right, \
             on a green background"
        );
        scene.objects.insert(
            1,
            Object {
                shape: Shape::Triangle,
                colour: Colour::Yellow,
                size: Size::Large,
                column: Column::Middle,
                row: Row::Bottom,
            },
        );
        assert_eq!(
            full(&scene),
            "a small red circle on the left, a large yellow triangle at the bottom and a large \
             blue square at the top right, on a green background"
        );
    }

    #[test]
    fn partial_captions_are_parts_of_the_full_one_and_vary() {
        let scene = two_objects();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let captions: std::collections::BTreeSet<String> =
            (0..200).map(|_| partial(&scene, &mut rng)).collect();
        // Two objects and a background: seven non-empty subsets.
        assert_eq!(captions.len(), 7, "{captions:?}");
        assert!(captions.contains("on a green background"));
        assert!(captions.contains("a small red circle on the left"));
        assert!(captions.contains(&full(&scene)));
        for caption in &captions {
            assert!(!caption.is_empty());
        }
    }
}
