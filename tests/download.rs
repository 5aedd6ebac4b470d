//! The `unitune` binary end to end with a hub model: `generate --model owner/name` downloads
//! the tiny fixture model from a fake hub on loopback into the standard Hugging Face cache,
//! fetching only what it needs, then runs again from that cache alone with the same result.

#[path = "common/fake_hub.rs"]
mod fake_hub;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_hub::{FakeHub, FakeRepo, files_under};

const REPO: &str = "unitune-test/sd15-tiny";

/// Files real SD repos hold next to the diffusers ones that unitune must never fetch.
const NEVER_DOWNLOADED: [&str; 8] = [
    "unet/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.bin",
    "text_encoder/pytorch_model.bin",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "feature_extractor/preprocessor_config.json",
    "v1-5-pruned-emaonly.ckpt",
    "README.md",
];

/// The longest one run of the binary may take; past it the run is killed and the test fails.
const RUN_LIMIT: Duration = Duration::from_secs(90);

fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd15-tiny")
}

/// The fixture model as a hub repo, with the files that must never be downloaded added.
fn sd15_tiny_repo() -> FakeRepo {
    let folder = fixture_model();
    assert!(
        folder.join("model_index.json").is_file(),
        "fixture model missing: {}",
        folder.display()
    );
    NEVER_DOWNLOADED
        .iter()
        .fold(FakeRepo::from_folder(REPO, &folder), |repo, file| {
            repo.with_file(file, format!("{file} must never be downloaded\n"))
        })
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` against the hub at `endpoint` and the cache in `home`
/// (`home/hub`), isolated from the developer's environment: no token, no real cache.
fn unitune(args: &[&str], endpoint: &str, home: &Path, offline: bool) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_unitune"));
    command
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", home.join("hub"))
        // No token file of the developer's is found there.
        .env("HF_HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("RUST_BACKTRACE", "1")
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if offline {
        command.env("HF_HUB_OFFLINE", "1");
    } else {
        command.env_remove("HF_HUB_OFFLINE");
    }
    run_bounded(command, RUN_LIMIT)
}

/// Runs `command` to its end, killing it (and failing) past `limit`.
fn run_bounded(mut command: Command, limit: Duration) -> Run {
    let mut child = command.spawn().expect("unitune starts");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for unitune") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            panic!("unitune ran past {limit:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn generate_args(model: &str, out: &Path) -> Vec<String> {
    [
        "generate",
        "--prompt",
        "a photo of a cat",
        "--model",
        model,
        "--seed",
        "1",
        "--sampling-steps",
        "2",
        "--device",
        "cpu",
        "--out",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([out.display().to_string()])
    .collect()
}

fn generate(model: &str, out: &Path, endpoint: &str, home: &Path, offline: bool) -> Run {
    let args = generate_args(model, out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    unitune(&args, endpoint, home, offline)
}

fn assert_succeeded(run: &Run, what: &str) {
    assert_eq!(
        run.code, 0,
        "{what}: exit code\nstdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{what}: {}", run.stderr);
}

/// The decoded pixels of an image, with its size.
fn pixels(path: &Path) -> (u32, u32, Vec<u8>) {
    let image = image::open(path).unwrap_or_else(|err| panic!("decode {}: {err}", path.display()));
    (image.width(), image.height(), image.into_bytes())
}

#[test]
fn a_hub_model_is_downloaded_once_then_used_from_the_cache() {
    let repo = sd15_tiny_repo();
    let fixture_files: BTreeSet<String> = files_under(&fixture_model()).into_keys().collect();
    let hub = FakeHub::start(vec![repo.clone()]);
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("hf-home");
    let started = Instant::now();

    // 1. Online, empty cache: a download.
    let first = dir.path().join("a.png");
    let run = generate(REPO, &first, &hub.url, &home, false);
    let first_run_time = started.elapsed();
    assert_succeeded(&run, "download run");
    assert!(first.is_file(), "no image at {}", first.display());
    assert!(
        run.stderr.contains(&repo.sha),
        "the model's commit is reported: {}",
        run.stderr
    );

    // What the hub was asked: its file list once, then exactly the fixture's files (each
    // needed; no fp16 variants exist, so the full weights), nothing else.
    let log = hub.log().clone();
    let api = format!("/api/models/{REPO}/revision/main");
    assert_eq!(
        log.iter().filter(|l| l.path == api).count(),
        1,
        "one file list request: {log:#?}"
    );
    assert_eq!(hub.touched_files(REPO), fixture_files);
    let fetched = hub.resolved_files(REPO);
    assert_eq!(
        fetched.len(),
        fixture_files.len(),
        "each file downloaded once: {fetched:?}"
    );
    let lfs_etags: BTreeSet<String> = fixture_files
        .iter()
        .filter(|f| fake_hub::is_lfs(f))
        .map(|f| fake_hub::etag_of(&repo.files[f]))
        .collect();
    for logged in &log {
        let path = logged.path.as_str();
        let expected = path == api
            || path
                .strip_prefix(&format!("/{REPO}/resolve/main/"))
                .is_some_and(|file| fixture_files.contains(file))
            || path
                .strip_prefix("/cdn/")
                .is_some_and(|etag| lfs_etags.contains(etag));
        assert!(expected, "unexpected request {path}");
        assert_eq!(logged.authorization, None, "no token was set: {path}");
    }
    for never in NEVER_DOWNLOADED {
        assert!(
            !log.iter().any(|l| l.path.contains(never)),
            "{never} was requested"
        );
    }

    // The standard cache layout: refs/main, snapshots/<commit>/<file> linking into blobs/.
    let repo_dir = home.join("hub/models--unitune-test--sd15-tiny");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).expect("refs/main"),
        repo.sha
    );
    let snapshot = repo_dir.join("snapshots").join(&repo.sha);
    assert!(
        snapshot
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
    let cached = files_under(&snapshot);
    assert_eq!(
        cached.keys().cloned().collect::<BTreeSet<_>>(),
        fixture_files,
        "the snapshot holds exactly the needed files"
    );
    let blobs = repo_dir.join("blobs").canonicalize().expect("blobs folder");
    for (file, path) in &cached {
        assert!(
            std::fs::read(path).expect("cached file") == repo.files[file],
            "{file} differs from the fixture"
        );
        #[cfg(unix)]
        assert!(
            std::fs::symlink_metadata(path)
                .expect("metadata")
                .file_type()
                .is_symlink(),
            "{file} is a link, as in Python's cache"
        );
        let target = path.canonicalize().expect("link resolves");
        assert!(target.starts_with(&blobs), "{file} -> {}", target.display());
    }
    let leftovers: Vec<String> = files_under(&blobs)
        .into_keys()
        .filter(|name| name.ends_with(".part"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial downloads left: {leftovers:?}"
    );
    assert!(
        !repo_dir
            .join("snapshots")
            .join(&repo.sha)
            .join("safety_checker")
            .exists()
            && !repo_dir
                .join("snapshots")
                .join(&repo.sha)
                .join("README.md")
                .exists()
    );

    // 2. Online again with the hub still listening: served by the cache, no request at all.
    let requests_before = hub.log().len();
    let second = dir.path().join("b.png");
    let run = generate(REPO, &second, &hub.url, &home, false);
    assert_succeeded(&run, "cached run");
    let asked = hub.log()[requests_before..].to_vec();
    assert!(
        asked.is_empty(),
        "a cached model asks the hub nothing: {asked:#?}"
    );
    let reference = pixels(&first);
    assert!(reference.0 > 0 && reference.1 > 0);
    assert!(
        pixels(&second) == reference,
        "same model, same seed, same pixels"
    );

    // 3. The hub gone, offline: still runs from the cache alone, with the same pixels.
    let url = hub.url.clone();
    drop(hub);
    let third = dir.path().join("c.png");
    let run = generate(REPO, &third, &url, &home, true);
    assert_succeeded(&run, "offline run");
    assert!(pixels(&third) == reference, "offline, the same pixels");
    eprintln!(
        "download run {first_run_time:?}, all three runs {:?}",
        started.elapsed()
    );
}

#[test]
fn a_hub_id_the_hub_does_not_know_is_an_input_error() {
    let hub = FakeHub::start(vec![sd15_tiny_repo()]);
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("hf-home");
    let out = dir.path().join("never.png");
    let run = generate("nobody/nothing", &out, &hub.url, &home, false);

    assert_eq!(run.code, 2, "exit code; stderr:\n{}", run.stderr);
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one error line; stderr:\n{}",
        run.stderr
    );
    assert!(
        errors[0].contains("nobody/nothing") && errors[0].contains("not found"),
        "the error says the model was not found: {}",
        errors[0]
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(!out.exists(), "no image for a model that does not exist");
    // The fake hub was asked (and answered 404), nothing was downloaded.
    let log = hub.log();
    assert!(
        log.iter()
            .any(|l| l.path == "/api/models/nobody/nothing/revision/main"),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.path.contains("/resolve/")),
        "{log:#?}"
    );
}
