//! Progress of model downloads: the observer trait, a terminal bar and a silent observer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Sees a model download file by file. Files already in the cache are not reported.
pub trait DownloadProgress {
    /// A file starts downloading; `total_bytes` is its full size when the hub tells it.
    fn start_file(&mut self, name: &str, total_bytes: Option<u64>);
    /// `bytes` more of the current file are on disk (a resumed file reports the part it
    /// already had first).
    fn advance(&mut self, bytes: u64);
    /// The current file is done, or its download stopped with an error.
    fn finish_file(&mut self);
    /// Whether to stop. Checked before each file: a file already downloading finishes
    /// first (its partial download would resume on the next run anyway).
    fn cancelled(&self) -> bool {
        false
    }
}

/// Reports nothing and never cancels.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl DownloadProgress for NoProgress {
    fn start_file(&mut self, _name: &str, _total_bytes: Option<u64>) {}
    fn advance(&mut self, _bytes: u64) {}
    fn finish_file(&mut self) {}
}

/// A progress bar per file on stderr with bytes, speed and time left. When stderr is not a
/// terminal it prints one line per file instead.
#[derive(Debug, Default)]
pub struct TerminalProgress {
    bar: Option<ProgressBar>,
    name: String,
    cancel: Option<Arc<AtomicBool>>,
}

impl TerminalProgress {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops the download (between files) once `flag` is set, e.g. by a Ctrl-C handler.
    pub fn with_cancel_flag(flag: Arc<AtomicBool>) -> Self {
        Self {
            cancel: Some(flag),
            ..Self::default()
        }
    }
}

impl DownloadProgress for TerminalProgress {
    fn start_file(&mut self, name: &str, total_bytes: Option<u64>) {
        self.finish_file();
        self.name = name.to_owned();
        let target = ProgressDrawTarget::stderr();
        let bar = match total_bytes {
            Some(total) => {
                let style = ProgressStyle::with_template(
                    "{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                ProgressBar::with_draw_target(Some(total), target).with_style(style)
            }
            None => {
                let style = ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner());
                ProgressBar::with_draw_target(None, target).with_style(style)
            }
        };
        bar.set_message(format!("downloading {name}"));
        if bar.is_hidden() {
            match total_bytes {
                Some(total) => eprintln!("downloading {name} ({})", HumanBytes(total)),
                None => eprintln!("downloading {name}"),
            }
        }
        self.bar = Some(bar);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn finish_file(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.set_message(self.name.clone());
            bar.finish();
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }
}

/// Adapts a [`DownloadProgress`] to the progress hook of `hf-hub`, which reports a file
/// twice at its start (and again at each retry, followed by the absolute position).
pub(crate) struct HubProgress<'a> {
    inner: &'a mut dyn DownloadProgress,
    name: &'a str,
    started: bool,
    finished: bool,
    /// Bytes reported to `inner` for this file.
    reported: u64,
    /// The next update is an absolute position, not an increment.
    next_is_position: bool,
}

impl<'a> HubProgress<'a> {
    pub(crate) fn new(inner: &'a mut dyn DownloadProgress, name: &'a str) -> Self {
        Self {
            inner,
            name,
            started: false,
            finished: false,
            reported: 0,
            next_is_position: false,
        }
    }
}

impl hf_hub::api::Progress for HubProgress<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        if self.started {
            self.next_is_position = true;
        } else {
            self.started = true;
            self.inner.start_file(self.name, Some(size as u64));
        }
    }

    fn update(&mut self, size: usize) {
        let size = size as u64;
        let increment = if self.next_is_position {
            self.next_is_position = false;
            size.saturating_sub(self.reported)
        } else {
            size
        };
        if increment > 0 {
            self.reported += increment;
            self.inner.advance(increment);
        }
    }

    fn finish(&mut self) {
        if self.started && !self.finished {
            self.finished = true;
            self.inner.finish_file();
        }
    }
}

impl Drop for HubProgress<'_> {
    /// A download that failed never calls `finish`; the observer still hears the end.
    fn drop(&mut self) {
        hf_hub::api::Progress::finish(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hf_hub::api::Progress;

    #[derive(Default)]
    struct Log(Vec<String>);

    impl DownloadProgress for Log {
        fn start_file(&mut self, name: &str, total_bytes: Option<u64>) {
            self.0.push(format!("start {name} {total_bytes:?}"));
        }
        fn advance(&mut self, bytes: u64) {
            self.0.push(format!("+{bytes}"));
        }
        fn finish_file(&mut self) {
            self.0.push("finish".to_owned());
        }
    }

    #[test]
    fn hub_hooks_become_one_start_increments_and_one_finish() {
        let mut log = Log::default();
        {
            let mut adapter = HubProgress::new(&mut log, "unet/w");
            // hf-hub 0.5: init in download_tempfile, init + update(start) in download_from.
            adapter.init(10, "unet/w");
            adapter.init(10, "unet/w");
            adapter.update(0);
            adapter.update(4);
            // A retry resumes at byte 4: init again, then the absolute position.
            adapter.init(10, "unet/w");
            adapter.update(4);
            adapter.update(6);
            adapter.finish();
        }
        assert_eq!(log.0, ["start unet/w Some(10)", "+4", "+6", "finish"]);
    }

    #[test]
    fn a_resumed_file_reports_its_partial_part_and_a_failed_one_still_finishes() {
        let mut log = Log::default();
        {
            let mut adapter = HubProgress::new(&mut log, "vae/w");
            adapter.init(10, "vae/w");
            adapter.init(10, "vae/w");
            adapter.update(7);
            adapter.update(1);
        }
        assert_eq!(log.0, ["start vae/w Some(10)", "+7", "+1", "finish"]);
    }

    #[test]
    fn terminal_progress_cancels_when_its_flag_is_set() {
        let flag = Arc::new(AtomicBool::new(false));
        let progress = TerminalProgress::with_cancel_flag(Arc::clone(&flag));
        assert!(!progress.cancelled());
        flag.store(true, Ordering::Relaxed);
        assert!(progress.cancelled());
        assert!(!TerminalProgress::new().cancelled());
    }
}
