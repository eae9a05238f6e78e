//! End-to-end tests of the `pipeline` commands.
