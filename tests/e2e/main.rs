//! End-to-end tests: each runs the real `slider-run` binary.

mod damage;
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

/// `--help` lists the commands a user needs (the worker stays hidden), and each listed
/// command has its own help.
#[test]
fn help_lists_the_subcommands() {
    let out = slider_run().arg("--help").output().expect("binary runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let listed: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for needed in [
        "status",
        "explain",
        "verify",
        "gc",
        "svd-merge",
        "merge",
        "resize",
        "inspect",
        "bench",
        "model",
        "pretrain",
        "sample",
        "toyworld",
    ] {
        assert!(listed.contains(&needed), "`{needed}` not in {listed:?}");
    }
    assert!(
        !listed.contains(&"worker"),
        "the worker is internal: {listed:?}"
    );
    for command in listed.iter().filter(|c| **c != "help") {
        let out = slider_run().args([command, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && help.contains(&format!("slider-run {command}")),
            "{command}: {help}"
        );
    }
}
