//! diffusers' reading (`load_lora_weights`), our own rules:
//! - SD1.x / SDXL (`StableDiffusion[XL]LoraLoaderMixin.lora_state_dict`): `dora_scale` keys
//!   are filtered out; when every key starts with `lora_unet_` / `lora_te_` / `lora_te1_` /
//!   `lora_te2_`, the file is kohya's: SDXL's sgm block names are renumbered to diffusers'
//!   (`_maybe_map_sgm_blocks_to_diffusers`, dropping the sgm keys of a file that has both),
//!   then `_convert_non_diffusers_lora_to_diffusers` renames each `lora_down.weight` with
//!   its `lora_up.weight` (a missing one raises) and `.alpha` (`.item()`) by
//!   `_convert_unet_lora_key` / `_convert_text_encoder_lora_key`, and raises on any key
//!   left over. Otherwise the names are diffusers' own (`unet.` / `text_encoder.` /
//!   `text_encoder_2.` + path, `lora_A` / `lora_B`), and `.alpha` is not read;
//! - FLUX.1 (`FluxLoraLoaderMixin.lora_state_dict`): with any `.lora_down.weight`
//!   (`_convert_kohya_flux_lora_to_diffusers`): `transformer.` keys are kept alone if there
//!   are any; else ComfyUI's `diffusion_model.` becomes `lora_unet_`, only `lora_unet_` /
//!   `lora_te_` / `lora_te1_` keys are kept, every BFL layer is renamed (fused q / k / v
//!   split by rows), and a `lora_unet_` key left over raises. Without: diffusers names,
//!   `alpha` keys must be float tensors (else it raises);
//! - SD3.5 (`SD3LoraLoaderMixin`): no conversion: only `transformer.` / `text_encoder*.`
//!   names are loaded;
//! - PEFT loads `lora_A` / `lora_B` with the layer type's exact shapes (`Fit::Strict`);
//!   modules that are no layer of the model are unexpected keys, ignored;
//! - metadata: `lora_adapter_metadata` is `json.loads`ed, and may not come with alphas
//!   (`Both network_alphas and metadata cannot be specified`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::model::{Family, ModelLayers};
use super::{FileView, Findings, Fit, Target, alpha_problem, factor_problem};
use crate::error::LoraError;
use crate::header::Entry;
use crate::transformer::Model;

const KOHYA_PREFIXES: [&str; 4] = ["lora_te_", "lora_unet_", "lora_te1_", "lora_te2_"];

/// One module as diffusers ends up loading it.
struct Loaded<'a> {
    target: Option<Target>,
    up: &'a Entry,
    down: &'a Entry,
    /// Why no target, when none.
    missing: String,
}

/// diffusers' reading of `file` onto `model`'s layers.
pub(crate) fn read(
    _path: &Path,
    file: &FileView,
    model: &ModelLayers,
    out: &mut Findings,
) -> Result<(), LoraError> {
    let metadata_ok = adapter_metadata(file, out);
    let mut keys: BTreeSet<&str> = file.entries.keys().copied().collect();
    let dora: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| k.contains("dora_scale"))
        .collect();
    for k in dora {
        keys.remove(k);
        out.problem(
            k,
            "diffusers filters `dora_scale` keys out (DoRA is not supported): ignored",
        );
    }
    let mut alphas = false;
    let loaded = match model.family {
        Family::Sd1 | Family::Sdxl => {
            if !keys.is_empty()
                && keys
                    .iter()
                    .all(|k| KOHYA_PREFIXES.iter().any(|p| k.starts_with(p)))
            {
                alphas = keys.iter().any(|k| k.ends_with(".alpha"));
                kohya_sd(file, model, keys, out)
            } else {
                peft(
                    file,
                    model,
                    keys,
                    out,
                    &["unet.", "text_encoder.", "text_encoder_2."],
                )
            }
        }
        Family::Transformer(Model::Flux) => {
            if keys.iter().any(|k| k.contains(".lora_down.weight")) {
                kohya_flux(file, model, keys, out)
            } else {
                for k in keys.iter().filter(|k| k.contains("alpha")) {
                    if let Some(e) = file.get(k)
                        && !super::float_dtype(e.dtype)
                    {
                        out.problem(k, format!("alpha of dtype {}: diffusers raises \"The alpha key seems to be incorrect\"", e.dtype));
                    }
                }
                let alpha_keys: Vec<&str> = keys
                    .iter()
                    .copied()
                    .filter(|k| k.contains("alpha"))
                    .collect();
                for k in alpha_keys {
                    keys.remove(k);
                }
                peft(file, model, keys, out, &["transformer.", "text_encoder."])
            }
        }
        Family::Transformer(_) => peft(
            file,
            model,
            keys,
            out,
            &[
                "transformer.",
                "text_encoder.",
                "text_encoder_2.",
                "text_encoder_3.",
            ],
        ),
    };
    if alphas && metadata_ok {
        out.problem(
            "__metadata__.lora_adapter_metadata",
            "a kohya file with alphas and diffusers' adapter metadata: diffusers raises \"Both \
             `network_alphas` and `metadata` cannot be specified\"",
        );
    }
    for m in loaded {
        let Some(target) = m.target else {
            out.problem(&m.up.key, m.missing);
            continue;
        };
        let Some(shape) = target.shape(model) else {
            out.problem(
                &m.up.key,
                format!(
                    "`{}` is no layer of the {} ({}): PEFT finds no such module, ignored",
                    target.layer,
                    model.family.label(),
                    model.source
                ),
            );
            continue;
        };
        match factor_problem(m.up, m.down, &shape, Fit::Strict) {
            Some(p) => out.problems.push(p),
            None => out.loaded += 1,
        }
    }
    Ok(())
}

/// Checks `lora_adapter_metadata`; true when present and valid.
fn adapter_metadata(file: &FileView, out: &mut Findings) -> bool {
    let Some(raw) = file
        .metadata
        .get("lora_adapter_metadata")
        .filter(|r| !r.is_empty())
    else {
        return false;
    };
    if serde_json::from_str::<serde_json::Value>(raw).is_err() {
        out.problem(
            "__metadata__.lora_adapter_metadata",
            "is not JSON: diffusers' `json.loads` fails and the file does not load",
        );
        return false;
    }
    true
}

/// SDXL's sgm block names renumbered as `_maybe_map_sgm_blocks_to_diffusers` does
/// (`layers_per_block` 2), on `_`-delimited kohya keys; `None` when it raises.
fn sgm_to_diffusers(key: &str) -> Option<String> {
    const SGM: [&str; 3] = ["input_blocks", "middle_block", "output_blocks"];
    if key.contains("text")
        || !SGM.iter().any(|p| key.contains(p))
        || key.contains("input_blocks_0_0")
    {
        return Some(key.to_string());
    }
    let parts: Vec<&str> = key.split('_').collect();
    let id: usize = parts.get(4)?.parse().ok()?;
    let head = parts.get(..4)?.join("_");
    let inner_map = ["resnets", "attentions", "upsamplers"];
    let per = 3;
    if key.contains("input_blocks") {
        let (block, layer) = ((id.checked_sub(1)?) / per, (id.checked_sub(1)?) % per);
        let inner: usize = parts.get(5)?.parse().ok()?;
        let (name, index) = if key.contains("op") {
            ("downsamplers".to_string(), "0".to_string())
        } else {
            (inner_map.get(inner)?.to_string(), layer.to_string())
        };
        Some(format!(
            "{head}_{block}_{name}_{index}_{}",
            parts.get(6..)?.join("_")
        ))
    } else if key.contains("middle_block") {
        let part = match id {
            0 => "resnets_0",
            1 => "attentions_0",
            2 => "resnets_1",
            _ => return None,
        };
        Some(format!("{head}_{part}_{}", parts.get(5..)?.join("_")))
    } else {
        let (block, layer) = (id / per, id % per);
        let inner: usize = parts.get(5)?.parse().ok()?;
        let index = if inner < 2 {
            layer.to_string()
        } else {
            "0".into()
        };
        Some(format!(
            "{head}_{block}_{}_{index}_{}",
            inner_map.get(inner)?,
            parts.get(6..)?.join("_")
        ))
    }
}

/// `_convert_unet_lora_key` of a module name (`lora_unet_...`), then PEFT's renaming, to a
/// diffusers UNet module path.
fn unet_path(module: &str) -> String {
    let mut n = format!(
        "{}.lora.down.weight",
        module.trim_start_matches("lora_unet_").replace('_', ".")
    );
    for (from, to) in [
        ("input.blocks.0.0", "conv_in"),
        ("out.2", "conv_out"),
        ("input.blocks", "down_blocks"),
        ("down.blocks", "down_blocks"),
        ("middle.block", "mid_block"),
        ("mid.block", "mid_block"),
        ("output.blocks", "up_blocks"),
        ("up.blocks", "up_blocks"),
        ("transformer.blocks", "transformer_blocks"),
        ("to.q.lora", "to_q_lora"),
        ("to.k.lora", "to_k_lora"),
        ("to.v.lora", "to_v_lora"),
        ("to.out.0.lora", "to_out_lora"),
        ("proj.in", "proj_in"),
        ("proj.out", "proj_out"),
        ("emb.layers", "time_emb_proj"),
        ("conv.in", "conv_in"),
        ("conv.out", "conv_out"),
        ("time.embed.0", "time_embedding.linear_1"),
        ("time.embed.2", "time_embedding.linear_2"),
        ("label.emb.0.0", "add_embedding.linear_1"),
        ("label.emb.0.2", "add_embedding.linear_2"),
        ("time.embedding.linear.1", "time_embedding.linear_1"),
        ("time.embedding.linear.2", "time_embedding.linear_2"),
    ] {
        n = n.replace(from, to);
    }
    if n.contains("emb") && !n.contains("time.emb.proj") {
        n = strip_last_index(&n);
    }
    if n.contains(".in.") {
        n = n.replace("in.layers.2", "conv1");
    }
    if n.contains(".out.") {
        n = n.replace("out.layers.3", "conv2");
    }
    if n.contains("downsamplers") || n.contains("upsamplers") {
        n = n.replace("op", "conv");
    }
    if n.contains("skip") {
        n = n.replace("skip.connection", "conv_shortcut");
    }
    n = n
        .replace("time.emb.proj", "time_emb_proj")
        .replace("conv.shortcut", "conv_shortcut");
    // PEFT's renaming (`convert_unet_state_dict_to_peft`) back to the module path.
    let path = n
        .strip_suffix(".lora.down.weight")
        .or_else(|| n.strip_suffix("_lora.down.weight"))
        .unwrap_or(&n)
        .to_string();
    let path = if path.ends_with(".to_out") {
        format!("{path}.0")
    } else {
        path
    };
    path.replace(".processor.", ".")
}

/// `re.sub(r"\.\d+(?=\D*$)", "", s, count=1)`: drops the last digit run when a `.` precedes it.
fn strip_last_index(s: &str) -> String {
    let Some(end) = s.rfind(|c: char| c.is_ascii_digit()) else {
        return s.to_string();
    };
    let start = s[..=end]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    if start > 0 && s.as_bytes().get(start - 1) == Some(&b'.') {
        format!("{}{}", &s[..start - 1], &s[end + 1..])
    } else {
        s.to_string()
    }
}

/// `_convert_text_encoder_lora_key` of a module name to the HF CLIP path.
fn text_encoder_path(module: &str) -> Option<(&'static str, String)> {
    let (te, rest) = if let Some(r) = module.strip_prefix("lora_te_") {
        ("te1", r)
    } else if let Some(r) = module.strip_prefix("lora_te1_") {
        ("te1", r)
    } else {
        ("te2", module.strip_prefix("lora_te2_")?)
    };
    let n = rest
        .replace('_', ".")
        .replace("text.model", "text_model")
        .replace("self.attn", "self_attn")
        .replace("q.proj", "q_proj")
        .replace("k.proj", "k_proj")
        .replace("v.proj", "v_proj")
        .replace("out.proj", "out_proj")
        .replace("text.projection", "text_projection");
    Some((te, n))
}

/// The kohya path of the SD loaders.
fn kohya_sd<'a>(
    file: &'a FileView,
    model: &ModelLayers,
    mut keys: BTreeSet<&'a str>,
    out: &mut Findings,
) -> Vec<Loaded<'a>> {
    // Renamed key -> original key.
    let mut renamed: BTreeMap<String, &str> = BTreeMap::new();
    let sgm = |k: &str| {
        ["input_blocks", "middle_block", "output_blocks"]
            .iter()
            .any(|p| k.contains(p))
    };
    let not_sgm = |k: &str| {
        ["down_blocks", "mid_block", "up_blocks"]
            .iter()
            .any(|p| k.contains(p))
    };
    let both = keys.iter().any(|k| sgm(k)) && keys.iter().any(|k| not_sgm(k) && !sgm(k));
    let sdxl = model.family == Family::Sdxl;
    for k in std::mem::take(&mut keys) {
        if both && sgm(k) {
            out.problem(k, "an sgm block name in a file that also has diffusers block names: diffusers drops it, ignored");
            continue;
        }
        if sdxl && sgm(k) {
            match sgm_to_diffusers(k) {
                Some(n) => {
                    renamed.insert(n, k);
                }
                None => out.problem(k, "diffusers cannot renumber this sgm block name (\"not supported\"): loading fails"),
            }
        } else {
            renamed.insert(k.to_string(), k);
        }
    }
    let mut loaded = Vec::new();
    let mut consumed: BTreeSet<String> = BTreeSet::new();
    for (key, original) in &renamed {
        let Some(module) = key
            .strip_suffix(".lora_down.weight")
            .filter(|m| !m.contains('.'))
        else {
            continue;
        };
        let up_key = format!("{module}.lora_up.weight");
        let Some(up_original) = renamed.get(&up_key) else {
            out.problem(
                original,
                format!(
                    "no `{up_key}` beside it: diffusers' conversion raises KeyError, loading fails"
                ),
            );
            consumed.insert(key.clone());
            continue;
        };
        consumed.insert(key.clone());
        consumed.insert(up_key.clone());
        let alpha_key = format!("{module}.alpha");
        if let Some(alpha) = renamed.get(&alpha_key).and_then(|k| file.get(k)) {
            consumed.insert(alpha_key);
            if let Some(p) = alpha_problem(alpha) {
                out.problems.push(p);
            }
        }
        let (Some(up), Some(down)) = (file.get(up_original), file.get(original)) else {
            continue;
        };
        let (target, missing) = if module.starts_with("lora_unet_") {
            let path = unet_path(module);
            (
                model.unet_diffusers.get(&path).map(Target::whole),
                format!(
                    "renamed to `unet.{path}`, no module of the {} UNet ({}): PEFT ignores it",
                    model.family.label(),
                    model.source
                ),
            )
        } else {
            match text_encoder_path(module) {
                Some((te, path)) => (Some(Target::whole(format!("{te}.{path}"))), String::new()),
                None => (
                    None,
                    "not a text-encoder name diffusers converts: ignored".into(),
                ),
            }
        };
        loaded.push(Loaded {
            target,
            up,
            down,
            missing,
        });
    }
    for (key, original) in &renamed {
        if !consumed.contains(key) {
            out.problem(original, "left over by diffusers' kohya conversion (not a `lora_down.weight` with its `lora_up.weight` and `alpha`): it raises \"keys have not been correctly renamed\", loading fails");
        }
    }
    loaded
}

/// The FLUX.1 kohya / ComfyUI path (`_convert_kohya_flux_lora_to_diffusers`).
fn kohya_flux<'a>(
    file: &'a FileView,
    model: &ModelLayers,
    keys: BTreeSet<&'a str>,
    out: &mut Findings,
) -> Vec<Loaded<'a>> {
    if keys.iter().any(|k| k.starts_with("transformer.")) {
        for k in keys.iter().filter(|k| !k.starts_with("transformer.")) {
            out.problem(
                k,
                "a file with `transformer.` keys: diffusers keeps only those, ignored",
            );
        }
        let kept = keys
            .into_iter()
            .filter(|k| k.starts_with("transformer."))
            .collect();
        return peft(file, model, kept, out, &["transformer."]);
    }
    if keys.iter().any(|k| k.starts_with("lora_transformer_")) {
        for k in &keys {
            out.problem(k, "diffusers' `lora_transformer_` (mixture) conversion is not reproduced by lint: not checked");
        }
        return Vec::new();
    }
    // Renamed key -> original key, as the ComfyUI rename and `_custom_replace` leave them.
    let mut renamed: BTreeMap<String, &str> = BTreeMap::new();
    for k in keys {
        let n = k
            .replace("diffusion_model.", "lora_unet_")
            .replace("text_encoders.clip_l.transformer.", "lora_te_");
        if !["lora_unet_", "lora_te_", "lora_te1_"]
            .iter()
            .any(|p| n.starts_with(p))
        {
            out.problem(k, "diffusers' FLUX.1 kohya conversion keeps only `lora_unet_` / `lora_te_` / `lora_te1_` keys: ignored");
            continue;
        }
        let n = match ["lora_down", "lora_up", "alpha"]
            .iter()
            .find_map(|s| n.find(&format!(".{s}")).map(|i| (i, s)))
        {
            Some((i, _)) => format!("{}{}", n[..i].replace('.', "_"), &n[i..]),
            None => n.replace('.', "_"),
        };
        renamed.insert(n, k);
    }
    let layers: BTreeMap<String, String> = model
        .transformer
        .iter()
        .map(|l| (l.kohya_name(), format!("diffusion_model.{}", l.path)))
        .collect();
    let mut loaded = Vec::new();
    let mut consumed = BTreeSet::new();
    for (name, canon) in &layers {
        let down_key = format!("{name}.lora_down.weight");
        let Some(down_original) = renamed.get(&down_key) else {
            continue;
        };
        consumed.insert(down_key.clone());
        let up_key = format!("{name}.lora_up.weight");
        let Some(up_original) = renamed.get(&up_key) else {
            out.problem(
                down_original,
                format!(
                    "no `{up_key}` beside it: diffusers' conversion raises KeyError, loading fails"
                ),
            );
            continue;
        };
        consumed.insert(up_key);
        let alpha_key = format!("{name}.alpha");
        if let Some(alpha) = renamed.get(&alpha_key).and_then(|k| file.get(k)) {
            consumed.insert(alpha_key);
            if let Some(p) = alpha_problem(alpha) {
                out.problems.push(p);
            }
        }
        if let (Some(up), Some(down)) = (file.get(up_original), file.get(down_original)) {
            loaded.push(Loaded {
                target: Some(Target::whole(canon)),
                up,
                down,
                missing: String::new(),
            });
        }
    }
    let left: Vec<(&String, &&str)> = renamed
        .iter()
        .filter(|(k, _)| !consumed.contains(*k))
        .collect();
    let fatal = left.iter().any(|(k, _)| !k.starts_with("lora_te"));
    for (key, original) in left {
        if fatal {
            out.problem(original, "left over by diffusers' FLUX.1 kohya conversion (no BFL layer of that name, or no `lora_down.weight` beside it): it raises \"Incompatible keys detected\", loading fails");
        } else if key.starts_with("lora_te_") || key.starts_with("lora_te1_") {
            let module = key.split('.').next().unwrap_or(key);
            if key.ends_with(".lora_down.weight")
                && !renamed.contains_key(&format!("{module}.lora_up.weight"))
            {
                out.problem(original, "no `lora_up.weight` beside it: diffusers' conversion raises KeyError, loading fails");
            } else {
                out.unchecked.push(original.to_string());
            }
        } else {
            out.problem(original, "diffusers' FLUX.1 conversion reads only CLIP-L (`lora_te_` / `lora_te1_`) text-encoder keys: \"Unsupported keys\", ignored");
        }
    }
    loaded
}

/// diffusers / PEFT names: `<prefix><module path>.lora_A.weight` / `.lora_B.weight` (also
/// the older `.lora.down.weight` and attention-processor `_lora.down.weight` spellings that
/// `convert_unet_state_dict_to_peft` renames).
fn peft<'a>(
    file: &'a FileView,
    model: &ModelLayers,
    keys: BTreeSet<&'a str>,
    out: &mut Findings,
    prefixes: &[&str],
) -> Vec<Loaded<'a>> {
    const PAIRS: [(&str, &str); 3] = [
        (".lora_B.weight", ".lora_A.weight"),
        (".lora.up.weight", ".lora.down.weight"),
        ("_lora.up.weight", "_lora.down.weight"),
    ];
    let diffusers_targets = diffusers_targets(model);
    let mut loaded = Vec::new();
    let mut used: BTreeSet<&str> = BTreeSet::new();
    for key in &keys {
        let Some(prefix) = prefixes.iter().find(|p| key.starts_with(**p)) else {
            continue;
        };
        for (up_s, down_s) in PAIRS {
            let Some(module) = key.strip_suffix(up_s) else {
                continue;
            };
            used.insert(key);
            let down_key = format!("{module}{down_s}");
            let Some((down_k, _)) = file
                .entries
                .get_key_value(down_key.as_str())
                .filter(|_| keys.contains(down_key.as_str()))
            else {
                out.problem(
                    key,
                    format!(
                        "no `{down_key}` beside it: PEFT finds lora_B without lora_A, loading fails"
                    ),
                );
                continue;
            };
            used.insert(down_k);
            let mut path = module
                .trim_start_matches(prefix)
                .replace(".processor.", ".");
            if path.ends_with(".to_out") {
                path.push_str(".0");
            }
            let name = format!("{prefix}{path}");
            let (Some(up), Some(down)) = (file.get(key), file.get(down_k)) else {
                continue;
            };
            loaded.push(Loaded {
                target: diffusers_targets.get(&name).cloned(),
                up,
                down,
                missing: format!(
                    "`{name}` is no module of the {} ({}): PEFT ignores it (unexpected keys)",
                    model.family.label(),
                    model.source
                ),
            });
        }
    }
    for key in keys {
        if used.contains(key) {
            continue;
        }
        if key.ends_with(".alpha") || key.ends_with("alpha") {
            out.problem(key, "diffusers does not read the alpha of a diffusers-named file of this model: ignored (the LoRA loads at scale 1)");
        } else if PAIRS.iter().any(|(_, d)| key.ends_with(d))
            && prefixes.iter().any(|p| key.starts_with(p))
        {
            out.problem(
                key,
                "no lora_B / up key beside it: PEFT cannot read the module's rank, loading fails",
            );
        } else {
            out.problem(key, format!("not a LoRA key diffusers' loader of the {} reads (names start {prefixes:?}): ignored", model.family.label()));
        }
    }
    loaded
}

/// diffusers' full names (`unet.` / `text_encoder.` / `transformer.` + path) of the model's
/// layers.
fn diffusers_targets(model: &ModelLayers) -> BTreeMap<String, Target> {
    let mut map = BTreeMap::new();
    for (d, canon) in &model.unet_diffusers {
        map.insert(format!("unet.{d}"), Target::whole(canon));
    }
    for canon in model.shapes.keys() {
        if let Some(p) = canon.strip_prefix("te1.") {
            map.insert(format!("text_encoder.{p}"), Target::whole(canon));
        } else if let Some(p) = canon.strip_prefix("te2.") {
            map.insert(format!("text_encoder_2.{p}"), Target::whole(canon));
        }
    }
    for layer in &model.transformer {
        let canon = format!("diffusion_model.{}", layer.path);
        for ((part, name), offset) in layer
            .parts
            .iter()
            .zip(layer.diffusers_names())
            .zip(layer.part_offsets())
        {
            map.insert(
                name,
                Target {
                    layer: canon.clone(),
                    rows: (layer.parts.len() > 1).then_some((offset, part.rows)),
                },
            );
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_unet_names_become_diffusers_paths() {
        let cases = [
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            ),
            (
                "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0",
                "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in",
                "down_blocks.0.attentions.0.proj_in",
            ),
            (
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
                "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
            ),
            (
                "lora_unet_down_blocks_1_resnets_0_time_emb_proj",
                "down_blocks.1.resnets.0.time_emb_proj",
            ),
            (
                "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                "down_blocks.1.resnets.0.conv_shortcut",
            ),
        ];
        for (kohya, want) in cases {
            assert_eq!(unet_path(kohya), want, "{kohya}");
        }
    }

    #[test]
    fn sgm_names_are_renumbered() {
        let cases = [
            (
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_input_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
            ),
            (
                "lora_unet_middle_block_1_proj_in.alpha",
                "lora_unet_middle_block_attentions_0_proj_in.alpha",
            ),
            (
                "lora_unet_output_blocks_5_1_proj_out.lora_up.weight",
                "lora_unet_output_blocks_1_attentions_2_proj_out.lora_up.weight",
            ),
            (
                "lora_unet_input_blocks_3_0_op.lora_down.weight",
                "lora_unet_input_blocks_0_downsamplers_0_op.lora_down.weight",
            ),
        ];
        for (sgm, want) in cases {
            assert_eq!(sgm_to_diffusers(sgm).as_deref(), Some(want), "{sgm}");
        }
        // ...and then to diffusers paths.
        assert_eq!(
            unet_path("lora_unet_input_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        );
        assert_eq!(
            unet_path("lora_unet_input_blocks_0_downsamplers_0_op"),
            "down_blocks.0.downsamplers.0.conv"
        );
        assert_eq!(
            unet_path("lora_unet_output_blocks_0_resnets_1_emb_layers_1"),
            "up_blocks.0.resnets.1.time_emb_proj"
        );
    }
}
