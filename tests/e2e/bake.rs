//! End-to-end tests of `merge-into-model` and the `merge_into_model` node: LoRAs trained on
//! the shipped tiny base (LoCon included) baked into it, by kohya's flags and their kebab-case spellings,
//! byte-equal to the library, in a recipe, and the refusal of a LoRA that does not fit.

use std::path::{Path, PathBuf};
use std::process::Output;

use slider_bake::{BakeOptions, merge_into_model};
use slider_lora::{Lora, Precision};

use crate::{lora_trained_on_the_tiny_base, slider_run};

/// A LoRA trained for two steps on the tiny base, in its own folder under `dir`.
fn trained(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    lora_trained_on_the_tiny_base(&sub, 2, seed)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn run(args: &[&str]) -> Output {
    slider_run().args(args).output().expect("binary runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Each tensor's dtype, by key, from a safetensors file's header.
fn dtypes(file: &[u8]) -> std::collections::BTreeMap<String, String> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), v["dtype"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn merge_into_model_flags_and_library_agree_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let base = root().join("assets/tiny-sd/tiny-sd.safetensors");
    let big = trained(dir.path(), "big", 1);
    let small = trained(dir.path(), "small", 2);
    let (a, b, lib) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
        dir.path().join("lib.safetensors"),
    );
    let out = run(&[
        "merge-into-model",
        "--sd_model",
        s(&base),
        "--models",
        s(&big),
        s(&small),
        "--ratios",
        "1.0",
        "-0.5",
        "--save_to",
        s(&a),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("LoRA modules baked"), "{}", text(&out));
    let out = run(&[
        "merge-into-model",
        "--ckpt-path",
        s(&base),
        "--models",
        s(&big),
        s(&small),
        "--ratios",
        "1.0",
        "-0.5",
        "--save-to",
        s(&b),
        "--save-precision",
        "bf16",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    merge_into_model(
        &base,
        &[(big.clone(), 1.0), (small.clone(), -0.5)],
        &lib,
        &BakeOptions::default(),
    )
    .unwrap();
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(bytes, std::fs::read(&lib).unwrap(), "CLI = library");
    assert_ne!(bytes, std::fs::read(&base).unwrap(), "the weights changed");
    // Without --save_precision each tensor keeps the base's dtype; with bf16 every float
    // tensor is BF16.
    let base_dtypes = dtypes(&std::fs::read(&base).unwrap());
    assert_eq!(dtypes(&bytes), base_dtypes);
    let b_dtypes = dtypes(&std::fs::read(&b).unwrap());
    assert_eq!(
        b_dtypes.keys().collect::<Vec<_>>(),
        base_dtypes.keys().collect::<Vec<_>>()
    );
    for (key, d) in &b_dtypes {
        let was = &base_dtypes[key];
        let float = ["F16", "BF16", "F32", "F64"].contains(&was.as_str());
        assert_eq!(d, if float { "BF16" } else { was }, "{key}");
    }
}

#[test]
fn a_lora_that_does_not_fit_is_refused_naming_the_module() {
    let dir = tempfile::tempdir().unwrap();
    let base = root().join("assets/tiny-sd/tiny-sd.safetensors");
    let mut lora = Lora::load(&trained(dir.path(), "l", 3)).unwrap();
    let (name, m) = lora
        .modules
        .iter()
        .next()
        .map(|(n, m)| (n.clone(), m.clone()))
        .unwrap();
    lora.modules
        .insert("lora_unet_input_blocks_4_1_proj_in".into(), m);
    let bad = dir.path().join("bad.safetensors");
    lora.save(&bad, Precision::F32).unwrap();
    let save_to = dir.path().join("out.safetensors");
    let out = run(&[
        "merge-into-model",
        "--sd_model",
        s(&base),
        "--models",
        s(&bad),
        "--ratios",
        "1",
        "--save_to",
        s(&save_to),
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("lora_unet_input_blocks_4_1_proj_in"), "{t}");
    assert!(
        !t.contains(&format!("`{name}`")),
        "only the misfit is named: {t}"
    );
    assert!(!save_to.exists());
    let out = run(&[
        "merge-into-model",
        "--sd_model",
        s(&base),
        "--models",
        s(&bad),
        "--ratios",
        "1",
        "2",
        "--save_to",
        s(&save_to),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("1 models but 2 ratios"),
        "{}",
        text(&out)
    );
}

/// A `merge_into_model` node in a recipe writes what the CLI writes, and its output can be
/// published; a second run is served from the store.
#[test]
fn the_merge_into_model_node_runs_in_a_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let base = root().join("assets/tiny-sd/tiny-sd.safetensors");
    let big = trained(dir.path(), "big", 4);
    let recipe = dir.path().join("r.yaml");
    std::fs::write(
        &recipe,
        format!(
            "base: {}\nnodes:\n  merged:\n    kind: merge_into_model\n    models: [{}]\n    ratios: [0.8]\noutputs:\n  merged: out/merged.safetensors\n",
            s(&base),
            s(&big)
        ),
    )
    .unwrap();
    let first = run(&[s(&recipe), "--json"]);
    assert!(first.status.success(), "{}", text(&first));
    let v: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(v["ran"], serde_json::json!(["merged"]));
    let lib = dir.path().join("lib.safetensors");
    merge_into_model(&base, &[(big, 0.8)], &lib, &BakeOptions::default()).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("out/merged.safetensors")).unwrap(),
        std::fs::read(&lib).unwrap()
    );
    let second = run(&[s(&recipe), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(
        v["cached"],
        serde_json::json!(["merged"]),
        "{}",
        text(&second)
    );
}
