//! Recipes: the YAML schema of a slider-run pipeline, its expansion (defaults, matrix,
//! `${vars}`, `--set` overrides), its validation, and its compilation to a typed [`Plan`]
//! (a petgraph DAG of nodes with kohya-named, fully defaulted parameters).
//!
//! ```
//! use std::path::Path;
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::write(dir.path().join("a.safetensors"), b"").unwrap();
//! std::fs::write(dir.path().join("b.safetensors"), b"").unwrap();
//! let recipe = r#"
//! nodes:
//!   slider: {kind: svd_merge, models: [b.safetensors, a.safetensors], ratios: [1.5, -1.5], new_rank: 8}
//!   small: {kind: resize, model: slider, dynamic_method: sv_fro, dynamic_param: 0.75}
//! outputs:
//!   small: out/slider.safetensors
//! "#;
//! let path = dir.path().join("recipe.yaml");
//! let plan = slider_recipe::load_str(recipe, &path, &["resize.new_rank=2".into()]).unwrap();
//! assert_eq!(plan.nodes[1].name, "small");
//! let slider_recipe::NodeParams::Resize(r) = &plan.nodes[1].params else { panic!() };
//! assert_eq!((r.new_rank, r.new_conv_rank), (2, 2));
//! assert_eq!(plan.graph.edge_count(), 1);
//! ```
//!
//! Errors are [`RecipeError`]s: miette diagnostics carrying the recipe text, a labelled span
//! at the offending text (file:line:column), a help line ("did you mean `new_rank`?"), and
//! every independent problem at once as `related` diagnostics.
//!
//! Why not serde_yaml: its `Value` forgets positions, and its deserializer reports at most
//! one position for the first error. Recipes are read with `saphyr-parser` events instead,
//! which carry start and end of every scalar, list and mapping; the crate builds its own
//! small tree (`yaml.rs`) in which every key and value keeps its span, and types plain
//! scalars by the YAML 1.2 core schema (so `"3"` stays a string and `3` is a number).
//!
//! The reference rule: in a slot that reads an input (`models`, `model`, `base`, `images`,
//! `loras`, a `lora` axis, `command` inputs) a string equal to a node's name (after matrix
//! expansion) refers to that node; anything else is a file path, relative to the recipe's
//! directory, which must exist. Node names cannot contain `.` or `/`, so `./name` always
//! means a file.

pub mod cluster;
mod compile;
mod diag;
mod expand;
mod params;
pub mod plan;
mod yaml;

use std::path::Path;

pub use cluster::{ClusterProfile, JobResources, load_profile};
pub use compile::TOP_KEYS;
pub use diag::{Location, Problem, RecipeError};
pub use params::{KINDS, SD_SCRIPTS_ENV, SD_SCRIPTS_PYTHON_ENV, param_names};
pub use plan::*;

/// Parse, expand, validate and compile a recipe file. `overrides` are `--set` strings such
/// as `train.max_train_steps=10` (kind-level default) or `nodes.big_front.seed=3` (one node).
pub fn load(path: &Path, overrides: &[String]) -> Result<Plan, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(&text, path, overrides)
}

/// The same from text (tests); `path` is used for messages and resolving relative paths.
pub fn load_str(text: &str, path: &Path, overrides: &[String]) -> Result<Plan, RecipeError> {
    let mut sources = diag::Sources::new(path.display().to_string(), text);
    let mut diags = Vec::new();
    let plan = compile::compile(text, path, overrides, &mut sources, &mut diags);
    match plan {
        Some(plan) if diags.is_empty() => Ok(plan),
        _ => {
            if diags.is_empty() {
                diags.push(diag::Diag::new(
                    "recipe::invalid",
                    "the recipe could not be compiled",
                    diag::Span::new(0, 0, 0),
                    "here",
                ));
            }
            Err(sources.error(diags))
        }
    }
}
