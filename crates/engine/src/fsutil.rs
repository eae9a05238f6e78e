//! Small filesystem helpers shared by the store, the lockfile and the executors: atomic
//! writes (temp file in the same directory, fsync, rename, fsync the directory) and hashing.

use std::fs::{self, File};
use std::io;
use std::path::Path;

/// Writes `bytes` to `path` atomically (the project's one atomic write, `slider_atomic`),
/// creating the directory first: the store's and the publish paths' directories are ours.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(parent_dir(path))?;
    slider_atomic::write(path, bytes)
}

/// Copies `from` to `to` atomically, streaming (same guarantees as [`write_atomic`]).
pub fn copy_atomic(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(parent_dir(to))?;
    slider_atomic::copy(from, to)
}

pub use slider_atomic::sync_dir;

/// fsyncs every regular file directly inside `dir`, then `dir` itself.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_file() {
            File::open(entry.path())?.sync_all()?;
        } else if ty.is_dir() {
            sync_tree(&entry.path())?;
        }
    }
    sync_dir(dir)
}

/// blake3 of a file's bytes, hex. Large files are memory-mapped and hashed on rayon.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Removes a file or directory tree if it exists.
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Total size in bytes of the regular files under `path`.
pub fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path)
        .map(|it| it.flatten().map(|e| tree_size(&e.path())).sum())
        .unwrap_or(0)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process's umask, read without changing it (Linux).
    fn umask() -> u32 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
    }

    #[test]
    fn written_and_copied_files_get_the_usual_mode_not_a_temp_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.bin"), dir.path().join("out/b.bin"));
        write_atomic(&a, b"x").unwrap();
        copy_atomic(&a, &b).unwrap();
        for p in [&a, &b] {
            let mode = fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o666 & !umask(), "{p:?}");
        }
    }

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two two");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("b.txt")]);
    }

    #[test]
    fn hash_file_is_blake3_of_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        fs::write(&p, b"hello").unwrap();
        assert_eq!(
            hash_file(&p).unwrap(),
            blake3::hash(b"hello").to_hex().to_string()
        );
    }
}
