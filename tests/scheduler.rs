//! The noise schedule and DDIM against diffusers' DDIMScheduler, for each fixture's own
//! scheduler config (SD 1.5 ships a PNDM config; SD 2 a DDIM one with v-prediction).
//!
//! Tolerances: schedules 1e-6 absolute (float32 arithmetic in a different order); timesteps
//! exactly; add_noise / velocity / steps 1e-5 absolute.

mod common;

use std::path::Path;

use common::{MODELS, Reference, assert_close, model_dir};
use unitune::engine::config::SchedulerConfig;
use unitune::engine::scheduler::DdimScheduler;

fn config_with(name: &str, overrides: &[(&str, serde_json::Value)]) -> SchedulerConfig {
    let file = model_dir(name).join("scheduler/scheduler_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    for (key, value) in overrides {
        json[*key] = value.clone();
    }
    SchedulerConfig::from_json(&json.to_string(), Path::new("scheduler_config.json")).unwrap()
}

fn assert_schedule_close(what: &str, ours: &[f32], theirs: &serde_json::Value) {
    let theirs: Vec<f64> = theirs
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-6, "{what}: max difference {worst:e}");
}

#[test]
fn alphas_cumprod_match_for_every_beta_schedule() {
    for name in MODELS {
        let reference = Reference::load(name);
        let scheduler = DdimScheduler::new(&config_with(name, &[]));
        assert_schedule_close(
            &format!("{name} alphas_cumprod"),
            scheduler.alphas_cumprod(),
            &reference.json["alphas_cumprod"],
        );
        for schedule in ["linear", "scaled_linear", "squaredcos_cap_v2"] {
            let scheduler =
                DdimScheduler::new(&config_with(name, &[("beta_schedule", schedule.into())]));
            assert_schedule_close(
                &format!("{name} {schedule}"),
                scheduler.alphas_cumprod(),
                &reference.json["alphas_cumprod_by_schedule"][schedule],
            );
        }
    }
}

#[test]
fn timesteps_match_for_every_spacing_and_step_count() {
    for name in MODELS {
        let reference = Reference::load(name);
        let by_spacing = reference.json["ddim_timesteps"].as_object().unwrap();
        assert_eq!(by_spacing.len(), 3);
        for (spacing, by_count) in by_spacing {
            let scheduler = DdimScheduler::new(&config_with(
                name,
                &[("timestep_spacing", spacing.as_str().into())],
            ));
            for (count, expected) in by_count.as_object().unwrap() {
                let expected: Vec<usize> = expected
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect();
                let got = scheduler.timesteps(count.parse().unwrap()).unwrap();
                assert_eq!(got, expected, "{name} {spacing} {count} steps");
            }
        }
    }
}

#[test]
fn zero_or_too_many_steps_are_refused() {
    let scheduler = DdimScheduler::new(&config_with("sd15-tiny", &[]));
    let zero = scheduler.timesteps(0).unwrap_err().to_string();
    assert!(zero.contains("at least 1"), "{zero}");
    assert!(scheduler.timesteps(1001).is_err());
    assert!(scheduler.sdedit_timesteps(10, 1.5).is_err());
}

#[test]
fn sdedit_start_selects_the_tail_of_the_schedule() {
    let reference = Reference::load("sd15-tiny");
    let scheduler = DdimScheduler::new(&config_with("sd15-tiny", &[]));
    assert_eq!(
        scheduler.sdedit_timesteps(10, 0.6).unwrap(),
        reference.usize_list("img2img_timesteps")
    );
    assert!(
        scheduler.sdedit_timesteps(10, 0.0).unwrap().is_empty(),
        "t0 = 0 runs no step"
    );
    assert_eq!(
        scheduler.sdedit_timesteps(10, 1.0).unwrap(),
        scheduler.timesteps(10).unwrap()
    );
}

#[test]
fn add_noise_and_velocity_match() {
    for name in MODELS {
        let reference = Reference::load(name);
        let scheduler = DdimScheduler::new(&config_with(name, &[]));
        let timesteps: Vec<usize> = reference
            .tensor("add_noise_timesteps")
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|t| t as usize)
            .collect();
        let original = reference.f32("add_noise_original");
        let noise = reference.f32("add_noise_noise");
        let noised = scheduler.add_noise(&original, &noise, &timesteps).unwrap();
        assert_close(
            &format!("{name} add_noise"),
            &noised,
            &reference.f32("add_noise_out"),
            1e-5,
        );
        if reference.tensors.contains_key("velocity_out") {
            let velocity = scheduler.velocity(&original, &noise, &timesteps).unwrap();
            assert_close(
                &format!("{name} velocity"),
                &velocity,
                &reference.f32("velocity_out"),
                1e-5,
            );
        }
    }
}

#[test]
fn ddim_steps_match_including_the_last_one() {
    for name in MODELS {
        let reference = Reference::load(name);
        let scheduler = DdimScheduler::new(&config_with(name, &[]));
        let steps = reference.json["ddim_step_num_inference_steps"]
            .as_u64()
            .unwrap() as usize;
        for prefix in ["ddim_step", "ddim_last"] {
            let timestep = reference.json[format!("{prefix}_timestep")]
                .as_u64()
                .unwrap() as usize;
            let out = scheduler
                .step(
                    &reference.f32(&format!("{prefix}_model_output")),
                    timestep,
                    &reference.f32(&format!("{prefix}_sample")),
                    steps,
                )
                .unwrap();
            assert_close(
                &format!("{name} {prefix} prev_sample"),
                &out.prev_sample,
                &reference.f32(&format!("{prefix}_prev_sample")),
                1e-5,
            );
            assert_close(
                &format!("{name} {prefix} x0"),
                &out.predicted_x0,
                &reference.f32(&format!("{prefix}_pred_original_sample")),
                1e-5,
            );
        }
    }
}
