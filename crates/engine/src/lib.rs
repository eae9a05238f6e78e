//! The engine: node keys, the content-addressed store, the scheduler and executors.
