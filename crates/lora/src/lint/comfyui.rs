//! ComfyUI's reading (`comfy/lora.py` `load_lora`, `model_lora_keys_unet`,
//! `model_lora_keys_clip`; `comfy/utils.py` `unet_to_diffusers`, `flux_to_diffusers`,
//! `mmdit_to_diffusers`), our own rules:
//! - a module's factors are found under the first of these suffix pairs that has an up key:
//!   `.lora_up.weight`/`.lora_down.weight`, `_lora.up.weight`/`_lora.down.weight`,
//!   `.lora_B.weight`/`.lora_A.weight`, `.lora.up.weight`/`.lora.down.weight`,
//!   `.lora_linear_layer.up.weight`/`.lora_linear_layer.down.weight`; `.alpha` is read with
//!   `.item()`; keys matched by none are logged "lora key not loaded" and ignored;
//! - SD UNets: a module is a layer as `lora_unet_<LDM path with _>`,
//!   `diffusion_model.<LDM path>`, `lora_unet_<diffusers path with _>`,
//!   `lycoris_<diffusers path with _>`, or `[unet.]<diffusers path>` with attention
//!   projections as `.processor.to_q` ... `.processor.to_out`;
//! - SD text encoders: `lora_te_` / `lora_te1_` (CLIP-L) and `lora_te2_` (SDXL's CLIP-G) +
//!   `text_model_encoder_layers_<i>_<self_attn_q_proj | ... | mlp_fc2>`, or diffusers'
//!   `text_encoder.` / `text_encoder_2.` + the HF path;
//! - FLUX.1 / SD3.5: `lora_unet_<path with _>`, `diffusion_model.<path>`,
//!   `transformer.<diffusers path>`, `lora_transformer_<diffusers path with _>`,
//!   `lycoris_<diffusers path with _>`, (SD3) `base_model.model.<diffusers path>`;
//!   diffusers' q / k / v land on row slices of the fused layer; their text encoders are
//!   listed as not checked;
//! - `up @ down` must have the layer's (or slice's) element count (it is reshaped to it).

use std::collections::{BTreeMap, BTreeSet};

use super::model::{Family, ModelLayers};
use super::{FileView, Findings, Fit, Target, alpha_problem, factor_problem};
use crate::layout;

/// The suffix pairs of `load_lora`, in the order it tries them.
pub(crate) const PAIRS: [(&str, &str); 5] = [
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (
        ".lora_linear_layer.up.weight",
        ".lora_linear_layer.down.weight",
    ),
];

/// ComfyUI's module names of a model's layers.
pub(crate) fn key_map(model: &ModelLayers) -> BTreeMap<String, Target> {
    let mut map = BTreeMap::new();
    match model.family {
        Family::Sd1 | Family::Sdxl => {
            for canon in model.shapes.keys() {
                if let Some(p) = canon.strip_prefix("diffusion_model.") {
                    map.insert(
                        format!("lora_unet_{}", p.replace('.', "_")),
                        Target::whole(canon),
                    );
                    map.insert(canon.clone(), Target::whole(canon));
                }
            }
            for (d, canon) in &model.unet_diffusers {
                let t = Target::whole(canon);
                map.insert(format!("lora_unet_{}", d.replace('.', "_")), t.clone());
                map.insert(format!("lycoris_{}", d.replace('.', "_")), t.clone());
                let mut proc = d.replace(".to_", ".processor.to_");
                if let Some(p) = proc.strip_suffix(".to_out.0") {
                    proc = format!("{p}.to_out");
                }
                map.insert(format!("unet.{proc}"), t.clone());
                map.insert(proc, t);
            }
            let sdxl = model.family == Family::Sdxl;
            for canon in model.shapes.keys() {
                let (kohya, diffusers): (&[&str], &str) =
                    if let Some(p) = canon.strip_prefix("te1.") {
                        (&["lora_te_", "lora_te1_"], p)
                    } else if let Some(p) = canon.strip_prefix("te2.").filter(|_| sdxl) {
                        (&["lora_te2_"], p)
                    } else {
                        continue;
                    };
                let Some(rest) = diffusers.strip_prefix("text_model.encoder.layers.") else {
                    continue;
                };
                for prefix in kohya {
                    map.insert(
                        format!(
                            "{prefix}text_model_encoder_layers_{}",
                            rest.replace('.', "_")
                        ),
                        Target::whole(canon),
                    );
                }
                let hf = if canon.starts_with("te1.") {
                    "text_encoder"
                } else {
                    "text_encoder_2"
                };
                map.insert(format!("{hf}.{diffusers}"), Target::whole(canon));
            }
        }
        Family::Transformer(m) => {
            let sd3 = m != crate::transformer::Model::Flux;
            for layer in &model.transformer {
                let canon = format!("diffusion_model.{}", layer.path);
                map.insert(layer.kohya_name(), Target::whole(&canon));
                map.insert(layer.comfyui_name(), Target::whole(&canon));
                for ((part, name), offset) in layer
                    .parts
                    .iter()
                    .zip(layer.diffusers_names())
                    .zip(layer.part_offsets())
                {
                    let target = Target {
                        layer: canon.clone(),
                        rows: (layer.parts.len() > 1).then_some((offset, part.rows)),
                    };
                    let dpath = name.strip_prefix("transformer.").unwrap_or(&name);
                    let flat = dpath.replace('.', "_");
                    map.insert(format!("lora_transformer_{flat}"), target.clone());
                    map.insert(format!("lycoris_{flat}"), target.clone());
                    if sd3 {
                        map.insert(format!("base_model.model.{dpath}"), target.clone());
                    }
                    map.insert(name, target);
                }
            }
        }
    }
    map
}

/// ComfyUI's reading of `file` onto `model`'s layers.
pub(crate) fn read(file: &FileView, model: &ModelLayers, out: &mut Findings) {
    let map = key_map(model);
    let transformer = matches!(model.family, Family::Transformer(_));
    let te_unchecked =
        |k: &str| transformer && (layout::is_text_encoder(k) || k.starts_with("text_encoders."));
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut modules: BTreeSet<&str> = BTreeSet::new();
    for key in file.entries.keys() {
        for (up, down) in PAIRS {
            for suffix in [up, down] {
                if let Some(m) = key.strip_suffix(suffix) {
                    modules.insert(m);
                }
            }
        }
        if let Some(m) = key.strip_suffix(".alpha") {
            modules.insert(m);
        }
    }
    for module in modules {
        if te_unchecked(module) {
            continue;
        }
        let Some((up_key, down_key)) = PAIRS.iter().find_map(|(u, d)| {
            let u = format!("{module}{u}");
            file.get(&u).is_some().then(|| (u, format!("{module}{d}")))
        }) else {
            continue;
        };
        let Some(target) = map.get(module) else {
            // One problem per module: its other tensors go with it.
            for k in [&down_key, &format!("{module}.alpha")] {
                if let Some((k, _)) = file.entries.get_key_value(k.as_str()) {
                    used.insert(k);
                }
            }
            out.problem(
                &up_key,
                format!(
                    "module `{module}` is not a layer of the {} ({}) in any name ComfyUI \
                     maps: ignored (\"lora key not loaded\")",
                    model.family.label(),
                    model.source
                ),
            );
            continue;
        };
        let (Some(up), Some(down)) = (file.get(&up_key), file.get(&down_key)) else {
            out.problem(
                &up_key,
                format!("no `{down_key}` beside it: loading the module fails"),
            );
            continue;
        };
        used.insert(up.key.as_str());
        used.insert(down.key.as_str());
        match target.shape(model) {
            None => out.problem(
                &up_key,
                format!("layer `{}` is not in the {}", target.layer, model.source),
            ),
            Some(shape) => match factor_problem(up, down, &shape, Fit::Reshape) {
                Some(p) => out.problems.push(p),
                None => out.loaded += 1,
            },
        }
        if let Some(alpha) = file.get(&format!("{module}.alpha")) {
            used.insert(alpha.key.as_str());
            if let Some(p) = alpha_problem(alpha) {
                out.problems.push(p);
            }
        }
        for extra in [".dora_scale", ".lora_mid.weight"] {
            if let Some(e) = file.get(&format!("{module}{extra}")) {
                used.insert(e.key.as_str());
            }
        }
    }
    for key in file.entries.keys() {
        if used.contains(key) {
            continue;
        }
        if te_unchecked(key) {
            out.unchecked.push(key.to_string());
        } else {
            out.problem(
                key,
                "not read by ComfyUI's loader (no up key of its module in a suffix it reads \
                 first, or not a LoRA tensor): ignored (\"lora key not loaded\")",
            );
        }
    }
}
