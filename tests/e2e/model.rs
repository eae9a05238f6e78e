//! End-to-end tests of the `model` commands.
