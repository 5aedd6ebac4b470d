//! Fuzzing on stable Rust, inside `cargo test`: each target replays its corpus of inputs that
//! once panicked (`tests/fuzz/corpus/<target>/`), then mutates valid seed files for
//! `UNITUNE_FUZZ_SECONDS` seconds (1 by default) and fails on any panic, saving the input.
//! `tests/scripts/fuzz` runs every target for longer and prints what it ran.
//!
//! Damaged or hostile input must give an error, never a panic: photos and masks a user opens,
//! PNGs whose recipe is read back, and every file of a model folder (configs, tokenizer
//! files, weights), including a config that parses but describes a model that cannot be
//! built or run.

#[path = "fuzz/configs.rs"]
mod configs;
#[path = "fuzz/harness.rs"]
mod harness;
#[path = "fuzz/images.rs"]
mod images;
#[path = "fuzz/mutate.rs"]
mod mutate;
#[path = "fuzz/weights.rs"]
mod weights;

#[test]
fn photo_decode() {
    images::photo_decode(harness::check);
}

#[test]
fn mask_load() {
    images::mask_load(harness::check);
}

#[test]
fn png_text() {
    images::png_text(harness::check);
}

#[test]
fn unet_config() {
    configs::unet(harness::check);
}

#[test]
fn vae_config() {
    configs::vae(harness::check);
}

#[test]
fn tiny_vae_config() {
    configs::tiny_vae(harness::check);
}

#[test]
fn text_encoder_config() {
    configs::text_encoder(harness::check);
}

#[test]
fn scheduler_config() {
    configs::scheduler(harness::check);
}

#[test]
fn tokenizer_files() {
    configs::tokenizer(harness::check);
}

#[test]
fn model_arg() {
    configs::model_arg(harness::check);
}

#[test]
fn model_folder() {
    weights::model_folder(harness::check);
}

#[test]
fn model_weights() {
    weights::model_weights(harness::check);
}

#[test]
fn checkpoint_file() {
    weights::checkpoint_file(harness::check);
}

#[test]
fn snapshot_file() {
    weights::snapshot_file(harness::check);
}

/// The config inputs that once panicked are now refused with one line naming the field that
/// broke the code; the field is the part of the file's name before `--`.
#[test]
fn corpus_configs_are_refused_naming_the_field() {
    use std::path::Path;
    use unitune::engine::config::{SchedulerConfig, UnetConfig, VaeConfig};

    type Parse = fn(&str, &Path) -> unitune::engine::Result<()>;
    let parsers: [(&str, Parse); 3] = [
        ("unet_config", |t, p| UnetConfig::from_json(t, p).map(drop)),
        ("vae_config", |t, p| VaeConfig::from_json(t, p).map(drop)),
        ("scheduler_config", |t, p| {
            SchedulerConfig::from_json(t, p).map(drop)
        }),
    ];
    let mut checked = 0;
    for (target, parse) in parsers {
        for file in harness::corpus_files(&harness::corpus_dir(target)) {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let field = name.split("--").next().unwrap_or(name);
            let text = std::fs::read_to_string(&file).expect("corpus file is text");
            let error = parse(&text, &file).expect_err(name).to_string();
            assert!(
                error.contains(&format!("field `{field}`")) && !error.contains('\n'),
                "{name}: {error}"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "the corpus holds config inputs");
}
