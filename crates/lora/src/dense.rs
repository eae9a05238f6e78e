//! The dense path, as kohya's scripts compute: materialise every module's full `out x in`
//! delta and run a full (thin) SVD on it. In f64 it is the test reference the fast path is
//! checked against; in f32 it is the baseline of the benchmark. Same sign convention,
//! rank rules and clamp as the fast path (shared code), only the SVD route differs.

use faer::Mat;

use crate::combine::Contribution;
use crate::error::LoraError;
use crate::linalg::{self, DenseScalar};
use crate::module::Module;
use crate::resize::{
    ModuleResizeStats, RankRule, ResizeOptions, new_rank_for_spectrum, resize_with,
};
use crate::svd_merge::{SvdMergeOptions, clamp_to_quantile, svd_merge_with, truncate, truncated};
use crate::{DynamicMethod, Lora};

/// `scale * up @ down` as a dense `out x (in * kh * kw)` matrix in `T`, times `ratio`.
pub fn dense_delta_in<T: DenseScalar>(m: &Module, ratio: f64) -> Mat<T> {
    product_in(m, ratio * f64::from(m.scale()))
}

/// `factor * up @ down` as a dense matrix in `T`.
fn product_in<T: DenseScalar>(m: &Module, s: f64) -> Mat<T> {
    let up = Mat::<T>::from_fn(m.out_dim, m.rank, |i, j| {
        T::from_f64(f64::from(m.up[i * m.rank + j]) * s)
    });
    let in_flat = m.in_flat();
    let down = Mat::<T>::from_fn(m.rank, in_flat, |i, j| {
        T::from_f64(f64::from(m.down[i * in_flat + j]))
    });
    &up * &down
}

/// The full delta of a module in f64.
pub fn dense_delta(m: &Module) -> Mat<f64> {
    dense_delta_in::<f64>(m, 1.0)
}

/// [`crate::svd_merge`] through full f64 matrices: the reference.
pub fn svd_merge_dense(
    models: &[&Lora],
    ratios: &[f64],
    opts: &SvdMergeOptions,
) -> Result<Lora, LoraError> {
    svd_merge_with(
        models,
        ratios,
        opts,
        |name, contribs: &[Contribution<'_>], k, _| {
            let (out, in_flat) = (contribs[0].module.out_dim, contribs[0].module.in_flat());
            let mut sum = Mat::<f64>::zeros(out, in_flat);
            for c in contribs {
                sum += dense_delta_in::<f64>(c.module, c.ratio);
            }
            let sp = linalg::dense_svd(&sum).ok_or_else(|| LoraError::SvdFailed {
                module: name.to_string(),
            })?;
            Ok(truncated(sp, k, out, in_flat))
        },
    )
}

/// [`crate::resize`] through full f64 matrices: the reference.
pub fn resize_dense(
    model: &Lora,
    opts: &ResizeOptions,
) -> Result<(Lora, Vec<ModuleResizeStats>), LoraError> {
    resize_dense_by_rule(model, opts, RankRule::default())
}

/// [`resize_dense`] with a chosen sd-scripts rank rule.
pub fn resize_dense_by_rule(
    model: &Lora,
    opts: &ResizeOptions,
    rule: RankRule,
) -> Result<(Lora, Vec<ModuleResizeStats>), LoraError> {
    resize_with(model, opts, rule, |name, m, choose_k, _| {
        // kohya's W = up @ down, without alpha.
        let w = product_in::<f64>(m, 1.0);
        let sp = linalg::dense_svd(&w).ok_or_else(|| LoraError::SvdFailed {
            module: name.to_string(),
        })?;
        let k = choose_k(&sp.s);
        Ok(truncated(sp, k, m.out_dim, m.in_flat()))
    })
}

/// One module of kohya's `svd_merge_lora.py` as it computes it, in f32: sum the full
/// deltas, full SVD, truncate to `k`, clamp. Returns `(up, down)`; for the benchmark.
pub fn svd_merge_module_f32(
    parts: &[(&Module, f64)],
    k: usize,
    clamp_quantile: Option<f64>,
) -> Option<(Vec<f32>, Vec<f32>)> {
    let first = parts.first()?.0;
    let mut sum = Mat::<f32>::zeros(first.out_dim, first.in_flat());
    for &(m, ratio) in parts {
        sum += dense_delta_in::<f32>(m, ratio);
    }
    let (u, s, v) = linalg::dense_svd_in::<f32>(&sum)?;
    let sp = linalg::with_sign_convention(u, s, v);
    let (mut up, mut down) = truncate(&sp, k, first.out_dim, first.in_flat());
    if let Some(q) = clamp_quantile {
        clamp_to_quantile(&mut up, &mut down, q);
    }
    Some((up, down))
}

/// One module of kohya's `resize_lora.py` as it computes it, in f32: `W = up @ down`, full
/// SVD, rank rule, truncate. Returns `(up, down, new_rank)`; for the benchmark.
pub fn resize_module_f32(
    m: &Module,
    max_rank: usize,
    dynamic: Option<DynamicMethod>,
) -> Option<(Vec<f32>, Vec<f32>, usize)> {
    let w = product_in::<f32>(m, 1.0);
    let (u, s, v) = linalg::dense_svd_in::<f32>(&w)?;
    let sp = linalg::with_sign_convention(u, s, v);
    let k = new_rank_for_spectrum(&sp.s, max_rank, dynamic);
    let (up, down) = truncate(&sp, k, m.out_dim, m.in_flat());
    Some((up, down, k))
}
