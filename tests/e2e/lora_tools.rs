//! End-to-end tests of the LoRA tools: `svd-merge`, `merge`, `resize`, `inspect` run as a
//! user runs them, on the demo LoRAs in `assets/loras` and on generated real-layout files.

use std::path::{Path, PathBuf};
use std::process::Output;

use slider_lora::synth::{self, Layout};
use slider_lora::{Lora, Naming, Precision, SvdMergeOptions};

use crate::slider_run;

fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/loras")
        .join(name)
}

fn run(args: &[&str]) -> Output {
    slider_run().args(args).output().expect("binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn the_methods_svd_merge_matches_the_library_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("slider_front.safetensors");
    let (big, small) = (
        asset("big_front.safetensors"),
        asset("small_front.safetensors"),
    );
    // kohya's spelling and the kebab-case spelling of the same flags.
    ok(&[
        "svd-merge",
        "--models",
        s(&big),
        s(&small),
        "--ratios",
        "1.5",
        "-1.5",
        "--new_rank",
        "8",
        "--save_to",
        s(&out),
    ]);
    let kebab = dir.path().join("kebab.safetensors");
    ok(&[
        "svd-merge",
        "--models",
        s(&big),
        s(&small),
        "--ratios",
        "1.5",
        "-1.5",
        "--new-rank",
        "8",
        "--save-to",
        s(&kebab),
    ]);
    let written = std::fs::read(&out).expect("written");
    assert_eq!(written, std::fs::read(&kebab).expect("written"));

    let inputs = [
        Lora::load(&big).expect("big"),
        Lora::load(&small).expect("small"),
    ];
    let opts = SvdMergeOptions {
        new_rank: 8,
        new_conv_rank: 8,
        clamp_quantile: Some(0.99),
    };
    let want =
        slider_lora::svd_merge(&[&inputs[0], &inputs[1]], &[1.5, -1.5], &opts).expect("merges");
    assert_eq!(written, want.to_bytes(Precision::F32));
}

#[test]
fn merge_resize_and_inspect_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let merged = dir.path().join("merged.safetensors");
    let resized = dir.path().join("resized.safetensors");
    let (big, small) = (
        asset("big_side.safetensors"),
        asset("small_side.safetensors"),
    );
    ok(&[
        "merge",
        "--models",
        s(&big),
        s(&small),
        "--ratios",
        "1",
        "-1",
        "--save_to",
        s(&merged),
    ]);
    let exact = Lora::load(&merged).expect("loads");
    assert!(exact.modules.values().all(|m| m.rank == 8));

    let table = ok(&[
        "resize",
        "--model",
        s(&merged),
        "--save_to",
        s(&resized),
        "--new_rank",
        "4",
        "--dynamic_method",
        "sv_fro",
        "--dynamic_param",
        "0.75",
        "--save_precision",
        "fp16",
        "--verbose",
    ]);
    assert!(
        table.contains("lora_unet_mid_block_attentions_0_proj_in"),
        "{table}"
    );
    assert!(table.contains("sum(S) retained: "), "{table}");
    assert!(table.contains(", dynamic | dim: "), "{table}");
    assert!(
        table.contains("Average Frobenius norm retention: "),
        "{table}"
    );

    let json = ok(&["inspect", s(&resized), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["layout"], "tiny test UNet");
    assert_eq!(v["module_count"], 38);
    assert_eq!(v["dtypes"]["F16"], 38);
    assert_eq!(v["metadata"]["ss_network_dim"], "Dynamic");
    let ranks = v["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .map(|m| m["rank"].as_u64().expect("rank"));
    assert!(ranks.into_iter().all(|r| (1..=4).contains(&r)));

    let text = ok(&["inspect", s(&resized)]);
    for needle in [
        "layout:   tiny test UNet",
        "modules:  38",
        "dtypes:   F16 x38",
        "|delta|_F",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from\n{text}");
    }
}

#[test]
fn real_layout_files_are_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sd1.safetensors");
    synth::random_lora(Layout::Sd1, 1, 1.0, 3)
        .save(&path, Precision::F16)
        .expect("saves");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", "--json", s(&path)])).expect("json");
    assert_eq!(v["layout"], "SD1.x UNet");
    assert_eq!(v["module_count"], 192);
    assert_eq!(v["kinds"]["conv1x1"], 32);
}

#[test]
fn user_errors_are_reported_with_their_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sd1 = dir.path().join("sd1.safetensors");
    synth::random_lora(Layout::Sd1, 1, 1.0, 1)
        .save(&sd1, Precision::F16)
        .expect("saves");
    let broken = dir.path().join("broken.safetensors");
    let bytes = std::fs::read(asset("big_front.safetensors")).expect("asset");
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).expect("writes");
    let out = dir.path().join("out.safetensors");
    let tiny = asset("big_front.safetensors");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "svd-merge",
                "--models",
                s(&sd1),
                s(&tiny),
                "--ratios",
                "1",
                "1",
                "--save_to",
                s(&out),
            ],
            "cannot combine a SD1.x UNet LoRA (input 1",
        ),
        (
            vec![
                "merge",
                "--models",
                s(&tiny),
                "--ratios",
                "1",
                "2",
                "--save_to",
                s(&out),
            ],
            "1 models but 2 ratios",
        ),
        (vec!["inspect", s(&broken)], "is truncated"),
        (
            vec![
                "resize",
                "--model",
                s(&tiny),
                "--save_to",
                s(&out),
                "--dynamic_method",
                "sv_fro",
            ],
            "--dynamic_method needs --dynamic_param",
        ),
        (
            vec![
                "resize",
                "--model",
                s(&tiny),
                "--save_to",
                s(&out),
                "--save_precision",
                "fp8",
            ],
            "unknown precision `fp8`",
        ),
    ];
    for (args, needle) in cases {
        let stderr = fails(&args);
        assert!(
            stderr.contains(needle),
            "{args:?}: `{needle}` missing from\n{stderr}"
        );
    }
    assert!(!out.exists(), "a failed command left an output behind");
}

#[test]
fn flux_loras_convert_inspect_merge_and_resize_across_layouts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name);
    let kohya = synth::sampled_lora(Layout::Flux, Naming::Kohya, 10, 2, 1);
    kohya
        .save(&path("k.safetensors"), Precision::F16)
        .expect("saves");
    let text = ok(&[
        "convert",
        s(&path("k.safetensors")),
        "--to",
        "diffusers",
        "--save_to",
        s(&path("d.safetensors")),
    ]);
    assert!(
        text.contains("FLUX.1 transformer LoRA converted to diffusers names"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", "--json", s(&path("d.safetensors"))])).expect("json");
    assert_eq!(v["layout"], "FLUX.1 transformer");
    assert_eq!(v["naming"], "diffusers");
    assert_eq!(
        v["dtypes"]["F16"], v["module_count"],
        "keeps the input's precision"
    );

    ok(&[
        "convert",
        s(&path("d.safetensors")),
        "--to",
        "comfyui",
        "--save_to",
        s(&path("c.safetensors")),
    ]);
    let text = ok(&["inspect", s(&path("c.safetensors"))]);
    assert!(
        text.contains("layout:   FLUX.1 transformer (comfyui names)"),
        "{text}"
    );
    let back = slider_lora::convert(
        &Lora::load(&path("c.safetensors")).expect("c"),
        Naming::Kohya,
    )
    .expect("converts")
    .0;
    let as_saved = Lora::load(&path("k.safetensors")).expect("k");
    let err = slider_lora::delta_relative_error(&back, &as_saved).expect("shapes");
    assert!(err < 1e-6, "kohya -> diffusers -> comfyui -> kohya: {err}");

    // kohya minus its own diffusers conversion: the merge converts, the deltas cancel.
    ok(&[
        "merge",
        "--models",
        s(&path("k.safetensors")),
        s(&path("d.safetensors")),
        "--ratios",
        "1",
        "-1",
        "--save_to",
        s(&path("zero.safetensors")),
    ]);
    let zero = Lora::load(&path("zero.safetensors")).expect("merged");
    assert_eq!(
        slider_lora::detect_layout(&zero).naming,
        Some(Naming::Kohya)
    );
    let norm: f64 = zero.modules.values().map(|m| m.delta_norm()).sum();
    assert!(norm < 1e-4, "{norm}");

    // Rank 2 modules at sv_fro 0.5: sd-scripts after PR #2194 keeps rank 1, before 2.
    let ranks = |rule: &str| {
        let out = path(&format!("r-{rule}.safetensors"));
        ok(&[
            "resize",
            "--model",
            s(&path("k.safetensors")),
            "--save_to",
            s(&out),
            "--new_rank",
            "4",
            "--dynamic_method",
            "sv_fro",
            "--dynamic_param",
            "0.5",
            "--rank_rule",
            rule,
        ]);
        let mut r: Vec<usize> = Lora::load(&out)
            .expect("resized")
            .modules
            .values()
            .map(|m| m.rank)
            .collect();
        r.dedup();
        r
    };
    assert_eq!(ranks("one-past-threshold"), [2]);
    assert_eq!(ranks("reach-threshold"), [1]);
}

#[test]
fn lint_names_what_comfyui_would_not_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.safetensors");
    let mut lora = synth::sampled_lora(Layout::Flux, Naming::Kohya, 20, 2, 2);
    lora.save(&good, Precision::F16).expect("saves");
    let text = ok(&["lint", s(&good), "--for", "comfyui"]);
    assert!(text.contains("FLUX.1 transformer LoRA"), "{text}");
    assert!(text.contains("0 problems"), "{text}");

    let bad = dir.path().join("bad.safetensors");
    let m = lora.modules.values().next().cloned().expect("modules");
    lora.modules
        .insert("lora_unet_double_blocks_0_img_attn_qkvv".into(), m);
    lora.save(&bad, Precision::F16).expect("saves");
    let out = run(&["lint", s(&bad)]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("lora_unet_double_blocks_0_img_attn_qkvv.lora_up.weight: module"),
        "{text}"
    );
    assert!(text.contains("1 problems"), "{text}");
}

/// A LoRA trained on the shipped tiny base loads in full in ComfyUI and diffusers when lint
/// reads the layers from that checkpoint (`--model`). A1111 converts diffusers block numbers
/// with SD1.x's fixed arithmetic (`1 + 3 * block + j`), which a UNet with one ResNet per
/// level does not follow: those modules are named. Against SD1.x's built-in tables (no
/// `--model`) every module has SD1.x's names but not its widths.
#[test]
fn lint_against_a_checkpoint_checks_the_checkpoints_own_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-sd/tiny-sd.safetensors");
    let lora = crate::lora_trained_on_the_tiny_base(dir.path(), 1, 3);
    let modules = Lora::load(&lora).expect("loads").modules.len();
    for loader in ["comfyui", "diffusers"] {
        let text = ok(&["lint", s(&lora), "--for", loader, "--model", s(&base)]);
        assert!(
            text.contains(&format!("{modules} modules loaded by {loader}, 0 problems")),
            "{loader}: {text}"
        );
        assert!(text.contains("layers from checkpoint"), "{text}");
    }
    let out = run(&["lint", s(&lora), "--for", "a1111", "--model", s(&base)]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("after A1111's name conversion"), "{text}");
    let out = run(&["lint", s(&lora), "--for", "a1111"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{modules} problems")), "{text}");
    assert!(text.contains("does not give the layer's"), "{text}");
    // The demo LoRAs are of the made-up tiny layout, not the tiny base's: against the base,
    // every module is named.
    let demo = asset("big_front.safetensors");
    let out = run(&["lint", s(&demo), "--model", s(&base)]);
    assert_eq!(out.status.code(), Some(1));
    // A LoRA file is not a checkpoint.
    let err = fails(&["lint", s(&lora), "--model", s(&lora)]);
    assert!(err.contains("not a checkpoint"), "{err}");
}

/// A recipe's `rank_rule:` picks the same ranks as the CLI's `--rank_rule`, and the two
/// sd-scripts rules differ on a merged slider.
#[test]
fn a_recipes_rank_rule_is_the_clis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let merged = asset("big_side.safetensors");
    let recipe = dir.path().join("resize.yaml");
    let node = |rule: &str| {
        format!(
            "{{kind: resize, model: {}, new_rank: 8, dynamic_method: sv_fro, \
             dynamic_param: 0.75, rank_rule: {rule}}}",
            s(&merged)
        )
    };
    std::fs::write(
        &recipe,
        format!(
            "nodes:\n  past: {}\n  reach: {}\noutputs:\n  past: out/past.safetensors\n  \
             reach: out/reach.safetensors\n",
            node("one-past-threshold"),
            node("reach-threshold")
        ),
    )
    .expect("writes the recipe");
    ok(&[s(&recipe), "--quiet"]);
    let ranks = |file: &Path| -> Vec<u64> {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&["inspect", s(file), "--json"])).expect("json");
        v["modules"]
            .as_array()
            .expect("modules")
            .iter()
            .map(|m| m["rank"].as_u64().expect("rank"))
            .collect()
    };
    for rule in ["one-past-threshold", "reach-threshold"] {
        let by_cli = dir.path().join(format!("{rule}.safetensors"));
        ok(&[
            "resize",
            "--model",
            s(&merged),
            "--save_to",
            s(&by_cli),
            "--new_rank",
            "8",
            "--dynamic_method",
            "sv_fro",
            "--dynamic_param",
            "0.75",
            "--rank_rule",
            rule,
        ]);
        let by_recipe = dir.path().join(if rule == "reach-threshold" {
            "out/reach.safetensors"
        } else {
            "out/past.safetensors"
        });
        assert_eq!(ranks(&by_recipe), ranks(&by_cli), "{rule}");
    }
    let (past, reach) = (
        ranks(&dir.path().join("out/past.safetensors")),
        ranks(&dir.path().join("out/reach.safetensors")),
    );
    assert!(
        past.iter().zip(&reach).all(|(p, r)| p >= r) && past != reach,
        "{past:?} vs {reach:?}"
    );
}
