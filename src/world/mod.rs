//! The demo world: small procedural scenes (a background and up to three coloured shapes),
//! the captions that say what is in them, and a scorer that reads an image back into a scene.
//!
//! The demo model (`assets/demo-model`) is trained on this world, which is what makes its
//! edits checkable by code: an edit's prompt is a caption fragment ("a small blue circle on the
//! left"), the scene it should produce is known, and [`read`] says what the model produced.

mod caption;
mod dataset;
mod edit;
mod read;
mod scene;
mod score;

pub use caption::{full as caption, partial as partial_caption};
pub use dataset::write_dataset;
pub use edit::Edit;
pub use read::read;
pub use scene::{
    Colour, Column, EXAMPLE_PROMPT, Object, Row, SIZE, Scene, Shape, Size, example_edit,
    example_scene,
};
pub use score::{EditScore, agreement, score_edit};
