//! Which device the engine computes on.

use candle_core::Device;

use super::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA if this build and machine have it, then Metal, then the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

impl DeviceChoice {
    /// The name `--device` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "metal" => Ok(Self::Metal),
            other => Err(format!(
                "unknown device `{other}` (use auto, cpu, cuda or metal)"
            )),
        }
    }
}

/// Opens the chosen device; `Auto` falls back quietly, an explicit choice fails loudly.
pub fn open_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                return Err(EngineError::Device(
                    "CUDA was requested but this build of unitune has no CUDA support; rebuild with `--features cuda` or use --device cpu".into(),
                ));
            }
            Device::new_cuda(0).map_err(|e| {
                EngineError::Device(format!(
                    "no usable CUDA GPU was found ({e}); use --device cpu"
                ))
            })
        }
        DeviceChoice::Metal => {
            if !candle_core::utils::metal_is_available() {
                return Err(EngineError::Device(
                    "Metal was requested but this build of unitune has no Metal support; rebuild on macOS with `--features metal` or use --device cpu".into(),
                ));
            }
            Device::new_metal(0).map_err(|e| {
                EngineError::Device(format!(
                    "no usable Metal GPU was found ({e}); use --device cpu"
                ))
            })
        }
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available()
                && let Ok(device) = Device::new_cuda(0)
            {
                return Ok(device);
            }
            if candle_core::utils::metal_is_available()
                && let Ok(device) = Device::new_metal(0)
            {
                return Ok(device);
            }
            Ok(Device::Cpu)
        }
    }
}

/// A short human name for a device, e.g. `cpu` or `cuda:0`.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda:0".into(),
        Device::Metal(_) => "metal:0".into(),
    }
}
