//! The open photo and its mask, how a photo gets there (opened from a file or restored from
//! autosave, decoded off the UI thread; requests carry ids and the newest wins), and the
//! recipe an opened image may offer.

use std::path::PathBuf;
use std::sync::Arc;

use egui::{ColorImage, Context, TextureHandle};
use image::{GrayImage, RgbImage};

use super::background::{OpenId, OpenedPhoto};
use super::limits::MASK_MAX_SIDE;
use super::mask::MaskLayer;
use super::session::PhotoRef;
use super::textures;
use crate::imaging::PhotoMetadata;
use crate::jobs::RecipeSettings;

/// The open photo and its mask.
pub struct Document {
    /// Changes whenever the photo does (autosave, and tunes, key on it).
    pub version: u64,
    pub source: Option<PathBuf>,
    /// The colour over white (where the file has transparency): what the model sees.
    pub photo: Arc<RgbImage>,
    pub alpha: Option<Arc<GrayImage>>,
    /// With `alpha`: the colour the file holds, which exports give back where an edit left
    /// the photo alone.
    pub file_rgb: Option<Arc<RgbImage>>,
    /// The file's ICC profile and EXIF, carried into exports.
    pub metadata: Arc<PhotoMetadata>,
    pub mask: MaskLayer,
    pub texture: TextureHandle,
    /// The mask overlay, made at the first stroke.
    pub mask_texture: Option<TextureHandle>,
}

/// What a new document is made of.
pub struct NewDocument {
    pub source: Option<PathBuf>,
    pub photo: RgbImage,
    pub display: ColorImage,
    pub alpha: Option<GrayImage>,
    pub file_rgb: Option<RgbImage>,
    pub metadata: PhotoMetadata,
    pub mask: Option<GrayImage>,
}

impl Document {
    /// The document for `new`, numbered `version`; its mask at most [`MASK_MAX_SIDE`] wide.
    pub fn new(ctx: &Context, version: u64, new: NewDocument) -> Self {
        let (w, h) = new.photo.dimensions();
        let (mw, mh) = textures::capped_size(w, h, MASK_MAX_SIDE);
        let mask = match new.mask {
            Some(m) if m.dimensions() == (mw, mh) => MaskLayer::from_image(m),
            Some(m) => MaskLayer::from_image(crate::imaging::resize_gray(&m, mw, mh)),
            None => MaskLayer::new(mw, mh),
        };
        Self {
            version,
            source: new.source,
            photo: Arc::new(new.photo),
            alpha: new.alpha.filter(|a| a.dimensions() == (w, h)).map(Arc::new),
            file_rgb: new
                .file_rgb
                .filter(|c| c.dimensions() == (w, h))
                .map(Arc::new),
            metadata: Arc::new(new.metadata),
            mask,
            texture: textures::upload(ctx, "photo", new.display),
            mask_texture: None,
        }
    }

    /// The photo's file name (what recipes name it by; never its folder).
    pub fn file_name(&self) -> Option<String> {
        self.source
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
    }

    /// The file name without its extension ("photo" when it has none).
    pub fn stem(&self) -> String {
        self.source
            .as_ref()
            .and_then(|p| p.file_stem())
            .map_or("photo".to_string(), |s| s.to_string_lossy().into_owned())
    }

    /// The folder the photo came from (where save dialogs start).
    pub fn folder(&self) -> Option<PathBuf> {
        self.source
            .as_ref()
            .and_then(|p| p.parent().map(PathBuf::from))
    }

    /// The photo as an edit's jobs need it.
    pub fn photo_ref(&self) -> PhotoRef<'_> {
        PhotoRef {
            version: self.version,
            photo: &self.photo,
            name: self.file_name(),
        }
    }
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
