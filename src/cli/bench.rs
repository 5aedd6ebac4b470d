//! `unitune bench`: speed and peak memory of full-size Stable Diffusion, built from the
//! built-in architecture configs with random weights (compute and memory do not depend on the
//! weights' values, so nothing is downloaded). Prints JSON; `benches/diffusers/bench.py`
//! prints the same measurements from diffusers, and `benches/diffusers/compare.py` sets the two
//! side by side.
//!
//! Memory is the process's peak resident memory on the CPU and the peak of the device's
//! memory pool on CUDA, each also given above what was in use when the measurement started
//! (the loaded model), which is what compares across tools.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde_json::{Value, json};

use super::UsageError;
use super::args::{BenchArgs, GlobalOptions};
use super::cancel::CancelFlag;
use super::model::model_request;
use crate::engine::StableDiffusion;
use crate::engine::autograd::GradientAccumulator;
use crate::engine::device::device_name;
use crate::engine::edit::TuneEvent;
use crate::engine::finetune::{
    Adapter, IN_MEMORY_LIMIT_BYTES, PAPER_SNAPSHOTS, RARE_TOKEN, Snapshot, SnapshotCache,
    TrainMode, TrainingBatch, TuneObserver, TuneProgress, TuneSettings, fine_tune, training_pass,
    write_safetensors,
};
use crate::engine::layers::wide;
use crate::engine::memory::{MemoryProbe, release_free_memory};
use crate::engine::noise::NoiseSource;
use crate::engine::optim::{OptimizerKind, OptimizerSettings};
use crate::engine::precision::dtype_name;
use crate::engine::random_model::ensure_random_model;
use crate::engine::sampling::{Guidance, StepView, denoise};
use crate::imaging;
use crate::model_files::{self, ModelFiles, NoProgress};
use crate::service::{
    EditKnobs, EditService, EditSpec, MicroBatch, ModelRequest, TuneRequest, WorkingSize,
};

/// Peak memory and time of one measured phase.
struct Measured {
    seconds: f64,
    start_bytes: Option<u64>,
    peak_bytes: Option<u64>,
}

impl Measured {
    fn json(&self, mut fields: Value) -> Value {
        fields["seconds"] = json!(self.seconds);
        fields["start_bytes"] = json!(self.start_bytes);
        fields["peak_bytes"] = json!(self.peak_bytes);
        fields["peak_above_start_bytes"] = json!(match (self.peak_bytes, self.start_bytes) {
            (Some(peak), Some(start)) => Some(peak.saturating_sub(start)),
            _ => None,
        });
        fields
    }
}

/// Runs `f` and measures its time and peak memory; `f` returns the seconds that count when
/// only part of it is the measurement.
fn measure(
    probe: &MemoryProbe,
    device: &Device,
    f: impl FnOnce() -> Result<Option<f64>>,
) -> Result<Measured> {
    device.synchronize()?;
    // Memory malloc keeps for reuse would count as in use at the start and hide the peak.
    release_free_memory();
    probe.reset_peak();
    let start_bytes = probe.current_bytes();
    let started = Instant::now();
    let counted = f()?;
    device.synchronize()?;
    let seconds = counted.unwrap_or_else(|| started.elapsed().as_secs_f64());
    Ok(Measured {
        seconds,
        start_bytes,
        peak_bytes: probe.peak_bytes(),
    })
}

fn stop_if_cancelled(cancel: &CancelFlag) -> Result<()> {
    if cancel.is_set() {
        return Err(crate::engine::EngineError::Cancelled.into());
    }
    Ok(())
}

/// A photo-like test image: smooth gradients and a few shapes (content does not change cost).
fn test_photo(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let (u, v) = (x as f32 / width as f32, y as f32 / height as f32);
        let disc = ((u - 0.4).powi(2) + (v - 0.5).powi(2)) < 0.04;
        image::Rgb([
            (255.0 * u) as u8,
            if disc { 230 } else { (180.0 * v) as u8 },
            (255.0 * (1.0 - u * v)) as u8,
        ])
    })
}

fn parse_mode(name: &str) -> Result<TrainMode> {
    let mode: TrainMode = name.parse().map_err(UsageError)?;
    Ok(match mode {
        TrainMode::Lora { .. } => TrainMode::Lora { rank: 8 },
        other => other,
    })
}

/// The paper's ladder scaled to `steps`: snapshots after 1/8, 1/4, 1/2 and all of them.
fn ladder(steps: usize) -> Vec<usize> {
    let mut ladder: Vec<usize> = PAPER_SNAPSHOTS
        .iter()
        .map(|&s| (s * steps).div_ceil(PAPER_SNAPSHOTS[3]).max(1))
        .collect();
    ladder.dedup();
    ladder
}

pub fn bench_command(global: &GlobalOptions, args: &BenchArgs, cancel: &CancelFlag) -> Result<()> {
    let options = BenchOptions::parse(args)?;
    let (width, height) = (options.width, options.height);
    let wants = |what: &str| args.measure.iter().any(|m| m == what);

    let (mut service, files, model_dir, load) = load_bench_model(global, args)?;
    let device = service.engine().device().clone();
    let dtype = service.engine().dtype();
    let probe = MemoryProbe::new(&device);
    eprintln!(
        "bench: {} at {width}x{height} on {} in {}; random weights in {}",
        args.arch,
        device_name(&device),
        dtype_name(dtype),
        model_dir.display()
    );
    let photo = test_photo(width, height);
    let mut results = Vec::new();
    let mut report = |name: &str, value: Value| {
        eprintln!("bench: {name} {value}");
        results.push(value);
    };

    if wants("pass") {
        let checkpointing: &[bool] = if args.without_checkpointing {
            &[true, false]
        } else {
            &[true]
        };
        for &mode in &options.modes {
            for &checkpoint in checkpointing {
                stop_if_cancelled(cancel)?;
                let m = measure_pass(service.engine_mut(), &probe, mode, checkpoint, &photo)?;
                report(
                    "pass",
                    m.json(json!({"name": "pass", "mode": mode.name(), "batch": 1, "checkpointing": checkpoint})),
                );
            }
        }
    }
    if wants("step") {
        for &mode in &options.modes {
            stop_if_cancelled(cancel)?;
            let settings = options.tune_settings(mode, vec![2]);
            let (m, micro, spill) =
                measure_step(service.engine_mut(), &probe, &settings, &photo, cancel)?;
            drop(spill);
            report(
                "step",
                m.json(json!({
                    "name": "step", "mode": mode.name(), "batch": settings.batch_size,
                    "micro_batch": micro, "optimizer": options.optimizer.as_str(),
                    "checkpointing": settings.checkpointing,
                    "master_weights": options.master_weights,
                })),
            );
        }
    }
    if wants("sample") {
        stop_if_cancelled(cancel)?;
        let m = measure_sampling_step(service.engine(), &probe, width as usize, height as usize)?;
        report(
            "sampling_step",
            m.json(json!({"name": "sampling_step", "guidance": 7.5, "batch": 2})),
        );
    }
    if wants("vae") {
        stop_if_cancelled(cancel)?;
        let (encode, decode) = measure_vae(service.engine(), &probe, &photo)?;
        report("vae_encode", encode.json(json!({"name": "vae_encode"})));
        report("vae_decode", decode.json(json!({"name": "vae_decode"})));
    }
    if wants("precision") {
        stop_if_cancelled(cancel)?;
        let agreement =
            precision_agreement(service.engine(), &files, width as usize, height as usize)?;
        report("precision", agreement);
    }
    if wants("run") && args.steps > 0 {
        stop_if_cancelled(cancel)?;
        let settings = options.tune_settings(options.run_mode, ladder(args.steps));
        let (m, parts) = measure_run(
            &mut service,
            &probe,
            &settings,
            &photo,
            args.sampling_steps,
            cancel,
        )?;
        report(
            "unitune_run",
            m.json(json!({
                "name": "unitune_run", "mode": options.run_mode.name(), "tune_steps": args.steps,
                "snapshots": settings.snapshot_steps, "micro_batch": parts.micro_batch,
                "sampling_steps": args.sampling_steps, "optimizer": options.optimizer.as_str(),
                "master_weights": options.master_weights, "tune_seconds": parts.tune_seconds,
                "tune_peak_bytes": parts.tune_peak_bytes,
            })),
        );
    }

    let output = json!({
        "tool": "unitune",
        "version": env!("CARGO_PKG_VERSION"),
        "revision": env!("UNITUNE_GIT_REVISION"),
        "device": device_name(&device),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "arch": args.arch.as_str(),
        "width": width,
        "height": height,
        "precision": dtype_name(dtype),
        "memory": if device.is_cpu() { "peak resident memory of the process" } else { "peak of the device memory pool" },
        "load": load,
        "results": results,
    });
    let text = serde_json::to_string_pretty(&output)?;
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, format!("{text}\n"))
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

/// The random-weight model of `--arch` (built once into `--model-dir` or the user cache),
/// loaded through the edit service; with its files, its folder and what loading it cost.
fn load_bench_model(
    global: &GlobalOptions,
    args: &BenchArgs,
) -> Result<(EditService, ModelFiles, PathBuf, Value)> {
    let model_dir = match &args.model_dir {
        Some(dir) => dir.clone(),
        None => dirs::cache_dir()
            .context("no user cache folder; pass --model-dir")?
            .join("unitune")
            .join("bench")
            .join(args.arch.as_str()),
    };
    ensure_random_model(args.arch, &model_dir)?;
    let global_request = model_request(global)?;
    let request = ModelRequest {
        model: model_dir.display().to_string(),
        device: global_request.device,
        precision: global_request.precision,
        ..ModelRequest::new("")
    };
    let files = model_files::locate_in_folder(&model_dir)?;
    let started = Instant::now();
    let service = EditService::load(&request, None, &mut NoProgress)?;
    let device = service.engine().device();
    device.synchronize()?;
    let load = json!({
        "seconds": started.elapsed().as_secs_f64(),
        "memory_bytes": MemoryProbe::new(device).current_bytes(),
    });
    Ok((service, files, model_dir, load))
}

/// The bench's flags, checked before the model is built.
struct BenchOptions {
    modes: Vec<TrainMode>,
    run_mode: TrainMode,
    optimizer: OptimizerKind,
    width: u32,
    height: u32,
    micro_batch_size: usize,
    auto_micro_batch: bool,
    master_weights: bool,
}

impl BenchOptions {
    fn parse(args: &BenchArgs) -> Result<Self> {
        let known = ["pass", "step", "sample", "vae", "run", "precision"];
        if let Some(bad) = args.measure.iter().find(|m| !known.contains(&m.as_str())) {
            return Err(UsageError(format!(
                "unknown measurement `{bad}` (use pass, step, sample, vae, run, precision)"
            ))
            .into());
        }
        let side = args.arch.native_side() as u32;
        let (width, height) = match &args.size {
            Some(size) => imaging::parse_size(size)?,
            None => (side, side),
        };
        let (micro_batch_size, auto_micro_batch) = match args.micro_batch.parse() {
            Ok(MicroBatch::Auto) => (TuneSettings::default().batch_size, true),
            Ok(MicroBatch::Fixed(n)) => (n, false),
            Err(message) => return Err(UsageError(format!("--micro-batch: {message}")).into()),
        };
        Ok(Self {
            modes: args
                .modes
                .iter()
                .map(|m| parse_mode(m))
                .collect::<Result<Vec<_>>>()?,
            run_mode: parse_mode(&args.run_mode)?,
            optimizer: args.optimizer.parse().map_err(UsageError)?,
            width,
            height,
            micro_batch_size,
            auto_micro_batch,
            master_weights: !args.no_master_weights,
        })
    }

    /// The fine-tune settings a step or run measurement uses: the defaults with the bench's
    /// optimizer and micro-batch.
    fn tune_settings(&self, mode: TrainMode, snapshot_steps: Vec<usize>) -> TuneSettings {
        TuneSettings {
            mode,
            optimizer: OptimizerSettings {
                kind: self.optimizer,
                master_weights: self.master_weights,
                ..OptimizerSettings::default()
            },
            snapshot_steps,
            micro_batch_size: self.micro_batch_size,
            auto_micro_batch: self.auto_micro_batch,
            ..TuneSettings::default()
        }
    }
}

/// One forward and backward pass at micro-batch 1 (after attaching `mode`, which is not
/// measured).
fn measure_pass(
    model: &mut StableDiffusion,
    probe: &MemoryProbe,
    mode: TrainMode,
    checkpointing: bool,
    photo: &RgbImage,
) -> Result<Measured> {
    let adapter = Adapter::attach(model, mode, &mut NoiseSource::from_seed(1))?;
    let device = model.device().clone();
    let dtype = model.dtype();
    let (c, h, w) = model.latent_dims(photo.width() as usize, photo.height() as usize)?;
    let mut noise = NoiseSource::from_seed(2);
    let latents = noise.normal((1, c, h, w), &device)?.to_dtype(dtype)?;
    let target = noise.normal((1, c, h, w), &device)?.to_dtype(dtype)?;
    let text = model.conditioning(RARE_TOKEN, (h, w))?;
    let unet = adapter.training_unet().checkpointed(checkpointing);
    let mut accumulator = GradientAccumulator::new(adapter.vars(), wide(dtype));
    let batch = TrainingBatch {
        latents: &latents,
        noise: &target,
        timesteps: &[500],
        text: &text,
    };
    if !device.is_cpu() {
        // Warm up kernels and the memory pool; a CPU pass is long enough as it is.
        training_pass(model, &unet, &batch, 1.0, &mut accumulator)?;
        accumulator.take();
    }
    measure(probe, &device, || {
        training_pass(model, &unet, &batch, 1.0, &mut accumulator)?;
        let grads = accumulator.take();
        if let Some(Some(last)) = grads.last() {
            last.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        }
        Ok(None)
    })
}

/// Times one optimizer step (the second of two, so that the photo's encoding and the
/// optimizer's first allocations are not in it; the snapshot after it is not timed).
struct StepTimer<'a> {
    observed_first: Option<Instant>,
    second: Option<f64>,
    micro_batch: usize,
    spill: &'a Path,
    cancel: &'a CancelFlag,
}

impl TuneObserver for StepTimer<'_> {
    fn observe(&mut self, progress: &TuneProgress) -> ControlFlow<()> {
        if progress.step == 1 {
            self.observed_first = Some(Instant::now());
        }
        self.micro_batch = progress.micro_batch;
        self.cancel.check()
    }

    fn keep(&mut self, adapter: &Adapter, steps: usize) -> crate::engine::Result<Snapshot> {
        self.second = self.observed_first.map(|t| t.elapsed().as_secs_f64());
        if adapter.parameter_bytes() <= IN_MEMORY_LIMIT_BYTES {
            return adapter.snapshot(steps);
        }
        let path = self.spill.join(format!("{steps}.safetensors"));
        write_safetensors(&path, &adapter.named_values(), &Default::default())?;
        Ok(adapter.stored_snapshot(steps, path))
    }
}

fn measure_step(
    model: &mut StableDiffusion,
    probe: &MemoryProbe,
    settings: &TuneSettings,
    photo: &RgbImage,
    cancel: &CancelFlag,
) -> Result<(Measured, usize, tempfile::TempDir)> {
    let spill = tempfile::tempdir()?;
    let adapter = Adapter::attach(model, settings.mode, &mut NoiseSource::from_seed(1))?;
    let device = model.device().clone();
    let mut timer = StepTimer {
        observed_first: None,
        second: None,
        micro_batch: settings.micro_batch_size,
        spill: spill.path(),
        cancel,
    };
    let m = measure(probe, &device, || {
        fine_tune(model, &adapter, photo, settings, &mut timer)?;
        Ok(timer.second)
    })?;
    Ok((m, timer.micro_batch, spill))
}

/// One guided DDIM step at `width` x `height`: the mean of steps 2 and 3 of a three-step
/// text-to-image loop, so that warm-up is not in it. As in `benches/diffusers/bench.py`, the
/// prompts are encoded before the measurement and the latents are not decoded after it: the
/// memory is the denoising loop's alone (with the decode inside, its peak was the VAE's).
fn measure_sampling_step(
    model: &StableDiffusion,
    probe: &MemoryProbe,
    width: usize,
    height: usize,
) -> Result<Measured> {
    const STEPS: usize = 3;
    let (channels, latent_h, latent_w) = model.latent_dims(width, height)?;
    let guidance = Guidance::new(model, "a photo of a cat", "", 7.5, (latent_h, latent_w))?;
    let timesteps = model.scheduler.timesteps(STEPS)?;
    let mut marks: Vec<Instant> = Vec::new();
    let device = model.device().clone();
    let mut observer = |_: &StepView| {
        let _ = device.synchronize();
        marks.push(Instant::now());
        ControlFlow::Continue(())
    };
    let m = measure(probe, model.device(), || {
        let latents = NoiseSource::from_seed(1)
            .normal((1, channels, latent_h, latent_w), model.device())?
            .to_dtype(model.dtype())?;
        denoise(
            model,
            latents,
            &timesteps,
            STEPS,
            &guidance,
            None,
            &mut observer,
        )?;
        Ok(None)
    })?;
    let seconds = match marks.as_slice() {
        [first, .., last] if marks.len() >= 2 => {
            last.duration_since(*first).as_secs_f64() / (marks.len() - 1) as f64
        }
        _ => m.seconds,
    };
    Ok(Measured { seconds, ..m })
}

fn measure_vae(
    model: &StableDiffusion,
    probe: &MemoryProbe,
    photo: &RgbImage,
) -> Result<(Measured, Measured)> {
    let device = model.device().clone();
    let mut noise = NoiseSource::from_seed(3);
    if !device.is_cpu() {
        let latents = model.encode_image(photo, &mut noise)?;
        model.decode_latents(&latents)?;
    }
    let mut latents: Option<Tensor> = None;
    let encode = measure(probe, &device, || {
        latents = Some(model.encode_image(photo, &mut noise)?);
        Ok(None)
    })?;
    let latents = latents.context("the encoder returned nothing")?;
    let decode = measure(probe, &device, || {
        model.decode_latents(&latents)?;
        Ok(None)
    })?;
    Ok((encode, decode))
}

/// Largest difference between a half-precision and an f32 UNet forward, relative to the f32
/// output's largest magnitude. f16 rounds each stored value to 2^-11 (about 5e-4) relative;
/// the errors of SD 1.5's roughly 100 rounded layer outputs add up like a random walk
/// (sqrt(100) x 5e-4 = 5e-3 typical), and the largest of the 16 thousand outputs sits a few
/// deviations above that, so 2e-2 leaves room without hiding a real error (a dropped
/// upcast or an f16 accumulation is off by 1e-1 or more). bf16 keeps 3 bits fewer: 8x that.
fn half_precision_tolerance(half: DType) -> f64 {
    if half == DType::BF16 { 0.16 } else { 2e-2 }
}

/// One UNet forward on the same latents, timestep and prompt embedding in f32 and in half
/// precision (the model's own if it is half, else f16), compared: the error that half
/// precision adds at full size, where the tiny fixtures' tests cannot see it.
fn precision_agreement(
    model: &StableDiffusion,
    files: &model_files::ModelFiles,
    width: usize,
    height: usize,
) -> Result<Value> {
    let device = model.device().clone();
    let other_dtype = if model.dtype() == DType::F32 {
        DType::F16
    } else {
        DType::F32
    };
    let other = StableDiffusion::load(files, &device, other_dtype)?;
    let (reference, half) = if other_dtype == DType::F32 {
        (&other, model)
    } else {
        (model, &other)
    };
    let (c, h, w) = model.latent_dims(width, height)?;
    let latents = NoiseSource::from_seed(5).normal((1, c, h, w), &device)?;
    let timesteps = Tensor::new(&[500u32], &device)?;
    let text = reference.conditioning("a photo of a cat", (h, w))?;
    let forward = |m: &StableDiffusion| -> Result<Tensor> {
        let dtype = m.dtype();
        let out = text
            .to_dtype(dtype)?
            .predict(&m.unet, &latents.to_dtype(dtype)?, &timesteps)?;
        Ok(out.to_dtype(DType::F32)?)
    };
    let full = forward(reference)?;
    let halved = forward(half)?;
    let scale = f64::from(full.abs()?.max_all()?.to_scalar::<f32>()?);
    let diff = (&halved - &full)?;
    let max_diff = f64::from(diff.abs()?.max_all()?.to_scalar::<f32>()?);
    let rms = |t: &Tensor| -> Result<f64> {
        Ok(f64::from(t.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?))
    };
    let relative = max_diff / scale;
    let tolerance = half_precision_tolerance(half.dtype());
    Ok(json!({
        "name": "precision", "half": dtype_name(half.dtype()), "reference": "f32",
        "max_relative_error": relative,
        "rms_relative_error": rms(&diff)? / rms(&full)?,
        "tolerance": tolerance, "within_tolerance": relative <= tolerance,
    }))
}

/// A whole UniTune run as a user's first edit: fine-tune with snapshots written to a (fresh)
/// cache, then one edit from the last snapshot. Returns the measurement and the fine-tuning's
/// share of the time.
fn measure_run(
    service: &mut EditService,
    probe: &MemoryProbe,
    settings: &TuneSettings,
    photo: &RgbImage,
    sampling_steps: usize,
    cancel: &CancelFlag,
) -> Result<(Measured, RunParts)> {
    let cache_dir = tempfile::tempdir()?;
    service.set_cache(Some(SnapshotCache::new(cache_dir.path())));
    let device = service.engine().device().clone();
    let mut tune_seconds = 0.0;
    let mut tune_peak_bytes = None;
    let mut micro_batch = settings.micro_batch_size;
    let photo = std::sync::Arc::new(photo.clone());
    let m = measure(probe, &device, || {
        let started = Instant::now();
        let mut on_event = |event: TuneEvent| {
            if let TuneEvent::Progress(p) = event {
                micro_batch = p.micro_batch;
            }
            cancel.check()
        };
        let request = TuneRequest {
            photo: &photo,
            settings,
            size: WorkingSize::AsIs,
            reconstruct_every: None,
            lighter_mode_if_short: false,
        };
        service
            .tune(&request, &mut on_event)
            .map_err(|stopped| stopped.error)?;
        device.synchronize()?;
        tune_seconds = started.elapsed().as_secs_f64();
        // The fine-tune's own peak (the memory targets are the fine-tune's); the run's peak
        // also holds the edit's VAE decode.
        tune_peak_bytes = probe.peak_bytes();
        let spec = EditSpec {
            knobs: EditKnobs {
                tune_steps: Some(settings.total_steps()),
                t0_fraction: Some(0.9),
                guidance_weight: Some(7.5),
                ..EditKnobs::default()
            },
            sampling_steps,
            seed: 1,
            size: WorkingSize::AsIs,
            ..EditSpec::new(photo.clone(), "a cat wearing sunglasses")
        };
        let mut observer = |_: &StepView| cancel.check();
        service.edit(&spec, &mut observer)?;
        Ok(None)
    })?;
    service.set_cache(None);
    Ok((
        m,
        RunParts {
            tune_seconds,
            tune_peak_bytes,
            micro_batch,
        },
    ))
}

/// What a whole run's measurement reports beside its time and peak.
struct RunParts {
    tune_seconds: f64,
    tune_peak_bytes: Option<u64>,
    micro_batch: usize,
}
