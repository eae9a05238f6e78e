//! The linear algebra under every operation: the exact truncated SVD of a low-rank product
//! `A @ B` by QR of the factors and an SVD of the small core, the dense SVD used by the
//! reference path, and the one sign convention both share.
//!
//! Sign convention: singular vectors are unique only up to sign (and rotation inside equal
//! singular values). We flip each pair `(u_i, v_i)` so that the entry of largest magnitude
//! of `u_i` is positive (the first such entry on ties). kohya's clamp depends on these signs,
//! so the fast path and the dense reference must agree on them.

use faer::{Mat, MatRef};

/// A truncated SVD `U diag(S) Vt` with the sign convention applied.
#[derive(Debug, Clone)]
pub struct Spectral {
    /// `m x k`, orthonormal columns.
    pub u: Mat<f64>,
    /// `k` non-negative values, non-increasing.
    pub s: Vec<f64>,
    /// `n x k`, orthonormal columns (the rows of `Vt`, stored as columns so each is
    /// contiguous).
    pub v: Mat<f64>,
}

/// Element types the dense path runs in: f64 for the test reference, f32 for what kohya does.
pub trait DenseScalar: faer::traits::RealField + Copy + Send + Sync {
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl DenseScalar for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

impl DenseScalar for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}

/// A row-major f32 buffer as an f64 matrix, each entry multiplied by `scale`.
pub fn mat_from_rows(data: &[f32], rows: usize, cols: usize, scale: f64) -> Mat<f64> {
    let mut m = Mat::<f64>::zeros(rows, cols);
    for j in 0..cols {
        let col = m.col_as_slice_mut(j);
        for (i, x) in col.iter_mut().enumerate() {
            *x = f64::from(data[i * cols + j]) * scale;
        }
    }
    m
}

/// The transpose of a row-major f32 buffer (`rows x cols`) as an f64 `cols x rows` matrix:
/// each row becomes a contiguous column.
pub fn mat_from_rows_transposed(data: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    let mut m = Mat::<f64>::zeros(cols, rows);
    for (j, row) in data.chunks_exact(cols.max(1)).take(rows).enumerate() {
        for (x, &y) in m.col_as_slice_mut(j).iter_mut().zip(row) {
            *x = f64::from(y);
        }
    }
    m
}

/// The exact SVD of `a @ bt^T` (`a`: m x R, `bt`: n x R): all its at most `min(m, n, R)`
/// possibly non-zero singular values, and the singular vectors of the first
/// `choose_k(&s)` of them. When `R` is smaller than both `m` and `n` the `m x n` product is
/// never formed: `a = Qa Ra`, `bt = Qb Rb`, and the SVD of the small core
/// `Ra Rb^T = Uc S Vc^T` gives `U = Qa Uc`, `V = Qb Vc`, computed for the `k` wanted
/// columns only (see [`ThinQr`] for how the QRs are taken). Returns `None` when the SVD does
/// not converge.
pub fn product_svd(
    a: MatRef<'_, f64>,
    bt: MatRef<'_, f64>,
    choose_k: impl FnOnce(&[f64]) -> usize,
) -> Option<Spectral> {
    let (m, r, n) = (a.nrows(), a.ncols(), bt.nrows());
    if r >= m.min(n) {
        return dense_svd(&(a * bt.transpose()));
    }
    let qa = ThinQr::of(a);
    let qb = ThinQr::of(bt);
    let core = qa.r() * qb.r().transpose();
    let svd = core.thin_svd().ok()?;
    let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    let k = choose_k(&s).min(s.len());
    let u = qa.q_times(svd.U().subcols(0, k), m);
    let v = qb.q_times(svd.V().subcols(0, k), n);
    Some(with_sign_convention(u, s, v))
}

/// A thin QR of a tall matrix (`m x r`, `r` small). Well-conditioned factors, the common
/// case for LoRA factors, take CholeskyQR2 (two Gram-matrix passes: matrix products, about
/// 5x faster than Householder for `r <= 32` here); rank-deficient or ill-conditioned ones
/// (where the Gram matrix would lose accuracy) fall back to Householder QR. Both give the
/// same `Q R` to rounding, so results do not depend on which path ran.
enum ThinQr {
    /// `Q` explicit (`m x r`, orthonormal columns), `R` upper triangular.
    Explicit {
        q: Mat<f64>,
        r: Mat<f64>,
    },
    Householder(faer::linalg::solvers::Qr<f64>),
}

/// CholeskyQR2 is accurate while `cond(a) < ~1e7`; the Cholesky factor's diagonal bounds
/// the condition number from below, so anything with a smaller ratio takes Householder.
const CHOLESKY_QR_MIN_DIAG_RATIO: f64 = 1e-6;

impl ThinQr {
    fn of(a: MatRef<'_, f64>) -> ThinQr {
        match cholesky_qr2(a) {
            Some((q, r)) => ThinQr::Explicit { q, r },
            None => ThinQr::Householder(a.qr()),
        }
    }

    fn r(&self) -> Mat<f64> {
        match self {
            ThinQr::Explicit { r, .. } => r.clone(),
            ThinQr::Householder(qr) => qr.thin_R().to_owned(),
        }
    }

    /// `Q @ small` (`small`: r x k) as an `m x k` matrix.
    fn q_times(&self, small: MatRef<'_, f64>, m: usize) -> Mat<f64> {
        match self {
            ThinQr::Explicit { q, .. } => q * small,
            ThinQr::Householder(qr) => apply_q(qr, small, m),
        }
    }
}

/// `a = Q R` by two rounds of `G = X^T X = L L^T`, `X <- X L^-T`; `None` when a Gram matrix
/// is not numerically positive definite enough for the result to be accurate.
fn cholesky_qr2(a: MatRef<'_, f64>) -> Option<(Mat<f64>, Mat<f64>)> {
    let (q1, r1) = cholesky_qr_step(a)?;
    let (q, r2) = cholesky_qr_step(q1.as_ref())?;
    Some((q, r2 * r1))
}

fn cholesky_qr_step(a: MatRef<'_, f64>) -> Option<(Mat<f64>, Mat<f64>)> {
    let gram = a.transpose() * a;
    let l = small_cholesky(&gram)?;
    let r = l.transpose().to_owned();
    let q = a * lower_triangular_inverse(&l).transpose();
    Some((q, r))
}

/// Cholesky factor `L` (lower) of a small symmetric matrix, refusing near-singular ones.
fn small_cholesky(g: &Mat<f64>) -> Option<Mat<f64>> {
    let n = g.nrows();
    let mut l = Mat::<f64>::zeros(n, n);
    let mut max_diag = 0.0f64;
    for j in 0..n {
        let mut d = g[(j, j)];
        for p in 0..j {
            d -= l[(j, p)] * l[(j, p)];
        }
        if !d.is_finite() || d <= 0.0 {
            return None;
        }
        let d = d.sqrt();
        max_diag = max_diag.max(d);
        l[(j, j)] = d;
        for i in j + 1..n {
            let mut x = g[(i, j)];
            for p in 0..j {
                x -= l[(i, p)] * l[(j, p)];
            }
            l[(i, j)] = x / d;
        }
    }
    let min_diag = (0..n).map(|j| l[(j, j)]).fold(f64::INFINITY, f64::min);
    (min_diag >= max_diag * CHOLESKY_QR_MIN_DIAG_RATIO).then_some(l)
}

/// The inverse of a small lower-triangular matrix with a non-zero diagonal.
pub(crate) fn lower_triangular_inverse(l: &Mat<f64>) -> Mat<f64> {
    let n = l.nrows();
    let mut inv = Mat::<f64>::zeros(n, n);
    for j in 0..n {
        inv[(j, j)] = 1.0 / l[(j, j)];
        for i in j + 1..n {
            let mut x = 0.0;
            for p in j..i {
                x -= l[(i, p)] * inv[(p, j)];
            }
            inv[(i, j)] = x / l[(i, i)];
        }
    }
    inv
}

/// `Q @ [small; 0]` for the thin `Q` of a QR, by applying its Householder reflectors.
fn apply_q(qr: &faer::linalg::solvers::Qr<f64>, small: MatRef<'_, f64>, m: usize) -> Mat<f64> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::householder;
    let k = small.ncols();
    let mut out = Mat::<f64>::zeros(m, k);
    out.as_mut().subrows_mut(0, small.nrows()).copy_from(small);
    let basis = qr.Q_basis();
    let coeff = qr.Q_coeff();
    let mut mem = MemBuffer::new(
        householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
            m,
            coeff.nrows(),
            k,
        ),
    );
    householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        basis,
        coeff,
        faer::Conj::No,
        out.as_mut(),
        faer::Par::Seq,
        MemStack::new(&mut mem),
    );
    out
}

/// The thin SVD of a dense matrix, sign convention applied, in f64.
pub fn dense_svd(m: &Mat<f64>) -> Option<Spectral> {
    let (u, s, v) = dense_svd_in::<f64>(m)?;
    Some(with_sign_convention(u, s, v))
}

/// The thin SVD of a dense matrix in `T` as `(U, S, V)`, widened to f64 (signs not yet
/// fixed).
pub fn dense_svd_in<T: DenseScalar>(m: &Mat<T>) -> Option<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let svd = m.thin_svd().ok()?;
    let u = svd.U();
    let v = svd.V();
    let k = u.ncols();
    let u64 = Mat::from_fn(u.nrows(), k, |i, j| u[(i, j)].to_f64());
    let v64 = Mat::from_fn(v.nrows(), k, |i, j| v[(i, j)].to_f64());
    let s = svd.S().column_vector().iter().map(|x| x.to_f64()).collect();
    Some((u64, s, v64))
}

/// Applies the crate's sign convention (see the module docs) to an SVD `(U, S, V)`.
pub fn with_sign_convention(mut u: Mat<f64>, s: Vec<f64>, mut v: Mat<f64>) -> Spectral {
    for j in 0..u.ncols() {
        let mut best = 0.0f64;
        let mut best_value = 0.0f64;
        for &x in u.col_as_slice(j) {
            if x.abs() > best {
                best = x.abs();
                best_value = x;
            }
        }
        if best_value < 0.0 {
            u.col_as_slice_mut(j).iter_mut().for_each(|x| *x = -*x);
            v.col_as_slice_mut(j).iter_mut().for_each(|x| *x = -*x);
        }
    }
    Spectral { u, s, v }
}

/// `||a @ b||_F` for row-major f32 factors `a` (m x r) and `b` (r x n), exactly and without
/// forming the product: `||Qa Ra Rb^T Qb^T|| = ||Ra Rb^T||`.
pub fn product_frobenius_norm(a: &[f32], b: &[f32], m: usize, r: usize, n: usize) -> f64 {
    if r == 0 || m == 0 || n == 0 {
        return 0.0;
    }
    let a = mat_from_rows(a, m, r, 1.0);
    let bt = mat_from_rows_transposed(b, r, n);
    low_rank_norm(a.as_ref(), bt.as_ref())
}

/// `||a @ bt^T||_F` for f64 factors, through the triangular factors of their QRs.
pub fn low_rank_norm(a: MatRef<'_, f64>, bt: MatRef<'_, f64>) -> f64 {
    if a.ncols() == 0 {
        return 0.0;
    }
    let ra = a.qr();
    let rb = bt.qr();
    let core = ra.thin_R() * rb.thin_R().transpose();
    core.norm_l2()
}

/// kohya's clamp threshold: `torch.quantile(values, q)` with linear interpolation between
/// the two nearest order statistics of the *signed* values.
#[cfg(test)]
pub fn quantile(values: &[f32], q: f64) -> f64 {
    quantile_of(&[values], q, &mut SelectScratch::default())
}

/// Reusable buffers of [`quantile_of`].
#[derive(Default)]
pub(crate) struct SelectScratch {
    hist: Vec<u32>,
    candidates: Vec<u32>,
    sample: Vec<u32>,
}

/// Bits of an order key below the histogram bucket: 4096 buckets (sign, exponent and the
/// top 3 mantissa bits).
const BUCKET_SHIFT: u32 = 20;

/// Values drawn to bracket the wanted order statistics before the one pass over all of them.
const SAMPLE: usize = 1024;

/// A `u32` that orders as [`f32::total_cmp`] orders the floats.
fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// The inverse of [`order_key`].
fn from_order_key(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
}

/// [`quantile`] of the concatenation of `parts`, without concatenating them, exactly (the
/// same two order statistics as a sort gives). Large inputs take one pass: a sample of
/// [`SAMPLE`] values brackets the wanted ranks, the pass counts the values below the
/// bracket and collects those inside it, and a selection inside the bracket finishes. When
/// the bracket misses (an unlucky sample; never wrong, only slower), a radix selection
/// (histogram of the top 12 bits of the order keys, then a selection inside one bucket)
/// takes two more passes.
pub(crate) fn quantile_of(parts: &[&[f32]], q: f64, scratch: &mut SelectScratch) -> f64 {
    let n: usize = parts.iter().map(|p| p.len()).sum();
    if n == 0 {
        return 0.0;
    }
    let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = (pos.floor() as usize).min(n - 1);
    let frac = pos - lo as f64;
    // The highest rank needed: lo, and lo + 1 when interpolating.
    let need_next = frac != 0.0 && lo + 1 < n;
    let last = if need_next { lo + 1 } else { lo };
    let (at_lo, next) = match bracketed_select(parts, n, lo, last, scratch) {
        Some(found) => found,
        None => radix_select(parts, lo, last, scratch),
    };
    let at_lo = f64::from(from_order_key(at_lo));
    if !need_next {
        return at_lo;
    }
    at_lo + (f64::from(from_order_key(next)) - at_lo) * frac
}

/// The order keys of ranks `lo` and `last` (`lo` or `lo + 1`) through a sampled bracket;
/// `None` when the bracket does not hold both.
fn bracketed_select(
    parts: &[&[f32]],
    n: usize,
    lo: usize,
    last: usize,
    scratch: &mut SelectScratch,
) -> Option<(u32, u32)> {
    if n < 4 * SAMPLE {
        return None;
    }
    let at = |mut i: usize| {
        for p in parts {
            match p.get(i) {
                Some(&x) => return order_key(x),
                None => i -= p.len(),
            }
        }
        0
    };
    // A fixed pseudo-random sample (xorshift): strided samples could alias with the
    // columns of a factor.
    let sample = &mut scratch.sample;
    sample.clear();
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ n as u64;
    for _ in 0..SAMPLE {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        sample.push(at((state % n as u64) as usize));
    }
    sample.sort_unstable();
    // Where ranks lo..=last fall in the sample, widened by 4 standard deviations of the
    // sampled rank (binomial) plus a little.
    let p = lo as f64 / n as f64;
    let sd = (SAMPLE as f64 * p * (1.0 - p)).sqrt();
    let margin = 4.0 * sd + 4.0;
    let centre = p * SAMPLE as f64;
    let low_index = (centre - margin).floor();
    let high_index = (centre + margin).ceil() + 1.0;
    let below_key = if low_index <= 0.0 {
        0
    } else {
        sample[low_index as usize]
    };
    let above_key = if high_index >= SAMPLE as f64 {
        u32::MAX
    } else {
        sample[high_index as usize]
    };
    let candidates = &mut scratch.candidates;
    candidates.clear();
    let mut below = 0usize;
    let (low, high) = (from_order_key(below_key), from_order_key(above_key));
    if below_key > order_key(0.0) && above_key < order_key(f32::INFINITY) {
        // Both bounds positive and finite: for the finite values of a factor, the order of
        // the keys is the order of the floats (-0.0 and 0.0 both below), and float
        // comparisons vectorise (one pass to count, one to collect).
        for part in parts {
            below += part.iter().filter(|&&x| x < low).count();
        }
        for part in parts {
            candidates.extend(
                part.iter()
                    .filter(|&&x| x >= low && x <= high)
                    .map(|&x| order_key(x)),
            );
        }
    } else {
        for part in parts {
            for &x in *part {
                let k = order_key(x);
                if k < below_key {
                    below += 1;
                } else if k <= above_key {
                    candidates.push(k);
                }
            }
        }
    }
    let first = lo.checked_sub(below)?;
    let second = last - below;
    if second >= candidates.len() {
        return None;
    }
    let (_, &mut at_lo, above) = candidates.select_nth_unstable(first);
    let next = if second == first {
        at_lo
    } else {
        above.iter().copied().min()?
    };
    Some((at_lo, next))
}

/// The order keys of ranks `lo` and `last` (`lo` or `lo + 1`) by a radix selection.
fn radix_select(
    parts: &[&[f32]],
    lo: usize,
    last: usize,
    scratch: &mut SelectScratch,
) -> (u32, u32) {
    let hist = &mut scratch.hist;
    hist.clear();
    hist.resize(1 << (32 - BUCKET_SHIFT), 0);
    for p in parts {
        for &x in *p {
            hist[(order_key(x) >> BUCKET_SHIFT) as usize] += 1;
        }
    }
    // The bucket holding the lo-th order statistic, and how many values lie below it.
    let mut below = 0usize;
    let mut bucket = hist.len() - 1;
    for (b, &c) in hist.iter().enumerate() {
        if below + c as usize > lo {
            bucket = b;
            break;
        }
        below += c as usize;
    }
    let candidates = &mut scratch.candidates;
    candidates.clear();
    let mut min_above = u32::MAX;
    for p in parts {
        for &x in *p {
            let k = order_key(x);
            let b = (k >> BUCKET_SHIFT) as usize;
            if b == bucket {
                candidates.push(k);
            } else if b > bucket && k < min_above {
                min_above = k;
            }
        }
    }
    let rank = (lo - below).min(candidates.len().saturating_sub(1));
    if candidates.is_empty() {
        return (0, 0);
    }
    let (_, &mut at_lo, above) = candidates.select_nth_unstable(rank);
    // The next order statistic: the smallest above it in its bucket, else in a later one.
    let next = if last == lo {
        at_lo
    } else {
        above.iter().copied().min().unwrap_or(min_above)
    };
    (at_lo, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_mat(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Mat::from_fn(rows, cols, |_, _| rng.random_range(-1.0..1.0))
    }

    #[test]
    fn quantile_matches_torch_linear_interpolation() {
        // torch.quantile(torch.tensor([...]), q) for these cases.
        let cases: &[(&[f32], f64, f64)] = &[
            (&[1.0, 2.0, 3.0, 4.0], 0.5, 2.5),
            (&[4.0, 1.0, 3.0, 2.0], 0.99, 3.97),
            (&[-5.0, 0.0, 5.0], 0.25, -2.5),
            (&[7.0], 0.99, 7.0),
            (&[1.0, 1.0, 1.0], 0.99, 1.0),
        ];
        for &(values, q, want) in cases {
            let got = quantile(values, q);
            assert!(
                (got - want).abs() < 1e-12,
                "{values:?} q={q}: {got} != {want}"
            );
        }
    }

    /// The quantile by sorting the values (the definition), for the radix selection.
    fn quantile_by_sorting(values: &[f32], q: f64) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f32::total_cmp);
        let pos = q * (v.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let frac = pos - lo as f64;
        let at_lo = f64::from(v[lo]);
        match v.get(lo + 1) {
            Some(&next) if frac != 0.0 => at_lo + (f64::from(next) - at_lo) * frac,
            _ => at_lo,
        }
    }

    #[test]
    fn radix_quantile_equals_the_sorted_definition() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut scratch = SelectScratch::default();
        for case in 0..300 {
            // Small inputs take the radix selection, large ones the sampled bracket.
            let n = if case % 3 == 0 {
                rng.random_range(4096..20000)
            } else {
                rng.random_range(1..2000)
            };
            let values: Vec<f32> = (0..n)
                .map(|_| match case % 4 {
                    // few distinct values: ties across the quantile
                    0 => f32::from(rng.random_range(-3i8..4)),
                    // signed zeros and tiny values
                    1 => [0.0, -0.0, 1e-30, -1e-30, 2.5][rng.random_range(0..5)],
                    // a narrow range: everything in one bucket
                    2 => 1.0 + rng.random_range(0.0..1e-3),
                    _ => rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-8..8)),
                })
                .collect();
            let split = rng.random_range(0..=n);
            for q in [0.0, 0.01, 0.5, 0.99, 0.999, 1.0, rng.random_range(0.0..1.0)] {
                let want = quantile_by_sorting(&values, q);
                let parts = [&values[..split], &values[split..]];
                let got = quantile_of(&parts, q, &mut scratch);
                assert_eq!(got.to_bits(), want.to_bits(), "case {case} n {n} q {q}");
                // The fallback alone, on every size.
                let lo = (q * (n - 1) as f64).floor() as usize;
                let last = (lo + 1).min(n - 1);
                let mut sorted = values.clone();
                sorted.sort_by(f32::total_cmp);
                let (a, b) = radix_select(&parts, lo, last, &mut scratch);
                assert_eq!(
                    (from_order_key(a).to_bits(), from_order_key(b).to_bits()),
                    (sorted[lo].to_bits(), sorted[last].to_bits()),
                    "radix, case {case} n {n} q {q}"
                );
            }
        }
        assert_eq!(quantile_of(&[&[], &[]], 0.99, &mut scratch), 0.0);
    }

    #[test]
    fn product_svd_reconstructs_and_follows_the_sign_convention() {
        for &(m, r, n) in &[(40, 3, 25), (10, 12, 8), (5, 5, 5), (64, 8, 9)] {
            let a = random_mat(m, r, 1);
            let bt = random_mat(n, r, 2);
            let exact = &a * bt.transpose();
            let sp = product_svd(a.as_ref(), bt.as_ref(), |s| s.len()).expect("converges");
            let s = Mat::from_fn(
                sp.s.len(),
                sp.s.len(),
                |i, j| if i == j { sp.s[i] } else { 0.0 },
            );
            let back = &sp.u * &s * sp.v.transpose();
            let err = (&back - &exact).norm_l2() / exact.norm_l2();
            assert!(err < 1e-12, "{m}x{r}x{n}: {err}");
            for j in 0..sp.u.ncols() {
                let col: Vec<f64> = (0..m).map(|i| sp.u[(i, j)]).collect();
                let big = col
                    .iter()
                    .copied()
                    .fold(0.0f64, |acc, x| if x.abs() > acc.abs() { x } else { acc });
                assert!(big >= 0.0, "column {j} largest entry {big} is negative");
            }
        }
    }

    #[test]
    fn thin_qr_takes_both_paths_and_both_factor_exactly() {
        // (description, matrix, expect the Cholesky path)
        let well = random_mat(300, 6, 5);
        let mut deficient = random_mat(300, 6, 6);
        for i in 0..300 {
            deficient[(i, 5)] = deficient[(i, 0)] * 2.0;
        }
        let mut ill = random_mat(300, 6, 7);
        for i in 0..300 {
            ill[(i, 5)] = ill[(i, 0)] + 1e-9 * ill[(i, 1)];
        }
        for (what, a, cholesky) in [
            ("well conditioned", &well, true),
            ("rank deficient", &deficient, false),
            ("ill conditioned", &ill, false),
        ] {
            let qr = ThinQr::of(a.as_ref());
            assert_eq!(matches!(qr, ThinQr::Explicit { .. }), cholesky, "{what}");
            let eye = Mat::<f64>::identity(6, 6);
            let q = qr.q_times(eye.as_ref(), 300);
            let back = &q * qr.r();
            let err = (&back - a).norm_l2() / a.norm_l2();
            assert!(err < 1e-13, "{what}: reconstruction error {err}");
            let ortho = (q.transpose() * &q - &eye).norm_l2();
            assert!(ortho < 1e-12, "{what}: orthogonality error {ortho}");
        }
    }

    #[test]
    fn low_rank_norm_equals_dense_norm() {
        let a = random_mat(30, 4, 3);
        let bt = random_mat(17, 4, 4);
        let dense = (&a * bt.transpose()).norm_l2();
        assert!((low_rank_norm(a.as_ref(), bt.as_ref()) - dense).abs() < 1e-12 * dense);
    }
}
