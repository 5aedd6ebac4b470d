//! Records where this binary came from (git revision and build profile) so every exported
//! file can name the exact program that made it: a recipe is only reproducible with the code.

use std::path::Path;
use std::process::Command;

fn main() {
    let revision = git_revision().unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=UNITUNE_GIT_REVISION={revision}");

    // PROFILE is "debug" or "release"; the numeric opt level tells custom profiles apart.
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".to_string());
    let opt_level = std::env::var("OPT_LEVEL").unwrap_or_else(|_| "?".to_string());
    println!("cargo:rustc-env=UNITUNE_BUILD_PROFILE={profile} (opt-level {opt_level})");

    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());
    println!("cargo:rustc-env=UNITUNE_BUILD_TARGET={target}");

    // Rebuild when the checked-out commit moves, not on every source change: HEAD names a
    // branch, whose ref file (or packed-refs) moves with each commit; the index moves with
    // staging, which is as close to "dirty" as a build script can watch cheaply.
    let mut watched = vec![
        ".git/HEAD".to_string(),
        ".git/index".to_string(),
        ".git/packed-refs".to_string(),
    ];
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(reference) = head.trim().strip_prefix("ref: ")
    {
        watched.push(format!(".git/{reference}"));
    }
    for path in watched {
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// The short commit hash, with `-dirty` when tracked files differ from it.
fn git_revision() -> Option<String> {
    let output = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let mut revision = String::from_utf8(output.stdout).ok()?.trim().to_string();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        revision.push_str("-dirty");
    }
    Some(revision)
}
