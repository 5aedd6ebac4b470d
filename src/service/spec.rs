//! What a front end asks the service for: an edit ([`EditSpec`]), a fine-tune
//! ([`TuneRequest`]) or an image from text alone ([`GenerateSpec`]). Plain values (images,
//! numbers, text), so the editor builds them on its UI thread and sends them to the engine
//! thread as they are.

use std::sync::Arc;

use image::{GrayImage, RgbImage};

use super::plan::{EditKind, EditKnobs, WorkingSize};
use crate::engine::finetune::TuneSettings;

/// One edit of one photo. The command line maps its flags onto it; the editor its form.
#[derive(Debug, Clone)]
pub struct EditSpec {
    /// The photo at its own size (shared: a large photo queues many variants without copies).
    pub photo: Arc<RgbImage>,
    /// The photo's file name, never its folder (for the recipe).
    pub photo_name: Option<String>,
    /// Where the edit may change the photo.
    pub region: Region,
    pub kind: EditKind,
    /// What the photo should become (or, for an instruction, how it should change).
    pub prompt: String,
    /// A description of the photo for prompt guidance; `None` = classifier-free guidance.
    pub baseline_prompt: Option<String>,
    pub knobs: EditKnobs,
    pub seed: u64,
    pub sampling_steps: usize,
    /// Blend toward the original where neighbourhoods match (paper 3.4).
    pub interpolate: bool,
    pub size: WorkingSize,
}

impl EditSpec {
    /// An edit of `photo` toward `prompt` with every setting at its default (the slider's
    /// middle, 50 sampling steps, seed 0).
    pub fn new(photo: Arc<RgbImage>, prompt: &str) -> Self {
        Self {
            photo,
            photo_name: None,
            region: Region::All,
            kind: EditKind::Describe,
            prompt: prompt.to_owned(),
            baseline_prompt: None,
            knobs: EditKnobs::default(),
            seed: 0,
            sampling_steps: 50,
            interpolate: false,
            size: WorkingSize::Fit,
        }
    }
}

/// Where an edit may change the photo; everywhere else the photo comes back exactly.
#[derive(Debug, Clone)]
pub enum Region {
    /// Everywhere (no mask).
    All,
    /// Where a mask is white. Any size: it is scaled to the photo's.
    Mask {
        mask: Arc<GrayImage>,
        /// How the recipe names it: its file name, or "painted in the editor".
        name: String,
    },
    /// Estimated from the prompt before sampling ([`crate::engine::region`]): where the
    /// normalised difference reaches `threshold`, or everywhere for a global edit.
    Auto { threshold: f64 },
}

impl Region {
    /// The recipe's name for the mode: `all`, `mask` or `auto`.
    pub fn mode_name(&self) -> &'static str {
        match self {
            Region::All => "all",
            Region::Mask { .. } => "mask",
            Region::Auto { .. } => "auto",
        }
    }
}

/// A fine-tune of one photo.
#[derive(Debug, Clone, Copy)]
pub struct TuneRequest<'a> {
    /// The photo at its own size; the service fits it to the working size.
    pub photo: &'a RgbImage,
    pub settings: &'a TuneSettings,
    pub size: WorkingSize,
    /// Every how many steps the progress carries the model's reconstruction of the photo (one
    /// extra UNet call each); `None` for none.
    pub reconstruct_every: Option<usize>,
    /// When the training does not fit the device's free memory at any micro-batch (SDXL's
    /// full fine-tune on a 12 GB card), train the first lighter settings that do,
    /// said in a [`crate::engine::edit::TuneEvent::Notice`], instead of failing: on where a
    /// person edits, off where the mode itself is what is measured (bench, eval).
    pub lighter_mode_if_short: bool,
}

/// An image from a prompt alone (text to image).
#[derive(Debug, Clone)]
pub struct GenerateSpec {
    pub prompt: String,
    pub seed: u64,
    pub sampling_steps: usize,
    pub guidance_weight: f64,
    /// `--size WxH`, multiples of 64; `None` is the model's native size.
    pub size: Option<(u32, u32)>,
}
