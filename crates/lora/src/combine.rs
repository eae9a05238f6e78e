//! What every multi-input operation shares: matching modules across inputs (refusing
//! mixed layouts and shape disagreements), stacking their scaled factors, and the minimal
//! kohya metadata of a merged file.

use std::borrow::Cow;
use std::collections::BTreeMap;

use faer::Mat;

use crate::Lora;
use crate::error::{LayoutMismatch, LoraError};
use crate::layout;
use crate::module::Module;

/// One input's share of a module: `ratio * scale * up @ down`.
pub(crate) struct Contribution<'a> {
    pub input: usize,
    pub module: &'a Module,
    pub ratio: f64,
}

/// Inputs of one FLUX.1 / SD3.5 layout written in different namings (kohya, diffusers,
/// ComfyUI), converted exactly to the naming of the first of them, so that the same layer
/// has the same module names in every input. Other inputs are passed through.
pub(crate) fn same_naming<'a>(models: &[&'a Lora]) -> Result<Vec<Cow<'a, Lora>>, LoraError> {
    let detected: Vec<_> = models.iter().map(|l| layout::detect(l)).collect();
    let target = detected.iter().find_map(|r| {
        r.known()
            .filter(|l| l.transformer().is_some())
            .zip(r.naming)
    });
    models
        .iter()
        .zip(&detected)
        .enumerate()
        .map(
            |(i, (&lora, report))| match (target, report.known(), report.naming) {
                (Some((tl, tn)), Some(l), Some(n)) if l == tl && n != tn => {
                    let (converted, _) = crate::convert::convert(lora, tn)?;
                    tracing::info!(
                        input = i + 1,
                        from = n.label(),
                        to = tn.label(),
                        "converted before combining"
                    );
                    Ok(Cow::Owned(converted))
                }
                _ => Ok(Cow::Borrowed(lora)),
            },
        )
        .collect()
}

/// Every module name of any input with its contributions (a module absent from an input
/// contributes zero), after checking that inputs agree on layout and shapes.
pub(crate) fn group_modules<'a>(
    models: &[&'a Lora],
    ratios: &[f64],
) -> Result<Vec<(String, Vec<Contribution<'a>>)>, LoraError> {
    if models.is_empty() {
        return Err(LoraError::InvalidArgument("no input LoRAs".into()));
    }
    if models.len() != ratios.len() {
        return Err(LoraError::InvalidArgument(format!(
            "{} models but {} ratios: give one ratio per model",
            models.len(),
            ratios.len()
        )));
    }
    if let Some(r) = ratios.iter().find(|r| !r.is_finite()) {
        return Err(LoraError::InvalidArgument(format!(
            "ratio {r} is not finite"
        )));
    }
    for lora in models {
        lora.validate()?;
    }
    check_layouts(models)?;
    let mut grouped: BTreeMap<&'a str, Vec<Contribution<'a>>> = BTreeMap::new();
    for (input, (lora, &ratio)) in models.iter().zip(ratios).enumerate() {
        for (name, module) in &lora.modules {
            let entry = grouped.entry(name.as_str()).or_default();
            if let Some(first) = entry.first()
                && !first.module.same_base_shape(module)
            {
                return Err(LoraError::ShapeMismatch {
                    module: name.clone(),
                    first_input: first.input + 1,
                    first_shape: first.module.base_shape_label(),
                    second_input: input + 1,
                    second_shape: module.base_shape_label(),
                });
            }
            entry.push(Contribution {
                input,
                module,
                ratio,
            });
        }
    }
    Ok(grouped
        .into_iter()
        .map(|(name, c)| (name.to_string(), c))
        .collect())
}

/// Two inputs detected as different known UNet layouts (say SD1.5 and SDXL) share no module
/// names, so the per-module shape check cannot see the mix: refuse it here.
fn check_layouts(models: &[&Lora]) -> Result<(), LoraError> {
    let mut first: Option<(usize, layout::Layout)> = None;
    for (i, lora) in models.iter().enumerate() {
        let Some(l) = layout::detect(lora).known() else {
            continue;
        };
        match first {
            None => first = Some((i, l)),
            Some((j, fl)) if fl != l => {
                let example = |lora: &Lora| {
                    lora.modules
                        .iter()
                        .find(|(n, _)| n.starts_with("lora_unet_"))
                        .map(|(n, m)| (n.clone(), m.base_shape_label()))
                        .unwrap_or_default()
                };
                let (first_module, first_shape) = example(models[j]);
                let (second_module, second_shape) = example(lora);
                return Err(LoraError::LayoutMismatch(Box::new(LayoutMismatch {
                    first_input: j + 1,
                    first_layout: fl.label().into(),
                    first_module,
                    first_shape,
                    second_input: i + 1,
                    second_layout: l.label().into(),
                    second_module,
                    second_shape,
                })));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// `A = [ratio_i * scale_i * up_i]` (out x R) and `B^T = [down_i]^T` (in_flat x R), in
/// f64, so that the merged delta is `A @ B`.
pub(crate) fn stacked_factors(contribs: &[Contribution<'_>]) -> (Mat<f64>, Mat<f64>) {
    let first = contribs[0].module;
    let (out, in_flat) = (first.out_dim, first.in_flat());
    let total: usize = contribs.iter().map(|c| c.module.rank).sum();
    let mut a = Mat::<f64>::zeros(out, total);
    let mut bt = Mat::<f64>::zeros(in_flat, total);
    let mut col = 0;
    for c in contribs {
        let m = c.module;
        let s = c.ratio * f64::from(m.scale());
        for j in 0..m.rank {
            for (i, x) in a.col_as_slice_mut(col + j).iter_mut().enumerate() {
                *x = f64::from(m.up[i * m.rank + j]) * s;
            }
            let row = &m.down[j * in_flat..(j + 1) * in_flat];
            for (x, &y) in bt.col_as_slice_mut(col + j).iter_mut().zip(row) {
                *x = f64::from(y);
            }
        }
        col += m.rank;
    }
    (a, bt)
}

/// kohya's `build_minimum_network_metadata`: module, dim and alpha, plus `ss_v2` and
/// `ss_base_model_version` from the first input that has them, plus network args.
pub(crate) fn minimal_metadata(
    models: &[&Lora],
    dim: &str,
    alpha: &str,
    network_args: Option<String>,
) -> BTreeMap<String, String> {
    let mut md = BTreeMap::new();
    md.insert("ss_network_module".into(), "networks.lora".into());
    md.insert("ss_network_dim".into(), dim.into());
    md.insert("ss_network_alpha".into(), alpha.into());
    for key in ["ss_v2", "ss_base_model_version"] {
        if let Some(v) = models.iter().find_map(|m| m.metadata.get(key)) {
            md.insert(key.into(), v.clone());
        }
    }
    if let Some(args) = network_args {
        md.insert("ss_network_args".into(), args);
    }
    md
}
