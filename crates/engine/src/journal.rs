//! The run journal: per recipe, the state of every node the last runner touched (running,
//! failed, done) and the key of its last successful run. `status` reads it to tell running
//! and failed nodes apart, `explain` to find what a stale node last ran with.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::fsutil;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalState {
    Running,
    Failed,
    Done,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub state: JournalState,
    /// The key of the attempt this entry describes.
    pub key: Option<String>,
    /// The key of the last successful run of this node name.
    pub last_ok_key: Option<String>,
    pub log: Option<PathBuf>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub runner_pid: Option<u32>,
    pub nodes: BTreeMap<String, JournalEntry>,
}

impl Journal {
    /// The journal at `path`; empty when there is none. A journal that cannot be read or
    /// parsed is an error naming the file: it is small and only improves messages, so the
    /// message says to remove it (nothing in the store depends on it).
    pub fn load(path: &Path) -> Result<Journal, EngineError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Journal::default()),
            Err(e) => return Err(EngineError::io("reading", path.to_path_buf())(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| EngineError::Corrupt {
            what: "run journal",
            path: path.to_path_buf(),
            message: format!(
                "{e}; it only records the last run's node states: remove it and run again"
            ),
        })
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        fsutil::write_atomic(path, &bytes)
    }

    pub fn set(
        &mut self,
        node: &str,
        state: JournalState,
        key: Option<&str>,
        log: Option<&Path>,
        error: Option<String>,
    ) {
        let previous_ok = self.nodes.get(node).and_then(|e| e.last_ok_key.clone());
        let last_ok_key = match state {
            JournalState::Done => key.map(str::to_string),
            _ => previous_ok,
        };
        self.nodes.insert(
            node.to_string(),
            JournalEntry {
                state,
                key: key.map(str::to_string),
                last_ok_key,
                log: log.map(Path::to_path_buf),
                error,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_journal_is_empty_and_a_corrupt_one_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recipe.journal.json");
        assert_eq!(Journal::load(&path).unwrap(), Journal::default());
        let mut journal = Journal::default();
        journal.set("a", JournalState::Done, Some("k1"), None, None);
        journal.save(&path).unwrap();
        assert_eq!(Journal::load(&path).unwrap(), journal);
        fs::write(&path, b"{\"runner_pid\": 3, \"nodes\": {").unwrap();
        let err = Journal::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("run journal")
                && err.contains("recipe.journal.json")
                && err.contains("remove it"),
            "{err}"
        );
    }
}
