//! Keeps the layers honest (see STYLE.md): the engine is candle only, and nothing below the
//! GUI knows about egui, eframe or threads' channels.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn assert_layer_avoids(layer: &str, forbidden: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(layer);
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(!files.is_empty(), "no sources found in src/{layer}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for word in forbidden {
            assert!(
                !text.contains(word),
                "{} mentions `{word}`, which does not belong in the {layer} layer",
                file.display()
            );
        }
    }
}

#[test]
fn engine_is_candle_only() {
    assert_layer_avoids(
        "engine",
        &[
            "egui",
            "eframe",
            "crossbeam",
            "std::thread",
            "indicatif",
            "println!",
            "eprintln!",
        ],
    );
}

#[test]
fn jobs_know_nothing_of_the_gui() {
    assert_layer_avoids("jobs", &["egui", "eframe", "println!"]);
}

#[test]
fn imaging_and_model_files_know_nothing_of_the_gui_or_the_engine() {
    for layer in ["imaging", "model_files"] {
        assert_layer_avoids(
            layer,
            &["egui", "eframe", "candle", "crate::engine", "crate::cli"],
        );
    }
}

#[test]
fn only_the_gui_knows_egui_and_the_cli_and_gui_stay_apart() {
    assert_layer_avoids("cli", &["egui", "eframe", "crate::gui::app", "candle_nn"]);
    assert_layer_avoids("gui", &["candle", "crate::cli", "crate::engine::model"]);
}
