//! The UNet's spatial transformer (diffusers `Transformer2DModel` with `BasicTransformerBlock`):
//! self-attention over pixels, cross-attention to the prompt, and a GeGLU feed-forward.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{
    Conv2d, GroupNorm, LayerNorm, Linear, attention, conv2d, geglu, group_norm, linear,
    linear_no_bias,
};

/// A linear layer with an optional low-rank adapter (LoRA, PEFT names `lora_A`/`lora_B`):
/// `y = W x + b + B (A x)`. The adapter is present when the weights provide it, which is how
/// fine-tuning in `lora` mode plugs in without the UNet knowing about training.
#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    base: Linear,
    /// `(A [rank, in], B [out, rank])` as layers: `x -> B (A x)`.
    lora: Option<(Linear, Linear)>,
}

impl AdaptedLinear {
    fn new(base: Linear, vb: &VarBuilder) -> Result<Self> {
        let lora = if vb.contains_tensor("lora_A.weight") {
            Some((
                Linear::from_weight(vb.get_unchecked("lora_A.weight")?),
                Linear::from_weight(vb.get_unchecked("lora_B.weight")?),
            ))
        } else {
            None
        };
        Ok(Self { base, lora })
    }

    fn no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(linear_no_bias(in_dim, out_dim, vb.clone())?, &vb)
    }

    fn with_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(linear(in_dim, out_dim, vb.clone())?, &vb)
    }
}

impl Module for AdaptedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.lora {
            None => Ok(y),
            Some((a, b)) => y + b.forward(&a.forward(x)?)?,
        }
    }
}

/// diffusers `Attention` as used in the UNet: no bias on q/k/v, bias on the output.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    to_q: AdaptedLinear,
    to_k: AdaptedLinear,
    to_v: AdaptedLinear,
    to_out: AdaptedLinear,
    heads: usize,
    upcast: bool,
}

impl CrossAttention {
    /// `context_dim` is `None` for self-attention.
    pub fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        upcast: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: AdaptedLinear::no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: AdaptedLinear::no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: AdaptedLinear::no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: AdaptedLinear::with_bias(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            upcast,
        })
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        self.to_out
            .forward(&attention(&q, &k, &v, self.heads, self.upcast)?)
    }
}

/// GeGLU feed-forward: `net.0.proj` doubles into value and gate, exact-erf GELU on the gate.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&geglu(x, &self.proj_in)?)
    }
}

#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(
        dim: usize,
        heads: usize,
        context_dim: usize,
        upcast: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, None, heads, head_dim, upcast, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(
                dim,
                Some(context_dim),
                heads,
                head_dim,
                upcast,
                vb.pp("attn2"),
            )?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

#[derive(Debug, Clone)]
enum Projection {
    /// SD 1.x: 1x1 convolutions on the image layout.
    Conv(Conv2d),
    /// SD 2.x: linear layers on the token layout.
    Linear(Linear),
}

pub struct SpatialTransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub upcast_attention: bool,
}

/// diffusers `Transformer2DModel` for continuous inputs.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    pub fn new(spec: &SpatialTransformerSpec, vb: VarBuilder) -> Result<Self> {
        let c = spec.channels;
        let projection = |name: &str| -> Result<Projection> {
            Ok(if spec.linear_projection {
                Projection::Linear(linear(c, c, vb.pp(name))?)
            } else {
                Projection::Conv(conv2d(c, c, 1, 1, 0, vb.pp(name))?)
            })
        };
        let blocks = (0..spec.layers)
            .map(|i| {
                TransformerBlock::new(
                    c,
                    spec.heads,
                    spec.context_dim,
                    spec.upcast_attention,
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            // diffusers hard-codes eps 1e-6 here, whatever the UNet's norm_eps.
            norm: group_norm(spec.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let to_image = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let normed = self.norm.forward(x)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
            Projection::Linear(linear) => to_image(&linear.forward(&tokens)?)?,
        };
        out + x
    }
}
