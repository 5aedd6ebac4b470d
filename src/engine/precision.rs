//! The number format the models compute in.
//!
//! Half precision halves the weights' memory and runs on an NVIDIA card's tensor cores; the
//! parts that need range or resolution stay wider whatever is chosen (statistics of norms and
//! softmax in f32, the optimizer's master weights in f32, and the SD 1.x VAE, which overflows
//! in f16, in f32 when its config says `force_upcast`).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use super::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// bf16 on CUDA cards that have it (compute capability 8.0, Ampere, and newer), f16 on
    /// older CUDA cards and on Metal, f32 on the CPU.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 4] = [Self::Auto, Self::F32, Self::F16, Self::Bf16];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// The dtype the UNet and text encoder compute in on `device`.
    pub fn resolve(self, device: &Device) -> Result<DType> {
        match (self, device) {
            (Self::Auto, Device::Cpu) => Ok(DType::F32),
            (Self::Auto, Device::Metal(_)) => Ok(DType::F16),
            (Self::Auto, Device::Cuda(_)) => Ok(if cuda_has_bf16(device) {
                DType::BF16
            } else {
                DType::F16
            }),
            (Self::F32, _) => Ok(DType::F32),
            (Self::F16, _) => Ok(DType::F16),
            (Self::Bf16, Device::Cpu) => Err(EngineError::InvalidRequest(
                "bf16 is not available on the CPU (its matrix multiply has no bf16 kernel); use --precision f16 or f32".into(),
            )),
            (Self::Bf16, _) => Ok(DType::BF16),
        }
    }
}

/// The name of a compute dtype as recipes and the command line write it.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

#[cfg(feature = "cuda")]
fn cuda_has_bf16(device: &Device) -> bool {
    match device {
        Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 8),
        _ => false,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_has_bf16(_: &Device) -> bool {
    false
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown precision `{s}` (use auto, f32, f16 or bf16)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_gets_f32_by_default_and_refuses_bf16() {
        assert_eq!(Precision::Auto.resolve(&Device::Cpu).unwrap(), DType::F32);
        assert_eq!(Precision::F16.resolve(&Device::Cpu).unwrap(), DType::F16);
        let error = Precision::Bf16.resolve(&Device::Cpu).unwrap_err();
        assert!(error.to_string().contains("f16 or f32"), "{error}");
    }

    #[test]
    fn names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(p.as_str().parse::<Precision>(), Ok(p));
        }
        assert!("fp8".parse::<Precision>().is_err());
    }
}
