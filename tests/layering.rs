//! Keeps the layers honest (see STYLE.md): each module imports only from the layers below it,
//! the engine is candle only, and nothing below the GUI knows about egui, eframe or threads'
//! channels.
//!
//! The sources are read as code: comments and string literals are blanked first, then every
//! `crate::` path (in `use` declarations, grouped imports and inline paths alike) is taken
//! apart into the module it reaches.

use std::path::{Path, PathBuf};

/// Every module at the crate's top, lowest first. A module may reach only those of a lower
/// rank; equal ranks stay apart (the exception is below).
const RANKS: [(&str, u8); 10] = [
    ("build_info", 0),
    ("imaging", 1),
    ("model_files", 1),
    ("world", 1),
    ("engine", 2),
    ("recipe", 3),
    ("service", 4),
    ("jobs", 5),
    ("gui", 6),
    ("cli", 6),
];

/// What the command line may name in the GUI: the entry that starts the editor.
const CLI_MAY_START: [&str; 2] = ["gui::run", "gui::EditorOptions"];

/// The editor reaches the engine, the service and the model files only through the jobs
/// layer, whose public API holds no candle types.
const GUI_GOES_THROUGH_JOBS: [&str; 3] = ["engine", "service", "model_files"];

fn rank(module: &str) -> Option<u8> {
    RANKS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The files of a top-level module: `src/NAME/**.rs` or `src/NAME.rs`.
fn module_files(module: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    if src.join(module).is_dir() {
        rust_files(&src.join(module), &mut files);
    } else {
        files.push(src.join(format!("{module}.rs")));
    }
    files
}

/// `text` with comments and string and character literals replaced by spaces (lines kept).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let next = chars.get(i + 1).copied();
        match (chars[i], next) {
            ('/', Some('/')) => {
                while i < chars.len() && chars[i] != '\n' {
                    out.push(' ');
                    i += 1;
                }
            }
            ('/', Some('*')) => {
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                        depth += 1;
                        out.push_str("  ");
                        i += 2;
                    } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        out.push_str("  ");
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        out.push(blank(chars[i]));
                        i += 1;
                    }
                }
            }
            ('r', Some('"' | '#')) if !is_ident(chars.get(i.wrapping_sub(1))) => {
                // A raw string: r"..." or r#"..."#.
                let mut j = i + 1;
                let mut hashes = 0;
                while chars.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if chars.get(j) != Some(&'"') {
                    out.push(chars[i]);
                    i += 1;
                    continue;
                }
                let closing: String = std::iter::once('"')
                    .chain((0..hashes).map(|_| '#'))
                    .collect();
                let rest: String = chars[j + 1..].iter().collect();
                let end = rest.find(&closing).map_or(chars.len(), |k| {
                    j + 1 + rest[..k].chars().count() + closing.len()
                });
                for c in &chars[i..end] {
                    out.push(blank(*c));
                }
                i = end;
            }
            ('"', _) => {
                out.push(' ');
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        out.push(' ');
                        i += 1;
                    }
                    if i < chars.len() {
                        out.push(blank(chars[i]));
                        i += 1;
                    }
                }
                out.push(' ');
                i += 1;
            }
            ('\'', _) if is_char_literal(&chars, i) => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|c| *c == '\'')
                    .map_or(chars.len(), |k| i + 2 + k);
                for c in &chars[i..end] {
                    out.push(blank(*c));
                }
                i = end;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

fn is_ident(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// `'x'` or `'\n'` rather than a lifetime `'a`.
fn is_char_literal(chars: &[char], i: usize) -> bool {
    matches!(
        (chars.get(i + 1), chars.get(i + 2)),
        (Some('\\'), _) | (Some(_), Some('\''))
    )
}

/// Every path below `crate::` in the code, as `module::rest` (a group `crate::{a::X, b}`
/// gives one path per member).
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if is_ident(before.as_ref()) {
            continue;
        }
        paths.extend(paths_at(rest));
    }
    paths
}

/// The paths starting at `text`: one `a::b::C`, or each member of a `{...}` group.
fn paths_at(text: &str) -> Vec<String> {
    let text = text.trim_start();
    if let Some(group) = text.strip_prefix('{') {
        let mut depth = 1;
        let mut end = group.len();
        for (k, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k;
                        break;
                    }
                }
                _ => {}
            }
        }
        let inner = &group[..end];
        let mut members = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (k, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    members.push(&inner[start..k]);
                    start = k + 1;
                }
                _ => {}
            }
        }
        members.push(&inner[start..]);
        return members
            .into_iter()
            .filter(|m| !m.trim().is_empty())
            .flat_map(paths_at)
            .collect();
    }
    let path: String = text
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect();
    let after = &text[path.len()..];
    if path.ends_with("::") && after.trim_start().starts_with('{') {
        // `a::{b, c::D}`: each member below the prefix.
        return paths_at(after)
            .into_iter()
            .map(|member| format!("{path}{member}"))
            .collect();
    }
    vec![path.trim_end_matches(':').to_owned()]
}

/// Every import of `layer` that reaches a module it may not, as "file: path".
fn upward_imports(layer: &str) -> Vec<String> {
    let own = rank(layer).expect("a known layer");
    let mut found = Vec::new();
    for file in module_files(layer) {
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        for path in crate_paths(&code) {
            let target = path.split("::").next().unwrap_or_default();
            if target == layer {
                continue;
            }
            let allowed = match rank(target) {
                Some(r) => r < own,
                None => panic!(
                    "{} reaches crate::{path}, an unknown module",
                    file.display()
                ),
            } || (layer == "cli"
                && CLI_MAY_START
                    .iter()
                    .any(|entry| path == *entry || path.starts_with(&format!("{entry}::"))));
            let allowed = allowed && !(layer == "gui" && GUI_GOES_THROUGH_JOBS.contains(&target));
            if !allowed {
                found.push(format!("{}: crate::{path}", file.display()));
            }
        }
    }
    found
}

#[test]
fn every_layer_imports_only_from_the_layers_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(&src).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let module = name.trim_end_matches(".rs");
        if !["lib", "main"].contains(&module) {
            assert!(rank(module).is_some(), "src/{name} has no place in RANKS");
        }
    }
    let found: Vec<String> = RANKS.iter().flat_map(|(m, _)| upward_imports(m)).collect();
    assert!(
        found.is_empty(),
        "imports against the layers:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_import_reader_sees_through_groups_and_ignores_comments_and_strings() {
    let code = code_only(
        "use crate::{gui::app::EditorApp, engine::{unet::UNet, vae}};\n\
         // use crate::gui::commented;\n\
         let s = \"crate::gui::in_a_string\"; let c = '\\'';\n\
         /* crate::gui::in_a_block */ let x = crate::jobs::JobId::default();\n\
         let r = r#\"crate::gui::raw\"#; fn f<'a>(v: &'a str) {}",
    );
    assert_eq!(
        crate_paths(&code),
        [
            "gui::app::EditorApp",
            "engine::unet::UNet",
            "engine::vae",
            "jobs::JobId::default"
        ]
    );
}

/// Words that mark a concern outside the layer, read as code (not comments).
fn assert_layer_avoids(layer: &str, forbidden: &[&str]) {
    let files = module_files(layer);
    assert!(!files.is_empty(), "no sources found in src/{layer}");
    for file in files {
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        for word in forbidden {
            assert!(
                !code.contains(word),
                "{} uses `{word}`, which does not belong in the {layer} layer",
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
fn the_service_neither_prints_nor_starts_threads() {
    assert_layer_avoids(
        "service",
        &["egui", "std::thread", "crossbeam", "println!", "eprintln!"],
    );
}

#[test]
fn jobs_know_nothing_of_the_gui() {
    assert_layer_avoids("jobs", &["egui", "eframe", "println!"]);
}

#[test]
fn imaging_and_model_files_know_nothing_of_the_gui_or_the_engine() {
    for layer in ["imaging", "model_files"] {
        assert_layer_avoids(layer, &["egui", "eframe", "candle"]);
    }
}

#[test]
fn only_the_gui_knows_egui_and_the_gui_knows_no_candle() {
    assert_layer_avoids("cli", &["egui", "eframe", "candle_nn"]);
    assert_layer_avoids("gui", &["candle"]);
}
