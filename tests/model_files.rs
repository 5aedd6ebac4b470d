//! Model files: reading a diffusers folder, finding a model in the Hugging Face cache, and
//! real downloads from a fake hub served on loopback in the hub's URL layout.

mod common;
#[path = "common/fake_hub.rs"]
mod fake_hub;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fake_hub::{FakeHub, FakeRepo};

use unitune::model_files::{
    DEFAULT_MODEL, DiffusersFiles, DownloadProgress, HubOptions, ModelFiles, ModelFilesError,
    ModelLayout, ModelSource, ModelSpec, NoProgress, WeightsPreference, locate_in_folder,
    locate_in_folder_with, parse_model_arg, repo_cache_dir, resolve,
};

// ---------------------------------------------------------------------------------------
// A model in diffusers layout, written by the tests

const SMALL_FILES: [&str; 9] = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
];
const FULL_WEIGHTS: [&str; 3] = [
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
];
const FP16_WEIGHTS: [&str; 3] = [
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
];
/// Files real SD repos hold that unitune must never fetch.
const UNWANTED: [&str; 11] = [
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.bin",
    "text_encoder/pytorch_model.bin",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "feature_extractor/preprocessor_config.json",
    "v1-5-pruned.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "README.md",
];

/// Distinct, non-empty contents per file (weights a little bigger, so progress shows).
fn contents(name: &str) -> Vec<u8> {
    let mut bytes = format!("contents of {name}\n").into_bytes();
    if name.ends_with("safetensors") || name.ends_with(".bin") || name.ends_with(".ckpt") {
        bytes.extend((0..3000u32).map(|i| (i % 251) as u8));
    }
    bytes
}

fn write_file(root: &Path, relative: &str, bytes: &[u8]) {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().expect("file has a parent")).expect("create dirs");
    std::fs::write(&path, bytes).expect("write file");
}

fn write_model(root: &Path, files: &[&str]) {
    for file in files {
        write_file(root, file, &contents(file));
    }
}

fn model_files_list(weights: &[&'static str]) -> Vec<&'static str> {
    SMALL_FILES.iter().chain(weights).copied().collect()
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn assert_mentions(err: &ModelFilesError, needles: &[&str]) {
    let message = err.to_string();
    for needle in needles {
        assert!(message.contains(needle), "'{needle}' not in: {message}");
    }
}

// ---------------------------------------------------------------------------------------
// Folders

#[test]
fn full_precision_folder_is_located() {
    let dir = temp_dir();
    let root = dir.path();
    write_model(root, &model_files_list(&FULL_WEIGHTS));
    let files = locate_in_folder(root).expect("complete model folder");
    let expected = ModelFiles {
        root: root.to_path_buf(),
        layout: ModelLayout::Diffusers(Box::new(DiffusersFiles {
            unet_config: root.join("unet/config.json"),
            unet_weights: root.join("unet/diffusion_pytorch_model.safetensors"),
            vae_config: root.join("vae/config.json"),
            vae_weights: root.join("vae/diffusion_pytorch_model.safetensors"),
            text_encoder_config: root.join("text_encoder/config.json"),
            text_encoder_weights: root.join("text_encoder/model.safetensors"),
            tokenizer_vocab: root.join("tokenizer/vocab.json"),
            tokenizer_merges: root.join("tokenizer/merges.txt"),
            tokenizer_config: Some(root.join("tokenizer/tokenizer_config.json")),
            special_tokens_map: Some(root.join("tokenizer/special_tokens_map.json")),
            second_text: None,
            scheduler_config: root.join("scheduler/scheduler_config.json"),
            model_index: Some(root.join("model_index.json")),
        })),
        vae_replacement: None,
        source: ModelSource::LocalFolder,
        loras: Vec::new(),
    };
    assert_eq!(files, expected);
}

/// An SDXL folder: `text_encoder_2` and `tokenizer_2` are found with the rest, and once the
/// second encoder is there its tokenizer is required, by name.
#[test]
fn an_sdxl_folder_brings_its_second_text_encoder() {
    let dir = temp_dir();
    let root = dir.path().join("sdxl");
    common::copy_dir(&common::model_dir("sdxl-tiny"), &root);
    let files = locate_in_folder(&root).expect("the SDXL fixture is complete");
    let ModelLayout::Diffusers(folder) = &files.layout else {
        panic!("a diffusers folder: {files:?}");
    };
    let second = folder
        .second_text
        .as_ref()
        .expect("the second text encoder");
    assert_eq!(second.config, root.join("text_encoder_2/config.json"));
    assert_eq!(
        second.weights,
        root.join("text_encoder_2/model.safetensors")
    );
    assert_eq!(second.tokenizer_vocab, root.join("tokenizer_2/vocab.json"));
    std::fs::remove_file(root.join("tokenizer_2/merges.txt")).unwrap();
    let error = locate_in_folder(&root).unwrap_err().to_string();
    assert!(error.contains("tokenizer_2/merges.txt"), "{error}");
}

#[test]
fn fp16_only_folder_is_located_whatever_the_preference() {
    let dir = temp_dir();
    write_model(dir.path(), &model_files_list(&FP16_WEIGHTS));
    for preference in [WeightsPreference::Full, WeightsPreference::Fp16] {
        let files = locate_in_folder_with(dir.path(), preference).expect("fp16-only folder");
        assert!(
            d(&files)
                .unet_weights
                .ends_with("unet/diffusion_pytorch_model.fp16.safetensors")
        );
        assert!(
            d(&files)
                .vae_weights
                .ends_with("vae/diffusion_pytorch_model.fp16.safetensors")
        );
        assert!(
            d(&files)
                .text_encoder_weights
                .ends_with("text_encoder/model.fp16.safetensors")
        );
    }
}

#[test]
fn both_kinds_of_weights_follow_the_preference() {
    let dir = temp_dir();
    let all: Vec<&str> = FULL_WEIGHTS.iter().chain(&FP16_WEIGHTS).copied().collect();
    write_model(dir.path(), &model_files_list(&all));

    let full = locate_in_folder_with(dir.path(), WeightsPreference::Full).expect("full");
    assert!(
        d(&full)
            .unet_weights
            .ends_with("unet/diffusion_pytorch_model.safetensors")
    );
    assert!(
        d(&full)
            .text_encoder_weights
            .ends_with("text_encoder/model.safetensors")
    );

    let half = locate_in_folder_with(dir.path(), WeightsPreference::Fp16).expect("fp16");
    assert!(
        d(&half)
            .unet_weights
            .ends_with("unet/diffusion_pytorch_model.fp16.safetensors")
    );
    assert!(
        d(&half)
            .vae_weights
            .ends_with("vae/diffusion_pytorch_model.fp16.safetensors")
    );
    assert!(
        d(&half)
            .text_encoder_weights
            .ends_with("text_encoder/model.fp16.safetensors")
    );

    assert_eq!(locate_in_folder(dir.path()).expect("default"), full);
}

#[test]
fn optional_tokenizer_files_may_be_absent() {
    let dir = temp_dir();
    let files: Vec<&str> = model_files_list(&FULL_WEIGHTS)
        .into_iter()
        .filter(|f| {
            !f.ends_with("tokenizer_config.json") && !f.ends_with("special_tokens_map.json")
        })
        .collect();
    write_model(dir.path(), &files);
    let located = locate_in_folder(dir.path()).expect("tokenizer without optional files");
    assert_eq!(d(&located).tokenizer_config, None);
    assert_eq!(d(&located).special_tokens_map, None);
}

#[test]
fn pickle_only_component_is_refused_with_the_reason() {
    let dir = temp_dir();
    let files: Vec<&str> = model_files_list(&FULL_WEIGHTS)
        .into_iter()
        .filter(|f| !f.starts_with("vae/diffusion"))
        .chain(["vae/diffusion_pytorch_model.bin"])
        .collect();
    write_model(dir.path(), &files);
    let err = locate_in_folder(dir.path()).expect_err("pickle weights must be refused");
    assert!(matches!(err, ModelFilesError::PickleOnly { .. }), "{err:?}");
    assert!(err.is_invalid_input());
    assert_mentions(
        &err,
        &[
            "vae/diffusion_pytorch_model.bin",
            "arbitrary code",
            "only loads .safetensors",
            "save_pretrained",
            "safe_serialization=True",
        ],
    );
}

#[test]
fn missing_component_config_or_weights_is_named() {
    let dir = temp_dir();
    let no_vae: Vec<&str> = model_files_list(&FULL_WEIGHTS)
        .into_iter()
        .filter(|f| !f.starts_with("vae/"))
        .collect();
    write_model(dir.path(), &no_vae);
    let err = locate_in_folder(dir.path()).expect_err("no vae");
    assert!(
        matches!(err, ModelFilesError::MissingFile { .. }),
        "{err:?}"
    );
    assert!(err.is_invalid_input());
    assert_mentions(&err, &["vae/config.json"]);

    write_model(dir.path(), &["vae/config.json"]);
    let err = locate_in_folder(dir.path()).expect_err("no vae weights");
    assert!(
        matches!(err, ModelFilesError::MissingWeights { .. }),
        "{err:?}"
    );
    assert_mentions(
        &err,
        &[
            "VAE",
            "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ],
    );

    write_model(dir.path(), &["vae/diffusion_pytorch_model.safetensors"]);
    std::fs::remove_file(dir.path().join("tokenizer/merges.txt")).expect("remove merges");
    let err = locate_in_folder(dir.path()).expect_err("no merges");
    assert_mentions(&err, &["tokenizer/merges.txt"]);
}

#[test]
fn single_files_are_taken_and_pickle_files_refused() {
    let dir = temp_dir();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, b"not really weights").expect("write checkpoint");
    let files = locate_in_folder(&path).expect("a .safetensors file is a checkpoint");
    assert_eq!(files.checkpoint(), Some(path.as_path()));
    assert!(files.diffusers().is_none());

    let pickle = dir.path().join("v1-5-pruned.ckpt");
    std::fs::write(&pickle, b"not really weights").expect("write checkpoint");
    let err = locate_in_folder(&pickle).expect_err("pickle");
    assert!(
        matches!(err, ModelFilesError::PickleCheckpoint { .. }),
        "{err:?}"
    );
    assert!(err.is_invalid_input());
    assert_mentions(&err, &["v1-5-pruned.ckpt", "pickle", ".safetensors"]);
    // A folder that holds only checkpoints points at the file.
    let err = locate_in_folder(dir.path()).expect_err("folder with only checkpoints");
    assert!(
        matches!(err, ModelFilesError::CheckpointInFolder { .. }),
        "{err:?}"
    );

    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, b"hello").expect("write notes");
    let err = locate_in_folder(&notes).expect_err("plain file");
    assert!(matches!(err, ModelFilesError::NotAFolder { .. }), "{err:?}");
}

#[test]
fn missing_folder_is_an_input_error_naming_it() {
    let dir = temp_dir();
    let missing = dir.path().join("no-such-model");
    let err = locate_in_folder(&missing).expect_err("missing folder");
    assert!(err.is_invalid_input());
    assert_mentions(&err, &["no-such-model", "does not exist"]);
}

#[test]
fn generated_fixture_models_are_located() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    if !models.join("sd15-tiny").is_dir() {
        eprintln!("skipped: {} is not there", models.display());
        return;
    }
    let sd15 = locate_in_folder(&models.join("sd15-tiny")).expect("sd15-tiny");
    assert!(
        d(&sd15)
            .unet_weights
            .ends_with("unet/diffusion_pytorch_model.safetensors")
    );
    assert!(d(&sd15).tokenizer_config.is_some());
    let sd2 = locate_in_folder(&models.join("sd2-tiny")).expect("sd2-tiny");
    assert!(
        d(&sd2)
            .unet_weights
            .ends_with("unet/diffusion_pytorch_model.fp16.safetensors")
    );
    assert!(
        d(&sd2)
            .text_encoder_weights
            .ends_with("text_encoder/model.fp16.safetensors")
    );
}

// ---------------------------------------------------------------------------------------
// The --model argument

#[test]
fn paths_parse_as_folders_and_must_exist() {
    let dir = temp_dir();
    let absolute = dir.path().to_str().expect("utf-8 temp path");
    assert_eq!(
        parse_model_arg(absolute).expect("existing absolute path"),
        ModelSpec::Folder(dir.path().to_path_buf())
    );
    // An existing relative folder is a folder even without ./ (tests run in the crate root).
    assert_eq!(
        parse_model_arg("src").expect("existing relative folder"),
        ModelSpec::Folder(PathBuf::from("src"))
    );
    for missing in [
        "./unitune-no-such-model",
        "../unitune-no-such-model",
        "~/unitune-no-such-model",
        "/unitune-no-such-model/sd15",
    ] {
        let err = parse_model_arg(missing).expect_err("missing path");
        assert!(
            matches!(err, ModelFilesError::FolderNotFound { .. }),
            "{err:?}"
        );
        assert!(err.is_invalid_input());
        assert_mentions(&err, &["unitune-no-such-model", "does not exist"]);
    }
}

#[test]
fn hub_ids_parse_with_an_optional_revision() {
    assert_eq!(
        parse_model_arg("owner/name").expect("hub id"),
        ModelSpec::hub("owner/name")
    );
    assert_eq!(
        parse_model_arg("owner/name@v1.0").expect("hub id with revision"),
        ModelSpec::Hub {
            repo_id: "owner/name".to_owned(),
            revision: "v1.0".to_owned(),
        }
    );
    assert_eq!(
        parse_model_arg(DEFAULT_MODEL).expect("default model"),
        ModelSpec::default()
    );
}

#[test]
fn garbage_is_refused_explaining_both_forms() {
    for garbage in ["", "garbage", "a/b/c", "owner/name@", "bad id/x", "owner/"] {
        let err = parse_model_arg(garbage).expect_err("garbage");
        assert!(
            matches!(err, ModelFilesError::InvalidModelArg { .. }),
            "{err:?}"
        );
        assert!(err.is_invalid_input());
        assert_mentions(&err, &["folder", "./", "owner/name", "owner/name@revision"]);
    }
}

#[test]
fn resolving_a_folder_spec_locates_it() {
    let dir = temp_dir();
    write_model(dir.path(), &model_files_list(&FULL_WEIGHTS));
    let spec = ModelSpec::Folder(dir.path().to_path_buf());
    let files = resolve(&spec, &HubOptions::default(), &mut NoProgress).expect("folder");
    assert_eq!(files, locate_in_folder(dir.path()).expect("folder"));
}

// ---------------------------------------------------------------------------------------
// The Hugging Face cache, offline

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const OTHER_SHA: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// Writes a repo into a cache the way huggingface_hub does: blobs, snapshot links, a ref.
fn write_cached_repo(cache: &Path, repo_id: &str, commit: &str, files: &[&str]) -> PathBuf {
    let repo_dir = repo_cache_dir(cache, repo_id);
    let snapshot = repo_dir.join("snapshots").join(commit);
    for (i, file) in files.iter().enumerate() {
        let blob = repo_dir.join("blobs").join(format!("blob{i:04}"));
        write_file(&repo_dir, &format!("blobs/blob{i:04}"), &contents(file));
        let link = snapshot.join(file);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("snapshot dirs");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, &link).expect("snapshot link");
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).expect("snapshot copy");
    }
    write_file(&repo_dir, "refs/main", commit.as_bytes());
    snapshot
}

fn offline_options(cache: &Path) -> HubOptions {
    HubOptions {
        // Nothing listens there: any network use would fail the test.
        endpoint: Some(format!("http://{}", closed_loopback_port())),
        cache_dir: Some(cache.to_path_buf()),
        offline: true,
        token: None,
    }
}

fn closed_loopback_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr.to_string()
}

#[test]
fn cached_model_is_found_offline() {
    let cache = temp_dir();
    let all: Vec<&str> = FULL_WEIGHTS.iter().chain(&FP16_WEIGHTS).copied().collect();
    let snapshot = write_cached_repo(cache.path(), "o/n", SHA, &model_files_list(&all));
    let files = resolve(
        &ModelSpec::hub("o/n"),
        &offline_options(cache.path()),
        &mut NoProgress,
    )
    .expect("model is in the cache");
    assert_eq!(files.root, snapshot);
    // A hub model prefers fp16 weights.
    assert_eq!(
        d(&files).unet_weights,
        snapshot.join("unet/diffusion_pytorch_model.fp16.safetensors")
    );
    assert_eq!(
        std::fs::read(&d(&files).vae_weights).expect("read through the link"),
        contents("vae/diffusion_pytorch_model.fp16.safetensors")
    );
    assert_eq!(
        files.source,
        ModelSource::HubCache {
            repo_id: "o/n".to_owned(),
            revision: "main".to_owned(),
            commit: SHA.to_owned(),
            cache_dir: cache.path().to_path_buf(),
        }
    );
}

#[test]
fn cached_model_is_found_by_commit_without_a_ref() {
    let cache = temp_dir();
    let snapshot = write_cached_repo(
        cache.path(),
        "o/n",
        OTHER_SHA,
        &model_files_list(&FULL_WEIGHTS),
    );
    std::fs::remove_file(repo_cache_dir(cache.path(), "o/n").join("refs/main")).expect("rm ref");
    let spec = ModelSpec::Hub {
        repo_id: "o/n".to_owned(),
        revision: OTHER_SHA.to_owned(),
    };
    let files = resolve(&spec, &offline_options(cache.path()), &mut NoProgress)
        .expect("snapshot by commit");
    assert_eq!(files.root, snapshot);
    assert!(
        d(&files)
            .unet_weights
            .ends_with("unet/diffusion_pytorch_model.safetensors")
    );
}

#[test]
fn offline_miss_names_the_cache_folder_and_the_files() {
    let cache = temp_dir();
    let err = resolve(
        &ModelSpec::hub("o/n"),
        &offline_options(cache.path()),
        &mut NoProgress,
    )
    .expect_err("empty cache, offline");
    assert!(matches!(err, ModelFilesError::NotCached { .. }), "{err:?}");
    assert!(!err.is_invalid_input());
    let repo_dir = repo_cache_dir(cache.path(), "o/n");
    assert_mentions(
        &err,
        &[
            "offline",
            repo_dir.to_str().expect("utf-8"),
            "unet/config.json",
            "unet/diffusion_pytorch_model[.fp16].safetensors",
            "tokenizer/vocab.json",
            "scheduler/scheduler_config.json",
            "online",
            "--model",
        ],
    );

    // A snapshot without the VAE weights says what it lacks.
    let partial: Vec<&str> = model_files_list(&FULL_WEIGHTS)
        .into_iter()
        .filter(|f| !f.starts_with("vae/diffusion"))
        .collect();
    write_cached_repo(cache.path(), "o/n", SHA, &partial);
    let err = resolve(
        &ModelSpec::hub("o/n"),
        &offline_options(cache.path()),
        &mut NoProgress,
    )
    .expect_err("partial cache, offline");
    assert_mentions(&err, &[SHA, "VAE weights"]);
}

// ---------------------------------------------------------------------------------------
// Downloads from a fake hub on loopback (tests/common/fake_hub.rs)

/// A fake hub repo at commit [`SHA`] holding `files`, each with [`contents`].
fn fake_repo(id: &str, files: &[&str]) -> FakeRepo {
    FakeRepo::new(
        id,
        SHA,
        files.iter().map(|f| ((*f).to_owned(), contents(f))),
    )
}

/// Records what `resolve` reports; can cancel after some files.
#[derive(Default)]
struct Recorder {
    /// (name, total, bytes advanced, finished)
    files: Vec<(String, Option<u64>, u64, bool)>,
    cancel_after_files: Option<usize>,
}

impl DownloadProgress for Recorder {
    fn start_file(&mut self, name: &str, total_bytes: Option<u64>) {
        self.files.push((name.to_owned(), total_bytes, 0, false));
    }
    fn advance(&mut self, bytes: u64) {
        if let Some(file) = self.files.last_mut() {
            file.2 += bytes;
        }
    }
    fn finish_file(&mut self) {
        if let Some(file) = self.files.last_mut() {
            file.3 = true;
        }
    }
    fn cancelled(&self) -> bool {
        self.cancel_after_files
            .is_some_and(|limit| self.files.len() >= limit)
    }
}

/// Downloads need the hub allowed: HF_HUB_OFFLINE in the environment forbids it.
fn online_allowed() -> bool {
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    });
    if offline {
        eprintln!("skipped: HF_HUB_OFFLINE is set, so no download may happen");
    }
    !offline
}

fn sd15_like_repo() -> FakeRepo {
    let files: Vec<&str> = SMALL_FILES
        .iter()
        .chain(&FULL_WEIGHTS)
        .chain(&FP16_WEIGHTS)
        .chain(&UNWANTED)
        .chain(&[".gitattributes"])
        .copied()
        .collect();
    fake_repo("tiny/sd15", &files)
}

/// SDXL's second text encoder and tokenizer, as `stabilityai/stable-diffusion-xl-base-1.0`
/// holds them (with fp16 variants and files unitune must not fetch).
const SDXL_SMALL_FILES: [&str; 4] = [
    "text_encoder_2/config.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
];
const SDXL_FP16_WEIGHTS: [&str; 1] = ["text_encoder_2/model.fp16.safetensors"];
const SDXL_UNWANTED: [&str; 4] = [
    "text_encoder_2/model.safetensors",
    "text_encoder_2/pytorch_model.fp16.bin",
    "sd_xl_base_1.0.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
];

/// An SDXL repo is fetched like SD 1.5's, fp16 variant files first, with the second text
/// encoder and its tokenizer, and nothing else.
#[test]
fn an_sdxl_repo_downloads_both_text_encoders_as_fp16_variants() {
    if !online_allowed() {
        return;
    }
    let files: Vec<&str> = SMALL_FILES
        .iter()
        .chain(&SDXL_SMALL_FILES)
        .chain(&FULL_WEIGHTS)
        .chain(&FP16_WEIGHTS)
        .chain(&SDXL_FP16_WEIGHTS)
        .chain(&UNWANTED)
        .chain(&SDXL_UNWANTED)
        .copied()
        .collect();
    let hub = FakeHub::start(vec![fake_repo("tiny/sdxl", &files)]);
    let cache = temp_dir();
    let spec = ModelSpec::hub("tiny/sdxl");
    let resolved = resolve(&spec, &hub.options(cache.path()), &mut Recorder::default())
        .expect("download from the fake hub");
    let wanted: BTreeSet<String> = SMALL_FILES
        .iter()
        .chain(&SDXL_SMALL_FILES)
        .chain(&FP16_WEIGHTS)
        .chain(&SDXL_FP16_WEIGHTS)
        .map(|f| (*f).to_owned())
        .collect();
    assert_eq!(hub.touched_files("tiny/sdxl"), wanted);
    let second = d(&resolved)
        .second_text
        .as_ref()
        .expect("the second text encoder");
    assert!(
        second
            .weights
            .ends_with("text_encoder_2/model.fp16.safetensors")
    );
    assert!(second.tokenizer_merges.ends_with("tokenizer_2/merges.txt"));
}

#[test]
fn download_fetches_only_the_needed_files_into_the_standard_cache() {
    if !online_allowed() {
        return;
    }
    let hub = FakeHub::start(vec![sd15_like_repo()]);
    let cache = temp_dir();
    let opts = HubOptions {
        token: Some("hf_test_token".to_owned()),
        ..hub.options(cache.path())
    };
    let spec = ModelSpec::hub("tiny/sd15");
    let mut progress = Recorder::default();
    let files = resolve(&spec, &opts, &mut progress).expect("download from the fake hub");

    // Only the needed files, fp16 weights, nothing from UNWANTED.
    let wanted: BTreeSet<String> = SMALL_FILES
        .iter()
        .chain(&FP16_WEIGHTS)
        .map(|f| (*f).to_owned())
        .collect();
    let fetched = hub.resolved_files("tiny/sd15");
    assert_eq!(
        fetched.len(),
        wanted.len(),
        "each file downloaded once: {fetched:?}"
    );
    assert_eq!(fetched.iter().cloned().collect::<BTreeSet<_>>(), wanted);
    let touched = hub.touched_files("tiny/sd15");
    assert_eq!(touched, wanted);
    for unwanted in UNWANTED.iter().chain(&FULL_WEIGHTS) {
        assert!(!touched.contains(*unwanted), "{unwanted} was requested");
    }
    let api_calls = hub
        .log()
        .iter()
        .filter(|l| l.path.starts_with("/api/models/tiny/sd15/revision/main"))
        .count();
    assert_eq!(api_calls, 1);
    assert!(
        hub.log()
            .iter()
            .filter(|l| !l.path.starts_with("/cdn/"))
            .all(|l| l.authorization.as_deref() == Some("Bearer hf_test_token")),
        "the token goes with every hub request"
    );
    assert!(
        hub.log().iter().any(|l| l.range.is_some()),
        "ranges were used"
    );

    // The standard cache layout: snapshots/<commit>/<file> linking into blobs/.
    let repo_dir = cache.path().join("models--tiny--sd15");
    let snapshot = repo_dir.join("snapshots").join(SHA);
    assert_eq!(files.root, snapshot);
    assert_eq!(
        d(&files).unet_weights,
        snapshot.join("unet/diffusion_pytorch_model.fp16.safetensors")
    );
    assert_eq!(
        d(&files).text_encoder_weights,
        snapshot.join("text_encoder/model.fp16.safetensors")
    );
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).expect("refs/main"),
        SHA
    );
    let blobs = repo_dir.join("blobs").canonicalize().expect("blobs folder");
    for file in &wanted {
        let path = snapshot.join(file);
        assert_eq!(
            std::fs::read(&path).expect("cached file"),
            contents(file),
            "{file}"
        );
        #[cfg(unix)]
        {
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            assert!(
                meta.file_type().is_symlink(),
                "{file} is a link, as in Python's cache"
            );
        }
        let target = path.canonicalize().expect("link resolves");
        assert!(target.starts_with(&blobs), "{file} -> {}", target.display());
    }
    assert_eq!(
        files.source,
        ModelSource::Downloaded {
            repo_id: "tiny/sd15".to_owned(),
            revision: "main".to_owned(),
            commit: SHA.to_owned(),
            cache_dir: cache.path().to_path_buf(),
            files_downloaded: wanted.len(),
        }
    );

    // Progress: one start and one finish per file, bytes adding up to its size.
    let reported: BTreeSet<String> = progress.files.iter().map(|f| f.0.clone()).collect();
    assert_eq!(reported, wanted);
    for (name, total, advanced, finished) in &progress.files {
        let size = contents(name).len() as u64;
        assert_eq!(*total, Some(size), "{name}");
        assert_eq!(*advanced, size, "{name}");
        assert!(finished, "{name}");
    }

    // A second resolve is served by the cache: no request at all.
    let requests_before = hub.log().len();
    let again = resolve(&spec, &opts, &mut NoProgress).expect("from the cache");
    assert_eq!(hub.log().len(), requests_before);
    assert_eq!(d(&again).unet_weights, d(&files).unet_weights);
    assert!(
        matches!(again.source, ModelSource::HubCache { .. }),
        "{:?}",
        again.source
    );

    // Also with the hub gone and offline.
    drop(hub);
    let offline = HubOptions {
        offline: true,
        ..opts
    };
    let cached = resolve(&spec, &offline, &mut NoProgress).expect("offline from the cache");
    assert_eq!(d(&cached).vae_weights, d(&files).vae_weights);
}

#[test]
fn full_weights_are_downloaded_when_the_repo_has_no_fp16() {
    if !online_allowed() {
        return;
    }
    let files: Vec<&str> = model_files_list(&FULL_WEIGHTS)
        .into_iter()
        .chain(["unet/diffusion_pytorch_model.bin"])
        .collect();
    let hub = FakeHub::start(vec![fake_repo("tiny/plain", &files)]);
    let cache = temp_dir();
    let located = resolve(
        &ModelSpec::hub("tiny/plain"),
        &hub.options(cache.path()),
        &mut NoProgress,
    )
    .expect("download");
    assert!(
        d(&located)
            .unet_weights
            .ends_with("unet/diffusion_pytorch_model.safetensors")
    );
    let fetched: BTreeSet<String> = hub.resolved_files("tiny/plain").into_iter().collect();
    let wanted: BTreeSet<String> = model_files_list(&FULL_WEIGHTS)
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(fetched, wanted);
}

#[test]
fn a_partial_cache_downloads_only_what_it_lacks() {
    if !online_allowed() {
        return;
    }
    let hub = FakeHub::start(vec![sd15_like_repo()]);
    let cache = temp_dir();
    let have: Vec<&str> = model_files_list(&FP16_WEIGHTS)
        .into_iter()
        .filter(|f| !f.starts_with("vae/diffusion"))
        .collect();
    write_cached_repo(cache.path(), "tiny/sd15", SHA, &have);

    let files = resolve(
        &ModelSpec::hub("tiny/sd15"),
        &hub.options(cache.path()),
        &mut NoProgress,
    )
    .expect("completes the cache");
    assert_eq!(
        hub.resolved_files("tiny/sd15"),
        ["vae/diffusion_pytorch_model.fp16.safetensors"]
    );
    assert_eq!(
        std::fs::read(&d(&files).vae_weights).expect("downloaded vae"),
        contents("vae/diffusion_pytorch_model.fp16.safetensors")
    );
    assert!(matches!(
        files.source,
        ModelSource::Downloaded {
            files_downloaded: 1,
            ..
        }
    ));
}

#[test]
fn pickle_only_repo_is_refused_before_any_download() {
    if !online_allowed() {
        return;
    }
    let files: Vec<&str> = SMALL_FILES
        .iter()
        .copied()
        .chain([
            "unet/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
        ])
        .collect();
    let hub = FakeHub::start(vec![fake_repo("tiny/pickles", &files)]);
    let cache = temp_dir();
    let err = resolve(
        &ModelSpec::hub("tiny/pickles"),
        &hub.options(cache.path()),
        &mut NoProgress,
    )
    .expect_err("pickle-only unet");
    assert!(matches!(err, ModelFilesError::PickleOnly { .. }), "{err:?}");
    assert!(err.is_invalid_input());
    assert_mentions(
        &err,
        &[
            "tiny/pickles",
            "unet/diffusion_pytorch_model.bin",
            "arbitrary code",
        ],
    );
    assert!(hub.touched_files("tiny/pickles").is_empty());
}

#[test]
fn unknown_repo_says_it_was_not_found() {
    if !online_allowed() {
        return;
    }
    let hub = FakeHub::start(vec![sd15_like_repo()]);
    let cache = temp_dir();
    let err = resolve(
        &ModelSpec::hub("nobody/nothing"),
        &hub.options(cache.path()),
        &mut NoProgress,
    )
    .expect_err("no such repo");
    assert!(
        matches!(err, ModelFilesError::RepoNotFound { .. }),
        "{err:?}"
    );
    assert!(err.is_invalid_input());
    assert_mentions(&err, &["nobody/nothing", "not found", "404"]);
}

#[test]
fn gated_repo_says_how_to_get_access() {
    if !online_allowed() {
        return;
    }
    let repo = FakeRepo {
        gated: true,
        ..fake_repo("tiny/gated", &model_files_list(&FULL_WEIGHTS))
    };
    let hub = FakeHub::start(vec![repo]);
    let cache = temp_dir();
    let err = resolve(
        &ModelSpec::hub("tiny/gated"),
        &hub.options(cache.path()),
        &mut NoProgress,
    )
    .expect_err("gated repo");
    assert!(
        matches!(err, ModelFilesError::AccessDenied { status: 403, .. }),
        "{err:?}"
    );
    assert!(err.is_invalid_input());
    assert_mentions(&err, &["tiny/gated", "gated", "licence", "HF_TOKEN"]);
}

#[test]
fn unreachable_hub_names_the_cache_it_looked_in() {
    if !online_allowed() {
        return;
    }
    let cache = temp_dir();
    let opts = HubOptions {
        endpoint: Some(format!("http://{}", closed_loopback_port())),
        cache_dir: Some(cache.path().to_path_buf()),
        offline: false,
        token: None,
    };
    let started = Instant::now();
    let err = resolve(&ModelSpec::hub("o/n"), &opts, &mut NoProgress).expect_err("no hub");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(matches!(err, ModelFilesError::NotCached { .. }), "{err:?}");
    assert!(!err.is_invalid_input());
    let repo_dir = repo_cache_dir(cache.path(), "o/n");
    assert_mentions(
        &err,
        &[
            "could not reach",
            repo_dir.to_str().expect("utf-8"),
            "unet/config.json",
            "--model",
        ],
    );
}

#[test]
fn cancelling_stops_between_files_and_a_later_run_finishes() {
    if !online_allowed() {
        return;
    }
    let hub = FakeHub::start(vec![sd15_like_repo()]);
    let cache = temp_dir();
    let spec = ModelSpec::hub("tiny/sd15");
    let mut progress = Recorder {
        cancel_after_files: Some(2),
        ..Recorder::default()
    };
    let err = resolve(&spec, &hub.options(cache.path()), &mut progress).expect_err("cancelled");
    assert!(matches!(err, ModelFilesError::Cancelled), "{err:?}");
    assert!(!err.is_invalid_input());
    let first_run = hub.resolved_files("tiny/sd15");
    assert_eq!(first_run.len(), 2, "{first_run:?}");
    assert!(progress.files.iter().all(|f| f.3), "started files finished");

    let files = resolve(&spec, &hub.options(cache.path()), &mut NoProgress).expect("finishes");
    let all_runs = hub.resolved_files("tiny/sd15");
    assert_eq!(all_runs.len(), SMALL_FILES.len() + FP16_WEIGHTS.len());
    assert!(
        all_runs[2..].iter().all(|f| !first_run.contains(f)),
        "nothing fetched twice: {all_runs:?}"
    );
    assert!(d(&files).unet_weights.is_file());
}

#[test]
fn hub_specs_built_by_hand_are_checked_before_touching_the_cache() {
    let cache = temp_dir();
    let spec = ModelSpec::Hub {
        repo_id: "o/n".to_owned(),
        revision: "../../escape".to_owned(),
    };
    let err = resolve(&spec, &offline_options(cache.path()), &mut NoProgress)
        .expect_err("a revision that climbs out of the cache");
    assert!(
        matches!(err, ModelFilesError::InvalidModelArg { .. }),
        "{err:?}"
    );
    assert!(err.is_invalid_input());
}

// ---------------------------------------------------------------------------------------
// Fingerprints: what the snapshot cache is keyed by

/// A model's fingerprint follows the contents of every file it is made of: the same in a
/// copy and after a touch, another when any component's weights or config change; the memo
/// spares reading files whose path, size and time are known.
#[test]
fn a_fingerprint_follows_the_contents_of_every_file() {
    let dir = temp_dir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    write_model(&a, &model_files_list(&FULL_WEIGHTS));
    write_model(&b, &model_files_list(&FULL_WEIGHTS));
    let memo = dir.path().join("memo.json");
    let fingerprint = |root: &Path| {
        locate_in_folder(root)
            .expect("complete model")
            .fingerprint(Some(&memo))
            .expect("files readable")
    };
    let original = fingerprint(&a);
    assert_eq!(original.len(), 64);
    assert_eq!(fingerprint(&b), original, "a copy is the same model");
    let unet = a.join("unet/diffusion_pytorch_model.safetensors");
    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&unet)
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert_eq!(fingerprint(&a), original, "a touched file is the same file");

    for changed in [
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/merges.txt",
    ] {
        write_file(&b, changed, b"something else");
        assert_ne!(fingerprint(&b), original, "{changed} changed");
        write_model(&b, &[changed]);
        assert_eq!(fingerprint(&b), original, "{changed} restored");
    }

    // The memo is used: a file rewritten with the same size and time is not read again
    // (which is why it is keyed by path, size and modification time).
    let weights = b.join("vae/diffusion_pytorch_model.safetensors");
    let before = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(before)
        .unwrap();
    assert_eq!(fingerprint(&b), original, "the memo was not used");
    let unremembered = locate_in_folder(&b).unwrap().fingerprint(None).unwrap();
    assert_ne!(unremembered, original);
}

/// A model in the Hugging Face cache is fingerprinted by its blob names (content hashes), so
/// nothing is read; two commits sharing blobs are the same model.
#[test]
fn a_hub_model_is_fingerprinted_by_its_blob_names() {
    let cache = temp_dir();
    let repo_dir = repo_cache_dir(cache.path(), "o/n");
    let files = model_files_list(&FULL_WEIGHTS);
    let link_all = |commit: &str, odd_one: Option<&str>| {
        let snapshot = repo_dir.join("snapshots").join(commit);
        for file in &files {
            let etag = if Some(*file) == odd_one {
                format!("{:064x}", 7)
            } else {
                format!("{:064x}", file.len() * 1000 + file.as_bytes()[0] as usize)
            };
            let blob = repo_dir.join("blobs").join(&etag);
            if !blob.exists() {
                write_file(&repo_dir, &format!("blobs/{etag}"), &contents(file));
            }
            let link = snapshot.join(file);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&blob, &link).unwrap();
        }
        locate_in_folder(&snapshot)
            .unwrap()
            .fingerprint(None)
            .unwrap()
    };
    let first = link_all(SHA, None);
    let other_commit = link_all(&"b".repeat(40), None);
    assert_eq!(first, other_commit);
    let other_vae = link_all(
        &"c".repeat(40),
        Some("vae/diffusion_pytorch_model.safetensors"),
    );
    assert_ne!(first, other_vae);
    // Not read: a blob's contents do not enter the fingerprint, only its name.
    let blob = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&blob, b"changed under the same name").unwrap();
    assert_eq!(link_all(&"d".repeat(40), None), first);
}

/// The diffusers files of a folder model.
fn d(files: &ModelFiles) -> &DiffusersFiles {
    files.diffusers().expect("a diffusers folder")
}
