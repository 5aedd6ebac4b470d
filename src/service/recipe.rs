//! The recipe of what the service made, written in one place for every front end: the
//! model by name and hash, the photo and mask by file name, never a folder.

use super::model::ModelSummary;
use super::plan::EditPlan;
use super::spec::{EditSpec, GenerateSpec, Region};
use crate::engine::edit::{EditMethod, model_prompt};
use crate::engine::finetune::TuneSettings;
use crate::recipe::{Recipe, TuneRecipe};

/// A recipe naming `model`, with everything else at its "not used" value.
fn base(mode: &str, prompt: &str, model: &ModelSummary) -> Recipe {
    let identity = &model.identity;
    Recipe {
        model_family: Some(model.architecture.to_owned()),
        model_hash: identity.hash.clone(),
        model_fingerprint: identity.fingerprint.clone(),
        model_revision: identity.revision.clone(),
        vae: identity.vae.clone(),
        loras: identity.loras.clone(),
        ..Recipe::new(
            mode,
            prompt,
            &identity.name,
            model.prediction_type,
            model.precision,
        )
    }
}

/// The recipe of an edit made with `plan`; `token` and `tuning` when it sampled a snapshot.
pub(super) fn edit_recipe(
    model: &ModelSummary,
    spec: &EditSpec,
    plan: &EditPlan,
    token: Option<&str>,
    tuning: Option<&TuneSettings>,
    (working_width, working_height): (u32, u32),
) -> Recipe {
    let (width, height) = spec.photo.dimensions();
    Recipe {
        method: plan.method.recipe_name(plan.tune_steps).to_owned(),
        image_guidance: match plan.method {
            EditMethod::Instruct { image_guidance } => Some(image_guidance),
            EditMethod::UniTune => None,
        },
        model_prompt: model_prompt(token, &spec.prompt),
        baseline_prompt: spec.baseline_prompt.clone().unwrap_or_default(),
        seed: spec.seed,
        sampling_steps: spec.sampling_steps,
        guidance_weight: plan.guidance_weight,
        t0_fraction: plan.t0_fraction,
        fidelity: plan.fidelity,
        tune_steps: plan.tune_steps,
        tuning: tuning.map(TuneRecipe::from_settings),
        mask: match &spec.region {
            Region::Mask { name, .. } => Some(name.clone()),
            _ => None,
        },
        region: spec.region.mode_name().to_owned(),
        region_threshold: match spec.region {
            Region::Auto { threshold } => Some(threshold),
            _ => None,
        },
        interpolate: spec.interpolate,
        // Results come back at the photo's size.
        width,
        height,
        working_width,
        working_height,
        source_image: spec.photo_name.clone(),
        ..base("edit", &spec.prompt, model)
    }
}

/// The recipe of an image made from text alone at `size`.
pub(super) fn generate_recipe(
    model: &ModelSummary,
    spec: &GenerateSpec,
    (width, height): (u32, u32),
) -> Recipe {
    Recipe {
        seed: spec.seed,
        sampling_steps: spec.sampling_steps,
        guidance_weight: spec.guidance_weight,
        width,
        height,
        working_width: width,
        working_height: height,
        ..base("generate", &spec.prompt, model)
    }
}

/// The recipe a LoRA file's metadata carries (`unitune.recipe`): how the photo was
/// fine-tuned, on which model, at which size, in which precision.
pub(super) fn lora_recipe_json(
    model: &ModelSummary,
    tuning: &TuneSettings,
    (working_width, working_height): (u32, u32),
    photo_name: Option<&str>,
) -> String {
    let identity = &model.identity;
    serde_json::json!({
        "tuning": TuneRecipe::from_settings(tuning),
        "model": identity.name,
        "model_family": model.architecture,
        "model_hash": identity.hash,
        "model_fingerprint": identity.fingerprint,
        "model_revision": identity.revision,
        "vae": identity.vae,
        "loras": identity.loras,
        "prediction_type": model.prediction_type,
        "precision": model.precision,
        "working_width": working_width,
        "working_height": working_height,
        "source_image": photo_name,
    })
    .to_string()
}
