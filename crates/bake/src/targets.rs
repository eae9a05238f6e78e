//! Which checkpoint weight each kohya LoRA module name adapts, read from the checkpoint's own
//! keys (single-file SD1.x / SDXL checkpoints in the original LDM/SGM layout), as kohya's
//! `networks/merge_lora.py` and `sdxl_merge_lora.py` name the modules they merge into:
//!
//! | part | checkpoint key | LoRA name |
//! |---|---|---|
//! | UNet, SD1.x | `model.diffusion_model.input_blocks.1.1.proj_in.weight` | `lora_unet_down_blocks_0_attentions_0_proj_in` (diffusers path) |
//! | UNet, SDXL | `model.diffusion_model.input_blocks.4.1.proj_in.weight` | `lora_unet_input_blocks_4_1_proj_in` (original path) |
//! | CLIP-L, SD1.x | `cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight` | `lora_te_text_model_encoder_layers_0_self_attn_q_proj` |
//! | CLIP-L, SDXL | `conditioner.embedders.0.transformer.text_model...` | `lora_te1_text_model...` |
//! | bigG, SDXL | `conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight` rows `0..d` / `d..2d` / `2d..3d` | `lora_te2_text_model_encoder_layers_0_self_attn_{q,k,v}_proj` |
//!
//! UNet modules are those of kohya's `networks.lora`: in spatial transformers `proj_in`,
//! `proj_out`, `attn{1,2}.to_{q,k,v,out.0}`, `ff.net.{0.proj,2}`; with LoCon the ResNet
//! blocks' `conv1`, `conv2`, `time_emb_proj`, `conv_shortcut` and the samplers' convs. Text
//! encoder modules: `q/k/v/out_proj`, `fc1`, `fc2` of every layer (bigG's `out_proj`,
//! `c_fc`, `c_proj`). SDXL is recognised by its `conditioner.` or `label_emb` keys.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use slider_lora::unet_names::{
    diffusers_path, diffusers_resnet_path, is_locon_module, is_transformer_module,
};

pub const UNET: &str = "model.diffusion_model.";
const SD1_TE: &str = "cond_stage_model.transformer.";
const SDXL_TE1: &str = "conditioner.embedders.0.transformer.";
const SDXL_TE2: &str = "conditioner.embedders.1.model.transformer.resblocks.";

/// The checkpoint weight a LoRA module adapts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Full checkpoint key.
    pub key: String,
    /// Rows of the stored weight the module adapts (`None` = all): bigG's fused q/k/v.
    pub rows: Option<Range<usize>>,
}

/// Every adaptable module of a checkpoint by kohya name; `shapes` are its keys and shapes.
pub fn targets(shapes: &BTreeMap<String, Vec<usize>>) -> BTreeMap<String, Target> {
    let sdxl = shapes.keys().any(|k| {
        k.starts_with("conditioner.") || k.starts_with("model.diffusion_model.label_emb.")
    });
    let per_level = if sdxl { 1 } else { blocks_per_level(shapes) };
    let mut out = BTreeMap::new();
    let whole = |key: &str| Target {
        key: key.to_string(),
        rows: None,
    };
    for (key, shape) in shapes {
        if let Some(path) = key
            .strip_prefix(UNET)
            .and_then(|p| p.strip_suffix(".weight"))
        {
            if !(is_transformer_module(path) || is_locon_module(path)) {
                continue;
            }
            let named = if sdxl {
                Some(path.to_string())
            } else {
                diffusers_resnet_path(path, per_level).or_else(|| diffusers_path(path, per_level))
            };
            if let Some(named) = named {
                out.insert(format!("lora_unet_{}", named.replace('.', "_")), whole(key));
            }
            continue;
        }
        let te = [("lora_te_", SD1_TE), ("lora_te1_", SDXL_TE1)]
            .into_iter()
            .find_map(|(name, prefix)| Some((name, key.strip_prefix(prefix)?)));
        if let Some((name, rest)) = te {
            if let Some(path) = rest.strip_suffix(".weight")
                && is_text_target(path)
            {
                out.insert(format!("{name}{}", path.replace('.', "_")), whole(key));
            }
            continue;
        }
        if let Some(rest) = key.strip_prefix(SDXL_TE2) {
            let Some((layer, leaf)) = rest.split_once('.') else {
                continue;
            };
            if layer.parse::<usize>().is_err() {
                continue;
            }
            let name = |m: &str| format!("lora_te2_text_model_encoder_layers_{layer}_{m}");
            match leaf {
                "attn.in_proj_weight" => {
                    let Some(&rows) = shape.first() else { continue };
                    if rows % 3 != 0 {
                        continue;
                    }
                    let d = rows / 3;
                    for (i, part) in ["q", "k", "v"].into_iter().enumerate() {
                        out.insert(
                            name(&format!("self_attn_{part}_proj")),
                            Target {
                                key: key.clone(),
                                rows: Some(i * d..(i + 1) * d),
                            },
                        );
                    }
                }
                "attn.out_proj.weight" => {
                    out.insert(name("self_attn_out_proj"), whole(key));
                }
                "mlp.c_fc.weight" => {
                    out.insert(name("mlp_fc1"), whole(key));
                }
                "mlp.c_proj.weight" => {
                    out.insert(name("mlp_fc2"), whole(key));
                }
                _ => {}
            }
        }
    }
    out
}

/// `num_res_blocks + 1` of an SD1-family UNet: output blocks per resolution level, where the
/// levels are one more than the downsamplers (`input_blocks.N.0.op`).
fn blocks_per_level(shapes: &BTreeMap<String, Vec<usize>>) -> usize {
    let index = |key: &str, block: &str| -> Option<usize> {
        let rest = key.strip_prefix(UNET)?.strip_prefix(block)?;
        rest.split('.').next()?.parse().ok()
    };
    let outputs: BTreeSet<usize> = shapes
        .keys()
        .filter_map(|k| index(k, "output_blocks."))
        .collect();
    let downsamplers: BTreeSet<usize> = shapes
        .keys()
        .filter(|k| k.contains(".0.op."))
        .filter_map(|k| index(k, "input_blocks."))
        .collect();
    (outputs.len() / (downsamplers.len() + 1)).max(1)
}

fn is_text_target(path: &str) -> bool {
    let parts: Vec<&str> = path.split('.').collect();
    matches!(
        parts.as_slice(),
        ["text_model", "encoder", "layers", n, "self_attn", "q_proj" | "k_proj" | "v_proj" | "out_proj"]
            | ["text_model", "encoder", "layers", n, "mlp", "fc1" | "fc2"]
            if n.parse::<usize>().is_ok()
    )
}
