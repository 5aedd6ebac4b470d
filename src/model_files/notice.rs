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

/// GPU memory from which SDXL is suggested before SD 1.5: a 12 GB card (which reports a little
/// under 12 GiB) holds SDXL's UNet in half precision and trains it in the lighter modes.
pub const SDXL_SUGGESTED_GPU_BYTES: u64 = 11 << 30;

/// Whether to suggest SDXL first to someone whose model would run on a GPU with `gpu_bytes`
/// (`None`: the CPU, or a device that cannot tell, where SD 1.5 is the practical choice).
pub fn suggests_sdxl(gpu_bytes: Option<u64>) -> bool {
    gpu_bytes.is_some_and(|bytes| bytes >= SDXL_SUGGESTED_GPU_BYTES)
}

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

    /// A 12 GB card (reported as 12 GiB, or a little less once the driver takes its share)
    /// is steered to SDXL; an 8 GB card, the CPU and an unknown device are not.
    #[test]
    fn sdxl_is_suggested_from_a_12_gb_card() {
        const GIB: u64 = 1 << 30;
        assert!(suggests_sdxl(Some(12 * GIB)));
        assert!(suggests_sdxl(Some(11 * GIB + GIB / 2)));
        assert!(suggests_sdxl(Some(80 * GIB)));
        assert!(!suggests_sdxl(Some(8 * GIB)));
        assert!(!suggests_sdxl(Some(10 * GIB)));
        assert!(!suggests_sdxl(None));
    }
}
