//! kohya's `resize_lora.py`: re-factor each module's `up @ down` to a lower rank, fixed or
//! chosen per module from its singular values, with alpha rescaled so the kept part of the
//! delta is unchanged. The SVD is exact (QR of the factors, SVD of the small core).
//!
//! Index rules, with `S` the full spectrum of length `min(out, in * kh * kw)`, in two
//! versions ([`RankRule`]). [`RankRule::OnePastThreshold`], the default, is what
//! `resize_lora.py` has done for most of its life (every sd-scripts release up to at least
//! the 2026-02 `main`, and this project's reference):
//! - `sv_ratio p`: `i = count(S > S[0] / p)`
//! - `sv_cumulative p`: `i = searchsorted_left(cumsum(S) / sum(S), p) + 1`
//! - `sv_fro p`: `i = searchsorted_left(cumsum(S^2) / sum(S^2), p^2) + 1`
//! - then `i = max(1, min(i, len(S) - 1))` and `new_rank = i + 1`;
//!
//! [`RankRule::ReachThreshold`] is sd-scripts after PR #2194 ("Fix the 'off by 1' problem
//! in dynamically resized LoRA rank"): the same without the `+ 1` in `sv_cumulative` and
//! `sv_fro`, and the clamp `i = max(0, min(i, len(S) - 1))` for all three, so a module can
//! be resized to rank 1. For both:
//! - without a dynamic method `new_rank = --new_rank` (`--new_conv_rank` for every conv);
//! - if `S[0] <= 1e-6` the module is a zero matrix and `new_rank = 1`, else `new_rank` is
//!   capped at `--new_rank` / `--new_conv_rank` (and, unlike kohya, at `len(S)`).

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::Lora;
use crate::error::LoraError;
use crate::linalg;
use crate::lowrank::{self, Factored, Part, Workspaces};
use crate::module::{AlphaStorage, Module, TensorDtype};
use crate::svd_merge::truncated;

/// kohya's `MIN_SV`: a module whose largest singular value is at most this is a zero matrix.
pub const MIN_SINGULAR_VALUE: f64 = 1e-6;

/// kohya's `--dynamic_method` with its `--dynamic_param`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DynamicMethod {
    SvRatio(f64),
    SvFro(f64),
    SvCumulative(f64),
}

impl DynamicMethod {
    /// kohya's name for the method (`sv_ratio`, `sv_fro`, `sv_cumulative`).
    pub fn name(&self) -> &'static str {
        match self {
            DynamicMethod::SvRatio(_) => "sv_ratio",
            DynamicMethod::SvFro(_) => "sv_fro",
            DynamicMethod::SvCumulative(_) => "sv_cumulative",
        }
    }

    pub fn param(&self) -> f64 {
        match *self {
            DynamicMethod::SvRatio(p)
            | DynamicMethod::SvFro(p)
            | DynamicMethod::SvCumulative(p) => p,
        }
    }

    /// Builds a method from kohya's `--dynamic_method` name and `--dynamic_param`.
    pub fn from_name(name: &str, param: f64) -> Result<DynamicMethod, LoraError> {
        match name {
            "sv_ratio" => Ok(DynamicMethod::SvRatio(param)),
            "sv_fro" => Ok(DynamicMethod::SvFro(param)),
            "sv_cumulative" => Ok(DynamicMethod::SvCumulative(param)),
            other => Err(LoraError::InvalidArgument(format!(
                "unknown dynamic method `{other}` (expected sv_ratio, sv_fro or sv_cumulative)"
            ))),
        }
    }
}

/// Options of [`resize`], with kohya's flag names.
#[derive(Debug, Clone, PartialEq)]
pub struct ResizeOptions {
    /// `--new_rank`: the rank of linear modules, or the maximum with a dynamic method.
    pub new_rank: usize,
    /// `--new_conv_rank`: the same for every conv module (1x1 and 3x3).
    pub new_conv_rank: usize,
    pub dynamic: Option<DynamicMethod>,
}

impl Default for ResizeOptions {
    fn default() -> Self {
        ResizeOptions {
            new_rank: 4,
            new_conv_rank: 4,
            dynamic: None,
        }
    }
}

/// What kohya's `--verbose` prints per module.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleResizeStats {
    pub name: String,
    pub new_rank: usize,
    pub new_alpha: f32,
    /// `sum(S[:k]) / sum(S)`.
    pub sum_retained: f64,
    /// `||S[:k]|| / ||S||`.
    pub fro_retained: f64,
    /// `S[0] / S[k - 1]`.
    pub max_ratio: f64,
}

/// Which sd-scripts version's dynamic rank rule a resize reproduces (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RankRule {
    /// sd-scripts before PR #2194: one rank past the first that reaches the target
    /// (`sv_fro`, `sv_cumulative`), never fewer than 2. The default.
    #[default]
    OnePastThreshold,
    /// sd-scripts after PR #2194: the first rank that reaches the target, at least 1.
    ReachThreshold,
}

impl RankRule {
    /// The CLI spelling: `one-past-threshold` or `reach-threshold`.
    pub fn name(self) -> &'static str {
        match self {
            RankRule::OnePastThreshold => "one-past-threshold",
            RankRule::ReachThreshold => "reach-threshold",
        }
    }
}

/// The rank kohya keeps for a module with full spectrum `s` (non-increasing, length
/// `min(out, in * kh * kw)`), at most `max_rank`, by the default [`RankRule`].
pub fn new_rank_for_spectrum(s: &[f64], max_rank: usize, dynamic: Option<DynamicMethod>) -> usize {
    new_rank_for_spectrum_by(s, max_rank, dynamic, RankRule::default())
}

/// [`new_rank_for_spectrum`] by a chosen [`RankRule`].
pub fn new_rank_for_spectrum_by(
    s: &[f64],
    max_rank: usize,
    dynamic: Option<DynamicMethod>,
    rule: RankRule,
) -> usize {
    let Some(&s0) = s.first() else {
        return 1;
    };
    let len = s.len();
    let (extra, floor) = match rule {
        RankRule::OnePastThreshold => (1, 1),
        RankRule::ReachThreshold => (0, 0),
    };
    let mut new_rank = match dynamic {
        None => max_rank,
        Some(method) => {
            let i = match method {
                DynamicMethod::SvRatio(p) => s.iter().filter(|&&x| x > s0 / p).count(),
                DynamicMethod::SvCumulative(p) => {
                    searchsorted_left(&normalised_cumsum(s.iter().copied()), p) + extra
                }
                DynamicMethod::SvFro(p) => {
                    searchsorted_left(&normalised_cumsum(s.iter().map(|x| x * x)), p * p) + extra
                }
            };
            i.min(len.saturating_sub(1)).max(floor) + 1
        }
    };
    if s0 <= MIN_SINGULAR_VALUE {
        new_rank = 1;
    } else if new_rank > max_rank {
        new_rank = max_rank;
    }
    new_rank.min(len).max(1)
}

fn normalised_cumsum(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut acc = 0.0;
    let mut sums: Vec<f64> = values
        .map(|x| {
            acc += x;
            acc
        })
        .collect();
    for x in &mut sums {
        *x /= acc;
    }
    sums
}

/// `torch.searchsorted(sorted, v)` (left): the number of entries strictly below `v`.
fn searchsorted_left(sorted: &[f64], v: f64) -> usize {
    sorted.partition_point(|&x| x < v)
}

/// Resizes every module; returns the new LoRA (metadata updated as kohya does) and the
/// per-module statistics in module-name order.
pub fn resize(
    model: &Lora,
    opts: &ResizeOptions,
) -> Result<(Lora, Vec<ModuleResizeStats>), LoraError> {
    resize_by_rule(model, opts, RankRule::default())
}

/// [`resize`] with the dynamic rank rule of a chosen sd-scripts version.
pub fn resize_by_rule(
    model: &Lora,
    opts: &ResizeOptions,
    rule: RankRule,
) -> Result<(Lora, Vec<ModuleResizeStats>), LoraError> {
    resize_with(model, opts, rule, |name, m, choose_k, workspaces| {
        let part = Part {
            up: &m.up,
            down: &m.down,
            rank: m.rank,
            coef: 1.0,
        };
        let fast = workspaces
            .with(|ws| lowrank::factored_svd(&[part], m.out_dim, m.in_flat(), choose_k, ws));
        if let Some(f) = fast {
            return Ok(f);
        }
        // Full rank, or factors too ill-conditioned for the Gram route: QR of the factors.
        let a = linalg::mat_from_rows(&m.up, m.out_dim, m.rank, 1.0);
        let bt = linalg::mat_from_rows_transposed(&m.down, m.rank, m.in_flat());
        let sp = linalg::product_svd(a.as_ref(), bt.as_ref(), choose_k).ok_or_else(|| {
            LoraError::SvdFailed {
                module: name.to_string(),
            }
        })?;
        let k = choose_k(&sp.s);
        Ok(truncated(sp, k, m.out_dim, m.in_flat()))
    })
}

/// kohya's rank limit of a module: `--new_conv_rank` for every conv, else `--new_rank`.
fn max_rank_of(m: &Module, opts: &ResizeOptions) -> usize {
    if m.kind.is_conv() {
        opts.new_conv_rank
    } else {
        opts.new_rank
    }
}

/// The full spectrum of length `min(out, in * kh * kw)`: computed values, then zeros.
fn padded(s: &[f64], full_len: usize) -> Vec<f64> {
    let mut s = s.to_vec();
    s.resize(full_len.max(s.len()), 0.0);
    s
}

/// The skeleton shared with the dense reference: `svd` gives one module's `up @ down`
/// (without alpha) truncated to the rank its third argument chooses from the computed
/// singular values (kohya's rank rule on the full, zero-padded spectrum).
pub(crate) fn resize_with(
    model: &Lora,
    opts: &ResizeOptions,
    rule: RankRule,
    svd: impl Fn(&str, &Module, &dyn Fn(&[f64]) -> usize, &Workspaces) -> Result<Factored, LoraError>
    + Sync,
) -> Result<(Lora, Vec<ModuleResizeStats>), LoraError> {
    if opts.new_rank == 0 || opts.new_conv_rank == 0 {
        return Err(LoraError::InvalidArgument(
            "new_rank and new_conv_rank must be at least 1".into(),
        ));
    }
    model.validate()?;
    if let Some(d) = opts.dynamic
        && !(d.param().is_finite() && d.param() > 0.0)
    {
        return Err(LoraError::InvalidArgument(format!(
            "dynamic_param {} must be a positive number",
            d.param()
        )));
    }
    let workspaces = Workspaces::new();
    let results: Result<Vec<(String, Module, ModuleResizeStats)>, LoraError> = model
        .modules
        .par_iter()
        .map(|(name, m)| {
            let full_len = m.out_dim.min(m.in_flat());
            let max_rank = max_rank_of(m, opts);
            let choose_k = |s: &[f64]| {
                new_rank_for_spectrum_by(&padded(s, full_len), max_rank, opts.dynamic, rule)
            };
            let Factored { s, k, up, down } = svd(name, m, &choose_k, &workspaces)?;
            let s = padded(&s, full_len);
            let new_alpha = m.scale() * k as f32;
            let total: f64 = s.iter().map(|x| x.abs()).sum();
            let kept: f64 = s[..k].iter().map(|x| x.abs()).sum();
            let fro_total: f64 = s.iter().map(|x| x * x).sum::<f64>().sqrt();
            let fro_kept: f64 = s[..k].iter().map(|x| x * x).sum::<f64>().sqrt();
            let stats = ModuleResizeStats {
                name: name.clone(),
                new_rank: k,
                new_alpha,
                sum_retained: kept / total,
                fro_retained: fro_kept / fro_total,
                max_ratio: s[0] / s[k - 1],
            };
            let module = Module {
                kind: m.kind,
                out_dim: m.out_dim,
                in_dim: m.in_dim,
                rank: k,
                up,
                down,
                alpha: new_alpha,
                alpha_storage: AlphaStorage::Float,
                dtype: TensorDtype::F32,
            };
            Ok((name.clone(), module, stats))
        })
        .collect();
    let results = results?;
    let old_dim = model.modules.values().map(|m| m.rank).max().unwrap_or(0);
    let last_alpha = results.last().map_or(0.0, |(_, m, _)| m.alpha);
    let mut stats = Vec::with_capacity(results.len());
    let mut modules = BTreeMap::new();
    for (name, module, st) in results {
        modules.insert(name, module);
        stats.push(st);
    }
    let metadata = resize_metadata(&model.metadata, opts, old_dim, last_alpha);
    Ok((Lora { modules, metadata }, stats))
}

/// kohya's metadata update after a resize: `ss_training_comment` gets a note prepended,
/// `ss_network_dim` / `ss_network_alpha` become the new values or `Dynamic`.
pub fn resize_metadata(
    old: &BTreeMap<String, String>,
    opts: &ResizeOptions,
    old_dim: usize,
    last_alpha: f32,
) -> BTreeMap<String, String> {
    let mut md = old.clone();
    md.remove("sshs_model_hash");
    md.remove("sshs_legacy_hash");
    let comment = old.get("ss_training_comment").cloned().unwrap_or_default();
    match opts.dynamic {
        None => {
            let conv_desc = if opts.new_rank == opts.new_conv_rank {
                String::new()
            } else {
                format!(" (conv: {})", opts.new_conv_rank)
            };
            md.insert(
                "ss_training_comment".into(),
                format!(
                    "dimension is resized from {old_dim} to {}{conv_desc}; {comment}",
                    opts.new_rank
                ),
            );
            md.insert("ss_network_dim".into(), opts.new_rank.to_string());
            md.insert(
                "ss_network_alpha".into(),
                python_float(f64::from(last_alpha)),
            );
        }
        Some(d) => {
            md.insert(
                "ss_training_comment".into(),
                format!(
                    "Dynamic resize with {}: {} from {old_dim}; {comment}",
                    d.name(),
                    python_float(d.param())
                ),
            );
            md.insert("ss_network_dim".into(), "Dynamic".into());
            md.insert("ss_network_alpha".into(), "Dynamic".into());
        }
    }
    md
}

/// Python's `str(float)`: the shortest round-trip digits, `.0` on integers, exponent
/// notation below 1e-4 and from 1e16.
pub(crate) fn python_float(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "nan".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    if x.fract() == 0.0 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DynamicMethod::*;

    #[test]
    fn index_rules_on_crafted_spectra() {
        // (spectrum, max rank, method, expected new rank), worked by hand from the rules.
        let cases: &[(&[f64], usize, Option<DynamicMethod>, usize)] = &[
            // REFERENCE.md's example: cumsum(S^2)/sum = (0.981, ...), p^2 = 0.5625 -> 2.
            (&[8.0, 1.0, 0.5, 0.1], 8, Some(SvFro(0.75)), 2),
            (&[8.0, 1.0, 0.5, 0.1], 1, Some(SvFro(0.75)), 1),
            // fro: cumsum(S^2)/sum = (.25,.5,.75,1); p^2 = .5625 -> searchsorted 2 -> i 3 -> 4.
            (&[1.0, 1.0, 1.0, 1.0], 8, Some(SvFro(0.75)), 4),
            // tie exactly on a boundary: p^2 = 0.25 equals cumsum[0]: left search -> 0 -> 2.
            (&[1.0, 1.0, 1.0, 1.0], 8, Some(SvFro(0.5)), 2),
            (&[1.0, 1.0, 1.0, 1.0], 8, Some(SvCumulative(0.5)), 3),
            (&[1.0, 1.0, 1.0, 1.0], 8, Some(SvCumulative(0.51)), 4),
            (&[4.0, 3.0, 2.0, 1.0], 8, Some(SvCumulative(0.4)), 2),
            (&[4.0, 3.0, 2.0, 1.0], 8, Some(SvCumulative(0.41)), 3),
            // ratio: count(S > S0/p): S0/2 = 2 -> {4, 3} = 2 -> 3.
            (&[4.0, 3.0, 2.0, 1.0], 8, Some(SvRatio(2.0)), 3),
            // all equal: count 4 clamped to len-1 = 3 -> 4.
            (&[1.0, 1.0, 1.0, 1.0], 8, Some(SvRatio(2.0)), 4),
            // one dominant value: count 1 -> never fewer than 2.
            (&[10.0, 0.1, 0.0, 0.0], 8, Some(SvRatio(10.0)), 2),
            (&[10.0, 0.1, 0.0, 0.0], 8, Some(SvFro(0.99)), 2),
            // fixed rank, capped by max rank only.
            (&[3.0, 2.0, 1.0, 0.5], 2, None, 2),
            (&[3.0, 2.0, 1.0, 0.5], 4, None, 4),
            // zero matrix rule wins over everything.
            (&[1e-7, 0.0, 0.0], 4, Some(SvFro(0.9)), 1),
            (&[1e-6, 0.0, 0.0], 4, None, 1),
            // capped by the spectrum length 3.
            (&[1.1e-6, 0.0, 0.0], 4, None, 3),
            // length-1 spectrum (a 1-wide layer): rank cannot exceed 1.
            (&[2.0], 4, Some(SvFro(0.5)), 1),
        ];
        for &(s, max_rank, method, want) in cases {
            assert_eq!(
                new_rank_for_spectrum(s, max_rank, method),
                want,
                "S={s:?} max={max_rank} {method:?}"
            );
        }
    }

    #[test]
    fn both_sd_scripts_rank_rules_on_crafted_spectra() {
        use RankRule::*;
        // (spectrum, method, rank before PR #2194, rank after), worked by hand.
        let cases: &[(&[f64], DynamicMethod, usize, usize)] = &[
            // PR #2194's example: cumsum(S)/sum = (0.9, 0.95, 1.0).
            (&[18.0, 1.0, 1.0], SvCumulative(0.94), 3, 2),
            (&[18.0, 1.0, 1.0], SvCumulative(0.95), 3, 2),
            (&[18.0, 1.0, 1.0], SvCumulative(0.96), 3, 3),
            // "almost rank 1": keeping 80% or 90% is rank 1 after the fix, 2 before.
            (&[18.0, 1.0, 1.0], SvCumulative(0.8), 2, 1),
            (&[18.0, 1.0, 1.0], SvCumulative(0.9), 2, 1),
            // sv_fro: cumsum(S^2)/sum = (0.981, ...), p^2 = 0.5625 -> searchsorted 0.
            (&[8.0, 1.0, 0.5, 0.1], SvFro(0.75), 2, 1),
            // (.25, .5, .75, 1) and p^2 = .5625 -> searchsorted 2.
            (&[1.0, 1.0, 1.0, 1.0], SvFro(0.75), 4, 3),
            // p^2 = 1: searchsorted 3 = len - 1 after the clamp either way.
            (&[1.0, 1.0, 1.0, 1.0], SvFro(1.0), 4, 4),
            // sv_ratio: count(S > S0/p) has no +1 to drop; only the clamp differs.
            (&[4.0, 3.0, 2.0, 1.0], SvRatio(2.0), 3, 3),
            // p < 1: no value above S0/p, count 0: before clamps to 1, after keeps 0.
            (&[4.0, 3.0, 2.0, 1.0], SvRatio(0.5), 2, 1),
        ];
        for &(s, method, before, after) in cases {
            let got = [OnePastThreshold, ReachThreshold]
                .map(|rule| new_rank_for_spectrum_by(s, 8, Some(method), rule));
            assert_eq!(got, [before, after], "S={s:?} {method:?}");
        }
        // The default is the rule before the PR; fixed ranks ignore the rule.
        assert_eq!(RankRule::default(), OnePastThreshold);
        for rule in [OnePastThreshold, ReachThreshold] {
            assert_eq!(new_rank_for_spectrum_by(&[3.0, 2.0, 1.0], 2, None, rule), 2);
            assert_eq!(
                new_rank_for_spectrum_by(&[1e-7, 0.0], 4, Some(SvFro(0.9)), rule),
                1
            );
        }
    }

    #[test]
    fn python_float_formatting() {
        let cases = [
            (1.0, "1.0"),
            (0.75, "0.75"),
            (0.25, "0.25"),
            (4.0, "4.0"),
            (1e-5, "1e-05"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float(x), want);
        }
    }
}

#[cfg(test)]
mod reference_tests;
