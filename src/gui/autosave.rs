//! The app's side of autosave: what changed since the last frame goes to the autosave
//! thread ([`super::persist::Autosaver`]), which writes it; its failures become notices.

use super::document::Document;
use super::form::EditForm;
use super::persist::{Autosaver, SessionSnapshot, SessionText, Settings, StateFiles};

/// The autosave thread, and what was last handed to it (to save only on change).
pub struct AutosaveState {
    pub saver: Option<Autosaver>,
    saved_text: Option<SessionText>,
    saved_settings: Settings,
}

impl AutosaveState {
    pub fn new(saver: Option<Autosaver>, settings: &Settings) -> Self {
        Self {
            saver,
            saved_text: None,
            saved_settings: settings.clone(),
        }
    }

    fn session_text(doc: &Document, form: &EditForm) -> SessionText {
        SessionText {
            source: doc.source.clone(),
            prompt: form.prompt.clone(),
            baseline_prompt: form.baseline_prompt.clone(),
            fidelity: form.fidelity,
        }
    }

    /// Hands the photo, mask and prompt to the autosave thread.
    pub fn save_now(&mut self, doc: Option<&mut Document>, form: &EditForm) {
        let Some(doc) = doc else { return };
        let text = Self::session_text(doc, form);
        let snapshot = SessionSnapshot {
            text: text.clone(),
            photo: Some((doc.version, doc.photo.clone())),
            alpha: doc.alpha.clone(),
            file_rgb: doc.file_rgb.clone(),
            metadata: doc.metadata.clone(),
            mask: doc.mask.painted(),
        };
        if let Some(saver) = &self.saver {
            saver.save_session(snapshot);
        }
        self.saved_text = Some(text);
    }

    /// Saves what changed since the last frame (typing, settings); returns the last failure
    /// the thread reported, if any.
    pub fn on_frame(
        &mut self,
        doc: Option<&mut Document>,
        form: &EditForm,
        settings: &Settings,
    ) -> Option<String> {
        if let Some(doc) = doc
            && self.saved_text.as_ref() != Some(&Self::session_text(doc, form))
        {
            self.save_now(Some(doc), form);
        }
        if *settings != self.saved_settings {
            if let Some(saver) = &self.saver {
                saver.save_settings(settings);
            }
            self.saved_settings = settings.clone();
        }
        let failures = self
            .saver
            .as_ref()
            .map(|s| s.failures())
            .unwrap_or_default();
        failures.into_iter().last()
    }

    /// Waits until the thread has written everything, then starts a fresh one.
    pub fn flush(&mut self, state: &StateFiles) {
        if let Some(saver) = self.saver.take() {
            saver.flush();
        }
        self.saver = Autosaver::start(state.clone()).ok();
    }

    /// Waits until the thread has written everything (a clean exit).
    pub fn finish(&mut self) {
        if let Some(saver) = self.saver.take() {
            saver.flush();
        }
    }
}
