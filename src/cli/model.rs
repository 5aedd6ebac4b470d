//! The global flags as the edit service's [`ModelRequest`], and loading it with lines on
//! stderr saying what was loaded (and a license before anything downloads).

use anyhow::Result;

use super::UsageError;
use super::args::{GlobalOptions, TrainingOptions};
use crate::engine::finetune::SnapshotCache;
use crate::model_files::{
    self, DownloadProgress, HubOptions, LoraChoice, TerminalProgress, parse_model_arg,
};
use crate::service::{EditService, ModelRequest, resolve_files};

/// Every global flag in one request: the same one the editor gets.
pub fn model_request(global: &GlobalOptions) -> Result<ModelRequest> {
    let loras = global
        .loras
        .iter()
        .map(|text| LoraChoice::parse(text).map_err(UsageError))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ModelRequest {
        vae: global.vae.clone(),
        prediction_type: global.prediction_type.map(Into::into),
        device: global.device,
        precision: global.precision.unwrap_or_default(),
        loras,
        hub: HubOptions {
            offline: global.offline,
            ..HubOptions::default()
        },
        ..ModelRequest::new(&global.model)
    })
}

/// The snapshot cache in the user cache folder with the `--cache-size` cap; `None` with
/// `--no-cache`.
pub(super) fn snapshot_cache(options: &TrainingOptions) -> Result<Option<SnapshotCache>> {
    if !(options.cache_size.is_finite() && options.cache_size >= 0.0) {
        return Err(UsageError(format!(
            "--cache-size must be a number of gigabytes, not {}",
            options.cache_size
        ))
        .into());
    }
    if options.no_cache {
        return Ok(None);
    }
    let max_bytes = (options.cache_size * 1e9) as u64;
    Ok(SnapshotCache::default_dir().map(|dir| SnapshotCache::new(dir).with_max_bytes(max_bytes)))
}

/// Loads the model the global flags name, saying on stderr where from and what it is.
pub(super) fn load_service(
    global: &GlobalOptions,
    cache: Option<SnapshotCache>,
) -> Result<EditService> {
    let request = model_request(global)?;
    let spec = parse_model_arg(&request.model)?;
    let mut progress = NoticeBeforeDownload {
        notice: model_files::license_notice(&spec),
        inner: TerminalProgress::new(),
    };
    let (spec, files) = resolve_files(&request, &mut progress)?;
    eprintln!("loading model {spec} ({})", files.source);
    let service = EditService::open(&request, &spec, &files, cache)?;
    let summary = service.summary();
    eprintln!("using device: {} ({})", summary.device, summary.precision);
    eprintln!("model: {}", summary.description);
    if !request.loras.is_empty() {
        let (unet, text) = summary.lora_changes;
        eprintln!(
            "applied {} LoRA(s): {unet} UNet and {text} text-encoder weights changed",
            request.loras.len()
        );
    }
    Ok(service)
}

/// Prints the model's license notice once, before the first file downloads.
struct NoticeBeforeDownload<P> {
    notice: Option<&'static str>,
    inner: P,
}

impl<P: DownloadProgress> DownloadProgress for NoticeBeforeDownload<P> {
    fn start_file(&mut self, name: &str, total_bytes: Option<u64>) {
        if let Some(notice) = self.notice.take() {
            eprint!("{notice}");
        }
        self.inner.start_file(name, total_bytes);
    }
    fn advance(&mut self, bytes: u64) {
        self.inner.advance(bytes);
    }
    fn finish_file(&mut self) {
        self.inner.finish_file();
    }
    fn cancelled(&self) -> bool {
        self.inner.cancelled()
    }
}
