//! The content-addressed store (`.slider/` next to the recipe unless `--store`):
//!
//! ```text
//! lock, lock.d/        the runner lock: one runner per store, on local and shared
//!                      filesystems alike (crate::lock)
//! objects/<key>/       a finished node: its output files + manifest.json
//! tmp/<key>-<pid>-<n>/ outputs being written; renamed to objects/<key> when complete
//! work/<key>/          persistent work dirs of checkpointing nodes (training)
//! logs/<key>.log       per-node logs
//! journal/<id>.json    per-recipe node states (running / failed / last good key)
//! file-hashes.json     the file-hash memo
//! ```
//! A present `objects/<key>` is a finished node: nothing else ever renames into `objects/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::EngineError;
use crate::fingerprint::InputSource;
use crate::fsutil;
pub use crate::lock::StoreLock;

/// Version of the on-disk manifest format.
pub const MANIFEST_FORMAT: u32 = 1;

/// One output file of a finished node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Declared output name (`lora` for the LoRA kinds).
    pub name: String,
    /// File name inside the object directory.
    pub file: String,
    /// blake3 of the bytes, hex.
    pub hash: String,
    pub size: u64,
}

/// `objects/<key>/manifest.json`: what a finished node produced and from what.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub kind: String,
    pub code_version: u32,
    /// The first output is the node's primary output (what `Input::Node` refers to).
    pub outputs: Vec<OutputFile>,
    pub started_unix_s: f64,
    pub wall_s: f64,
    /// Where it ran: `cpu` for in-process executors, the worker's device otherwise.
    pub backend: String,
    pub engine_version: String,
    /// The canonical document the key was computed from (what `explain` diffs against).
    pub doc: Value,
    pub sources: Vec<InputSource>,
}

impl Manifest {
    pub fn primary(&self) -> Option<&OutputFile> {
        self.outputs.first()
    }
}

/// A store directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// The default store of a recipe: `.slider/` in the recipe's directory.
    pub fn default_root(recipe: &Path) -> PathBuf {
        recipe.parent().unwrap_or(Path::new(".")).join(".slider")
    }

    /// A store at `root`, for reading; nothing is created.
    /// A relative root is made absolute against the current directory: programs of
    /// `command` nodes run in other directories and get paths inside the store.
    pub fn at(root: impl Into<PathBuf>) -> Store {
        let root = root.into();
        Store {
            root: std::path::absolute(&root).unwrap_or(root),
        }
    }

    /// Creates the store's directories, takes the runner lock and removes the temp dirs
    /// a killed runner left behind.
    pub fn open_for_writing(root: impl Into<PathBuf>) -> Result<(Store, StoreLock), EngineError> {
        let store = Store::at(root);
        for dir in ["objects", "tmp", "work", "logs", "journal"] {
            let p = store.root.join(dir);
            fs::create_dir_all(&p).map_err(EngineError::io("creating store directory", &p))?;
        }
        let lock = StoreLock::acquire(&store.root)?;
        store.clean_tmp()?;
        Ok((store, lock))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_dir(&self, key: &str) -> PathBuf {
        self.root.join("objects").join(key)
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.root.join("logs").join(format!("{key}.log"))
    }

    /// The persistent work dir of a checkpointing node (kept across interrupted runs).
    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.root.join("work").join(key)
    }

    pub fn memo_path(&self) -> PathBuf {
        self.root.join("file-hashes.json")
    }

    pub fn journal_path(&self, recipe: &Path) -> PathBuf {
        let id = blake3::hash(recipe.as_os_str().as_encoded_bytes()).to_hex();
        self.root
            .join("journal")
            .join(format!("{}.json", &id[..16]))
    }

    /// The manifest of a finished node, `None` if the key is not in the store.
    pub fn manifest(&self, key: &str) -> Result<Option<Manifest>, EngineError> {
        let path = self.object_dir(key).join("manifest.json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(EngineError::Io {
                    what: "reading",
                    path,
                    source: e,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| EngineError::Corrupt {
                what: "manifest",
                path,
                message: e.to_string(),
            })
    }

    /// A fresh temp directory for a node's outputs.
    pub fn new_tmp_dir(&self, key: &str) -> Result<PathBuf, EngineError> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join("tmp")
            .join(format!("{key}-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).map_err(EngineError::io("creating temp dir", &dir))?;
        Ok(dir)
    }

    /// Moves a completed temp dir into `objects/<key>` with its manifest: the node is now
    /// finished. Files are fsynced before the rename so a crash never exposes a partial key.
    pub fn commit(&self, tmp: &Path, manifest: &Manifest) -> Result<(), EngineError> {
        let bytes = serde_json::to_vec_pretty(manifest)
            .map_err(|e| EngineError::Internal(format!("serialising manifest: {e}")))?;
        let mpath = tmp.join("manifest.json");
        fs::write(&mpath, bytes).map_err(EngineError::io("writing", &mpath))?;
        fsutil::sync_tree(tmp).map_err(EngineError::io("syncing", tmp))?;
        let dest = self.object_dir(&manifest.key);
        if dest.exists() {
            fsutil::remove_any(tmp).map_err(EngineError::io("removing", tmp))?;
            return Ok(());
        }
        fs::rename(tmp, &dest).map_err(EngineError::io("publishing into the store", &dest))?;
        let objects = self.root.join("objects");
        fsutil::sync_dir(&objects).map_err(EngineError::io("syncing", &objects))
    }

    /// Removes every temp dir: only the lock holder calls this, so none is in use.
    fn clean_tmp(&self) -> Result<(), EngineError> {
        let tmp = self.root.join("tmp");
        let entries = fs::read_dir(&tmp).map_err(EngineError::io("listing", &tmp))?;
        for entry in entries.flatten() {
            tracing::info!("removing stale temp dir {}", entry.path().display());
            fsutil::remove_any(&entry.path()).map_err(EngineError::io("removing", entry.path()))?;
        }
        Ok(())
    }

    /// Every key in `objects/`.
    pub fn keys(&self) -> Result<Vec<String>, EngineError> {
        let dir = self.root.join("objects");
        let mut keys: Vec<String> = match fs::read_dir(&dir) {
            Ok(it) => it
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(EngineError::Io {
                    what: "listing",
                    path: dir,
                    source: e,
                });
            }
        };
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(key: &str) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            key: key.into(),
            kind: "command".into(),
            code_version: 1,
            outputs: vec![OutputFile {
                name: "out".into(),
                file: "out.txt".into(),
                hash: "h".into(),
                size: 2,
            }],
            started_unix_s: 0.0,
            wall_s: 0.0,
            backend: "cpu".into(),
            engine_version: "test".into(),
            doc: Value::Null,
            sources: vec![],
        }
    }

    #[test]
    fn commit_makes_a_key_present_with_its_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _lock) = Store::open_for_writing(dir.path().join(".slider")).unwrap();
        assert!(store.manifest("k1").unwrap().is_none());
        let tmp = store.new_tmp_dir("k1").unwrap();
        fs::write(tmp.join("out.txt"), "hi").unwrap();
        store.commit(&tmp, &manifest("k1")).unwrap();
        assert!(!tmp.exists());
        assert_eq!(
            store.manifest("k1").unwrap().unwrap().outputs[0].file,
            "out.txt"
        );
        assert_eq!(
            fs::read_to_string(store.object_dir("k1").join("out.txt")).unwrap(),
            "hi"
        );
        assert_eq!(store.keys().unwrap(), vec!["k1".to_string()]);
    }

    #[test]
    fn opening_removes_stale_temp_dirs_but_keeps_objects_and_work_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(".slider");
        {
            let (store, _lock) = Store::open_for_writing(&root).unwrap();
            let tmp = store.new_tmp_dir("half").unwrap();
            fs::write(tmp.join("partial"), "x").unwrap();
            fs::create_dir_all(store.work_dir("train")).unwrap();
        }
        // A dead runner's pid left in the lock file does not block.
        fs::write(root.join("lock"), "999999999\n").unwrap();
        let (store, _lock) = Store::open_for_writing(&root).unwrap();
        assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        assert!(store.work_dir("train").exists());
    }
}
