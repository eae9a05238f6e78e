//! The layers of the model a loader patches, by one canonical name each, with their weight
//! shapes: from the built-in architecture tables, or from a real checkpoint's safetensors
//! header (`--model`), read without its tensor data.
//!
//! Canonical names: `diffusion_model.<LDM / BFL / SAI path>` for UNet and transformer
//! layers (a checkpoint's key without `model.` and `.weight`), `te1.<HF CLIP path>` and
//! `te2.<HF CLIP path>` for the first and second text encoder.

use std::collections::BTreeMap;
use std::path::Path;

use super::sd::{self, CLIP_G, CLIP_L, Clip};
use crate::error::LoraError;
use crate::header;
use crate::transformer::{Layer, Model};

/// A model family lint knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Sd1,
    Sdxl,
    Transformer(Model),
}

impl Family {
    pub fn label(self) -> &'static str {
        match self {
            Family::Sd1 => "SD1.x UNet",
            Family::Sdxl => "SDXL UNet",
            Family::Transformer(m) => m.label(),
        }
    }
}

/// The layers of one model.
#[derive(Debug, Clone)]
pub struct ModelLayers {
    pub family: Family,
    /// Where the layers come from: the built-in tables or a checkpoint file.
    pub source: String,
    /// Canonical name -> weight shape (`[out, in]` or `[out, in, kh, kw]`).
    pub(crate) shapes: BTreeMap<String, Vec<usize>>,
    /// SD UNets: diffusers path -> canonical name.
    pub(crate) unet_diffusers: BTreeMap<String, String>,
    /// Transformers: the layers present, with their diffusers parts.
    pub(crate) transformer: Vec<Layer>,
}

impl ModelLayers {
    /// The built-in tables of `family`.
    pub fn builtin(family: Family) -> ModelLayers {
        let mut shapes = BTreeMap::new();
        let mut unet_diffusers = BTreeMap::new();
        let mut transformer = Vec::new();
        match family {
            Family::Sd1 | Family::Sdxl => {
                for l in sd::unet_layers(family == Family::Sdxl) {
                    let canon = format!("diffusion_model.{}", l.ldm);
                    unet_diffusers.insert(l.diffusers, canon.clone());
                    shapes.insert(canon, l.shape);
                }
                for (te, clip) in encoders(family) {
                    for (path, shape) in sd::clip_layers(clip) {
                        shapes.insert(format!("{te}.{path}"), shape);
                    }
                }
            }
            Family::Transformer(m) => {
                for l in m.layers() {
                    shapes.insert(
                        format!("diffusion_model.{}", l.path),
                        vec![l.out_dim, l.in_dim],
                    );
                    transformer.push(l);
                }
            }
        }
        ModelLayers {
            family,
            source: "built-in architecture tables".into(),
            shapes,
            unet_diffusers,
            transformer,
        }
    }

    /// The layers of the checkpoint at `path`: a single-file SD1.x / SDXL checkpoint in the
    /// original (LDM / sgm) layout, or a FLUX.1 / SD3.5 transformer (bare or under
    /// `model.diffusion_model.`). Only its header is read.
    pub fn from_checkpoint(path: &Path) -> Result<ModelLayers, LoraError> {
        let header = header::read_header(path)?;
        let weights: BTreeMap<&str, &[usize]> = header
            .entries
            .iter()
            .filter(|e| matches!(e.shape.len(), 2 | 4))
            .map(|e| (e.key.as_str(), e.shape.as_slice()))
            .collect();
        let family = detect_checkpoint(&weights).ok_or_else(|| {
            LoraError::InvalidArgument(format!(
                "`{}`: not a checkpoint lint knows (a single-file SD1.x or SDXL checkpoint \
                 in the original layout, or a FLUX.1 / SD3.5 transformer)",
                path.display()
            ))
        })?;
        let builtin = ModelLayers::builtin(family);
        let mut shapes = BTreeMap::new();
        match family {
            Family::Sd1 | Family::Sdxl => {
                for (key, shape) in &weights {
                    if let Some(p) = key
                        .strip_prefix("model.diffusion_model.")
                        .and_then(|k| k.strip_suffix(".weight"))
                    {
                        shapes.insert(format!("diffusion_model.{p}"), shape.to_vec());
                    }
                }
                read_text_encoders(family, &weights, &mut shapes);
            }
            Family::Transformer(_) => {
                for (key, shape) in &weights {
                    let k = key
                        .strip_prefix("model.diffusion_model.")
                        .or_else(|| key.strip_prefix("diffusion_model."))
                        .unwrap_or(key);
                    if let Some(p) = k.strip_suffix(".weight") {
                        shapes.insert(format!("diffusion_model.{p}"), shape.to_vec());
                    }
                }
            }
        }
        // The diffusers <-> LDM names follow the checkpoint's own block structure (a UNet
        // with one ResNet per level numbers its blocks differently from SD1.x).
        let unet_diffusers = match family {
            Family::Sd1 | Family::Sdxl => {
                sd::unet_layers_of(&sd::infer_config(&weights, family == Family::Sdxl))
                    .into_iter()
                    .map(|l| (l.diffusers, format!("diffusion_model.{}", l.ldm)))
                    .filter(|(_, canon)| shapes.contains_key(canon))
                    .collect()
            }
            Family::Transformer(_) => BTreeMap::new(),
        };
        let transformer = builtin
            .transformer
            .into_iter()
            .filter(|l| shapes.contains_key(&format!("diffusion_model.{}", l.path)))
            .collect();
        Ok(ModelLayers {
            family,
            source: format!("checkpoint `{}`", path.display()),
            shapes,
            unet_diffusers,
            transformer,
        })
    }

    /// The weight shape of a canonical layer.
    pub(crate) fn shape(&self, canonical: &str) -> Option<&[usize]> {
        self.shapes.get(canonical).map(Vec::as_slice)
    }
}

/// The text encoders of an SD family: `(canonical prefix, architecture)`.
pub(crate) fn encoders(family: Family) -> Vec<(&'static str, Clip)> {
    match family {
        Family::Sd1 => vec![("te1", CLIP_L)],
        Family::Sdxl => vec![("te1", CLIP_L), ("te2", CLIP_G)],
        Family::Transformer(_) => Vec::new(),
    }
}

fn detect_checkpoint(weights: &BTreeMap<&str, &[usize]>) -> Option<Family> {
    let has = |needle: &str| weights.keys().any(|k| k.contains(needle));
    if has("double_blocks.") {
        return Some(Family::Transformer(Model::Flux));
    }
    if has("joint_blocks.") {
        // SD3.5 Medium's MMDiT-X has a second attention in the image stream.
        let model = if has("x_block.attn2.") {
            Model::Sd35Medium
        } else {
            Model::Sd35Large
        };
        return Some(Family::Transformer(model));
    }
    if !has("model.diffusion_model.input_blocks.") {
        return None;
    }
    if has("conditioner.embedders.1.") || has("model.diffusion_model.label_emb.") {
        Some(Family::Sdxl)
    } else if has("cond_stage_model.transformer.text_model.") {
        Some(Family::Sd1)
    } else {
        None
    }
}

/// The text-encoder layers of a checkpoint, in canonical (HF CLIP) names: SDXL's OpenCLIP
/// encoder's fused `in_proj_weight` gives q, k and v by rows, as loaders split it.
fn read_text_encoders(
    family: Family,
    weights: &BTreeMap<&str, &[usize]>,
    shapes: &mut BTreeMap<String, Vec<usize>>,
) {
    let hf_prefix = match family {
        Family::Sd1 => "cond_stage_model.transformer.",
        _ => "conditioner.embedders.0.transformer.",
    };
    for (key, shape) in weights {
        if let Some(p) = key
            .strip_prefix(hf_prefix)
            .and_then(|k| k.strip_suffix(".weight"))
        {
            shapes.insert(format!("te1.{p}"), shape.to_vec());
        }
    }
    if family != Family::Sdxl {
        return;
    }
    for (key, shape) in weights {
        let Some(rest) = key.strip_prefix("conditioner.embedders.1.model.transformer.resblocks.")
        else {
            continue;
        };
        let Some((i, tail)) = rest.split_once('.') else {
            continue;
        };
        let layer = format!("te2.text_model.encoder.layers.{i}");
        match tail {
            "attn.in_proj_weight" => {
                if let [rows, cols] = shape
                    && rows % 3 == 0
                {
                    for p in ["q_proj", "k_proj", "v_proj"] {
                        shapes.insert(format!("{layer}.self_attn.{p}"), vec![rows / 3, *cols]);
                    }
                }
            }
            "attn.out_proj.weight" => {
                shapes.insert(format!("{layer}.self_attn.out_proj"), shape.to_vec());
            }
            "mlp.c_fc.weight" => {
                shapes.insert(format!("{layer}.mlp.fc1"), shape.to_vec());
            }
            "mlp.c_proj.weight" => {
                shapes.insert(format!("{layer}.mlp.fc2"), shape.to_vec());
            }
            _ => {}
        }
    }
}
