//! The CLIP text transformer (transformers `CLIPTextModel`), returning the last hidden state
//! after the final LayerNorm, which is what Stable Diffusion 1.x and 2.x condition on.
//!
//! Our own rather than candle-transformers': its public CLIP supports only quick-GELU (SD 2.x
//! uses exact GELU) and its Stable Diffusion CLIP config cannot be built from a config file.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::{TextActivation, TextEncoderConfig};
use super::layers::{LayerNorm, Linear, linear};

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
}

impl TextEncoder {
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
        let (batch, seq) = ids.dims2()?;
        let heads = self.config.num_attention_heads;
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&positions)?;
        let mask = causal_mask(seq, x.dtype(), x.device())?;
        for layer in &self.layers {
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
        self.final_layer_norm.forward(&x)
    }
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
