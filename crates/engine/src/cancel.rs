//! Cooperative cancellation: Ctrl-C / SIGTERM set a flag that the scheduler and executors
//! poll; running child processes are then killed by their executors. A second signal exits
//! at once (the next run cleans the temp dirs left behind).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A shared "please stop" flag.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The flag itself, for loops that poll an `AtomicBool` (the trainer's clean stop).
    pub fn flag(&self) -> &AtomicBool {
        &self.0
    }

    /// Cancels this token on SIGINT/SIGTERM; a second signal exits with status 130.
    /// Can be installed once per process.
    pub fn cancel_on_signals(&self) -> Result<(), String> {
        let token = self.clone();
        let count = Arc::new(AtomicUsize::new(0));
        ctrlc::set_handler(move || {
            if count.fetch_add(1, Ordering::SeqCst) > 0 {
                std::process::exit(130);
            }
            token.cancel();
        })
        .map_err(|e| format!("installing the Ctrl-C handler: {e}"))
    }
}
