//! The open photo and its mask, and how a photo gets there: opened from a file or restored
//! from autosave, decoded off the UI thread. Open requests carry ids and the newest wins: a
//! slow decode of an older request never replaces a newer photo, nor ends its "opening".

use std::path::PathBuf;
use std::sync::Arc;

use egui::{ColorImage, TextureHandle};
use image::{GrayImage, RgbImage};

use super::app::EditorApp;
use super::background::{OpenId, OpenedPhoto};
use super::canvas::View;
use super::mask::MaskLayer;
use super::persist::RestoredSession;
use super::session::{EditSession, ladder_text};
use super::textures;
use crate::jobs::RecipeSettings;

/// The mask is painted at most at this resolution (and scaled to the photo for the engine).
/// A brush mask needs no more: the engine sees it at its working size (512-768) and the
/// paste back feathers its edge, while each whole-mask upload (first stroke, clear,
/// invert) costs a UI frame time in proportion to its pixels.
const MASK_MAX_SIDE: u32 = 2048;

/// The open photo and its mask.
pub struct Document {
    /// Changes whenever the photo does (autosave, and tunes, key on it).
    pub version: u64,
    pub source: Option<PathBuf>,
    pub photo: Arc<RgbImage>,
    pub alpha: Option<Arc<GrayImage>>,
    pub mask: MaskLayer,
    pub texture: TextureHandle,
    /// The mask overlay, made at the first stroke.
    pub mask_texture: Option<TextureHandle>,
}

/// An image that holds the recipe it was made with (unitune's, or AUTOMATIC1111's infotext),
/// offered to the user: its prompt and settings for the next edit, and, when another photo
/// was open, the image itself as the photo (nothing replaces the open work unasked).
pub struct RecipeOffer {
    /// The image's file name.
    pub name: String,
    pub recipe: Box<RecipeSettings>,
    /// The decoded image, while the open photo stays (`None`: it is the open photo).
    pub image: Option<(PathBuf, OpenedPhoto)>,
}

/// The open requests in flight: only the newest one's result is used.
#[derive(Debug, Default)]
pub struct Opening {
    last: OpenId,
    newest: Option<OpenId>,
}

impl Opening {
    /// A new request, which supersedes every older one.
    pub fn start(&mut self) -> OpenId {
        self.last += 1;
        self.newest = Some(self.last);
        self.last
    }

    /// Whether the result of `request` is to be used (it is the newest); the opening is then
    /// over. Results of superseded requests are not.
    pub fn finish(&mut self, request: OpenId) -> bool {
        let newest = self.newest == Some(request);
        if newest {
            self.newest = None;
        }
        newest
    }

    pub fn in_progress(&self) -> bool {
        self.newest.is_some()
    }
}

impl EditorApp {
    pub(super) fn open_photo(&mut self, path: PathBuf) {
        let request = self.opening.start();
        self.chores.open_photo(request, path);
    }

    pub(super) fn restore_session(&mut self) {
        let request = self.opening.start();
        self.chores
            .restore_session(request, self.options.state.clone());
    }

    pub(super) fn on_photo_opened(
        &mut self,
        request: OpenId,
        path: PathBuf,
        result: Result<OpenedPhoto, String>,
    ) {
        if !self.opening.finish(request) {
            return;
        }
        match result {
            Ok(mut opened) => {
                let name = path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                let Some(recipe) = opened.recipe.take() else {
                    self.show_opened(path, opened);
                    return self.info(format!("Opened {name}."));
                };
                let prompt = recipe.prompt.clone();
                if self.doc.is_some() {
                    self.recipe_offer = Some(RecipeOffer {
                        name: name.clone(),
                        recipe,
                        image: Some((path, opened)),
                    });
                    self.info(format!(
                        "{name} holds the recipe it was made with (\"{prompt}\"): use its prompt and settings, or open it as the photo."
                    ));
                } else {
                    self.show_opened(path, opened);
                    self.recipe_offer = Some(RecipeOffer {
                        name: name.clone(),
                        recipe,
                        image: None,
                    });
                    self.info(format!(
                        "Opened {name}. It holds the recipe it was made with (\"{prompt}\"): use its prompt and settings to edit another photo the same way."
                    ));
                }
            }
            // The current work stays as it was.
            Err(message) => self.error(format!("Could not open that file: {message}")),
        }
    }

    fn show_opened(&mut self, path: PathBuf, opened: OpenedPhoto) {
        self.settings.remember_file(&path);
        let photo = opened.photo;
        self.set_photo(Some(path), photo.rgb, opened.display, photo.alpha, None);
    }

    /// Opens the offered image as the photo (the recipe stays on offer).
    pub(super) fn open_offered_image(&mut self) {
        let Some((path, opened)) = self.recipe_offer.as_mut().and_then(|o| o.image.take()) else {
            return;
        };
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        self.show_opened(path, opened);
        self.info(format!("Opened {name}."));
    }

    /// The offered recipe's prompt and settings become the next edit's: the prompt, the
    /// baseline prompt, the slider (or the Advanced values when the recipe set them itself),
    /// the seed, sampling steps, interpolation and the fine-tuning recipe.
    pub(super) fn use_offered_recipe(&mut self) {
        let Some(offer) = self.recipe_offer.take() else {
            return;
        };
        let recipe = offer.recipe;
        self.form.prompt = recipe.prompt.clone();
        self.form.baseline_prompt = recipe.baseline_prompt.clone();
        let advanced = &mut self.form.advanced;
        if let Some(steps) = recipe.tune_steps {
            advanced.tune_steps = steps;
        }
        if let Some(t0) = recipe.t0_fraction {
            advanced.t0 = t0;
        }
        if let Some(guidance) = recipe.guidance_weight {
            advanced.guidance = guidance;
        }
        match recipe.fidelity {
            Some(fidelity) => {
                self.form.fidelity = fidelity.clamp(0.0, 1.0);
                advanced.custom = false;
            }
            None => advanced.custom = recipe.tune_steps.is_some() || recipe.t0_fraction.is_some(),
        }
        advanced.seed_text = recipe.seed.map_or_else(String::new, |s| s.to_string());
        if let Some(steps) = recipe.sampling_steps.filter(|s| *s > 0) {
            self.settings.sampling_steps = steps;
        }
        self.settings.interpolate = recipe.interpolate;
        if let Some(tuning) = recipe
            .tuning
            .as_ref()
            .and_then(|t| t.settings(&Default::default()))
        {
            self.settings.train_mode = tuning.mode;
            self.form.advanced.snapshot_text = ladder_text(&tuning.snapshot_steps);
        }
        let note = if recipe.instruct != self.model.is_instruct() {
            if recipe.instruct {
                " It was an instruction edit: load an InstructPix2Pix model to repeat it."
            } else {
                " It was made by describing the result: load a Stable Diffusion model to repeat it."
            }
        } else {
            " Press Edit to make it again."
        };
        self.info(format!(
            "Using the prompt and settings of {}.{note}",
            offer.name
        ));
    }

    pub(super) fn on_session_restored(
        &mut self,
        request: OpenId,
        restored: Option<(RestoredSession, ColorImage)>,
    ) {
        if !self.opening.finish(request) {
            return;
        }
        if let Some((restored, display)) = restored
            && self.doc.is_none()
        {
            self.form.prompt = restored.text.prompt.clone();
            self.form.baseline_prompt = restored.text.baseline_prompt.clone();
            self.form.fidelity = restored.text.fidelity.clamp(0.0, 1.0);
            self.set_photo(
                restored.text.source.clone(),
                restored.photo,
                display,
                restored.alpha,
                restored.mask,
            );
            self.info("Restored your last photo, mask and prompt.");
        }
    }

    /// An open or restore that failed unexpectedly: only the newest one's ends the opening.
    pub(super) fn on_open_failed(&mut self, request: OpenId) -> bool {
        self.opening.finish(request)
    }

    fn set_photo(
        &mut self,
        source: Option<PathBuf>,
        photo: RgbImage,
        display: ColorImage,
        alpha: Option<GrayImage>,
        mask: Option<GrayImage>,
    ) {
        self.cancel_all();
        let (w, h) = photo.dimensions();
        let (mw, mh) = textures::capped_size(w, h, MASK_MAX_SIDE);
        let mask = match mask {
            Some(m) if m.dimensions() == (mw, mh) => MaskLayer::from_image(m),
            Some(m) => MaskLayer::from_image(crate::imaging::resize_gray(&m, mw, mh)),
            None => MaskLayer::new(mw, mh),
        };
        let version = self.next_version;
        self.next_version += 1;
        self.doc = Some(Document {
            version,
            source,
            photo: Arc::new(photo),
            alpha: alpha.filter(|a| a.dimensions() == (w, h)).map(Arc::new),
            mask,
            texture: textures::upload(&self.ctx, "photo", display),
            mask_texture: None,
        });
        let old = std::mem::take(&mut self.session);
        self.discard_results(old.variants);
        self.session = EditSession::default();
        self.view = View {
            tool: self.view.tool,
            ..View::default()
        };
        self.focus_prompt = true;
        self.save_session_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_open_request_wins_and_ends_the_opening() {
        let mut opening = Opening::default();
        assert!(!opening.in_progress());
        let first = opening.start();
        let second = opening.start();
        assert!(!opening.finish(first), "an older result is not used");
        assert!(
            opening.in_progress(),
            "nor does it end the newer one's opening"
        );
        assert!(opening.finish(second));
        assert!(!opening.in_progress());
        assert!(!opening.finish(second), "a result is used once");
    }
}
