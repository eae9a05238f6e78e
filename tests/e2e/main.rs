//! End-to-end tests: each runs the real `slider-run` binary.

mod eyesize;
mod lora_tools;
mod model;
mod pipeline;
mod pretrain;
mod sample;
mod toyworld;
mod train;

use std::process::Command;

pub fn slider_run() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slider-run"))
}

/// Runs `cmd` (a `slider-run ... --json` invocation), asserts it succeeded (printing both
/// streams if not) and parses its JSON summary.
pub fn json_of(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().expect("slider-run runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON summary")
}

#[test]
fn help_lists_the_subcommands() {
    let out = slider_run().arg("--help").output().expect("binary runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Usage"), "{text}");
}
