//! Hub models: the local Hugging Face cache first, then a download of only the needed files.
//!
//! The cache layout is the one Python's `huggingface_hub` uses, so both share one copy:
//! `<cache>/models--owner--name/refs/<revision>` holds a commit hash,
//! `snapshots/<commit>/<file>` are links to `blobs/<etag>`. Downloads go through `hf-hub`'s
//! blocking API, which writes exactly that layout and resumes a partial file.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::error::ModelFilesError;
use super::layout::{
    FileSet, HubFiles, ModelFiles, ModelSource, WeightsPreference, locate_in_folder,
    locate_in_folder_with, plan,
};
use super::progress::{DownloadProgress, HubProgress};
use super::spec::{ModelSpec, parse_hub_id};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Retries of a file download that broke off; each resumes where the last one stopped.
const DOWNLOAD_RETRIES: usize = 3;

/// How to reach the hub and where its cache is. `Default` means: everything from the
/// environment, as Python's `huggingface_hub` reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub's address; `None` means `HF_ENDPOINT`, else <https://huggingface.co>.
    pub endpoint: Option<String>,
    /// The cache root; `None` means `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Use only the cache. `HF_HUB_OFFLINE=1` also makes it so.
    pub offline: bool,
    /// Access token for gated or private models; `None` means `HF_TOKEN`, else the token
    /// file that `hf auth login` writes.
    pub token: Option<String>,
}

impl HubOptions {
    /// The endpoint that will be used, without a trailing '/'.
    pub fn effective_endpoint(&self) -> String {
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| env_var("HF_ENDPOINT"))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        endpoint.trim_end_matches('/').to_owned()
    }

    /// The cache root that will be used.
    pub fn effective_cache_dir(&self) -> Result<PathBuf, ModelFilesError> {
        match &self.cache_dir {
            Some(dir) => Ok(dir.clone()),
            None => default_cache_dir().ok_or(ModelFilesError::NoCacheDir),
        }
    }

    /// Whether only the cache may be used (the option, or `HF_HUB_OFFLINE`).
    pub fn is_offline(&self) -> bool {
        self.offline || env_var("HF_HUB_OFFLINE").is_some_and(|value| is_truthy(&value))
    }

    fn effective_token(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(|| token_from(&env_var, dirs::home_dir().as_deref()))
    }
}

/// The standard Hugging Face hub cache folder, as Python's `huggingface_hub` chooses it.
pub fn default_cache_dir() -> Option<PathBuf> {
    cache_dir_from(&env_var, dirs::home_dir().as_deref())
}

/// A repo's folder in the cache: `<cache_dir>/models--owner--name`.
pub fn repo_cache_dir(cache_dir: &Path, repo_id: &str) -> PathBuf {
    cache_dir.join(Repo::model(repo_id.to_owned()).folder_name())
}

/// Finds every file of a model: checks a folder, or takes a hub model from the cache,
/// downloading what the cache lacks unless offline.
///
/// A folder is read with full-precision weights preferred; a hub model with fp16 preferred
/// (that is what gets downloaded when the repo has it).
pub fn resolve(
    spec: &ModelSpec,
    opts: &HubOptions,
    progress: &mut dyn DownloadProgress,
) -> Result<ModelFiles, ModelFilesError> {
    match spec {
        ModelSpec::Folder(path) => locate_in_folder(path),
        ModelSpec::Demo => {
            let mut files = locate_in_folder(&super::demo::demo_model_dir()?)?;
            files.source = ModelSource::Demo;
            Ok(files)
        }
        ModelSpec::Hub { repo_id, revision } => {
            // Both become paths in the cache: refuse what parse_model_arg would refuse.
            let typed = format!("{repo_id}@{revision}");
            parse_hub_id(&typed).map_err(|reason| ModelFilesError::InvalidModelArg {
                arg: typed.clone(),
                reason,
            })?;
            let hub = HubModel {
                repo_id,
                revision,
                cache_dir: opts.effective_cache_dir()?,
                endpoint: opts.effective_endpoint(),
                files: None,
            };
            let miss = match hub.lookup_cache() {
                Ok(files) => return Ok(files),
                Err(miss) => miss,
            };
            if opts.is_offline() {
                return Err(hub.not_cached(
                    "unitune is offline (--offline or HF_HUB_OFFLINE)".to_owned(),
                    miss,
                ));
            }
            hub.download(opts.effective_token(), progress, miss)
        }
    }
}

/// Named files of a hub repo that is not a Stable Diffusion pipeline (the tiny VAE of the
/// previews): taken from the cache, else downloaded unless offline, into the same cache
/// layout. The paths come back in the order of `files`.
pub fn resolve_repo_files(
    repo_id: &str,
    revision: &str,
    files: &[&str],
    opts: &HubOptions,
    progress: &mut dyn DownloadProgress,
) -> Result<Vec<PathBuf>, ModelFilesError> {
    let hub = HubModel {
        repo_id,
        revision,
        cache_dir: opts.effective_cache_dir()?,
        endpoint: opts.effective_endpoint(),
        files: Some(files),
    };
    let miss = match hub.lookup_files(files) {
        Ok(paths) => return Ok(paths),
        Err(miss) => miss,
    };
    if opts.is_offline() {
        return Err(hub.not_cached(
            "unitune is offline (--offline or HF_HUB_OFFLINE)".to_owned(),
            miss,
        ));
    }
    let (repo, commit, listing) = hub.connect(opts.effective_token(), miss)?;
    if let Some(file) = files.iter().find(|file| !listing.has_file(file)) {
        return Err(ModelFilesError::FileNotInRepo {
            repo_id: repo_id.to_owned(),
            revision: revision.to_owned(),
            file: (*file).to_owned(),
        });
    }
    hub.fetch(&repo, &commit, files.iter().copied(), progress)?;
    let snapshot = hub.snapshot_dir(&commit);
    Ok(files.iter().map(|file| snapshot.join(file)).collect())
}

/// One hub model and where it lives.
struct HubModel<'a> {
    repo_id: &'a str,
    revision: &'a str,
    cache_dir: PathBuf,
    endpoint: String,
    /// The files wanted, for a repo that is not a Stable Diffusion pipeline; `None` for a
    /// pipeline, whose files the diffusers layout names.
    files: Option<&'a [&'a str]>,
}

impl HubModel<'_> {
    fn repo_dir(&self) -> PathBuf {
        repo_cache_dir(&self.cache_dir, self.repo_id)
    }

    fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.repo_dir().join("snapshots").join(commit)
    }

    /// The cached model, or what is missing from the cache. Touches no network.
    fn lookup_cache(&self) -> Result<ModelFiles, String> {
        let commit = self.cached_commit()?;
        let snapshot = self.snapshot_dir(&commit);
        let files = locate_in_folder_with(&snapshot, WeightsPreference::Fp16)
            .map_err(|err| describe_cache_gap(&commit, &err))?;
        Ok(ModelFiles {
            source: ModelSource::HubCache {
                repo_id: self.repo_id.to_owned(),
                revision: self.revision.to_owned(),
                commit,
                cache_dir: self.cache_dir.clone(),
            },
            ..files
        })
    }

    /// The cached copies of `files`, or what is missing from the cache. Touches no network.
    fn lookup_files(&self, files: &[&str]) -> Result<Vec<PathBuf>, String> {
        let commit = self.cached_commit()?;
        let snapshot = self.snapshot_dir(&commit);
        files
            .iter()
            .map(|file| {
                let path = snapshot.join(file);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(format!("snapshots/{commit} lacks {file}"))
                }
            })
            .collect()
    }

    /// The commit the cache holds for the revision.
    fn cached_commit(&self) -> Result<String, String> {
        let repo_dir = self.repo_dir();
        if !repo_dir.is_dir() {
            return Err("no copy of this repo is there".to_owned());
        }
        if is_commit_hash(self.revision) && self.snapshot_dir(self.revision).is_dir() {
            Ok(self.revision.to_owned())
        } else {
            let ref_path = repo_dir.join("refs").join(self.revision);
            let commit = std::fs::read_to_string(&ref_path)
                .map_err(|_| format!("it has no refs/{}", self.revision))?;
            let commit = commit.trim().to_owned();
            if !is_safe_commit(&commit) {
                return Err(format!(
                    "refs/{} does not hold a commit hash",
                    self.revision
                ));
            }
            Ok(commit)
        }
    }

    fn not_cached(&self, cause: String, detail: String) -> ModelFilesError {
        if let Some(files) = self.files {
            return ModelFilesError::FilesNotCached {
                cause,
                repo: format!("{} (revision {})", self.repo_id, self.revision),
                repo_cache_dir: self.repo_dir(),
                files: files.join(", "),
                detail,
            };
        }
        ModelFilesError::NotCached {
            cause,
            repo_id: self.repo_id.to_owned(),
            revision: self.revision.to_owned(),
            repo_cache_dir: self.repo_dir(),
            detail,
        }
    }

    /// Connects to the repo at the revision and asks for its commit and file list.
    fn connect(
        &self,
        token: Option<String>,
        cache_miss: String,
    ) -> Result<(ApiRepo, String, HubFiles), ModelFilesError> {
        let api = ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(token)
            .with_progress(false)
            .with_retries(DOWNLOAD_RETRIES)
            .with_user_agent("unitune", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|err| self.hub_response(format!("cannot set up the HTTP client: {err}")))?;
        let repo = api.repo(Repo::with_revision(
            self.repo_id.to_owned(),
            RepoType::Model,
            self.revision.to_owned(),
        ));

        let info = repo
            .info()
            .map_err(|err| self.classify_info_error(err, cache_miss))?;
        if !is_safe_commit(&info.sha) {
            return Err(self.hub_response(format!("'{}' is not a commit hash", info.sha)));
        }
        let listing = HubFiles::new(info.siblings.into_iter().map(|s| s.rfilename));
        Ok((repo, info.sha, listing))
    }

    /// Asks the hub for the file list, downloads the needed files the cache lacks.
    fn download(
        &self,
        token: Option<String>,
        progress: &mut dyn DownloadProgress,
        cache_miss: String,
    ) -> Result<ModelFiles, ModelFilesError> {
        let (repo, commit, listing) = self.connect(token, cache_miss)?;
        let location = format!("the hub repo {} (revision {})", self.repo_id, self.revision);
        let plan = plan(&listing, WeightsPreference::Fp16, &location)?;
        let snapshot = self.snapshot_dir(&commit);
        let files_downloaded = self.fetch(&repo, &commit, plan.files(), progress)?;

        let files = plan.into_model_files(&snapshot, ModelSource::LocalFolder);
        let source = if files_downloaded == 0 {
            ModelSource::HubCache {
                repo_id: self.repo_id.to_owned(),
                revision: self.revision.to_owned(),
                commit,
                cache_dir: self.cache_dir.clone(),
            }
        } else {
            ModelSource::Downloaded {
                repo_id: self.repo_id.to_owned(),
                revision: self.revision.to_owned(),
                commit,
                cache_dir: self.cache_dir.clone(),
                files_downloaded,
            }
        };
        Ok(ModelFiles { source, ..files })
    }

    /// Downloads the named files the snapshot of `commit` lacks, then points the revision's
    /// ref at it. Returns how many were downloaded.
    fn fetch<'f>(
        &self,
        repo: &ApiRepo,
        commit: &str,
        files: impl IntoIterator<Item = &'f str>,
        progress: &mut dyn DownloadProgress,
    ) -> Result<usize, ModelFilesError> {
        let snapshot = self.snapshot_dir(commit);
        let mut files_downloaded = 0;
        for file in files {
            if progress.cancelled() {
                return Err(ModelFilesError::Cancelled);
            }
            let expected = snapshot.join(file);
            if expected.is_file() {
                continue;
            }
            let path = repo
                .download_with_progress(file, HubProgress::new(progress, file))
                .map_err(|err| self.classify_download_error(err, file))?;
            if path != expected {
                return Err(ModelFilesError::Download {
                    repo_id: self.repo_id.to_owned(),
                    file: file.to_owned(),
                    detail: format!(
                        "the repo moved to another commit while downloading (expected {commit}, got {})",
                        path.display()
                    ),
                });
            }
            files_downloaded += 1;
        }
        self.write_ref(commit)?;
        Ok(files_downloaded)
    }

    /// Points `refs/<revision>` at `commit`, as Python's `huggingface_hub` does (it writes
    /// no ref when the revision is the commit itself).
    fn write_ref(&self, commit: &str) -> Result<(), ModelFilesError> {
        if self.revision == commit {
            return Ok(());
        }
        let ref_path = self.repo_dir().join("refs").join(self.revision);
        let io_error = |source| ModelFilesError::Io {
            path: ref_path.clone(),
            source,
        };
        if let Some(parent) = ref_path.parent() {
            std::fs::create_dir_all(parent).map_err(io_error)?;
        }
        std::fs::write(&ref_path, commit).map_err(io_error)
    }

    fn hub_response(&self, detail: String) -> ModelFilesError {
        ModelFilesError::HubResponse {
            endpoint: self.endpoint.clone(),
            detail,
        }
    }

    fn classify_info_error(&self, err: ApiError, cache_miss: String) -> ModelFilesError {
        let ApiError::RequestError(request_error) = err else {
            return self.hub_response(err.to_string());
        };
        match *request_error {
            ureq::Error::StatusCode(404) => ModelFilesError::RepoNotFound {
                repo_id: self.repo_id.to_owned(),
                revision: self.revision.to_owned(),
                endpoint: self.endpoint.clone(),
            },
            ureq::Error::StatusCode(status @ (401 | 403)) => ModelFilesError::AccessDenied {
                repo_id: self.repo_id.to_owned(),
                endpoint: self.endpoint.clone(),
                status,
            },
            ureq::Error::Json(json) => {
                self.hub_response(format!("the repo info is not the hub's JSON: {json}"))
            }
            other => self.not_cached(
                format!("could not reach {} ({other})", self.endpoint),
                cache_miss,
            ),
        }
    }

    fn classify_download_error(&self, err: ApiError, file: &str) -> ModelFilesError {
        let download = |detail: String| ModelFilesError::Download {
            repo_id: self.repo_id.to_owned(),
            file: file.to_owned(),
            detail,
        };
        match err {
            ApiError::RequestError(request_error) => match *request_error {
                ureq::Error::StatusCode(status @ (401 | 403)) => ModelFilesError::AccessDenied {
                    repo_id: self.repo_id.to_owned(),
                    endpoint: self.endpoint.clone(),
                    status,
                },
                ureq::Error::StatusCode(status) => {
                    download(format!("the hub answered HTTP {status}"))
                }
                other => download(other.to_string()),
            },
            ApiError::MissingHeader(header) => self.hub_response(format!(
                "the download of {file} came without the {header} header"
            )),
            ApiError::InvalidHeader(header) => self.hub_response(format!(
                "the download of {file} came with an invalid {header} header"
            )),
            ApiError::LockAcquisition(lock) => download(format!(
                "another program is downloading the same file (lock {}); wait for it to finish",
                lock.display()
            )),
            ApiError::TooManyRetries(last) => {
                download(format!("gave up after {DOWNLOAD_RETRIES} retries: {last}"))
            }
            ApiError::InvalidResume => download(format!(
                "the partial download in {} is larger than the file; delete the .part file",
                self.repo_dir().join("blobs").display()
            )),
            other => download(other.to_string()),
        }
    }
}

/// Says why a cached snapshot is not usable, for the "not in the cache" error.
fn describe_cache_gap(commit: &str, err: &ModelFilesError) -> String {
    match err {
        ModelFilesError::FolderNotFound { .. } => format!("snapshots/{commit} does not exist"),
        ModelFilesError::MissingFile { file, .. } => format!("snapshots/{commit} lacks {file}"),
        ModelFilesError::MissingWeights { component, .. } => {
            format!("snapshots/{commit} has no {component} weights")
        }
        ModelFilesError::PickleOnly {
            component, files, ..
        } => format!("snapshots/{commit} has {component} weights only as pickle files ({files})"),
        other => other.to_string(),
    }
}

/// A full 40-hex-digit git commit hash.
fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A commit name from a ref file or the hub that is safe as one path component.
fn is_safe_commit(commit: &str) -> bool {
    !commit.is_empty() && commit.len() <= 128 && commit.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Expands a leading `~` the way Python's `os.path.expanduser` does for these variables.
fn expand_user(value: &str, home: Option<&Path>) -> PathBuf {
    match (value.strip_prefix("~/"), home) {
        (Some(rest), Some(home)) => home.join(rest),
        _ if value == "~" => home.map_or_else(|| PathBuf::from(value), Path::to_path_buf),
        _ => PathBuf::from(value),
    }
}

/// `HF_HOME`: the variable, else `$XDG_CACHE_HOME/huggingface`, else
/// `~/.cache/huggingface`.
fn hf_home_from(env: &dyn Fn(&str) -> Option<String>, home: Option<&Path>) -> Option<PathBuf> {
    if let Some(hf_home) = env("HF_HOME") {
        return Some(expand_user(&hf_home, home));
    }
    if let Some(xdg) = env("XDG_CACHE_HOME") {
        return Some(expand_user(&xdg, home).join("huggingface"));
    }
    home.map(|home| home.join(".cache").join("huggingface"))
}

/// The hub cache: `HF_HUB_CACHE`, else the legacy `HUGGINGFACE_HUB_CACHE`, else
/// `HF_HOME/hub`.
fn cache_dir_from(env: &dyn Fn(&str) -> Option<String>, home: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return Some(expand_user(&dir, home));
    }
    hf_home_from(env, home).map(|hf_home| hf_home.join("hub"))
}

/// The token: `HF_TOKEN` (or the legacy `HUGGING_FACE_HUB_TOKEN`), else the token file at
/// `HF_TOKEN_PATH`, else `HF_HOME/token`.
fn token_from(env: &dyn Fn(&str) -> Option<String>, home: Option<&Path>) -> Option<String> {
    if let Some(token) = env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN")) {
        return Some(token.trim().to_owned()).filter(|token| !token.is_empty());
    }
    let token_path = match env("HF_TOKEN_PATH") {
        Some(path) => expand_user(&path, home),
        None => hf_home_from(env, home)?.join("token"),
    };
    let token = std::fs::read_to_string(token_path).ok()?;
    Some(token.trim().to_owned()).filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_precedence() {
        let home = Some(Path::new("/home/u"));
        let cases: [(&[(&str, &str)], &str); 6] = [
            (&[], "/home/u/.cache/huggingface/hub"),
            (&[("XDG_CACHE_HOME", "/xdg")], "/xdg/huggingface/hub"),
            (&[("HF_HOME", "~/hf")], "/home/u/hf/hub"),
            (&[("HF_HOME", "/hf"), ("XDG_CACHE_HOME", "/xdg")], "/hf/hub"),
            (
                &[
                    ("HF_HUB_CACHE", "/c"),
                    ("HF_HOME", "/hf"),
                    ("HUGGINGFACE_HUB_CACHE", "/l"),
                ],
                "/c",
            ),
            (&[("HUGGINGFACE_HUB_CACHE", "/l"), ("HF_HOME", "/hf")], "/l"),
        ];
        for (env, expected) in cases {
            assert_eq!(
                cache_dir_from(&env_of(env), home),
                Some(PathBuf::from(expected)),
                "{env:?}"
            );
        }
        assert_eq!(cache_dir_from(&env_of(&[]), None), None);
    }

    #[test]
    fn token_comes_from_the_variable_then_the_token_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hf_home = dir.path().to_str().expect("utf-8 temp path");
        std::fs::write(dir.path().join("token"), "hf_file\n").expect("write token");
        let env = env_of(&[("HF_HOME", hf_home)]);
        assert_eq!(token_from(&env, None).as_deref(), Some("hf_file"));
        let env = env_of(&[("HF_HOME", hf_home), ("HF_TOKEN", "hf_var")]);
        assert_eq!(token_from(&env, None).as_deref(), Some("hf_var"));
        let env = env_of(&[("HF_HOME", "/nonexistent-unitune-test")]);
        assert_eq!(token_from(&env, None), None);
    }

    #[test]
    fn offline_values_read_like_huggingface_hub() {
        for yes in ["1", "true", "YES", "On"] {
            assert!(is_truthy(yes), "{yes}");
        }
        for no in ["0", "", "false", "off"] {
            assert!(!is_truthy(no), "{no}");
        }
    }

    #[test]
    fn commits_are_checked_before_use_as_paths() {
        assert!(is_commit_hash(&"a".repeat(40)));
        assert!(!is_commit_hash("main"));
        assert!(is_safe_commit("0123abc"));
        for bad in ["", "../x", "a/b", "a b"] {
            assert!(!is_safe_commit(bad), "{bad}");
        }
    }

    #[test]
    fn repo_folder_uses_the_python_naming() {
        assert_eq!(
            repo_cache_dir(Path::new("/c"), "owner/name"),
            PathBuf::from("/c/models--owner--name")
        );
    }
}
