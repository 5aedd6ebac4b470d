//! The fuzzing loop: replays the corpus of inputs that once failed, then mutates seed inputs
//! for a bounded time, catching panics and saving each failing input.
//!
//! Why a hand-written loop rather than a fuzzing crate: CI runs stable Rust only, where
//! libFuzzer (`cargo fuzz`) and AFL cannot instrument the code, and the crates that do run on
//! stable inside `cargo test` (bolero's random engine, `arbitrary`) generate each input from
//! fresh random bytes without coverage feedback. Such an input never gets past a PNG's chunk
//! checksums or a JSON parser, so it never reaches a model being built from a config, which is
//! where the panics were. What does reach it on stable is mutating valid seed files with
//! knowledge of their structure (JSON values, PNG chunks, safetensors headers), see
//! `mutate.rs`. The price is no coverage guidance; each target's `run` reports how far an
//! input got instead (parsed, built, computed), and inputs that get as far as their seed are
//! kept for further mutation.

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How far an input got into the code under test; deeper inputs are kept for mutation.
pub type Depth = u32;

/// Makes a new input from a parent and the seeds.
pub type Mutator = fn(&[u8], &[Vec<u8>], &mut ChaCha8Rng) -> Vec<u8>;

pub struct Target<'a> {
    pub name: &'static str,
    /// Valid inputs to start from.
    pub seeds: Vec<Vec<u8>>,
    pub mutate: Mutator,
    /// Runs one input; an `Err` or a shallow depth is fine, a panic is a failure.
    pub run: &'a dyn Fn(&[u8]) -> Depth,
}

/// One input that panicked.
pub struct Failure {
    pub message: String,
    pub saved_to: Option<PathBuf>,
}

pub struct Report {
    pub iterations: u64,
    pub elapsed: Duration,
    pub failures: Vec<Failure>,
}

/// Seconds each target fuzzes for: `UNITUNE_FUZZ_SECONDS`, else a short default that keeps
/// `cargo test` quick (the corpus replay is the regression test; this only samples).
pub fn budget() -> Duration {
    let seconds = std::env::var("UNITUNE_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(1.0);
    Duration::from_secs_f64(seconds)
}

/// The random seed: `UNITUNE_FUZZ_SEED` to repeat a run; else, in a fuzzing run (one given
/// `UNITUNE_FUZZ_SECONDS`), from the clock; else fixed, so that a plain `cargo test` passes or
/// fails the same way every time.
fn rng_seed() -> u64 {
    /// Plain `cargo test`'s seed.
    const TEST_SUITE_SEED: u64 = 11;
    let exploring = std::env::var_os("UNITUNE_FUZZ_SECONDS").is_some();
    std::env::var("UNITUNE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .or((!exploring).then_some(TEST_SUITE_SEED))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        })
}

pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target)
}

/// Where failing inputs found by this run are written (not committed; copy them into
/// `corpus_dir` once fixed).
fn failure_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-failures")
        .join(target)
}

thread_local! {
    /// Set while this thread runs a fuzz input: its panic message, instead of printing it.
    static CAUGHT: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that records the message of a panic inside a fuzz input and
/// leaves every other panic to the default hook.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let caught = CAUGHT.with(|c| {
                let mut slot = c.borrow_mut();
                match slot.as_mut() {
                    Some(message) => {
                        let location = info
                            .location()
                            .map(|l| format!(" at {}:{}", l.file(), l.line()))
                            .unwrap_or_default();
                        let payload = info
                            .payload()
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| info.payload().downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(no message)".into());
                        *message = Some(format!("{payload}{location}"));
                        true
                    }
                    None => false,
                }
            });
            if !caught {
                previous(info);
            }
        }));
    });
}

/// Runs one input, returning its depth or the panic's message.
pub fn run_one(run: &dyn Fn(&[u8]) -> Depth, input: &[u8]) -> Result<Depth, String> {
    install_hook();
    CAUGHT.with(|c| *c.borrow_mut() = Some(None));
    let result = panic::catch_unwind(AssertUnwindSafe(|| run(input)));
    let message = CAUGHT.with(|c| c.borrow_mut().take()).flatten();
    result.map_err(|_| message.unwrap_or_else(|| "panic".into()))
}

/// Every committed input that once failed must now run without a panic.
pub fn replay_corpus(target: &Target) -> Vec<String> {
    let mut failures = Vec::new();
    for file in corpus_files(&corpus_dir(target.name)) {
        let input = std::fs::read(&file).expect("corpus file is readable");
        if let Err(message) = run_one(target.run, &input) {
            failures.push(format!("{}: {message}", file.display()));
        }
    }
    failures
}

pub fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Most inputs kept for further mutation per target.
const POOL_LIMIT: usize = 256;
/// A target stops after this many distinct panics: the rest are usually the same bug.
const FAILURE_LIMIT: usize = 8;

/// Mutates the seeds for `duration`, keeping inputs that get as deep as the deepest seed.
pub fn fuzz(target: &Target, duration: Duration) -> Report {
    let seed = rng_seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let mut failures: Vec<Failure> = Vec::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut deepest = 0;
    for input in &target.seeds {
        match run_one(target.run, input) {
            Ok(depth) => deepest = deepest.max(depth),
            Err(message) => record(target.name, input, message, &mut failures),
        }
        pool.push(input.clone());
    }
    let mut iterations = 0u64;
    // How many inputs stopped at each depth: shows whether mutants get past the parser.
    let mut reached: Vec<u64> = Vec::new();
    // An abort (running out of memory, a stack overflow) cannot be caught; the input that
    // caused it is left in this file for the fuzz script to report.
    let in_flight = failure_dir(target.name).join("in-flight");
    let _ = std::fs::create_dir_all(failure_dir(target.name));
    while start.elapsed() < duration && failures.len() < FAILURE_LIMIT {
        let parent = &pool[rng.random_range(0..pool.len())];
        let input = (target.mutate)(parent, &target.seeds, &mut rng);
        iterations += 1;
        let _ = std::fs::write(&in_flight, &input);
        let outcome = run_one(target.run, &input);
        if let Ok(depth) = outcome {
            let slot = depth as usize;
            if reached.len() <= slot {
                reached.resize(slot + 1, 0);
            }
            reached[slot] += 1;
        }
        match outcome {
            Ok(depth) if depth >= deepest => {
                if pool.len() < POOL_LIMIT {
                    pool.push(input);
                } else {
                    let slot = rng.random_range(target.seeds.len()..POOL_LIMIT);
                    pool[slot] = input;
                }
            }
            Ok(_) => {}
            Err(message) => record(target.name, &input, message, &mut failures),
        }
    }
    let _ = std::fs::remove_file(&in_flight);
    let report = Report {
        iterations,
        elapsed: start.elapsed(),
        failures,
    };
    let depths: Vec<String> = reached
        .iter()
        .enumerate()
        .map(|(depth, count)| format!("{depth}:{count}"))
        .collect();
    println!(
        "fuzz: {:<20} {:>7} iterations in {:>6.1} s, {} failures (seed {seed}; inputs per depth {})",
        target.name,
        report.iterations,
        report.elapsed.as_secs_f64(),
        report.failures.len(),
        depths.join(" ")
    );
    report
}

/// Saves a failing input (once per distinct panic message) and notes it.
fn record(target: &str, input: &[u8], message: String, failures: &mut Vec<Failure>) {
    if failures.iter().any(|f| f.message == message) {
        return;
    }
    let dir = failure_dir(target);
    let file = dir.join(format!("{:016x}", fnv1a(input)));
    let saved_to = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&file, input))
        .ok()
        .map(|()| file);
    println!(
        "fuzz: {target}: PANIC {message}\n      input saved to {}",
        saved_to
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(could not save)".into())
    );
    failures.push(Failure { message, saved_to });
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The whole test for one target: replay the corpus, fuzz for the budget, fail on any panic.
pub fn check(target: Target) {
    let mut problems = replay_corpus(&target);
    let report = fuzz(&target, budget());
    problems.extend(report.failures.iter().map(|f| {
        format!(
            "{} (input saved to {})",
            f.message,
            f.saved_to
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "nowhere".into())
        )
    }));
    assert!(
        problems.is_empty(),
        "fuzz target {} panicked:\n{}",
        target.name,
        problems.join("\n")
    );
}
