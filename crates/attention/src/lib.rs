//! Softmax attention on the CPU in f32: `softmax(q k^T / sqrt(d)) v` for each head, forward
//! and backward, without an `n_q x n_k` map in memory.
//!
//! The forward walks each head in blocks of [`BLOCK_Q`] queries by [`BLOCK_K`] keys: one
//! matrix product for the block's scores, an online softmax (running row maximum and sum, in
//! base 2 so that one vectorised `2^x` serves), one product into the block's output. It keeps
//! each query row's log-sum-exp, `n_q` values per head, for the backward. The backward
//! recomputes each block's probabilities from `q`, `k` and that log-sum-exp:
//!
//! ```text
//! P  = 2^(S c - lse2)     S = Q_i K_j^T, c = log2(e) / sqrt(d)
//! dV_j += P^T dO_i        dP = dO_i V_j^T        dS = P * (dP - D_i) / sqrt(d)
//! dQ_i += dS K_j          dK_j += dS^T Q_i       D = rowsum(dO * O)
//! ```
//!
//! Heads (and, in the forward, blocks of queries) are independent jobs on rayon's pool; each
//! job's arithmetic is sequential, so the results do not depend on the number of threads.
//! The matrix products are `gemm`'s kernels; the softmax steps are written so that the
//! compiler vectorises them, once per instruction set, with the same results on each.
//!
//! ```
//! use slider_attention::{Dims, backward, forward};
//! let dims = Dims { heads: 1, n_q: 2, n_k: 3, d: 2, d_v: 1 };
//! let (q, k, v) = (vec![0.5; 4], vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0], vec![1.0, 2.0, 3.0]);
//! let (mut out, mut lse) = (vec![0.0; 2], vec![0.0; 2]);
//! forward(dims, &q, &k, &v, &mut out, &mut lse).unwrap();
//! // Scaled scores 0.35, 0.35, 0.71 for both queries: weights 0.29, 0.29, 0.42.
//! assert!((out[0] - 2.1239).abs() < 1e-3 && out[0] == out[1]);
//! let (mut dq, mut dk, mut dv) = (vec![0.0; 4], vec![0.0; 6], vec![0.0; 3]);
//! backward(dims, &q, &k, &v, &out, &lse, &[1.0, 1.0], &mut dq, &mut dk, &mut dv).unwrap();
//! // Each query's probabilities sum to one, so dV sums to the two output gradients.
//! assert!((dv.iter().sum::<f32>() - 2.0).abs() < 1e-5);
//! ```

use rayon::prelude::*;

/// Queries per block: the rows whose output accumulates while the keys stream past.
pub const BLOCK_Q: usize = 64;
/// Keys per block: the columns of one score block (`BLOCK_Q x BLOCK_K` f32, 64 KiB).
pub const BLOCK_K: usize = 256;

/// The shape of one call: `heads` independent attentions (batch times heads), each with
/// `n_q` queries and `n_k` keys of width `d` and values of width `d_v`. Every tensor is
/// row-major and contiguous: `q` is `[heads, n_q, d]`, `k` `[heads, n_k, d]`, `v` and `dv`
/// `[heads, n_k, d_v]`, `out` `[heads, n_q, d_v]`, the log-sum-exp `[heads, n_q]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub heads: usize,
    pub n_q: usize,
    pub n_k: usize,
    pub d: usize,
    pub d_v: usize,
}

/// Buffers that do not fit [`Dims`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttentionError {
    #[error("attention: `{name}` holds {got} values, but {dims:?} needs {want}")]
    Length {
        name: &'static str,
        got: usize,
        want: usize,
        dims: Dims,
    },
    #[error("attention: {0:?} has zero-width keys or values")]
    ZeroWidth(Dims),
}

/// The number of values in each buffer of one call; `dq` and `dk` are as long as `q` and `k`,
/// `d_out` and `dv` as `out` and `v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lengths {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub out: usize,
    pub lse: usize,
}

impl Dims {
    /// The length of every buffer these dims take.
    pub fn lengths(self) -> Lengths {
        let Dims {
            heads,
            n_q,
            n_k,
            d,
            d_v,
        } = self;
        let len = |a: usize, b: usize| heads.saturating_mul(a).saturating_mul(b);
        Lengths {
            q: len(n_q, d),
            k: len(n_k, d),
            v: len(n_k, d_v),
            out: len(n_q, d_v),
            lse: len(n_q, 1),
        }
    }

    /// Each `(name, length, wanted length)` must agree, and neither width may be zero.
    fn check(self, buffers: &[(&'static str, usize, usize)]) -> Result<(), AttentionError> {
        if self.d == 0 || self.d_v == 0 {
            return Err(AttentionError::ZeroWidth(self));
        }
        for &(name, got, want) in buffers {
            if got != want {
                return Err(AttentionError::Length {
                    name,
                    got,
                    want,
                    dims: self,
                });
            }
        }
        Ok(())
    }

    /// [`Dims::check`] of the forward's buffers.
    fn check_forward(
        self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
    ) -> Result<(), AttentionError> {
        let want = self.lengths();
        self.check(&[
            ("q", q.len(), want.q),
            ("k", k.len(), want.k),
            ("v", v.len(), want.v),
            ("out", out.len(), want.out),
            ("lse", lse.len(), want.lse),
        ])
    }

    /// `log2(e) / sqrt(d)`: scores times this are base-2 exponents.
    fn exponent_scale(self) -> f32 {
        std::f32::consts::LOG2_E / (self.d as f32).sqrt()
    }
}

/// `out = softmax(q k^T / sqrt(d)) v` and each query row's log-sum-exp of the scaled scores,
/// in base 2 (what [`backward`] takes). A row with no keys gets zeros and `-inf`.
pub fn forward(
    dims: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<(), AttentionError> {
    dims.check_forward(q, k, v, out, lse)?;
    let Dims {
        heads,
        n_q,
        n_k,
        d,
        d_v,
    } = dims;
    if heads == 0 || n_q == 0 {
        return Ok(());
    }
    let c = dims.exponent_scale();
    out.par_chunks_mut(n_q * d_v)
        .zip(lse.par_chunks_mut(n_q))
        .enumerate()
        .for_each(|(h, (out_h, lse_h))| {
            let q_h = &q[h * n_q * d..(h + 1) * n_q * d];
            let k_h = &k[h * n_k * d..(h + 1) * n_k * d];
            let v_h = &v[h * n_k * d_v..(h + 1) * n_k * d_v];
            out_h
                .par_chunks_mut(BLOCK_Q * d_v)
                .zip(lse_h.par_chunks_mut(BLOCK_Q))
                .enumerate()
                .for_each(|(block, (out_b, lse_b))| {
                    let q0 = block * BLOCK_Q;
                    let rows = lse_b.len();
                    let q_b = &q_h[q0 * d..(q0 + rows) * d];
                    forward_block(dims, c, q_b, k_h, v_h, out_b, lse_b);
                });
        });
    Ok(())
}

/// One block of query rows against every key of its head.
fn forward_block(
    dims: Dims,
    c: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let Dims { n_k, d, d_v, .. } = dims;
    let rows = lse.len();
    let mut row_max = vec![f32::NEG_INFINITY; rows];
    let mut row_sum = vec![0f32; rows];
    let mut scores = vec![0f32; rows * BLOCK_K.min(n_k)];
    out.fill(0.0);
    for k0 in (0..n_k).step_by(BLOCK_K) {
        let cols = BLOCK_K.min(n_k - k0);
        let s = &mut scores[..rows * cols];
        // S = Q K_j^T: K_j's rows are S's columns.
        let k_j = &k[k0 * d..(k0 + cols) * d];
        matmul(rows, cols, d, s, false, (q, 1, d), (k_j, d, 1));
        online_softmax(s, cols, c, &mut row_max, &mut row_sum, out, d_v);
        // O = diag(corr) O + P V_j (the rows were rescaled by `online_softmax`).
        let v_j = &v[k0 * d_v..(k0 + cols) * d_v];
        matmul(rows, d_v, cols, out, true, (s, 1, cols), (v_j, 1, d_v));
    }
    for r in 0..rows {
        let sum = row_sum[r];
        if sum > 0.0 {
            let inv = 1.0 / sum;
            out[r * d_v..(r + 1) * d_v]
                .iter_mut()
                .for_each(|o| *o *= inv);
            lse[r] = row_max[r] + sum.log2();
        } else {
            lse[r] = f32::NEG_INFINITY;
        }
    }
}

/// The gradients of [`forward`]'s inputs given the gradient of its output, `d_out`, and the
/// `out` and `lse` that [`forward`] returned. Every gradient is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dims: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<(), AttentionError> {
    dims.check_forward(q, k, v, out, lse)?;
    let want = dims.lengths();
    dims.check(&[
        ("d_out", d_out.len(), want.out),
        ("dq", dq.len(), want.q),
        ("dk", dk.len(), want.k),
        ("dv", dv.len(), want.v),
    ])?;
    let Dims {
        heads,
        n_q,
        n_k,
        d,
        d_v,
    } = dims;
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    if heads == 0 || n_q == 0 || n_k == 0 {
        return Ok(());
    }
    let c = dims.exponent_scale();
    let scale = 1.0 / (d as f32).sqrt();
    dq.par_chunks_mut(n_q * d)
        .zip(dk.par_chunks_mut(n_k * d))
        .zip(dv.par_chunks_mut(n_k * d_v))
        .enumerate()
        .for_each(|(h, ((dq_h, dk_h), dv_h))| {
            let head = Head {
                q: &q[h * n_q * d..(h + 1) * n_q * d],
                k: &k[h * n_k * d..(h + 1) * n_k * d],
                v: &v[h * n_k * d_v..(h + 1) * n_k * d_v],
                out: &out[h * n_q * d_v..(h + 1) * n_q * d_v],
                lse: &lse[h * n_q..(h + 1) * n_q],
                d_out: &d_out[h * n_q * d_v..(h + 1) * n_q * d_v],
            };
            backward_head(dims, c, scale, head, dq_h, dk_h, dv_h);
        });
    Ok(())
}

/// One head's inputs to the backward.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32],
    d_out: &'a [f32],
}

fn backward_head(
    dims: Dims,
    c: f32,
    scale: f32,
    head: Head<'_>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let Dims {
        n_q, n_k, d, d_v, ..
    } = dims;
    // D_i = rowsum(dO_i * O_i), the softmax gradient's row term.
    let row_term: Vec<f32> = (0..n_q)
        .map(|r| {
            let span = r * d_v..(r + 1) * d_v;
            dot(&head.d_out[span.clone()], &head.out[span])
        })
        .collect();
    let block_k = BLOCK_K.min(n_k);
    let mut p = vec![0f32; BLOCK_Q * block_k];
    let mut ds = vec![0f32; BLOCK_Q * block_k];
    for q0 in (0..n_q).step_by(BLOCK_Q) {
        let rows = BLOCK_Q.min(n_q - q0);
        let q_i = &head.q[q0 * d..(q0 + rows) * d];
        let do_i = &head.d_out[q0 * d_v..(q0 + rows) * d_v];
        let lse_i = &head.lse[q0..q0 + rows];
        let term_i = &row_term[q0..q0 + rows];
        for k0 in (0..n_k).step_by(BLOCK_K) {
            let cols = BLOCK_K.min(n_k - k0);
            let (p, ds) = (&mut p[..rows * cols], &mut ds[..rows * cols]);
            let k_j = &head.k[k0 * d..(k0 + cols) * d];
            let v_j = &head.v[k0 * d_v..(k0 + cols) * d_v];
            matmul(rows, cols, d, p, false, (q_i, 1, d), (k_j, d, 1));
            probabilities(p, cols, c, lse_i);
            // dV_j += P^T dO_i
            let dv_j = &mut dv[k0 * d_v..(k0 + cols) * d_v];
            matmul(cols, d_v, rows, dv_j, true, (p, cols, 1), (do_i, 1, d_v));
            // dP = dO_i V_j^T, then dS = P (dP - D_i) / sqrt(d), in place.
            matmul(rows, cols, d_v, ds, false, (do_i, 1, d_v), (v_j, d_v, 1));
            score_gradient(ds, p, cols, term_i, scale);
            // dQ_i += dS K_j;  dK_j += dS^T Q_i
            let dq_i = &mut dq[q0 * d..(q0 + rows) * d];
            matmul(rows, d, cols, dq_i, true, (ds, 1, cols), (k_j, 1, d));
            let dk_j = &mut dk[k0 * d..(k0 + cols) * d];
            matmul(cols, d, rows, dk_j, true, (ds, cols, 1), (q_i, 1, d));
        }
    }
}

/// `dst (m x n, row-major) [+]= lhs (m x k) * rhs (k x n)`, each operand given as
/// `(values, column stride, row stride)`.
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    // Every caller's sizes are block sizes and widths, never zero (`Dims::check`).
    assert!(m > 0 && n > 0 && k > 0);
    let last = |(values, cs, rs): (&[f32], usize, usize), rows: usize, cols: usize| {
        assert!((rows - 1) * rs + (cols - 1) * cs < values.len());
    };
    last(lhs, m, k);
    last(rhs, k, n);
    assert!(m * n <= dst.len());
    // SAFETY: the asserts above keep every element gemm reads or writes inside its slice;
    // `dst` is exclusive and does not overlap the operands (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0.as_ptr(),
            rhs.1 as isize,
            rhs.2 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The body of each softmax step is compiled once per instruction set and picked at run
/// time. The steps use no fused multiply-add, and sums keep a fixed order, so every version
/// returns the same bits.
macro_rules! per_instruction_set {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the feature the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

per_instruction_set! {
    /// One step of the online softmax over a block of scores (`cols` per row): each row's
    /// running maximum and sum take in the block, the scores become `2^(s c - max)`, and the
    /// row's output so far is rescaled to the new maximum.
    fn online_softmax(
        scores: &mut [f32],
        cols: usize,
        c: f32,
        row_max: &mut [f32],
        row_sum: &mut [f32],
        out: &mut [f32],
        d_v: usize,
    ) {
        for (r, row) in scores.chunks_exact_mut(cols).enumerate() {
            let old = row_max[r];
            let new = old.max(max(row) * c);
            if new == f32::NEG_INFINITY {
                // Every score is -inf (no weight, nothing to add) or NaN (which must reach
                // the output).
                row.iter_mut().for_each(|x| *x = if x.is_nan() { *x } else { 0.0 });
                continue;
            }
            let sum = exp2_row(row, c, new);
            let correction = exp2(old - new);
            row_sum[r] = row_sum[r] * correction + sum;
            row_max[r] = new;
            if correction != 1.0 {
                out[r * d_v..(r + 1) * d_v].iter_mut().for_each(|o| *o *= correction);
            }
        }
    }
}

per_instruction_set! {
    /// Scores to probabilities, each row by its log-sum-exp.
    fn probabilities(scores: &mut [f32], cols: usize, c: f32, lse: &[f32]) {
        for (row, &l) in scores.chunks_exact_mut(cols).zip(lse) {
            exp2_row(row, c, l);
        }
    }
}

per_instruction_set! {
    /// `dP` (in `ds`) to `dS = P (dP - D) scale`.
    fn score_gradient(ds: &mut [f32], p: &[f32], cols: usize, row_term: &[f32], scale: f32) {
        for ((ds, p), &t) in ds.chunks_exact_mut(cols).zip(p.chunks_exact(cols)).zip(row_term) {
            for (g, &p) in ds.iter_mut().zip(p) {
                *g = p * (*g - t) * scale;
            }
        }
    }
}

/// Lanes of the partial maxima and sums: a full AVX-512 register, and a fixed order.
const LANES: usize = 16;

/// The largest value of a row (NaNs are skipped here and propagate through `exp2`).
#[inline(always)]
fn max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        let chunk: &[f32; LANES] = chunk.try_into().expect("chunks_exact");
        for i in 0..LANES {
            lanes[i] = if chunk[i] > lanes[i] {
                chunk[i]
            } else {
                lanes[i]
            };
        }
    }
    let tail = chunks.remainder().iter();
    tail.chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `row = 2^(row c - sub)`, returning the row's sum.
#[inline(always)]
fn exp2_row(row: &mut [f32], c: f32, sub: f32) -> f32 {
    for x in row.iter_mut() {
        *x = exp2(*x * c - sub);
    }
    sum(row)
}

/// A sum in a fixed order: [`LANES`] running sums, then the tail, then the lanes in order.
#[inline(always)]
fn sum(row: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        let chunk: &[f32; LANES] = chunk.try_into().expect("chunks_exact");
        for i in 0..LANES {
            lanes[i] += chunk[i];
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    lanes.into_iter().fold(tail, |s, x| s + x)
}

/// `a . b` in a fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `2^x` to within 2 ulp for `x` in [-126, 127], 0 below, NaN for NaN: the nearest integer
/// `n` by the 1.5 * 2^23 rounding trick, `2^(x - n)` by its degree-6 Taylor polynomial on
/// [-0.5, 0.5], and `n` added to the exponent bits. Branch-free, so it vectorises.
#[inline(always)]
fn exp2(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let clamped = x.clamp(-127.0, 127.0);
    let t = clamped + ROUND;
    let n = t - ROUND;
    let f = clamped - n;
    // ln(2)^i / i!
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_129 + f * (0.001_333_355_8 + f * 0.000_154_035_3)))));
    let shift = t.to_bits().wrapping_sub(ROUND.to_bits()) << 23;
    let y = f32::from_bits(p.to_bits().wrapping_add(shift));
    if x < -126.0 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

#[cfg(test)]
mod tests;
