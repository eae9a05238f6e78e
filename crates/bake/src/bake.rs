//! The merge itself: every module of every LoRA resolved to its checkpoint weight and checked
//! before a byte is written, then the checkpoint streamed tensor by tensor into the output,
//! `W += ratio * alpha / rank * up @ down` added to the adapted ones in f64 and rounded once
//! into the stored (or `save_precision`) dtype.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use slider_lora::{Lora, Module, ModuleKind, Precision};

use crate::error::{BakeError, Misfit};
use crate::targets::{Target, targets};
use crate::tensors::{self, Dtype, Reader};

/// One LoRA to bake in, with its ratio; `label` names it in errors (its file).
pub struct LoraInput<'a> {
    pub label: &'a Path,
    pub lora: &'a Lora,
    pub ratio: f64,
}

/// Options of [`crate::merge_into_model`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BakeOptions {
    /// kohya's `--save_precision`: every floating-point tensor is stored in it. `None` keeps
    /// each tensor's own dtype.
    pub save_precision: Option<Precision>,
}

/// What a bake did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BakeReport {
    /// Tensors written (all of the checkpoint's).
    pub tensors: usize,
    /// Tensors a LoRA changed.
    pub adapted_tensors: usize,
    /// LoRA modules applied, summed over the LoRAs (every module of every LoRA).
    pub modules: usize,
    /// Size of the written file.
    pub bytes: u64,
}

/// One module's contribution to one stored weight.
struct Apply<'a> {
    module: &'a Module,
    rows: Range<usize>,
    /// `ratio * alpha / rank`.
    scale: f64,
}

fn precision_dtype(p: Precision) -> Dtype {
    match p {
        Precision::F32 => Dtype::F32,
        Precision::F16 => Dtype::F16,
        Precision::Bf16 => Dtype::Bf16,
    }
}

/// Checks that `m` fits the weight of shape `shape` (rows `rows` of it): the same delta
/// `out x (in * kh * kw)`, a linear module also fitting a 1x1 conv and back, as loaders do.
fn fit(m: &Module, shape: &[usize], rows: &Option<Range<usize>>) -> Result<Range<usize>, String> {
    let Some((&out_total, rest)) = shape.split_first() else {
        return Err(format!("targets a scalar weight {shape:?}"));
    };
    let rows = rows.clone().unwrap_or(0..out_total);
    let ok_rest = match m.kind {
        ModuleKind::Linear => rest == [m.in_dim] || rest == [m.in_dim, 1, 1],
        ModuleKind::Conv { kh, kw } => {
            rest == [m.in_dim, kh, kw] || ((kh, kw) == (1, 1) && rest == [m.in_dim])
        }
    };
    if m.out_dim != rows.len() || !ok_rest {
        let what = if rows.len() == out_total {
            format!("{shape:?}")
        } else {
            format!("rows {}..{} of {shape:?}", rows.start, rows.end)
        };
        return Err(format!(
            "is {} but the checkpoint's weight is {what}",
            m.base_shape_label()
        ));
    }
    Ok(rows)
}

/// Bakes `loras` into the checkpoint `base`, writing `save_to` atomically. `stop` is asked
/// between tensors; when it says true the output is dropped and `Ok(None)` returned.
pub fn bake(
    base: &Path,
    loras: &[LoraInput<'_>],
    save_to: &Path,
    opts: &BakeOptions,
    stop: &dyn Fn() -> bool,
) -> Result<Option<BakeReport>, BakeError> {
    if loras.is_empty() {
        return Err(BakeError::InvalidArgument(
            "no LoRA to merge (give at least one model)".into(),
        ));
    }
    if let Some(bad) = loras.iter().find(|l| !l.ratio.is_finite()) {
        return Err(BakeError::InvalidArgument(format!(
            "ratio {} of {} is not a finite number",
            bad.ratio,
            bad.label.display()
        )));
    }
    let mut reader = Reader::open(base)?;
    let shapes: BTreeMap<String, Vec<usize>> = reader
        .header
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.shape.clone()))
        .collect();
    let dtypes: BTreeMap<&str, Dtype> = reader
        .header
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.dtype))
        .collect();
    let by_name = targets(&shapes);
    let mut plan: BTreeMap<String, Vec<Apply<'_>>> = BTreeMap::new();
    let mut misfits = Vec::new();
    let mut modules = 0usize;
    for input in loras {
        input.lora.validate()?;
        for (name, m) in &input.lora.modules {
            let misfit = |detail: String| Misfit {
                lora: input.label.to_path_buf(),
                module: name.clone(),
                detail,
            };
            let Some(Target { key, rows }) = by_name.get(name) else {
                misfits.push(misfit(
                    "adapts no weight of this checkpoint (another architecture, or a module kohya's merge does not know)".into(),
                ));
                continue;
            };
            let (Some(shape), Some(&dtype)) = (shapes.get(key), dtypes.get(key.as_str())) else {
                misfits.push(misfit(format!("targets `{key}`, which is missing")));
                continue;
            };
            if !dtype.is_float() {
                misfits.push(misfit(format!("targets `{key}`, stored as {dtype}")));
                continue;
            }
            match fit(m, shape, rows) {
                Ok(rows) => {
                    modules += 1;
                    let scale = input.ratio * f64::from(m.alpha) / m.rank as f64;
                    plan.entry(key.clone()).or_default().push(Apply {
                        module: m,
                        rows,
                        scale,
                    });
                }
                Err(detail) => misfits.push(misfit(format!("(`{key}`) {detail}"))),
            }
        }
    }
    if !misfits.is_empty() {
        return Err(BakeError::DoesNotFit {
            checkpoint: base.to_path_buf(),
            misfits,
        });
    }

    let out_dtype = |d: Dtype| match opts.save_precision {
        Some(p) if d.is_float() => precision_dtype(p),
        _ => d,
    };
    let entries = reader.header.entries.clone();
    let layout: Vec<(String, Dtype, Vec<usize>)> = entries
        .iter()
        .map(|e| (e.key.clone(), out_dtype(e.dtype), e.shape.clone()))
        .collect();
    let header = tensors::header_bytes(&reader.header.metadata, &layout);
    let io = |path: &Path| {
        let path: PathBuf = path.to_path_buf();
        move |source| BakeError::Io { path, source }
    };
    let file = slider_atomic::AtomicFile::create(save_to).map_err(io(save_to))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&header).map_err(io(save_to))?;
    let mut bytes = header.len() as u64;
    let (mut buf, mut encoded) = (Vec::new(), Vec::new());
    let mut adapted = 0usize;
    for entry in &entries {
        if stop() {
            return Ok(None);
        }
        reader.read_next(entry, &mut buf)?;
        if let Some((index, value)) = tensors::first_non_finite(entry.dtype, &buf) {
            return Err(BakeError::NonFinite {
                path: base.to_path_buf(),
                key: entry.key.clone(),
                value,
                index,
            });
        }
        let target = out_dtype(entry.dtype);
        let applies = plan.get(&entry.key);
        let written: &[u8] = if applies.is_none() && target == entry.dtype {
            &buf
        } else {
            let mut w = tensors::decode(entry.dtype, &buf);
            if let Some(applies) = applies {
                adapted += 1;
                let cols = w.len() / entry.shape.first().copied().unwrap_or(1).max(1);
                for a in applies {
                    add_delta(&mut w, cols, a);
                }
            }
            tensors::encode(target, &w, &mut encoded).map_err(|(index, value)| {
                BakeError::Overflow {
                    path: save_to.to_path_buf(),
                    key: entry.key.clone(),
                    dtype: target.to_string(),
                    value,
                    index,
                }
            })?;
            &encoded
        };
        out.write_all(written).map_err(io(save_to))?;
        bytes += written.len() as u64;
    }
    let file = out.into_inner().map_err(|e| BakeError::Io {
        path: save_to.to_path_buf(),
        source: e.into_error(),
    })?;
    file.commit().map_err(io(save_to))?;
    tracing::info!(
        target: "slider_bake",
        "baked {modules} LoRA modules into {adapted} of {} tensors of {} -> {}",
        entries.len(),
        base.display(),
        save_to.display()
    );
    Ok(Some(BakeReport {
        tensors: entries.len(),
        adapted_tensors: adapted,
        modules,
        bytes,
    }))
}

/// `w[rows] += scale * (up @ down)`, rows of `cols` values; each element's product summed
/// over the rank in order, in f64, then scaled once.
fn add_delta(w: &mut [f64], cols: usize, a: &Apply<'_>) {
    let m = a.module;
    let rank = m.rank;
    let start = a.rows.start * cols;
    let end = a.rows.end * cols;
    let Some(block) = w.get_mut(start..end) else {
        return;
    };
    block.par_chunks_mut(cols).enumerate().for_each(|(o, row)| {
        let mut acc = vec![0f64; cols];
        for r in 0..rank {
            let u = f64::from(m.up[o * rank + r]);
            let down = &m.down[r * cols..(r + 1) * cols];
            for (x, &d) in acc.iter_mut().zip(down) {
                *x += u * f64::from(d);
            }
        }
        for (x, d) in row.iter_mut().zip(&acc) {
            *x += a.scale * d;
        }
    });
}
