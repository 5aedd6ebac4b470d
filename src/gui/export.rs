//! Export: the shown result at full resolution (read back from disk on the export thread),
//! with its recipe in the PNG, to where the save dialog says; a failure keeps it to try again.

use std::path::PathBuf;

use super::app::EditorApp;
use super::background::ExportRequest;
use super::session::TuneStatus;
use super::variants::VariantState;
use crate::jobs::{JobRequest, TrainMode};

/// Where exports stand.
#[derive(Default)]
pub struct ExportState {
    pub running: bool,
    /// The export that failed, to try again.
    pub failed: Option<(PathBuf, ExportRequest)>,
    /// Where the last export went.
    pub last: Option<PathBuf>,
    /// The job writing a LoRA file, while it runs.
    pub lora_job: Option<crate::jobs::JobId>,
}

impl EditorApp {
    pub(super) fn export(&mut self) {
        match self.export_request() {
            Ok(request) => {
                self.exports.running = true;
                self.chores.export(request);
            }
            Err(message) => self.error(message),
        }
    }

    /// The snapshot File > Export LoRA writes, when the photo's fine-tune is in lora mode:
    /// the one the shown result used, else the last one kept.
    pub(crate) fn lora_export_steps(&self) -> Option<usize> {
        let (_, tune) = self.session.tuned_for.as_ref()?;
        if !matches!(tune.mode, TrainMode::Lora { .. }) || self.exports.lora_job.is_some() {
            return None;
        }
        let kept = match &self.session.tune {
            TuneStatus::Done { snapshots, .. } => snapshots.clone(),
            TuneStatus::Running { kept, .. } => kept.clone(),
            TuneStatus::None => Vec::new(),
        };
        let shown = self
            .session
            .variants
            .shown(self.form.fidelity)
            .map(|(_, v)| v.settings.plan.tune_steps)
            .filter(|steps| kept.contains(steps));
        shown.or_else(|| kept.iter().max().copied())
    }

    /// File > Export LoRA: asks where, then the engine thread writes the file.
    pub(super) fn export_lora(&mut self) {
        let Some(steps) = self.lora_export_steps() else {
            self.error(
                "Export LoRA needs a finished fine-tune in the lora training mode (Advanced).",
            );
            return;
        };
        let doc = self.doc.as_ref();
        let stem = doc
            .and_then(|d| d.source.as_ref())
            .and_then(|p| p.file_stem())
            .map_or("photo".to_string(), |s| s.to_string_lossy().into_owned());
        let directory = doc
            .and_then(|d| d.source.as_ref())
            .and_then(|p| p.parent().map(PathBuf::from));
        self.chores
            .pick_lora_path(directory, format!("{stem}-lora.safetensors"), steps);
    }

    /// Sends the LoRA export to the engine thread (which holds the fine-tune and writes the
    /// same metadata as the command line).
    pub(super) fn write_lora(&mut self, path: PathBuf, steps: usize) {
        let photo_name = self
            .doc
            .as_ref()
            .and_then(|d| d.source.as_ref())
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let request = JobRequest::ExportLora {
            path,
            steps,
            photo_name,
        };
        let Some(runner) = self.model.runner.as_mut() else {
            return self.error("The model is not loaded; load it to export the LoRA.");
        };
        match runner.submit(request) {
            Ok(id) => self.exports.lora_job = Some(id),
            Err(err) => self.error(format!("The LoRA was not written: {err}")),
        }
    }

    pub(super) fn retry_export(&mut self) {
        if let Some((path, request)) = self.exports.failed.take() {
            self.exports.running = true;
            self.chores.export_again(path, request);
        }
    }

    pub(super) fn on_exported(
        &mut self,
        path: PathBuf,
        result: Result<(), String>,
        request: ExportRequest,
    ) {
        self.exports.running = false;
        match result {
            Ok(()) => {
                self.exports.failed = None;
                self.info(format!("Exported to {}.", path.display()));
                self.exports.last = Some(path);
            }
            Err(message) => {
                self.error(format!(
                    "Export failed: {message}. The result is still here; free some space or choose another folder, then try again."
                ));
                self.exports.failed = Some((path, request));
            }
        }
    }

    /// The shown variant with the recipe the engine wrote for it.
    fn export_request(&self) -> Result<ExportRequest, String> {
        let (_, variant) = self
            .session
            .variants
            .shown(self.form.fidelity)
            .ok_or("Nothing to export yet: run an edit and wait for a result.")?;
        let VariantState::Done { result, recipe } = &variant.state else {
            return Err("That variant is not finished yet.".into());
        };
        let edit = self.session.edit.as_ref().ok_or("Nothing to export yet.")?;
        let doc = self.doc.as_ref().ok_or("Nothing to export yet.")?;
        let stem = doc
            .source
            .as_ref()
            .and_then(|p| p.file_stem())
            .map_or("photo".to_string(), |s| s.to_string_lossy().into_owned());
        Ok(ExportRequest {
            image: result.clone(),
            alpha: doc.alpha.clone(),
            text: recipe.text_chunks(),
            suggested_name: format!("{stem}-{}.png", slug(&edit.prompt)),
            directory: doc
                .source
                .as_ref()
                .and_then(|p| p.parent().map(PathBuf::from)),
        })
    }
}

/// A short file-name-safe version of a prompt.
fn slug(prompt: &str) -> String {
    let words: Vec<String> = prompt
        .split_whitespace()
        .take(6)
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric())
                .collect::<String>()
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        "edit".into()
    } else {
        words.join("-")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_safe_file_names() {
        assert_eq!(
            slug("A cat, wearing sunglasses!"),
            "a-cat-wearing-sunglasses"
        );
        assert_eq!(slug("  ../.. "), "edit");
    }
}
