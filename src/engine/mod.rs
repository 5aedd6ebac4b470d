//! The diffusion engine: candle only. Model configs and loading, the project's own
//! differentiable UNet, the VAE and text encoder, the noise schedule and sampling.
//! No threads, no channels, no GUI types.

pub mod autograd;
pub mod conditioning;
pub mod config;
pub mod device;
pub mod edit;
pub mod error;
pub mod fidelity;
pub mod finetune;
pub mod finite;
pub mod instruct;
pub mod layers;
pub mod lora;
pub mod memory;
pub mod model;
pub mod noise;
pub mod optim;
pub mod precision;
pub mod preview;
pub mod random_model;
pub mod region;
pub mod rounding;
pub mod sampling;
pub mod scheduler;
pub mod single_file;
pub mod taesd;
pub mod text_encoder;
pub mod tokenizer;
pub mod transformer;
pub mod unet;
pub mod vae;

pub use error::{EngineError, Result};
pub use model::StableDiffusion;
