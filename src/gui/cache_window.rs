//! The snapshot cache window (File > Snapshot cache): each cached fine-tune with its photo,
//! size and when it was last used; remove one, or clear all after a confirmation; the total
//! against the cap. The cache is read and changed on a background thread: a cache on a slow
//! disk never holds a frame up.

use std::collections::HashMap;
use std::time::SystemTime;

use egui::{Context, TextureHandle, Ui};

use super::background::{CacheChange, CacheListing, Chores};
use super::commands::Command;
use super::panels::bytes_text;
use super::textures;
use crate::jobs::{CacheEntry, SnapshotCache};

/// The window's state: the last listing, and its thumbnails as textures.
#[derive(Default)]
pub struct CacheWindow {
    pub open: bool,
    /// A listing or a change is under way.
    pub busy: bool,
    /// "Clear all" was pressed once; the second press (confirm) clears.
    pub confirm_clear: bool,
    pub entries: Vec<CacheEntry>,
    pub thumbnails: HashMap<String, TextureHandle>,
    pub total_bytes: u64,
    pub max_bytes: u64,
    pub error: Option<String>,
}

impl CacheWindow {
    /// Opens the window and lists the cache (in the background).
    pub fn show_cache(&mut self, cache: Option<&SnapshotCache>, chores: &Chores) {
        self.open = true;
        self.confirm_clear = false;
        self.change(CacheChange::None, cache, chores);
    }

    /// Removes one entry, or (after the confirmation) every entry, then lists again.
    pub fn change(&mut self, change: CacheChange, cache: Option<&SnapshotCache>, chores: &Chores) {
        if change == CacheChange::Clear {
            self.confirm_clear = false;
        }
        match cache {
            Some(cache) => {
                self.busy = true;
                chores.list_cache(cache.clone(), change);
            }
            None => {
                self.error = Some("The snapshot cache is off, so nothing is kept on disk.".into())
            }
        }
    }

    /// A listing arrived: its entries, and their thumbnails as textures (small, 160 px).
    pub fn listed(&mut self, listing: CacheListing, ctx: &Context) {
        self.busy = false;
        self.total_bytes = listing.total_bytes;
        self.max_bytes = listing.max_bytes;
        self.error = listing.error;
        self.thumbnails.clear();
        self.entries.clear();
        for (entry, thumbnail) in listing.entries {
            if let Some(image) = thumbnail {
                let texture = textures::upload(ctx, &format!("cache-{}", entry.key), image);
                self.thumbnails.insert(entry.key.clone(), texture);
            }
            self.entries.push(entry);
        }
    }

    pub fn listing_failed(&mut self) {
        self.busy = false;
    }

    /// The keys of the listed entries.
    pub fn keys(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.key.clone()).collect()
    }
}

/// Draws the window while it is open.
pub fn show(ctx: &Context, window: &CacheWindow, commands: &mut Vec<Command>) {
    if !window.open {
        return;
    }
    let mut open = true;
    egui::Window::new("Snapshot cache")
        .open(&mut open)
        .default_width(460.0)
        .show(ctx, |ui| contents_ui(ui, window, commands));
    if !open {
        commands.push(Command::HideCache);
    }
}

fn contents_ui(ui: &mut Ui, window: &CacheWindow, commands: &mut Vec<Command>) {
    ui.horizontal(|ui| {
        ui.label(format!(
            "{} in {} fine-tunes, of {} allowed",
            bytes_text(window.total_bytes),
            window.entries.len(),
            bytes_text(window.max_bytes)
        ));
        if window.busy {
            ui.spinner();
        }
    });
    let fraction = window.total_bytes as f32 / window.max_bytes.max(1) as f32;
    ui.add(egui::ProgressBar::new(fraction.min(1.0)));
    if let Some(error) = &window.error {
        ui.colored_label(ui.visuals().error_fg_color, error);
    }
    ui.small("The least recently used fine-tunes are removed first when the cache is full.");
    ui.separator();
    egui::ScrollArea::vertical()
        .max_height(360.0)
        .show(ui, |ui| {
            if window.entries.is_empty() && !window.busy {
                ui.label("Nothing is cached.");
            }
            for entry in &window.entries {
                entry_ui(ui, entry, window.thumbnails.get(&entry.key), commands);
            }
        });
    ui.separator();
    ui.horizontal(|ui| {
        let any = !window.entries.is_empty() && !window.busy;
        if window.confirm_clear {
            ui.label("Remove every cached fine-tune?");
            if ui.button("Yes, clear all").clicked() {
                commands.push(Command::ClearCache);
            }
            if ui.button("Keep them").clicked() {
                commands.push(Command::ConfirmClearCache(false));
            }
        } else if ui
            .add_enabled(any, egui::Button::new("Clear all..."))
            .clicked()
        {
            commands.push(Command::ConfirmClearCache(true));
        }
    });
}

fn entry_ui(
    ui: &mut Ui,
    entry: &CacheEntry,
    thumbnail: Option<&TextureHandle>,
    commands: &mut Vec<Command>,
) {
    ui.horizontal(|ui| {
        let size = egui::vec2(64.0, 64.0);
        match thumbnail {
            Some(texture) => {
                ui.add(egui::Image::new(texture).fit_to_exact_size(size));
            }
            None => {
                ui.add_sized(size, egui::Label::new("no photo"));
            }
        }
        ui.vertical(|ui| {
            let steps = entry
                .snapshot_steps
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            ui.label(format!("{} · snapshots {steps}", bytes_text(entry.bytes)));
            let stopped = entry
                .resumable_at
                .map_or(String::new(), |s| format!(" · stopped at step {s}"));
            ui.small(format!("used {}{stopped}", ago_text(entry.last_used)));
            if ui
                .small_button("Remove")
                .on_hover_text(format!("Removes {}", entry.dir.display()))
                .clicked()
            {
                commands.push(Command::RemoveCacheEntry(entry.key.clone()));
            }
        });
    });
}

/// "3 min ago", "2 days ago".
fn ago_text(time: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(time)
        .map_or(0, |d| d.as_secs());
    match secs {
        0..60 => "just now".into(),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_how_long_ago() {
        let ago = |secs| ago_text(SystemTime::now() - std::time::Duration::from_secs(secs));
        assert_eq!(ago(5), "just now");
        assert_eq!(ago(180), "3 min ago");
        assert_eq!(ago(7300), "2 h ago");
        assert_eq!(ago(3 * 86_400 + 5), "3 days ago");
    }
}
