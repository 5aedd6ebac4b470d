//! What the UNet is conditioned on besides the noisy latents and the timestep, for a batch:
//! the text context and, for SDXL, the pooled text embedding and the size numbers
//! (`TextTime`). Every caller that runs the UNet (sampling, the region, fine-tuning, the
//! bench) builds one with [`super::StableDiffusion::condition`] and calls [`Conditioning::predict`],
//! so an SDXL model cannot be run without its added conditioning.

use candle_core::{DType, Tensor};

use super::error::Result;
use super::unet::{TextTime, UNet};

#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[batch, tokens, width]`.
    pub context: Tensor,
    /// SDXL's added conditioning; `None` for SD 1.x and 2.x.
    pub text_time: Option<TextTime>,
}

impl Conditioning {
    /// A text context alone (SD 1.x and 2.x, whose UNets take nothing else).
    pub fn context_only(context: Tensor) -> Self {
        Self {
            context,
            text_time: None,
        }
    }

    /// The batch's rows in order: `parts` stacked along the batch (with SDXL's added
    /// conditioning when every part has it).
    pub fn cat(parts: &[&Conditioning]) -> Result<Self> {
        let contexts: Vec<&Tensor> = parts.iter().map(|c| &c.context).collect();
        let added: Option<Vec<&TextTime>> = parts.iter().map(|c| c.text_time.as_ref()).collect();
        let text_time = match added {
            Some(added) if !added.is_empty() => {
                let pooled: Vec<&Tensor> = added.iter().map(|t| &t.pooled).collect();
                let sizes: Vec<&Tensor> = added.iter().map(|t| &t.size_numbers).collect();
                Some(TextTime {
                    pooled: Tensor::cat(&pooled, 0)?,
                    size_numbers: Tensor::cat(&sizes, 0)?,
                })
            }
            _ => None,
        };
        Ok(Self {
            context: Tensor::cat(&contexts, 0)?,
            text_time,
        })
    }

    /// Each row `n` times (a batch of one prompt).
    pub fn repeat(&self, n: usize) -> Result<Self> {
        self.map(|t| Tensor::cat(&vec![t; n], 0))
    }

    /// Rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.map(|t| t.narrow(0, start, len))
    }

    /// In another dtype (the UNet's).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        self.map(|t| t.to_dtype(dtype))
    }

    /// The UNet's output for `sample` at `timesteps` under this conditioning.
    pub fn predict(&self, unet: &UNet, sample: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        Ok(unet.forward_with(sample, timesteps, &self.context, self.text_time.as_ref())?)
    }

    /// `f` applied to every tensor (all are batch-first).
    fn map(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        Ok(Self {
            context: f(&self.context)?,
            text_time: match &self.text_time {
                Some(t) => Some(TextTime {
                    pooled: f(&t.pooled)?,
                    size_numbers: f(&t.size_numbers)?,
                }),
                None => None,
            },
        })
    }
}
