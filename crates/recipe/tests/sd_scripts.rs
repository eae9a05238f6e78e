//! `trainer: sd-scripts`: what the recipe accepts for it (what sd-scripts implements and our
//! burn trainer refuses), what it refuses at plan time with a line and column (`base_config`,
//! which sd-scripts lacks; a folder that is no checkout; the keys on a burn node), and where
//! the checkout and Python come from.

use std::fs;
use std::path::{Path, PathBuf};

use slider_recipe::{MixedPrecision, NodeParams, Plan, RecipeError, TrainParams, Trainer};

/// A project folder: a base, an image, a config and a fake checkout (`sd/train_network.py`).
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["base.safetensors", "small.png", "config.json"] {
        fs::write(dir.path().join(f), b"").unwrap();
    }
    fs::create_dir_all(dir.path().join("sd/venv/bin")).unwrap();
    fs::write(dir.path().join("sd/train_network.py"), b"").unwrap();
    fs::create_dir_all(dir.path().join("empty")).unwrap();
    dir
}

fn load(dir: &Path, recipe: &str, set: &[&str]) -> Result<Plan, RecipeError> {
    let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    slider_recipe::load_str(recipe, &dir.join("recipe.yaml"), &set)
}

fn train(plan: &Plan, node: &str) -> TrainParams {
    match &plan.nodes.iter().find(|n| n.name == node).unwrap().params {
        NodeParams::Train(p) => p.clone(),
        other => panic!("{other:?}"),
    }
}

/// The problems' codes with their line:column.
fn problems(err: &RecipeError) -> Vec<(String, usize, usize)> {
    err.problems()
        .iter()
        .map(|p| (p.code().to_string(), p.location().line, p.location().column))
        .collect()
}

const RECIPE: &str = "\
base: base.safetensors
nodes:
  small:
    kind: train
    images: [small.png]
    trainer: sd-scripts
    sd_scripts: sd
    sd_scripts_python: sd/venv/bin/python3
    mixed_precision: bf16
    gradient_checkpointing: true
";

#[test]
fn sd_scripts_takes_what_it_implements() {
    let dir = project();
    fs::write(dir.path().join("sd/venv/bin/python3"), b"").unwrap();
    let p = train(&load(dir.path(), RECIPE, &[]).unwrap(), "small");
    assert_eq!(p.trainer, Trainer::SdScripts);
    assert_eq!(p.mixed_precision, MixedPrecision::Bf16);
    assert!(p.gradient_checkpointing);
    // kohya's default: the text encoders train too (the burn trainer refuses this).
    assert!(!p.network_train_unet_only);
    let install = p.sd_scripts.unwrap();
    assert_eq!(install.checkout, dir.path().join("sd"));
    assert_eq!(install.python, dir.path().join("sd/venv/bin/python3"));
}

/// The checkout's `venv/bin/python` when no Python is named (and the environment names none).
#[test]
fn the_checkouts_venv_is_the_default_python() {
    if std::env::var_os(slider_recipe::SD_SCRIPTS_PYTHON_ENV).is_some() {
        eprintln!("skipped: {} is set", slider_recipe::SD_SCRIPTS_PYTHON_ENV);
        return;
    }
    let dir = project();
    let recipe = "base: base.safetensors\ndefaults: {train: {sd_scripts: sd}}\n\
                  nodes: {small: {kind: train, images: [small.png]}}\n";
    let plan = load(dir.path(), recipe, &["train.trainer=sd-scripts"]).unwrap();
    let p = train(&plan, "small");
    assert_eq!(p.trainer, Trainer::SdScripts);
    let python = p.sd_scripts.unwrap().python;
    assert_eq!(python, PathBuf::from("python3"));
    fs::write(dir.path().join("sd/venv/bin/python"), b"").unwrap();
    let p = train(
        &load(dir.path(), recipe, &["train.trainer=sd-scripts"]).unwrap(),
        "small",
    );
    assert_eq!(
        p.sd_scripts.unwrap().python,
        dir.path().join("sd/venv/bin/python")
    );
}

#[test]
fn burn_stays_the_default_and_leaves_no_trace_in_the_parameters() {
    let dir = project();
    let recipe = "base: base.safetensors\n\
                  nodes: {small: {kind: train, images: [small.png], network_train_unet_only: true}}\n";
    let p = train(&load(dir.path(), recipe, &[]).unwrap(), "small");
    assert_eq!((p.trainer, p.sd_scripts.clone()), (Trainer::Burn, None));
    let json = serde_json::to_string(&NodeParams::Train(p)).unwrap();
    assert!(
        !json.contains("trainer") && !json.contains("sd_scripts"),
        "{json}"
    );
}

/// What a recipe is, the problems it gets: (code, line, column).
type Refusal = (
    &'static str,
    &'static str,
    &'static [(&'static str, usize, usize)],
);

/// Each refusal with its code and where it points.
#[test]
fn refusals_point_at_the_key() {
    let dir = project();
    let cases: &[Refusal] = &[
        (
            "sd-scripts has no base_config",
            "base: base.safetensors\nbase_config: config.json\nnodes:\n  small:\n    kind: train\n    \
             images: [small.png]\n    trainer: sd-scripts\n    sd_scripts: sd\n",
            &[("recipe::not_in_trainer", 2, 14)],
        ),
        (
            "the keys of sd-scripts on a burn node",
            "base: base.safetensors\nnodes:\n  small:\n    kind: train\n    images: [small.png]\n    \
             network_train_unet_only: true\n    sd_scripts: sd\n",
            &[("recipe::bad_value", 7, 17)],
        ),
        (
            "a folder that is no checkout",
            "base: base.safetensors\nnodes:\n  small:\n    kind: train\n    images: [small.png]\n    \
             trainer: sd-scripts\n    sd_scripts: empty\n",
            &[("recipe::bad_value", 7, 17)],
        ),
        (
            "an unknown trainer",
            "base: base.safetensors\nnodes:\n  small:\n    kind: train\n    images: [small.png]\n    \
             network_train_unet_only: true\n    trainer: sd_script\n",
            &[("recipe::bad_value", 7, 14)],
        ),
        (
            "a Python that is not there",
            "base: base.safetensors\nnodes:\n  small:\n    kind: train\n    images: [small.png]\n    \
             trainer: sd-scripts\n    sd_scripts: sd\n    sd_scripts_python: sd/nope/python\n",
            &[("recipe::bad_value", 8, 24)],
        ),
    ];
    for (what, recipe, want) in cases {
        let err = load(dir.path(), recipe, &[]).expect_err(what);
        let want: Vec<(String, usize, usize)> = want
            .iter()
            .map(|(c, l, col)| (c.to_string(), *l, *col))
            .collect();
        assert_eq!(problems(&err), want, "{what}");
        assert!(
            err.problems().iter().all(|p| p.help_text().is_some()),
            "{what}"
        );
    }
}

#[test]
fn a_node_without_a_checkout_is_refused_at_its_trainer() {
    if std::env::var_os(slider_recipe::SD_SCRIPTS_ENV).is_some() {
        eprintln!("skipped: {} is set", slider_recipe::SD_SCRIPTS_ENV);
        return;
    }
    let dir = project();
    let recipe = "base: base.safetensors\nnodes:\n  small:\n    kind: train\n    \
                  images: [small.png]\n    trainer: sd-scripts\n";
    let err = load(dir.path(), recipe, &[]).unwrap_err();
    assert_eq!(problems(&err), [("recipe::missing_key".to_string(), 6, 14)]);
    let help = err.problems()[0].help_text().unwrap();
    assert!(help.contains(slider_recipe::SD_SCRIPTS_ENV), "{help}");
}
