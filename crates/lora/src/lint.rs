//! `lint`: would a loader read every tensor of a LoRA file, onto a layer of its model with
//! the right shape? Implemented for ComfyUI's loader (`comfy/lora.py`: `load_lora`,
//! `model_lora_keys_unet`, and the FLUX.1 / SD3 key maps `flux_to_diffusers` /
//! `mmdit_to_diffusers` in `comfy/utils.py`), for FLUX.1 and SD3.5 files. The rules, as
//! that code applies them (our own reading, not its code):
//! - a module's factors are found under the first of these suffix pairs that has an up key:
//!   `.lora_up.weight`/`.lora_down.weight`, `_lora.up.weight`/`_lora.down.weight`,
//!   `.lora_B.weight`/`.lora_A.weight`, `.lora.up.weight`/`.lora.down.weight`,
//!   `.lora_linear_layer.up.weight`/`.lora_linear_layer.down.weight`; `.alpha` is read with
//!   `.item()` (one element); keys matched by none are logged "lora key not loaded" and
//!   ignored;
//! - a module name is a layer of the model as `lora_unet_<path with _>`,
//!   `diffusion_model.<path>`, `transformer.<diffusers path>`,
//!   `lora_transformer_<diffusers path with _>`, `lycoris_<diffusers path with _>` or (SD3)
//!   `base_model.model.<diffusers path>`; diffusers' q / k / v land on row slices of the
//!   fused layer;
//! - `up @ down` must have the layer's (or slice's) shape, else the patch fails.
//!
//! Text-encoder modules are listed but not checked (their key maps depend on which text
//! encoders the loaded model has).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::error::LoraError;
use crate::header::{self, Dtype, Entry};
use crate::layout::{self, Layout};
use crate::transformer::Model;

/// A loader whose reading of LoRA files `lint` reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loader {
    ComfyUi,
}

/// One problem found, naming the tensor key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub key: String,
    pub problem: String,
}

/// What `lint` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LintReport {
    pub loader: String,
    pub layout: String,
    /// Modules the loader would apply.
    pub loaded_modules: usize,
    /// Keys the loader would ignore or fail on: any of these makes `lint` fail.
    pub problems: Vec<Problem>,
    /// Text-encoder tensors, not checked.
    pub unchecked: Vec<String>,
}

impl LintReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The suffix pairs of `load_lora`, in the order it tries them.
const PAIRS: [(&str, &str); 5] = [
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (
        ".lora_linear_layer.up.weight",
        ".lora_linear_layer.down.weight",
    ),
];

/// A target of a module name: `(out rows, in)` of the layer or of its slice.
type Target = (usize, usize);

/// ComfyUI's module names of a model's layers, with the shape each must have.
fn key_map(model: Model) -> BTreeMap<String, Target> {
    let mut map = BTreeMap::new();
    let sd3 = matches!(model, Model::Sd35Large | Model::Sd35Medium);
    for layer in model.layers() {
        let whole = (layer.out_dim, layer.in_dim);
        map.insert(layer.kohya_name(), whole);
        map.insert(layer.comfyui_name(), whole);
        for (part, name) in layer.parts.iter().zip(layer.diffusers_names()) {
            let target = (part.rows, layer.in_dim);
            let dpath = name
                .strip_prefix("transformer.")
                .unwrap_or(&name)
                .to_string();
            map.insert(
                format!("lora_transformer_{}", dpath.replace('.', "_")),
                target,
            );
            map.insert(format!("lycoris_{}", dpath.replace('.', "_")), target);
            if sd3 {
                map.insert(format!("base_model.model.{dpath}"), target);
            }
            map.insert(name, target);
        }
    }
    map
}

/// Checks the file `bytes` (`path` labels errors) against `loader`'s reading.
pub fn lint(path: &Path, bytes: &[u8], loader: Loader) -> Result<LintReport, LoraError> {
    match loader {
        Loader::ComfyUi => {}
    }
    let header = header::parse(path, bytes)?;
    let entries: BTreeMap<&str, &Entry> =
        header.entries.iter().map(|e| (e.key.as_str(), e)).collect();
    // The layout, from the file as our reader sees it when it can read it, else from the
    // module names of the keys.
    let model = detect_model(path, bytes, &entries).ok_or_else(|| {
        LoraError::InvalidArgument(format!(
            "`{}`: lint knows the FLUX.1 and SD3.5 layouts, and no module of this file is a \
             layer of either",
            path.display()
        ))
    })?;
    let map = key_map(model);
    let mut problems = Vec::new();
    let mut unchecked = Vec::new();
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut loaded = 0;
    // Module names: every key with a known suffix, cut.
    let mut modules: BTreeSet<&str> = BTreeSet::new();
    for key in entries.keys() {
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
        if layout::is_text_encoder(module) || module.starts_with("text_encoders.") {
            continue;
        }
        let Some((up_key, down_key)) = PAIRS.iter().find_map(|(u, d)| {
            let u = format!("{module}{u}");
            entries
                .contains_key(u.as_str())
                .then(|| (u, format!("{module}{d}")))
        }) else {
            continue;
        };
        let Some(&target) = map.get(module) else {
            // One problem per module: its other tensors go with it.
            for k in [&down_key, &format!("{module}.alpha")] {
                if let Some(e) = entries.get(k.as_str()) {
                    used.insert(e.key.as_str());
                }
            }
            problems.push(Problem {
                key: up_key.clone(),
                problem: format!(
                    "module `{module}` is not a linear layer of the {} in any name ComfyUI \
                     maps: ignored (\"lora key not loaded\")",
                    model.label()
                ),
            });
            continue;
        };
        let (Some(up), Some(down)) = (entries.get(up_key.as_str()), entries.get(down_key.as_str()))
        else {
            problems.push(Problem {
                key: up_key.clone(),
                problem: format!("no `{down_key}` beside it: loading the module fails"),
            });
            continue;
        };
        used.insert(up.key.as_str());
        used.insert(down.key.as_str());
        if let Some(p) = factor_problem(up, down, target) {
            problems.push(p);
        } else {
            loaded += 1;
        }
        let alpha_key = format!("{module}.alpha");
        if let Some(alpha) = entries.get(alpha_key.as_str()) {
            used.insert(alpha.key.as_str());
            if alpha.shape.iter().product::<usize>() != 1 {
                problems.push(Problem {
                    key: alpha.key.clone(),
                    problem: format!(
                        "alpha has shape {:?}: `.item()` needs one element",
                        alpha.shape
                    ),
                });
            }
        }
        for extra in [".dora_scale", ".lora_mid.weight"] {
            let k = format!("{module}{extra}");
            if let Some(e) = entries.get(k.as_str()) {
                used.insert(e.key.as_str());
            }
        }
    }
    for key in entries.keys() {
        if used.contains(key) {
            continue;
        }
        if layout::is_text_encoder(key) || key.starts_with("text_encoders.") {
            unchecked.push(key.to_string());
        } else if !problems.iter().any(|p| p.key == *key) {
            problems.push(Problem {
                key: key.to_string(),
                problem: "not read by ComfyUI's loader (no up key of its module in a suffix \
                          it reads first, or not a LoRA tensor): ignored (\"lora key not \
                          loaded\")"
                    .into(),
            });
        }
    }
    Ok(LintReport {
        loader: "comfyui".into(),
        layout: model.label().into(),
        loaded_modules: loaded,
        problems,
        unchecked,
    })
}

fn detect_model(path: &Path, bytes: &[u8], entries: &BTreeMap<&str, &Entry>) -> Option<Model> {
    if let Ok(lora) = crate::file::parse(path, bytes)
        && let Some(m) = layout::detect(&lora).known().and_then(Layout::transformer)
    {
        return Some(m);
    }
    // Count module names of each model among the keys.
    [Model::Flux, Model::Sd35Large, Model::Sd35Medium]
        .into_iter()
        .map(|m| {
            let map = key_map(m);
            let hits = entries
                .keys()
                .filter(|k| {
                    PAIRS
                        .iter()
                        .flat_map(|(u, d)| [u, d])
                        .any(|s| k.strip_suffix(s).is_some_and(|m| map.contains_key(m)))
                })
                .count();
            (m, hits)
        })
        .filter(|&(_, hits)| hits > 0)
        .max_by_key(|&(_, hits)| hits)
        .map(|(m, _)| m)
}

/// The shape and dtype rules for one module's up and down factors.
fn factor_problem(up: &Entry, down: &Entry, (rows, in_dim): Target) -> Option<Problem> {
    let float = |d: Dtype| matches!(d, Dtype::F16 | Dtype::Bf16 | Dtype::F32 | Dtype::F64);
    for e in [up, down] {
        if !float(e.dtype) {
            return Some(Problem {
                key: e.key.clone(),
                problem: format!("dtype {} is not a float type: the matmul fails", e.dtype),
            });
        }
    }
    let flat = |shape: &[usize]| -> Option<(usize, usize)> {
        let (&first, rest) = shape.split_first()?;
        Some((first, rest.iter().product()))
    };
    let (Some((up_rows, up_rank)), Some((down_rank, down_in))) =
        (flat(&up.shape), flat(&down.shape))
    else {
        return Some(Problem {
            key: up.key.clone(),
            problem: "a factor is a scalar: the matmul fails".into(),
        });
    };
    if up_rank != down_rank || up_rows != rows || down_in != in_dim {
        return Some(Problem {
            key: up.key.clone(),
            problem: format!(
                "up {:?} @ down {:?} does not give the layer's [{rows}, {in_dim}]: the patch \
                 fails to apply",
                up.shape, down.shape
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests;
