//! Export: the shown result at full resolution (read back from disk on the export thread),
//! with the recipe the engine wrote for it, to where the save dialog says; a failure keeps it
//! to try again.

use std::path::PathBuf;

use super::app::Notice;
use super::background::{Chores, ExportRequest};
use super::document::Document;
use super::session::EditSession;
use super::variants::VariantState;

/// Where exports stand.
#[derive(Default)]
pub struct Exports {
    pub running: bool,
    /// The export that failed, to try again.
    pub failed: Option<(PathBuf, ExportRequest)>,
    /// Where the last export went.
    pub last: Option<PathBuf>,
}

impl Exports {
    /// Exports the variant shown at `fidelity` (the save dialog asks where).
    pub fn start(
        &mut self,
        session: &EditSession,
        doc: Option<&Document>,
        fidelity: f64,
        chores: &Chores,
    ) -> Result<(), String> {
        let request = request(session, doc, fidelity)?;
        self.running = true;
        chores.export(request);
        Ok(())
    }

    /// Writes the failed export again, to the same place.
    pub fn retry(&mut self, chores: &Chores) {
        if let Some((path, request)) = self.failed.take() {
            self.running = true;
            chores.export_again(path, request);
        }
    }

    /// An export ended: where it went, or what to do now (the result stays to try again).
    pub fn finished(
        &mut self,
        path: PathBuf,
        result: Result<(), String>,
        request: ExportRequest,
    ) -> Notice {
        self.running = false;
        match result {
            Ok(()) => {
                self.failed = None;
                let notice = Notice::info(format!("Exported to {}.", path.display()));
                self.last = Some(path);
                notice
            }
            Err(message) => {
                self.failed = Some((path, request));
                Notice::error(format!(
                    "Export failed: {message}. The result is still here; free some space or choose another folder, then try again."
                ))
            }
        }
    }
}

/// The variant shown at `fidelity` with the recipe the engine wrote for it.
fn request(
    session: &EditSession,
    doc: Option<&Document>,
    fidelity: f64,
) -> Result<ExportRequest, String> {
    let (_, variant) = session
        .variants
        .shown(fidelity)
        .ok_or("Nothing to export yet: run an edit and wait for a result.")?;
    let VariantState::Done { result, recipe } = &variant.state else {
        return Err("That variant is not finished yet.".into());
    };
    let edit = session.edit.as_ref().ok_or("Nothing to export yet.")?;
    let doc = doc.ok_or("Nothing to export yet.")?;
    Ok(ExportRequest {
        image: result.clone(),
        over_white: doc.photo.clone(),
        alpha: doc.alpha.clone(),
        file_rgb: doc.file_rgb.clone(),
        metadata: doc.metadata.clone(),
        text: recipe.text_chunks(),
        suggested_name: format!("{}-{}.png", doc.stem(), slug(&edit.prompt)),
        directory: doc.folder(),
    })
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
