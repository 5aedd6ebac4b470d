//! Which of the UNet's weights a fine-tune changes.

use std::fmt;
use std::str::FromStr;

/// The LoRA rank when none is given (the editor's, and `--train-mode lora`'s).
pub const DEFAULT_LORA_RANK: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrainMode {
    /// Every UNet weight, as the paper does. The most faithful, the most memory.
    Full,
    /// The self- and cross-attention projections (q, k, v, out) of every transformer block.
    Attention,
    /// Only the cross-attention keys and values, as Custom Diffusion and the public SD port do:
    /// the smallest set that still binds the photo to the prompt.
    CrossKv,
    /// Low-rank adapters on the attention projections; the base weights stay untouched.
    Lora { rank: usize },
}

impl TrainMode {
    /// Whether the loaded UNet weight `name` is trained (LoRA trains new factors instead).
    pub fn trains(&self, name: &str) -> bool {
        match self {
            TrainMode::Full => true,
            TrainMode::Attention => is_attention_projection(name),
            TrainMode::CrossKv => name.contains(".attn2.to_k.") || name.contains(".attn2.to_v."),
            TrainMode::Lora { .. } => false,
        }
    }

    /// For LoRA: the linear layers (weight names) that get an adapter.
    pub fn adapts(&self, name: &str) -> bool {
        matches!(self, TrainMode::Lora { .. })
            && is_attention_projection(name)
            && name.ends_with(".weight")
    }

    pub fn name(&self) -> &'static str {
        match self {
            TrainMode::Full => "full",
            TrainMode::Attention => "attention",
            TrainMode::CrossKv => "cross-kv",
            TrainMode::Lora { .. } => "lora",
        }
    }
}

fn is_attention_projection(name: &str) -> bool {
    (name.contains(".attn1.") || name.contains(".attn2."))
        && [".to_q.", ".to_k.", ".to_v.", ".to_out.0."]
            .iter()
            .any(|p| name.contains(p))
}

impl fmt::Display for TrainMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainMode::Lora { rank } => write!(f, "lora (rank {rank})"),
            other => f.write_str(other.name()),
        }
    }
}

impl FromStr for TrainMode {
    type Err = String;

    /// `full`, `attention`, `cross-kv` or `lora` (rank 4; the CLI sets `--lora-rank`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(TrainMode::Full),
            "attention" => Ok(TrainMode::Attention),
            "cross-kv" | "crosskv" | "cross_kv" => Ok(TrainMode::CrossKv),
            "lora" => Ok(TrainMode::Lora {
                rank: DEFAULT_LORA_RANK,
            }),
            other => Err(format!(
                "unknown training mode `{other}` (use full, attention, cross-kv or lora)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_select_the_documented_weights() {
        let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
        let k2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
        let out = "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias";
        let conv = "down_blocks.0.resnets.0.conv1.weight";
        let norm = "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight";
        assert!(
            [q, k2, out, conv, norm]
                .iter()
                .all(|n| TrainMode::Full.trains(n))
        );
        assert!(TrainMode::Attention.trains(q) && TrainMode::Attention.trains(out));
        assert!(!TrainMode::Attention.trains(conv) && !TrainMode::Attention.trains(norm));
        assert!(TrainMode::CrossKv.trains(k2) && !TrainMode::CrossKv.trains(q));
        let lora = TrainMode::Lora { rank: 4 };
        assert!(!lora.trains(q) && lora.adapts(q) && !lora.adapts(out) && !lora.adapts(conv));
    }

    #[test]
    fn parses_names() {
        assert_eq!("cross-kv".parse::<TrainMode>(), Ok(TrainMode::CrossKv));
        assert!("everything".parse::<TrainMode>().is_err());
    }
}
