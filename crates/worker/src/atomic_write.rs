//! The worker's one atomic file write: a temp file beside the target, fsync, rename over it,
//! then a best-effort fsync of the directory. A reader sees the old file or the new one,
//! never a part; each caller maps the `io::Error` into its own error type.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: `.NAME.tmp-PID` in the same directory, fsync, rename
/// over `path`, then a best-effort fsync of the directory (some filesystems refuse it). The
/// directory must exist; on failure the temp file is removed and `path` is untouched.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_new_files_and_replaces_old_ones_leaving_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        // (existing content, new content)
        let cases: [(Option<&[u8]>, &[u8]); 3] = [
            (None, b"first"),
            (Some(b"a much longer old content"), b"short"),
            (Some(b"old"), b""),
        ];
        for (old, new) in cases {
            match old {
                Some(old) => std::fs::write(&path, old).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
            write_atomically(&path, new).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), new, "{old:?} -> {new:?}");
            assert_eq!(entries(dir.path()), ["out.bin"]);
        }
    }

    #[test]
    fn fails_without_touching_anything_when_it_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        // The directory is missing.
        let missing = dir.path().join("no-such-dir").join("out.bin");
        let err = write_atomically(&missing, b"x").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(entries(dir.path()).is_empty());
        // The target is a non-empty directory: the rename fails, the temp file goes away.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("keep"), b"k").unwrap();
        assert!(write_atomically(&blocked, b"x").is_err());
        assert_eq!(entries(dir.path()), ["blocked"]);
        assert_eq!(entries(&blocked), ["keep"]);
    }
}
