//! The diffusers folder layout: which files a Stable Diffusion model needs, and which of the
//! files present to take. The same choice serves a folder on disk and a hub repo's file list.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use super::error::ModelFilesError;

/// Which weights file to take when a component has both full-precision and fp16 weights.
/// Whichever is present is taken when only one is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightsPreference {
    /// `*.safetensors` (usually float32).
    #[default]
    Full,
    /// `*.fp16.safetensors` (half the download and the memory).
    Fp16,
}

/// Where a [`ModelFiles`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder given by the user.
    LocalFolder,
    /// The demo model's folder (`--model demo`).
    Demo,
    /// Found complete in the Hugging Face cache; nothing was downloaded.
    HubCache {
        repo_id: String,
        revision: String,
        commit: String,
        /// The cache root (`.../huggingface/hub`).
        cache_dir: PathBuf,
    },
    /// Some or all files were downloaded by this call into the Hugging Face cache.
    Downloaded {
        repo_id: String,
        revision: String,
        commit: String,
        cache_dir: PathBuf,
        files_downloaded: usize,
    },
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LocalFolder => write!(f, "local folder"),
            Self::Demo => write!(f, "the demo model shipped with unitune (offline)"),
            Self::HubCache {
                repo_id,
                revision,
                commit,
                cache_dir,
            } => write!(
                f,
                "{repo_id}@{revision} (commit {commit}) from the Hugging Face cache in {}",
                cache_dir.display()
            ),
            Self::Downloaded {
                repo_id,
                revision,
                commit,
                cache_dir,
                files_downloaded,
            } => write!(
                f,
                "{repo_id}@{revision} (commit {commit}), {files_downloaded} file(s) just \
                 downloaded into the Hugging Face cache in {}",
                cache_dir.display()
            ),
        }
    }
}

/// Every file the engine reads for one Stable Diffusion model. All paths exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The model folder (for a hub model, its snapshot folder in the cache; for a single-file
    /// checkpoint, the folder that holds it).
    pub root: PathBuf,
    pub layout: ModelLayout,
    /// A VAE that replaces the model's own (`--vae`), see [`locate_vae`].
    pub vae_replacement: Option<VaeFiles>,
    pub source: ModelSource,
    /// LoRA files applied to the base model when it loads, in order (none unless chosen).
    pub loras: Vec<super::lora::LoraChoice>,
}

/// How a model's weights are laid out on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLayout {
    /// A diffusers folder: one config and weights file per component.
    Diffusers(Box<DiffusersFiles>),
    /// One `.safetensors` file in the original LDM layout (`model.diffusion_model.*`,
    /// `first_stage_model.*`, `cond_stage_model.*`), as AUTOMATIC1111 and ComfyUI keep them.
    /// The architecture is read from its tensors; the tokenizer is the bundled CLIP one.
    SingleFile { checkpoint: PathBuf },
}

/// The files of a diffusers-format folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffusersFiles {
    pub unet_config: PathBuf,
    pub unet_weights: PathBuf,
    pub vae_config: PathBuf,
    pub vae_weights: PathBuf,
    pub text_encoder_config: PathBuf,
    pub text_encoder_weights: PathBuf,
    pub tokenizer_vocab: PathBuf,
    pub tokenizer_merges: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub special_tokens_map: Option<PathBuf>,
    /// SDXL's second text encoder (`text_encoder_2`, `tokenizer_2`); `None` for SD 1.x/2.x.
    pub second_text: Option<SecondTextFiles>,
    pub scheduler_config: PathBuf,
    /// The pipeline's index; the engine reads unitune's own key in it (which built-in
    /// fidelity table the model uses, see `engine::fidelity`) and SDXL's
    /// `force_zeros_for_empty_prompt`.
    pub model_index: Option<PathBuf>,
}

/// SDXL's second text encoder and its tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecondTextFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer_vocab: PathBuf,
    pub tokenizer_merges: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub special_tokens_map: Option<PathBuf>,
}

/// A replacement VAE (`--vae`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaeFiles {
    /// A diffusers `vae/` folder: `config.json` and its weights.
    Folder { config: PathBuf, weights: PathBuf },
    /// One `.safetensors` file, in LDM names (`encoder.down.0.block.0...`, with or without
    /// `first_stage_model.`) or diffusers names; its architecture is read from its tensors.
    File { weights: PathBuf },
}

impl ModelFiles {
    /// The diffusers folder's files; `None` for a single-file checkpoint.
    pub fn diffusers(&self) -> Option<&DiffusersFiles> {
        match &self.layout {
            ModelLayout::Diffusers(files) => Some(files.as_ref()),
            ModelLayout::SingleFile { .. } => None,
        }
    }

    /// The single-file checkpoint, if the model is one.
    pub fn checkpoint(&self) -> Option<&Path> {
        match &self.layout {
            ModelLayout::SingleFile { checkpoint } => Some(checkpoint),
            ModelLayout::Diffusers(_) => None,
        }
    }
}

/// Checks a diffusers-format folder, or takes a single-file `.safetensors` checkpoint, and
/// returns its files, preferring full-precision weights where a component has both kinds.
pub fn locate_in_folder(root: &Path) -> Result<ModelFiles, ModelFilesError> {
    locate_in_folder_with(root, WeightsPreference::Full)
}

/// [`locate_in_folder`] with a choice of weights where a component has both kinds.
pub fn locate_in_folder_with(
    root: &Path,
    preference: WeightsPreference,
) -> Result<ModelFiles, ModelFilesError> {
    if root.is_file() {
        return locate_single_file(root);
    }
    if !root.is_dir() {
        return Err(ModelFilesError::FolderNotFound {
            path: root.to_path_buf(),
        });
    }
    let files = FolderFiles(root);
    // A folder holding only single-file checkpoints (no unet/) gets the clearer error.
    if !root.join(UNET.dir).is_dir()
        && let Some(checkpoint) = files
            .files_in("")
            .into_iter()
            .map(|name| root.join(name))
            .find(|path| is_checkpoint_file(path))
    {
        return Err(ModelFilesError::CheckpointInFolder {
            folder: root.to_path_buf(),
            checkpoint,
        });
    }
    let location = format!("the model folder {}", root.display());
    let plan = plan(&files, preference, &location)?;
    Ok(plan.into_model_files(root, ModelSource::LocalFolder))
}

/// A single-file checkpoint: `.safetensors` is taken, pickle files are refused.
fn locate_single_file(path: &Path) -> Result<ModelFiles, ModelFilesError> {
    let checkpoint = check_safetensors_file(path)?;
    Ok(ModelFiles {
        root: checkpoint
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        layout: ModelLayout::SingleFile { checkpoint },
        vae_replacement: None,
        loras: Vec::new(),
        source: ModelSource::LocalFolder,
    })
}

/// `path` when it is a `.safetensors` file; a pickle file or anything else is refused.
fn check_safetensors_file(path: &Path) -> Result<PathBuf, ModelFilesError> {
    let extension = path.to_str().and_then(extension_of);
    match extension.as_deref() {
        Some("safetensors") => Ok(path.to_path_buf()),
        Some(ext) if PICKLE_EXTENSIONS.contains(&ext) => Err(ModelFilesError::PickleCheckpoint {
            path: path.to_path_buf(),
        }),
        _ => Err(ModelFilesError::NotAFolder {
            path: path.to_path_buf(),
        }),
    }
}

/// Finds a replacement VAE (`--vae`): a `.safetensors` file, a diffusers `vae/` folder
/// (`config.json` and weights), or a folder that holds one.
pub fn locate_vae(path: &Path) -> Result<VaeFiles, ModelFilesError> {
    if path.is_file() {
        return Ok(VaeFiles::File {
            weights: check_safetensors_file(path)?,
        });
    }
    if !path.is_dir() {
        return Err(ModelFilesError::VaeNotFound {
            path: path.to_path_buf(),
        });
    }
    let folder = if path.join("config.json").is_file() {
        path.to_path_buf()
    } else if path.join(VAE.config).is_file() {
        path.join(VAE.dir)
    } else {
        return Err(ModelFilesError::MissingFile {
            location: format!("the VAE folder {}", path.display()),
            file: "config.json (or vae/config.json)".to_owned(),
        });
    };
    let files = FolderFiles(&folder);
    let component = Component {
        dir: "",
        config: "config.json",
        weights_stem: "diffusion_pytorch_model",
        ..VAE
    };
    let location = format!("the VAE folder {}", folder.display());
    let weights = choose_weights(&files, &component, WeightsPreference::Full, &location)?;
    Ok(VaeFiles::Folder {
        config: folder.join("config.json"),
        weights: folder.join(weights),
    })
}

/// One model component with its own config and weights.
struct Component {
    name: &'static str,
    dir: &'static str,
    config: &'static str,
    /// Weights path without `.safetensors` / `.fp16.safetensors`.
    weights_stem: &'static str,
}

const UNET: Component = Component {
    name: "UNet",
    dir: "unet",
    config: "unet/config.json",
    weights_stem: "unet/diffusion_pytorch_model",
};
const VAE: Component = Component {
    name: "VAE",
    dir: "vae",
    config: "vae/config.json",
    weights_stem: "vae/diffusion_pytorch_model",
};
const TEXT_ENCODER: Component = Component {
    name: "text encoder",
    dir: "text_encoder",
    config: "text_encoder/config.json",
    weights_stem: "text_encoder/model",
};

/// SDXL's second text encoder: its folder's presence makes a diffusers folder SDXL's.
const TEXT_ENCODER_2: Component = Component {
    name: "second text encoder",
    dir: "text_encoder_2",
    config: "text_encoder_2/config.json",
    weights_stem: "text_encoder_2/model",
};

const MODEL_INDEX: &str = "model_index.json";
const TOKENIZER_VOCAB: &str = "tokenizer/vocab.json";
const TOKENIZER_MERGES: &str = "tokenizer/merges.txt";
const TOKENIZER_CONFIG: &str = "tokenizer/tokenizer_config.json";
const SPECIAL_TOKENS_MAP: &str = "tokenizer/special_tokens_map.json";
const TOKENIZER_2_VOCAB: &str = "tokenizer_2/vocab.json";
const TOKENIZER_2_MERGES: &str = "tokenizer_2/merges.txt";
const TOKENIZER_2_CONFIG: &str = "tokenizer_2/tokenizer_config.json";
const SPECIAL_TOKENS_MAP_2: &str = "tokenizer_2/special_tokens_map.json";
const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";

/// Extensions of PyTorch pickle files, which can run code when loaded.
const PICKLE_EXTENSIONS: [&str; 5] = ["bin", "ckpt", "pt", "pth", "pkl"];

/// Extensions of single-file checkpoints people pass by mistake for a folder.
const CHECKPOINT_EXTENSIONS: [&str; 5] = ["safetensors", "ckpt", "pt", "pth", "bin"];

fn extension_of(name: &str) -> Option<String> {
    Path::new(name)
        .extension()
        .and_then(|ext| ext.to_str())
        .map(str::to_ascii_lowercase)
}

fn is_checkpoint_file(path: &Path) -> bool {
    path.is_file()
        && path
            .to_str()
            .and_then(extension_of)
            .is_some_and(|ext| CHECKPOINT_EXTENSIONS.contains(&ext.as_str()))
}

/// `name` inside `dir` ("" for the top level), with '/'.
fn in_dir(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// The files the engine needs, described for a person (used when a cache lookup fails).
pub(crate) fn required_files() -> Vec<String> {
    let mut files = Vec::new();
    for component in [&UNET, &VAE, &TEXT_ENCODER] {
        files.push(component.config.to_owned());
        files.push(format!("{}[.fp16].safetensors", component.weights_stem));
    }
    files.extend([TOKENIZER_VOCAB, TOKENIZER_MERGES, SCHEDULER_CONFIG].map(str::to_owned));
    files
}

/// What files exist, in a folder or in a hub repo's listing. Paths are relative and use '/'.
pub(crate) trait FileSet {
    fn has_file(&self, relative: &str) -> bool;
    /// Names of the files directly inside `dir` ("" for the top level).
    fn files_in(&self, dir: &str) -> Vec<String>;
}

struct FolderFiles<'a>(&'a Path);

impl FileSet for FolderFiles<'_> {
    fn has_file(&self, relative: &str) -> bool {
        self.0.join(relative).is_file()
    }

    fn files_in(&self, dir: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.0.join(dir)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().is_file())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }
}

/// A hub repo's file list (`siblings[].rfilename`).
pub(crate) struct HubFiles {
    files: BTreeSet<String>,
}

impl HubFiles {
    pub(crate) fn new(files: impl IntoIterator<Item = String>) -> Self {
        Self {
            files: files.into_iter().collect(),
        }
    }
}

impl FileSet for HubFiles {
    fn has_file(&self, relative: &str) -> bool {
        self.files.contains(relative)
    }

    fn files_in(&self, dir: &str) -> Vec<String> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        self.files
            .iter()
            .filter_map(|file| file.strip_prefix(&prefix))
            .filter(|name| !name.contains('/'))
            .map(str::to_owned)
            .collect()
    }
}

/// The chosen files, relative to the model root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) unet_config: String,
    pub(crate) unet_weights: String,
    pub(crate) vae_config: String,
    pub(crate) vae_weights: String,
    pub(crate) text_encoder_config: String,
    pub(crate) text_encoder_weights: String,
    pub(crate) tokenizer_vocab: String,
    pub(crate) tokenizer_merges: String,
    pub(crate) tokenizer_config: Option<String>,
    pub(crate) special_tokens_map: Option<String>,
    pub(crate) second_text: Option<SecondTextPlan>,
    pub(crate) scheduler_config: String,
    /// Fetched from the hub so the cached copy is a valid diffusers folder for other tools;
    /// the engine reads only unitune's own key in it.
    pub(crate) model_index: Option<String>,
}

/// SDXL's second text encoder's files, relative to the model root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SecondTextPlan {
    pub(crate) config: String,
    pub(crate) weights: String,
    pub(crate) tokenizer_vocab: String,
    pub(crate) tokenizer_merges: String,
    pub(crate) tokenizer_config: Option<String>,
    pub(crate) special_tokens_map: Option<String>,
}

impl Plan {
    /// Every chosen file, small ones first so a broken repo fails before a big download.
    pub(crate) fn files(&self) -> Vec<&str> {
        let second = self.second_text.as_ref();
        let mut files: Vec<&str> = [
            self.model_index.as_deref(),
            Some(&self.scheduler_config),
            Some(&self.tokenizer_vocab),
            Some(&self.tokenizer_merges),
            self.tokenizer_config.as_deref(),
            self.special_tokens_map.as_deref(),
            second.map(|s| s.tokenizer_vocab.as_str()),
            second.map(|s| s.tokenizer_merges.as_str()),
            second.and_then(|s| s.tokenizer_config.as_deref()),
            second.and_then(|s| s.special_tokens_map.as_deref()),
            Some(&self.text_encoder_config),
            second.map(|s| s.config.as_str()),
            Some(&self.vae_config),
            Some(&self.unet_config),
            Some(&self.text_encoder_weights),
            second.map(|s| s.weights.as_str()),
            Some(&self.vae_weights),
            Some(&self.unet_weights),
        ]
        .into_iter()
        .flatten()
        .collect();
        files.dedup();
        files
    }

    pub(crate) fn into_model_files(self, root: &Path, source: ModelSource) -> ModelFiles {
        let at = |relative: &str| root.join(relative);
        let files = DiffusersFiles {
            unet_config: at(&self.unet_config),
            unet_weights: at(&self.unet_weights),
            vae_config: at(&self.vae_config),
            vae_weights: at(&self.vae_weights),
            text_encoder_config: at(&self.text_encoder_config),
            text_encoder_weights: at(&self.text_encoder_weights),
            tokenizer_vocab: at(&self.tokenizer_vocab),
            tokenizer_merges: at(&self.tokenizer_merges),
            tokenizer_config: self.tokenizer_config.as_deref().map(at),
            special_tokens_map: self.special_tokens_map.as_deref().map(at),
            second_text: self.second_text.as_ref().map(|s| SecondTextFiles {
                config: at(&s.config),
                weights: at(&s.weights),
                tokenizer_vocab: at(&s.tokenizer_vocab),
                tokenizer_merges: at(&s.tokenizer_merges),
                tokenizer_config: s.tokenizer_config.as_deref().map(at),
                special_tokens_map: s.special_tokens_map.as_deref().map(at),
            }),
            scheduler_config: at(&self.scheduler_config),
            model_index: self.model_index.as_deref().map(at),
        };
        ModelFiles {
            root: root.to_path_buf(),
            layout: ModelLayout::Diffusers(Box::new(files)),
            vae_replacement: None,
            source,
            loras: Vec::new(),
        }
    }
}

/// Chooses the files of a model from what `files` holds; `location` names it in errors.
pub(crate) fn plan(
    files: &dyn FileSet,
    preference: WeightsPreference,
    location: &str,
) -> Result<Plan, ModelFilesError> {
    let required = |file: &str| {
        if files.has_file(file) {
            Ok(file.to_owned())
        } else {
            Err(ModelFilesError::MissingFile {
                location: location.to_owned(),
                file: file.to_owned(),
            })
        }
    };
    let optional = |file: &str| files.has_file(file).then(|| file.to_owned());
    let component = |component: &Component| -> Result<(String, String), ModelFilesError> {
        let config = required(component.config)?;
        let weights = choose_weights(files, component, preference, location)?;
        Ok((config, weights))
    };

    let (unet_config, unet_weights) = component(&UNET)?;
    let (vae_config, vae_weights) = component(&VAE)?;
    let (text_encoder_config, text_encoder_weights) = component(&TEXT_ENCODER)?;
    // SDXL: the second encoder's folder, then everything of it is required.
    let second_text = if files.files_in(TEXT_ENCODER_2.dir).is_empty() {
        None
    } else {
        let (config, weights) = component(&TEXT_ENCODER_2)?;
        Some(SecondTextPlan {
            config,
            weights,
            tokenizer_vocab: required(TOKENIZER_2_VOCAB)?,
            tokenizer_merges: required(TOKENIZER_2_MERGES)?,
            tokenizer_config: optional(TOKENIZER_2_CONFIG),
            special_tokens_map: optional(SPECIAL_TOKENS_MAP_2),
        })
    };
    Ok(Plan {
        unet_config,
        unet_weights,
        vae_config,
        vae_weights,
        text_encoder_config,
        text_encoder_weights,
        tokenizer_vocab: required(TOKENIZER_VOCAB)?,
        tokenizer_merges: required(TOKENIZER_MERGES)?,
        tokenizer_config: optional(TOKENIZER_CONFIG),
        special_tokens_map: optional(SPECIAL_TOKENS_MAP),
        second_text,
        scheduler_config: required(SCHEDULER_CONFIG)?,
        model_index: optional(MODEL_INDEX),
    })
}

fn choose_weights(
    files: &dyn FileSet,
    component: &Component,
    preference: WeightsPreference,
    location: &str,
) -> Result<String, ModelFilesError> {
    let full = format!("{}.safetensors", component.weights_stem);
    let fp16 = format!("{}.fp16.safetensors", component.weights_stem);
    let candidates = match preference {
        WeightsPreference::Full => [&full, &fp16],
        WeightsPreference::Fp16 => [&fp16, &full],
    };
    if let Some(found) = candidates.into_iter().find(|file| files.has_file(file)) {
        return Ok(found.clone());
    }

    let present = files.files_in(component.dir);
    let pickles: Vec<String> = present
        .iter()
        .filter(|name| {
            extension_of(name).is_some_and(|ext| PICKLE_EXTENSIONS.contains(&ext.as_str()))
        })
        .map(|name| in_dir(component.dir, name))
        .collect();
    if !pickles.is_empty() {
        return Err(ModelFilesError::PickleOnly {
            location: location.to_owned(),
            component: component.name.to_owned(),
            files: pickles.join(", "),
        });
    }
    let other_weights: Vec<String> = present
        .iter()
        .filter(|name| name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json"))
        .map(|name| in_dir(component.dir, name))
        .collect();
    let found = if other_weights.is_empty() {
        String::new()
    } else {
        format!(
            " (found only {}, which unitune does not read)",
            other_weights.join(", ")
        )
    };
    Err(ModelFilesError::MissingWeights {
        location: location.to_owned(),
        component: component.name.to_owned(),
        looked_for: format!("{full} or {fp16}"),
        found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(extra: &[&str]) -> HubFiles {
        let base = [
            "model_index.json",
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
        ];
        HubFiles::new(base.iter().chain(extra).map(|s| (*s).to_owned()))
    }

    #[test]
    fn hub_listing_prefers_the_requested_weights_and_skips_the_rest() {
        let files = repo(&[
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.fp16.safetensors",
            "safety_checker/model.safetensors",
        ]);
        let plan = plan(&files, WeightsPreference::Fp16, "repo").expect("complete repo");
        assert_eq!(
            plan.unet_weights,
            "unet/diffusion_pytorch_model.fp16.safetensors"
        );
        assert_eq!(plan.vae_weights, "vae/diffusion_pytorch_model.safetensors");
        assert_eq!(
            plan.text_encoder_weights,
            "text_encoder/model.fp16.safetensors"
        );
        assert_eq!(plan.tokenizer_config, None);
        assert_eq!(plan.files().len(), 10);
        assert!(!plan.files().iter().any(|f| f.starts_with("safety_checker")));
    }

    #[test]
    fn nested_files_are_not_taken_for_a_components_own() {
        let files = repo(&["unet/sub/diffusion_pytorch_model.bin"]);
        assert_eq!(files.files_in("unet"), vec!["config.json".to_owned()]);
        let err = plan(&files, WeightsPreference::Full, "repo").expect_err("no unet weights");
        assert!(
            matches!(err, ModelFilesError::MissingWeights { .. }),
            "{err}"
        );
    }

    #[test]
    fn other_safetensors_are_named_when_weights_are_missing() {
        let files = repo(&["unet/diffusion_pytorch_model.non_ema.safetensors"]);
        let err = plan(&files, WeightsPreference::Full, "repo").expect_err("no unet weights");
        let message = err.to_string();
        assert!(message.contains("non_ema"), "{message}");
    }

    #[test]
    fn required_files_name_every_component() {
        let described = required_files().join(" ");
        for needed in [
            "unet/config.json",
            "vae/",
            "text_encoder/",
            "vocab.json",
            "scheduler",
        ] {
            assert!(
                described.contains(needed),
                "{needed} missing from {described}"
            );
        }
    }
}
