//! Recipes: YAML schema, expansion, validation, and compilation to a typed plan.

pub mod plan;

pub use plan::*;
