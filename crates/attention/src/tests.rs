use super::*;
use rand::{Rng, SeedableRng};

fn normal(seed: u64, len: usize, spread: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            // Irwin-Hall: close enough to a normal for test inputs.
            let s: f32 = (0..4).map(|_| rng.random::<f32>()).sum();
            (s - 2.0) * spread
        })
        .collect()
}

/// Forward and gradients in f64, straight from the definitions.
struct Reference {
    out: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn reference(dims: Dims, q: &[f32], k: &[f32], v: &[f32], d_out: &[f32]) -> Reference {
    let Dims {
        heads,
        n_q,
        n_k,
        d,
        d_v,
    } = dims;
    let scale = 1.0 / (d as f64).sqrt();
    let len = dims.lengths();
    let mut r = Reference {
        out: vec![0.0; len.out],
        dq: vec![0.0; len.q],
        dk: vec![0.0; len.k],
        dv: vec![0.0; len.v],
    };
    for h in 0..heads {
        let (qh, kh, vh) = (h * n_q * d, h * n_k * d, h * n_k * d_v);
        let oh = h * n_q * d_v;
        for i in 0..n_q {
            let s: Vec<f64> = (0..n_k)
                .map(|j| {
                    (0..d)
                        .map(|c| q[qh + i * d + c] as f64 * k[kh + j * d + c] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|x| x / z).collect();
            for c in 0..d_v {
                r.out[oh + i * d_v + c] = (0..n_k).map(|j| p[j] * vh_at(v, vh, j, c, d_v)).sum();
            }
            let dp: Vec<f64> = (0..n_k)
                .map(|j| {
                    (0..d_v)
                        .map(|c| d_out[oh + i * d_v + c] as f64 * vh_at(v, vh, j, c, d_v))
                        .sum()
                })
                .collect();
            let row: f64 = (0..n_k).map(|j| p[j] * dp[j]).sum();
            for j in 0..n_k {
                let ds = p[j] * (dp[j] - row) * scale;
                for c in 0..d {
                    r.dq[qh + i * d + c] += ds * k[kh + j * d + c] as f64;
                    r.dk[kh + j * d + c] += ds * q[qh + i * d + c] as f64;
                }
                for c in 0..d_v {
                    r.dv[vh + j * d_v + c] += p[j] * d_out[oh + i * d_v + c] as f64;
                }
            }
        }
    }
    r
}

fn vh_at(v: &[f32], base: usize, j: usize, c: usize, d_v: usize) -> f64 {
    v[base + j * d_v + c] as f64
}

/// Largest difference relative to the reference's largest magnitude.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
        / scale
}

struct Run {
    out: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn run(dims: Dims, q: &[f32], k: &[f32], v: &[f32], d_out: &[f32]) -> Run {
    let len = dims.lengths();
    let mut r = Run {
        out: vec![f32::NAN; len.out],
        lse: vec![f32::NAN; len.lse],
        dq: vec![f32::NAN; len.q],
        dk: vec![f32::NAN; len.k],
        dv: vec![f32::NAN; len.v],
    };
    forward(dims, q, k, v, &mut r.out, &mut r.lse).unwrap();
    backward(
        dims, q, k, v, &r.out, &r.lse, d_out, &mut r.dq, &mut r.dk, &mut r.dv,
    )
    .unwrap();
    r
}

fn inputs(dims: Dims, seed: u64, spread: f32) -> [Vec<f32>; 4] {
    let len = dims.lengths();
    [
        normal(seed, len.q, spread),
        normal(seed + 1, len.k, spread),
        normal(seed + 2, len.v, 1.0),
        normal(seed + 3, len.out, 1.0),
    ]
}

#[test]
fn forward_and_gradients_match_the_definition_in_f64() {
    // (heads, n_q, n_k, d, d_v, spread of q and k): block edges, a single key, the UNet's
    // cross-attention (77 tokens), scores large enough to saturate the softmax.
    let cases = [
        (1, 1, 1, 1, 1, 1.0),
        (2, 5, 3, 4, 2, 1.0),
        (3, 70, 300, 40, 24, 1.0),
        (2, BLOCK_Q, BLOCK_K, 8, 8, 1.0),
        (2, BLOCK_Q + 1, BLOCK_K + 1, 16, 16, 1.0),
        (1, 130, 77, 40, 40, 1.0),
        (2, 100, 520, 64, 64, 3.0),
    ];
    for (heads, n_q, n_k, d, d_v, spread) in cases {
        let dims = Dims {
            heads,
            n_q,
            n_k,
            d,
            d_v,
        };
        let [q, k, v, d_out] = inputs(dims, 7, spread);
        let got = run(dims, &q, &k, &v, &d_out);
        let want = reference(dims, &q, &k, &v, &d_out);
        for (name, got, want, tol) in [
            ("out", &got.out, &want.out, 2e-6),
            ("dq", &got.dq, &want.dq, 2e-5),
            ("dk", &got.dk, &want.dk, 2e-5),
            ("dv", &got.dv, &want.dv, 2e-5),
        ] {
            let err = rel_err(got, want);
            assert!(
                err < tol,
                "{dims:?} {name}: relative error {err:e} over {tol:e}"
            );
        }
    }
}

#[test]
fn results_do_not_depend_on_the_number_of_threads() {
    let dims = Dims {
        heads: 3,
        n_q: 200,
        n_k: 600,
        d: 40,
        d_v: 40,
    };
    let [q, k, v, d_out] = inputs(dims, 11, 1.0);
    let bits = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let r = pool.install(|| run(dims, &q, &k, &v, &d_out));
        [r.out, r.lse, r.dq, r.dk, r.dv].map(|t| t.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    assert_eq!(bits(1), bits(3));
}

#[test]
fn exp2_is_within_two_ulp_and_flushes_below_the_normal_range() {
    let mut x = -126.0f32;
    while x <= 127.0 {
        let want = (x as f64).exp2();
        let got = exp2(x) as f64;
        let ulp = want * f32::EPSILON as f64;
        assert!((got - want).abs() <= 2.0 * ulp, "2^{x}: {got} vs {want}");
        x += 0.0137;
    }
    assert_eq!(exp2(-126.5), 0.0);
    assert_eq!(exp2(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp2(0.0), 1.0);
    assert!(exp2(f32::NAN).is_nan());
}

#[test]
fn a_nan_input_reaches_the_output_and_the_gradients() {
    let dims = Dims {
        heads: 1,
        n_q: 4,
        n_k: 5,
        d: 3,
        d_v: 2,
    };
    let [mut q, k, v, d_out] = inputs(dims, 3, 1.0);
    q[0] = f32::NAN;
    let got = run(dims, &q, &k, &v, &d_out);
    assert!(got.out[0].is_nan() && got.out[1].is_nan(), "{:?}", got.out);
    assert!(got.dq[0].is_nan() && got.dk.iter().any(|x| x.is_nan()));
    // The other queries are untouched.
    assert!(got.out[2..].iter().all(|x| x.is_finite()));
}

#[test]
fn buffers_that_do_not_fit_the_dims_are_refused_by_name() {
    let dims = Dims {
        heads: 2,
        n_q: 3,
        n_k: 4,
        d: 5,
        d_v: 6,
    };
    let [q, k, v, _] = inputs(dims, 1, 1.0);
    let mut out = vec![0.0; 2 * 3 * 6];
    let mut lse = vec![0.0; 5];
    let err = forward(dims, &q, &k, &v, &mut out, &mut lse).unwrap_err();
    assert_eq!(
        err,
        AttentionError::Length {
            name: "lse",
            got: 5,
            want: 6,
            dims
        }
    );
    assert!(err.to_string().contains("`lse` holds 5 values"), "{err}");
    let zero = Dims { d: 0, ..dims };
    assert_eq!(
        forward(zero, &[], &k, &v, &mut out, &mut lse),
        Err(AttentionError::ZeroWidth(zero))
    );
}

#[test]
fn no_keys_give_zero_output_and_zero_gradients() {
    let dims = Dims {
        heads: 2,
        n_q: 3,
        n_k: 0,
        d: 4,
        d_v: 2,
    };
    let q = normal(1, 24, 1.0);
    let d_out = normal(2, 12, 1.0);
    let got = run(dims, &q, &[], &[], &d_out);
    assert!(got.out.iter().all(|&x| x == 0.0));
    assert!(got.lse.iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(got.dq.iter().all(|&x| x == 0.0));
}

/// Speed at the UNet's shapes, for tuning the block sizes (`cargo test -p slider-attention
/// -- --ignored --nocapture`); the benchmark of record is `slider-run bench torch`.
#[test]
#[ignore]
fn speed_at_unet_shapes() {
    for (heads, n, d) in [(8, 1024, 40), (8, 4096, 40), (4, 256, 32), (8, 1024, 80)] {
        let dims = Dims {
            heads,
            n_q: n,
            n_k: n,
            d,
            d_v: d,
        };
        let [q, k, v, d_out] = inputs(dims, 5, 1.0);
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; heads * n]);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let flops = 2.0 * (heads * n * n * d) as f64;
        let t = std::time::Instant::now();
        forward(dims, &q, &k, &v, &mut out, &mut lse).unwrap();
        let f = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        backward(
            dims, &q, &k, &v, &out, &lse, &d_out, &mut dq, &mut dk, &mut dv,
        )
        .unwrap();
        let b = t.elapsed().as_secs_f64();
        println!(
            "{heads} x {n} x {d}: forward {:.4} s ({:.0} GFLOP/s), backward {:.4} s ({:.0} GFLOP/s)",
            f,
            2.0 * flops / f / 1e9,
            b,
            5.0 * flops / b / 1e9
        );
    }
}
