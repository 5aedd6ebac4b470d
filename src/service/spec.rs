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
    /// White = may change. Any size: it is scaled to the photo's.
    pub mask: Option<Arc<GrayImage>>,
    /// How the recipe names the mask: its file name, or "painted in the editor".
    pub mask_name: Option<String>,
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
            mask: None,
            mask_name: None,
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
