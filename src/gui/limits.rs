//! Every limit of the editor's values, in one place: the widgets that set a value, the
//! shortcuts that change it and the code that applies it all read it from here.

use std::ops::RangeInclusive;

/// The fidelity slider (the service's: the command line's `--fidelity` takes the same).
pub const FIDELITY: RangeInclusive<f64> = crate::jobs::FIDELITY_RANGE;
/// The SDEdit start, as a fraction of the schedule.
pub const T0: RangeInclusive<f64> = 0.0..=1.0;
pub const GUIDANCE: RangeInclusive<f64> = 0.0..=30.0;
/// Which snapshot the Advanced values sample from.
pub const TUNE_STEPS: RangeInclusive<usize> = 0..=256;
pub const SAMPLING_STEPS: RangeInclusive<usize> = 1..=150;
/// The brush's diameter in photo pixels (the slider, `[` and `]`).
pub const BRUSH_SIZE_PX: RangeInclusive<f32> = 2.0..=512.0;
/// How much `[` and `]` change the brush size, as a factor.
pub const BRUSH_STEP: f32 = 1.25;
/// Brush softness and mask overlay opacity.
pub const FRACTION: RangeInclusive<f32> = 0.0..=1.0;
/// How far the canvas zooms out and in (1 = the picture fits the panel).
pub const ZOOM: RangeInclusive<f32> = 0.1..=32.0;

/// The mask is painted at most at this resolution (and scaled to the photo for the engine).
/// A brush mask needs no more: the engine sees it at its working size (512-1024) and the
/// paste back feathers its edge, while each whole-mask upload (first stroke, clear, invert)
/// costs a UI frame time in proportion to its pixels.
pub const MASK_MAX_SIDE: u32 = 2048;
/// The side of a tune's reconstruction preview texture.
pub const TUNE_PREVIEW_SIDE: u32 = 512;
/// The side of an edit's live preview texture.
pub const LIVE_PREVIEW_SIDE: u32 = 1024;
