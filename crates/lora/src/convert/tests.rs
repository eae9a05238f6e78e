//! Conversion tests: every (model, from, to) round trip keeps every delta and rank; fusion
//! and splitting checked row block by row block; the swapped modulation rows; refusals.

use super::*;
use crate::layout::Layout;
use crate::synth;
use crate::transformer::Model;
use crate::{delta_relative_error, module_delta_relative_error};

const MODELS: [Layout; 3] = [Layout::Flux, Layout::Sd35Large, Layout::Sd35Medium];

#[test]
fn every_round_trip_keeps_deltas_and_ranks() {
    let (mut fused, mut split) = (0, 0);
    for layout in MODELS {
        for &from in layout.namings() {
            let lora = synth::sampled_lora(layout, from, 13, 3, 11);
            for &to in layout.namings() {
                let (there, report) = convert(&lora, to).expect("converts");
                let detected = layout::detect(&there);
                assert_eq!(detected.known(), Some(layout), "{from:?} -> {to:?}");
                assert_eq!(detected.naming, Some(to), "{from:?} -> {to:?}");
                if to == Naming::Diffusers {
                    assert!(
                        there
                            .modules
                            .values()
                            .all(|m| m.alpha_storage == AlphaStorage::Absent)
                    );
                } else {
                    assert!(
                        there
                            .modules
                            .values()
                            .all(|m| m.alpha_storage != AlphaStorage::Absent)
                    );
                }
                let (back, _) = convert(&there, from).expect("converts back");
                let err = delta_relative_error(&back, &lora).expect("same shapes");
                assert!(err < 1e-6, "{layout:?} {from:?} -> {to:?} -> back: {err}");
                let ranks = |l: &Lora| {
                    l.modules
                        .iter()
                        .map(|(n, m)| (n.clone(), m.rank))
                        .collect::<Vec<_>>()
                };
                assert_eq!(ranks(&back), ranks(&lora), "{layout:?} {from:?} -> {to:?}");
                assert!(!report.lines().is_empty());
                fused += report.fused.len();
                split += report.split.len();
            }
        }
    }
    // The samples include fused layers and split parts (the test is not renames only).
    assert!(fused > 10 && split > 10, "{fused} fused, {split} split");
}

/// The rows `offset..offset + rows` of a module's delta as a module of their own.
fn row_block(m: &Module, offset: usize, rows: usize) -> Module {
    Module {
        out_dim: rows,
        up: m.up[offset * m.rank..(offset + rows) * m.rank].to_vec(),
        ..m.clone()
    }
}

#[test]
fn fusing_stacks_parts_block_diagonally_and_says_the_rank() {
    let layer = Model::Flux
        .layers()
        .into_iter()
        .find(|l| l.path == "single_blocks.4.linear1")
        .expect("layer");
    let names = layer.diffusers_names();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
    let mut lora = Lora::default();
    // q rank 2 with alpha 1 (scale 1/2), no k, v rank 3, proj_mlp rank 1.
    for (j, rank) in [(0, 2), (2, 3), (3, 1)] {
        let spec = crate::layout::ModuleSpec {
            name: names[j].clone(),
            kind: ModuleKind::Linear,
            out_dim: layer.parts[j].rows,
            in_dim: layer.in_dim,
        };
        let mut m = synth::random_module(&spec, rank, rank as f32, &mut rng);
        if j == 0 {
            m.alpha = 1.0;
        }
        lora.modules.insert(spec.name, m);
    }
    let (fused, report) = convert(&lora, Naming::Kohya).expect("converts");
    let m = &fused.modules["lora_unet_single_blocks_4_linear1"];
    assert_eq!((m.rank, m.out_dim, m.in_dim), (6, 21504, 3072));
    assert_eq!(report.fused.len(), 1);
    assert!(
        report
            .lines()
            .iter()
            .any(|l| l.contains("lora_unet_single_blocks_4_linear1: rank 6 = 2 + 3 + 1"))
    );
    let offsets = layer.part_offsets();
    for (j, part) in layer.parts.iter().enumerate() {
        let block = row_block(m, offsets[j], part.rows);
        match lora.modules.get(&names[j]) {
            Some(want) => {
                let err = module_delta_relative_error(&block, want).expect("shapes");
                assert!(err < 1e-7, "part {j}: {err}");
            }
            None => assert!(block.up.iter().all(|&x| x == 0.0), "k rows are zero"),
        }
    }
    // Splitting recovers the parts and their ranks (k is not written).
    let (split_back, report) = convert(&fused, Naming::Diffusers).expect("splits");
    assert_eq!(report.split[0].part_ranks, [2, 3, 1]);
    assert_eq!(split_back.modules.len(), 3);
    assert!(delta_relative_error(&split_back, &lora).expect("shapes") < 1e-7);
}

#[test]
fn the_final_modulation_rows_swap_halves_between_original_and_diffusers() {
    let lora = synth::sampled_lora(Layout::Flux, Naming::Kohya, 1, 2, 3);
    let name = "lora_unet_final_layer_adaLN_modulation_1";
    let kohya = &lora.modules[name];
    let (d, _) = convert(&lora, Naming::Diffusers).expect("converts");
    let diffusers = &d.modules["transformer.norm_out.linear"];
    let half = kohya.out_dim / 2;
    let s = kohya.scale();
    for (i, row) in diffusers.up.chunks_exact(2).enumerate() {
        let src = (i + half) % kohya.out_dim;
        for (c, &x) in row.iter().enumerate() {
            assert_eq!(x, kohya.up[src * 2 + c] * s, "row {i}");
        }
    }
    // A non-swapped layer keeps its row order.
    let a = &lora.modules["lora_unet_double_blocks_0_img_mod_lin"];
    let b = &d.modules["transformer.transformer_blocks.0.norm1.linear"];
    assert!(module_delta_relative_error(b, a).expect("shapes") < 1e-7);
}

#[test]
fn text_encoders_are_kept_and_strangers_refused() {
    let mut lora = synth::sampled_lora(Layout::Flux, Naming::Kohya, 30, 2, 1);
    let te = lora.modules.values().next().cloned().expect("modules");
    lora.modules.insert(
        "lora_te1_text_model_encoder_layers_0_mlp_fc1".into(),
        te.clone(),
    );
    let (c, report) = convert(&lora, Naming::ComfyUi).expect("converts");
    assert_eq!(report.kept, 1);
    assert_eq!(
        c.modules["lora_te1_text_model_encoder_layers_0_mlp_fc1"],
        te
    );

    let mut odd = lora.clone();
    odd.modules
        .insert("lora_unet_double_blocks_0_img_attn_norm".into(), te);
    let err = convert(&odd, Naming::Diffusers)
        .expect_err("unknown layer")
        .to_string();
    assert!(
        err.contains("`lora_unet_double_blocks_0_img_attn_norm`"),
        "{err}"
    );
    assert!(
        err.contains("not a layer of the FLUX.1 transformer"),
        "{err}"
    );

    let sd = synth::random_lora(Layout::Tiny, 2, 1.0, 1);
    let err = convert(&sd, Naming::Diffusers)
        .expect_err("UNet layout")
        .to_string();
    assert!(
        err.contains("conversion knows the FLUX.1 and SD3.5 layouts"),
        "{err}"
    );
}

#[test]
fn each_layout_is_written_and_read_back_in_its_own_key_style() {
    for &naming in Layout::Flux.namings() {
        let mut lora = synth::sampled_lora(Layout::Flux, naming, 40, 2, 8);
        if let Some(m) = lora.modules.values_mut().next() {
            // An alpha that a diffusers file must fold into the up factor.
            m.alpha = 0.5;
            m.alpha_storage = AlphaStorage::Float;
        }
        let bytes = lora.to_bytes(crate::Precision::F32);
        let back = Lora::from_bytes(std::path::Path::new("x"), &bytes).expect("reads back");
        assert_eq!(
            back.modules.keys().collect::<Vec<_>>(),
            lora.modules.keys().collect::<Vec<_>>()
        );
        assert!(delta_relative_error(&back, &lora).expect("shapes") < 1e-7);
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + n]).expect("utf-8");
        let (has, lacks) = match naming {
            Naming::Diffusers => (".lora_A.weight", ".alpha"),
            _ => (".alpha", ".lora_A.weight"),
        };
        assert!(
            header.contains(has) && !header.contains(lacks),
            "{naming:?}"
        );
    }
}
