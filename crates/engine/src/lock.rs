//! The runner lock of a store: one `slider-run` at a time may write a store, wherever the
//! store lives. Two locks, both taken:
//!
//! | lock | what it is | where it holds | a dead holder's lock |
//! |---|---|---|---|
//! | `lock` | an flock on the file | local filesystems (the kernel releases it at death) | free at once |
//! | `lock.d/` | a directory made with `mkdir` (atomic on NFS and Lustre too), holding `owner` (host, pid, run id) and `heartbeat` (rewritten every [`HEARTBEAT`]) | every filesystem, across machines | stale after [`STALE_AFTER`] without a heartbeat, or at once when its host is this one and the flock was free |
//!
//! flock alone is not enough on a cluster: NFSv4 turns it into a lease, Lustre's
//! `localflock` succeeds on every node, BeeGFS has global locks off by default. The
//! directory alone is not enough on one machine after `kill -9`: its heartbeat needs
//! [`STALE_AFTER`] to go stale, while the flock tells at once. A stale directory is renamed
//! away (only one racer can rename it) and checked to be the one judged stale before it is
//! removed.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::EngineError;

/// How often a runner rewrites its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A lock directory whose heartbeat is older than this is stale: its runner died, or its
/// machine is gone. Six missed heartbeats, so a slow shared filesystem is not mistaken for
/// a dead runner.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

const DIR: &str = "lock.d";
const OWNER: &str = "owner";
const BEAT: &str = "heartbeat";

/// Who holds a lock directory, as its `owner` file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    /// Unique per acquisition: tells a lock taken over from the one judged stale.
    pub run_id: String,
}

impl Owner {
    fn ours() -> Owner {
        let pid = std::process::id();
        Owner {
            host: hostname(),
            pid,
            run_id: format!("{pid}-{}", unix_nanos()),
        }
    }

    fn to_text(&self) -> String {
        format!(
            "host {}\npid {}\nrun {}\n",
            self.host, self.pid, self.run_id
        )
    }

    fn parse(text: &str) -> Option<Owner> {
        let mut host = None;
        let mut pid = None;
        let mut run_id = None;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("host", v)) => host = Some(v.to_string()),
                Some(("pid", v)) => pid = v.trim().parse().ok(),
                Some(("run", v)) => run_id = Some(v.to_string()),
                _ => {}
            }
        }
        Some(Owner {
            host: host?,
            pid: pid?,
            run_id: run_id?,
        })
    }
}

/// What a look at `lock.d/` found.
#[derive(Debug, Clone)]
pub struct Holder {
    pub owner: Option<Owner>,
    /// Time since the last heartbeat (None: unreadable, e.g. caught mid-creation).
    pub heartbeat_age: Option<Duration>,
}

impl Holder {
    /// For messages: "pid 12 on host gpu3, run 12-…, last heartbeat 4 s ago".
    pub fn describe(&self) -> String {
        let who = match &self.owner {
            Some(o) => format!("pid {} on host {}, run {}", o.pid, o.host, o.run_id),
            None => "an unknown runner".to_string(),
        };
        match self.heartbeat_age {
            Some(age) => format!("{who}, last heartbeat {} s ago", age.as_secs()),
            None => format!("{who}, no heartbeat yet"),
        }
    }

    /// Whether the holder is gone. `flock_free`: this process got the flock, so no runner on
    /// this host (where the flock is reliable) holds the store.
    fn is_stale(&self, flock_free: bool, here: &str) -> bool {
        if let Some(o) = &self.owner
            && o.host == here
            && (flock_free || !pid_alive(o.pid))
        {
            return true;
        }
        match self.heartbeat_age {
            Some(age) => age >= STALE_AFTER,
            // A directory without a readable heartbeat is being created, or its creator
            // died between mkdir and the first beat: the directory's own age decides.
            None => false,
        }
    }
}

/// The runner lock, held for the life of this value: the flock, the lock directory and the
/// thread that keeps its heartbeat.
#[derive(Debug)]
pub struct StoreLock {
    file: File,
    dir: PathBuf,
    owner: Owner,
    beat: Option<Heartbeat>,
}

/// The heartbeat thread and its stop flag.
#[derive(Debug)]
struct Heartbeat {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

impl StoreLock {
    pub fn acquire(store_root: &Path) -> Result<StoreLock, EngineError> {
        let (file, flock_free) = take_flock(store_root)?;
        let dir = store_root.join(DIR);
        let owner = Owner::ours();
        let here = owner.host.clone();
        for _ in 0..5 {
            match fs::create_dir(&dir) {
                Ok(()) => {
                    write_owner(&dir, &owner)
                        .and_then(|()| beat(&dir))
                        .map_err(EngineError::io("writing the store lock", &dir))?;
                    let beat = start_heartbeat(dir.clone(), owner.run_id.clone());
                    return Ok(StoreLock {
                        file,
                        dir,
                        owner,
                        beat: Some(beat),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = look(&dir, true);
                    let stale = holder.is_stale(flock_free, &here) || {
                        // No heartbeat: stale only once the directory itself is old.
                        holder.heartbeat_age.is_none()
                            && age_of(&dir).is_some_and(|a| a >= STALE_AFTER)
                    };
                    if !stale {
                        return Err(EngineError::StoreBusy {
                            store: store_root.to_path_buf(),
                            holder: holder.describe(),
                        });
                    }
                    tracing::info!(
                        "taking over the store lock of {}, which is no longer running",
                        holder.describe()
                    );
                    take_over(&dir, &holder)?;
                }
                Err(e) => {
                    return Err(EngineError::Io {
                        what: "creating the store lock",
                        path: dir,
                        source: e,
                    });
                }
            }
        }
        Err(EngineError::StoreBusy {
            store: store_root.to_path_buf(),
            holder: look(&dir, true).describe(),
        })
    }

    /// The live runner holding the lock of `store_root`, if any, described for a person.
    pub fn holder(store_root: &Path) -> Option<String> {
        let here = hostname();
        let path = store_root.join("lock");
        let flock_free = File::open(&path).ok().is_none_or(|file| {
            // SAFETY: flock on a valid, owned file descriptor; released when `file` drops.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 }
        });
        let dir = store_root.join(DIR);
        if !dir.exists() {
            return None;
        }
        let holder = look(&dir, false);
        (!holder.is_stale(flock_free, &here)).then(|| holder.describe())
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        if let Some(Heartbeat { stop, thread }) = self.beat.take() {
            let (flag, cv) = &*stop;
            if let Ok(mut s) = flag.lock() {
                *s = true;
                cv.notify_all();
            }
            let _ = thread.join();
        }
        // Removed only while it is still ours (a runner judged dead may have lost it).
        let ours = fs::read_to_string(self.dir.join(OWNER))
            .ok()
            .and_then(|t| Owner::parse(&t))
            .is_some_and(|o| o.run_id == self.owner.run_id);
        if ours {
            let _ = fs::remove_dir_all(&self.dir);
        }
        // Leave the pid file empty so the next runner does not report a takeover.
        let _ = self.file.set_len(0);
    }
}

/// The flock on `lock` (and the pid in it, for older readers). Returns whether this
/// process got it; `false` only where the filesystem has no flock at all.
fn take_flock(store_root: &Path) -> Result<(File, bool), EngineError> {
    let path = store_root.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(EngineError::io("opening store lock", &path))?;
    // A child forked by another thread of this process holds a copy of every fd until it
    // execs (CLOEXEC acts only then), so a just-released lock may look held for a moment:
    // retry briefly before calling it busy.
    let mut locked: std::io::Result<()> = Ok(());
    for _ in 0..40 {
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        locked = if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        match &locked {
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => break,
        }
    }
    let mut previous = String::new();
    let _ = file.read_to_string(&mut previous);
    let previous = previous.trim().to_string();
    let flock_free = match locked {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
            let holder = look(&store_root.join(DIR), false);
            let holder = match (&holder.owner, previous.is_empty()) {
                (Some(_), _) => holder.describe(),
                (None, false) => format!("pid {previous}"),
                (None, true) => "pid unknown".to_string(),
            };
            return Err(EngineError::StoreBusy {
                store: store_root.to_path_buf(),
                holder,
            });
        }
        // No flock on this filesystem (some NFS mounts): the directory alone decides.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP)) => false,
        Err(e) => {
            return Err(EngineError::Io {
                what: "locking",
                path,
                source: e,
            });
        }
    };
    let write = (|| {
        file.set_len(0)?;
        file.rewind()?;
        // Not fsynced: the pid is only for the message a refused second runner prints.
        writeln!(file, "{}", std::process::id())
    })();
    write.map_err(EngineError::io("writing store lock", &path))?;
    Ok((file, flock_free))
}

/// Reads `lock.d/`. `settle`: a directory without an owner may be mid-creation, so look
/// again briefly before calling its owner unknown.
fn look(dir: &Path, settle: bool) -> Holder {
    let mut tries = if settle { 20 } else { 1 };
    loop {
        let owner = fs::read_to_string(dir.join(OWNER))
            .ok()
            .and_then(|t| Owner::parse(&t));
        let heartbeat_age = read_beat(dir);
        tries -= 1;
        if (owner.is_some() && heartbeat_age.is_some()) || tries == 0 || !dir.exists() {
            return Holder {
                owner,
                heartbeat_age,
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The heartbeat's age, from the time written in it (the writer's clock; a runner on
/// another machine with a skewed clock is caught by [`STALE_AFTER`]'s margin).
fn read_beat(dir: &Path) -> Option<Duration> {
    let text = fs::read_to_string(dir.join(BEAT)).ok()?;
    let at: u128 = text.trim().parse().ok()?;
    Some(Duration::from_nanos(
        unix_nanos()
            .saturating_sub(at)
            .try_into()
            .unwrap_or(u64::MAX),
    ))
}

/// The directory's own age (mtime), for a directory that never got a heartbeat.
fn age_of(dir: &Path) -> Option<Duration> {
    fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
}

fn write_owner(dir: &Path, owner: &Owner) -> std::io::Result<()> {
    slider_atomic::write(&dir.join(OWNER), owner.to_text().as_bytes())
}

fn beat(dir: &Path) -> std::io::Result<()> {
    slider_atomic::write(&dir.join(BEAT), format!("{}\n", unix_nanos()).as_bytes())
}

/// Moves a stale lock directory out of the way, then checks it was the one judged stale (a
/// racer may have taken over first and made a fresh one): if not, puts it back.
fn take_over(dir: &Path, judged: &Holder) -> Result<(), EngineError> {
    let aside = dir.with_file_name(format!(
        "lock.stale-{}-{}",
        std::process::id(),
        unix_nanos()
    ));
    match fs::rename(dir, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(EngineError::Io {
                what: "moving the stale store lock",
                path: dir.to_path_buf(),
                source: e,
            });
        }
    }
    let moved = fs::read_to_string(aside.join(OWNER))
        .ok()
        .and_then(|t| Owner::parse(&t));
    if moved.as_ref().map(|o| &o.run_id) != judged.owner.as_ref().map(|o| &o.run_id) {
        // Someone else's fresh lock: back it goes (the next mkdir then finds it held).
        let _ = fs::rename(&aside, dir);
        return Ok(());
    }
    let _ = fs::remove_dir_all(&aside);
    Ok(())
}

/// The thread that rewrites the heartbeat until told to stop.
fn start_heartbeat(dir: PathBuf, run_id: String) -> Heartbeat {
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let stop2 = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        let (flag, cv) = &*stop2;
        let Ok(mut stopped) = flag.lock() else {
            return;
        };
        loop {
            match cv.wait_timeout(stopped, HEARTBEAT) {
                Ok((s, _)) => stopped = s,
                Err(_) => return,
            }
            if *stopped {
                return;
            }
            let still_ours = fs::read_to_string(dir.join(OWNER))
                .ok()
                .and_then(|t| Owner::parse(&t))
                .is_some_and(|o| o.run_id == run_id);
            if !still_ours {
                tracing::error!(
                    "the store lock {} was taken over by another runner (this one missed its \
                     heartbeats for {} s): stop this run",
                    dir.display(),
                    STALE_AFTER.as_secs()
                );
                return;
            }
            if let Err(e) = beat(&dir) {
                tracing::warn!("cannot write the store lock's heartbeat: {e}");
            }
        }
    });
    Heartbeat { stop, thread }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// This machine's name, as `hostname` prints it.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether a process with this pid exists on this machine.
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_dir(root: &Path, owner: &Owner, beat_age: Option<Duration>) {
        let dir = root.join(DIR);
        fs::create_dir_all(&dir).unwrap();
        write_owner(&dir, owner).unwrap();
        if let Some(age) = beat_age {
            let at = unix_nanos() - age.as_nanos();
            fs::write(dir.join(BEAT), format!("{at}\n")).unwrap();
        }
    }

    fn other_host(run: &str) -> Owner {
        Owner {
            host: "some-other-node".into(),
            pid: 4242,
            run_id: run.into(),
        }
    }

    #[test]
    fn owner_text_round_trips() {
        let o = Owner::ours();
        assert_eq!(Owner::parse(&o.to_text()), Some(o));
        assert_eq!(Owner::parse("host a\npid x\nrun r\n"), None);
    }

    #[test]
    fn a_second_lock_is_refused_and_the_first_released_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let first = StoreLock::acquire(root.path()).unwrap();
        assert!(root.path().join(DIR).join(BEAT).is_file());
        let err = StoreLock::acquire(root.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "pid {} on host {}",
                std::process::id(),
                hostname()
            )),
            "{err}"
        );
        assert!(StoreLock::holder(root.path()).is_some());
        drop(first);
        assert!(!root.path().join(DIR).exists());
        assert!(StoreLock::holder(root.path()).is_none());
        StoreLock::acquire(root.path()).unwrap();
    }

    /// The rows of the table at the top: who may take a lock directory over.
    #[test]
    fn a_lock_directory_is_stale_by_heartbeat_or_by_its_host_and_flock() {
        let fresh = Some(Duration::from_secs(5));
        let old = Some(STALE_AFTER + Duration::from_secs(1));
        let dead_here = Owner {
            host: hostname(),
            pid: u32::MAX - 7,
            run_id: "r".into(),
        };
        let cases: [(&str, Owner, Option<Duration>, bool); 4] = [
            ("live runner elsewhere", other_host("a"), fresh, false),
            ("silent runner elsewhere", other_host("b"), old, true),
            (
                "dead runner here, fresh beat",
                dead_here.clone(),
                fresh,
                true,
            ),
            ("dead runner here, old beat", dead_here, old, true),
        ];
        for (what, owner, age, takeable) in cases {
            let root = tempfile::tempdir().unwrap();
            write_dir(root.path(), &owner, age);
            let got = StoreLock::acquire(root.path());
            assert_eq!(got.is_ok(), takeable, "{what}: {got:?}");
            if let Err(e) = got {
                let e = e.to_string();
                assert!(e.contains("on host some-other-node"), "{what}: {e}");
                assert!(e.contains("last heartbeat 5 s ago"), "{what}: {e}");
            }
        }
    }

    #[test]
    fn a_taken_over_lock_is_not_removed_by_its_old_holder() {
        let root = tempfile::tempdir().unwrap();
        let lock = StoreLock::acquire(root.path()).unwrap();
        // Another runner judged this one dead and took the directory over.
        fs::remove_dir_all(root.path().join(DIR)).unwrap();
        write_dir(root.path(), &other_host("new"), Some(Duration::ZERO));
        drop(lock);
        let left = fs::read_to_string(root.path().join(DIR).join(OWNER)).unwrap();
        assert!(left.contains("run new"), "{left}");
    }

    #[test]
    fn a_takeover_puts_back_a_lock_that_is_not_the_one_judged_stale() {
        let root = tempfile::tempdir().unwrap();
        write_dir(root.path(), &other_host("fresh"), Some(Duration::ZERO));
        let judged = Holder {
            owner: Some(other_host("stale")),
            heartbeat_age: Some(STALE_AFTER),
        };
        take_over(&root.path().join(DIR), &judged).unwrap();
        let left = fs::read_to_string(root.path().join(DIR).join(OWNER)).unwrap();
        assert!(left.contains("run fresh"), "{left}");
    }
}
