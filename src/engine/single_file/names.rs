//! Where each tensor the engine asks for by its diffusers name lies in a file: the same name
//! (a diffusers file, perhaps under a prefix), or the original LDM layout's name, part of a
//! fused tensor (OpenCLIP's `in_proj`), or a 1x1 convolution standing for a linear layer
//! (the LDM VAE's attention). The maps are those of diffusers'
//! `convert_diffusers_to_original_stable_diffusion.py`, read the other way and generalised
//! to any number of levels and layers.

/// Where one diffusers-named tensor lies in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    /// The tensor's name in the file.
    pub name: String,
    /// `Some(i)`: the i-th of three equal row blocks of a fused q/k/v tensor.
    pub part: Option<usize>,
    /// Stored as a `[out, in, 1, 1]` convolution, used as a `[out, in]` linear weight.
    pub conv_1x1: bool,
    /// Stored as `[in, out]` (a matrix multiplied from the right, OpenCLIP's
    /// `text_projection`), used as a `[out, in]` linear weight.
    pub transposed: bool,
}

impl Source {
    fn plain(name: String) -> Self {
        Self {
            name,
            part: None,
            conv_1x1: false,
            transposed: false,
        }
    }
}

/// How one component's diffusers names translate into the file's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Naming {
    /// Diffusers names under a prefix ("" for a diffusers component file; SD 1.x
    /// checkpoints keep OpenAI CLIP's transformers names under `cond_stage_model.transformer.`).
    Diffusers { prefix: String },
    /// The LDM UNet (`input_blocks`, `middle_block`, `output_blocks`).
    LdmUnet(UnetLayout),
    /// The LDM autoencoder (`encoder.down.N.block.M`, `decoder.up.N...`, `mid.attn_1`), whose
    /// decoder levels are numbered from the lowest resolution up: `levels` is needed.
    LdmVae { prefix: String, levels: usize },
    /// OpenCLIP's text tower (SD 2.x): `transformer.resblocks.N`, fused q/k/v.
    OpenClip { prefix: String },
    /// Diffusers names without a leading `strip`: transformers 5 saves `CLIPTextModel`
    /// without the `text_model.` its earlier versions (and every SD checkpoint) write.
    Unprefixed { strip: String },
}

/// The LDM UNet's block numbering, which depends on the architecture: `(diffusers prefix,
/// LDM prefix)` for every resnet, attention and resampler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    prefix: String,
    blocks: Vec<(String, String)>,
}

/// The UNet's fixed names, diffusers to LDM (SDXL's `add_embedding` is SGM's `label_emb`).
const UNET_TOP: [(&str, &str); 14] = [
    ("time_embedding.linear_1.weight", "time_embed.0.weight"),
    ("time_embedding.linear_1.bias", "time_embed.0.bias"),
    ("time_embedding.linear_2.weight", "time_embed.2.weight"),
    ("time_embedding.linear_2.bias", "time_embed.2.bias"),
    ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
    ("add_embedding.linear_1.bias", "label_emb.0.0.bias"),
    ("add_embedding.linear_2.weight", "label_emb.0.2.weight"),
    ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ("conv_in.weight", "input_blocks.0.0.weight"),
    ("conv_in.bias", "input_blocks.0.0.bias"),
    ("conv_norm_out.weight", "out.0.weight"),
    ("conv_norm_out.bias", "out.0.bias"),
    ("conv_out.weight", "out.2.weight"),
    ("conv_out.bias", "out.2.bias"),
];

/// A UNet resnet's parts, diffusers to LDM.
const UNET_RESNET: [(&str, &str); 6] = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
];

impl UnetLayout {
    /// The numbering for `levels[i] = (resnets per down block, has attention)`; up blocks
    /// mirror the down blocks with one resnet more, the mid block has attention.
    pub fn new(prefix: &str, levels: &[(usize, bool)]) -> Self {
        let mut blocks = Vec::new();
        let mut pair = |diffusers: String, ldm: String| blocks.push((diffusers, ldm));
        let n = levels.len();
        let mut k = 1;
        for (i, &(layers, attention)) in levels.iter().enumerate() {
            for j in 0..layers {
                pair(
                    format!("down_blocks.{i}.resnets.{j}."),
                    format!("input_blocks.{k}.0."),
                );
                if attention {
                    pair(
                        format!("down_blocks.{i}.attentions.{j}."),
                        format!("input_blocks.{k}.1."),
                    );
                }
                k += 1;
            }
            if i + 1 < n {
                pair(
                    format!("down_blocks.{i}.downsamplers.0.conv."),
                    format!("input_blocks.{k}.0.op."),
                );
                k += 1;
            }
        }
        let mut k = 0;
        for i in 0..n {
            let (layers, attention) = levels[n - 1 - i];
            for j in 0..=layers {
                pair(
                    format!("up_blocks.{i}.resnets.{j}."),
                    format!("output_blocks.{k}.0."),
                );
                if attention {
                    pair(
                        format!("up_blocks.{i}.attentions.{j}."),
                        format!("output_blocks.{k}.1."),
                    );
                }
                if j == layers && i + 1 < n {
                    let slot = if attention { 2 } else { 1 };
                    pair(
                        format!("up_blocks.{i}.upsamplers.0."),
                        format!("output_blocks.{k}.{slot}."),
                    );
                }
                k += 1;
            }
        }
        pair("mid_block.resnets.0.".into(), "middle_block.0.".into());
        pair("mid_block.attentions.0.".into(), "middle_block.1.".into());
        pair("mid_block.resnets.1.".into(), "middle_block.2.".into());
        Self {
            prefix: prefix.to_owned(),
            blocks,
        }
    }

    /// The LDM (SGM) name of the UNet tensor diffusers calls `name`, under this layout's
    /// prefix; `None` when the layout has no place for it.
    pub fn ldm_name(&self, name: &str) -> Option<String> {
        self.source(name).map(|source| source.name)
    }

    fn source(&self, name: &str) -> Option<Source> {
        if let Some((_, ldm)) = UNET_TOP.iter().find(|(d, _)| *d == name) {
            return Some(Source::plain(format!("{}{ldm}", self.prefix)));
        }
        let (diffusers, ldm) = self
            .blocks
            .iter()
            .find(|(diffusers, _)| name.starts_with(diffusers.as_str()))?;
        let rest = &name[diffusers.len()..];
        let rest = if diffusers.contains(".resnets.") {
            replace_start(rest, &UNET_RESNET)?
        } else {
            rest.to_owned()
        };
        Some(Source::plain(format!("{}{ldm}{rest}", self.prefix)))
    }
}

/// `rest` with its leading part renamed by the first pair that matches.
fn replace_start(rest: &str, pairs: &[(&str, &str)]) -> Option<String> {
    pairs
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|tail| format!("{to}{tail}")))
}

/// The LDM VAE attention's parts; diffusers' old names (query, key...) are accepted too.
const VAE_ATTENTION: [(&str, &str); 9] = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("query.", "q."),
    ("to_k.", "k."),
    ("key.", "k."),
    ("to_v.", "v."),
    ("value.", "v."),
    ("to_out.0.", "proj_out."),
    ("proj_attn.", "proj_out."),
];

fn ldm_vae_source(prefix: &str, levels: usize, name: &str) -> Option<Source> {
    let (half, rest) = name.split_once('.')?;
    if !matches!(half, "encoder" | "decoder") {
        // conv_in/quant_conv/post_quant_conv keep their names.
        return Some(Source::plain(format!("{prefix}{name}")));
    }
    let renamed = |ldm: String| Some(Source::plain(format!("{prefix}{half}.{ldm}")));
    if let Some(rest) = rest.strip_prefix("mid_block.") {
        if let Some(tail) = rest.strip_prefix("attentions.0.") {
            let part = replace_start(tail, &VAE_ATTENTION)?;
            let conv_1x1 = tail.ends_with(".weight") && !part.starts_with("norm.");
            return Some(Source {
                name: format!("{prefix}{half}.mid.attn_1.{part}"),
                part: None,
                conv_1x1,
                transposed: false,
            });
        }
        let (index, tail) = rest.strip_prefix("resnets.")?.split_once('.')?;
        let block = index.parse::<usize>().ok()? + 1;
        return renamed(format!("mid.block_{block}.{}", vae_resnet_part(tail)));
    }
    if let Some(tail) = rest.strip_prefix("conv_norm_out.") {
        return renamed(format!("norm_out.{tail}"));
    }
    let blocks = if half == "encoder" {
        "down_blocks."
    } else {
        "up_blocks."
    };
    let Some(rest) = rest.strip_prefix(blocks) else {
        return renamed(rest.to_owned());
    };
    let (index, tail) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let (level, name) = if half == "encoder" {
        (index, "down")
    } else {
        (levels.checked_sub(index + 1)?, "up")
    };
    if let Some(tail) = tail.strip_prefix("resnets.") {
        let (j, tail) = tail.split_once('.')?;
        return renamed(format!(
            "{name}.{level}.block.{j}.{}",
            vae_resnet_part(tail)
        ));
    }
    let resampler = if half == "encoder" {
        "downsample"
    } else {
        "upsample"
    };
    let tail = tail
        .strip_prefix("downsamplers.0.")
        .or_else(|| tail.strip_prefix("upsamplers.0."))?;
    renamed(format!("{name}.{level}.{resampler}.{tail}"))
}

fn vae_resnet_part(tail: &str) -> String {
    replace_start(tail, &[("conv_shortcut.", "nin_shortcut.")]).unwrap_or_else(|| tail.to_owned())
}

/// OpenCLIP's names for the parts of one transformer layer, diffusers to LDM.
const OPEN_CLIP_LAYER: [(&str, &str); 6] = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("", ""),
];

fn open_clip_source(prefix: &str, name: &str) -> Option<Source> {
    // SDXL's second encoder (`CLIPTextModelWithProjection`) projects its pooled state.
    if name == "text_projection.weight" {
        return Some(Source {
            transposed: true,
            ..Source::plain(format!("{prefix}text_projection"))
        });
    }
    let name = name.strip_prefix("text_model.")?;
    let plain = |ldm: String| Some(Source::plain(format!("{prefix}{ldm}")));
    match name {
        "embeddings.token_embedding.weight" => return plain("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return plain("positional_embedding".into()),
        _ => {}
    }
    if let Some(tail) = name.strip_prefix("final_layer_norm.") {
        return plain(format!("ln_final.{tail}"));
    }
    let (layer, tail) = name.strip_prefix("encoder.layers.")?.split_once('.')?;
    let block = format!("transformer.resblocks.{layer}.");
    if let Some(projection) = tail.strip_prefix("self_attn.") {
        let (which, kind) = projection.split_once("_proj.")?;
        if let Some(part) = ["q", "k", "v"].iter().position(|q| *q == which) {
            return Some(Source {
                name: format!("{prefix}{block}attn.in_proj_{kind}"),
                part: Some(part),
                conv_1x1: false,
                transposed: false,
            });
        }
    }
    let tail = replace_start(tail, &OPEN_CLIP_LAYER[..5])?;
    plain(format!("{block}{tail}"))
}

impl Naming {
    /// Where the tensor the engine calls `name` lies in the file; `None` when this layout has
    /// no place for it.
    pub(crate) fn source(&self, name: &str) -> Option<Source> {
        match self {
            Naming::Diffusers { prefix } => Some(Source::plain(format!("{prefix}{name}"))),
            Naming::LdmUnet(layout) => layout.source(name),
            Naming::LdmVae { prefix, levels } => ldm_vae_source(prefix, *levels, name),
            Naming::OpenClip { prefix } => open_clip_source(prefix, name),
            Naming::Unprefixed { strip } => name
                .strip_prefix(strip.as_str())
                .map(|rest| Source::plain(rest.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(naming: &Naming, diffusers: &str) -> String {
        naming.source(diffusers).expect(diffusers).name
    }

    #[test]
    fn sd15_unet_names_follow_diffusers_conversion_table() {
        // SD 1.5: 4 levels of 2 resnets, the last without attention.
        let layout = UnetLayout::new(
            "model.diffusion_model.",
            &[(2, true), (2, true), (2, true), (2, false)],
        );
        let unet = Naming::LdmUnet(layout);
        for (diffusers, ldm) in [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.1.attentions.0.proj_in.weight",
                "input_blocks.4.1.proj_in.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.bias",
                "input_blocks.9.0.op.bias",
            ),
            (
                "down_blocks.3.resnets.1.conv2.weight",
                "input_blocks.11.0.out_layers.3.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "middle_block.2.emb_layers.1.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            (
                "up_blocks.3.resnets.2.conv_shortcut.weight",
                "output_blocks.11.0.skip_connection.weight",
            ),
            (
                "up_blocks.3.attentions.2.norm.bias",
                "output_blocks.11.1.norm.bias",
            ),
            ("conv_out.bias", "out.2.bias"),
        ] {
            assert_eq!(
                name(&unet, diffusers),
                format!("model.diffusion_model.{ldm}")
            );
        }
    }

    #[test]
    fn ldm_vae_names_reverse_the_decoder_levels_and_flatten_attention() {
        let vae = Naming::LdmVae {
            prefix: "first_stage_model.".into(),
            levels: 4,
        };
        for (diffusers, ldm) in [
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.2.downsamplers.0.conv.weight",
                "encoder.down.2.downsample.conv.weight",
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv1.bias",
                "decoder.up.3.block.2.conv1.bias",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
            ),
            (
                "decoder.mid_block.resnets.1.norm2.weight",
                "decoder.mid.block_2.norm2.weight",
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.weight",
                "encoder.mid.attn_1.norm.weight",
            ),
            ("encoder.conv_norm_out.bias", "encoder.norm_out.bias"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ] {
            assert_eq!(name(&vae, diffusers), format!("first_stage_model.{ldm}"));
        }
        let q = vae
            .source("decoder.mid_block.attentions.0.to_q.weight")
            .expect("q");
        assert_eq!(q.name, "first_stage_model.decoder.mid.attn_1.q.weight");
        assert!(q.conv_1x1);
        let bias = vae
            .source("decoder.mid_block.attentions.0.to_out.0.bias")
            .expect("bias");
        assert_eq!(
            bias.name,
            "first_stage_model.decoder.mid.attn_1.proj_out.bias"
        );
        assert!(!bias.conv_1x1);
    }

    #[test]
    fn open_clip_splits_fused_projections() {
        let text = Naming::OpenClip {
            prefix: "cond_stage_model.model.".into(),
        };
        let k = text
            .source("text_model.encoder.layers.3.self_attn.k_proj.bias")
            .expect("k");
        assert_eq!(
            k.name,
            "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_bias"
        );
        assert_eq!(k.part, Some(1));
        for (diffusers, ldm) in [
            (
                "text_model.embeddings.position_embedding.weight",
                "positional_embedding",
            ),
            ("text_model.final_layer_norm.weight", "ln_final.weight"),
            (
                "text_model.encoder.layers.0.mlp.fc2.bias",
                "transformer.resblocks.0.mlp.c_proj.bias",
            ),
            (
                "text_model.encoder.layers.0.self_attn.out_proj.weight",
                "transformer.resblocks.0.attn.out_proj.weight",
            ),
        ] {
            assert_eq!(
                name(&text, diffusers),
                format!("cond_stage_model.model.{ldm}")
            );
        }
    }
}
