//! The variants of one edit: results at several positions of the fidelity slider (and
//! seeds), which the slider browses. No egui here, so the browsing rules are unit-tested.

use super::results::StoredResult;
use crate::jobs::{EditPlan, JobId, Recipe};

/// Where an edit first computes variants, in the order they are queued: the middle first
/// (where the slider starts), then the ends, so the range fills in from what is shown.
pub const FIRST_POSITIONS: [f64; 4] = [0.5, 0.0, 1.0, 0.75];

/// Two slider positions closer than this are the same variant.
const SAME_POSITION: f64 = 0.02;

/// The settings one variant was (or will be) made with.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantSettings {
    /// Every number of the edit; its `fidelity` is the slider position that chose them
    /// (`None` when the Advanced settings did).
    pub plan: EditPlan,
    pub seed: u64,
}

impl VariantSettings {
    /// The settings in words, e.g. "64 fine-tuning steps · t0 0.96 · guidance 9.0 · seed 7".
    pub fn describe(&self) -> String {
        format!("{} · seed {}", self.plan.describe(), self.seed)
    }

    /// The slider position that chose them, if one did.
    pub fn fidelity(&self) -> Option<f64> {
        self.plan.fidelity
    }
}

#[derive(Debug, Clone)]
pub enum VariantState {
    Queued,
    Running {
        step: usize,
        total: usize,
    },
    Done {
        /// At the photo's full size, on disk (see `results`).
        result: StoredResult,
        /// How it was made, written into its export.
        recipe: Box<Recipe>,
    },
    Failed(String),
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Variant {
    pub job: JobId,
    pub settings: VariantSettings,
    pub state: VariantState,
}

impl Variant {
    pub fn result(&self) -> Option<&StoredResult> {
        match &self.state {
            VariantState::Done { result, .. } => Some(result),
            _ => None,
        }
    }

    pub fn is_pending(&self) -> bool {
        matches!(
            self.state,
            VariantState::Queued | VariantState::Running { .. }
        )
    }

    /// How far this variant is from slider position `position` (custom ones are far).
    fn distance(&self, position: f64) -> f64 {
        self.settings
            .fidelity()
            .map_or(f64::INFINITY, |f| (f - position).abs())
    }
}

/// Every variant of the current edit, in the order they were asked for.
#[derive(Debug, Clone, Default)]
pub struct VariantSet {
    variants: Vec<Variant>,
    /// The variant the user picked in the strip (shown until the slider moves).
    selected: Option<usize>,
    /// The one job queued by releasing the slider, which a newer release supersedes.
    slider_job: Option<JobId>,
}

impl VariantSet {
    pub fn variants(&self) -> &[Variant] {
        &self.variants
    }

    pub fn is_empty(&self) -> bool {
        self.variants.is_empty()
    }

    pub fn push(&mut self, job: JobId, settings: VariantSettings) {
        self.variants.push(Variant {
            job,
            settings,
            state: VariantState::Queued,
        });
    }

    /// Adds the job for a slider release; returns the older slider job to cancel, if it has
    /// not finished.
    pub fn push_slider_request(&mut self, job: JobId, settings: VariantSettings) -> Option<JobId> {
        let older = self.slider_job.replace(job);
        self.push(job, settings);
        older.filter(|id| self.find(*id).is_some_and(Variant::is_pending))
    }

    /// Jobs not yet finished (to cancel when a new edit starts).
    pub fn pending_jobs(&self) -> Vec<JobId> {
        self.variants
            .iter()
            .filter(|v| v.is_pending())
            .map(|v| v.job)
            .collect()
    }

    /// Every finished result (to remove their files when the edit is replaced).
    pub fn into_results(self) -> Vec<StoredResult> {
        self.variants
            .into_iter()
            .filter_map(|v| match v.state {
                VariantState::Done { result, .. } => Some(result),
                _ => None,
            })
            .collect()
    }

    pub fn find(&self, job: JobId) -> Option<&Variant> {
        self.variants.iter().find(|v| v.job == job)
    }

    pub fn update(&mut self, job: JobId, state: VariantState) {
        if let Some(variant) = self.variants.iter_mut().find(|v| v.job == job) {
            variant.state = state;
        }
    }

    pub fn select(&mut self, index: usize) {
        if index < self.variants.len() {
            self.selected = Some(index);
        }
    }

    /// Forgets the strip selection, so the slider decides what is shown.
    pub fn follow_slider(&mut self) {
        self.selected = None;
    }

    /// The variant to show for slider position `position`: the one picked in the strip,
    /// else the finished one nearest the slider (newest first among equals).
    pub fn shown(&self, position: f64) -> Option<(usize, &Variant)> {
        if let Some(index) = self.selected
            && let Some(variant) = self.variants.get(index)
            && variant.result().is_some()
        {
            return Some((index, variant));
        }
        self.variants
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, v)| v.result().is_some())
            .min_by(|(_, a), (_, b)| a.distance(position).total_cmp(&b.distance(position)))
    }

    /// Whether releasing the slider at `position` needs a new job: nothing finished or on its
    /// way is at that position.
    pub fn needs_job_at(&self, position: f64) -> bool {
        !self.variants.iter().any(|v| {
            v.distance(position) < SAME_POSITION
                && !matches!(v.state, VariantState::Failed(_) | VariantState::Cancelled)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use image::RgbImage;

    use super::*;

    fn settings(fidelity: f64, seed: u64) -> VariantSettings {
        VariantSettings {
            plan: EditPlan {
                method: crate::jobs::EditMethod::UniTune,
                fidelity: Some(fidelity),
                tune_steps: 16,
                t0_fraction: Some(1.0),
                guidance_weight: 7.5,
            },
            seed,
        }
    }

    fn done(set: &mut VariantSet, job: JobId, value: u8) {
        set.update(
            job,
            VariantState::Done {
                result: StoredResult::Memory(Arc::new(RgbImage::from_pixel(
                    1,
                    1,
                    image::Rgb([value; 3]),
                ))),
                recipe: Box::new(Recipe::new("edit", "p", "m", "epsilon", "f32")),
            },
        );
    }

    #[test]
    fn the_slider_shows_the_nearest_finished_variant() {
        let mut set = VariantSet::default();
        set.push(1, settings(0.0, 1));
        set.push(2, settings(0.5, 1));
        set.push(3, settings(1.0, 1));
        assert!(set.shown(0.4).is_none());
        done(&mut set, 1, 10);
        done(&mut set, 3, 30);
        assert_eq!(set.shown(0.4).unwrap().1.job, 1);
        assert_eq!(set.shown(0.6).unwrap().1.job, 3);
        done(&mut set, 2, 20);
        assert_eq!(set.shown(0.6).unwrap().1.job, 2);
        // A strip pick wins until the slider takes over again.
        set.select(0);
        assert_eq!(set.shown(0.9).unwrap().1.job, 1);
        set.follow_slider();
        assert_eq!(set.shown(0.9).unwrap().1.job, 3);
    }

    #[test]
    fn a_newer_slider_release_supersedes_the_older_one_only_while_it_is_pending() {
        let mut set = VariantSet::default();
        assert!(set.needs_job_at(0.3));
        assert_eq!(set.push_slider_request(5, settings(0.3, 1)), None);
        assert!(!set.needs_job_at(0.3));
        assert_eq!(set.push_slider_request(6, settings(0.8, 1)), Some(5));
        set.update(5, VariantState::Cancelled);
        assert!(
            set.needs_job_at(0.3),
            "a cancelled position may be asked again"
        );
        done(&mut set, 6, 1);
        assert_eq!(set.push_slider_request(7, settings(0.1, 1)), None);
        assert_eq!(set.pending_jobs(), vec![7]);
    }
}
