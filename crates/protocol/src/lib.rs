//! `slider-protocol`: the typed contract between the parts of slider-run, serde only.
//!
//! - [`params`]: the parameters of every node kind. `slider-recipe` compiles a recipe into
//!   them, `slider-engine` keys their canonical serialisation, the worker deserialises them.
//!   Nobody looks a field up by name in a JSON value.
//! - [`names`]: every choice a recipe accepts (optimizers, schedulers, samplers, precisions)
//!   as an enum.
//! - [`quality`]: the quality file an `evaluate` node writes, its goal and its summary line.
//! - [`worker`]: the messages between the engine and a worker process, and the worker's
//!   serving loop.
//!
//! ```
//! use slider_protocol::{NodeParams, MergeParams, Input, Precision};
//! let p = NodeParams::Merge(MergeParams {
//!     models: vec![Input::Node("big".into()), Input::Node("small".into())],
//!     ratios: vec![1.5, -1.5],
//!     save_precision: Precision::Fp16,
//! });
//! let json = serde_json::to_value(&p)?;
//! assert_eq!(json["kind"], "merge");
//! assert_eq!(serde_json::from_value::<NodeParams>(json)?, p);
//! # Ok::<(), serde_json::Error>(())
//! ```

pub mod names;
pub mod params;
pub mod quality;
pub mod worker;

pub use names::{LrScheduler, MixedPrecision, Optimizer, Sampler, Trainer};
pub use params::*;
pub use worker::{
    EngineMessage, Progress, Request, RequestInput, WorkerMessage, WorkerOutput, serve,
};
