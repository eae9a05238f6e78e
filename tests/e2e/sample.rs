//! `slider-run sample` and `xy_plot` nodes through the real binary, on a tiny random base: the
//! PNGs have the asked size and carry their settings as text; a second recipe run is cached.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::Value;
use slider_grid::read_png_text;
use slider_models::burn::tensor::Device;
use slider_models::checkpoint::{StoreDtype, write_random_checkpoint};
use slider_models::{LoraNetwork, ModelSpec};

use crate::{json_of, slider_run};

/// A random base and a LoRA with non-zero factors on every one of its UNet targets.
fn setup(dir: &Path) {
    let spec = ModelSpec::small_test();
    write_random_checkpoint(dir.join("base.safetensors"), &spec, StoreDtype::F32, 3).unwrap();
    let device = Device::flex();
    let unet = spec.unet.init(&device);
    let mut lora = LoraNetwork::init(&unet, 2, 2.0, 9, &device)
        .unwrap()
        .to_lora()
        .unwrap();
    for (i, m) in lora.modules.values_mut().enumerate() {
        for (j, v) in m.up.iter_mut().enumerate() {
            *v = (((i * 7 + j * 13) % 17) as f32 - 8.0) / 40.0;
        }
    }
    lora.save(&dir.join("slider.safetensors"), slider_lora::Precision::F32)
        .unwrap();
}

fn png_text(path: &Path) -> BTreeMap<String, String> {
    read_png_text(path).unwrap().into_iter().collect()
}

#[test]
fn sample_writes_a_png_with_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let sample = |out_file: &str| {
        let out = slider_run()
            .current_dir(d)
            .args([
                "sample",
                "--base",
                "base.safetensors",
                "--prompt",
                "a face with big eyes",
                "--negative-prompt",
                "blurry",
                "--seed",
                "4",
                "--steps",
                "2",
                "--cfg-scale",
                "5",
                "--sampler",
                "dpmpp_2m",
                "--width",
                "40",
                "--height",
                "32",
                "--lora",
                "slider.safetensors:-1.5",
                "--out",
                out_file,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::read(d.join(out_file)).unwrap()
    };
    // Same settings in another process: the same bytes (what `slider-run verify` relies on).
    assert_eq!(sample("out/face.png"), sample("again.png"));
    let image = image::open(d.join("out/face.png")).unwrap();
    assert_eq!((image.width(), image.height()), (40, 32));
    let text = png_text(&d.join("out/face.png"));
    assert_eq!(
        text["parameters"],
        "a face with big eyes\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M Karras, \
         CFG scale: 5, Seed: 4, Size: 40x32, LoRAs: slider.safetensors:-1.5"
    );
    let settings: Value = serde_json::from_str(&text["slider-run"]).unwrap();
    assert_eq!(settings["loras"][0]["weight"], -1.5);

    // A size the model cannot process is refused with the reason.
    let out = slider_run()
        .current_dir(d)
        .args(["sample", "--base", "base.safetensors", "--prompt", "x"])
        .args(["--width", "36", "--height", "32", "--out", "bad.png"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("multiples of 8"), "{err}");
    assert!(!d.join("bad.png").exists());
}

const RECIPE: &str = r#"
base: base.safetensors
nodes:
  check:
    kind: xy_plot
    loras: [slider.safetensors]
    prompt: a face
    x: {weight: [-1, 1]}
    y: {seed: [1, 2]}
    steps: 2
    sampler: euler
    width: 32
    height: 32
outputs:
  check: out/checks/check.png
"#;

fn run_recipe(dir: &Path) -> Value {
    json_of(
        slider_run()
            .current_dir(dir)
            .args(["recipe.yaml", "--json"]),
    )
}

#[test]
fn an_xy_plot_node_publishes_its_grid_and_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    fs::write(d.join("recipe.yaml"), RECIPE).unwrap();
    let first = run_recipe(d);
    assert_eq!(first["ran"], serde_json::json!(["check"]), "{first}");
    let grid = d.join("out/checks/check.png");
    let sheet = image::open(&grid).unwrap();
    // Two 32 px columns and rows plus labels and margins.
    assert!(
        sheet.width() > 64 && sheet.height() > 64,
        "{}x{}",
        sheet.width(),
        sheet.height()
    );
    let text = png_text(&grid);
    assert!(
        text["parameters"].contains("Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32"),
        "{}",
        text["parameters"]
    );
    let settings: Value = serde_json::from_str(&text["slider-run"]).unwrap();
    assert_eq!(settings["x"]["axis"], "weight");
    assert_eq!(settings["y"]["values"], serde_json::json!([1, 2]));
    let bytes = fs::read(&grid).unwrap();

    let second = run_recipe(d);
    assert_eq!(second["ran"], serde_json::json!([]), "{second}");
    assert_eq!(second["cached"], serde_json::json!(["check"]), "{second}");
    assert_eq!(fs::read(&grid).unwrap(), bytes);
}
