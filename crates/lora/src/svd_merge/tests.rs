//! svd_merge against the dense f64 reference (full matrices, full SVD, same sign
//! convention), on random shapes and ranks, plus kohya's rules on crafted inputs.

use proptest::prelude::*;
use rand::SeedableRng;

use super::*;
use crate::compare::module_delta_relative_error;
use crate::dense::{dense_delta, svd_merge_dense};
use crate::layout::{Layout, ModuleSpec};
use crate::module::ModuleKind;
use crate::synth;

/// A LoRA with one module of the given shape (plus, if `extra`, a second small module).
fn one_module_lora(
    kind: ModuleKind,
    out: usize,
    inp: usize,
    rank: usize,
    seed: u64,
    extra: bool,
) -> Lora {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let spec = ModuleSpec {
        name: "lora_unet_x".into(),
        kind,
        out_dim: out,
        in_dim: inp,
    };
    let mut lora = Lora::default();
    lora.modules.insert(
        spec.name.clone(),
        synth::random_module(&spec, rank, 1.0, &mut rng),
    );
    if extra {
        let spec = ModuleSpec {
            name: "lora_unet_y".into(),
            kind: ModuleKind::Linear,
            out_dim: 5,
            in_dim: 7,
        };
        lora.modules.insert(
            spec.name.clone(),
            synth::random_module(&spec, 2, 2.0, &mut rng),
        );
    }
    lora
}

fn kind_of(i: usize) -> ModuleKind {
    [
        ModuleKind::Linear,
        ModuleKind::Conv { kh: 1, kw: 1 },
        ModuleKind::Conv { kh: 3, kw: 3 },
    ][i]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn fast_path_agrees_with_the_dense_reference(
        kind in 0usize..3,
        out in 1usize..40,
        inp in 1usize..30,
        ranks in proptest::collection::vec(1usize..7, 1..4),
        ratios in proptest::collection::vec(-2.0f64..2.0, 3),
        new_rank in 1usize..12,
        clamp in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let loras: Vec<Lora> = ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| one_module_lora(kind_of(kind), out, inp, r, seed + i as u64, i == 0))
            .collect();
        let refs: Vec<&Lora> = loras.iter().collect();
        let ratios = &ratios[..loras.len()];
        let opts = SvdMergeOptions {
            new_rank,
            new_conv_rank: new_rank,
            clamp_quantile: clamp.then_some(0.99),
        };
        let fast = svd_merge(&refs, ratios, &opts).expect("fast");
        let dense = svd_merge_dense(&refs, ratios, &opts).expect("dense");
        prop_assert_eq!(fast.modules.len(), dense.modules.len());
        for (name, f) in &fast.modules {
            let d = &dense.modules[name];
            prop_assert_eq!(f.rank, d.rank);
            let err = module_delta_relative_error(f, d).expect("same shapes");
            prop_assert!(err < 1e-5, "{}: relative error {}", name, err);
        }
    }
}

#[test]
fn without_clamp_and_enough_rank_the_merge_is_exact() {
    let a = synth::random_lora(Layout::Tiny, 4, 1.0, 1);
    let b = synth::random_lora(Layout::Tiny, 4, 1.0, 2);
    let opts = SvdMergeOptions {
        new_rank: 8,
        new_conv_rank: 8,
        clamp_quantile: None,
    };
    let merged = svd_merge(&[&a, &b], &[1.5, -1.5], &opts).expect("merges");
    for (name, m) in &merged.modules {
        let want = dense_delta(&a.modules[name]) * faer::Scale(1.5)
            - dense_delta(&b.modules[name]) * faer::Scale(1.5);
        let err = (&dense_delta(m) - &want).norm_l2() / want.norm_l2();
        assert!(err < 1e-6, "{name}: {err}");
        let k = 8.min(m.in_dim).min(m.out_dim);
        assert_eq!(
            (m.rank, m.alpha, m.alpha_storage),
            (k, k as f32, AlphaStorage::Integer)
        );
    }
}

#[test]
fn the_clamp_bounds_every_factor_entry_by_the_quantile() {
    let a = synth::random_lora(Layout::Tiny, 4, 1.0, 3);
    let b = synth::random_lora(Layout::Tiny, 4, 1.0, 4);
    let merged = svd_merge(&[&a, &b], &[1.0, -1.0], &SvdMergeOptions::default()).expect("merges");
    for m in merged.modules.values() {
        let all: Vec<f32> = m.up.iter().chain(&m.down).copied().collect();
        let hi = all.iter().fold(0f32, |acc, x| acc.max(x.abs()));
        let clamped = all.iter().filter(|x| x.abs() == hi).count();
        // At least the top 1% of entries sit exactly on the bound.
        assert!(clamped >= 1, "nothing on the bound");
    }
}

#[test]
fn a_lora_minus_itself_is_zero() {
    let a = synth::random_lora(Layout::Tiny, 4, 1.0, 5);
    let merged = svd_merge(&[&a, &a], &[1.0, -1.0], &SvdMergeOptions::default()).expect("merges");
    for (name, m) in &merged.modules {
        assert!(m.delta_norm() < 1e-6, "{name}: {}", m.delta_norm());
        assert!(m.up.iter().chain(&m.down).all(|x| x.is_finite()));
    }
}

#[test]
fn metadata_is_kohyas_minimum() {
    let a = synth::random_lora(Layout::Sd1, 1, 1.0, 6);
    let b = synth::random_lora(Layout::Sd1, 1, 1.0, 7);
    let opts = SvdMergeOptions {
        new_rank: 8,
        new_conv_rank: 4,
        clamp_quantile: Some(0.99),
    };
    let merged = svd_merge(&[&a, &b], &[1.5, -1.5], &opts).expect("merges");
    let md = &merged.metadata;
    assert_eq!(md["ss_network_module"], "networks.lora");
    assert_eq!(md["ss_network_dim"], "8");
    assert_eq!(md["ss_network_alpha"], "8");
    assert_eq!(
        md["ss_network_args"],
        "{\"conv_dim\": 4, \"conv_alpha\": 4}"
    );
    assert_eq!(md["ss_base_model_version"], "sd_v1");
    assert_eq!(md["ss_v2"], "False");
    // SD1's proj_in/proj_out are 1x1 convs: they take new_rank, not new_conv_rank.
    let proj = &merged.modules["lora_unet_down_blocks_0_attentions_0_proj_in"];
    assert_eq!(proj.rank, 8);
}

#[test]
fn conv_rank_applies_to_3x3_convs_only() {
    let a = synth::random_lora(Layout::Tiny, 4, 1.0, 8);
    let b = synth::random_lora(Layout::Tiny, 4, 1.0, 9);
    let opts = SvdMergeOptions {
        new_rank: 8,
        new_conv_rank: 3,
        clamp_quantile: None,
    };
    let merged = svd_merge(&[&a, &b], &[1.0, 1.0], &opts).expect("merges");
    for (name, m) in &merged.modules {
        let want = if m.kind.is_spatial_conv() { 3 } else { 8 };
        assert_eq!(m.rank, want, "{name}");
    }
}

#[test]
fn refusals_name_the_module_and_both_shapes() {
    let a = one_module_lora(ModuleKind::Linear, 8, 6, 2, 1, false);
    let b = one_module_lora(ModuleKind::Linear, 8, 5, 2, 2, false);
    let c = one_module_lora(ModuleKind::Conv { kh: 3, kw: 3 }, 8, 6, 2, 3, false);
    let sd1 = synth::random_lora(Layout::Sd1, 1, 1.0, 1);
    let sdxl = synth::random_lora(Layout::Sdxl, 1, 1.0, 2);
    let opts = SvdMergeOptions::default();
    let cases: Vec<(Vec<&Lora>, Vec<f64>, Vec<&str>)> = vec![
        (
            vec![&a, &b],
            vec![1.0, 1.0],
            vec![
                "module `lora_unet_x`",
                "linear [8, 6] in input 1",
                "linear [8, 5] in input 2",
            ],
        ),
        (
            vec![&a, &c],
            vec![1.0, 1.0],
            vec![
                "module `lora_unet_x`",
                "linear [8, 6]",
                "conv3x3 [8, 6, 3, 3]",
            ],
        ),
        (
            vec![&sd1, &sdxl],
            vec![1.0, 1.0],
            vec![
                "SD1.x UNet LoRA (input 1",
                "SDXL UNet LoRA (input 2",
                "`lora_unet_down_blocks_0_attentions_0_proj_in` conv1x1 [320, 320, 1, 1]",
                "linear [640, 640]",
            ],
        ),
        (vec![&a, &a], vec![1.0], vec!["2 models but 1 ratios"]),
        (vec![], vec![], vec!["no input LoRAs"]),
    ];
    for (models, ratios, needles) in cases {
        let message = svd_merge(&models, &ratios, &opts)
            .expect_err("refused")
            .to_string();
        for needle in needles {
            assert!(message.contains(needle), "`{message}` lacks `{needle}`");
        }
        // The plain merge refuses the same inputs the same way.
        assert_eq!(
            crate::merge(&models, &ratios)
                .expect_err("refused")
                .to_string(),
            message
        );
    }
}

#[test]
fn modules_missing_from_an_input_count_as_zero() {
    let a = one_module_lora(ModuleKind::Linear, 9, 7, 3, 1, true);
    let b = one_module_lora(ModuleKind::Linear, 9, 7, 3, 2, false);
    let opts = SvdMergeOptions {
        new_rank: 8,
        new_conv_rank: 8,
        clamp_quantile: None,
    };
    let merged = svd_merge(&[&a, &b], &[2.0, 1.0], &opts).expect("merges");
    let y = &merged.modules["lora_unet_y"];
    let want = dense_delta(&a.modules["lora_unet_y"]) * faer::Scale(2.0);
    let err = (&dense_delta(y) - &want).norm_l2() / want.norm_l2();
    assert!(err < 1e-6, "{err}");
}
