//! UniTune on the tiny fixture model, CPU, in one run:
//! - the first edit of a photo (fine-tune + store snapshots + sample) against a re-edit that
//!   finds the snapshots in the cache (baseline: the first edit);
//! - fine-tuning time and peak heap memory per training mode (baseline: `full`).
//!
//! Run: `cargo bench --bench unitune`. Peak memory is counted by a wrapping allocator (heap
//! bytes live at once during the call, above what was live before it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use candle_core::{DType, Device};
use unitune::engine::StableDiffusion;
use unitune::engine::device::DeviceChoice;
use unitune::engine::edit::{CachePolicy, TuneEvent, tune_photo};
use unitune::engine::finetune::{SnapshotCache, TrainMode, TuneSettings};
use unitune::engine::precision::Precision;
use unitune::engine::sampling::no_observer;
use unitune::model_files::{NoProgress, locate_in_folder};
use unitune::service::{EditKnobs, EditService, EditSpec, ModelRequest, TuneRequest, WorkingSize};

struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f`, returning its result, its duration and the peak heap above the starting level.
fn measure<T>(f: impl FnOnce() -> T) -> (T, Duration, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let start = Instant::now();
    let out = f();
    let elapsed = start.elapsed();
    (
        out,
        elapsed,
        PEAK.load(Ordering::Relaxed).saturating_sub(before),
    )
}

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd15-tiny")
}

fn load() -> StableDiffusion {
    let files = locate_in_folder(&model_dir()).expect("fixture model");
    StableDiffusion::load(&files, &Device::Cpu, DType::F32).expect("fixture model loads")
}

fn photo() -> image::RgbImage {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos/chelsea.png");
    let full = image::open(path).expect("fixture photo").to_rgb8();
    image::imageops::resize(&full, 32, 32, image::imageops::FilterType::Triangle)
}

fn settings(mode: TrainMode) -> TuneSettings {
    TuneSettings {
        mode,
        snapshot_steps: vec![8, 16],
        ..TuneSettings::default()
    }
}

fn quiet(_: TuneEvent) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// Load the model, tune (or take the cache), sample one edit from the last snapshot: the
/// edit service, as the command line and the editor run it.
fn edit_once(cache: &SnapshotCache, photo: &Arc<image::RgbImage>) -> bool {
    let request = ModelRequest {
        device: DeviceChoice::Cpu,
        precision: Precision::F32,
        hash_memo: None,
        ..ModelRequest::new(&model_dir().display().to_string())
    };
    let mut service =
        EditService::load(&request, Some(cache.clone()), &mut NoProgress).expect("model loads");
    let recipe = settings(TrainMode::Full);
    let size = WorkingSize::AsIs;
    let tune = TuneRequest {
        photo,
        settings: &recipe,
        size,
        reconstruct_every: None,
        lighter_mode_if_short: false,
    };
    let tuned = service.tune(&tune, &mut quiet).expect("tuning");
    let spec = EditSpec {
        knobs: EditKnobs {
            tune_steps: Some(16),
            t0_fraction: Some(0.9),
            guidance_weight: Some(9.0),
            ..EditKnobs::default()
        },
        sampling_steps: 10,
        seed: 1,
        size,
        ..EditSpec::new(photo.clone(), "a cat wearing sunglasses")
    };
    service.edit(&spec, &mut no_observer()).expect("edit");
    tuned.from_cache
}

fn main() {
    let photo = Arc::new(photo());
    println!(
        "UniTune on the tiny fixture model (sd15-tiny), CPU f32, 32x32 photo, batch 4, 16 fine-tuning steps, 10 sampling steps"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let cache = SnapshotCache::new(dir.path());
    let (cached, first, first_peak) = measure(|| edit_once(&cache, &photo));
    assert!(!cached);
    let (cached, again, again_peak) = measure(|| edit_once(&cache, &photo));
    assert!(cached, "the second edit must come from the cache");
    println!(
        "first edit (tune + sample) {:>8.1} ms, peak heap {:>7.1} MiB (baseline)",
        first.as_secs_f64() * 1e3,
        first_peak as f64 / (1 << 20) as f64
    );
    println!(
        "cached re-edit            {:>8.1} ms, peak heap {:>7.1} MiB (ratio {:.3})",
        again.as_secs_f64() * 1e3,
        again_peak as f64 / (1 << 20) as f64,
        again.as_secs_f64() / first.as_secs_f64()
    );

    let mut baseline: Option<(Duration, usize)> = None;
    for mode in [
        TrainMode::Full,
        TrainMode::Attention,
        TrainMode::CrossKv,
        TrainMode::Lora { rank: 4 },
    ] {
        let mut model = load();
        let policy = CachePolicy {
            cache: None,
            model_identity: "sd15-tiny (bench)",
        };
        let (tuned, took, peak) = measure(|| {
            tune_photo(
                &mut model,
                &photo,
                &settings(mode),
                &policy,
                None,
                &mut quiet,
            )
            .expect("tuning")
        });
        let (base_time, base_peak) = *baseline.get_or_insert((took, peak));
        println!(
            "tune {:<14} {:>8.1} ms ({:.2}x full), peak heap {:>7.1} MiB ({:.2}x full), {:>8} trained values",
            mode.to_string(),
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() / base_time.as_secs_f64(),
            peak as f64 / (1 << 20) as f64,
            peak as f64 / base_peak as f64,
            tuned.adapter.parameter_count(),
        );
    }
}
