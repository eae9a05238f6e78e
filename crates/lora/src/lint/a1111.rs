//! AUTOMATIC1111's reading (release 1.10, `extensions-builtin/Lora/`), our own rules:
//! - `networks.py` `load_network`: a key is split at its first `.` into the module name and
//!   the network part; the module name goes through `convert_diffusers_name_to_compvis`
//!   (diffusers-style `lora_unet_down_blocks_...` / `lora_te_...` names to the LDM model's
//!   module names, with `_` for `.`), then, when that is no module, through the
//!   `(.*)_([qkv]_proj)$` rule (q / k / v of an OpenCLIP `MultiheadAttention`), then
//!   `lora_unet` -> `diffusion_model` (SDXL's kohya names), or `lora_te1_text_model` ->
//!   `0_transformer_text_model` / `transformer_text_model`. A module matched by none is
//!   "failed to match" and ignored;
//! - the module names (`assign_network_names_to_compvis_modules`): the UNet's
//!   `diffusion_model_<LDM path>`, SD1.x's CLIP `transformer_text_model_...`, SDXL's
//!   `0_transformer_text_model_...` and `1_model_transformer_resblocks_<i>_{attn,
//!   attn_out_proj, mlp_c_fc, mlp_c_proj}`;
//! - `network_lora.py`: a module loads as LoRA with `lora_up.weight` + `lora_down.weight`
//!   (or `lora_A.weight` + `lora_B.weight`); a matched module no network type accepts
//!   raises, and the whole file fails to load; `alpha` is read with `.item()`;
//!   `network_apply_weights` applies an OpenCLIP attention's q / k / v only when q, k, v and
//!   its `out_proj` are all there; `up @ down` is reshaped to the layer's weight when the
//!   element counts agree;
//! - `network.py` `NetworkOnDisk.detect_version`: `ss_base_model_version` starting `sdxl_`
//!   means SDXL, `ss_v2 == "True"` SD2, any other metadata SD1; the Lora tab lists a file
//!   under that version.
//!
//! The released webui loads no FLUX.1 or SD3.5 model's LoRAs (its SD3 support is SD3
//! Medium's own loader): lint refuses those files for `a1111`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::model::{Family, ModelLayers};
use super::{FileView, Findings, Fit, Target, alpha_problem, factor_problem};
use crate::error::LoraError;

/// The parts of a module `network_lora` / `network.py` read besides the factors.
const EXTRA_PARTS: [&str; 5] = ["alpha", "lora_mid.weight", "dora_scale", "bias", "scale"];

/// A module name of the loaded model: a layer, or an OpenCLIP attention whose q / k / v
/// are three row blocks of its `in_proj_weight`.
enum A1111Layer {
    Whole(String),
    Attention { layer: String },
}

/// A1111's module names of the model's layers.
fn layer_names(model: &ModelLayers) -> BTreeMap<String, A1111Layer> {
    let sdxl = model.family == Family::Sdxl;
    let mut map = BTreeMap::new();
    for canon in model.shapes.keys() {
        let name = if let Some(p) = canon.strip_prefix("diffusion_model.") {
            format!("diffusion_model_{}", p.replace('.', "_"))
        } else if let Some(p) = canon.strip_prefix("te1.") {
            let prefix = if sdxl {
                "0_transformer_"
            } else {
                "transformer_"
            };
            format!("{prefix}{}", p.replace('.', "_"))
        } else if let Some(p) = canon.strip_prefix("te2.text_model.encoder.layers.") {
            let Some((i, tail)) = p.split_once('.') else {
                continue;
            };
            let block = format!("1_model_transformer_resblocks_{i}");
            let name = match tail {
                "self_attn.q_proj" => {
                    map.insert(
                        format!("{block}_attn"),
                        A1111Layer::Attention {
                            layer: format!("te2.text_model.encoder.layers.{i}"),
                        },
                    );
                    continue;
                }
                "self_attn.k_proj" | "self_attn.v_proj" => continue,
                "self_attn.out_proj" => format!("{block}_attn_out_proj"),
                "mlp.fc1" => format!("{block}_mlp_c_fc"),
                "mlp.fc2" => format!("{block}_mlp_c_proj"),
                _ => continue,
            };
            map.insert(name, A1111Layer::Whole(canon.clone()));
            continue;
        } else {
            continue;
        };
        map.insert(name, A1111Layer::Whole(canon.clone()));
    }
    map
}

/// `convert_diffusers_name_to_compvis(key, is_sd2=False)`.
fn to_compvis(key: &str) -> String {
    let num = |s: &str| -> Option<(usize, String)> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let n = s.get(..end)?.parse().ok()?;
        Some((n, s.get(end..).unwrap_or("").to_string()))
    };
    let resnet_suffix = |s: &str| -> String {
        match s {
            "conv1" => "in_layers_2",
            "conv2" => "out_layers_3",
            "norm1" => "in_layers_0",
            "norm2" => "out_layers_0",
            "time_emb_proj" => "emb_layers_1",
            "conv_shortcut" => "skip_connection",
            other => other,
        }
        .to_string()
    };
    // `(attentions|resnets)_(\d+)_(.+)` -> (is attention, index, suffix converted).
    let inner = |s: &str| -> Option<(bool, usize, String)> {
        let (attn, rest) = if let Some(r) = s.strip_prefix("attentions_") {
            (true, r)
        } else {
            (false, s.strip_prefix("resnets_")?)
        };
        let (j, rest) = num(rest)?;
        let suffix = rest.strip_prefix('_').filter(|r| !r.is_empty())?;
        let suffix = if attn {
            suffix.to_string()
        } else {
            resnet_suffix(suffix)
        };
        Some((attn, j, suffix))
    };
    if let Some(rest) = key.strip_prefix("lora_unet_conv_in") {
        return format!("diffusion_model_input_blocks_0_0{rest}");
    }
    if let Some(rest) = key.strip_prefix("lora_unet_conv_out") {
        return format!("diffusion_model_out_2{rest}");
    }
    if let Some((n, rest)) = key
        .strip_prefix("lora_unet_time_embedding_linear_")
        .and_then(num)
        .filter(|(n, _)| *n >= 1)
    {
        return format!("diffusion_model_time_embed_{}{rest}", n * 2 - 2);
    }
    if let Some((b, rest)) = key.strip_prefix("lora_unet_down_blocks_").and_then(num)
        && let Some((attn, j, suffix)) = rest.strip_prefix('_').and_then(inner)
    {
        return format!(
            "diffusion_model_input_blocks_{}_{}_{suffix}",
            1 + b * 3 + j,
            usize::from(attn)
        );
    }
    if let Some((attn, j, suffix)) = key.strip_prefix("lora_unet_mid_block_").and_then(inner) {
        let index = if attn { 1 } else { j * 2 };
        return format!("diffusion_model_middle_block_{index}_{suffix}");
    }
    if let Some((b, rest)) = key.strip_prefix("lora_unet_up_blocks_").and_then(num)
        && let Some((attn, j, suffix)) = rest.strip_prefix('_').and_then(inner)
    {
        return format!(
            "diffusion_model_output_blocks_{}_{}_{suffix}",
            b * 3 + j,
            usize::from(attn)
        );
    }
    if let Some((b, rest)) = key.strip_prefix("lora_unet_down_blocks_").and_then(num)
        && rest.starts_with("_downsamplers_0_conv")
    {
        return format!("diffusion_model_input_blocks_{}_0_op", 3 + b * 3);
    }
    if let Some((b, rest)) = key.strip_prefix("lora_unet_up_blocks_").and_then(num)
        && rest.starts_with("_upsamplers_0_conv")
    {
        let index = if b > 0 { 2 } else { 1 };
        return format!("diffusion_model_output_blocks_{}_{index}_conv", 2 + b * 3);
    }
    if let Some((i, rest)) = key
        .strip_prefix("lora_te_text_model_encoder_layers_")
        .and_then(num)
        && let Some(m) = rest.strip_prefix('_').filter(|r| !r.is_empty())
    {
        return format!("transformer_text_model_encoder_layers_{i}_{m}");
    }
    if let Some((i, rest)) = key
        .strip_prefix("lora_te2_text_model_encoder_layers_")
        .and_then(num)
        && let Some(m) = rest.strip_prefix('_').filter(|r| !r.is_empty())
    {
        let m = if m.contains("mlp_fc1") {
            m.replace("mlp_fc1", "mlp_c_fc")
        } else if m.contains("mlp_fc2") {
            m.replace("mlp_fc2", "mlp_c_proj")
        } else {
            m.replace("self_attn", "attn")
        };
        return format!("1_model_transformer_resblocks_{i}_{m}");
    }
    key.to_string()
}

/// Where `load_network` puts a module: its A1111 module key and the layer (or q / k / v
/// block of an attention) it patches.
fn resolve(module: &str, names: &BTreeMap<String, A1111Layer>) -> Option<(String, Target)> {
    let whole = |key: &str| match names.get(key) {
        Some(A1111Layer::Whole(c)) => Some((key.to_string(), Target::whole(c))),
        _ => None,
    };
    let key = to_compvis(module);
    if let Some(hit) = whole(&key) {
        return Some(hit);
    }
    for p in ["q_proj", "k_proj", "v_proj"] {
        if let Some(base) = key.strip_suffix(&format!("_{p}"))
            && let Some(A1111Layer::Attention { layer }) = names.get(base)
        {
            return Some((key.clone(), Target::whole(format!("{layer}.self_attn.{p}"))));
        }
    }
    if module.contains("lora_unet") {
        return whole(&module.replace("lora_unet", "diffusion_model"));
    }
    if module.contains("lora_te1_text_model") {
        return whole(&module.replace("lora_te1_text_model", "0_transformer_text_model"))
            .or_else(|| whole(&module.replace("lora_te1_text_model", "transformer_text_model")));
    }
    None
}

/// A1111's reading of `file` onto `model`'s layers.
pub(crate) fn read(
    path: &Path,
    file: &FileView,
    model: &ModelLayers,
    out: &mut Findings,
) -> Result<(), LoraError> {
    if let Family::Transformer(m) = model.family {
        return Err(LoraError::InvalidArgument(format!(
            "`{}`: AUTOMATIC1111's webui (release 1.10) loads no LoRA of the {}; lint --for \
             a1111 checks SD1.x and SDXL files",
            path.display(),
            m.label()
        )));
    }
    let names = layer_names(model);
    // Modules by name, with their parts.
    let mut modules: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for key in file.entries.keys() {
        let (module, part) = key.split_once('.').unwrap_or((key, ""));
        modules.entry(module).or_default().insert(part, key);
    }
    let mut attention_parts: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let mut loaded = Vec::new();
    for (module, parts) in &modules {
        let Some((a1111_key, target)) = resolve(module, &names) else {
            for key in parts.values() {
                out.problem(
                    key,
                    format!(
                        "module `{module}` is no module of the {} ({}) after A1111's name \
                         conversion: ignored (\"didn't match keys\")",
                        model.family.label(),
                        model.source
                    ),
                );
            }
            continue;
        };
        let pair = [
            ("lora_up.weight", "lora_down.weight"),
            ("lora_B.weight", "lora_A.weight"),
        ]
        .into_iter()
        .find(|(u, d)| parts.contains_key(u) && parts.contains_key(d));
        let Some((up_part, down_part)) = pair else {
            let first = parts.values().next().copied().unwrap_or(module);
            out.problem(
                first,
                format!(
                    "module `{module}` has parts {:?}: no network type accepts them (LoRA \
                     needs lora_up.weight + lora_down.weight), so loading the whole file \
                     fails (AssertionError)",
                    parts.keys().collect::<Vec<_>>()
                ),
            );
            continue;
        };
        for (part, key) in parts {
            if *part != up_part && *part != down_part && !EXTRA_PARTS.contains(part) {
                out.problem(
                    key,
                    format!("part `{part}` is not read by A1111's LoRA module: ignored"),
                );
            }
        }
        if let Some(alpha) = parts.get("alpha").and_then(|k| file.get(k))
            && let Some(p) = alpha_problem(alpha)
        {
            out.problems.push(p);
        }
        let (Some(up), Some(down)) = (
            parts.get(up_part).and_then(|k| file.get(k)),
            parts.get(down_part).and_then(|k| file.get(k)),
        ) else {
            continue;
        };
        let Some(shape) = target.shape(model) else {
            out.problem(
                &up.key,
                format!("layer `{}` is not in the {}", target.layer, model.source),
            );
            continue;
        };
        if let Some(p) = factor_problem(up, down, &shape, Fit::Reshape) {
            out.problems.push(p);
            continue;
        }
        if let Some(rest) = target.layer.strip_prefix("te2.")
            && let Some((layer, proj)) = rest.rsplit_once(".self_attn.")
        {
            attention_parts
                .entry(layer.to_string())
                .or_default()
                .insert(match proj {
                    "q_proj" => "q",
                    "k_proj" => "k",
                    "v_proj" => "v",
                    _ => "out",
                });
            if proj != "out_proj" {
                loaded.push((Some(layer.to_string()), up.key.clone(), a1111_key));
                continue;
            }
        }
        loaded.push((None, up.key.clone(), a1111_key));
    }
    for (attention, up_key, a1111_key) in loaded {
        let complete = attention.as_ref().is_none_or(|layer| {
            attention_parts
                .get(layer)
                .is_some_and(|s| ["q", "k", "v", "out"].iter().all(|p| s.contains(p)))
        });
        if complete {
            out.loaded += 1;
        } else {
            out.problem(
                &up_key,
                format!(
                    "`{a1111_key}` is q / k / v of an OpenCLIP attention: A1111 applies them \
                     only with all of q_proj, k_proj, v_proj and out_proj of that layer \
                     (\"failed to calculate network weights\"): ignored"
                ),
            );
        }
    }
    version_warning(file, model.family, out);
    Ok(())
}

/// `NetworkOnDisk.detect_version` against the file's family.
fn version_warning(file: &FileView, family: Family, out: &mut Findings) {
    let md = file.metadata;
    let read = if md
        .get("ss_base_model_version")
        .is_some_and(|v| v.starts_with("sdxl_"))
    {
        "SDXL"
    } else if md.get("ss_v2").is_some_and(|v| v == "True") {
        "SD2"
    } else if !md.is_empty() {
        "SD1"
    } else {
        "unknown"
    };
    let is = if family == Family::Sdxl {
        "SDXL"
    } else {
        "SD1"
    };
    if read != is && read != "unknown" {
        out.warning(
            "__metadata__.ss_base_model_version",
            format!(
                "A1111 reads the metadata (ss_base_model_version {:?}, ss_v2 {:?}) as {read}, \
                 but the file is an {is} LoRA: the Lora tab lists it under {read} (hidden \
                 for an {is} checkpoint unless \"show all\" is set)",
                md.get("ss_base_model_version"),
                md.get("ss_v2")
            ),
        );
    }
}
