//! What a user should know before downloading a model: its license and its size.

use super::spec::{DEFAULT_MODEL, ModelSpec};

/// The download size of the default model's fp16 files (UNet 1.72 GB, text encoder 0.25 GB,
/// VAE 0.17 GB, plus small configs), for the editor's "Download (about 2.1 GB)". The hub's
/// file list carries no sizes, so other models' sizes are known only as files start.
pub const DEFAULT_MODEL_DOWNLOAD_BYTES: u64 = 2_140_000_000;

/// Stable Diffusion XL base, what people download for SDXL.
pub const SDXL_MODEL: &str = "stabilityai/stable-diffusion-xl-base-1.0";

/// The download size of SDXL base's fp16 files (UNet 5.14 GB, OpenCLIP bigG 1.39 GB, CLIP
/// 0.25 GB, VAE 0.17 GB, plus small configs).
pub const SDXL_MODEL_DOWNLOAD_BYTES: u64 = 6_950_000_000;

/// The license a user accepts by downloading this model, when we know it.
pub fn license_notice(spec: &ModelSpec) -> Option<&'static str> {
    match spec {
        ModelSpec::Hub { repo_id, .. } if repo_id == DEFAULT_MODEL => Some(include_str!(
            "../../assets/notices/stable-diffusion-v1-5.txt"
        )),
        ModelSpec::Hub { repo_id, .. } if repo_id == SDXL_MODEL => Some(include_str!(
            "../../assets/notices/stable-diffusion-xl-base-1.0.txt"
        )),
        ModelSpec::Hub { .. } => Some(
            "This model comes with its own license; read its model card on the hub before use.\n",
        ),
        ModelSpec::Folder(_) | ModelSpec::Demo => None,
    }
}

/// About how many bytes downloading `spec` takes, when known in advance.
pub fn approximate_download_bytes(spec: &ModelSpec) -> Option<u64> {
    match spec {
        ModelSpec::Hub { repo_id, .. } if repo_id == DEFAULT_MODEL => {
            Some(DEFAULT_MODEL_DOWNLOAD_BYTES)
        }
        ModelSpec::Hub { repo_id, .. } if repo_id == SDXL_MODEL => Some(SDXL_MODEL_DOWNLOAD_BYTES),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The models people download first say their license and size before anything is
    /// fetched; another hub model says to read its card, a local one says nothing.
    #[test]
    fn known_models_name_their_license_and_size() {
        let hub = |id: &str| ModelSpec::hub(id);
        let sd = license_notice(&hub(DEFAULT_MODEL)).unwrap();
        assert!(sd.contains("CreativeML OpenRAIL-M"), "{sd}");
        let xl = license_notice(&hub(SDXL_MODEL)).unwrap();
        assert!(
            xl.contains("Open RAIL++-M") && xl.contains(SDXL_MODEL),
            "{xl}"
        );
        assert!(
            license_notice(&hub("someone/model"))
                .unwrap()
                .contains("model card")
        );
        assert_eq!(license_notice(&ModelSpec::Demo), None);
        assert_eq!(
            approximate_download_bytes(&hub(SDXL_MODEL)),
            Some(SDXL_MODEL_DOWNLOAD_BYTES)
        );
        assert_eq!(approximate_download_bytes(&hub("someone/model")), None);
    }
}
