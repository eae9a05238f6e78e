//! lint against ComfyUI's reading: clean files of every naming pass; each kind of problem is
//! found and named by its key.

use std::path::Path;

use super::*;
use crate::{Naming, Precision, synth};

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
    lint(Path::new("x.safetensors"), bytes, Loader::ComfyUi, None).expect("lints")
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
            "is not a layer of the FLUX.1 transformer",
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
    // The made-up tiny layout has SD1.x names with other widths: against SD1.x's tables
    // every module is mis-shaped (with --model and its checkpoint it loads, see the CLI's
    // tests).
    let tiny = synth::random_lora(Layout::Tiny, 2, 1.0, 1);
    let report = lint_of(&tiny.to_bytes(Precision::F32));
    assert_eq!(report.layout, "SD1.x UNet");
    assert_eq!(report.loaded_modules, 0);
    assert_eq!(report.problems.len(), tiny.modules.len());
    assert!(
        report
            .problems
            .iter()
            .all(|p| p.problem.contains("does not give the layer's")),
        "{:?}",
        report.problems
    );
    // Names of no model lint knows: an error that asks for the model.
    let unknown = file_of(&[
        ("some_net_layer_0.lora_up.weight", "F16", vec![8, 2]),
        ("some_net_layer_0.lora_down.weight", "F16", vec![2, 8]),
    ]);
    let err =
        lint(Path::new("x.safetensors"), &unknown, Loader::ComfyUi, None).expect_err("not known");
    assert!(
        err.to_string().contains("give the model with --model"),
        "{err}"
    );
}

const LOADERS: [Loader; 3] = [Loader::ComfyUi, Loader::A1111, Loader::Diffusers];

fn lint_for(bytes: &[u8], loader: Loader) -> LintReport {
    lint(Path::new("x.safetensors"), bytes, loader, None).expect("lints")
}

/// kohya's SD1.x and SDXL UNet LoRAs (every linear, 1x1 and 3x3 conv module our layout
/// tables list, LoCon included) load in full in all three loaders.
#[test]
fn kohya_unet_loras_load_in_every_loader() {
    for (layout, label) in [(Layout::Sd1, "SD1.x UNet"), (Layout::Sdxl, "SDXL UNet")] {
        let lora = synth::random_lora(layout, 2, 1.0, 3);
        let bytes = lora.to_bytes(Precision::F16);
        for loader in LOADERS {
            let report = lint_for(&bytes, loader);
            assert_eq!(report.layout, label, "{loader:?}");
            assert!(report.ok(), "{layout:?} {loader:?}: {:?}", report.problems);
            assert_eq!(
                report.loaded_modules,
                lora.modules.len(),
                "{layout:?} {loader:?}"
            );
        }
    }
}

/// One SD1.x module's tensors: kohya names, rank 2.
fn sd1_module(name: &str, out: usize, inp: usize) -> Vec<(String, &'static str, Vec<usize>)> {
    vec![
        (format!("{name}.lora_up.weight"), "F16", vec![out, 2]),
        (format!("{name}.lora_down.weight"), "F16", vec![2, inp]),
        (format!("{name}.alpha"), "F16", vec![]),
    ]
}

fn file_of_owned(tensors: &[(String, &'static str, Vec<usize>)]) -> Vec<u8> {
    let borrowed: Vec<(&str, &str, Vec<usize>)> = tensors
        .iter()
        .map(|(k, d, s)| (k.as_str(), *d, s.clone()))
        .collect();
    file_of(&borrowed)
}

/// A module no layer of the UNet has, and a module with the wrong shape, are named by key
/// in every loader; A1111 and diffusers fail differently on a name they do not map
/// (A1111 ignores it, diffusers' kohya conversion raises on a key left over), and both are
/// problems.
#[test]
fn unet_problems_are_named_in_every_loader() {
    let good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let mut tensors = sd1_module(good, 320, 320);
    tensors.extend(sd1_module(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        320,
        1024,
    ));
    tensors.extend(sd1_module(
        "lora_unet_down_blocks_9_attentions_0_proj_in",
        320,
        320,
    ));
    let bytes = file_of_owned(&tensors);
    for loader in LOADERS {
        let report = lint_for(&bytes, loader);
        assert_eq!(report.layout, "SD1.x UNet", "{loader:?}");
        let keys: Vec<&str> = report.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(
            keys.iter().any(|k| k.contains("attn2_to_k")),
            "{loader:?}: the cross-attention k of a 1024-wide context is not SD1's 768: {keys:?}"
        );
        assert!(
            keys.iter().any(|k| k.contains("down_blocks_9")),
            "{loader:?}: no down block 9: {keys:?}"
        );
        assert!(
            !keys.iter().any(|k| k.contains("attn1_to_q")),
            "{loader:?}: the good module is not a problem: {keys:?}"
        );
    }
}

/// AUTOMATIC1111's webui has no FLUX.1 loader: such a file is refused for `a1111`.
#[test]
fn a1111_refuses_a_flux_lora() {
    let lora = synth::sampled_lora(Layout::Flux, Naming::Kohya, 17, 2, 4);
    let bytes = lora.to_bytes(Precision::F16);
    let result = lint(Path::new("x.safetensors"), &bytes, Loader::A1111, None);
    let refused = match result {
        Err(_) => true,
        Ok(r) => !r.ok(),
    };
    assert!(refused, "a FLUX.1 LoRA must not pass for a1111");
    assert!(lint_for(&bytes, Loader::ComfyUi).ok());
}
