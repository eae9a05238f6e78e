//! `gc`: drops store entries that no kept lockfile references.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use serde::Serialize;

use crate::error::EngineError;
use crate::fsutil;
use crate::store::Store;

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub removed_objects: usize,
    pub kept_objects: usize,
    pub removed_bytes: u64,
}

/// Removes every object (and its log and work dir) whose key is not in `keep`. Takes the
/// runner lock, so it never races a run.
pub fn gc(store_root: &Path, keep: &BTreeSet<String>) -> Result<GcReport, EngineError> {
    let (store, _lock) = Store::open_for_writing(store_root)?;
    let mut report = GcReport::default();
    for key in store.keys()? {
        if keep.contains(&key) {
            report.kept_objects += 1;
            continue;
        }
        let dir = store.object_dir(&key);
        report.removed_bytes += fsutil::tree_size(&dir);
        // Rename out of objects/ first so a crash mid-removal never leaves a partial key.
        let doomed = store.new_tmp_dir(&format!("gc-{key}"))?;
        let target = doomed.join("object");
        fs::rename(&dir, &target).map_err(EngineError::io("moving", &dir))?;
        fsutil::remove_any(&doomed).map_err(EngineError::io("removing", &doomed))?;
        let _ = fsutil::remove_any(&store.log_path(&key));
        report.removed_objects += 1;
    }
    for dir in ["work", "logs"] {
        let p = store.root().join(dir);
        for entry in fs::read_dir(&p)
            .map_err(EngineError::io("listing", &p))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            let key = name.strip_suffix(".log").unwrap_or(&name);
            if !key.starts_with("worker-") && !keep.contains(key) {
                report.removed_bytes += fsutil::tree_size(&entry.path());
                let _ = fsutil::remove_any(&entry.path());
            }
        }
    }
    Ok(report)
}
