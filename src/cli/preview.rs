//! `--preview`: each denoising step's guess of the result, written to an image file that an
//! image viewer can show live. A preview never fails the command: without the tiny VAE the
//! fast preview stands in, and a preview that cannot be written is given up with a warning.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Tensor;

use super::UsageError;
use super::args::{GlobalOptions, PreviewOptions};
use super::checks::check_output_extension;
use super::outputs::Output;
use crate::engine::preview::{
    LatentPreview, PreviewMode, PreviewThrottle, Previewer, Previews, TinyPreview,
};
use crate::imaging::{self, ExistingFile, PREVIEW_MARK, one_line};
use crate::model_files::{self, HubOptions, TINY_VAE_REPO, TerminalProgress};
use crate::service::EditService;

/// Refuses a `--preview-out` that cannot be written as an image, or that nothing would fill.
pub(super) fn check_preview_options(options: &PreviewOptions) -> Result<()> {
    if let Some(path) = &options.preview_out {
        if options.preview == PreviewMode::Off {
            return Err(
                UsageError("--preview-out needs --preview taesd or --preview fast".into()).into(),
            );
        }
        check_output_extension(path).map_err(|_| {
            UsageError(format!(
                "--preview-out {} must end in .png, .jpg or .webp",
                path.display()
            ))
        })?;
    }
    Ok(())
}

/// The previews `options` ask for: the tiny VAE (found or downloaded like a model), or the
/// fast map in its place when it cannot be had; nothing for `off`.
pub(super) fn open_previews(
    global: &GlobalOptions,
    service: &EditService,
    options: &PreviewOptions,
) -> Previews {
    let mut previews = Previews::default();
    if options.preview == PreviewMode::Taesd {
        match load_tiny_vae(global, service) {
            Ok(tiny) => previews.tiny = Some(tiny),
            Err(error) => eprintln!(
                "warning: the {TINY_VAE_REPO} preview is not available ({}); showing the fast preview instead",
                super::error_line(&error)
            ),
        }
    }
    if options.preview == PreviewMode::Fast
        || (options.preview == PreviewMode::Taesd && previews.tiny.is_none())
    {
        match LatentPreview::for_model(service.engine(), 0) {
            Ok(fast) => previews.fast = Some(fast),
            Err(error) => eprintln!("warning: no preview ({})", one_line(&error.to_string())),
        }
    }
    previews
}

fn load_tiny_vae(global: &GlobalOptions, service: &EditService) -> Result<TinyPreview> {
    let hub = HubOptions {
        offline: global.offline,
        ..HubOptions::default()
    };
    let files = model_files::resolve_tiny_vae(&hub, &mut TerminalProgress::new())?;
    Ok(TinyPreview::load(
        &files.config,
        &files.weights,
        service.engine(),
    )?)
}

/// `--preview-out`, or `OUT-preview.png` beside the output; when that default holds a file
/// that is not an earlier preview of unitune's, the next free numbered name instead.
pub(super) fn preview_path(options: &PreviewOptions, output: &Path) -> PathBuf {
    if let Some(path) = &options.preview_out {
        return path.clone();
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unitune".into());
    let default = output.with_file_name(format!("{stem}-preview.png"));
    if Output::preview("--preview-out", &default, false).existing == ExistingFile::Overwrite {
        return default;
    }
    imaging::next_free_path(&default)
}

/// The preview as one of the command's outputs (`None` when no preview is written).
pub(super) fn preview_output(
    options: &PreviewOptions,
    output: &Path,
    overwrite: bool,
) -> Option<Output> {
    (options.preview != PreviewMode::Off)
        .then(|| Output::preview("--preview-out", &preview_path(options, output), overwrite))
}

/// Writes each step's preview to one file, replacing it atomically.
pub(super) struct PreviewFile<'a> {
    previewer: Previewer<'a>,
    path: PathBuf,
    throttle: PreviewThrottle,
    /// Set after a failure: the edit goes on without previews.
    given_up: bool,
}

impl<'a> PreviewFile<'a> {
    /// `None` when `mode` asks for no preview or none is at hand.
    pub fn new(previews: &'a Previews, mode: PreviewMode, path: PathBuf) -> Option<Self> {
        let previewer = previews.pick(mode)?;
        Some(Self {
            previewer,
            path,
            throttle: PreviewThrottle::new(),
            given_up: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renders `x0` (a step's prediction of the clean latents) into the file, unless the
    /// last preview was too recent for its cost; the `last` step's always, so the file ends
    /// with the run's final prediction.
    pub fn show(&mut self, x0: &Tensor, last: bool) {
        if self.given_up || !(last || self.throttle.due()) {
            return;
        }
        let written = self
            .throttle
            .render(self.previewer, x0)
            .map_err(anyhow::Error::from)
            .and_then(|image| {
                // Marked as unitune's own, so that a later run may replace it.
                let mark = [(
                    PREVIEW_MARK.to_owned(),
                    "a live preview, replaced by the next".to_owned(),
                )];
                imaging::export_image(&self.path, &image, None, &mark, ExistingFile::Overwrite)
                    .map_err(anyhow::Error::from)
            });
        if let Err(error) = written {
            self.given_up = true;
            eprintln!(
                "warning: no more previews ({}); the edit goes on",
                super::error_line(&error)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use indicatif::ProgressBar;

    use super::*;
    use crate::cli::cancel::CancelFlag;
    use crate::cli::progress::sampling_observer;
    use crate::engine::sampling::{StepObserver, StepView};

    /// At a run's last step the latents and the x0 prediction nearly coincide, so the end to
    /// end test cannot tell them apart: here they differ, and the file must show x0.
    #[test]
    fn the_sampling_observer_writes_the_steps_x0_prediction() {
        let previews = Previews {
            fast: Some(LatentPreview::from_parts(
                vec![[0.5, 0.2, -0.3]; 4],
                [0.0; 3],
                1.0,
            )),
            tiny: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let mut file = PreviewFile::new(&previews, PreviewMode::Fast, path.clone()).unwrap();
        let (bar, cancel) = (ProgressBar::hidden(), CancelFlag::default());
        let latents = Tensor::full(-0.8f32, (1, 4, 2, 3), &Device::Cpu).unwrap();
        let x0 = Tensor::full(0.6f32, (1, 4, 2, 3), &Device::Cpu).unwrap();
        let mut observer = sampling_observer(&bar, &cancel, Some(&mut file));
        let view = StepView {
            step: 1,
            total_steps: 2,
            timestep: 500,
            latents: &latents,
            predicted_x0: &x0,
        };
        assert!(observer.observe(&view).is_continue());
        let written = image::open(&path).unwrap().to_rgb8();
        let fast = previews.pick(PreviewMode::Fast).unwrap();
        assert_eq!(
            written,
            fast.render(&x0.to_dtype(DType::F32).unwrap()).unwrap()
        );
        assert_ne!(written, fast.render(&latents).unwrap());
    }
}
