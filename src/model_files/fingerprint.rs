//! What a model is, independent of where its files are: the snapshot cache's key must follow
//! the weights, not their path (a copied folder is the same model; a swapped VAE is not).
//!
//! Every file the engine reads for a model (each component's config and weights, the
//! tokenizer, the scheduler config) gets a content hash:
//! - a file in the Hugging Face cache is a link to `blobs/<etag>`, and the etag is already a
//!   content hash (SHA-256 for weights, git's SHA-1 for small files): nothing is read;
//! - any other file is hashed with SHA-256. Reading a 3.4 GB UNet takes a few seconds, so the
//!   result is remembered in a small file keyed by the file's path, length and modification
//!   time: a folder is hashed once, a copy once more.
//!
//! The model's fingerprint is the SHA-256 of the roles and hashes of all its files, and of
//! the LoRA files applied to it with their weights.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use super::bundled::BUNDLED_TOKENIZER;
use super::error::ModelFilesError;
use super::layout::{ModelFiles, ModelLayout, VaeFiles};

/// Remembered file hashes, in the user cache (next to the snapshot cache).
pub fn default_memo_path() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("unitune").join("file-hashes.json"))
}

impl ModelFiles {
    /// A hex SHA-256 naming the model's contents (see the module docs). `memo` remembers the
    /// hashes of files outside the Hugging Face cache; `None` hashes them every time.
    pub fn fingerprint(&self, memo: Option<&Path>) -> Result<String, ModelFilesError> {
        let mut remembered = memo.map(read_memo).unwrap_or_default();
        let before = remembered.len();
        let mut hash = Sha256::new();
        for (role, path) in self.files_by_role() {
            let content = content_hash(path, &mut remembered)?;
            hash.update(format!("{role}={content}\n").as_bytes());
        }
        if self.checkpoint().is_some() {
            // A single file is read with the bundled tokenizer: a new one is a new model.
            hash.update(format!("tokenizer=bundled:{}\n", bundled_tokenizer_hash()).as_bytes());
        }
        // Applied LoRAs change the weights: each one's contents and weight, in order (none
        // adds nothing, so a plain model keeps its fingerprint).
        for lora in &self.loras {
            let content = content_hash(&lora.path, &mut remembered)?;
            hash.update(format!("lora={content}*{:?}\n", lora.weight).as_bytes());
        }
        if let Some(memo) = memo
            && remembered.len() != before
        {
            // Best effort: without the memo the next load hashes again.
            let _ = write_memo(memo, &remembered);
        }
        Ok(hex(&hash.finalize()))
    }

    /// The SHA-256 (hex) of a single-file checkpoint's whole file: the hash AUTOMATIC1111,
    /// Forge and civitai recognise a checkpoint by (their "AutoV2" is its first 10 digits).
    /// `None` for a diffusers folder, which those tools have no hash for.
    pub fn checkpoint_sha256(
        &self,
        memo: Option<&Path>,
    ) -> Result<Option<String>, ModelFilesError> {
        let Some(checkpoint) = self.checkpoint() else {
            return Ok(None);
        };
        let mut remembered = memo.map(read_memo).unwrap_or_default();
        let before = remembered.len();
        let mut content = content_hash(checkpoint, &mut remembered)?;
        // A hub blob is named by its etag, which for a large (LFS) file is its SHA-256; a
        // 40-digit git SHA-1 is not, so such a file is read after all.
        if content
            .strip_prefix("blob:")
            .is_some_and(|etag| etag.len() != 64)
        {
            content = sha256_of_file(checkpoint)?;
        }
        if let Some(memo) = memo
            && remembered.len() != before
        {
            let _ = write_memo(memo, &remembered);
        }
        Ok(content.split_once(':').map(|(_, hex)| hex.to_owned()))
    }

    /// The content hash of each applied LoRA file (`sha256:<hex>`), in order, for recipes.
    pub fn lora_hashes(&self, memo: Option<&Path>) -> Result<Vec<String>, ModelFilesError> {
        let mut remembered = memo.map(read_memo).unwrap_or_default();
        self.loras
            .iter()
            .map(|lora| content_hash(&lora.path, &mut remembered))
            .collect()
    }

    /// Every file the engine reads, named by what it is for (not by where it is).
    fn files_by_role(&self) -> Vec<(&'static str, &Path)> {
        let mut files: Vec<(&'static str, &Path)> = match &self.layout {
            ModelLayout::SingleFile { checkpoint } => vec![("checkpoint", checkpoint.as_path())],
            ModelLayout::Diffusers(d) => {
                let mut files = vec![
                    ("unet_config", d.unet_config.as_path()),
                    ("unet_weights", &d.unet_weights),
                    ("vae_config", &d.vae_config),
                    ("vae_weights", &d.vae_weights),
                    ("text_encoder_config", &d.text_encoder_config),
                    ("text_encoder_weights", &d.text_encoder_weights),
                    ("tokenizer_vocab", &d.tokenizer_vocab),
                    ("tokenizer_merges", &d.tokenizer_merges),
                    ("scheduler_config", &d.scheduler_config),
                ];
                files.extend(
                    d.tokenizer_config
                        .as_deref()
                        .map(|p| ("tokenizer_config", p)),
                );
                files.extend(
                    d.special_tokens_map
                        .as_deref()
                        .map(|p| ("special_tokens_map", p)),
                );
                files
            }
        };
        match &self.vae_replacement {
            Some(VaeFiles::Folder { config, weights }) => {
                files.push(("vae_replacement_config", config));
                files.push(("vae_replacement_weights", weights));
            }
            Some(VaeFiles::File { weights }) => files.push(("vae_replacement_weights", weights)),
            None => {}
        }
        files
    }
}

/// The SHA-256 of the bundled CLIP tokenizer's files.
fn bundled_tokenizer_hash() -> String {
    let mut hash = Sha256::new();
    for (name, bytes) in BUNDLED_TOKENIZER {
        hash.update(name.as_bytes());
        hash.update(bytes);
    }
    hex(&hash.finalize())
}

/// The memo's key for a file: where it is and what its metadata says about its contents.
fn memo_key(path: &Path, metadata: &std::fs::Metadata) -> String {
    let modified = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}|{}|{modified}", path.display(), metadata.len())
}

fn content_hash(
    path: &Path,
    remembered: &mut BTreeMap<String, String>,
) -> Result<String, ModelFilesError> {
    let io = |source: std::io::Error| ModelFilesError::Io {
        path: path.to_path_buf(),
        source,
    };
    let real = path.canonicalize().map_err(io)?;
    if let Some(etag) = hub_blob_name(&real) {
        return Ok(format!("blob:{etag}"));
    }
    let metadata = std::fs::metadata(&real).map_err(io)?;
    let key = memo_key(&real, &metadata);
    if let Some(known) = remembered.get(&key) {
        return Ok(known.clone());
    }
    let value = sha256_of_file(&real)?;
    remembered.insert(key, value.clone());
    Ok(value)
}

/// `sha256:<hex>` of the file's contents, read in 1 MB pieces.
fn sha256_of_file(path: &Path) -> Result<String, ModelFilesError> {
    let io = |source: std::io::Error| ModelFilesError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hash = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hash.update(&buffer[..n]);
    }
    Ok(format!("sha256:{}", hex(&hash.finalize())))
}

/// The etag of a file in the Hugging Face cache (`.../blobs/<etag>`), which is a hash of its
/// contents.
fn hub_blob_name(real: &Path) -> Option<&str> {
    let parent = real.parent()?;
    if parent.file_name()? != "blobs" {
        return None;
    }
    let name = real.file_name()?.to_str()?;
    // An etag is 40 (git SHA-1) or 64 (SHA-256) hex digits; anything else is not one.
    let is_hash = matches!(name.len(), 40 | 64) && name.bytes().all(|b| b.is_ascii_hexdigit());
    is_hash.then_some(name)
}

fn read_memo(path: &Path) -> BTreeMap<String, String> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn write_memo(path: &Path, memo: &BTreeMap<String, String>) -> std::io::Result<()> {
    // Files that are gone are forgotten, so the memo stays as small as the models kept.
    let mut memo = memo.clone();
    memo.retain(|key, _| {
        key.rsplitn(3, '|')
            .nth(2)
            .is_some_and(|file| Path::new(file).exists())
    });
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let temp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer(temp.as_file(), &memo).map_err(std::io::Error::other)?;
    temp.persist(path)?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
