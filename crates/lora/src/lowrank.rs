//! The fast route of the exact truncated SVD of a low-rank product, straight from the f32
//! factors of LoRA modules to the f32 factors of the result, with buffers reused from module
//! to module.
//!
//! The merged delta of a module is `A @ B` with `A = [coef_i * up_i]` (`out x R`) and
//! `B = [down_i]` (`R x in`). With the Gram matrices `A^T A = Ra^T Ra` and
//! `B B^T = Rb^T Rb` (Cholesky, in f64), `A Ra^-1` and `B^T Rb^-1` have orthonormal
//! columns, so the SVD of the small core `Ra Rb^T = Uc S Vc^T` gives the SVD of the product:
//! `U S = A (Ra^-1 Uc S)`, `V = B^T (Rb^-1 Vc)`. That is one Gram product and one thin
//! product per factor, nothing else of size `out` or `in`: no explicit `Q`, no second
//! orthogonalisation pass, no f64 copy of the results.
//!
//! The Gram route is accurate while the factors are well conditioned: the columns of
//! `A Ra^-1` are orthonormal to about `eps * cond(A D^-1)^2`, with `D` the column norms of
//! `A` (the Cholesky factor of a Gram matrix is as accurate as the *column-scaled* matrix is
//! conditioned). [`factored_svd`] measures that condition number on the scaled Cholesky
//! factor and declines (returns `None`) above [`MAX_SCALED_CONDITION`], where `eps * cond^2`
//! could reach `1e-8`; the caller then takes the QR route of [`crate::linalg::product_svd`]
//! (CholeskyQR2, Householder as its fallback). Both routes compute the same exact SVD to
//! rounding, the sign convention of [`crate::linalg`] included.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};

use crate::svd_merge::NOISE_FLOOR;

/// Above this bound on the condition number of the column-scaled factor (a Frobenius-norm
/// bound, at most `R` times the 2-norm one) the Gram route declines. At the bound the
/// columns of `A Ra^-1` are orthonormal to about `sqrt(m) * 1e-16 * 1e6 < 1e-8`.
pub(crate) const MAX_SCALED_CONDITION: f64 = 1e3;

/// One input's share of a module's delta: `coef * up @ down`, factors row-major as stored
/// in a [`crate::Module`] (`up`: `out x rank`, `down`: `rank x in`).
pub(crate) struct Part<'a> {
    pub up: &'a [f32],
    pub down: &'a [f32],
    pub rank: usize,
    pub coef: f64,
}

/// The truncated SVD of a module's delta as LoRA factors: `up = U_k S_k` (`out x k`,
/// row-major) and `down = V_k^T` (`k x in`, row-major), f32, the sign convention applied;
/// columns past the singular values above the noise floor are zero. `s` holds every
/// computed singular value (at most `R` of them), non-increasing.
#[derive(Debug, Clone)]
pub(crate) struct Factored {
    pub s: Vec<f64>,
    pub k: usize,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
}

/// Buffers one thread reuses from module to module: the f64 stacked factors and the f64
/// results before their rounding to f32. Allocated once per worker, so fresh pages are
/// touched (and zeroed by the kernel) once, not once per module.
#[derive(Default)]
pub(crate) struct Workspace {
    at: Vec<f64>,
    bt: Vec<f64>,
    ut: Vec<f64>,
    v: Vec<f64>,
    /// Scratch of the SVD of the core.
    svd_mem: Option<(usize, faer::dyn_stack::MemBuffer)>,
    /// Scratch of the quantile selection.
    pub(crate) select: crate::linalg::SelectScratch,
}

/// One [`Workspace`] per worker thread of the current rayon pool, for the length of one
/// operation (so buffers are reused across modules and freed at the end).
pub(crate) struct Workspaces(Vec<std::sync::Mutex<Workspace>>);

impl Workspaces {
    pub(crate) fn new() -> Workspaces {
        let threads = rayon::current_num_threads().max(1);
        Workspaces(
            (0..threads)
                .map(|_| std::sync::Mutex::new(Workspace::default()))
                .collect(),
        )
    }

    /// Runs `f` with this thread's workspace; with a fresh one if that is in use (a thread
    /// that, waiting inside `f`, picked up another module), so this never blocks.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Workspace) -> R) -> R {
        let i = rayon::current_thread_index().unwrap_or(0) % self.0.len();
        match self.0[i].try_lock() {
            Ok(mut ws) => f(&mut ws),
            Err(_) => f(&mut Workspace::default()),
        }
    }
}

/// `buf[..len]`, growing `buf` when it is shorter (new entries zero, old ones kept: every
/// caller overwrites the whole prefix).
fn prefix(buf: &mut Vec<f64>, len: usize) -> &mut [f64] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// The exact SVD of `sum_i coef_i * up_i @ down_i` (`out x in_flat`), truncated to
/// `k = k_of(S)` columns (`S`: the at most `R = sum rank_i` computed singular values);
/// `None` when this route does not apply (`R >= min(out, in_flat)`, a zero or dependent
/// column, a condition number above [`MAX_SCALED_CONDITION`], an SVD that does not
/// converge): the caller then takes the QR route, which handles all of those.
pub(crate) fn factored_svd(
    parts: &[Part<'_>],
    out: usize,
    in_flat: usize,
    k_of: impl FnOnce(&[f64]) -> usize,
    ws: &mut Workspace,
) -> Option<Factored> {
    let r: usize = parts.iter().map(|p| p.rank).sum();
    if r == 0 || r >= out.min(in_flat) {
        return None;
    }
    for p in parts {
        if p.rank == 0 || p.up.len() != out * p.rank || p.down.len() != p.rank * in_flat {
            return None;
        }
    }
    // A^T (r x out, column-major: row t of A is contiguous) and B^T (in x r, column-major:
    // row i of B is contiguous, exactly the memory of down_i).
    let at = prefix(&mut ws.at, r * out);
    let bt = prefix(&mut ws.bt, in_flat * r);
    let mut off = 0;
    for p in parts {
        for (dst, src) in at.chunks_exact_mut(r).zip(p.up.chunks_exact(p.rank)) {
            for (d, &x) in dst[off..off + p.rank].iter_mut().zip(src) {
                *d = f64::from(x) * p.coef;
            }
        }
        for (d, &x) in bt[off * in_flat..(off + p.rank) * in_flat]
            .iter_mut()
            .zip(p.down)
        {
            *d = f64::from(x);
        }
        off += p.rank;
    }
    let at = MatRef::from_column_major_slice(&*at, r, out);
    let bt = MatRef::from_column_major_slice(&*bt, in_flat, r);

    let mut ga = Mat::<f64>::zeros(r, r);
    matmul(
        ga.as_mut(),
        Accum::Replace,
        at,
        at.transpose(),
        1.0,
        Par::Seq,
    );
    let mut gb = Mat::<f64>::zeros(r, r);
    matmul(
        gb.as_mut(),
        Accum::Replace,
        bt.transpose(),
        bt,
        1.0,
        Par::Seq,
    );
    let ga: Vec<f64> = (0..r * r).map(|i| ga[(i % r, i / r)]).collect();
    let gb: Vec<f64> = (0..r * r).map(|i| gb[(i % r, i / r)]).collect();
    let (ra, ra_inv) = gram_factor(&ga, r)?;
    let (rb, rb_inv) = gram_factor(&gb, r)?;

    // The core Ra Rb^T (both upper triangular), column-major.
    let mut core = vec![0f64; r * r];
    for j in 0..r {
        for i in 0..r {
            core[i + j * r] = (i.max(j)..r).map(|p| ra[i + p * r] * rb[j + p * r]).sum();
        }
    }
    let (s, uc, vc) = small_svd(&core, r, &mut ws.svd_mem)?;
    let k = k_of(&s);
    let floor = s.first().copied().unwrap_or(0.0) * NOISE_FLOOR;
    let avail = s.iter().take(k).take_while(|&&x| x > floor).count();

    if avail == 0 {
        let (up, down) = (vec![0f32; out * k], vec![0f32; k * in_flat]);
        return Some(Factored { s, k, up, down });
    }
    // Wa = Ra^-1 Uc S, Wb = Rb^-1 Vc (r x avail); `uc`, `vc` column-major.
    let wa = Mat::from_fn(r, avail, |i, j| {
        (i..r)
            .map(|p| ra_inv[i + p * r] * uc[p + j * r])
            .sum::<f64>()
            * s[j]
    });
    let wb = Mat::from_fn(r, avail, |i, j| {
        (i..r)
            .map(|p| rb_inv[i + p * r] * vc[p + j * r])
            .sum::<f64>()
    });
    // (U S)^T = Wa^T A^T (avail x out, column-major: row t of U S contiguous).
    let ut = prefix(&mut ws.ut, avail * out);
    matmul(
        MatMut::from_column_major_slice_mut(&mut *ut, avail, out),
        Accum::Replace,
        wa.transpose(),
        at,
        1.0,
        Par::Seq,
    );
    // V = B^T Wb (in x avail, column-major: column j is row j of down).
    let v = prefix(&mut ws.v, in_flat * avail);
    matmul(
        MatMut::from_column_major_slice_mut(&mut *v, in_flat, avail),
        Accum::Replace,
        bt,
        wb.as_ref(),
        1.0,
        Par::Seq,
    );
    // The sign convention on the columns of U (U S: the same signs and, but for rounding,
    // the same largest entries).
    let mut best = vec![0f64; avail];
    let mut best_value = vec![0f64; avail];
    for row in ut.chunks_exact(avail) {
        for ((b, bv), &x) in best.iter_mut().zip(best_value.iter_mut()).zip(row) {
            if x.abs() > *b {
                *b = x.abs();
                *bv = x;
            }
        }
    }
    let sign: Vec<f64> = best_value
        .iter()
        .map(|&x| if x < 0.0 { -1.0 } else { 1.0 })
        .collect();
    // Written once each (no zero-filling first): rows of `up` are the rows of U S then
    // zeros up to k; rows of `down` the columns of V, then zero rows up to k.
    let mut up = Vec::with_capacity(out * k);
    for src in ut.chunks_exact(avail) {
        up.extend(src.iter().zip(&sign).map(|(&x, &sg)| (x * sg) as f32));
        up.extend(std::iter::repeat_n(0f32, k - avail));
    }
    let mut down = Vec::with_capacity(k * in_flat);
    for (src, &sg) in v.chunks_exact(in_flat).zip(&sign) {
        down.extend(src.iter().map(|&x| (x * sg) as f32));
    }
    down.resize(k * in_flat, 0.0);
    Some(Factored { s, k, up, down })
}

/// The SVD `(S, U, V)` of a small square matrix (`n x n`, column-major; `U`, `V` returned
/// column-major), sequential (the caller runs one module per thread), its scratch kept in
/// `mem` from call to call (tagged by the size it was made for).
fn small_svd(
    a: &[f64],
    n: usize,
    mem: &mut Option<(usize, faer::dyn_stack::MemBuffer)>,
) -> Option<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::svd::{self, ComputeSvdVectors};
    if mem.as_ref().map(|(size, _)| *size) != Some(n) {
        let req = svd::svd_scratch::<f64>(
            n,
            n,
            ComputeSvdVectors::Thin,
            ComputeSvdVectors::Thin,
            Par::Seq,
            Default::default(),
        );
        *mem = Some((n, MemBuffer::new(req)));
    }
    let (_, buf) = mem.as_mut()?;
    let mut s = faer::diag::Diag::<f64>::zeros(n);
    let mut u = vec![0f64; n * n];
    let mut v = vec![0f64; n * n];
    svd::svd(
        MatRef::from_column_major_slice(a, n, n),
        s.as_mut(),
        Some(MatMut::from_column_major_slice_mut(&mut u, n, n)),
        Some(MatMut::from_column_major_slice_mut(&mut v, n, n)),
        Par::Seq,
        MemStack::new(buf),
        Default::default(),
    )
    .ok()?;
    Some((s.column_vector().iter().copied().collect(), u, v))
}

/// `G = R^T R` for an `n x n` Gram matrix `G` (column-major): `(R, R^-1)`, both upper
/// triangular and column-major, by the Cholesky factor of the unit-diagonal `D^-1 G D^-1`
/// (`D`: the column norms); `None` when a column is zero, `G` is not numerically positive
/// definite, or the scaled condition number exceeds [`MAX_SCALED_CONDITION`].
fn gram_factor(g: &[f64], n: usize) -> Option<(Vec<f64>, Vec<f64>)> {
    let mut d = Vec::with_capacity(n);
    for j in 0..n {
        let x = g[j + j * n];
        if !(x.is_finite() && x > 0.0) {
            return None;
        }
        d.push(x.sqrt());
    }
    // Lower Cholesky factor of the scaled Gram matrix, row-major (row i = l[i*n..]).
    let mut l = vec![0f64; n * n];
    for j in 0..n {
        let row_j = &mut l[j * n..(j + 1) * n];
        let diag = g[j + j * n] / (d[j] * d[j]) - row_j[..j].iter().map(|x| x * x).sum::<f64>();
        if !(diag.is_finite() && diag > 0.0) {
            return None;
        }
        let diag = diag.sqrt();
        row_j[j] = diag;
        for i in j + 1..n {
            let (head, tail) = l.split_at_mut(i * n);
            let row_j = &head[j * n..j * n + j];
            let row_i = &mut tail[..n];
            let dot: f64 = row_i[..j].iter().zip(row_j).map(|(a, b)| a * b).sum();
            row_i[j] = (g[i + j * n] / (d[i] * d[j]) - dot) / diag;
        }
    }
    // L^-1 (lower, row-major), column by column of the identity: forward substitution.
    let mut l_inv = vec![0f64; n * n];
    for j in 0..n {
        for i in j..n {
            let mut x = if i == j { 1.0 } else { 0.0 };
            for p in j..i {
                x -= l[i * n + p] * l_inv[p * n + j];
            }
            l_inv[i * n + j] = x / l[i * n + i];
        }
    }
    let frob = |m: &[f64]| m.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cond = frob(&l) * frob(&l_inv);
    if !(cond.is_finite() && cond <= MAX_SCALED_CONDITION) {
        return None;
    }
    // R = L^T D: R[i, j] = L[j, i] d_j. Column-major R[i + j n]; L row-major L[j n + i].
    let mut r = vec![0f64; n * n];
    let mut r_inv = vec![0f64; n * n];
    for j in 0..n {
        for i in 0..=j {
            r[i + j * n] = l[j * n + i] * d[j];
            // R^-1 = D^-1 L^-T: R^-1[i, j] = L^-1[j, i] / d_i.
            r_inv[i + j * n] = l_inv[j * n + i] / d[i];
        }
    }
    Some((r, r_inv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::{self, Spectral};
    use crate::svd_merge::truncate;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// `sum coef_i up_i down_i` as an f64 matrix.
    fn dense(parts: &[Part<'_>], out: usize, in_flat: usize) -> Mat<f64> {
        let mut m = Mat::<f64>::zeros(out, in_flat);
        for p in parts {
            for i in 0..out {
                for j in 0..in_flat {
                    m[(i, j)] += (0..p.rank)
                        .map(|q| {
                            f64::from(p.up[i * p.rank + q])
                                * f64::from(p.down[q * in_flat + j])
                                * p.coef
                        })
                        .sum::<f64>();
                }
            }
        }
        m
    }

    fn product(up: &[f32], down: &[f32], out: usize, k: usize, in_flat: usize) -> Mat<f64> {
        Mat::from_fn(out, in_flat, |i, j| {
            (0..k)
                .map(|q| f64::from(up[i * k + q]) * f64::from(down[q * in_flat + j]))
                .sum()
        })
    }

    #[test]
    fn the_gram_route_equals_the_dense_truncated_svd() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut ws = Workspace::default();
        // (out, in, ranks, k): k below, at and above R (zero padding).
        for &(out, in_flat, ranks, k) in &[
            (60, 45, &[3usize, 4][..], 4),
            (80, 33, &[4, 4, 4][..], 8),
            (50, 70, &[2][..], 2),
            (90, 40, &[5, 3][..], 12),
            (300, 200, &[8, 8, 8][..], 8),
        ] {
            let factors: Vec<(Vec<f32>, Vec<f32>, usize, f64)> = ranks
                .iter()
                .map(|&r| {
                    let coef = rng.random_range(-2.0..2.0);
                    (
                        random(out * r, &mut rng),
                        random(r * in_flat, &mut rng),
                        r,
                        coef,
                    )
                })
                .collect();
            let parts: Vec<Part<'_>> = factors
                .iter()
                .map(|(up, down, rank, coef)| Part {
                    up,
                    down,
                    rank: *rank,
                    coef: *coef,
                })
                .collect();
            let m = dense(&parts, out, in_flat);
            let f = factored_svd(&parts, out, in_flat, |_| k, &mut ws).expect("Gram route");
            let reference: Spectral = linalg::dense_svd(&m).expect("dense");
            let (want_up, want_down) = truncate(&reference, k, out, in_flat);
            // Same singular values, same truncated delta, same signs (so the same factors).
            for (a, b) in f.s.iter().zip(&reference.s) {
                assert!((a - b).abs() <= 1e-12 * reference.s[0], "{a} vs {b}");
            }
            let got = product(&f.up, &f.down, out, k, in_flat);
            let want = product(&want_up, &want_down, out, k, in_flat);
            let err = (&got - &want).norm_l2() / want.norm_l2();
            assert!(err < 1e-6, "{out}x{in_flat} {ranks:?} k={k}: {err}");
            let factor_err =
                f.up.iter()
                    .zip(&want_up)
                    .chain(f.down.iter().zip(&want_down))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
            assert!(factor_err < 1e-5, "factors differ by {factor_err}");
            assert_eq!((f.up.len(), f.down.len()), (out * k, k * in_flat));
        }
    }

    #[test]
    fn the_gram_route_declines_what_it_cannot_do_exactly() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let mut ws = Workspace::default();
        let (out, in_flat) = (40, 30);
        let down = random(2 * in_flat, &mut rng);
        // Two nearly parallel columns of `up`: well above the condition bound.
        let mut up = random(out * 2, &mut rng);
        for i in 0..out {
            up[i * 2 + 1] = up[i * 2] + 1e-7 * up[i * 2 + 1];
        }
        let part = |up| Part {
            up,
            down: &down,
            rank: 2,
            coef: 1.0,
        };
        assert!(factored_svd(&[part(&up)], out, in_flat, |_| 2, &mut ws).is_none());
        // A zero column.
        let zero: Vec<f32> = (0..out * 2)
            .map(|i| if i % 2 == 1 { 0.0 } else { 1.0 })
            .collect();
        assert!(factored_svd(&[part(&zero)], out, in_flat, |_| 2, &mut ws).is_none());
        // Rank not below both dimensions.
        let short = random(2 * 2, &mut rng);
        assert!(factored_svd(&[part(&short)], 2, in_flat, |_| 2, &mut ws).is_none());
        // Lengths that disagree with the shape.
        assert!(factored_svd(&[part(&up[1..])], out, in_flat, |_| 2, &mut ws).is_none());
        // A well-conditioned one is taken.
        let fine = random(out * 2, &mut rng);
        assert!(factored_svd(&[part(&fine)], out, in_flat, |_| 2, &mut ws).is_some());
    }
}
