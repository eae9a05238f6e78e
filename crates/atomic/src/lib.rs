//! The project's one atomic file write. Every output any crate of ours writes goes through
//! here, so a reader (or the next run after a crash) sees the old file or the whole new one,
//! never a part.
//!
//! The steps, and why each is there:
//! 1. a temp file in the target's own directory (a rename is atomic only within one
//!    filesystem), named `.NAME.tmp-PID-N` with a per-process counter, created with
//!    `O_EXCL`: two threads or processes writing the same target never share a temp file;
//! 2. created with mode `0o666`, so the umask applies as for any program's new file (a temp
//!    file is otherwise private, and a forced `chmod` would ignore the umask);
//! 3. `fsync` of the file, then `rename` over the target, then `fsync` of the directory, so
//!    the rename survives a power loss. A directory fsync that the filesystem does not
//!    support (`EINVAL`, `ENOTSUP`) is skipped; any other failure is an error.
//!
//! On failure the temp file is removed and the target is untouched. The parent directory
//! must exist: creating directories is the caller's decision.
//!
//! ```
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("out.txt");
//! slider_atomic::write(&path, b"hello")?;
//! let mut file = slider_atomic::AtomicFile::create(&path)?;
//! std::io::Write::write_all(&mut file, b"streamed")?;
//! file.commit()?;
//! assert_eq!(std::fs::read(&path)?, b"streamed");
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit()
}

/// Copies the file `from` to `to` atomically (streaming: the file is never held in memory).
pub fn copy(from: &Path, to: &Path) -> io::Result<()> {
    let mut src = File::open(from)?;
    let mut file = AtomicFile::create(to)?;
    io::copy(&mut src, &mut file)?;
    file.commit()
}

/// A file being written in place of `target`: write into it, then [`commit`](Self::commit).
/// Dropped without a commit, it removes its temp file and leaves the target as it was.
pub struct AtomicFile {
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    target: PathBuf,
}

impl AtomicFile {
    /// Starts writing `target`. Its directory must exist.
    pub fn create(target: &Path) -> io::Result<AtomicFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = target.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file", target.display()),
            )
        })?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = parent_dir(target).join(format!(
            ".{}.tmp-{}-{n}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&tmp)?;
        Ok(AtomicFile {
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            tmp,
            target: target.to_path_buf(),
        })
    }

    /// The path being replaced.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// fsync, rename over the target, fsync the directory.
    pub fn commit(mut self) -> io::Result<()> {
        let out = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("already committed"))?;
        let result = (|| {
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&self.tmp, &self.target)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result?;
        sync_dir(parent_dir(&self.target))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.out {
            Some(out) => out.write(buf),
            None => Err(io::Error::other("already committed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// fsyncs a directory so that a rename inside it survives a power loss. Filesystems that do
/// not support it (`EINVAL`, `ENOTSUP`) are not an error.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir)?.sync_all() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP)) => Ok(()),
        other => other,
    }
}

/// The directory a path lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
            write(&path, new).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), new, "{old:?} -> {new:?}");
            assert_eq!(entries(dir.path()), ["out.bin"]);
        }
    }

    #[test]
    fn fails_without_touching_anything_when_it_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("out.bin");
        let err = write(&missing, b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(entries(dir.path()).is_empty());
        // The target is a non-empty directory: the rename fails, the temp file goes away.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("keep"), b"k").unwrap();
        assert!(write(&blocked, b"x").is_err());
        assert_eq!(entries(dir.path()), ["blocked"]);
        assert_eq!(entries(&blocked), ["keep"]);
    }

    #[test]
    fn an_uncommitted_file_leaves_the_target_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        std::fs::write(&path, b"old").unwrap();
        let mut file = AtomicFile::create(&path).unwrap();
        file.write_all(b"half of the new").unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["out.bin"]);
    }

    #[test]
    fn the_umask_applies_to_the_written_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        // The umask is process-wide; read it without changing it for long.
        let umask = unsafe {
            let old = libc::umask(0o022);
            libc::umask(old);
            old
        };
        write(&path, b"x").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !(umask as u32), "umask {umask:o}");
    }

    #[test]
    fn concurrent_writers_of_one_target_each_leave_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.bin");
        let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 64 * 1024 + i as usize]).collect();
        std::thread::scope(|s| {
            for c in &contents {
                let (path, contents) = (&path, &contents);
                s.spawn(move || {
                    for _ in 0..20 {
                        write(path, c).unwrap();
                        // Whatever a reader sees is one writer's whole content.
                        let seen = std::fs::read(path).unwrap();
                        assert!(
                            contents.contains(&seen),
                            "torn file of {} bytes",
                            seen.len()
                        );
                    }
                });
            }
        });
        assert_eq!(entries(dir.path()), ["shared.bin"]);
    }

    #[test]
    fn copy_streams_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a");
        let to = dir.path().join("b");
        std::fs::write(&from, vec![7u8; 3 << 20]).unwrap();
        copy(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), vec![7u8; 3 << 20]);
    }
}
