//! End-to-end tests: each runs the real `slider-run` binary.

mod bake;
mod config;
mod crash;
mod damage;
mod eyesize;
mod lora_tools;
mod model;
mod pipeline;
mod pretrain;
mod sample;
mod sd_scripts;
mod slurm;
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
        "merge-into-model",
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

/// A LoRA (LoCon included: `conv_dim`) trained for `steps` steps on the shipped tiny base,
/// written under `dir`: a file that fits that checkpoint's layers, as a user's would.
pub fn lora_trained_on_the_tiny_base(
    dir: &std::path::Path,
    steps: usize,
    seed: u64,
) -> std::path::PathBuf {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/tiny-sd/tiny-sd.safetensors");
    image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 4) as u8, 120])
    })
    .save(dir.join("face.png"))
    .expect("writes the image");
    let recipe = dir.join("train.yaml");
    std::fs::write(
        &recipe,
        format!(
            "nodes:\n  one:\n    kind: train\n    base: {}\n    images: [face.png]\n    \
             caption: a face\n    max_train_steps: {steps}\n    resolution: 64\n    \
             network_dim: 2\n    conv_dim: 2\n    seed: {seed}\n    \
             network_train_unet_only: true\noutputs:\n  one: out/one.safetensors\n",
            base.display()
        ),
    )
    .expect("writes the recipe");
    let out = slider_run()
        .arg(&recipe)
        .arg("--quiet")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("out/one.safetensors")
}
