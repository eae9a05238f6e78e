//! `status`, `explain` and `--dry-run`: which nodes are fresh, stale, failed or running,
//! and exactly what changed since a stale node's last successful run (a diff of the
//! canonical documents its keys were computed from).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;
use slider_recipe::Plan;

use crate::error::EngineError;
use crate::fingerprint::{FileHashMemo, Fingerprint, InputOrigin};
use crate::journal::{Journal, JournalState};
use crate::lockfile::{Lockfile, lockfile_path};
use crate::protocol::WorkerKind;
use crate::run::{Produced, dependencies, fingerprint_node, kind_versions};
use crate::slurm::{ClusterJob, cluster_jobs};
use crate::store::{Manifest, Store, StoreLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Freshness {
    Fresh,
    Stale,
    Failed,
    Running,
}

impl fmt::Display for Freshness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Freshness::Fresh => "fresh",
            Freshness::Stale => "stale",
            Freshness::Failed => "failed",
            Freshness::Running => "running",
        })
    }
}

/// One difference between a node's last successful run and now.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// No successful run of this node name is recorded (new or renamed node, or a
    /// cleared store).
    NoPreviousRun,
    /// Same key as the last successful run, but its store entry is gone (gc, deleted).
    ObjectMissing { key: String },
    Param {
        at: String,
        old: Option<Value>,
        new: Option<Value>,
    },
    InputContent {
        at: String,
        origin: InputOrigin,
        old: Option<String>,
        new: Option<String>,
    },
    /// An input node is stale itself: its new output (and so this key) is not known yet.
    InputWaiting { at: String, node: String },
    CodeVersion {
        kind: String,
        old: Option<Value>,
        new: Option<Value>,
    },
    Kind {
        old: Option<Value>,
        new: Option<Value>,
    },
}

/// The state of one node and, when stale, why.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub kind: String,
    pub state: Freshness,
    /// The node's key, when all its inputs' contents are known.
    pub key: Option<String>,
    /// The key of its last successful run, if any is recorded.
    pub previous_key: Option<String>,
    pub changes: Vec<Change>,
    pub log: Option<PathBuf>,
    pub error: Option<String>,
    /// The Slurm job of a node that is not fresh, when its key has one in the store.
    pub job: Option<ClusterJob>,
    /// The manifest of the fresh object (or of the previous run, when stale).
    #[serde(skip)]
    pub manifest: Option<Manifest>,
}

/// The state of every node, in plan order. Reads the store; never writes it.
pub fn status(
    plan: &Plan,
    store_root: &Path,
    worker_kinds: &[WorkerKind],
) -> Result<Vec<NodeStatus>, EngineError> {
    let store = Store::at(store_root);
    let mut memo = FileHashMemo::load(&store.memo_path());
    let journal = Journal::load(&store.journal_path(&plan.recipe_path))?;
    let locked = Lockfile::read(&lockfile_path(&plan.recipe_path)).ok();
    let runner_alive = StoreLock::holder(store_root).is_some();
    let versions = kind_versions(worker_kinds);
    let index = plan.index_by_name();
    let order = topological(plan);
    let mut produced: Vec<Option<Produced>> = vec![None; plan.nodes.len()];
    let mut out: Vec<Option<NodeStatus>> = vec![None; plan.nodes.len()];
    for i in order {
        let node = &plan.nodes[i];
        let version = versions.get(node.params.kind()).copied().unwrap_or(0);
        let keyed = fingerprint_node(plan, &index, i, version, &mut memo, &produced)?;
        let fp = keyed.fp;
        let entry = journal.nodes.get(&node.name);
        let previous_key = entry.and_then(|e| e.last_ok_key.clone()).or_else(|| {
            locked
                .as_ref()
                .and_then(|l| l.nodes.get(&node.name).map(|n| n.key.clone()))
        });
        let current = match &fp.key {
            Some(k) => store.manifest(k)?,
            None => None,
        };
        let mut st = NodeStatus {
            name: node.name.clone(),
            kind: node.params.kind().to_string(),
            state: Freshness::Stale,
            key: fp.key.clone(),
            previous_key: previous_key.clone(),
            changes: vec![],
            log: fp.key.as_deref().map(|k| store.log_path(k)),
            error: None,
            job: None,
            manifest: None,
        };
        if let (Some(m), Some(key)) = (current, &fp.key) {
            if let Some(p) = m.primary() {
                produced[i] = Some(Produced {
                    path: store.object_dir(key).join(&p.file),
                    hash: p.hash.clone(),
                });
            }
            st.state = Freshness::Fresh;
            st.manifest = Some(m);
            out[i] = Some(st);
            continue;
        }
        let previous = match &previous_key {
            Some(k) => store.manifest(k)?,
            None => None,
        };
        st.changes = match (&previous, &previous_key) {
            (_, Some(k)) if fp.key.as_deref() == Some(k.as_str()) => {
                vec![Change::ObjectMissing { key: k.clone() }]
            }
            (Some(m), _) => diff(&m.doc, &fp),
            (None, _) => std::iter::once(Change::NoPreviousRun)
                .chain(fp.sources.iter().filter(|s| s.hash.is_none()).filter_map(
                    |s| match &s.origin {
                        InputOrigin::Node(n) => Some(Change::InputWaiting {
                            at: s.at.strip_prefix("params.").unwrap_or(&s.at).to_string(),
                            node: n.clone(),
                        }),
                        InputOrigin::File(_) => None,
                    },
                ))
                .collect(),
        };
        st.manifest = previous;
        if let Some(e) = entry {
            let same_attempt = e.key.is_some() && e.key == fp.key;
            if e.state == JournalState::Running
                && runner_alive
                && (same_attempt || fp.key.is_none())
            {
                st.state = Freshness::Running;
            } else if e.state == JournalState::Failed && same_attempt {
                st.state = Freshness::Failed;
                st.error = e.error.clone();
            }
        }
        out[i] = Some(st);
    }
    let mut all: Vec<NodeStatus> = out.into_iter().flatten().collect();
    let waiting: Vec<&str> = all
        .iter()
        .filter(|s| s.state != Freshness::Fresh)
        .filter_map(|s| s.key.as_deref())
        .collect();
    let mut jobs = cluster_jobs(store_root, &waiting);
    for s in &mut all {
        if s.state != Freshness::Fresh {
            s.job = s.key.as_deref().and_then(|k| jobs.remove(k));
        }
    }
    Ok(all)
}

/// The state of one node, with its changes.
pub fn explain(
    plan: &Plan,
    store_root: &Path,
    node: &str,
    worker_kinds: &[WorkerKind],
) -> Result<NodeStatus, EngineError> {
    if !plan.nodes.iter().any(|n| n.name == node) {
        return Err(EngineError::UnknownNode(node.to_string()));
    }
    status(plan, store_root, worker_kinds)?
        .into_iter()
        .find(|s| s.name == node)
        .ok_or_else(|| EngineError::UnknownNode(node.to_string()))
}

fn topological(plan: &Plan) -> Vec<usize> {
    let deps = dependencies(plan);
    let mut done = vec![false; plan.nodes.len()];
    let mut order = Vec::with_capacity(plan.nodes.len());
    // The plan lists nodes inputs-first; this loop only guards against a plan that doesn't.
    while order.len() < plan.nodes.len() {
        let before = order.len();
        for i in 0..plan.nodes.len() {
            if !done[i] && deps[i].iter().all(|&d| done[d]) {
                done[i] = true;
                order.push(i);
            }
        }
        if order.len() == before {
            break;
        }
    }
    order
}

/// The leaves of a JSON document by path (`params.models[0]`).
fn flatten(v: &Value, at: String, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                let p = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                flatten(x, p, out);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for (i, x) in a.iter().enumerate() {
                flatten(x, format!("{at}[{i}]"), out);
            }
        }
        other => {
            out.insert(at, other.clone());
        }
    }
}

/// What differs between the document of the last successful run and the current one.
pub fn diff(old: &Value, new: &Fingerprint) -> Vec<Change> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(old, String::new(), &mut a);
    flatten(&new.doc, String::new(), &mut b);
    let mut paths: Vec<&String> = a.keys().chain(b.keys()).collect();
    paths.sort();
    paths.dedup();
    let mut changes = Vec::new();
    for path in paths {
        let (o, n) = (a.get(path), b.get(path));
        if o == n || path == "params.kind" {
            continue;
        }
        let (o, n) = (o.cloned(), n.cloned());
        if path == "code_version" {
            changes.push(Change::CodeVersion {
                kind: new.doc["kind"].as_str().unwrap_or("?").to_string(),
                old: o,
                new: n,
            });
        } else if path == "kind" {
            changes.push(Change::Kind { old: o, new: n });
        } else if let Some(src) = new.sources.iter().find(|s| &s.at == path) {
            let at = path.strip_prefix("params.").unwrap_or(path).to_string();
            match (&src.origin, &src.hash) {
                (InputOrigin::Node(node), None) => changes.push(Change::InputWaiting {
                    at,
                    node: node.clone(),
                }),
                _ => changes.push(Change::InputContent {
                    at,
                    origin: src.origin.clone(),
                    old: o
                        .as_ref()
                        .and_then(Value::as_str)
                        .map(|s| s.trim_start_matches("blake3:").to_string()),
                    new: src.hash.clone(),
                }),
            }
        } else {
            let at = path.strip_prefix("params.").unwrap_or(path).to_string();
            changes.push(Change::Param { at, old: o, new: n });
        }
    }
    changes
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

fn origin_text(o: &InputOrigin) -> String {
    match o {
        InputOrigin::File(p) => format!("file {}", p.display()),
        InputOrigin::Node(n) => format!("output of `{n}`"),
    }
}

fn value_text(v: &Option<Value>) -> String {
    match v {
        None => "(absent)".into(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(v) => v.to_string(),
    }
}

impl Change {
    /// One line, for `status` and `--dry-run`.
    pub fn summary(&self) -> String {
        match self {
            Change::NoPreviousRun => "no previous run".into(),
            Change::ObjectMissing { .. } => "its result was removed from the store".into(),
            Change::Param { at, old, new } => {
                format!("{at}: {} -> {}", value_text(old), value_text(new))
            }
            Change::InputContent { at, .. } => format!("input {at} changed"),
            Change::InputWaiting { node, .. } => format!("waits on `{node}`"),
            Change::CodeVersion { old, new, .. } => {
                format!("code version {} -> {}", value_text(old), value_text(new))
            }
            Change::Kind { old, new } => format!("kind {} -> {}", value_text(old), value_text(new)),
        }
    }

    /// Diff lines, for `explain`.
    pub fn diff_lines(&self) -> Vec<String> {
        match self {
            Change::NoPreviousRun => vec![
                "  (no successful run of this node name is recorded: new or renamed node)".into(),
            ],
            Change::ObjectMissing { key } => vec![format!(
                "  (same key {} as the last run, but its result is no longer in the store)",
                short(key)
            )],
            Change::Param { at, old, new } => diff_pair(at, &value_text(old), &value_text(new)),
            Change::InputContent {
                at,
                origin,
                old,
                new,
            } => diff_pair(
                &format!("input {at} ({})", origin_text(origin)),
                &old.as_deref()
                    .map(|h| format!("blake3 {}", short(h)))
                    .unwrap_or("(absent)".into()),
                &new.as_deref()
                    .map(|h| format!("blake3 {}", short(h)))
                    .unwrap_or("(absent)".into()),
            ),
            Change::InputWaiting { at, node } => vec![format!(
                "~ input {at} (output of `{node}`): `{node}` is stale, so its new output is not known yet"
            )],
            Change::CodeVersion { kind, old, new } => diff_pair(
                &format!("code version of `{kind}`"),
                &value_text(old),
                &value_text(new),
            ),
            Change::Kind { old, new } => diff_pair("kind", &value_text(old), &value_text(new)),
        }
    }
}

fn diff_pair(what: &str, old: &str, new: &str) -> Vec<String> {
    vec![format!("- {what}: {old}"), format!("+ {what}: {new}")]
}

impl NodeStatus {
    /// The `explain` text.
    pub fn explanation(&self) -> String {
        let mut out = String::new();
        match self.state {
            Freshness::Fresh => {
                let key = self.key.as_deref().unwrap_or("");
                out.push_str(&format!(
                    "`{}` is fresh: its result is in the store under key {}",
                    self.name,
                    short(key)
                ));
                if let Some(m) = &self.manifest {
                    out.push_str(&format!(
                        " (computed in {:.2} s on {})",
                        m.wall_s, m.backend
                    ));
                }
                out.push_str(".\nNothing it depends on changed since it ran.\n");
                return out;
            }
            Freshness::Running => out.push_str(&format!("`{}` is running now.\n", self.name)),
            Freshness::Failed => out.push_str(&format!(
                "`{}` failed on its last attempt{}.\n",
                self.name,
                self.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )),
            Freshness::Stale => out.push_str(&format!("`{}` is stale and will run.\n", self.name)),
        }
        match &self.previous_key {
            Some(k) => out.push_str(&format!(
                "Changes since its last successful run (key {}):\n",
                short(k)
            )),
            None => out.push_str("Why:\n"),
        }
        for c in &self.changes {
            for line in c.diff_lines() {
                out.push_str(&line);
                out.push('\n');
            }
        }
        if let Some(log) = self.log.as_ref().filter(|l| l.exists()) {
            out.push_str(&format!("log: {}\n", log.display()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::fingerprint;
    use slider_recipe::{Input, MergeParams, NodeParams, Precision};

    #[test]
    fn diff_names_exactly_what_changed() {
        let params = |ratios: Vec<f64>| {
            NodeParams::Merge(MergeParams {
                models: vec![
                    Input::File("/a.safetensors".into()),
                    Input::Node("up".into()),
                ],
                ratios,
                save_precision: Precision::Float,
            })
        };
        let fp = |p: &NodeParams, v: u32, file: &str, up: Option<&str>| {
            fingerprint(p, v, |i| match i {
                Input::File(_) => Ok(Some(file.to_string())),
                Input::Node(_) => Ok(up.map(str::to_string)),
            })
            .unwrap()
        };
        let old = fp(&params(vec![1.0, -1.0]), 1, "f1", Some("u1")).doc;
        let cases: Vec<(&str, Fingerprint, Vec<&str>)> = vec![
            (
                "nothing",
                fp(&params(vec![1.0, -1.0]), 1, "f1", Some("u1")),
                vec![],
            ),
            (
                "a ratio",
                fp(&params(vec![1.0, -0.5]), 1, "f1", Some("u1")),
                vec!["ratios[1]: -1 -> -0.5"],
            ),
            (
                "file content",
                fp(&params(vec![1.0, -1.0]), 1, "f2", Some("u1")),
                vec!["input models[0] changed"],
            ),
            (
                "upstream output",
                fp(&params(vec![1.0, -1.0]), 1, "f1", Some("u2")),
                vec!["input models[1] changed"],
            ),
            (
                "upstream stale",
                fp(&params(vec![1.0, -1.0]), 1, "f1", None),
                vec!["waits on `up`"],
            ),
            (
                "code version",
                fp(&params(vec![1.0, -1.0]), 2, "f1", Some("u1")),
                vec!["code version 1 -> 2"],
            ),
            (
                "a ratio added",
                fp(&params(vec![1.0, -1.0, 2.0]), 1, "f1", Some("u1")),
                vec!["ratios[2]: (absent) -> 2"],
            ),
        ];
        for (what, new, want) in cases {
            let got: Vec<String> = diff(&old, &new).iter().map(Change::summary).collect();
            assert_eq!(got, want, "{what}");
        }
    }
}
