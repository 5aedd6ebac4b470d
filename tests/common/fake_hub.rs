//! A fake Hugging Face hub on loopback, in the URL layout of huggingface.co, for real
//! downloads in tests: `GET /api/models/{owner}/{name}/revision/{revision}` for the file list,
//! `GET /{owner}/{name}/resolve/{revision}/{file}` for a file (LFS files redirect to
//! `/cdn/{etag}`), with ranges honoured as the hub's storage does. Every request is logged.
//!
//! Included by several test binaries with `#[path = "common/fake_hub.rs"] mod fake_hub;`.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use unitune::model_files::HubOptions;

/// How long a fake hub serves at most; a test that hangs fails instead of waiting forever.
const LIFETIME: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct FakeRepo {
    pub id: String,
    /// The commit every revision resolves to.
    pub sha: String,
    /// File name in the repo (`/`-separated) to contents.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Files answer 403, as for a gated model whose licence was not accepted.
    pub gated: bool,
}

impl FakeRepo {
    pub fn new(id: &str, sha: &str, files: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        Self {
            id: id.to_owned(),
            sha: sha.to_owned(),
            files: files.into_iter().collect(),
            gated: false,
        }
    }

    /// Every file under `folder`, recursively, named by its path relative to `folder`. The
    /// commit is derived from the names and contents, so it is stable across runs.
    pub fn from_folder(id: &str, folder: &Path) -> Self {
        let files: BTreeMap<String, Vec<u8>> = files_under(folder)
            .into_iter()
            .map(|(name, path)| {
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
                (name, bytes)
            })
            .collect();
        let sha = commit_of(&files);
        Self::new(id, &sha, files)
    }

    /// The same repo with one more file (or a file replaced); the commit stays.
    pub fn with_file(mut self, name: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.files.insert(name.to_owned(), bytes.into());
        self
    }
}

/// Every file under `root` (following links), keyed by its `/`-separated path relative to
/// `root`, in name order.
pub fn files_under(root: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(root: &Path, dir: &Path, found: &mut BTreeMap<String, PathBuf>) {
        let entries = std::fs::read_dir(dir)
            .unwrap_or_else(|err| panic!("read folder {}: {err}", dir.display()));
        for entry in entries {
            let path = entry.expect("folder entry").path();
            if path.is_dir() {
                walk(root, &path, found);
            } else {
                let relative = path.strip_prefix(root).expect("under the root");
                let name: Vec<String> = relative
                    .components()
                    .map(|c| c.as_os_str().to_str().expect("utf-8 file name").to_owned())
                    .collect();
                found.insert(name.join("/"), path);
            }
        }
    }
    let mut found = BTreeMap::new();
    walk(root, root, &mut found);
    found
}

/// A 40-hex-digit commit hash derived from a repo's names and contents.
fn commit_of(files: &BTreeMap<String, Vec<u8>>) -> String {
    let mut all = Vec::new();
    for (name, bytes) in files {
        all.extend_from_slice(name.as_bytes());
        all.push(0);
        all.extend_from_slice(etag_of(bytes).as_bytes());
    }
    let digest = format!("{}{}", etag_of(&all), etag_of(b"commit"));
    digest[..40].to_owned()
}

#[derive(Debug, Clone)]
pub struct Logged {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

pub struct FakeHub {
    /// `http://127.0.0.1:<port>`, without a trailing '/'.
    pub url: String,
    log: Arc<Mutex<Vec<Logged>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A stable, content-derived etag (stands in for the sha256 the hub uses for LFS files).
pub fn etag_of(bytes: &[u8]) -> String {
    let hash = |seed: u64| {
        bytes.iter().fold(seed, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    format!(
        "{:016x}{:016x}",
        hash(0xcbf2_9ce4_8422_2325),
        hash(0x8422_2325_cbf2_9ce4)
    )
}

/// Whether the hub stores `file` in LFS (and so redirects its downloads to storage).
pub fn is_lfs(file: &str) -> bool {
    [".safetensors", ".bin", ".ckpt"]
        .iter()
        .any(|ext| file.ends_with(ext))
}

type HttpResponse = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

fn status(code: u16, body: &str) -> HttpResponse {
    tiny_http::Response::from_string(body).with_status_code(code)
}

/// Serves bytes, honouring `Range: bytes=a-b` / `bytes=a-` as the hub's storage does.
fn serve_bytes(bytes: &[u8], range: Option<&str>) -> HttpResponse {
    let total = bytes.len();
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return tiny_http::Response::from_data(bytes.to_vec())
            .with_header(header("Accept-Ranges", "bytes"));
    };
    let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = start.parse().unwrap_or(0);
    let end: usize = end.parse().map_or(total.saturating_sub(1), |e: usize| {
        e.min(total.saturating_sub(1))
    });
    if start >= total || start > end {
        return status(416, "range not satisfiable")
            .with_header(header("Content-Range", &format!("bytes */{total}")));
    }
    tiny_http::Response::from_data(bytes[start..=end].to_vec())
        .with_status_code(206)
        .with_header(header("Accept-Ranges", "bytes"))
        .with_header(header(
            "Content-Range",
            &format!("bytes {start}-{end}/{total}"),
        ))
}

/// What the server thread serves: the repos, with every file's etag worked out once.
struct Served {
    repos: Vec<FakeRepo>,
    /// (repo index, file) to etag.
    etags: HashMap<(usize, String), String>,
    /// etag to (repo index, file), for `/cdn/{etag}`.
    blobs: HashMap<String, (usize, String)>,
}

impl Served {
    fn new(repos: Vec<FakeRepo>) -> Self {
        let mut etags = HashMap::new();
        let mut blobs = HashMap::new();
        for (index, repo) in repos.iter().enumerate() {
            for (file, bytes) in &repo.files {
                let etag = etag_of(bytes);
                blobs
                    .entry(etag.clone())
                    .or_insert_with(|| (index, file.clone()));
                etags.insert((index, file.clone()), etag);
            }
        }
        Self {
            repos,
            etags,
            blobs,
        }
    }

    fn blob(&self, etag: &str) -> Option<&[u8]> {
        let (index, file) = self.blobs.get(etag)?;
        self.repos[*index].files.get(file).map(Vec::as_slice)
    }

    fn handle(&self, request: &tiny_http::Request, base_url: &str) -> HttpResponse {
        let path = request.url().split('?').next().unwrap_or("");
        let range = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Range"))
            .map(|h| h.value.as_str().to_owned());
        let find_repo = |owner: &str, name: &str| {
            self.repos
                .iter()
                .enumerate()
                .find(|(_, repo)| repo.id == format!("{owner}/{name}"))
        };

        // GET /api/models/{owner}/{name}/revision/{revision}
        if let Some(rest) = path.strip_prefix("/api/models/") {
            let parts: Vec<&str> = rest.split('/').collect();
            let (owner, name, revision) = match parts.as_slice() {
                [owner, name, "revision", revision] => (*owner, *name, *revision),
                _ => return status(404, "{\"error\":\"not found\"}"),
            };
            return match find_repo(owner, name) {
                Some((_, repo)) if revision == "main" || revision == repo.sha => {
                    let siblings: Vec<serde_json::Value> = repo
                        .files
                        .keys()
                        .map(|f| serde_json::json!({ "rfilename": f }))
                        .collect();
                    let info = serde_json::json!({
                        "id": repo.id,
                        "sha": repo.sha,
                        "gated": repo.gated,
                        "siblings": siblings,
                    });
                    tiny_http::Response::from_string(info.to_string())
                        .with_header(header("Content-Type", "application/json"))
                }
                Some(_) => status(404, "{\"error\":\"Invalid rev id\"}")
                    .with_header(header("X-Error-Code", "RevisionNotFound")),
                None => status(404, "{\"error\":\"Repository not found\"}")
                    .with_header(header("X-Error-Code", "RepoNotFound")),
            };
        }

        // GET /cdn/{etag}: where LFS files are redirected to.
        if let Some(etag) = path.strip_prefix("/cdn/") {
            return match self.blob(etag) {
                Some(bytes) => serve_bytes(bytes, range.as_deref()),
                None => status(404, "no such blob"),
            };
        }

        // GET /{owner}/{name}/resolve/{revision}/{file...}
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        let [owner, name, "resolve", revision, file] = parts.as_slice() else {
            return status(404, "not found");
        };
        let Some((index, repo)) = find_repo(owner, name) else {
            return status(404, "Repository not found")
                .with_header(header("X-Error-Code", "RepoNotFound"));
        };
        if *revision != "main" && *revision != repo.sha {
            return status(404, "Invalid rev id")
                .with_header(header("X-Error-Code", "RevisionNotFound"));
        }
        if repo.gated {
            return status(403, "Access to this model is restricted")
                .with_header(header("X-Error-Code", "GatedRepo"));
        }
        let Some(bytes) = repo.files.get(*file) else {
            return status(404, "Entry not found")
                .with_header(header("X-Error-Code", "EntryNotFound"));
        };
        let etag = &self.etags[&(index, (*file).to_owned())];
        if is_lfs(file) {
            // LFS files: a redirect to storage, with the file's etag in X-Linked-Etag.
            status(302, "")
                .with_header(header("Location", &format!("{base_url}/cdn/{etag}")))
                .with_header(header("X-Repo-Commit", &repo.sha))
                .with_header(header("X-Linked-Etag", &format!("\"{etag}\"")))
                .with_header(header("X-Linked-Size", &bytes.len().to_string()))
                .with_header(header("ETag", "\"git-pointer-etag\""))
        } else {
            serve_bytes(bytes, range.as_deref())
                .with_header(header("X-Repo-Commit", &repo.sha))
                .with_header(header("ETag", &format!("\"{etag}\"")))
        }
    }
}

impl FakeHub {
    /// Serves `repos` on 127.0.0.1 (a free port) until dropped, or for at most two minutes.
    pub fn start(repos: Vec<FakeRepo>) -> Self {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("bind loopback");
        let addr = server.server_addr().to_ip().expect("an IP address");
        let url = format!("http://{addr}");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let served = Served::new(repos);
        let thread = {
            let (log, stop, base_url) = (Arc::clone(&log), Arc::clone(&stop), url.clone());
            std::thread::Builder::new()
                .name("fake-hub".to_owned())
                .spawn(move || {
                    let deadline = Instant::now() + LIFETIME;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let request = match server.recv_timeout(Duration::from_millis(20)) {
                            Ok(Some(request)) => request,
                            Ok(None) => continue,
                            Err(_) => break,
                        };
                        let value_of = |name: &'static str| {
                            request
                                .headers()
                                .iter()
                                .find(|h| h.field.equiv(name))
                                .map(|h| h.value.as_str().to_owned())
                        };
                        let logged = Logged {
                            path: request.url().to_owned(),
                            range: value_of("Range"),
                            authorization: value_of("Authorization"),
                        };
                        if let Ok(mut log) = log.lock() {
                            log.push(logged);
                        }
                        let response = served.handle(&request, &base_url);
                        // The client may have hung up; the test sees that on its side.
                        let _ = request.respond(response);
                    }
                })
                .expect("spawn fake hub")
        };
        Self {
            url,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// Every request so far, in order.
    pub fn log(&self) -> MutexGuard<'_, Vec<Logged>> {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The files whose contents were requested from `/{repo}/resolve/...`, in order. hf-hub
    /// first asks for `Range: bytes=0-0` of each file (for its etag, commit and size); those
    /// probes are left out.
    pub fn resolved_files(&self, repo_id: &str) -> Vec<String> {
        let prefix = format!("/{repo_id}/resolve/");
        self.log()
            .iter()
            .filter(|l| l.range.as_deref() != Some("bytes=0-0"))
            .filter_map(|l| l.path.strip_prefix(&prefix))
            .filter_map(|rest| rest.split_once('/').map(|(_, file)| file.to_owned()))
            .collect()
    }

    /// Every file named in any `/{repo}/resolve/...` request, probes included.
    pub fn touched_files(&self, repo_id: &str) -> BTreeSet<String> {
        let prefix = format!("/{repo_id}/resolve/");
        self.log()
            .iter()
            .filter_map(|l| l.path.strip_prefix(&prefix))
            .filter_map(|rest| rest.split_once('/').map(|(_, file)| file.to_owned()))
            .collect()
    }

    /// Options that download from this hub into `cache`.
    pub fn options(&self, cache: &Path) -> HubOptions {
        HubOptions {
            endpoint: Some(self.url.clone()),
            cache_dir: Some(cache.to_path_buf()),
            offline: false,
            token: None,
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
