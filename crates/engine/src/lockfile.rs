//! `RECIPE.lock` (`eyesize.yaml` -> `eyesize.lock`): every node's key and output hashes after
//! a successful run. Commit it; `verify` re-executes the recipe and compares against it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::fsutil;
use crate::store::OutputFile;

pub const LOCKFILE_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lockfile {
    pub format: u32,
    pub nodes: BTreeMap<String, LockedNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockedNode {
    pub kind: String,
    pub key: String,
    pub outputs: Vec<OutputFile>,
}

/// The lockfile path of a recipe: its extension replaced by `.lock`.
pub fn lockfile_path(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

impl Lockfile {
    pub fn read(path: &Path) -> Result<Lockfile, EngineError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::NoLockfile(path.to_path_buf()));
            }
            Err(e) => {
                return Err(EngineError::Io {
                    what: "reading",
                    path: path.to_path_buf(),
                    source: e,
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| EngineError::Corrupt {
            what: "lockfile",
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Writes the lockfile atomically; leaves the file untouched when nothing changed.
    /// Returns whether it wrote.
    pub fn write(&self, path: &Path) -> Result<bool, EngineError> {
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| EngineError::Internal(format!("serialising lockfile: {e}")))?;
        text.push('\n');
        if fs::read(path).is_ok_and(|old| old == text.as_bytes()) {
            return Ok(false);
        }
        fsutil::write_atomic(path, text.as_bytes()).map_err(EngineError::io("writing", path))?;
        Ok(true)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.nodes.values().map(|n| n.key.as_str())
    }
}
