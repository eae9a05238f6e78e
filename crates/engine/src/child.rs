//! Child processes the engine starts (`command` programs, workers): each in its own process
//! group and tied to the runner's life (killed if the runner dies, even by `kill -9`), so an
//! interrupted run never leaves a program writing behind it.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::cancel::CancelToken;

/// Makes the command start in its own process group and die with the spawning thread.
pub fn detach_and_tie(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // functions (setpgid, prctl, getppid, _exit).
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(137);
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the child's whole process group.
pub fn signal_group(child: &Child, signal: libc::c_int) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a negative pid addresses the group the child leads.
    unsafe {
        libc::kill(-pid, signal);
    }
}

/// SIGTERM to the group, then SIGKILL after a grace period; reaps the child.
pub fn terminate(child: &mut Child, grace: Duration) {
    signal_group(child, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            signal_group(child, libc::SIGKILL);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_group(child, libc::SIGKILL);
    let _ = child.wait();
}

/// Waits for the child, polling `cancel`; `None` when cancelled (the child is then killed).
pub fn wait_or_cancel(
    child: &mut Child,
    cancel: &CancelToken,
) -> std::io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if cancel.is_cancelled() {
            terminate(child, Duration::from_secs(2));
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
