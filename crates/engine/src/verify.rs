//! `verify`: re-executes a recipe (or some nodes and what they read) in a scratch store,
//! without reading the real one, and compares every output with `RECIPE.lock`: byte-equal,
//! or for LoRA files within a relative delta error (`--tolerance`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use petgraph::graph::DiGraph;
use serde::Serialize;
use slider_recipe::Plan;

use crate::error::EngineError;
use crate::lockfile::{Lockfile, lockfile_path};
use crate::run::{Observer, RunOptions, dependencies, run};
use crate::store::{OutputFile, Store};

/// Compares two LoRA files; returns the relative Frobenius error of their deltas.
pub type LoraComparer = dyn Fn(&Path, &Path) -> Result<f64, String> + Sync;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Every output byte-equal to the lockfile.
    Identical,
    /// Some output differs in bytes, but every LoRA delta is within the tolerance.
    WithinTolerance {
        max_error: f64,
    },
    Differs {
        detail: String,
    },
    /// The node's key differs from the lockfile's: the recipe or an input changed since.
    KeyChanged {
        locked: String,
        now: String,
    },
    NotInLockfile,
    Failed {
        error: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyRow {
    pub node: String,
    #[serde(flatten)]
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub rows: Vec<VerifyRow>,
    pub wall_s: f64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.rows.iter().all(|r| {
            matches!(
                r.verdict,
                Verdict::Identical | Verdict::WithinTolerance { .. }
            )
        })
    }
}

/// Re-executes `nodes` (all when empty) and the nodes they read, and compares.
/// `real_store` is only read for reference LoRA files when a tolerance comparison needs
/// the locked bytes (never as a cache).
pub fn verify(
    plan: &Plan,
    real_store: &Path,
    nodes: &[String],
    tolerance: Option<(f64, &LoraComparer)>,
    opts: &RunOptions,
    observer: &dyn Observer,
) -> Result<VerifyReport, EngineError> {
    let lock = Lockfile::read(&lockfile_path(&plan.recipe_path))?;
    let selected: BTreeSet<String> = if nodes.is_empty() {
        plan.nodes.iter().map(|n| n.name.clone()).collect()
    } else {
        for n in nodes {
            if !plan.nodes.iter().any(|p| &p.name == n) {
                return Err(EngineError::UnknownNode(n.clone()));
            }
        }
        nodes.iter().cloned().collect()
    };
    let sub = with_ancestors(plan, &selected);
    let scratch = tempfile::Builder::new()
        .prefix("slider-verify-")
        .tempdir()
        .map_err(EngineError::io(
            "creating scratch store",
            std::env::temp_dir(),
        ))?;
    let scratch_opts = RunOptions {
        publish: false,
        write_lockfile: false,
        ..opts.clone()
    };
    let summary = run(&sub, scratch.path(), &scratch_opts, observer)?;
    let store = Store::at(scratch.path());
    let real = Store::at(real_store);
    let mut rows = Vec::new();
    for node in sub.nodes.iter().filter(|n| selected.contains(&n.name)) {
        let verdict = if let Some(f) = summary
            .failed
            .iter()
            .chain(&summary.skipped)
            .find(|r| r.name == node.name)
        {
            Verdict::Failed {
                error: f.error.clone().unwrap_or_default(),
            }
        } else if let Some(locked) = lock.nodes.get(&node.name) {
            match summary.keys.get(&node.name) {
                Some(now) if now != &locked.key => Verdict::KeyChanged {
                    locked: locked.key.clone(),
                    now: now.clone(),
                },
                Some(now) => match store.manifest(now)? {
                    Some(m) => compare(
                        &m.outputs,
                        &locked.outputs,
                        &store.object_dir(now),
                        &real.object_dir(&locked.key),
                        tolerance,
                    ),
                    None => Verdict::Failed {
                        error: "no result in the scratch store".into(),
                    },
                },
                None => Verdict::Failed {
                    error: "did not run".into(),
                },
            }
        } else {
            Verdict::NotInLockfile
        };
        rows.push(VerifyRow {
            node: node.name.clone(),
            verdict,
        });
    }
    Ok(VerifyReport {
        rows,
        wall_s: summary.wall_s,
    })
}

fn compare(
    now: &[OutputFile],
    locked: &[OutputFile],
    now_dir: &Path,
    locked_dir: &Path,
    tolerance: Option<(f64, &LoraComparer)>,
) -> Verdict {
    if now.len() != locked.len() {
        return Verdict::Differs {
            detail: format!("{} outputs, the lockfile has {}", now.len(), locked.len()),
        };
    }
    let mut max_error: Option<f64> = None;
    for (a, b) in now.iter().zip(locked) {
        if a.file != b.file {
            return Verdict::Differs {
                detail: format!("output {} is named {} in the lockfile", a.file, b.file),
            };
        }
        if a.hash == b.hash {
            continue;
        }
        let Some((tol, comparer)) = tolerance.filter(|_| a.file.ends_with(".safetensors")) else {
            return Verdict::Differs {
                detail: format!(
                    "{}: blake3 {} but the lockfile has {}",
                    a.file,
                    &a.hash[..12],
                    &b.hash[..12.min(b.hash.len())]
                ),
            };
        };
        let reference: PathBuf = locked_dir.join(&b.file);
        if !reference.is_file() {
            return Verdict::Differs {
                detail: format!(
                    "{}: bytes differ and the locked file is not in the store to compare deltas",
                    a.file
                ),
            };
        }
        match comparer(&now_dir.join(&a.file), &reference) {
            Ok(err) if err <= tol => max_error = Some(max_error.map_or(err, |m: f64| m.max(err))),
            Ok(err) => {
                return Verdict::Differs {
                    detail: format!("{}: relative delta error {err:.3e} > {tol:e}", a.file),
                };
            }
            Err(e) => {
                return Verdict::Differs {
                    detail: format!("{}: {e}", a.file),
                };
            }
        }
    }
    match max_error {
        None => Verdict::Identical,
        Some(max_error) => Verdict::WithinTolerance { max_error },
    }
}

/// The sub-plan of `selected` nodes and everything they read, in plan order.
pub fn with_ancestors(plan: &Plan, selected: &BTreeSet<String>) -> Plan {
    let deps = dependencies(plan);
    let mut keep = vec![false; plan.nodes.len()];
    let mut stack: Vec<usize> = plan
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| selected.contains(&n.name))
        .map(|(i, _)| i)
        .collect();
    while let Some(i) = stack.pop() {
        if !keep[i] {
            keep[i] = true;
            stack.extend(&deps[i]);
        }
    }
    let mut remap = HashMap::new();
    let mut nodes = Vec::new();
    for (i, n) in plan.nodes.iter().enumerate().filter(|(i, _)| keep[*i]) {
        remap.insert(i, nodes.len());
        nodes.push(n.clone());
    }
    let mut graph = DiGraph::new();
    let idx: Vec<_> = (0..nodes.len()).map(|i| graph.add_node(i)).collect();
    for (i, ds) in deps.iter().enumerate() {
        let Some(&to) = remap.get(&i) else { continue };
        for d in ds {
            if let Some(&from) = remap.get(d) {
                graph.add_edge(idx[from], idx[to], ());
            }
        }
    }
    let outputs = plan
        .outputs
        .iter()
        .filter(|(n, _)| selected.contains(*n))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Plan {
        recipe_path: plan.recipe_path.clone(),
        root: plan.root.clone(),
        nodes,
        graph,
        outputs,
    }
}
