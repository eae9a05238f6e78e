//! kohya's `svd_merge_lora.py`: the weighted sum of the inputs' deltas, re-factored to a
//! chosen rank by SVD, then kohya's quantile clamp. Exact and fast: the SVD is taken of
//! the stacked low-rank factors (see `linalg::product_svd`), never of a full delta.

use rayon::prelude::*;

use crate::Lora;
use crate::combine::{self, Contribution};
use crate::error::LoraError;
use crate::linalg::{self, SelectScratch, Spectral};
use crate::lowrank::{self, Factored, Part, Workspaces};
use crate::module::{AlphaStorage, Module, TensorDtype};

/// kohya's `CLAMP_QUANTILE`.
pub const DEFAULT_CLAMP_QUANTILE: f64 = 0.99;

/// Options of [`svd_merge`], with kohya's flag names.
#[derive(Debug, Clone, PartialEq)]
pub struct SvdMergeOptions {
    /// `--new_rank`: rank of linear and 1x1-conv modules.
    pub new_rank: usize,
    /// `--new_conv_rank`: rank of 3x3 (and larger) conv modules.
    pub new_conv_rank: usize,
    /// The quantile of kohya's clamp (`Some(0.99)` as kohya); `None` keeps the exact merge.
    pub clamp_quantile: Option<f64>,
}

impl Default for SvdMergeOptions {
    fn default() -> Self {
        SvdMergeOptions {
            new_rank: 4,
            new_conv_rank: 4,
            clamp_quantile: Some(DEFAULT_CLAMP_QUANTILE),
        }
    }
}

/// Merges `sum_i ratios[i] * delta_i` and re-factors each module to
/// `k = min(new_rank (new_conv_rank for 3x3 convs), in, out)`: `up = U_k S_k`,
/// `down = Vt_k`, then clamps both to `[-q, q]` with `q` the clamp quantile of their
/// entries. `alpha = k`, stored as an integer like kohya does (scale 1). When the merged
/// delta has fewer than `k` non-zero singular values, the extra columns of `up` and rows of
/// `down` are zero (kohya's are arbitrary unit vectors times a zero singular value).
/// Inputs of one FLUX.1 / SD3.5 model in different layouts are converted exactly to the
/// first one's layout before merging.
pub fn svd_merge(
    models: &[&Lora],
    ratios: &[f64],
    opts: &SvdMergeOptions,
) -> Result<Lora, LoraError> {
    svd_merge_with(models, ratios, opts, |name, contribs, k, workspaces| {
        let first = contribs[0].module;
        let (out, in_flat) = (first.out_dim, first.in_flat());
        let parts: Vec<Part<'_>> = contribs
            .iter()
            .map(|c| Part {
                up: &c.module.up,
                down: &c.module.down,
                rank: c.module.rank,
                coef: c.ratio * f64::from(c.module.scale()),
            })
            .collect();
        let fast = workspaces.with(|ws| lowrank::factored_svd(&parts, out, in_flat, |_| k, ws));
        if let Some(f) = fast {
            return Ok(f);
        }
        // Ranks too high for a low-rank route, or factors too ill-conditioned for the Gram
        // route: QR of the stacked factors.
        let (a, bt) = combine::stacked_factors(contribs);
        let sp = linalg::product_svd(a.as_ref(), bt.as_ref(), |_| k).ok_or_else(|| {
            LoraError::SvdFailed {
                module: name.to_string(),
            }
        })?;
        Ok(truncated(sp, k, out, in_flat))
    })
}

/// [`truncate`] as a [`Factored`].
pub(crate) fn truncated(sp: Spectral, k: usize, out: usize, in_flat: usize) -> Factored {
    let (up, down) = truncate(&sp, k, out, in_flat);
    Factored {
        s: sp.s,
        k,
        up,
        down,
    }
}

/// The skeleton shared with the dense reference: `svd` computes one module's merged delta
/// truncated to `k` (see [`truncate`]) with the buffers of its worker thread; the rest (rank
/// choice, clamp, alpha, metadata) is common.
pub(crate) fn svd_merge_with(
    models: &[&Lora],
    ratios: &[f64],
    opts: &SvdMergeOptions,
    svd: impl Fn(&str, &[Contribution<'_>], usize, &Workspaces) -> Result<Factored, LoraError> + Sync,
) -> Result<Lora, LoraError> {
    validate(opts)?;
    let converted = combine::same_naming(models)?;
    let models: Vec<&Lora> = converted.iter().map(|c| c.as_ref()).collect();
    let models = models.as_slice();
    let grouped = combine::group_modules(models, ratios)?;
    let workspaces = Workspaces::new();
    let modules: Result<Vec<(String, Module)>, LoraError> = grouped
        .par_iter()
        .map(|(name, contribs)| {
            let first = contribs[0].module;
            let wanted = if first.kind.is_spatial_conv() {
                opts.new_conv_rank
            } else {
                opts.new_rank
            };
            let k = wanted.min(first.in_dim).min(first.out_dim);
            let Factored {
                mut up, mut down, ..
            } = svd(name, contribs, k, &workspaces)?;
            if let Some(q) = opts.clamp_quantile {
                workspaces.with(|ws| clamp_to_quantile_with(&mut up, &mut down, q, &mut ws.select));
            }
            let module = Module {
                kind: first.kind,
                out_dim: first.out_dim,
                in_dim: first.in_dim,
                rank: k,
                up,
                down,
                alpha: k as f32,
                alpha_storage: AlphaStorage::Integer,
                dtype: TensorDtype::F32,
            };
            Ok((name.clone(), module))
        })
        .collect();
    let conv = opts.new_conv_rank;
    let network_args = format!("{{\"conv_dim\": {conv}, \"conv_alpha\": {conv}}}");
    let rank = opts.new_rank.to_string();
    Ok(Lora {
        modules: modules?.into_iter().collect(),
        metadata: combine::minimal_metadata(models, &rank, &rank, Some(network_args)),
    })
}

fn validate(opts: &SvdMergeOptions) -> Result<(), LoraError> {
    if opts.new_rank == 0 || opts.new_conv_rank == 0 {
        return Err(LoraError::InvalidArgument(
            "new_rank and new_conv_rank must be at least 1".into(),
        ));
    }
    if let Some(q) = opts.clamp_quantile
        && !(0.0..=1.0).contains(&q)
    {
        return Err(LoraError::InvalidArgument(format!(
            "clamp quantile {q} is outside [0, 1]"
        )));
    }
    Ok(())
}

/// Singular values at most this times the largest are rounding noise: their singular
/// vectors are arbitrary, so both paths replace those triplets by zeros.
pub(crate) const NOISE_FLOOR: f64 = 1e-10;

/// `up = U[:, :k] diag(S[:k])` (out x k) and `down = Vt[:k]` (k x in_flat) as f32,
/// zero-padded when fewer than `k` singular triplets exist above the noise floor.
pub(crate) fn truncate(
    sp: &Spectral,
    k: usize,
    out: usize,
    in_flat: usize,
) -> (Vec<f32>, Vec<f32>) {
    let floor = sp.s.first().copied().unwrap_or(0.0) * NOISE_FLOOR;
    let avail = sp.s.iter().take(k).take_while(|&&s| s > floor).count();
    let mut up = vec![0f32; out * k];
    for j in 0..avail {
        let sj = sp.s[j];
        for (i, &x) in sp.u.col_as_slice(j).iter().enumerate() {
            up[i * k + j] = (x * sj) as f32;
        }
    }
    let mut down = vec![0f32; k * in_flat];
    for (j, row) in down
        .chunks_exact_mut(in_flat.max(1))
        .take(avail)
        .enumerate()
    {
        for (y, &x) in row.iter_mut().zip(sp.v.col_as_slice(j)) {
            *y = x as f32;
        }
    }
    (up, down)
}

/// kohya's clamp: `hi = quantile(cat(up, down), q)`, both clamped to `[-hi, hi]` with
/// torch's semantics (`min(max(x, -hi), hi)`, so a negative `hi` sets everything to `hi`).
pub(crate) fn clamp_to_quantile(up: &mut [f32], down: &mut [f32], q: f64) {
    clamp_to_quantile_with(up, down, q, &mut SelectScratch::default());
}

/// [`clamp_to_quantile`] with reused selection buffers.
pub(crate) fn clamp_to_quantile_with(
    up: &mut [f32],
    down: &mut [f32],
    q: f64,
    scratch: &mut SelectScratch,
) {
    let hi = linalg::quantile_of(&[&*up, &*down], q, scratch) as f32;
    let lo = -hi;
    if hi.is_nan() || hi < lo {
        // torch's min(max(x, lo), hi) with hi < lo is hi everywhere.
        up.fill(hi);
        down.fill(hi);
        return;
    }
    // The same as min(max(x, lo), hi) for the finite values factors hold; written as
    // selects so that it vectorises.
    for values in [up, down] {
        for x in values.iter_mut() {
            let y = if *x < lo { lo } else { *x };
            *x = if y > hi { hi } else { y };
        }
    }
}

#[cfg(test)]
mod tests;
