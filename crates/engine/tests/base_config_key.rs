//! `base_config` in the node key: by the config file's content (not its path), for every kind
//! that takes it, and absent from the key when the recipe has none (so recipes without it keep
//! their keys; `golden_keys.rs` pins those of the shipped recipes).

use std::collections::BTreeMap;
use std::path::Path;

use slider_engine::fingerprint::{FileHashMemo, Fingerprint, fingerprint};
use slider_recipe::Input;

const RECIPE: &str = r#"
base: base.safetensors
nodes:
  slider:
    kind: train
    network_train_unet_only: true
    images: [face.png]
  grid: {kind: xy_plot, prompt: 1girl, loras: [slider], x: {weight: [0, 1]}}
  quality: {kind: evaluate, lora: slider, meter: meter.safetensors, prompts: [a]}
  merged: {kind: merge, models: [a.safetensors], ratios: [1]}
"#;

/// Each node's fingerprint, input files hashed afresh (upstream nodes by their name).
fn fingerprints(dir: &Path, set: &[&str]) -> BTreeMap<String, Fingerprint> {
    let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    let plan = slider_recipe::load_str(RECIPE, &dir.join("recipe.yaml"), &set).unwrap();
    let mut memo = FileHashMemo::default();
    plan.nodes
        .iter()
        .map(|node| {
            let fp = fingerprint(&node.params, 0, |input| match input {
                Input::File(p) => Ok(Some(memo.hash(p).unwrap())),
                Input::Node(n) => Ok(Some(blake3::hash(n.as_bytes()).to_hex().to_string())),
            })
            .unwrap();
            (node.name.clone(), fp)
        })
        .collect()
}

fn keys(dir: &Path, set: &[&str]) -> BTreeMap<String, String> {
    fingerprints(dir, set)
        .into_iter()
        .map(|(n, fp)| (n, fp.key.unwrap()))
        .collect()
}

#[test]
fn base_config_enters_the_key_by_content_and_only_when_present() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for f in [
        "base.safetensors",
        "face.png",
        "meter.safetensors",
        "a.safetensors",
    ] {
        std::fs::write(d.join(f), f).unwrap();
    }
    std::fs::write(d.join("unet.json"), r#"{"norm_num_groups": 8}"#).unwrap();
    std::fs::write(d.join("same.json"), r#"{"norm_num_groups": 8}"#).unwrap();
    std::fs::write(d.join("other.json"), r#"{"norm_num_groups": 16}"#).unwrap();

    let without = keys(d, &[]);
    let with = keys(d, &["base_config=unet.json"]);
    let configured = ["grid", "quality", "slider"];
    for node in configured {
        assert_ne!(
            with[node], without[node],
            "{node}: the config must change the key"
        );
    }
    // The merge node takes no base_config, and keys nodes by name here: unchanged.
    assert_eq!(with["merged"], without["merged"]);

    // Content, not path: the same bytes elsewhere give the same keys, others do not.
    assert_eq!(keys(d, &["base_config=same.json"]), with);
    let other = keys(d, &["base_config=other.json"]);
    for node in configured {
        assert_ne!(other[node], with[node], "{node}");
    }
    // Editing the file changes the keys (fresh hashes: the memo is per run).
    std::fs::write(d.join("unet.json"), r#"{"norm_num_groups": 16}"#).unwrap();
    assert_eq!(keys(d, &["base_config=unet.json"]), other);

    // Absent (or null), the document has no `base_config` at all: the key of a recipe
    // written before the slot existed.
    assert_eq!(keys(d, &["base_config=null"]), without);
    let fps = fingerprints(d, &[]);
    for node in configured {
        let params = &fps[node].doc["params"];
        assert!(params.get("base_config").is_none(), "{node}: {params}");
    }
    // Present, it is an input source, hashed in place of the path.
    let fps = fingerprints(d, &["base_config=same.json"]);
    for node in configured {
        let fp = &fps[node];
        let source = fp
            .sources
            .iter()
            .find(|s| s.at == "params.base_config")
            .unwrap_or_else(|| panic!("{node}: no base_config source"));
        let hash = blake3::hash(br#"{"norm_num_groups": 8}"#)
            .to_hex()
            .to_string();
        assert_eq!(source.hash.as_deref(), Some(hash.as_str()), "{node}");
        assert_eq!(
            fp.doc["params"]["base_config"],
            serde_json::Value::String(format!("blake3:{hash}")),
            "{node}"
        );
    }
}
