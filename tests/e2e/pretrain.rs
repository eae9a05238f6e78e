//! `slider-run pretrain` on a small generated corpus: paused at a chosen UNet step, then
//! finished by the same command without the pause; the model, the losses, the previews and
//! the end-of-run figures are there.

use super::slider_run;

fn pretrain(work: &std::path::Path, extra: &[&str]) -> std::process::Output {
    slider_run()
        .current_dir(work)
        .args([
            "pretrain",
            "--generate-corpus",
            "6",
            "--corpus",
            "corpus",
            "--out",
            "base.safetensors",
            "--work-dir",
            "work",
            "--vae-steps",
            "2",
            "--unet-steps",
            "4",
            "--batch-size",
            "2",
            "--vae-batch-size",
            "2",
            "--unet-channels",
            "32",
            "--vae-channels",
            "32",
            "--text-width",
            "32",
            "--preview-caption",
            "1girl, red hair, side view",
        ])
        .args(extra)
        .output()
        .expect("slider-run runs")
}

#[test]
fn pretrain_pauses_at_a_step_and_the_same_command_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = pretrain(dir.path(), &["--stop-at-unet-step", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("paused at step 2 of the unet stage"),
        "{stderr}"
    );
    assert!(dir.path().join("work/pretrain-state.safetensors").is_file());
    assert!(!dir.path().join("base.safetensors").exists());
    let losses = std::fs::read_to_string(dir.path().join("work/loss.csv")).unwrap();
    assert_eq!(losses.lines().filter(|l| l.starts_with("unet,")).count(), 2);

    let out = pretrain(dir.path(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("base.safetensors").is_file());
    let losses = std::fs::read_to_string(dir.path().join("work/loss.csv")).unwrap();
    assert_eq!(losses.lines().filter(|l| l.starts_with("unet,")).count(), 4);
    let samples = image::open(dir.path().join("work/samples.png")).unwrap();
    assert!(samples.width() >= 4 * 64, "four seeds across");
    let captions = stdout
        .lines()
        .find(|l| l.starts_with("captions"))
        .unwrap_or_else(|| panic!("no caption figure in\n{stdout}"));
    assert!(captions.contains("% ("), "{captions}");
}
