//! `lint`: would a loader read every tensor of a LoRA file, onto a layer of its model with
//! the right shape, with alphas, dtypes and metadata as it reads them? Each loader's rules
//! are our own reading of its public code, written as data and code here:
//! - ComfyUI (`comfyui.rs`): `comfy/lora.py` `load_lora`, `model_lora_keys_unet`,
//!   `model_lora_keys_clip`; `comfy/utils.py` `unet_to_diffusers`, `flux_to_diffusers`,
//!   `mmdit_to_diffusers`;
//! - AUTOMATIC1111 (`a1111.rs`): `extensions-builtin/Lora/networks.py` `load_network`,
//!   `convert_diffusers_name_to_compvis`, `assign_network_names_to_compvis_modules`,
//!   `network_apply_weights`; `network.py`, `network_lora.py`;
//! - diffusers (`diffusers.rs`): `loaders/lora_pipeline.py` `lora_state_dict` of the SD,
//!   SDXL, FLUX.1 and SD3 loader mixins; `loaders/lora_conversion_utils.py`
//!   `_maybe_map_sgm_blocks_to_diffusers`, `_convert_non_diffusers_lora_to_diffusers`,
//!   `_convert_unet_lora_key`, `_convert_text_encoder_lora_key`,
//!   `_convert_kohya_flux_lora_to_diffusers`; PEFT's strict `load_state_dict` shapes.
//!
//! The model's layers come from the built-in architecture tables (`sd.rs`, `transformer.rs`)
//! or from a real checkpoint's header (`model.rs`). A problem is something the loader would
//! ignore or fail on (`lint` fails); a warning is metadata the loader reads differently from
//! what the file is (the file still loads).

mod a1111;
mod comfyui;
mod diffusers;
pub mod model;
mod sd;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::error::LoraError;
use crate::header::{self, Dtype, Entry};
use crate::layout::{self, Layout};
pub use model::{Family, ModelLayers};

/// A loader whose reading of LoRA files `lint` reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loader {
    ComfyUi,
    A1111,
    Diffusers,
}

impl Loader {
    pub fn label(self) -> &'static str {
        match self {
            Loader::ComfyUi => "comfyui",
            Loader::A1111 => "a1111",
            Loader::Diffusers => "diffusers",
        }
    }
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
    /// Where the model's layers came from (built-in tables or a checkpoint).
    pub model: String,
    /// Modules the loader would apply.
    pub loaded_modules: usize,
    /// Keys the loader would ignore or fail on: any of these makes `lint` fail.
    pub problems: Vec<Problem>,
    /// Metadata the loader reads differently from what the file is; the file still loads.
    pub warnings: Vec<Problem>,
    /// Tensors not checked (text encoders of FLUX.1 / SD3.5 files).
    pub unchecked: Vec<String>,
}

impl LintReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the file `bytes` (`path` labels errors) against `loader`'s reading, onto the
/// layers of `model` (when `None`, the built-in tables of the family the file targets).
pub fn lint(
    path: &Path,
    bytes: &[u8],
    loader: Loader,
    model: Option<&ModelLayers>,
) -> Result<LintReport, LoraError> {
    let header = header::parse(path, bytes)?;
    let entries: BTreeMap<&str, &Entry> =
        header.entries.iter().map(|e| (e.key.as_str(), e)).collect();
    let builtin;
    let layers = match model {
        Some(m) => m,
        None => {
            let family = detect_family(path, bytes, &entries).ok_or_else(|| {
                LoraError::InvalidArgument(format!(
                    "`{}`: no module of this file is a layer of the SD1.x or SDXL UNet or the \
                     FLUX.1 or SD3.5 transformer that lint knows; give the model with --model",
                    path.display()
                ))
            })?;
            builtin = ModelLayers::builtin(family);
            &builtin
        }
    };
    let file = FileView {
        entries,
        metadata: &header.metadata,
    };
    let mut out = Findings::default();
    match loader {
        Loader::ComfyUi => comfyui::read(&file, layers, &mut out),
        Loader::A1111 => a1111::read(path, &file, layers, &mut out)?,
        Loader::Diffusers => diffusers::read(path, &file, layers, &mut out)?,
    }
    network_module_warning(&file, &mut out);
    // One problem per key: the first reason found.
    let mut seen = std::collections::BTreeSet::new();
    out.problems.retain(|p| seen.insert(p.key.clone()));
    Ok(LintReport {
        loader: loader.label().into(),
        layout: layers.family.label().into(),
        model: layers.source.clone(),
        loaded_modules: out.loaded,
        problems: out.problems,
        warnings: out.warnings,
        unchecked: out.unchecked,
    })
}

/// The tensors and metadata of the file being checked.
pub(crate) struct FileView<'a> {
    pub entries: BTreeMap<&'a str, &'a Entry>,
    pub metadata: &'a BTreeMap<String, String>,
}

impl FileView<'_> {
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key).copied()
    }
}

/// What a loader's reading found.
#[derive(Default)]
pub(crate) struct Findings {
    pub loaded: usize,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
    pub unchecked: Vec<String>,
}

impl Findings {
    pub fn problem(&mut self, key: &str, problem: impl Into<String>) {
        self.problems.push(Problem {
            key: key.to_string(),
            problem: problem.into(),
        });
    }

    pub fn warning(&mut self, key: &str, warning: impl Into<String>) {
        self.warnings.push(Problem {
            key: key.to_string(),
            problem: warning.into(),
        });
    }
}

/// Where a module's delta lands: a canonical layer, or a row slice `[start, start + len)`
/// of it (diffusers' q / k / v of a fused layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub layer: String,
    pub rows: Option<(usize, usize)>,
}

impl Target {
    pub fn whole(layer: impl Into<String>) -> Target {
        Target {
            layer: layer.into(),
            rows: None,
        }
    }

    /// The shape the module's delta must have, from `model`'s layer.
    pub fn shape(&self, model: &ModelLayers) -> Option<Vec<usize>> {
        let mut shape = model.shape(&self.layer)?.to_vec();
        if let (Some((_, len)), Some(first)) = (self.rows, shape.first_mut()) {
            *first = len;
        }
        Some(shape)
    }
}

/// How a loader fits a module's factors to its layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fit {
    /// ComfyUI and A1111: `up @ down` flattened, reshaped to the layer's weight; the
    /// element counts must agree (a linear-shaped factor pair on a 1x1 conv loads).
    Reshape,
    /// PEFT (diffusers): `lora_A` / `lora_B` are the layer type's own parameters, loaded with
    /// strict shapes: 2-D for a linear layer, `[r, in, kh, kw]` / `[out, r, 1, 1]` for a conv.
    Strict,
}

/// The dtypes torch's safetensors loader gives all three loaders as float tensors.
pub(crate) fn float_dtype(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::F16 | Dtype::Bf16 | Dtype::F32 | Dtype::F64 | Dtype::F8E4M3 | Dtype::F8E5M2
    )
}

/// The shape and dtype rules for one module's up and down factors against the layer
/// shape `target`; the problem names the offending key.
pub(crate) fn factor_problem(
    up: &Entry,
    down: &Entry,
    target: &[usize],
    fit: Fit,
) -> Option<Problem> {
    for e in [up, down] {
        if !float_dtype(e.dtype) {
            return Some(Problem {
                key: e.key.clone(),
                problem: format!(
                    "dtype {} is not a float type the loader computes with (F16, BF16, F32, \
                     F64, F8_E4M3, F8_E5M2): the patch fails",
                    e.dtype
                ),
            });
        }
    }
    let bad = |what: String| {
        Some(Problem {
            key: up.key.clone(),
            problem: what,
        })
    };
    let (Some((&rows, rest)), Some((&in_first, in_rest))) = (
        target.split_first(),
        target.get(1..).and_then(<[usize]>::split_first),
    ) else {
        return bad(format!("the layer's weight has shape {target:?}"));
    };
    let (Some((&up_rows, up_rest)), Some((&rank, down_rest))) =
        (up.shape.split_first(), down.shape.split_first())
    else {
        return bad("a factor is a scalar: the matmul fails".into());
    };
    let up_rank: usize = up_rest.iter().product();
    match fit {
        Fit::Reshape => {
            let down_in: usize = down_rest.iter().product();
            let layer_in: usize = rest.iter().product();
            if up_rank != rank || up_rows != rows || down_in != layer_in {
                return bad(format!(
                    "up {:?} @ down {:?} does not give the layer's {target:?}: the patch \
                     fails to apply",
                    up.shape, down.shape
                ));
            }
        }
        Fit::Strict => {
            let mut want_down = vec![rank, in_first];
            want_down.extend_from_slice(in_rest);
            let mut want_up = vec![rows, rank];
            want_up.extend(std::iter::repeat_n(1, in_rest.len()));
            if up.shape != want_up || down.shape != want_down {
                let kind = if in_rest.is_empty() { "linear" } else { "conv" };
                return bad(format!(
                    "up {:?} / down {:?} are not the {kind} layer {target:?}'s lora_B {want_up:?} \
                     / lora_A {want_down:?}: loading the state dict fails (size mismatch)",
                    up.shape, down.shape
                ));
            }
        }
    }
    None
}

/// The `.item()` rule: an alpha must hold one element.
pub(crate) fn alpha_problem(alpha: &Entry) -> Option<Problem> {
    (alpha.shape.iter().product::<usize>() != 1).then(|| Problem {
        key: alpha.key.clone(),
        problem: format!(
            "alpha has shape {:?}: `.item()` needs one element, loading fails",
            alpha.shape
        ),
    })
}

/// The family of the file: from the layout our reader detects, else from the module names
/// of its keys in each family's ComfyUI key map (the most permissive of the three).
fn detect_family(path: &Path, bytes: &[u8], entries: &BTreeMap<&str, &Entry>) -> Option<Family> {
    if let Ok(lora) = crate::file::parse(path, bytes) {
        match layout::detect(&lora).known() {
            Some(Layout::Sd1) => return Some(Family::Sd1),
            Some(Layout::Sdxl) => return Some(Family::Sdxl),
            Some(l) => {
                if let Some(m) = l.transformer() {
                    return Some(Family::Transformer(m));
                }
            }
            None => {}
        }
    }
    use crate::transformer::Model;
    [
        Family::Sdxl,
        Family::Sd1,
        Family::Transformer(Model::Flux),
        Family::Transformer(Model::Sd35Large),
        Family::Transformer(Model::Sd35Medium),
    ]
    .into_iter()
    .map(|f| {
        let map = comfyui::key_map(&ModelLayers::builtin(f));
        let hits = entries
            .keys()
            .filter(|k| {
                comfyui::PAIRS
                    .iter()
                    .flat_map(|(u, d)| [u, d])
                    .any(|s| k.strip_suffix(s).is_some_and(|m| map.contains_key(m)))
                    && !layout::is_text_encoder(k)
            })
            .count();
        (f, hits)
    })
    .filter(|&(_, hits)| hits > 0)
    .max_by_key(|&(_, hits)| hits)
    .map(|(f, _)| f)
}

/// kohya's `ss_network_module` names the network that wrote the file; a plain LoRA file
/// (only `lora_up` / `lora_down` / `lora_A` / `lora_B` / `alpha` tensors) said to come from
/// another network kind is read by the loaders as a LoRA regardless.
fn network_module_warning(file: &FileView, out: &mut Findings) {
    const PLAIN: [&str; 6] = [
        "networks.lora",
        "networks.lora_flux",
        "networks.lora_sd3",
        "networks.dylora",
        "lycoris.kohya",
        "lycoris.kohya_flux",
    ];
    let Some(module) = file.metadata.get("ss_network_module") else {
        return;
    };
    let plain = file.entries.keys().all(|k| {
        [
            ".lora_up.weight",
            ".lora_down.weight",
            ".lora_A.weight",
            ".lora_B.weight",
            ".alpha",
        ]
        .iter()
        .any(|s| k.ends_with(s))
    });
    if plain && !PLAIN.contains(&module.as_str()) {
        out.warning(
            "__metadata__.ss_network_module",
            format!(
                "says `{module}`, but every tensor is a plain LoRA factor or alpha: tools that \
                 dispatch on it (kohya's scripts, LyCORIS) would expect that network's tensors"
            ),
        );
    }
}

#[cfg(test)]
mod tests;
