//! Benchmark: how long a no-op re-run takes (every node cached) for an eyesize-sized recipe
//! (the merge-only shapes on SD1.5-layout LoRAs), a generated 1000-node recipe of `command`
//! nodes, and a recipe whose input is a 4 GB (sparse) file, which must not be re-hashed.
//!
//! ```text
//! cargo run --release -p slider-engine --example noop_rerun [-- --bin target/release/slider-run]
//! ```
//! Each case: one real first run (not timed), then N no-op re-runs, each loading the recipe
//! (`slider_recipe::load`) and running it (`slider_engine::run`) in-process; with `--bin`,
//! also N runs of the real binary (process start included). Prints a markdown table.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use slider_engine::{RunOptions, Silent, Store};
use slider_lora::synth::{Layout, random_lora};

const REPEATS: usize = 15;

struct Case {
    name: &'static str,
    goal_ms: f64,
    recipe: PathBuf,
    nodes: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .iter()
        .position(|a| a == "--bin")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let dir = tempfile::Builder::new().prefix("slider-bench-").tempdir()?;
    let cases = vec![
        eyesize(&dir.path().join("eyesize"))?,
        thousand(&dir.path().join("thousand"))?,
        big_input(&dir.path().join("big"))?,
    ];
    let mut table = String::from(
        "| recipe | nodes | first run | no-op re-run, in-process (median / min) | no-op re-run, `slider-run` binary (median) | bytes re-hashed | goal |\n|---|---|---|---|---|---|---|\n",
    );
    for case in &cases {
        eprintln!("{}: first run...", case.name);
        let t0 = Instant::now();
        let first = run_once(&case.recipe)?;
        let first_s = t0.elapsed().as_secs_f64();
        assert_eq!(
            first.ran.len(),
            case.nodes,
            "{}: first run executes everything",
            case.name
        );
        let mut times = Vec::new();
        let mut rehashed = 0;
        for _ in 0..REPEATS {
            let t = Instant::now();
            let s = run_once(&case.recipe)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(
                s.ran.is_empty() && s.cached.len() == case.nodes,
                "{}: a no-op re-run",
                case.name
            );
            rehashed += s.hashed_bytes;
        }
        let bin_ms = match &bin {
            Some(b) => {
                let mut t = Vec::new();
                for _ in 0..REPEATS {
                    let t0 = Instant::now();
                    let out = Command::new(b).arg(&case.recipe).arg("-q").output()?;
                    t.push(t0.elapsed().as_secs_f64() * 1e3);
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                format!("{:.1} ms", median(&mut t))
            }
            None => "(not measured)".into(),
        };
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        writeln!(
            table,
            "| {} | {} | {:.1} s | {:.1} / {:.1} ms | {} | {} | < {} ms |",
            case.name,
            case.nodes,
            first_s,
            median(&mut times),
            min,
            bin_ms,
            rehashed,
            case.goal_ms
        )?;
    }
    print!("{table}");
    Ok(())
}

fn run_once(recipe: &Path) -> Result<slider_engine::RunSummary, Box<dyn std::error::Error>> {
    let plan = slider_recipe::load(recipe, &[])?;
    let store = Store::default_root(&plan.recipe_path);
    Ok(slider_engine::run(
        &plan,
        &store,
        &RunOptions::default(),
        &Silent,
    )?)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The merge/resize half of the method on six SD1.5-layout rank-4 LoRAs (5 nodes), like
/// recipes/merge-only.yaml.
fn eyesize(dir: &Path) -> Result<Case, Box<dyn std::error::Error>> {
    fs::create_dir_all(dir)?;
    for (i, angle) in ["front", "45deg", "side"].iter().enumerate() {
        for (j, size) in ["big", "small"].iter().enumerate() {
            random_lora(Layout::Sd1, 4, 1.0, (10 * i + j) as u64).save(
                &dir.join(format!("{size}_{angle}.safetensors")),
                slider_lora::Precision::F32,
            )?;
        }
    }
    let recipe = dir.join("eyesize.yaml");
    fs::write(
        &recipe,
        r#"
matrix:
  angle: [front, 45deg, side]
nodes:
  slider_${angle}:
    kind: svd_merge
    models:
      - big_${angle}.safetensors
      - small_${angle}.safetensors
    ratios: [1.5, -1.5]
    new_rank: 8
  slider:
    kind: svd_merge
    models: [slider_front, slider_45deg, slider_side]
    ratios: [1.0, 1.0, 1.0]
    new_rank: 8
  eyesize:
    kind: resize
    model: slider
    new_rank: 4
    dynamic_method: sv_fro
    dynamic_param: 0.75
    save_precision: fp16
outputs:
  eyesize: out/eyesize.safetensors
"#,
    )?;
    Ok(Case {
        name: "eyesize-sized (merge-only shapes, SD1.5 LoRAs)",
        goal_ms: 50.0,
        recipe,
        nodes: 5,
    })
}

/// 1000 `command` nodes: 10 chains of 100, each node copying its predecessor plus a line.
fn thousand(dir: &Path) -> Result<Case, Box<dyn std::error::Error>> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join("seed.txt"), "seed\n")?;
    let mut text = String::from("nodes:\n");
    for chain in 0..10 {
        for i in 0..100 {
            let input = if i == 0 {
                "seed.txt".to_string()
            } else {
                format!("n{chain}_{}", i - 1)
            };
            writeln!(
                text,
                "  n{chain}_{i}:\n    kind: command\n    run: [sh, -c, \"cat {{x}} > {{out}}; echo {chain}.{i} >> {{out}}\"]\n    inputs: {{x: {input}}}\n    outputs: {{out: o.txt}}"
            )?;
        }
    }
    let recipe = dir.join("thousand.yaml");
    fs::write(&recipe, text)?;
    Ok(Case {
        name: "1000 `command` nodes (10 chains of 100)",
        goal_ms: 200.0,
        recipe,
        nodes: 1000,
    })
}

/// One node reading a 4 GiB input (a sparse file, deleted with the temp dir).
fn big_input(dir: &Path) -> Result<Case, Box<dyn std::error::Error>> {
    fs::create_dir_all(dir)?;
    let big = dir.join("base.safetensors");
    fs::File::create(&big)?.set_len(4 << 30)?;
    let recipe = dir.join("big.yaml");
    fs::write(
        &recipe,
        "nodes:\n  reads_base:\n    kind: command\n    run: [sh, -c, \"ls -l {base} > {out}\"]\n    inputs: {base: base.safetensors}\n    outputs: {out: o.txt}\n",
    )?;
    Ok(Case {
        name: "a 4 GiB input file",
        goal_ms: 50.0,
        recipe,
        nodes: 1,
    })
}
