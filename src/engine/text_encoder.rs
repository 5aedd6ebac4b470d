//! The CLIP text transformer (transformers `CLIPTextModel`), returning the last hidden state
//! after the final LayerNorm, which is what Stable Diffusion 1.x and 2.x condition on, or
//! (for SDXL's two encoders, [`TextEncoder::encode_xl`]) the penultimate layer's hidden states
//! and the projected end-of-text state (`CLIPTextModelWithProjection`).
//!
//! Our own rather than candle-transformers': its public CLIP supports only quick-GELU (SD 2.x
//! uses exact GELU) and its Stable Diffusion CLIP config cannot be built from a config file.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::{TextActivation, TextEncoderConfig};
use super::layers::{LayerNorm, Linear, linear, linear_no_bias};

/// CLIP's end-of-text token: the state at its first occurrence is the pooled embedding.
const END_OF_TEXT: u32 = 49407;

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug, Clone)]
pub struct TextEncoder {
    config: TextEncoderConfig,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `text_projection` (`CLIPTextModelWithProjection`, SDXL's second encoder).
    projection: Option<Linear>,
}

/// What SDXL reads from one text encoder.
#[derive(Debug, Clone)]
pub struct XlTextOutput {
    /// The penultimate layer's hidden states, before the final LayerNorm,
    /// `[batch, seq, hidden]` (diffusers' `hidden_states[-2]`).
    pub penultimate: Tensor,
    /// The projected end-of-text state after the final LayerNorm, `[batch, projection_dim]`;
    /// `None` for an encoder without a projection.
    pub pooled: Option<Tensor>,
}

impl TextEncoder {
    /// [`Self::new`] with `text_projection` (`hidden_size` to `projection_dim`, no bias) at the
    /// checkpoint root, as SDXL's second encoder has it.
    pub fn with_projection(
        config: &TextEncoderConfig,
        projection_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let projection =
            linear_no_bias(config.hidden_size, projection_dim, vb.pp("text_projection"))?;
        Ok(Self {
            projection: Some(projection),
            ..Self::new(config, vb)?
        })
    }

    /// `vb` points at the checkpoint root; weights live under `text_model.`.
    pub fn new(config: &TextEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let c = config;
        let vb = vb.pp("text_model");
        let h = c.hidden_size;
        let eps = c.layer_norm_eps;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layers.{i}"));
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::new(h, eps, vb.pp("layer_norm1"))?,
                    q_proj: linear(h, h, vb.pp("self_attn.q_proj"))?,
                    k_proj: linear(h, h, vb.pp("self_attn.k_proj"))?,
                    v_proj: linear(h, h, vb.pp("self_attn.v_proj"))?,
                    out_proj: linear(h, h, vb.pp("self_attn.out_proj"))?,
                    layer_norm2: LayerNorm::new(h, eps, vb.pp("layer_norm2"))?,
                    fc1: linear(h, c.intermediate_size, vb.pp("mlp.fc1"))?,
                    fc2: linear(c.intermediate_size, h, vb.pp("mlp.fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: c.clone(),
            token_embedding: candle_nn::embedding(
                c.vocab_size,
                h,
                vb.pp("embeddings.token_embedding"),
            )?,
            position_embedding: vb
                .pp("embeddings.position_embedding")
                .get((c.max_position_embeddings, h), "weight")?,
            layers,
            final_layer_norm: LayerNorm::new(h, eps, vb.pp("final_layer_norm"))?,
            projection: None,
        })
    }

    pub fn config(&self) -> &TextEncoderConfig {
        &self.config
    }

    fn activation(&self, x: &Tensor) -> Result<Tensor> {
        match self.config.activation {
            TextActivation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            TextActivation::Gelu => x.gelu_erf(),
            TextActivation::GeluTanh => x.gelu(),
        }
    }

    /// Token ids `[batch, seq]` (u32) to hidden states `[batch, seq, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, last) = self.layers_output(ids)?;
        self.final_layer_norm.forward(&last)
    }

    /// The pooled embedding's width, for an encoder with a projection.
    pub fn projection_dim(&self) -> Option<usize> {
        self.projection
            .as_ref()
            .and_then(|p| p.weight().dim(0).ok())
    }

    /// SDXL's reading of token ids `[batch, seq]`: see [`XlTextOutput`].
    pub fn encode_xl(&self, ids: &Tensor) -> Result<XlTextOutput> {
        let (penultimate, last) = self.layers_output(ids)?;
        let pooled = match &self.projection {
            Some(projection) => {
                let normed = self.final_layer_norm.forward(&last)?;
                let ends = end_of_text_positions(ids)?;
                let rows = ends
                    .iter()
                    .enumerate()
                    .map(|(b, &end)| normed.get(b)?.get(end))
                    .collect::<Result<Vec<_>>>()?;
                Some(projection.forward(&Tensor::stack(&rows, 0)?)?)
            }
            None => None,
        };
        Ok(XlTextOutput {
            penultimate,
            pooled,
        })
    }

    /// The hidden states entering the last layer and leaving it, before the final LayerNorm.
    fn layers_output(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (batch, seq) = ids.dims2()?;
        let heads = self.config.num_attention_heads;
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&positions)?;
        let mask = causal_mask(seq, x.dtype(), x.device())?;
        let mut penultimate = x.clone();
        for layer in &self.layers {
            penultimate = x.clone();
            let residual = x.clone();
            let normed = layer.layer_norm1.forward(&x)?;
            let q = layer.q_proj.forward(&normed)?;
            let k = layer.k_proj.forward(&normed)?;
            let v = layer.v_proj.forward(&normed)?;
            let attended = masked_attention(&q, &k, &v, heads, &mask, batch)?;
            x = (layer.out_proj.forward(&attended)? + residual)?;
            let residual = x.clone();
            let normed = layer.layer_norm2.forward(&x)?;
            let hidden = self.activation(&layer.fc1.forward(&normed)?)?;
            x = (layer.fc2.forward(&hidden)? + residual)?;
        }
        Ok((penultimate, x))
    }
}

/// Each row's first end-of-text token (transformers' pooling for a tokenizer whose padding is
/// not end-of-text, as SDXL's second; with end-of-text padding it is the same position).
fn end_of_text_positions(ids: &Tensor) -> Result<Vec<usize>> {
    ids.to_dtype(DType::U32)?
        .to_vec2::<u32>()?
        .iter()
        .map(|row| {
            row.iter().position(|&id| id == END_OF_TEXT).ok_or_else(|| {
                candle_core::Error::Msg("a prompt's tokens have no end-of-text token".into())
            })
        })
        .collect()
}

/// `[seq, seq]` with -inf above the diagonal: each token sees only itself and earlier ones.
fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (seq, seq), device)?.to_dtype(dtype)
}

fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: &Tensor,
    batch: usize,
) -> Result<Tensor> {
    let (_, seq, inner) = q.dims3()?;
    let head_dim = inner / heads;
    let split = |t: &Tensor| -> Result<Tensor> {
        t.reshape((batch, seq, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (split(q)? * scale)?
        .matmul(&split(k)?.t()?)?
        .broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs
        .matmul(&split(v)?)?
        .transpose(1, 2)?
        .reshape((batch, seq, inner))
}
