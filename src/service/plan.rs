//! What an edit will do, decided in one place: the method and its numbers (snapshot, t0,
//! guidance) from the fidelity slider and any explicit overrides, the seed, and the working
//! size. Pure functions of plain values, so the editor calls them on its UI thread to label a
//! variant before the engine runs it, and the engine thread gets the same answer.

use crate::engine::edit::EditMethod;
use crate::engine::fidelity::FidelityTable;
use crate::engine::instruct::{DEFAULT_TEXT_GUIDANCE, image_guidance_for};
use crate::imaging::{self, ImagingError};

/// Where the fidelity slider sits when nothing says otherwise: its middle.
pub const DEFAULT_FIDELITY: f64 = 0.5;

/// The fidelity slider's range.
pub const FIDELITY_RANGE: std::ops::RangeInclusive<f64> = 0.0..=1.0;

/// What kind of edit is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EditKind {
    /// A description of the result, sampled from the photo's fine-tune (UniTune).
    #[default]
    Describe,
    /// An instruction for an InstructPix2Pix model ("make it winter").
    Instruct,
}

/// The knobs of one edit: the slider, and each number it chooses given explicitly instead.
/// An explicit number wins over the slider's choice of it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EditKnobs {
    /// 0 (expressive) to 1 (faithful); `None` = the slider's middle, not recorded as chosen.
    pub fidelity: Option<f64>,
    /// The snapshot to sample from (0 = no fine-tuning: plain SDEdit).
    pub tune_steps: Option<usize>,
    /// SDEdit start in [0, 1].
    pub t0_fraction: Option<f64>,
    pub guidance_weight: Option<f64>,
    /// InstructPix2Pix's image guidance (instructions only).
    pub image_guidance: Option<f64>,
}

/// What an edit runs with, every number decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EditPlan {
    pub method: EditMethod,
    /// The snapshot sampled from (0 = the untuned model).
    pub tune_steps: usize,
    /// SDEdit start; `None` for instructions, which start from noise with the photo beside.
    pub t0_fraction: Option<f64>,
    pub guidance_weight: f64,
    /// The slider position that chose the numbers, when one was given (for the recipe).
    pub fidelity: Option<f64>,
}

impl EditPlan {
    /// Knobs that give exactly this plan again, whatever the table or snapshots (how a plan
    /// made on one thread is sent to another).
    pub fn knobs(&self) -> EditKnobs {
        EditKnobs {
            fidelity: self.fidelity,
            tune_steps: Some(self.tune_steps),
            t0_fraction: self.t0_fraction,
            guidance_weight: Some(self.guidance_weight),
            image_guidance: match self.method {
                EditMethod::Instruct { image_guidance } => Some(image_guidance),
                EditMethod::UniTune => None,
            },
        }
    }

    /// The kind of edit this plan makes.
    pub fn kind(&self) -> EditKind {
        match self.method {
            EditMethod::Instruct { .. } => EditKind::Instruct,
            EditMethod::UniTune => EditKind::Describe,
        }
    }

    /// The plan in words, e.g. "64 fine-tuning steps · t0 0.96 · guidance 9.0".
    pub fn describe(&self) -> String {
        match self.method {
            EditMethod::Instruct { image_guidance } => format!(
                "instruction · image guidance {image_guidance:.2} · guidance {:.1}",
                self.guidance_weight
            ),
            EditMethod::UniTune => format!(
                "{} fine-tuning steps · t0 {:.2} · guidance {:.1}",
                self.tune_steps,
                self.t0_fraction.unwrap_or(1.0),
                self.guidance_weight
            ),
        }
    }
}

/// The one mapping from knobs to an edit: the model's fidelity table chooses from the
/// snapshots in `ladder` (those that exist or will), then explicit knobs override. For an
/// instruction the slider sets the image guidance instead (see `image_guidance_for`).
pub fn plan_edit(
    kind: EditKind,
    knobs: &EditKnobs,
    table: &FidelityTable,
    ladder: &[usize],
) -> EditPlan {
    let fidelity = knobs.fidelity.unwrap_or(DEFAULT_FIDELITY);
    match kind {
        EditKind::Instruct => EditPlan {
            method: EditMethod::Instruct {
                image_guidance: knobs
                    .image_guidance
                    .unwrap_or_else(|| image_guidance_for(fidelity)),
            },
            tune_steps: 0,
            t0_fraction: None,
            guidance_weight: knobs.guidance_weight.unwrap_or(DEFAULT_TEXT_GUIDANCE),
            fidelity: knobs.fidelity,
        },
        EditKind::Describe => {
            let row = table.parameters_for(fidelity, ladder);
            EditPlan {
                method: EditMethod::UniTune,
                tune_steps: knobs.tune_steps.unwrap_or(row.tune_steps),
                t0_fraction: Some(knobs.t0_fraction.unwrap_or(row.t0_fraction)),
                guidance_weight: knobs.guidance_weight.unwrap_or(row.guidance_weight),
                fidelity: knobs.fidelity,
            }
        }
    }
}

/// The seed asked for, else a fresh random one. Below 2^32, so it survives every tool that
/// reads seeds as 32-bit numbers or as JSON numbers.
pub fn choose_seed(requested: Option<u64>) -> u64 {
    requested.unwrap_or_else(|| rand::random::<u32>() as u64)
}

/// The size the model works at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkingSize {
    /// The model's native area at the photo's aspect ratio, in multiples of 64.
    #[default]
    Fit,
    /// `--size WxH`: both multiples of 64.
    Requested(u32, u32),
    /// The photo's own size: it was made at the working size (a benchmark's scene, a grid's
    /// cells); the model itself says whether it can work at it.
    AsIs,
}

impl From<Option<(u32, u32)>> for WorkingSize {
    fn from(requested: Option<(u32, u32)>) -> Self {
        requested.map_or(Self::Fit, |(w, h)| Self::Requested(w, h))
    }
}

/// The size the model works at for a photo of `photo` pixels (see [`WorkingSize`]), on a
/// model whose native square has sides of `model_side`.
pub fn working_size(
    photo: (u32, u32),
    model_side: u32,
    size: WorkingSize,
) -> Result<(u32, u32), ImagingError> {
    match size {
        WorkingSize::Fit => imaging::working_size(photo.0, photo.1, model_side, None),
        WorkingSize::Requested(w, h) => {
            imaging::working_size(photo.0, photo.1, model_side, Some((w, h)))
        }
        WorkingSize::AsIs => Ok(photo),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fidelity::{DEMO, STABLE_DIFFUSION};

    const LADDER: [usize; 4] = [16, 32, 64, 128];

    #[test]
    fn the_slider_chooses_and_explicit_knobs_win() {
        let slider = plan_edit(
            EditKind::Describe,
            &EditKnobs {
                fidelity: Some(1.0),
                ..EditKnobs::default()
            },
            &STABLE_DIFFUSION,
            &LADDER,
        );
        let row = STABLE_DIFFUSION.parameters_for(1.0, &LADDER);
        assert_eq!(
            (
                slider.tune_steps,
                slider.t0_fraction,
                slider.guidance_weight
            ),
            (row.tune_steps, Some(row.t0_fraction), row.guidance_weight)
        );
        assert_eq!(slider.fidelity, Some(1.0));
        let overridden = plan_edit(
            EditKind::Describe,
            &EditKnobs {
                fidelity: Some(1.0),
                tune_steps: Some(0),
                t0_fraction: Some(0.3),
                guidance_weight: Some(2.0),
                image_guidance: None,
            },
            &STABLE_DIFFUSION,
            &LADDER,
        );
        assert_eq!(
            (
                overridden.tune_steps,
                overridden.t0_fraction,
                overridden.guidance_weight
            ),
            (0, Some(0.3), 2.0)
        );
        assert_eq!(
            overridden.method.recipe_name(overridden.tune_steps),
            "sdedit"
        );
    }

    #[test]
    fn no_fidelity_means_the_middle_of_the_models_own_table_unrecorded() {
        let plan = plan_edit(EditKind::Describe, &EditKnobs::default(), &DEMO, &LADDER);
        let row = DEMO.parameters_for(DEFAULT_FIDELITY, &LADDER);
        assert_eq!(plan.tune_steps, row.tune_steps);
        assert_eq!(plan.fidelity, None);
    }

    #[test]
    fn instructions_take_the_image_guidance_from_the_slider() {
        let plan = plan_edit(
            EditKind::Instruct,
            &EditKnobs {
                fidelity: Some(1.0),
                ..EditKnobs::default()
            },
            &STABLE_DIFFUSION,
            &LADDER,
        );
        assert_eq!(
            plan.method,
            EditMethod::Instruct {
                image_guidance: image_guidance_for(1.0)
            }
        );
        assert_eq!((plan.tune_steps, plan.t0_fraction), (0, None));
        assert_eq!(plan.guidance_weight, DEFAULT_TEXT_GUIDANCE);
    }

    #[test]
    fn a_plans_knobs_give_it_again_under_any_table() {
        for kind in [EditKind::Describe, EditKind::Instruct] {
            for fidelity in [0.0, 0.3, 1.0] {
                let knobs = EditKnobs {
                    fidelity: Some(fidelity),
                    ..EditKnobs::default()
                };
                let plan = plan_edit(kind, &knobs, &STABLE_DIFFUSION, &LADDER);
                assert_eq!(plan_edit(kind, &plan.knobs(), &DEMO, &[]), plan);
                assert_eq!(plan.kind(), kind);
            }
        }
    }

    #[test]
    fn seeds_are_kept_or_drawn_below_two_to_the_32() {
        assert_eq!(choose_seed(Some(7)), 7);
        assert!(choose_seed(None) < 1 << 32);
    }
}
