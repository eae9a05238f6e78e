//! Conversion of FLUX.1 / SD3.5 LoRAs between the kohya, diffusers and ComfyUI layouts,
//! exact in both directions (the delta of every layer is unchanged):
//! - split to fused (diffusers' `to_q`, `to_k`, `to_v` into one `qkv`): the fused down is
//!   the parts' downs stacked and its up is block-diagonal, so the rank is the sum of the
//!   parts' ranks. When all parts share one down factor (a fused LoRA split earlier), that
//!   down is kept and the rank stays.
//! - fused to split: each part keeps the rows of the up factor that belong to it and the
//!   shared down; columns of the up that are zero in a part's rows are dropped, so a
//!   block-diagonal fused module splits back into its parts' ranks.
//! - diffusers files carry no alpha: `alpha / rank` is folded into the up factor; kohya and
//!   ComfyUI outputs store alpha = rank (scale 1) for modules that had none.
//!
//! Text-encoder modules are kept as they are; a module that is not a layer of the detected
//! model in any naming is an error naming it.

use std::collections::BTreeMap;

use crate::Lora;
use crate::error::LoraError;
use crate::layout;
use crate::module::{AlphaStorage, Module, ModuleKind, TensorDtype};
use crate::transformer::{Layer, Naming};

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConvertReport {
    /// The detected layout and the naming converted to.
    pub layout: String,
    pub to: String,
    /// Modules only renamed (possibly with alpha folded or made explicit).
    pub renamed: usize,
    /// Split modules fused into one, with their ranks.
    pub fused: Vec<Fused>,
    /// Fused modules split, with the ranks of the parts written.
    pub split: Vec<Split>,
    /// Text-encoder modules kept as they are.
    pub kept: usize,
}

/// One fused module: the parts' ranks and the rank of the result.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    pub module: String,
    pub part_ranks: Vec<usize>,
    pub rank: usize,
    /// The parts shared one down factor, so the rank did not add up.
    pub shared_down: bool,
}

/// One split module: its rank and the ranks of the parts written (a part whose rows of
/// the up factor are all zero is not written).
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub module: String,
    pub rank: usize,
    pub part_ranks: Vec<usize>,
}

impl ConvertReport {
    /// Lines for the user: the totals and every fusion whose rank added up.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "{} LoRA converted to {} names: {} modules renamed, {} fused, {} split, {} \
             text-encoder modules kept as they are",
            self.layout,
            self.to,
            self.renamed,
            self.fused.len(),
            self.split.len(),
            self.kept
        )];
        let added: Vec<&Fused> = self.fused.iter().filter(|f| !f.shared_down).collect();
        if !added.is_empty() {
            out.push(format!(
                "{} fused modules have a block-diagonal up factor: their rank is the sum of \
                 their parts' ranks (the delta is unchanged; resize to lower it):",
                added.len()
            ));
            for f in added {
                let parts: Vec<String> = f.part_ranks.iter().map(|r| r.to_string()).collect();
                out.push(format!(
                    "  {}: rank {} = {}",
                    f.module,
                    f.rank,
                    parts.join(" + ")
                ));
            }
        }
        out
    }
}

/// Where a module of the input sits among the model's layers.
enum Slot {
    Whole(usize),
    Part(usize, usize),
}

/// Converts `lora` to `to` names. The layout must be a known FLUX.1 or SD3.5 one.
pub fn convert(lora: &Lora, to: Naming) -> Result<(Lora, ConvertReport), LoraError> {
    lora.validate()?;
    let report = layout::detect(lora);
    let Some(layout) = report.known() else {
        return Err(LoraError::InvalidArgument(format!(
            "cannot convert a LoRA of {}: conversion knows the FLUX.1 and SD3.5 layouts",
            report.describe()
        )));
    };
    let Some(model) = layout.transformer() else {
        return Err(LoraError::InvalidArgument(format!(
            "cannot convert a {} LoRA: conversion knows the FLUX.1 and SD3.5 layouts (the \
             UNet layouts are read and written in kohya names only)",
            layout.label()
        )));
    };
    let layers = model.layers();
    let mut index: BTreeMap<String, Slot> = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        index.insert(layer.kohya_name(), Slot::Whole(i));
        index.insert(layer.comfyui_name(), Slot::Whole(i));
        if layer.parts.len() == 1 {
            for name in layer.diffusers_names() {
                index.insert(name, Slot::Whole(i));
            }
        } else {
            for (j, name) in layer.diffusers_names().into_iter().enumerate() {
                index.insert(name, Slot::Part(i, j));
            }
        }
    }
    let mut out = ConvertReport {
        layout: layout.label().into(),
        to: to.label().into(),
        ..ConvertReport::default()
    };
    let mut modules = BTreeMap::new();
    // Per layer: the whole module (by name) and the diffusers parts of a fused layer.
    let mut wholes: BTreeMap<usize, (&str, &Module)> = BTreeMap::new();
    let mut parts: BTreeMap<usize, Vec<Option<&Module>>> = BTreeMap::new();
    for (name, m) in &lora.modules {
        if layout::is_text_encoder(name) {
            modules.insert(name.clone(), m.clone());
            out.kept += 1;
            continue;
        }
        let slot = index.get(name).ok_or_else(|| LoraError::BadModule {
            module: name.clone(),
            detail: format!(
                "not a layer of the {} in kohya, diffusers or ComfyUI names; cannot convert it",
                layout.label()
            ),
        })?;
        let (layer, rows) = match *slot {
            Slot::Whole(i) => (&layers[i], layers[i].out_dim),
            Slot::Part(i, j) => (&layers[i], layers[i].parts[j].rows),
        };
        if m.kind != ModuleKind::Linear || m.out_dim != rows || m.in_dim != layer.in_dim {
            return Err(LoraError::BadModule {
                module: name.clone(),
                detail: format!(
                    "adapts {} but `{}` of the {} is linear [{rows}, {}]",
                    m.base_shape_label(),
                    layer.path,
                    layout.label(),
                    layer.in_dim
                ),
            });
        }
        match *slot {
            Slot::Whole(i) => {
                if let Some((other, _)) = wholes.insert(i, (name, m)) {
                    return Err(LoraError::BadModule {
                        module: name.clone(),
                        detail: format!("`{other}` adapts the same layer `{}`", layer.path),
                    });
                }
            }
            Slot::Part(i, j) => {
                let v = parts
                    .entry(i)
                    .or_insert_with(|| vec![None; layer.parts.len()]);
                v[j] = Some(m);
            }
        }
    }
    for (&i, &(name, _)) in &wholes {
        if parts.contains_key(&i) {
            return Err(LoraError::BadModule {
                module: name.to_string(),
                detail: format!(
                    "the file adapts layer `{}` both whole and by its diffusers parts",
                    layers[i].path
                ),
            });
        }
    }
    for (i, (name, m)) in wholes {
        let layer = &layers[i];
        // diffusers keeps the rows of a swapped layer in the other order.
        let reorder = layer.swap_halves
            && (Naming::of(name) == Some(Naming::Diffusers)) != (to == Naming::Diffusers);
        let m = if reorder { swap_halves(m) } else { m.clone() };
        match to {
            Naming::Kohya | Naming::ComfyUi => {
                modules.insert(whole_name(layer, to), explicit_alpha(m));
                out.renamed += 1;
            }
            Naming::Diffusers if layer.parts.len() == 1 => {
                modules.insert(whole_name(layer, to), fold_alpha(m));
                out.renamed += 1;
            }
            Naming::Diffusers => {
                let (pieces, note) = split(&m, layer);
                modules.extend(pieces);
                out.split.push(note);
            }
        }
    }
    for (i, ps) in parts {
        let layer = &layers[i];
        match to {
            Naming::Kohya | Naming::ComfyUi => {
                let (m, note) = fuse(&ps, layer, whole_name(layer, to));
                modules.insert(note.module.clone(), m);
                out.fused.push(note);
            }
            Naming::Diffusers => {
                for (name, m) in layer.diffusers_names().into_iter().zip(ps) {
                    if let Some(m) = m {
                        modules.insert(name, fold_alpha(m.clone()));
                        out.renamed += 1;
                    }
                }
            }
        }
    }
    let metadata = converted_metadata(&lora.metadata, &modules);
    Ok((Lora { modules, metadata }, out))
}

/// The name of a layer as one module: kohya's or ComfyUI's (in diffusers names, that of
/// its first part, which is the whole layer when it is not fused).
fn whole_name(layer: &Layer, naming: Naming) -> String {
    match naming {
        Naming::Kohya => layer.kohya_name(),
        Naming::ComfyUi => layer.comfyui_name(),
        Naming::Diffusers => layer.diffusers_names().swap_remove(0),
    }
}

/// kohya and ComfyUI files state alpha; a module without one has alpha = rank.
fn explicit_alpha(mut m: Module) -> Module {
    if m.alpha_storage == AlphaStorage::Absent {
        m.alpha_storage = AlphaStorage::Float;
        m.alpha = m.rank as f32;
    }
    m
}

/// diffusers files have no alpha: fold `alpha / rank` into the up factor.
pub(crate) fn fold_alpha(mut m: Module) -> Module {
    let s = m.scale();
    if s != 1.0 {
        for x in &mut m.up {
            *x *= s;
        }
    }
    m.alpha = m.rank as f32;
    m.alpha_storage = AlphaStorage::Absent;
    m
}

/// The up factor's rows with their two halves exchanged.
fn swap_halves(m: &Module) -> Module {
    let mut m = m.clone();
    let half = m.out_dim / 2 * m.rank;
    m.up.rotate_left(half);
    m
}

/// Parts (in the layer's row order, `None` where absent) fused into one module.
fn fuse(parts: &[Option<&Module>], layer: &Layer, name: String) -> (Module, Fused) {
    let present: Vec<(usize, &Module)> = parts
        .iter()
        .enumerate()
        .filter_map(|(j, m)| m.map(|m| (j, m)))
        .collect();
    let offsets = layer.part_offsets();
    let shared = present
        .windows(2)
        .all(|w| w[0].1.rank == w[1].1.rank && w[0].1.down == w[1].1.down);
    let part_ranks: Vec<usize> = present.iter().map(|(_, m)| m.rank).collect();
    let rank = if shared {
        part_ranks.first().copied().unwrap_or(1)
    } else {
        part_ranks.iter().sum()
    };
    let mut up = vec![0f32; layer.out_dim * rank];
    let mut down = Vec::with_capacity(rank * layer.in_dim);
    let mut col = 0;
    for &(j, m) in &present {
        let s = m.scale();
        for row in 0..m.out_dim {
            let src = &m.up[row * m.rank..(row + 1) * m.rank];
            let at = (offsets[j] + row) * rank + col;
            for (dst, &x) in up[at..at + m.rank].iter_mut().zip(src) {
                *dst = if s == 1.0 { x } else { x * s };
            }
        }
        if !shared {
            down.extend_from_slice(&m.down);
            col += m.rank;
        }
    }
    if shared && let Some((_, m)) = present.first() {
        down.extend_from_slice(&m.down);
    }
    let module = Module {
        kind: ModuleKind::Linear,
        out_dim: layer.out_dim,
        in_dim: layer.in_dim,
        rank,
        up,
        down,
        alpha: rank as f32,
        alpha_storage: AlphaStorage::Float,
        dtype: present
            .iter()
            .map(|(_, m)| m.dtype)
            .max()
            .unwrap_or(TensorDtype::F32),
    };
    let note = Fused {
        module: name,
        part_ranks,
        rank,
        shared_down: shared && present.len() > 1,
    };
    (module, note)
}

/// A fused module split into its diffusers parts, each with alpha folded in and only the
/// columns of the up factor that are non-zero in its rows.
fn split(m: &Module, layer: &Layer) -> (Vec<(String, Module)>, Split) {
    let s = m.scale();
    let r = m.rank;
    let in_dim = m.in_dim;
    let mut pieces = Vec::new();
    let mut part_ranks = Vec::new();
    for ((part, name), offset) in layer
        .parts
        .iter()
        .zip(layer.diffusers_names())
        .zip(layer.part_offsets())
    {
        let rows = &m.up[offset * r..(offset + part.rows) * r];
        let cols: Vec<usize> = (0..r)
            .filter(|&c| rows.chunks_exact(r).any(|row| row[c] != 0.0))
            .collect();
        if cols.is_empty() {
            continue;
        }
        let k = cols.len();
        let mut up = Vec::with_capacity(part.rows * k);
        for row in rows.chunks_exact(r) {
            up.extend(
                cols.iter()
                    .map(|&c| if s == 1.0 { row[c] } else { row[c] * s }),
            );
        }
        let mut down = Vec::with_capacity(k * in_dim);
        for &c in &cols {
            down.extend_from_slice(&m.down[c * in_dim..(c + 1) * in_dim]);
        }
        part_ranks.push(k);
        pieces.push((
            name,
            Module {
                kind: ModuleKind::Linear,
                out_dim: part.rows,
                in_dim,
                rank: k,
                up,
                down,
                alpha: k as f32,
                alpha_storage: AlphaStorage::Absent,
                dtype: m.dtype,
            },
        ));
    }
    let note = Split {
        module: layer.path.clone(),
        rank: r,
        part_ranks,
    };
    (pieces, note)
}

/// The input's metadata without its hashes, with `ss_network_dim` / `ss_network_alpha`
/// updated when the conversion changed ranks.
fn converted_metadata(
    old: &BTreeMap<String, String>,
    modules: &BTreeMap<String, Module>,
) -> BTreeMap<String, String> {
    let mut md = old.clone();
    md.remove("sshs_model_hash");
    md.remove("sshs_legacy_hash");
    let mut ranks: Vec<usize> = modules.values().map(|m| m.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    if let Some(dim) = md.get("ss_network_dim") {
        let now = match ranks.as_slice() {
            [r] => r.to_string(),
            _ => "Dynamic".to_string(),
        };
        if *dim != now {
            md.insert("ss_network_dim".into(), now.clone());
            md.insert("ss_network_alpha".into(), now);
        }
    }
    md
}

#[cfg(test)]
mod tests;
