//! Every file a command will write, checked before anything slow starts: a fine-tune of an
//! hour must not end in "the file exists" and throw its result away. Each output must not
//! exist unless `--overwrite` says it may be replaced, its folder must exist and take a file,
//! and it must not be one of the command's inputs (nor another output).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;

use super::UsageError;
use super::args::GlobalOptions;
use crate::imaging::{ExistingFile, ImagingError, PREVIEW_MARK, read_png_text};

/// How many outputs this run has written completely (see [`announce`]).
static WRITTEN: AtomicUsize = AtomicUsize::new(0);

/// Prints a file the command has written completely (stdout, one path a line, for scripts)
/// and counts it, so that a stop can say what was kept.
pub fn announce(path: &Path) {
    WRITTEN.fetch_add(1, Ordering::SeqCst);
    println!("{}", path.display());
}

/// How many outputs [`announce`] has printed.
pub fn written() -> usize {
    WRITTEN.load(Ordering::SeqCst)
}

/// One file the command will write.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The flag that names it, for messages (`--out`).
    pub flag: &'static str,
    pub path: PathBuf,
    /// What to do when the file is there at write time: checked now, and again at the rename.
    pub existing: ExistingFile,
}

impl Output {
    /// An output named by `flag`, replaced only with `--overwrite`.
    pub fn new(flag: &'static str, path: &Path, overwrite: bool) -> Self {
        Self {
            flag,
            path: path.to_path_buf(),
            existing: if overwrite {
                ExistingFile::Overwrite
            } else {
                ExistingFile::Refuse
            },
        }
    }

    /// A live preview: a file unitune owns, so one of its own earlier previews (a PNG marked
    /// as such) is replaced; anything else only with `--overwrite`.
    pub fn preview(flag: &'static str, path: &Path, overwrite: bool) -> Self {
        let ours =
            read_png_text(path).is_ok_and(|chunks| chunks.iter().any(|(k, _)| k == PREVIEW_MARK));
        Self::new(flag, path, overwrite || ours)
    }
}

/// The files the global flags name, which no output may replace: the model (a folder or a
/// checkpoint file), the `--vae` and every `--lora`.
pub fn command_inputs(global: &GlobalOptions) -> Result<Vec<PathBuf>> {
    let request = super::model::model_request(global)?;
    let mut inputs: Vec<PathBuf> = request.loras.iter().map(|l| l.path.clone()).collect();
    inputs.extend(request.vae.map(PathBuf::from));
    if Path::new(&request.model).exists() {
        inputs.push(PathBuf::from(&request.model));
    }
    Ok(inputs)
}

/// Checks every output of a command against each other and against its `inputs` (the
/// photo, the mask, a recipe, LoRA files, the model), before anything is computed.
pub fn check_outputs(outputs: &[Output], inputs: &[&Path]) -> Result<()> {
    for (i, output) in outputs.iter().enumerate() {
        let path = &output.path;
        let flag = output.flag;
        let shown = path.display();
        if let Some(input) = inputs.iter().find(|input| same_file(path, input)) {
            return Err(UsageError(format!(
                "{flag} {shown} is {}, which this command reads; choose another file for the output",
                describe_input(input)
            ))
            .into());
        }
        if let Some(other) = outputs[..i].iter().find(|o| same_file(path, &o.path)) {
            return Err(UsageError(format!(
                "{flag} and {} name the same file ({shown}); give each its own",
                other.flag
            ))
            .into());
        }
        if path.is_dir() {
            return Err(UsageError(format!(
                "{flag} {shown} already exists and is a folder; name a file in it"
            ))
            .into());
        }
        if output.existing == ExistingFile::Refuse && std::fs::symlink_metadata(path).is_ok() {
            return Err(UsageError(format!(
                "{flag} {shown} already exists; add --overwrite to replace it, or choose another name"
            ))
            .into());
        }
        check_folder(flag, path)?;
    }
    Ok(())
}

/// The output's folder exists and takes a new file (a read-only folder or a full disk is
/// found now, not after the work).
fn check_folder(flag: &str, path: &Path) -> Result<()> {
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        return Err(UsageError(format!(
            "{flag} {}: the folder {} does not exist; create it first or choose another",
            path.display(),
            folder.display()
        ))
        .into());
    }
    let probe = tempfile::Builder::new()
        .prefix(".unitune-")
        .suffix(".part")
        .tempfile_in(folder);
    match probe {
        Ok(_) => Ok(()),
        // Says what is wrong with the folder (read-only, full) and names the file.
        Err(error) => Err(ImagingError::from_export_io(path, error).into()),
    }
}

/// Whether `a` and `b` name one file: the same path once both are made absolute and their
/// links resolved (a file that does not exist yet is compared by its folder's).
fn same_file(a: &Path, b: &Path) -> bool {
    match (resolved(a), resolved(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(real) = path.canonicalize() {
        return Some(real);
    }
    let name = path.file_name()?;
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    Some(folder.canonicalize().ok()?.join(name))
}

fn describe_input(input: &Path) -> String {
    format!("the input {}", input.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_may_not_be_an_input_another_output_or_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let photo = dir.path().join("photo.png");
        std::fs::write(&photo, b"x").unwrap();
        let out = dir.path().join("out.png");
        let error = check_outputs(&[Output::new("--out", &photo, true)], &[&photo])
            .unwrap_err()
            .to_string();
        assert!(error.contains("which this command reads"), "{error}");
        let twice = [
            Output::new("--out", &out, false),
            Output::new("--preview-out", &out, false),
        ];
        let error = check_outputs(&twice, &[]).unwrap_err().to_string();
        assert!(error.contains("name the same file"), "{error}");
        std::fs::write(&out, b"x").unwrap();
        let error = check_outputs(&[Output::new("--out", &out, false)], &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--overwrite"), "{error}");
        assert!(check_outputs(&[Output::new("--out", &out, true)], &[&photo]).is_ok());
        let missing = dir.path().join("no-such").join("x.png");
        let error = check_outputs(&[Output::new("--out", &missing, false)], &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("does not exist"), "{error}");
    }

    #[test]
    fn a_relative_and_an_absolute_name_of_one_file_are_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.png");
        std::fs::write(&file, b"x").unwrap();
        let dotted = dir.path().join(".").join("a.png");
        assert!(same_file(&file, &dotted));
        assert!(!same_file(&file, &dir.path().join("b.png")));
    }
}
