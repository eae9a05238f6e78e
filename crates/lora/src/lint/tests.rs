//! lint against ComfyUI's reading: clean files of every naming pass; each kind of problem is
//! found and named by its key.

use std::path::Path;

use super::*;
use crate::{Precision, synth};

/// `(key, dtype, shape)` of a tensor to write.
type Tensor = (String, &'static str, Vec<usize>);

/// A file of `(key, dtype, shape)` tensors with zero bytes.
fn file_of(tensors: &[(&str, &str, Vec<usize>)]) -> Vec<u8> {
    let width = |d: &str| {
        if d == "F32" {
            4
        } else if d == "I8" {
            1
        } else {
            2
        }
    };
    let mut header = String::from("{");
    let mut offset = 0;
    for (i, (key, dtype, shape)) in tensors.iter().enumerate() {
        let n = shape.iter().product::<usize>() * width(dtype);
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{key}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{offset},{}]}}",
            offset + n
        ));
        offset += n;
    }
    header.push('}');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + offset, 0);
    out
}

fn lint_of(bytes: &[u8]) -> LintReport {
    lint(Path::new("x.safetensors"), bytes, Loader::ComfyUi).expect("lints")
}

#[test]
fn clean_files_of_every_naming_pass() {
    for layout in [Layout::Flux, Layout::Sd35Large, Layout::Sd35Medium] {
        for &naming in layout.namings() {
            let lora = synth::sampled_lora(layout, naming, 17, 2, 4);
            let report = lint_of(&lora.to_bytes(Precision::F16));
            assert!(report.ok(), "{layout:?} {naming:?}: {:?}", report.problems);
            assert_eq!(report.loaded_modules, lora.modules.len());
            assert_eq!(report.layout, layout.label());
        }
    }
}

#[test]
fn each_problem_is_named_by_its_key() {
    let qkv = "lora_unet_double_blocks_0_img_attn_qkv";
    let good = |m: &str| -> Vec<Tensor> {
        vec![
            (format!("{m}.lora_up.weight"), "F16", vec![9216, 4]),
            (format!("{m}.lora_down.weight"), "F16", vec![4, 3072]),
        ]
    };
    let cases: Vec<(&str, Vec<Tensor>, &str, &str)> = vec![
        (
            "misspelt module",
            good("lora_unet_double_blocks_0_img_attn_qkvv"),
            "lora_unet_double_blocks_0_img_attn_qkvv.lora_up.weight",
            "is not a linear layer of the FLUX.1 transformer",
        ),
        (
            "wrong shape",
            vec![
                (format!("{qkv}.lora_up.weight"), "F16", vec![3072, 4]),
                (format!("{qkv}.lora_down.weight"), "F16", vec![4, 3072]),
            ],
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
            "does not give the layer's [9216, 3072]",
        ),
        (
            "unread suffix",
            vec![(format!("{qkv}.hada_w1_a"), "F16", vec![9216, 4])],
            "lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a",
            "not read by ComfyUI's loader",
        ),
        (
            "second spelling shadowed",
            vec![
                (format!("{qkv}.lora_B.weight"), "F16", vec![9216, 4]),
                (format!("{qkv}.lora_A.weight"), "F16", vec![4, 3072]),
            ],
            "lora_unet_double_blocks_0_img_attn_qkv.lora_B.weight",
            "not read by ComfyUI's loader",
        ),
        (
            "alpha not one element",
            vec![(format!("{qkv}.alpha"), "F16", vec![2])],
            "lora_unet_double_blocks_0_img_attn_qkv.alpha",
            "`.item()` needs one element",
        ),
        (
            "integer factor",
            vec![
                (
                    "lora_unet_img_in.lora_up.weight".into(),
                    "I8",
                    vec![3072, 4],
                ),
                (
                    "lora_unet_img_in.lora_down.weight".into(),
                    "F16",
                    vec![4, 64],
                ),
            ],
            "lora_unet_img_in.lora_up.weight",
            "not a float type",
        ),
        (
            "down missing",
            vec![(
                "lora_unet_img_in.lora_up.weight".into(),
                "F16",
                vec![3072, 4],
            )],
            "lora_unet_img_in.lora_up.weight",
            "no `lora_unet_img_in.lora_down.weight` beside it",
        ),
    ];
    for (what, extra, key, needle) in cases {
        // Each case beside a well-formed qkv module (the wrong-shape case replaces it; in
        // the shadowed case both spellings are present, and the first pair wins).
        let mut tensors = if what == "wrong shape" {
            Vec::new()
        } else {
            good(qkv)
        };
        tensors.extend(extra);
        let refs: Vec<(&str, &str, Vec<usize>)> = tensors
            .iter()
            .map(|(k, d, s)| (k.as_str(), *d, s.clone()))
            .collect();
        let report = lint_of(&file_of(&refs));
        let found = report.problems.iter().find(|p| p.key == key);
        assert!(
            found.is_some_and(|p| p.problem.contains(needle)),
            "{what}: {:?}",
            report.problems
        );
        assert!(!report.ok());
    }
}

#[test]
fn loader_specific_names_and_text_encoders() {
    // SD3's `base_model.model.` names are ComfyUI's for SD3 but not for FLUX.1.
    let sd3 = [
        (
            "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight",
            "F16",
            vec![2432, 2],
        ),
        (
            "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight",
            "F16",
            vec![2, 2432],
        ),
        (
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
            "F16",
            vec![3072, 2],
        ),
        (
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
            "F16",
            vec![2, 768],
        ),
    ];
    let report = lint_of(&file_of(&sd3));
    assert_eq!(report.layout, "SD3.5 Large MMDiT");
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.loaded_modules, 1);
    assert_eq!(report.unchecked.len(), 2);
    // OneTrainer's and SimpleTuner's FLUX.1 names.
    let flux = [
        (
            "lora_transformer_single_transformer_blocks_3_proj_mlp.lora_up.weight",
            "F16",
            vec![12288, 2],
        ),
        (
            "lora_transformer_single_transformer_blocks_3_proj_mlp.lora_down.weight",
            "F16",
            vec![2, 3072],
        ),
        (
            "lycoris_transformer_blocks_1_attn_to_add_out.lora_up.weight",
            "F16",
            vec![3072, 2],
        ),
        (
            "lycoris_transformer_blocks_1_attn_to_add_out.lora_down.weight",
            "F16",
            vec![2, 3072],
        ),
    ];
    let report = lint_of(&file_of(&flux));
    assert_eq!(report.layout, "FLUX.1 transformer");
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.loaded_modules, 2);
    // A UNet LoRA is outside what lint knows.
    let sd = synth::random_lora(Layout::Tiny, 2, 1.0, 1).to_bytes(Precision::F32);
    let err = lint(Path::new("x.safetensors"), &sd, Loader::ComfyUi).expect_err("not known");
    assert!(
        err.to_string()
            .contains("lint knows the FLUX.1 and SD3.5 layouts")
    );
}
