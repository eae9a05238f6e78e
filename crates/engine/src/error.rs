//! The engine's error type: every variant says which node, file or store it is about.

use std::path::PathBuf;

/// Errors that stop a whole engine operation (a failing node is a [`crate::NodeFailure`]
/// in the run summary, not an `EngineError`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the store {} is in use by another slider-run ({holder}); wait for it to finish or stop \
         it (a runner that stops its heartbeat is taken over after {} s)",
        store.display(),
        crate::lock::STALE_AFTER.as_secs()
    )]
    StoreBusy { store: PathBuf, holder: String },
    #[error(
        "this build of slider-run cannot run node(s) {} yet: no executor for kind {} \
         (its worker serves: {})",
        nodes.join(", "),
        kinds.join(", "),
        if supported.is_empty() { "no kinds".to_string() } else { supported.join(", ") }
    )]
    UnsupportedKinds {
        nodes: Vec<String>,
        kinds: Vec<String>,
        supported: Vec<String>,
    },
    #[error("unknown node `{0}` in this recipe")]
    UnknownNode(String),
    #[error("malformed {what} {}: {message}", path.display())]
    Corrupt {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("no lockfile {}: run the recipe once to create it", .0.display())]
    NoLockfile(PathBuf),
    #[error("interrupted")]
    Interrupted,
    /// The run's settings cannot work (an executor that cannot reach its cluster, a store it
    /// cannot use).
    #[error("{0}")]
    Config(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> EngineError {
        let path = path.into();
        move |source| EngineError::Io { what, path, source }
    }
}
