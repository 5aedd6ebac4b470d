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
fn model_weights() {
    weights::model_weights(harness::check);
}

#[test]
fn snapshot_file() {
    weights::snapshot_file(harness::check);
}
