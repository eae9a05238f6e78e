//! The default recipe, `recipes/eyesize.yaml`, on the shipped assets (tiny pretrained base,
//! training pairs, eye meter), shortened with `--set` so it runs in CI: every output exists and
//! is valid, and a second run is all cached.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use slider_grid::read_png_text;

use crate::{json_of, slider_run};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The recipe copied into `dir/recipes/` with `dir/assets` pointing at the repository's
/// assets, so its relative paths hold and its outputs land in `dir`, not in the checkout.
pub(crate) fn project(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir.join("recipes")).unwrap();
    std::os::unix::fs::symlink(repo().join("assets"), dir.join("assets")).unwrap();
    let recipe = dir.join("recipes/eyesize.yaml");
    fs::copy(repo().join("recipes/eyesize.yaml"), &recipe).unwrap();
    recipe
}

pub(crate) const SHORT: &[&str] = &[
    "--set",
    "train.max_train_steps=3",
    "--set",
    "train.lr_warmup_steps=1",
    "--set",
    "xy_plot.steps=2",
    "--set",
    "xy_plot.y={seed: [1]}",
    "--set",
    "evaluate.steps=2",
    "--set",
    "evaluate.seeds=[1, 2]",
    "--set",
    "evaluate.weights=[-1, 0, 1]",
];

fn run(recipe: &Path) -> Value {
    json_of(slider_run().arg(recipe).args(SHORT).arg("--json"))
}

#[test]
fn the_shortened_default_recipe_makes_every_output_and_then_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = project(dir.path());

    let first = run(&recipe);
    assert_eq!(first["failed"].as_array().unwrap().len(), 0, "{first}");
    // 6 trainings, 3 + 1 merges, 1 resize, 7 grids, 2 evaluations.
    assert_eq!(first["ran"].as_array().unwrap().len(), 20, "{first}");

    let out = dir.path().join("recipes/out");
    let slider = slider_lora::Lora::load(&out.join("eyesize.safetensors")).unwrap();
    assert!(!slider.modules.is_empty());
    assert!(
        slider.modules.values().all(|m| m.rank <= 4),
        "the resize keeps at most rank 4"
    );

    for angle in ["front", "45deg", "side"] {
        for size in ["small", "big"] {
            let grid = out.join(format!("checks/{size}_{angle}.png"));
            let image = image::open(&grid).unwrap();
            assert!(image.width() > 2 * 64 && image.height() > 64, "{grid:?}");
            assert!(
                read_png_text(&grid)
                    .unwrap()
                    .iter()
                    .any(|(k, _)| k == "parameters")
            );
        }
    }
    let eyesize = image::open(out.join("checks/eyesize.png")).unwrap();
    assert!(eyesize.width() > 5 * 64, "five weights across");

    for (name, prompts) in [("eyesize", 3), ("side", 1)] {
        let report: Value =
            serde_json::from_slice(&fs::read(out.join(format!("quality/{name}.json"))).unwrap())
                .unwrap();
        assert_eq!(report["prompts"].as_array().unwrap().len(), prompts);
        assert_eq!(
            report["samples"].as_array().unwrap().len(),
            prompts * 2 * 3,
            "prompts x seeds x weights"
        );
        // A trained slider at weights -1 and 1 changes pixels, inside the eyes and out.
        let pooled = &report["pooled"];
        for figure in ["outside_change", "inside_change"] {
            let v = pooled[figure].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{name} {figure}: {v}");
        }
        let spearman = pooled["spearman"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&spearman), "{name}: {spearman}");
    }

    let report = check_report(&first, &out);
    assert!(
        report.contains("class=\"ran\"") && !report.contains("<td class=\"cached\">"),
        "every node ran"
    );

    let second = run(&recipe);
    assert_eq!(second["ran"].as_array().unwrap().len(), 0, "{second}");
    assert_eq!(second["cached"].as_array().unwrap().len(), 20, "{second}");
    let report = check_report(&second, &out);
    assert_eq!(
        report.matches("<td class=\"cached\">").count(),
        20,
        "every node cached"
    );
    assert_eq!(
        report.matches(" s when it ran</td>").count(),
        20,
        "cached nodes show the time they took when they ran (from the store)"
    );
}

/// The run's HTML report (`recipes/eyesize.report.html`): it names every node, draws the
/// graph and the six loss curves as SVG, shows every published grid through a relative path
/// that resolves to it, and has both quality tables. Returns its text.
fn check_report(summary: &Value, out: &Path) -> String {
    let path = PathBuf::from(summary["report"].as_str().expect("a report path"));
    assert_eq!(
        path.canonicalize().unwrap(),
        out.join("../eyesize.report.html").canonicalize().unwrap()
    );
    let html = fs::read_to_string(&path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<svg class=\"dag\""));
    for list in ["ran", "cached"] {
        for node in summary[list].as_array().unwrap() {
            let name = node.as_str().unwrap();
            assert!(html.contains(&format!("<tr><td>{name}</td>")), "{name}");
        }
    }
    assert_eq!(
        html.matches("<svg class=\"loss\"").count(),
        6,
        "one per training"
    );

    let srcs: Vec<&str> = html
        .split("<img src=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    let shown: std::collections::BTreeSet<PathBuf> = srcs
        .iter()
        .map(|src| {
            assert!(!src.starts_with('/') && !src.contains('%'), "{src}");
            path.parent().unwrap().join(src).canonicalize().unwrap()
        })
        .collect();
    let published: std::collections::BTreeSet<PathBuf> = summary["published"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| p.canonicalize().unwrap())
        .collect();
    assert_eq!(published.len(), 7, "{summary}");
    assert_eq!(shown, published);
    assert_eq!(srcs.len(), published.len());

    assert_eq!(html.matches("<table class=\"quality\">").count(), 2);
    for (node, prompt) in [
        ("quality_eyesize", "three-quarter view"),
        ("quality_side", "side view, profile"),
    ] {
        assert!(html.contains(&format!("<h3>{node} (slider")), "{node}");
        assert!(html.contains(prompt), "{prompt}");
    }
    assert_eq!(html.matches("all prompts (pooled)").count(), 2);
    html
}
