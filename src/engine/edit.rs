//! A whole UniTune edit, as the CLI and the GUI both run it: fine-tune on the photo (or take
//! the snapshots from the cache), pick a snapshot, sample "beikkpic <edit prompt>", then
//! bring the result back to the photo's size, paste the original outside the mask and
//! optionally interpolate toward the original (paper sections 3.2-3.4 and A.1).

use std::ops::ControlFlow;
use std::path::PathBuf;

use image::{GrayImage, RgbImage};

use super::error::{EngineError, Result};
use super::finetune::{
    Adapter, CacheLookup, IN_MEMORY_LIMIT_BYTES, Snapshot, SnapshotCache, TrainingState,
    TuneObserver, TuneProgress, TuneSettings, fine_tune_from, write_safetensors,
};
use super::instruct::{InstructRequest, sample_instruct};
use super::model::StableDiffusion;
use super::noise::NoiseSource;
use super::precision::dtype_name;
use super::sampling::{
    SampleRequest, Start, StepObserver, check_proceed, check_text_to_image, sample,
};
use crate::imaging;

/// A photo the model has been fine-tuned on: the trainable weights and their snapshots.
pub struct TunedPhoto {
    pub adapter: Adapter,
    pub snapshots: Vec<Snapshot>,
    pub settings: TuneSettings,
    /// The cache folder the snapshots are stored in, when cached.
    pub cache_dir: Option<PathBuf>,
    pub from_cache: bool,
    /// Holds large snapshots when there is no cache; removed with the photo.
    _spill: Option<tempfile::TempDir>,
}

/// A fine-tune that ended before its last snapshot (cancelled or failed). The base weights
/// are loaded again; the snapshots completed so far stay usable in `partial` (and cached, with
/// where the run stood, so that the next run of the recipe continues instead of restarting).
#[derive(Debug)]
pub struct TuneStopped {
    pub error: EngineError,
    /// The photo tuned as far as it got, when at least one snapshot was completed (boxed: a
    /// tuned photo holds a whole UNet's worth of handles, and errors travel by value).
    pub partial: Option<Box<TunedPhoto>>,
}

impl std::fmt::Debug for TunedPhoto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunedPhoto")
            .field("mode", &self.adapter.mode())
            .field("snapshot_steps", &self.snapshot_steps())
            .field("cache_dir", &self.cache_dir)
            .field("from_cache", &self.from_cache)
            .finish_non_exhaustive()
    }
}

impl From<TuneStopped> for EngineError {
    fn from(stopped: TuneStopped) -> Self {
        stopped.error
    }
}

impl From<EngineError> for TuneStopped {
    fn from(error: EngineError) -> Self {
        Self {
            error,
            partial: None,
        }
    }
}

impl TunedPhoto {
    /// True when every snapshot of the recipe is there (false for a stopped fine-tune's).
    pub fn is_complete(&self) -> bool {
        self.snapshot_steps() == self.settings.snapshot_steps
    }

    pub fn snapshot_steps(&self) -> Vec<usize> {
        self.snapshots.iter().map(|s| s.steps).collect()
    }

    /// Loads the weights after `steps` fine-tuning steps (0 = the untuned model) in place;
    /// the snapshot already loaded costs nothing.
    pub fn select(&self, steps: usize) -> Result<()> {
        if steps == 0 {
            return self.adapter.load(self.adapter.base());
        }
        let snapshot = self
            .snapshots
            .iter()
            .find(|s| s.steps == steps)
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "there is no snapshot after {steps} fine-tuning steps (saved: {:?})",
                    self.snapshot_steps()
                ))
            })?;
        self.adapter.load(snapshot)
    }
}

/// What happens while a photo is being tuned.
pub enum TuneEvent<'a> {
    /// The snapshots came from this cache folder; no training.
    CacheHit(&'a std::path::Path),
    /// A cache file was there but could not be trusted; it will be rebuilt.
    CacheDamaged(&'a str),
    Progress(&'a TuneProgress),
    /// The photo and prompt are encoded and the first step is next; the answer to this
    /// event, like to every other, can stop the fine-tune.
    Preparing,
    /// A snapshot could not be written to the cache (a full disk, a read-only folder); the
    /// fine-tune goes on with it in memory or a temporary file.
    CacheWriteFailed(&'a str),
    /// The snapshots were saved to this cache folder (`evicted` older entries made room).
    Stored {
        dir: &'a std::path::Path,
        evicted: usize,
    },
    /// One sentence the person should read (the service chose differently than asked).
    Notice(&'a str),
    /// The snapshot after this many steps was kept: it can be edited with from now on, even if
    /// the fine-tune is stopped later.
    SnapshotKept(usize),
    /// A stopped fine-tune of this recipe continues after `steps` steps, with its first
    /// `snapshots` snapshots already done.
    Resumed {
        steps: usize,
        snapshots: usize,
    },
    /// Fine-tuning stopped; where it stood after `steps` steps was saved, so the next run
    /// continues from there.
    ResumeSaved {
        steps: usize,
    },
}

/// Where to look for and keep snapshots.
pub struct CachePolicy<'a> {
    /// `None` disables the cache (`--no-cache`).
    pub cache: Option<&'a SnapshotCache>,
    /// Names the model's exact weights (part of the cache key, with the compute precision).
    pub model_identity: &'a str,
}

/// Keeps each snapshot as it is taken: in the cache when there is one, else in memory, or in
/// a temporary file when it is too large for memory.
struct TuneRun<'a, 'e> {
    cache: Option<(&'a SnapshotCache, String)>,
    settings: &'a TuneSettings,
    /// The photo at its working size (for the cache entry's thumbnail).
    photo: &'a RgbImage,
    /// Every snapshot kept so far, ascending (a resumed run's earlier ones included).
    kept: Vec<Snapshot>,
    spill: Option<tempfile::TempDir>,
    reconstruct_every: Option<usize>,
    on_event: &'e mut dyn FnMut(TuneEvent) -> ControlFlow<()>,
}

impl TuneRun<'_, '_> {
    fn spill_file(&mut self, adapter: &Adapter, steps: usize) -> Result<Snapshot> {
        if self.spill.is_none() {
            let parent = SnapshotCache::default_dir()
                .and_then(|d| d.parent().map(|p| p.join("tmp")))
                .unwrap_or_else(std::env::temp_dir);
            std::fs::create_dir_all(&parent).map_err(|e| {
                EngineError::Cache(format!("cannot write to {}: {e}", parent.display()))
            })?;
            self.spill = Some(tempfile::tempdir_in(&parent).map_err(|e| {
                EngineError::Cache(format!("cannot write to {}: {e}", parent.display()))
            })?);
        }
        let dir = self
            .spill
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default();
        let path = dir.join(format!("{steps}.safetensors"));
        write_safetensors(&path, &adapter.named_values(), &Default::default())?;
        Ok(adapter.stored_snapshot(steps, path))
    }
}

impl TuneObserver for TuneRun<'_, '_> {
    fn observe(&mut self, progress: &TuneProgress) -> ControlFlow<()> {
        (self.on_event)(TuneEvent::Progress(progress))
    }

    fn wants_reconstruction(&self, step: usize) -> bool {
        self.reconstruct_every.is_some_and(|every| {
            step == self.settings.total_steps() || (every > 0 && step.is_multiple_of(every))
        })
    }

    fn keep(&mut self, adapter: &Adapter, steps: usize) -> Result<Snapshot> {
        let snapshot = self.write(adapter, steps)?;
        self.kept.retain(|s| s.steps != steps);
        self.kept.push(snapshot.clone());
        let _ = (self.on_event)(TuneEvent::SnapshotKept(steps));
        Ok(snapshot)
    }

    fn proceed(&mut self) -> ControlFlow<()> {
        (self.on_event)(TuneEvent::Preparing)
    }

    fn stopped(&mut self, adapter: &Adapter, state: &TrainingState) -> Result<()> {
        if let Some((cache, key)) = &self.cache {
            match cache.store_resume(key, adapter, self.settings, state) {
                Ok(_) => {
                    cache.store_thumbnail(key, self.photo);
                    let _ = (self.on_event)(TuneEvent::ResumeSaved { steps: state.steps });
                }
                Err(e) => {
                    let _ = (self.on_event)(TuneEvent::CacheWriteFailed(&e.to_string()));
                }
            }
        }
        Ok(())
    }
}

impl TuneRun<'_, '_> {
    /// Keeps the adapter's values as snapshot `steps`: in the cache, else in memory when
    /// small, else in a temporary file. A cache that cannot be written is warned about and
    /// left for the rest of the run; the snapshot is never lost to it.
    fn write(&mut self, adapter: &Adapter, steps: usize) -> Result<Snapshot> {
        let small = adapter.parameter_bytes() <= IN_MEMORY_LIMIT_BYTES;
        if let Some((cache, key)) = &self.cache {
            match cache.store(key, adapter, self.settings, steps) {
                Ok(path) => {
                    cache.store_thumbnail(key, self.photo);
                    if !small {
                        return Ok(adapter.stored_snapshot(steps, path));
                    }
                    return adapter.snapshot(steps);
                }
                Err(e) => {
                    let _ = (self.on_event)(TuneEvent::CacheWriteFailed(&e.to_string()));
                    self.cache = None;
                }
            }
        }
        if small {
            return adapter.snapshot(steps);
        }
        self.spill_file(adapter, steps).or_else(|e| {
            let _ = (self.on_event)(TuneEvent::CacheWriteFailed(&e.to_string()));
            adapter.snapshot(steps)
        })
    }
}

/// Fine-tunes `model` on `photo` (at the working size), or loads the snapshots from the cache;
/// a fine-tune of the recipe that was stopped earlier continues where it stood. The model's
/// sampling UNet is switched to the trainable weights. A fine-tune that stops early loads the
/// base weights again and hands back what it completed (see [`TuneStopped`]).
pub fn tune_photo(
    model: &mut StableDiffusion,
    photo: &RgbImage,
    settings: &TuneSettings,
    policy: &CachePolicy,
    reconstruct_every: Option<usize>,
    on_event: &mut dyn FnMut(TuneEvent) -> ControlFlow<()>,
) -> std::result::Result<TunedPhoto, TuneStopped> {
    settings.validate()?;
    check_text_to_image(model)?;
    // LoRA's A factors are the only random initial weights; they come from the recipe's seed.
    let mut init_noise = NoiseSource::from_seed(settings.seed ^ 0x5eed_1a1a);
    let adapter = Adapter::attach(model, settings.mode, &mut init_noise)?;
    let identity = format!("{};{}", policy.model_identity, dtype_name(model.dtype()));
    let key = SnapshotCache::key(&identity, photo, settings);
    let mut earlier = Vec::new();
    let mut resume = None;
    if let Some(cache) = policy.cache {
        match cache.load(&key, &adapter, settings) {
            CacheLookup::Hit(snapshots) => {
                let dir = cache.entry_dir(&key);
                let _ = on_event(TuneEvent::CacheHit(&dir));
                if let Some(last) = snapshots.last() {
                    adapter.load(last)?;
                }
                return Ok(TunedPhoto {
                    adapter,
                    snapshots,
                    settings: settings.clone(),
                    cache_dir: Some(dir),
                    from_cache: true,
                    _spill: None,
                });
            }
            CacheLookup::Partial {
                snapshots,
                resume: point,
            } => {
                earlier = snapshots;
                if let Some(point) = point {
                    match cache.resume(&key, &point, &adapter, settings) {
                        Ok(state) => {
                            let _ = on_event(TuneEvent::Resumed {
                                steps: state.steps,
                                snapshots: earlier.len(),
                            });
                            resume = Some(state);
                        }
                        Err(e) => {
                            let _ = on_event(TuneEvent::CacheDamaged(&e.to_string()));
                            adapter.load(adapter.base())?;
                        }
                    }
                }
            }
            CacheLookup::Damaged(reason) => {
                let _ = on_event(TuneEvent::CacheDamaged(&reason));
            }
            CacheLookup::Miss => {}
        }
    }
    // Without a resume point the earlier snapshots are retrained (to the same values: the
    // recipe is seeded) but stay usable meanwhile.
    let mut run = TuneRun {
        cache: policy.cache.map(|c| (c, key.clone())),
        settings,
        photo,
        kept: earlier,
        spill: None,
        reconstruct_every,
        on_event,
    };
    let trained = fine_tune_from(model, &adapter, photo, settings, resume.as_ref(), &mut run);
    let tuned = TunedPhoto {
        adapter,
        snapshots: run.kept,
        settings: settings.clone(),
        cache_dir: run.cache.as_ref().map(|(cache, key)| cache.entry_dir(key)),
        from_cache: false,
        _spill: run.spill,
    };
    if let Err(error) = trained {
        // Whatever stopped the run, the model must not keep half-trained weights.
        tuned.adapter.load(tuned.adapter.base())?;
        let partial = (!tuned.snapshots.is_empty()).then(|| Box::new(tuned));
        return Err(TuneStopped { error, partial });
    }
    if let Some((cache, key)) = &run.cache {
        cache.finish(key);
        let evicted = cache.evict(key).len();
        let dir = cache.entry_dir(key);
        let _ = (run.on_event)(TuneEvent::Stored { dir: &dir, evicted });
    }
    Ok(tuned)
}

/// How an edit is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EditMethod {
    /// UniTune: SDEdit toward "token prompt" from the snapshot `tune_steps` (0 = plain SDEdit
    /// from the untuned model, the paper's baseline).
    UniTune,
    /// InstructPix2Pix: the prompt is an instruction ("make it winter") for an
    /// InstructPix2Pix model; `guidance_weight` is the text guidance. No fine-tuning and no t0: the
    /// photo conditions every step instead.
    Instruct { image_guidance: f64 },
}

impl EditMethod {
    /// The name the recipe records: `unitune`, `sdedit` (UniTune without fine-tuning) or
    /// `instruct-pix2pix`.
    pub fn recipe_name(&self, tune_steps: usize) -> &'static str {
        match self {
            EditMethod::Instruct { .. } => "instruct-pix2pix",
            EditMethod::UniTune if tune_steps == 0 => "sdedit",
            EditMethod::UniTune => "unitune",
        }
    }
}

/// One edit of one photo.
#[derive(Debug, Clone)]
pub struct EditRequest<'a> {
    pub method: EditMethod,
    /// The photo at its own size.
    pub original: &'a RgbImage,
    /// The photo fitted to the model's working size.
    pub working: &'a RgbImage,
    pub prompt: &'a str,
    /// Prompt guidance's baseline (a description of the photo); `None` = classifier-free.
    pub baseline_prompt: Option<&'a str>,
    /// Which snapshot to sample from (0 = no fine-tuning: plain SDEdit). 0 for instructions.
    pub tune_steps: usize,
    /// SDEdit start (unused by instructions).
    pub t0_fraction: f64,
    pub guidance_weight: f64,
    pub sampling_steps: usize,
    pub seed: u64,
    /// White = may change, at the original's size.
    pub mask: Option<&'a GrayImage>,
    /// Blend toward the original where neighbourhoods match (paper 3.4).
    pub interpolate: bool,
}

/// The prompt the model samples: the rare token in front when it was fine-tuned.
pub fn model_prompt(token: Option<&str>, prompt: &str) -> String {
    match token {
        Some(token) => format!("{token} {prompt}"),
        None => prompt.to_string(),
    }
}

/// Runs one edit and returns the result at the original's size.
pub fn edit_photo(
    model: &StableDiffusion,
    tuned: Option<&TunedPhoto>,
    request: &EditRequest,
    observer: &mut dyn StepObserver,
) -> Result<RgbImage> {
    let (w, h) = request.working.dimensions();
    let working_mask = request.mask.map(|m| imaging::resize_gray(m, w, h));
    let sampled = match request.method {
        EditMethod::UniTune => {
            sample_unitune(model, tuned, request, working_mask.as_ref(), observer)?
        }
        EditMethod::Instruct { image_guidance } => {
            if request.tune_steps > 0 {
                return Err(EngineError::InvalidRequest(
                    "instruction edits use the model as it is; fine-tuning steps cannot be chosen with them".into(),
                ));
            }
            if let Some(tuned) = tuned {
                tuned.select(0)?;
            }
            let instruct = InstructRequest {
                image: request.working,
                instruction: request.prompt,
                text_guidance: request.guidance_weight,
                image_guidance,
                sampling_steps: request.sampling_steps,
                seed: request.seed,
                mask: working_mask.as_ref(),
            };
            sample_instruct(model, &instruct, observer)?.image
        }
    };
    // Each full-resolution stage below can take as long as a step on a large photo.
    check_proceed(observer)?;
    let (ow, oh) = request.original.dimensions();
    let mut result = imaging::resize_rgb(&sampled, ow, oh);
    if let Some(mask) = request.mask {
        check_proceed(observer)?;
        let radius = imaging::default_feather_radius(ow, oh);
        result = imaging::paste_outside_mask(request.original, &result, mask, radius)?;
    }
    if request.interpolate {
        check_proceed(observer)?;
        let settings = imaging::InterpolationSettings::for_size(ow, oh);
        result = imaging::interpolate_toward_original(request.original, &result, &settings)?;
    }
    Ok(result)
}

/// UniTune's sampling at the working size: "token prompt" from the chosen snapshot.
fn sample_unitune(
    model: &StableDiffusion,
    tuned: Option<&TunedPhoto>,
    request: &EditRequest,
    working_mask: Option<&GrayImage>,
    observer: &mut dyn StepObserver,
) -> Result<RgbImage> {
    let token = match (request.tune_steps, tuned) {
        (0, Some(tuned)) => {
            tuned.select(0)?;
            None
        }
        (0, None) => None,
        (steps, Some(tuned)) => {
            tuned.select(steps)?;
            Some(tuned.settings.token.as_str())
        }
        (steps, None) => {
            return Err(EngineError::InvalidRequest(format!(
                "{steps} fine-tuning steps were asked for but the photo was not fine-tuned"
            )));
        }
    };
    let prompt = model_prompt(token, request.prompt);
    let baseline = request
        .baseline_prompt
        .map(|b| model_prompt(token, b))
        .unwrap_or_default();
    let sample_request = SampleRequest {
        prompt: &prompt,
        baseline_prompt: &baseline,
        guidance_weight: request.guidance_weight,
        sampling_steps: request.sampling_steps,
        seed: request.seed,
        start: Start::Photo {
            image: request.working,
            t0_fraction: request.t0_fraction,
            mask: working_mask,
        },
    };
    Ok(sample(model, &sample_request, observer)?.image)
}
