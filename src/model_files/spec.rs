//! Turning the `--model` argument into a folder or a hub id.

use std::fmt;
use std::path::{Path, PathBuf};

use super::error::ModelFilesError;

/// The model used when none is given.
pub const DEFAULT_MODEL: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";

/// The `--model` value of the demo model that ships with unitune (`assets/demo-model`).
pub const DEMO_MODEL: &str = "demo";

/// The revision used when a hub id names none.
pub const DEFAULT_REVISION: &str = "main";

/// Where to take a model from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A diffusers-format folder on disk.
    Folder(PathBuf),
    /// A Hugging Face model repo; `revision` is a branch, tag or commit.
    Hub { repo_id: String, revision: String },
    /// The demo model shipped with unitune (offline, small, trained on the demo world).
    Demo,
}

impl ModelSpec {
    /// A hub repo at its default revision.
    pub fn hub(repo_id: impl Into<String>) -> Self {
        Self::Hub {
            repo_id: repo_id.into(),
            revision: DEFAULT_REVISION.to_owned(),
        }
    }
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self::hub(DEFAULT_MODEL)
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Folder(path) => write!(f, "{}", path.display()),
            Self::Hub { repo_id, revision } if revision == DEFAULT_REVISION => {
                write!(f, "{repo_id}")
            }
            Self::Hub { repo_id, revision } => write!(f, "{repo_id}@{revision}"),
            Self::Demo => write!(f, "{DEMO_MODEL}"),
        }
    }
}

/// Reads the `--model` argument.
///
/// A path (absolute, starting with `./`, `../` or `~/`, or naming something that exists) is
/// a folder, and must exist; `demo` is the demo model (a folder of that name is `./demo`).
/// Otherwise `owner/name` or `owner/name@revision` is a hub id.
/// Anything else is an input error that explains both forms.
pub fn parse_model_arg(arg: &str) -> Result<ModelSpec, ModelFilesError> {
    if arg.trim().is_empty() {
        return Err(invalid(arg, "it is empty"));
    }
    if looks_like_path(arg) {
        let path = expand_home(arg, dirs::home_dir().as_deref());
        return if path.exists() {
            Ok(ModelSpec::Folder(path))
        } else {
            Err(ModelFilesError::FolderNotFound { path })
        };
    }
    if arg == DEMO_MODEL {
        return Ok(ModelSpec::Demo);
    }
    if Path::new(arg).exists() {
        return Ok(ModelSpec::Folder(PathBuf::from(arg)));
    }
    let (repo_id, revision) = parse_hub_id(arg).map_err(|reason| invalid(arg, &reason))?;
    Ok(ModelSpec::Hub { repo_id, revision })
}

/// Reads the `--vae` argument: a path (a leading `~` is the home folder), see
/// [`locate_vae`](super::locate_vae).
pub fn parse_vae_arg(arg: &str) -> Result<super::VaeFiles, ModelFilesError> {
    super::locate_vae(&expand_home(arg, dirs::home_dir().as_deref()))
}

fn invalid(arg: &str, reason: &str) -> ModelFilesError {
    ModelFilesError::InvalidModelArg {
        arg: arg.to_owned(),
        reason: reason.to_owned(),
    }
}

fn looks_like_path(arg: &str) -> bool {
    const PREFIXES: [&str; 6] = ["./", "../", "~/", ".\\", "..\\", "~\\"];
    Path::new(arg).is_absolute()
        || arg.starts_with('/')
        || matches!(arg, "." | ".." | "~")
        || PREFIXES.iter().any(|prefix| arg.starts_with(prefix))
}

/// Replaces a leading `~` with the home folder (left as is when there is none).
fn expand_home(arg: &str, home: Option<&Path>) -> PathBuf {
    let rest = if arg == "~" {
        Some("")
    } else {
        arg.strip_prefix("~/").or_else(|| arg.strip_prefix("~\\"))
    };
    match (rest, home) {
        (Some(rest), Some(home)) => home.join(rest),
        _ => PathBuf::from(arg),
    }
}

/// Splits `owner/name[@revision]`; the error is a clause saying what is wrong.
pub(crate) fn parse_hub_id(arg: &str) -> Result<(String, String), String> {
    let (id, revision) = match arg.split_once('@') {
        Some((id, revision)) => (id, revision),
        None => (arg, DEFAULT_REVISION),
    };
    let parts: Vec<&str> = id.split('/').collect();
    let [owner, name] = parts.as_slice() else {
        return Err(if parts.len() == 1 {
            "it is not an existing path, and a hub id needs an owner: owner/name".to_owned()
        } else {
            "it is not an existing path, and a hub id has exactly one '/'".to_owned()
        });
    };
    check_id_part(owner, "owner")?;
    check_id_part(name, "name")?;
    check_revision(revision)?;
    Ok((id.to_owned(), revision.to_owned()))
}

fn check_id_part(part: &str, what: &str) -> Result<(), String> {
    if part.is_empty() {
        return Err(format!("the hub id's {what} is empty"));
    }
    if part.len() > 96 {
        return Err(format!("the hub id's {what} is longer than 96 characters"));
    }
    if let Some(bad) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "the hub id's {what} holds '{bad}'; only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    let edge = |c: char| matches!(c, '-' | '.');
    if part.starts_with(edge) || part.ends_with(edge) || part.contains("--") || part.contains("..")
    {
        return Err(format!(
            "the hub id's {what} may not start or end with '-' or '.', nor hold '--' or '..'"
        ));
    }
    Ok(())
}

fn check_revision(revision: &str) -> Result<(), String> {
    if revision.is_empty() {
        return Err("the revision after '@' is empty".to_owned());
    }
    if revision
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
        || revision.starts_with('/')
        || revision.ends_with('/')
        || revision
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!("'{revision}' is not a branch, tag or commit name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_split_into_id_and_revision() {
        assert_eq!(
            parse_hub_id("owner/name"),
            Ok(("owner/name".to_owned(), "main".to_owned()))
        );
        assert_eq!(
            parse_hub_id("o-1/n.2_x@refs/pr/3"),
            Ok(("o-1/n.2_x".to_owned(), "refs/pr/3".to_owned()))
        );
        for bad in [
            "name", "a/b/c", "/b", "a/", "a b/c", "a/b@", "a/b@x y", "a/b@../x", "-a/b", "a/b.",
            "a--b/c",
        ] {
            assert!(parse_hub_id(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn home_is_expanded_only_at_the_start() {
        let home = Path::new("/home/u");
        assert_eq!(expand_home("~/m", Some(home)), PathBuf::from("/home/u/m"));
        assert_eq!(expand_home("~", Some(home)), PathBuf::from("/home/u"));
        assert_eq!(expand_home("./~/m", Some(home)), PathBuf::from("./~/m"));
        assert_eq!(expand_home("~/m", None), PathBuf::from("~/m"));
    }

    #[test]
    fn spec_displays_as_it_is_typed() {
        assert_eq!(ModelSpec::default().to_string(), DEFAULT_MODEL);
        let pinned = ModelSpec::Hub {
            repo_id: "o/n".to_owned(),
            revision: "v2".to_owned(),
        };
        assert_eq!(pinned.to_string(), "o/n@v2");
        assert!(matches!(parse_model_arg(DEMO_MODEL), Ok(ModelSpec::Demo)));
        assert_eq!(ModelSpec::Demo.to_string(), "demo");
    }
}
