//! Times `slider_recipe::load` on the shipped eyesize recipe and on a generated 1000-node
//! recipe (both with empty stand-in input files in a temp dir). Run with
//! `cargo run --release -p slider-recipe --example load_timing`.

use std::path::Path;
use std::time::{Duration, Instant};

fn touch(root: &Path, rel: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, b"").unwrap();
}

fn median_load(path: &Path, runs: usize) -> (Duration, usize) {
    let mut times = Vec::with_capacity(runs);
    let mut nodes = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let plan = slider_recipe::load(path, &[]).unwrap();
        times.push(t.elapsed());
        nodes = plan.nodes.len();
    }
    times.sort();
    (times[runs / 2], nodes)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::create_dir_all(root.join("recipes")).unwrap();
    std::fs::copy(
        repo.join("recipes/eyesize.yaml"),
        root.join("recipes/eyesize.yaml"),
    )
    .unwrap();
    touch(root, "assets/tiny-sd/tiny-sd.safetensors");
    for size in ["small", "big"] {
        for angle in ["front", "45deg", "side"] {
            touch(root, &format!("assets/pairs/{size}_{angle}.png"));
        }
    }

    // 250 values x (small, big, merge, resize) = 1000 nodes, each merge reading two files.
    let ids: Vec<String> = (0..250).map(|i| format!("v{i}")).collect();
    for id in &ids {
        touch(root, &format!("loras/small_{id}.safetensors"));
        touch(root, &format!("loras/big_{id}.safetensors"));
    }
    let big = format!(
        r#"matrix:
  id: [{}]
nodes:
  small_${{id}}:
    kind: merge
    models: ["loras/small_${{id}}.safetensors"]
    ratios: [1]
  big_${{id}}:
    kind: merge
    models: ["loras/big_${{id}}.safetensors"]
    ratios: [1]
  slider_${{id}}:
    kind: svd_merge
    models: ["big_${{id}}", "small_${{id}}"]
    ratios: [1.5, -1.5]
    new_rank: 8
  small_slider_${{id}}:
    kind: resize
    model: "slider_${{id}}"
    dynamic_method: sv_fro
    dynamic_param: 0.75
"#,
        ids.join(", ")
    );
    std::fs::write(root.join("big.yaml"), big).unwrap();

    println!("| recipe | nodes | median load (ms) |");
    println!("| --- | --- | --- |");
    for (name, path) in [
        ("recipes/eyesize.yaml", root.join("recipes/eyesize.yaml")),
        ("generated, 250 x 4", root.join("big.yaml")),
    ] {
        let (t, n) = median_load(&path, 21);
        println!("| {name} | {n} | {:.2} |", t.as_secs_f64() * 1e3);
    }
}
