//! The one trait every node kind implements, and the registry the scheduler picks from.
//! Adding a node kind = one [`Executor`] (plus its schema in `slider-recipe`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use slider_recipe::{Input, NodeParams};

use crate::cancel::CancelToken;

/// Where a kind runs: in this process (CPU, `--jobs` at a time) or on a worker (one per device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    InProcess,
    Worker,
}

pub use slider_protocol::Progress;

/// Why a node did not produce its outputs.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    Failed(String),
    #[error("interrupted")]
    Cancelled,
}

/// A node's log file (`logs/<key>.log`), shared by the executor and its children.
#[derive(Debug)]
pub struct NodeLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl NodeLog {
    pub fn create(path: &Path) -> std::io::Result<NodeLog> {
        let file = File::options().create(true).append(true).open(path)?;
        Ok(NodeLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line; logging never fails a node.
    pub fn line(&self, text: &str) {
        if let Ok(mut f) = self.file.lock() {
            let _ = writeln!(f, "{text}");
        }
    }

    /// A handle for a child process's stdout/stderr.
    pub fn clone_file(&self) -> std::io::Result<File> {
        match self.file.lock() {
            Ok(f) => f.try_clone(),
            Err(_) => Err(std::io::Error::other("log file lock poisoned")),
        }
    }
}

/// Everything an executor gets to run one node.
pub struct Job<'a> {
    pub node: &'a str,
    pub key: &'a str,
    pub params: &'a NodeParams,
    /// The recipe's directory (relative program paths of `command` nodes resolve here).
    pub root: &'a Path,
    /// Each input with the path of its content (an input node's primary output file).
    pub inputs: &'a [(Input, PathBuf)],
    /// Where outputs go; becomes `objects/<key>` when the node succeeds.
    pub out_dir: &'a Path,
    /// A scratch dir removed after the node (the cwd of `command` programs).
    pub scratch_dir: &'a Path,
    /// The persistent work dir of checkpointing kinds (kept across interrupted runs).
    pub work_dir: Option<&'a Path>,
    pub log: &'a NodeLog,
    pub cancel: &'a CancelToken,
    pub progress: &'a (dyn Fn(Progress) + Sync),
}

impl Job<'_> {
    /// The content path of one of this node's inputs.
    pub fn input_path(&self, input: &Input) -> Result<&Path, ExecError> {
        self.inputs
            .iter()
            .find(|(i, _)| i == input)
            .map(|(_, p)| p.as_path())
            .ok_or_else(|| ExecError::Failed(format!("input {input:?} was not resolved")))
    }
}

/// An output an executor produced: declared name and file name inside `out_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced {
    pub name: String,
    pub file: String,
}

/// Runs nodes of one kind.
pub trait Executor: Send + Sync {
    fn kind(&self) -> &str;
    /// Bumped whenever the same inputs would produce different bytes; enters node keys.
    fn code_version(&self) -> u32;
    fn placement(&self) -> Placement {
        Placement::InProcess
    }
    /// Whether the node keeps checkpoints in a persistent work dir.
    fn checkpoints(&self) -> bool {
        false
    }
    /// Runs the node; returns its outputs, the primary one first.
    fn execute(&self, job: &Job) -> Result<Vec<Produced>, ExecError>;
}

/// The executors of one run, by kind.
#[derive(Clone, Default)]
pub struct Executors {
    by_kind: BTreeMap<String, Arc<dyn Executor>>,
}

impl Executors {
    pub fn insert(&mut self, exec: Arc<dyn Executor>) {
        self.by_kind.insert(exec.kind().to_string(), exec);
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Executor>> {
        self.by_kind.get(kind)
    }
}
