//! resize against the dense f64 reference on random inputs, and end to end on modules built
//! with a chosen spectrum (the rank rules themselves are tested in `resize::tests`).

use faer::Mat;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::*;
use crate::compare::module_delta_relative_error;
use crate::dense::{dense_delta, resize_dense};
use crate::layout::ModuleSpec;
use crate::module::ModuleKind;
use crate::synth;

fn orthonormal_columns(rows: usize, cols: usize, rng: &mut impl Rng) -> Mat<f64> {
    let m = Mat::<f64>::from_fn(rows, cols, |_, _| rng.random_range(-1.0..1.0));
    m.qr().compute_thin_Q()
}

/// A linear module whose `up @ down` has exactly the singular values `s`.
fn module_with_spectrum(out: usize, inp: usize, s: &[f64], alpha: f32, seed: u64) -> Module {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let r = s.len();
    let u = orthonormal_columns(out, r, &mut rng);
    let v = orthonormal_columns(inp, r, &mut rng);
    let up = (0..out * r)
        .map(|x| (u[(x / r, x % r)] * s[x % r]) as f32)
        .collect();
    let down = (0..r * inp).map(|x| v[(x % inp, x / inp)] as f32).collect();
    Module {
        kind: ModuleKind::Linear,
        out_dim: out,
        in_dim: inp,
        rank: r,
        up,
        down,
        alpha,
        alpha_storage: AlphaStorage::Float,
        dtype: TensorDtype::F32,
    }
}

fn single(m: Module) -> Lora {
    let mut lora = Lora::default();
    lora.modules.insert("lora_unet_m".into(), m);
    lora
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn fast_path_agrees_with_the_dense_reference(
        kind in 0usize..3,
        out in 1usize..40,
        inp in 1usize..30,
        rank in 1usize..9,
        new_rank in 1usize..10,
        method in 0usize..4,
        param in 0.3f64..0.99,
        seed in 0u64..1000,
    ) {
        let kind = [ModuleKind::Linear, ModuleKind::Conv { kh: 1, kw: 1 }, ModuleKind::Conv { kh: 3, kw: 3 }][kind];
        let spec = ModuleSpec { name: "lora_unet_m".into(), kind, out_dim: out, in_dim: inp };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let lora = single(synth::random_module(&spec, rank, 1.0, &mut rng));
        let dynamic = match method {
            0 => None,
            1 => Some(DynamicMethod::SvFro(param)),
            2 => Some(DynamicMethod::SvCumulative(param)),
            _ => Some(DynamicMethod::SvRatio(1.0 + 20.0 * param)),
        };
        let opts = ResizeOptions { new_rank, new_conv_rank: new_rank, dynamic };
        let (fast, fast_stats) = resize(&lora, &opts).expect("fast");
        let (dense, dense_stats) = resize_dense(&lora, &opts).expect("dense");
        let (f, d) = (&fast.modules["lora_unet_m"], &dense.modules["lora_unet_m"]);
        prop_assert_eq!(f.rank, d.rank);
        prop_assert_eq!(f.alpha, d.alpha);
        prop_assert!((fast_stats[0].fro_retained - dense_stats[0].fro_retained).abs() < 1e-9);
        let err = module_delta_relative_error(f, d).expect("same shapes");
        prop_assert!(err < 1e-5, "relative error {}", err);
    }
}

#[test]
fn picks_the_rank_of_crafted_spectra_end_to_end() {
    // Spectra kept away from the rule boundaries, so rounding cannot move the answer.
    let cases: &[(&[f64], DynamicMethod, usize)] = &[
        (&[8.0, 1.0, 0.5, 0.1], DynamicMethod::SvFro(0.75), 2),
        (&[5.0, 4.0, 3.0, 0.01], DynamicMethod::SvFro(0.9), 3),
        (&[5.0, 4.0, 3.0, 0.01], DynamicMethod::SvFro(0.999), 4),
        (&[4.0, 3.0, 2.0, 1.0], DynamicMethod::SvRatio(2.5), 4),
        (&[4.0, 3.0, 2.0, 1.0], DynamicMethod::SvRatio(1.5), 3),
        (&[4.0, 3.0, 2.0, 1.0], DynamicMethod::SvCumulative(0.45), 3),
        (&[4.0, 3.0, 2.0, 1.0], DynamicMethod::SvCumulative(0.95), 5),
    ];
    for (i, &(s, method, want)) in cases.iter().enumerate() {
        let lora = single(module_with_spectrum(24, 16, s, 1.0, i as u64));
        let opts = ResizeOptions {
            new_rank: 8,
            new_conv_rank: 8,
            dynamic: Some(method),
        };
        let (_, stats) = resize(&lora, &opts).expect("resizes");
        assert_eq!(stats[0].new_rank, want, "{s:?} {method:?}");
    }
}

#[test]
fn alpha_is_rescaled_and_the_kept_delta_is_exact() {
    // alpha 1 at rank 4: scale 1/4. Keeping all 4 (and more) preserves the delta.
    let lora = single(module_with_spectrum(20, 12, &[3.0, 2.0, 1.0, 0.5], 1.0, 9));
    for (new_rank, want_alpha) in [(4, 1.0), (6, 1.5), (2, 0.5)] {
        let opts = ResizeOptions {
            new_rank,
            new_conv_rank: new_rank,
            dynamic: None,
        };
        let (out, stats) = resize(&lora, &opts).expect("resizes");
        let m = &out.modules["lora_unet_m"];
        assert_eq!((m.rank, m.alpha), (new_rank, want_alpha));
        assert_eq!(stats[0].new_alpha, want_alpha);
        let want = dense_delta(&lora.modules["lora_unet_m"]);
        let err = (&dense_delta(m) - &want).norm_l2() / want.norm_l2();
        if new_rank >= 4 {
            assert!(err < 1e-6, "rank {new_rank}: {err}");
        } else {
            // Dropping 1.0 and 0.5 of (3, 2, 1, 0.5) loses sqrt(1.25 / 14.25).
            assert!((err - (1.25f64 / 14.25).sqrt()).abs() < 1e-5, "{err}");
        }
    }
}

#[test]
fn stats_follow_kohyas_definitions() {
    let lora = single(module_with_spectrum(20, 12, &[3.0, 2.0, 1.0, 0.5], 1.0, 10));
    let opts = ResizeOptions {
        new_rank: 2,
        new_conv_rank: 2,
        dynamic: None,
    };
    let (_, stats) = resize(&lora, &opts).expect("resizes");
    let s = &stats[0];
    assert!((s.sum_retained - 5.0 / 6.5).abs() < 1e-6);
    assert!((s.fro_retained - (13.0f64 / 14.25).sqrt()).abs() < 1e-6);
    assert!((s.max_ratio - 1.5).abs() < 1e-6);
}

#[test]
fn a_zero_module_keeps_rank_one() {
    let mut m = module_with_spectrum(10, 10, &[1.0, 1.0], 2.0, 11);
    m.up.iter_mut().for_each(|x| *x = 0.0);
    let opts = ResizeOptions {
        new_rank: 4,
        new_conv_rank: 4,
        dynamic: Some(DynamicMethod::SvFro(0.9)),
    };
    let (out, stats) = resize(&single(m), &opts).expect("resizes");
    assert_eq!(stats[0].new_rank, 1);
    assert_eq!(out.modules["lora_unet_m"].alpha, 1.0);
    assert!(out.modules["lora_unet_m"].up.iter().all(|&x| x == 0.0));
}

#[test]
fn metadata_records_the_resize_as_kohya_does() {
    let mut lora = single(module_with_spectrum(10, 10, &[2.0, 1.0], 1.0, 12));
    lora.metadata
        .insert("ss_training_comment".into(), "eyes".into());
    let dynamic = ResizeOptions {
        new_rank: 4,
        new_conv_rank: 4,
        dynamic: Some(DynamicMethod::SvFro(0.75)),
    };
    let (out, _) = resize(&lora, &dynamic).expect("resizes");
    assert_eq!(
        out.metadata["ss_training_comment"],
        "Dynamic resize with sv_fro: 0.75 from 2; eyes"
    );
    assert_eq!(out.metadata["ss_network_dim"], "Dynamic");
    assert_eq!(out.metadata["ss_network_alpha"], "Dynamic");
    let fixed = ResizeOptions {
        new_rank: 1,
        new_conv_rank: 2,
        dynamic: None,
    };
    let (out, _) = resize(&lora, &fixed).expect("resizes");
    assert_eq!(
        out.metadata["ss_training_comment"],
        "dimension is resized from 2 to 1 (conv: 2); eyes"
    );
    assert_eq!(out.metadata["ss_network_dim"], "1");
    assert_eq!(out.metadata["ss_network_alpha"], "0.5");
}
