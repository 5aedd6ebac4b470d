//! The edit form: what the side panel edits in place (the prompt, the baseline prompt, the
//! fidelity slider and the Advanced values). Plain values, autosaved when they change; every
//! other change the panels ask for is a [`super::commands::Command`].

use super::limits;
use super::persist::Settings;
use super::variants::VariantSettings;
use crate::jobs::{
    EditKind, EditKnobs, FidelityTable, RecipeSettings, RegionSetting, choose_seed, plan_edit,
};

#[derive(Debug, Clone)]
pub struct EditForm {
    pub prompt: String,
    pub baseline_prompt: String,
    pub fidelity: f64,
    pub advanced: Advanced,
}

/// Values the Advanced section edits.
#[derive(Debug, Clone)]
pub struct Advanced {
    /// Use the values below instead of the slider's.
    pub custom: bool,
    pub tune_steps: usize,
    pub t0_fraction: f64,
    pub guidance_weight: f64,
    /// Empty = a new random seed per edit.
    pub seed_text: String,
    /// The snapshot ladder, e.g. "16, 32, 64, 128".
    pub snapshot_text: String,
}

impl Default for EditForm {
    fn default() -> Self {
        Self::new(&crate::jobs::PAPER_SNAPSHOTS)
    }
}

impl EditForm {
    pub fn new(snapshot_steps: &[usize]) -> Self {
        Self {
            prompt: String::new(),
            baseline_prompt: String::new(),
            fidelity: 0.5,
            advanced: Advanced {
                custom: false,
                tune_steps: 64,
                t0_fraction: 0.96,
                guidance_weight: 9.0,
                seed_text: String::new(),
                snapshot_text: ladder_text(snapshot_steps),
            },
        }
    }

    /// The seed the next edit starts from: the one typed, else a fresh one.
    pub fn seed(&self) -> Result<u64, String> {
        match self.advanced.seed_text.trim() {
            "" => Ok(choose_seed(None)),
            text => text
                .parse::<u64>()
                .map_err(|_| format!("The seed must be a whole number, not \"{text}\".")),
        }
    }

    /// The variant at the slider's position (or the Advanced values, when they replace it)
    /// with `seed`, from the snapshots in `ladder`.
    pub fn variant(
        &self,
        seed: u64,
        ladder: &[usize],
        instruct: bool,
        table: &FidelityTable,
    ) -> VariantSettings {
        if self.advanced.custom {
            self.advanced_variant(seed, instruct, table)
        } else {
            variant_at(self.fidelity, seed, ladder, instruct, table)
        }
    }

    /// The Advanced section's values (for an instruction: its guidance, and the image
    /// guidance the slider sets).
    fn advanced_variant(
        &self,
        seed: u64,
        instruct: bool,
        table: &FidelityTable,
    ) -> VariantSettings {
        let advanced = &self.advanced;
        let (kind, knobs) = if instruct {
            let slider = variant_at(self.fidelity, seed, &[], true, table);
            (
                EditKind::Instruct,
                EditKnobs {
                    guidance_weight: Some(advanced.guidance_weight),
                    fidelity: None,
                    ..slider.plan.knobs()
                },
            )
        } else {
            (
                EditKind::Describe,
                EditKnobs {
                    fidelity: None,
                    tune_steps: Some(advanced.tune_steps),
                    t0_fraction: Some(advanced.t0_fraction),
                    guidance_weight: Some(advanced.guidance_weight),
                    image_guidance: None,
                },
            )
        };
        VariantSettings {
            plan: plan_edit(kind, &knobs, table, &[]),
            seed,
        }
    }

    /// An opened image's recipe as the next edit's prompt and settings: the prompt, the
    /// baseline prompt, the slider (or the Advanced values when the recipe set them itself),
    /// the seed, and in `settings` the sampling steps, interpolation and fine-tuning recipe.
    pub fn use_recipe(&mut self, recipe: &RecipeSettings, settings: &mut Settings) {
        self.prompt = recipe.prompt.clone();
        self.baseline_prompt = recipe.baseline_prompt.clone();
        let advanced = &mut self.advanced;
        if let Some(steps) = recipe.tune_steps {
            advanced.tune_steps = steps.min(*limits::TUNE_STEPS.end());
        }
        if let Some(t0) = recipe.t0_fraction {
            advanced.t0_fraction = t0.clamp(*limits::T0.start(), *limits::T0.end());
        }
        if let Some(guidance) = recipe.guidance_weight {
            advanced.guidance_weight =
                guidance.clamp(*limits::GUIDANCE.start(), *limits::GUIDANCE.end());
        }
        match recipe.fidelity {
            Some(fidelity) => {
                self.fidelity = fidelity.clamp(*limits::FIDELITY.start(), *limits::FIDELITY.end());
                advanced.custom = false;
            }
            None => advanced.custom = recipe.tune_steps.is_some() || recipe.t0_fraction.is_some(),
        }
        advanced.seed_text = recipe.seed.map_or_else(String::new, |s| s.to_string());
        if let Some(steps) = recipe.sampling_steps {
            settings.sampling_steps = steps.clamp(
                *limits::SAMPLING_STEPS.start(),
                *limits::SAMPLING_STEPS.end(),
            );
        }
        settings.interpolate = recipe.interpolate;
        if let Some(region) = recipe.region {
            settings.auto_region = matches!(region, RegionSetting::Auto(_));
        }
        if let Some(tuning) = recipe
            .tuning
            .as_ref()
            .and_then(|t| t.settings(&Default::default()))
        {
            settings.train_mode = tuning.mode;
            self.advanced.snapshot_text = ladder_text(&tuning.snapshot_steps);
        }
    }
}

/// The variant at slider `position`, using the snapshots in `ladder` (none = untuned); for
/// an instruction, the slider sets the image guidance.
pub fn variant_at(
    position: f64,
    seed: u64,
    ladder: &[usize],
    instruct: bool,
    table: &FidelityTable,
) -> VariantSettings {
    let kind = if instruct {
        EditKind::Instruct
    } else {
        EditKind::Describe
    };
    let knobs = EditKnobs {
        fidelity: Some(position),
        ..EditKnobs::default()
    };
    VariantSettings {
        plan: plan_edit(kind, &knobs, table, ladder),
        seed,
    }
}

pub fn ladder_text(steps: &[usize]) -> String {
    steps
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// "16, 32, 64" to `[16, 32, 64]`, with a sentence when it cannot be read.
pub fn parse_ladder(text: &str) -> Result<Vec<usize>, String> {
    let steps: Result<Vec<usize>, _> = text
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(str::parse::<usize>)
        .collect();
    match steps {
        Ok(steps) if !steps.is_empty() && steps[0] > 0 && steps.windows(2).all(|w| w[0] < w[1]) => {
            Ok(steps)
        }
        _ => Err(format!(
            "Fine-tuning snapshots must be increasing step counts like \"16, 32, 64, 128\", not \"{text}\"."
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladders_parse_or_explain() {
        assert_eq!(
            parse_ladder("16, 32,64 128").unwrap(),
            vec![16, 32, 64, 128]
        );
        assert!(parse_ladder("32, 16").is_err());
        assert!(parse_ladder("0, 4").is_err());
        assert!(parse_ladder("").is_err());
        assert_eq!(ladder_text(&[1, 2]), "1, 2");
    }

    #[test]
    fn a_typed_seed_is_kept_and_a_bad_one_explained() {
        let mut form = EditForm::default();
        form.advanced.seed_text = " 42 ".into();
        assert_eq!(form.seed(), Ok(42));
        form.advanced.seed_text = "forty".into();
        assert!(form.seed().unwrap_err().contains("whole number"));
    }
}
