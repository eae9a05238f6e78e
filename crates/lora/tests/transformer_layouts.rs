//! `svd_merge`, `merge` and `resize` on FLUX.1 and SD3.5 LoRAs against the dense f64
//! reference, on real layer shapes, with inputs in different layouts of the same model (kohya
//! + diffusers + ComfyUI) that the operations convert before combining.
//!
//! The dense reference SVDs full `out x in` matrices, so the default tests use the layers of
//! real shapes it can afford in seconds (embedders, final layer); one test of the big fused
//! block layers is `#[ignore]`d (minutes): `cargo test -p slider-lora --test
//! transformer_layouts -- --ignored`.

use slider_lora::dense::{dense_delta, resize_dense_by_rule, svd_merge_dense};
use slider_lora::layout::Layout;
use slider_lora::synth;
use slider_lora::{
    DynamicMethod, Lora, Naming, RankRule, ResizeOptions, SvdMergeOptions, convert,
    delta_relative_error, merge, resize_by_rule, svd_merge,
};

/// The named layers (original paths) of a layout, at `rank`, in `naming`.
fn lora_of(layout: Layout, naming: Naming, paths: &[&str], rank: usize, seed: u64) -> Lora {
    let full = synth::sampled_lora(layout, Naming::Kohya, 1, rank, seed);
    let mut lora = Lora {
        metadata: full.metadata.clone(),
        ..Lora::default()
    };
    for path in paths {
        let name = format!("lora_unet_{}", path.replace('.', "_"));
        let m = full
            .modules
            .get(&name)
            .unwrap_or_else(|| panic!("{name}"))
            .clone();
        lora.modules.insert(name, m);
    }
    convert(&lora, naming).expect("converts").0
}

/// Cheap layers of real shapes per model (the dense SVD of each takes well under a second).
fn cheap_layers(layout: Layout) -> &'static [&'static str] {
    match layout {
        Layout::Flux => &["img_in", "time_in.in_layer", "final_layer.linear"],
        _ => &["t_embedder.mlp.0", "final_layer.linear"],
    }
}

const MODELS: [Layout; 3] = [Layout::Flux, Layout::Sd35Large, Layout::Sd35Medium];

#[test]
fn svd_merge_of_mixed_layouts_matches_the_dense_reference() {
    for layout in MODELS {
        let paths = cheap_layers(layout);
        let a = lora_of(layout, Naming::Kohya, paths, 4, 1);
        let b = lora_of(layout, Naming::Diffusers, paths, 6, 2);
        let c = lora_of(layout, Naming::ComfyUi, paths, 2, 3);
        for clamp in [None, Some(0.99)] {
            let opts = SvdMergeOptions {
                new_rank: 8,
                new_conv_rank: 8,
                clamp_quantile: clamp,
            };
            let fast = svd_merge(&[&a, &b, &c], &[1.5, -1.5, 0.5], &opts).expect("merges");
            let dense = svd_merge_dense(&[&a, &b, &c], &[1.5, -1.5, 0.5], &opts).expect("dense");
            // The result is in the first input's layout.
            assert_eq!(
                slider_lora::detect_layout(&fast).naming,
                Some(Naming::Kohya)
            );
            assert_eq!(fast.modules.len(), paths.len());
            let err = delta_relative_error(&fast, &dense).expect("same shapes");
            assert!(err < 1e-6, "{layout:?} clamp {clamp:?}: {err}");
        }
    }
}

#[test]
fn merge_of_mixed_layouts_is_the_exact_sum_on_a_fused_layer() {
    // FLUX.1's `img_attn.qkv` (9216 x 3072) once in kohya names and once as diffusers'
    // to_q / to_k / to_v: the merge converts the second to the first's layout.
    let path = ["double_blocks.7.img_attn.qkv"];
    let a = lora_of(Layout::Flux, Naming::Kohya, &path, 4, 5);
    let b = lora_of(Layout::Flux, Naming::Diffusers, &path, 3, 6);
    assert_eq!(b.modules.len(), 3);
    let merged = merge(&[&a, &b], &[1.0, -0.5]).expect("merges");
    let m = &merged.modules["lora_unet_double_blocks_7_img_attn_qkv"];
    assert_eq!(
        m.rank,
        4 + 3,
        "b's split parts share one down: its rank stays 3"
    );
    let mut want = dense_delta(&a.modules["lora_unet_double_blocks_7_img_attn_qkv"]);
    for (j, part) in ["to_q", "to_k", "to_v"].iter().enumerate() {
        let d = dense_delta(&b.modules[&format!("transformer.transformer_blocks.7.attn.{part}")]);
        for r in 0..3072 {
            for c in 0..3072 {
                want[(j * 3072 + r, c)] -= 0.5 * d[(r, c)];
            }
        }
    }
    let got = dense_delta(m);
    let err = (&got - &want).norm_l2() / want.norm_l2();
    assert!(err < 1e-6, "{err}");
}

#[test]
fn resize_matches_the_dense_reference_under_both_rank_rules() {
    for layout in MODELS {
        let paths = cheap_layers(layout);
        for naming in [Naming::Kohya, Naming::Diffusers, Naming::ComfyUi] {
            let lora = lora_of(layout, naming, paths, 8, 9);
            for rule in [RankRule::OnePastThreshold, RankRule::ReachThreshold] {
                let opts = ResizeOptions {
                    new_rank: 6,
                    new_conv_rank: 6,
                    dynamic: Some(DynamicMethod::SvFro(0.9)),
                };
                let (fast, stats) = resize_by_rule(&lora, &opts, rule).expect("resizes");
                let (dense, dense_stats) = resize_dense_by_rule(&lora, &opts, rule).expect("dense");
                let ranks: Vec<usize> = stats.iter().map(|s| s.new_rank).collect();
                let dense_ranks: Vec<usize> = dense_stats.iter().map(|s| s.new_rank).collect();
                assert_eq!(ranks, dense_ranks, "{layout:?} {naming:?} {rule:?}");
                let err = delta_relative_error(&fast, &dense).expect("same shapes");
                assert!(err < 1e-6, "{layout:?} {naming:?} {rule:?}: {err}");
                // The layout and names are kept.
                assert_eq!(
                    fast.modules.keys().collect::<Vec<_>>(),
                    lora.modules.keys().collect::<Vec<_>>()
                );
            }
        }
    }
}

#[test]
#[ignore = "minutes: dense SVDs of the big FLUX.1 block layers"]
fn svd_merge_on_the_big_flux_block_layers_matches_the_dense_reference() {
    let paths = [
        "double_blocks.0.img_attn.qkv",
        "double_blocks.0.img_mod.lin",
        "single_blocks.0.linear1",
        "single_blocks.0.linear2",
    ];
    let a = lora_of(Layout::Flux, Naming::Kohya, &paths, 4, 1);
    let b = lora_of(Layout::Flux, Naming::Diffusers, &paths, 4, 2);
    let opts = SvdMergeOptions {
        new_rank: 8,
        new_conv_rank: 8,
        clamp_quantile: Some(0.99),
    };
    let fast = svd_merge(&[&a, &b], &[1.5, -1.5], &opts).expect("merges");
    let dense = svd_merge_dense(&[&a, &b], &[1.5, -1.5], &opts).expect("dense");
    let err = delta_relative_error(&fast, &dense).expect("same shapes");
    assert!(err < 1e-6, "{err}");
}
