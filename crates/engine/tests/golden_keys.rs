//! The node keys of the shipped recipes, pinned. A key is blake3 of the canonical
//! serialisation of a node's typed parameters, so renaming a field, changing a default or
//! changing how a value is written would silently invalidate every user's store. This test
//! makes such a change fail; when it is made on purpose, update the table and say so in
//! docs/architecture.md ("What is in a key").
//!
//! Input nodes are given fixed stand-in hashes (blake3 of their name), so every node of the
//! plan has a key without running anything; code versions are fixed at 0 here (they are
//! pinned by each kind's own golden-bytes test).

use std::collections::BTreeMap;
use std::path::Path;

use slider_engine::fingerprint::{FileHashMemo, fingerprint};
use slider_recipe::Input;

fn keys_of(recipe: &str) -> BTreeMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../recipes")
        .join(recipe);
    let plan = slider_recipe::load(&path, &[]).expect("shipped recipe compiles");
    let mut memo = FileHashMemo::default();
    plan.nodes
        .iter()
        .map(|node| {
            let fp = fingerprint(&node.params, 0, |input| match input {
                Input::File(p) => Ok(Some(memo.hash(p).expect("input file readable"))),
                Input::Node(n) => Ok(Some(blake3::hash(n.as_bytes()).to_hex().to_string())),
            })
            .expect("fingerprint");
            (node.name.clone(), fp.key.expect("all inputs known"))
        })
        .collect()
}

fn print_table(keys: &BTreeMap<String, String>) -> String {
    keys.iter()
        .map(|(n, k)| format!("        (\"{n}\", \"{k}\"),\n"))
        .collect()
}

#[test]
fn shipped_recipes_keep_their_node_keys() {
    for (recipe, pinned) in PINNED {
        let keys = keys_of(recipe);
        let want: BTreeMap<String, String> = pinned
            .iter()
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect();
        assert_eq!(
            keys,
            want,
            "the keys of {recipe} changed; if on purpose, pin these:\n{}",
            print_table(&keys)
        );
    }
}

type Pinned = &'static [(&'static str, &'static str)];

const PINNED: [(&str, Pinned); 2] = [("eyesize.yaml", EYESIZE), ("merge-only.yaml", MERGE_ONLY)];

const EYESIZE: Pinned = &[
    (
        "big_45deg",
        "6ec7ce1c9cc49f17f624f535dd3653f910082789cb496d53ae62638ad2b03718",
    ),
    (
        "big_front",
        "393cc70bd8f35f402e290233323829bd44c4f5be7acfa4d83e06b1896e1550a5",
    ),
    (
        "big_side",
        "eec954ada861af4ca83d09741fccbb6f60704b19386ed4c4c31b345abdcc23c0",
    ),
    (
        "check_big_45deg",
        "e9eb98b2b4796550e63442a65b026a3ad5fc36d26106b3db3c7716f6f6148001",
    ),
    (
        "check_big_front",
        "30b50b087fe05bc6ebdfaafe8631a713031a98c8e19d52da59c06a581c43580a",
    ),
    (
        "check_big_side",
        "b790049b1af879075164b7503116db43d0a96c888488a0b3c9e7ac3868f8fe9f",
    ),
    (
        "check_eyesize",
        "dbd8d98c931875030057f8a2b7d4f445c33961e313f02c6ff372086739330cf3",
    ),
    (
        "check_small_45deg",
        "4ca2521d33a13790d297562a90fc13691880c5d66b513d56a62fe5ea2cd40488",
    ),
    (
        "check_small_front",
        "125dccf47f7aeb95db4a0bf97fd89d5bf1bc50eab06cd2292c6fcafad0c5d0ff",
    ),
    (
        "check_small_side",
        "6ddc775ea61773788be21aa51d0a0f64724089ad370db9c4716ae0c0b1971a72",
    ),
    (
        "eyesize",
        "83e1f21f4b3495c3ded70fc69cd6656ac86733944d89abdb7a6e04612a42d7bc",
    ),
    (
        "quality_eyesize",
        "35b7d39457f0ac50c94759160a273fe14fbd47a2fc9662144c2188915906513e",
    ),
    (
        "quality_side",
        "39e8ba5b51f919d7fea4a2af72c611316fc74276b4488147621be9253d11c62c",
    ),
    (
        "slider",
        "328ac60ccae72b9f2e47b7ea5d74c0bd60296a59c98f38dded3a90d273aeb88a",
    ),
    (
        "slider_45deg",
        "2af20639d441e5fb85c724aee7f28feaab9345ed3f9c1b3e7784ded6c48fdac0",
    ),
    (
        "slider_front",
        "77cfa7afaad5887dbc57d962a7d92263c13fc8b5ac14d5ee3f1969bf0d79e9e9",
    ),
    (
        "slider_side",
        "632c499e0f4d21695664ce5cf16d528550f4a3ab96eda5102203e03e755990e5",
    ),
    (
        "small_45deg",
        "e78133238e1ba91765e99cdb0a43c3f992e0ce4286e8b707adedf5950cb44993",
    ),
    (
        "small_front",
        "25404e7e7802e19048acaf5026e37afbfe568055827ffb2c0a14a9e6196938fc",
    ),
    (
        "small_side",
        "66625d1c2714505383d7b0624519d3a01c5853de1cf591f0085ab87b1a2e74e9",
    ),
];
const MERGE_ONLY: Pinned = &[
    (
        "eyesize",
        "83e1f21f4b3495c3ded70fc69cd6656ac86733944d89abdb7a6e04612a42d7bc",
    ),
    (
        "slider",
        "15e8153bf6c3ec09c8efcc8130d98ae15974af8b4672ab8eebad25442248b611",
    ),
    (
        "slider_45deg",
        "0ed7030314f9c2850ad819beaf009e7345cff2f3b65e78244f0b2ab5ab739040",
    ),
    (
        "slider_front",
        "d7a92b9a3494dd2e6099012297d385c84c27d26bf44426bf6d21d848372f6ab1",
    ),
    (
        "slider_side",
        "8a2942dfddf58814de356ff517b8446b182cd07a7c9ebf0c11ad525f6d00a3d7",
    ),
];
