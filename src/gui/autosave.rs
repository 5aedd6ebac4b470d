//! The app's side of autosave: what changed since the last frame goes to the autosave
//! thread ([`super::persist::Autosaver`]), which writes it; its failures become notices.

use super::app::EditorApp;
use super::persist::{Autosaver, SessionSnapshot, SessionText, Settings};

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
}

impl EditorApp {
    fn session_text(&self) -> SessionText {
        SessionText {
            source: self.doc.as_ref().and_then(|d| d.source.clone()),
            prompt: self.form.prompt.clone(),
            baseline_prompt: self.form.baseline_prompt.clone(),
            fidelity: self.form.fidelity,
        }
    }

    /// Hands the photo, mask and prompt to the autosave thread.
    pub(super) fn save_session_now(&mut self) {
        let text = self.session_text();
        let Some(doc) = &mut self.doc else { return };
        let snapshot = SessionSnapshot {
            text: text.clone(),
            photo: Some((doc.version, doc.photo.clone())),
            alpha: doc.alpha.clone(),
            mask: doc.mask.painted(),
        };
        if let Some(saver) = &self.autosave.saver {
            saver.save_session(snapshot);
        }
        self.autosave.saved_text = Some(text);
    }

    /// Saves what changed since the last frame (typing, settings).
    pub(super) fn autosave(&mut self) {
        if self.doc.is_some() && self.autosave.saved_text.as_ref() != Some(&self.session_text()) {
            self.save_session_now();
        }
        if self.settings != self.autosave.saved_settings {
            if let Some(saver) = &self.autosave.saver {
                saver.save_settings(&self.settings);
            }
            self.autosave.saved_settings = self.settings.clone();
        }
        let failures = self
            .autosave
            .saver
            .as_ref()
            .map(|s| s.failures())
            .unwrap_or_default();
        if let Some(message) = failures.into_iter().last() {
            self.error(message);
        }
    }

    /// Waits for the autosave thread to write everything (tests, and clean exit).
    pub fn flush_autosave(&mut self) {
        self.autosave();
        if let Some(saver) = self.autosave.saver.take() {
            saver.flush();
        }
        self.autosave.saver = Autosaver::start(self.options.state.clone()).ok();
    }
}
