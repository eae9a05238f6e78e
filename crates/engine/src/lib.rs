//! The engine: runs a [`slider_recipe::Plan`], re-running only what changed.
//!
//! Every node gets a key from its kind, parameters, the content of its inputs and the code
//! version of its executor ([`fingerprint`]); a finished node's outputs live in the store
//! under that key ([`store`]). [`run`] walks the DAG, serves cached nodes from the store and
//! executes the rest (LoRA kinds in-process, `command` as a child process, GPU kinds on
//! workers speaking the [`protocol`]); [`inspect`] says what is stale and why; [`verify`]
//! re-executes a recipe and compares it with its lockfile; [`report`] writes a finished run's
//! static HTML page.
//!
//! ```no_run
//! # fn demo(plan: slider_recipe::Plan) -> Result<(), slider_engine::EngineError> {
//! use slider_engine::{RunOptions, Silent, Store, run};
//! let store = Store::default_root(&plan.recipe_path);
//! let summary = run(&plan, &store, &RunOptions::default(), &Silent)?;
//! println!("ran {}, cached {}, failed {}", summary.ran.len(), summary.cached.len(), summary.failed.len());
//! # Ok(()) }
//! ```

mod bake_exec;
mod cancel;
mod child;
pub mod cluster_bench;
mod command;
mod error;
mod executor;
pub mod fingerprint;
mod fsutil;
mod gc;
pub mod inspect;
mod journal;
pub mod lock;
mod lockfile;
mod lora_exec;
pub mod protocol;
pub mod report;
mod run;
pub mod sd_scripts;
pub mod slurm;
pub mod store;
pub mod verify;

use std::sync::Arc;

pub use bake_exec::{MODEL_FILE, MergeIntoModelExecutor};
pub use cancel::CancelToken;
pub use command::CommandExecutor;
pub use error::EngineError;
pub use executor::{ExecError, Executor, Job, NodeLog, Placement, Produced, Progress};
pub use gc::{GcReport, gc};
pub use journal::{Journal, JournalEntry, JournalState};
pub use lockfile::{LockedNode, Lockfile, lockfile_path};
pub use lora_exec::{LORA_FILE, MergeExecutor, ResizeExecutor, SvdMergeExecutor, lora_delta_error};
pub use protocol::WorkerKind;
pub use run::{
    Event, NodeReport, Observer, RunOptions, RunSummary, Silent, check_supported, kind_versions,
    run,
};
pub use store::{Manifest, Store};

/// The executors that run inside this process (every kind but the worker's).
pub fn in_process_executors() -> Vec<Arc<dyn Executor>> {
    vec![
        Arc::new(SvdMergeExecutor),
        Arc::new(MergeExecutor),
        Arc::new(ResizeExecutor),
        Arc::new(MergeIntoModelExecutor),
        Arc::new(CommandExecutor),
    ]
}

#[cfg(test)]
mod test_plans;
