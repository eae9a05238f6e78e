//! End-to-end tests: each runs the real `slider-run` binary.

mod eyesize;
mod lora_tools;
mod model;
mod pipeline;
mod sample;
mod toyworld;
mod train;

use std::process::Command;

pub fn slider_run() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slider-run"))
}

#[test]
fn help_lists_the_subcommands() {
    let out = slider_run().arg("--help").output().expect("binary runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Usage"), "{text}");
}
