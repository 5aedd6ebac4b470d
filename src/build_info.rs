//! What build of unitune this is; written into every exported file with its recipe.

/// The crate version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit this binary was built from (`unknown` outside a git checkout).
pub const GIT_REVISION: &str = env!("UNITUNE_GIT_REVISION");
/// `debug` or `release` with the optimisation level.
pub const BUILD_PROFILE: &str = env!("UNITUNE_BUILD_PROFILE");
/// The target triple.
pub const BUILD_TARGET: &str = env!("UNITUNE_BUILD_TARGET");

/// One line naming this build, e.g. `unitune 0.1.0 (rev 1a2b3c4d5e6f, release (opt-level 3))`.
pub fn describe() -> String {
    format!("unitune {VERSION} (rev {GIT_REVISION}, {BUILD_PROFILE}, {BUILD_TARGET})")
}
