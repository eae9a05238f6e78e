//! The run journal: per recipe, the state of every node the last runner touched (running,
//! failed, done) and the key of its last successful run. `status` reads it to tell running
//! and failed nodes apart, `explain` to find what a stale node last ran with.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    /// A missing or unreadable journal is empty: it only improves messages.
    pub fn load(path: &Path) -> Journal {
        fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
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
