//! The edit service: the one way to make an edit, below the two front ends (the command line,
//! and the editor through its [`crate::jobs`] worker) and above the [`crate::engine`].
//!
//! [`EditService`] owns the loaded model and its public identity, the snapshot cache and the
//! photo's current fine-tune. It offers:
//! - [`EditService::load`]: every global flag, one [`ModelRequest`];
//! - [`EditService::tune`]: fine-tune on a photo (or take its snapshots from the cache);
//! - [`EditService::edit`]: one [`EditSpec`] in, the image and its [`Recipe`] out;
//! - [`EditService::generate`] (text to image) and [`EditService::export_lora`].
//!
//! Each decision is made in one function: the working size and the seed ([`plan`]), the
//! fidelity plan ([`plan::plan_edit`]), the fine-tuning settings ([`TrainingChoice`]), the
//! model's public name and hash ([`ModelIdentity`]) and the recipe ([`recipe`]). A front end
//! maps its input onto these and presents what comes back; it never composes the pipeline.
//!
//! No threads, no printing: the command line calls it on its own thread, the jobs worker on
//! the engine thread.

mod error;
mod identity;
mod model;
pub mod plan;
mod recipe;
mod spec;
mod training;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{GrayImage, RgbImage};

pub use error::{Result, ServiceError};
pub use identity::{ModelIdentity, SHORT_HASH_DIGITS, public_name};
pub use model::{ModelRequest, ModelSummary, resolve_files};
pub use plan::{EditKind, EditKnobs, EditPlan, WorkingSize, choose_seed, plan_edit};
pub use spec::{EditSpec, GenerateSpec, Region, TuneRequest};
pub use training::{MicroBatch, TrainingChoice};

pub use crate::engine::region::RegionScope;

use crate::engine::StableDiffusion;
use crate::engine::device::{device_name, open_device};
use crate::engine::edit::{
    CachePolicy, EditMethod, EditRequest, TuneEvent, TunedPhoto, edit_photo, model_prompt,
    tune_photo,
};
use crate::engine::fidelity::FidelityTable;
use crate::engine::finetune::{
    SnapshotCache, TrainMode, TuneSettings, least_training_bytes, settings_that_fit,
};
use crate::engine::instruct::{DEFAULT_INSTRUCT_MODEL, is_instruct_model};
use crate::engine::lora::{LoraExportInfo, export_tuned, output_name};
use crate::engine::memory::MemoryProbe;
use crate::engine::model::LoadOptions;
use crate::engine::precision::dtype_name;
use crate::engine::region::{self, RegionEstimate, RegionRequest, estimate_region};
use crate::engine::sampling::{SampleRequest, Start, StepObserver, sample};
use crate::imaging;
use crate::model_files::{DownloadProgress, ModelFiles, ModelSpec};
use crate::recipe::Recipe;

/// An edit's result at the photo's size, and how it was made.
#[derive(Debug, Clone)]
pub struct Edited {
    pub image: RgbImage,
    pub recipe: Recipe,
    /// The size the model worked at.
    pub working_size: (u32, u32),
    pub plan: EditPlan,
    /// The automatic region this edit used, when it asked for one.
    pub region: Option<EstimatedRegion>,
}

/// An automatic edit region, at the photo's size.
#[derive(Debug, Clone)]
pub struct EstimatedRegion {
    /// White = may change (all white when the scope is the whole photo).
    pub mask: GrayImage,
    /// Share of the image where the prompt changed the prediction (at the threshold).
    pub coverage: f64,
    /// The difference's median over its mean: how evenly the prompt changes the photo.
    pub evenness: f64,
    /// The normalised difference it was made from, at latent resolution (0 to 255).
    pub difference: GrayImage,
    /// Local, the photo's background, or the whole photo.
    pub scope: RegionScope,
}

impl EstimatedRegion {
    /// Share of the photo the mask lets change.
    pub fn share(&self) -> f64 {
        let white = self.mask.pixels().filter(|p| p.0[0] >= 128).count();
        white as f64 / (self.mask.width() as f64 * self.mask.height() as f64).max(1.0)
    }

    /// The engine's estimate (at the working size) with its mask at `(width, height)`.
    fn at_size(estimate: RegionEstimate, (width, height): (u32, u32)) -> Self {
        Self {
            mask: imaging::resize_gray(&estimate.mask, width, height),
            coverage: estimate.coverage,
            evenness: estimate.evenness,
            difference: estimate.difference,
            scope: estimate.scope,
        }
    }
}

/// A finished fine-tune: which snapshots edits may use.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuned {
    pub snapshot_steps: Vec<usize>,
    pub from_cache: bool,
    /// The cache folder the snapshots are in, when cached.
    pub cache_dir: Option<PathBuf>,
}

/// A fine-tune that stopped before its end (cancelled, or failed): the snapshots it kept stay
/// usable for edits of the photo.
#[derive(Debug)]
pub struct TuneStopped {
    pub error: ServiceError,
    pub kept: Vec<usize>,
    pub cache_dir: Option<PathBuf>,
}

impl From<ServiceError> for TuneStopped {
    fn from(error: ServiceError) -> Self {
        Self {
            error,
            kept: Vec::new(),
            cache_dir: None,
        }
    }
}

/// The photo the model was last tuned on, at its working size, and its snapshots.
struct TunedState {
    working: RgbImage,
    photo: TunedPhoto,
}

/// The loaded model, its identity, the snapshot cache and the current fine-tune.
pub struct EditService {
    model: StableDiffusion,
    summary: ModelSummary,
    cache: Option<SnapshotCache>,
    tuned: Option<TunedState>,
    /// The last mask scaled to its photo's size, with the mask it came from: one edit queues
    /// several variants sharing one mask, and scaling it to a large photo is not free. Holding
    /// the source keeps its address from being reused, so `Arc::ptr_eq` identifies it.
    scaled_mask: Option<(Arc<GrayImage>, Arc<GrayImage>)>,
    /// The last automatic region and what it was estimated from. The variants a user
    /// browses (other seeds, guidance, t0 within one snapshot, Edit again) share it: each
    /// estimate is two UNet calls on a batch of two, about a tenth of a 20-step edit.
    last_region: Option<(RegionKey, RegionEstimate)>,
}

/// Everything a region estimate depends on besides the weights: the snapshot, the photo at
/// its working size, the two prompts as the model reads them, and the threshold. (A new
/// fine-tune or a change to the model clears the cache instead.)
#[derive(Debug, Clone, PartialEq)]
struct RegionKey {
    tune_steps: usize,
    working: RgbImage,
    prompt: String,
    reference: String,
    threshold: u64,
}

impl EditService {
    /// Finds (or downloads, shown by `progress`) and loads the model `request` names, with
    /// snapshots kept in `cache` (`None`: no cache).
    pub fn load(
        request: &ModelRequest,
        cache: Option<SnapshotCache>,
        progress: &mut dyn DownloadProgress,
    ) -> Result<Self> {
        let (spec, files) = resolve_files(request, progress)?;
        Self::open(request, &spec, &files, cache)
    }

    /// Loads the model from files [`resolve_files`] found for `request`.
    pub fn open(
        request: &ModelRequest,
        spec: &ModelSpec,
        files: &ModelFiles,
        cache: Option<SnapshotCache>,
    ) -> Result<Self> {
        let device = open_device(request.device)?;
        let dtype = request.precision.resolve(&device)?;
        let options = LoadOptions {
            prediction_type: request.prediction_type,
        };
        let model = StableDiffusion::load_with(files, &device, dtype, &options)?;
        // Read once per file and remembered: the cache follows the weights, not paths.
        let identity = ModelIdentity::of(
            spec,
            files,
            request.prediction_type,
            request.hash_memo.as_deref(),
        )?;
        let summary = ModelSummary {
            identity,
            source: files.source.to_string(),
            device: device_name(&device),
            precision: dtype_name(dtype),
            prediction_type: model.config.scheduler.prediction_type.as_str(),
            description: model.info().describe(),
            architecture: model.info().family.name(),
            instruct: is_instruct_model(&model),
            fidelity_table: model.info().fidelity_table,
            lora_changes: (model.loras().unet.len(), model.loras().text_encoder.len()),
        };
        Ok(Self {
            model,
            summary,
            cache,
            tuned: None,
            scaled_mask: None,
            last_region: None,
        })
    }

    /// What was loaded, and its public name.
    pub fn summary(&self) -> &ModelSummary {
        &self.summary
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.summary.identity
    }

    /// What the fidelity slider means for this model.
    pub fn fidelity_table(&self) -> &'static FidelityTable {
        self.summary.fidelity_table
    }

    /// Replaces the snapshot cache (`None`: fine-tune without one).
    pub fn set_cache(&mut self, cache: Option<SnapshotCache>) {
        self.cache = cache;
    }

    /// The model itself, for what is not an edit: previews fitted to its VAE, and the
    /// benchmarks' single passes.
    pub fn engine(&self) -> &StableDiffusion {
        &self.model
    }

    /// [`Self::engine`], mutably (the benchmarks' training passes swap its UNet).
    pub fn engine_mut(&mut self) -> &mut StableDiffusion {
        self.last_region = None;
        &mut self.model
    }

    /// True when fine-tuning this model takes hours here: a full-size model on the CPU.
    pub fn tuning_is_slow(&self) -> bool {
        self.model.device().is_cpu() && self.model.config.unet.block_out_channels[0] >= 128
    }

    /// The working size for a photo of `photo` pixels (see [`plan::working_size`]).
    pub fn working_size(&self, photo: (u32, u32), size: WorkingSize) -> Result<(u32, u32)> {
        Ok(plan::working_size(photo, self.native_side(), size)?)
    }

    /// The side of the square the model was trained at (512 for SD 1.5), in pixels.
    pub fn native_side(&self) -> u32 {
        self.model.config.native_image_side().unwrap_or(512) as u32
    }

    /// What an edit with `knobs` runs with, given the snapshots in `ladder`.
    pub fn plan(&self, kind: EditKind, knobs: &EditKnobs, ladder: &[usize]) -> EditPlan {
        plan_edit(kind, knobs, self.fidelity_table(), ladder)
    }

    /// Refuses an edit the model cannot make, saying what to do instead: an instruction needs
    /// an InstructPix2Pix model, which in turn takes nothing else.
    pub fn check_kind(&self, kind: EditKind) -> Result<()> {
        let name = &self.identity().name;
        let config = &self.model.config;
        match kind {
            EditKind::Instruct if !self.summary.instruct => Err(ServiceError::Invalid(format!(
                "--instruct needs an InstructPix2Pix model and {name} is not one (its UNet takes {} input channels, not {}); try --model {DEFAULT_INSTRUCT_MODEL}, or describe the result with --prompt",
                config.unet.in_channels,
                2 * config.vae.latent_channels
            ))),
            EditKind::Describe if self.summary.instruct => Err(ServiceError::Invalid(format!(
                "{name} is an InstructPix2Pix model: say how the photo should change with --instruct \"...\" instead of --prompt"
            ))),
            _ => Ok(()),
        }
    }

    /// How many of `prompt`'s tokens the text encoder cannot take (they are ignored).
    pub fn tokens_dropped(&self, prompt: &str) -> usize {
        self.model
            .tokenizer
            .encode(prompt)
            .map_or(0, |t| t.dropped_tokens)
    }

    /// The photo fitted to the working size.
    fn fit(&self, photo: &RgbImage, size: WorkingSize) -> Result<RgbImage> {
        let (w, h) = self.working_size(photo.dimensions(), size)?;
        Ok(imaging::resize_rgb(photo, w, h))
    }

    /// Fine-tunes on the photo, or takes its snapshots from the cache (a stopped fine-tune of
    /// the same recipe continues where it stood). `on_event` sees each step and may stop it;
    /// what a stopped fine-tune kept stays usable for edits of this photo.
    pub fn tune(
        &mut self,
        request: &TuneRequest,
        on_event: &mut dyn FnMut(TuneEvent) -> ControlFlow<()>,
    ) -> std::result::Result<Tuned, TuneStopped> {
        let working = self.fit(request.photo, request.size)?;
        let settings = if request.lighter_mode_if_short {
            self.settings_that_fit_device(request.settings, working.dimensions(), on_event)
        } else {
            request.settings.clone()
        };
        // The old snapshots belong to another photo or recipe.
        self.tuned = None;
        self.last_region = None;
        let identity = self.summary.identity.cache_identity();
        let policy = CachePolicy {
            cache: self.cache.as_ref(),
            model_identity: &identity,
        };
        match tune_photo(
            &mut self.model,
            &working,
            &settings,
            &policy,
            request.reconstruct_every,
            on_event,
        ) {
            Ok(photo) => {
                let tuned = Tuned {
                    snapshot_steps: photo.snapshot_steps(),
                    from_cache: photo.from_cache,
                    cache_dir: photo.cache_dir.clone(),
                };
                self.tuned = Some(TunedState { working, photo });
                Ok(tuned)
            }
            Err(stopped) => {
                let kept = stopped
                    .partial
                    .as_ref()
                    .map_or_else(Vec::new, |p| p.snapshot_steps());
                let cache_dir = stopped.partial.as_ref().and_then(|p| p.cache_dir.clone());
                self.tuned = stopped.partial.map(|photo| TunedState {
                    working,
                    photo: *photo,
                });
                Err(TuneStopped {
                    error: stopped.error.into(),
                    kept,
                    cache_dir,
                })
            }
        }
    }

    /// `settings`, or lighter ones that fit the device's free memory when `settings` do not
    /// at any micro-batch ([`settings_that_fit`]), said in a notice: a person asking
    /// for the paper's full fine-tune of SDXL on a 24 GB card trains it without f32 master
    /// weights, and on a 12 GB card a lighter mode, instead of an out-of-memory error after
    /// minutes of loading. Devices that cannot tell their free memory (Metal) train as asked.
    fn settings_that_fit_device(
        &self,
        settings: &TuneSettings,
        (width, height): (u32, u32),
        on_event: &mut dyn FnMut(TuneEvent) -> ControlFlow<()>,
    ) -> TuneSettings {
        let Some(available) = MemoryProbe::new(self.model.device()).available_bytes() else {
            return settings.clone();
        };
        let size = (width as usize, height as usize);
        let Some(lighter) = settings_that_fit(&self.model, settings, size, available) else {
            return settings.clone();
        };
        let asked = least_training_bytes(&self.model, settings, size);
        let gb = |bytes: u64| bytes as f64 / 1e9;
        let place = if self.model.device().is_cpu() {
            "this computer"
        } else {
            "the GPU"
        };
        let instead = if lighter.mode == settings.mode {
            "so its weights are trained in half precision alone, without f32 copies".to_owned()
        } else {
            format!(
                "so the photo is learned in {} mode instead",
                lighter.mode.name()
            )
        };
        let _ = on_event(TuneEvent::Notice(&format!(
            "the {} fine-tune needs about {:.1} GB and {place} has {:.1} GB free, {instead}",
            settings.mode.name(),
            gb(asked),
            gb(available),
        )));
        lighter
    }

    /// The photo's fine-tune from the cache alone, never training: `Ok(None)` when the cache
    /// does not hold the snapshot after `steps` steps of this recipe.
    pub fn tune_from_cache(
        &mut self,
        request: &TuneRequest,
        steps: usize,
        on_event: &mut dyn FnMut(TuneEvent) -> ControlFlow<()>,
    ) -> Result<Option<Tuned>> {
        if self.cache.is_none() {
            return Err(ServiceError::Invalid(
                "reading a fine-tune from the snapshot cache needs the cache, and it is off".into(),
            ));
        }
        // Training would start: stop at once and keep what the cache already held.
        let mut would_train = false;
        let mut stop_before_training = |event: TuneEvent| match event {
            TuneEvent::Preparing | TuneEvent::Progress(_) => {
                would_train = true;
                ControlFlow::Break(())
            }
            other => on_event(other),
        };
        match self.tune(request, &mut stop_before_training) {
            Ok(tuned) => Ok(Some(tuned)),
            Err(stopped) if would_train && stopped.kept.contains(&steps) => Ok(Some(Tuned {
                snapshot_steps: stopped.kept,
                from_cache: true,
                cache_dir: stopped.cache_dir,
            })),
            Err(_) if would_train => Ok(None),
            Err(stopped) => Err(stopped.error),
        }
    }

    /// The snapshots of the current fine-tune of `working` (none when it is another photo).
    fn ladder_for(&self, working: &RgbImage) -> Vec<usize> {
        match &self.tuned {
            Some(t) if t.working == *working => t.photo.snapshot_steps(),
            _ => Vec::new(),
        }
    }

    /// `mask` at `size`, scaled once per mask (see `scaled_mask`).
    fn mask_at(&mut self, mask: &Arc<GrayImage>, (w, h): (u32, u32)) -> Arc<GrayImage> {
        if mask.dimensions() == (w, h) {
            return mask.clone();
        }
        if let Some((source, scaled)) = &self.scaled_mask
            && Arc::ptr_eq(source, mask)
            && scaled.dimensions() == (w, h)
        {
            return scaled.clone();
        }
        let scaled = Arc::new(imaging::resize_gray(mask, w, h));
        self.scaled_mask = Some((mask.clone(), scaled.clone()));
        scaled
    }

    /// Makes one edit: plans it ([`plan_edit`] with the photo's snapshots), samples it from
    /// the chosen snapshot, brings it back to the photo's size (pasting the photo back outside
    /// the mask, interpolating when asked) and writes its recipe. A snapshot other than 0
    /// needs [`Self::tune`] on this photo at this working size first.
    pub fn edit(&mut self, spec: &EditSpec, observer: &mut dyn StepObserver) -> Result<Edited> {
        self.check_kind(spec.kind)?;
        let working = self.fit(&spec.photo, spec.size)?;
        let plan = self.plan(spec.kind, &spec.knobs, &self.ladder_for(&working));
        let token = self.snapshot_token(&working, &plan)?;
        let photo_size = spec.photo.dimensions();
        let region = match spec.region {
            Region::Auto { threshold } => {
                let estimate =
                    self.estimate_at(&working, spec, &plan, token.as_deref(), threshold, observer)?;
                Some(EstimatedRegion::at_size(estimate, photo_size))
            }
            _ => None,
        };
        let mask = match (&spec.region, &region) {
            (Region::Mask { mask, .. }, _) => Some(self.mask_at(mask, photo_size)),
            (_, Some(region)) if region.scope != RegionScope::Whole => {
                Some(Arc::new(region.mask.clone()))
            }
            _ => None,
        };
        let tuned = self.tuned_for(&working, &plan);
        let request = EditRequest {
            method: plan.method,
            original: &spec.photo,
            working: &working,
            prompt: &spec.prompt,
            baseline_prompt: spec.baseline_prompt.as_deref(),
            tune_steps: plan.tune_steps,
            t0_fraction: plan.t0_fraction.unwrap_or(1.0),
            guidance_weight: plan.guidance_weight,
            sampling_steps: spec.sampling_steps,
            seed: spec.seed,
            mask: mask.as_deref(),
            interpolate: spec.interpolate,
        };
        let image = edit_photo(&self.model, tuned, &request, observer)?;
        let tuning = tuned.filter(|_| plan.tune_steps > 0).map(|t| &t.settings);
        let recipe = recipe::edit_recipe(
            &self.summary,
            spec,
            &plan,
            token.as_deref(),
            tuning,
            working.dimensions(),
        );
        Ok(Edited {
            image,
            recipe,
            working_size: working.dimensions(),
            plan,
            region,
        })
    }

    /// Where `spec`'s prompt would change the photo, estimated as an automatic region does it
    /// (from the most-tuned snapshot, compared with the bare rare token or the baseline), at
    /// the photo's size.
    pub fn estimate_region(
        &mut self,
        spec: &EditSpec,
        threshold: f64,
        observer: &mut dyn StepObserver,
    ) -> Result<EstimatedRegion> {
        self.check_kind(spec.kind)?;
        let working = self.fit(&spec.photo, spec.size)?;
        let plan = self.plan(spec.kind, &spec.knobs, &self.ladder_for(&working));
        let token = self.snapshot_token(&working, &plan)?;
        let estimate =
            self.estimate_at(&working, spec, &plan, token.as_deref(), threshold, observer)?;
        Ok(EstimatedRegion::at_size(estimate, spec.photo.dimensions()))
    }

    /// The region estimate at the working size. A fine-tuned edit's region comes from the
    /// most-tuned snapshot whichever one the plan samples, the one that knows the photo best:
    /// every position of the slider shares one region, estimated once, and the region the
    /// user sees in the mask layer does not move as they drag the slider. (On the demo
    /// world's 30 scenes the expressive end lost 21 successes to it where its own 16-step
    /// region lost 22: what the 16-step snapshot draws lies outside either.)
    fn estimate_at(
        &mut self,
        working: &RgbImage,
        spec: &EditSpec,
        plan: &EditPlan,
        token: Option<&str>,
        threshold: f64,
        observer: &mut dyn StepObserver,
    ) -> Result<RegionEstimate> {
        if matches!(plan.method, EditMethod::Instruct { .. }) {
            return Err(ServiceError::Invalid(
                "an automatic region needs a text-to-image model, and instruction edits use an InstructPix2Pix model; paint the region or edit everywhere".into(),
            ));
        }
        let tuned = self.tuned_for(working, plan);
        let tune_steps = match tuned {
            Some(tuned) if plan.tune_steps > 0 => tuned
                .snapshot_steps()
                .into_iter()
                .max()
                .unwrap_or(plan.tune_steps),
            _ => plan.tune_steps,
        };
        let prompt = model_prompt(token, &spec.prompt);
        let reference = match &spec.baseline_prompt {
            Some(baseline) => model_prompt(token, baseline),
            None => token.unwrap_or_default().to_owned(),
        };
        let key = RegionKey {
            tune_steps,
            working: working.clone(),
            prompt,
            reference,
            threshold: threshold.to_bits(),
        };
        if let Some((last, estimate)) = &self.last_region
            && *last == key
        {
            return Ok(estimate.clone());
        }
        if let Some(tuned) = tuned {
            tuned.select(tune_steps)?;
        }
        let request = RegionRequest {
            working,
            prompt: &key.prompt,
            reference: &key.reference,
            threshold,
            seeds: region::DEFAULT_SEEDS,
            // Not the sample's seed: every variant of one prompt gets the same region.
            seed: 0,
        };
        let estimate = estimate_region(&self.model, &request, observer)?;
        self.last_region = Some((key, estimate.clone()));
        Ok(estimate)
    }

    /// The fine-tune an edit at `working` samples from: `None` when the plan needs none.
    fn tuned_for(&self, working: &RgbImage, plan: &EditPlan) -> Option<&TunedPhoto> {
        match &self.tuned {
            // Snapshot 0 restores the base weights after any tune.
            Some(t) if plan.tune_steps == 0 || t.working == *working => Some(&t.photo),
            _ => None,
        }
    }

    /// The rare token the plan's snapshot answers to (`None` for snapshot 0); refuses a plan
    /// that needs a fine-tune this photo does not have at this size.
    fn snapshot_token(&self, working: &RgbImage, plan: &EditPlan) -> Result<Option<String>> {
        if plan.tune_steps == 0 {
            return Ok(None);
        }
        match self.tuned_for(working, plan) {
            Some(tuned) => Ok(Some(tuned.settings.token.clone())),
            None => Err(ServiceError::Invalid(format!(
                "this photo has not been fine-tuned at {}x{} yet; fine-tune it first or use 0 fine-tuning steps",
                working.width(),
                working.height()
            ))),
        }
    }

    /// An image from a prompt alone (text to image), and its recipe.
    pub fn generate(
        &self,
        spec: &GenerateSpec,
        observer: &mut dyn StepObserver,
    ) -> Result<(RgbImage, Recipe)> {
        let side = self.native_side();
        let (width, height) = self.working_size((side, side), spec.size.into())?;
        let request = SampleRequest {
            prompt: &spec.prompt,
            baseline_prompt: "",
            guidance_weight: spec.guidance_weight,
            sampling_steps: spec.sampling_steps,
            seed: spec.seed,
            start: Start::Noise {
                width: width as usize,
                height: height as usize,
            },
        };
        let output = sample(&self.model, &request, observer)?;
        let recipe = recipe::generate_recipe(&self.summary, spec, (width, height));
        Ok((output.image, recipe))
    }

    /// Writes the current fine-tune's snapshot after `steps` steps (a fine-tune in lora mode)
    /// as a kohya-format LoRA file at `path`, with metadata naming the base model, the recipe
    /// and the photo by name only.
    pub fn export_lora(&self, path: &Path, steps: usize, photo_name: Option<&str>) -> Result<()> {
        let tuned = self.tuned.as_ref().ok_or_else(|| {
            ServiceError::Invalid(
                "nothing has been fine-tuned yet; fine-tune in the lora training mode first".into(),
            )
        })?;
        let settings = &tuned.photo.settings;
        let recipe_json = recipe::lora_recipe_json(
            &self.summary,
            settings,
            tuned.working.dimensions(),
            photo_name,
        );
        let identity = self.identity();
        let info = LoraExportInfo {
            output_name: &output_name(path),
            base_model_name: &identity.name,
            base_model_fingerprint: &identity.fingerprint,
            recipe_json: &recipe_json,
            token: &settings.token,
            steps,
            created_unix_secs: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        export_tuned(&tuned.photo, &self.model.config, path, &info)?;
        Ok(())
    }
}

/// Refuses a LoRA export that cannot work, before anything slow: only a fine-tune in lora
/// mode is a LoRA, and the file must be a `.safetensors`.
pub fn check_lora_export(path: &Path, settings: &TuneSettings) -> Result<()> {
    if !matches!(settings.mode, TrainMode::Lora { .. }) {
        return Err(ServiceError::Invalid(format!(
            "a LoRA can be exported only from a fine-tune in lora mode, not {}; add --train lora",
            settings.mode
        )));
    }
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if !is_safetensors {
        return Err(ServiceError::Invalid(format!(
            "the LoRA file {} must end in .safetensors",
            path.display()
        )));
    }
    Ok(())
}
