//! End-to-end tests of the `model` commands.

use std::path::PathBuf;

use crate::slider_run;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// (fixture, text the report must contain).
#[test]
fn inspect_reports_architecture_parts_and_dtypes() {
    for (checkpoint, wants) in [
        (
            "sd1_tiny.safetensors",
            &[
                "custom Sd1-family",
                "unet",
                "vae",
                "text_l",
                "F32",
                "all present",
            ][..],
        ),
        (
            "sdxl_tiny.safetensors",
            &[
                "custom Sdxl-family",
                "added conditioning 80",
                "F16",
                "BF16",
                "text_g",
                "latent scale  0.13025",
            ][..],
        ),
    ] {
        let out = slider_run()
            .args(["model", "inspect"])
            .arg(fixture(checkpoint))
            .output()
            .expect("binary runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{checkpoint}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for want in wants {
            assert!(text.contains(want), "{checkpoint}: no {want:?} in\n{text}");
        }
    }
}

#[test]
fn inspect_of_a_non_checkpoint_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not.safetensors");
    std::fs::write(&path, b"hello").unwrap();
    let out = slider_run()
        .args(["model", "inspect"])
        .arg(&path)
        .output()
        .expect("binary runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a safetensors file"), "{err}");
}

/// `model forward` on the SD1 fixture's inputs writes every output the reference has, equal
/// within the forward-pass tolerance.
#[test]
fn forward_writes_outputs_equal_to_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let out = slider_run()
        .args(["model", "forward"])
        .arg(fixture("sd1_tiny.safetensors"))
        .arg("--inputs")
        .arg(fixture("sd1_tiny_io.safetensors"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = slider_models::forward::read_tensors(&out_path).unwrap();
    let io = slider_models::forward::read_tensors(&fixture("sd1_tiny_io.safetensors")).unwrap();
    let mut compared = 0;
    for (key, want) in &io {
        let Some(name) = key.strip_prefix("expected.") else {
            continue;
        };
        let got = got.get(name).unwrap_or_else(|| panic!("no output {name}"));
        assert_eq!(got.shape, want.shape, "{name}");
        let diff: f64 = got
            .values
            .iter()
            .zip(&want.values)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let norm: f64 = want.values.iter().map(|b| f64::from(*b).powi(2)).sum();
        assert!((diff / norm).sqrt() < 1e-4, "{name}");
        compared += 1;
    }
    assert_eq!(compared, 8);
}

#[test]
fn forward_refuses_inputs_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in.safetensors");
    let mut t = std::collections::BTreeMap::new();
    t.insert(
        "pixels".to_string(),
        slider_models::HostTensor {
            shape: vec![1],
            values: vec![0.0],
        },
    );
    slider_models::forward::write_tensors(&inputs, t).unwrap();
    let out = slider_run()
        .args(["model", "forward"])
        .arg(fixture("sdxl_tiny.safetensors"))
        .arg("--inputs")
        .arg(&inputs)
        .arg("--out")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .expect("binary runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("none of the inputs (pixels)"), "{err}");
    let out = slider_run()
        .args(["model", "forward"])
        .arg(fixture("sdxl_tiny.safetensors"))
        .arg("--inputs")
        .arg(fixture("sd1_tiny_io.safetensors"))
        .arg("--out")
        .arg(dir.path().join("out.safetensors"))
        .args(["--device", "cuda:0"])
        .output()
        .expect("binary runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cuda"), "{err}");
}
