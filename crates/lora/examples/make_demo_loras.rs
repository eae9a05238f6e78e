//! Writes `assets/loras/{small,big}_{front,45deg,side}.safetensors`: six small
//! deterministic kohya LoRAs of the tiny layout (rank 4, alpha 1) standing in for the
//! method's six trainings, for the `merge-only` recipe and the end-to-end tests.
//!
//! Per angle, both LoRAs share most of their factors (the "identity" of the image), plus:
//! small = shared + noise, big = shared + noise + an attribute direction. The attribute
//! direction is the same at every angle, so `+1.5 big - 1.5 small` per angle and the
//! 3-way merge of the results isolate it. Run from the workspace root:
//! `cargo run -p slider-lora --example make_demo_loras [OUT_DIR]`.

use std::path::PathBuf;

use slider_lora::synth::{Layout, random_lora};
use slider_lora::{Lora, Precision};

const NOISE: f32 = 0.05;
const ATTRIBUTE: f32 = 0.5;

/// `base + c * other`, factor by factor (same layout, same rank).
fn add_scaled(base: &Lora, other: &Lora, c: f32) -> Lora {
    let mut out = base.clone();
    for (name, m) in &mut out.modules {
        let o = &other.modules[name];
        for (x, y) in m.up.iter_mut().zip(&o.up) {
            *x += c * y;
        }
        for (x, y) in m.down.iter_mut().zip(&o.down) {
            *x += c * y;
        }
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("assets/loras"), PathBuf::from);
    std::fs::create_dir_all(&out_dir)?;
    let attribute = random_lora(Layout::Tiny, 4, 1.0, 1000);
    for (i, angle) in ["front", "45deg", "side"].iter().enumerate() {
        let seed = 10 * i as u64;
        let shared = random_lora(Layout::Tiny, 4, 1.0, seed);
        let small = add_scaled(&shared, &random_lora(Layout::Tiny, 4, 1.0, seed + 1), NOISE);
        let big = add_scaled(
            &add_scaled(&shared, &random_lora(Layout::Tiny, 4, 1.0, seed + 2), NOISE),
            &attribute,
            ATTRIBUTE,
        );
        for (kind, mut lora) in [("small", small), ("big", big)] {
            lora.metadata.insert(
                "ss_training_comment".into(),
                format!("synthetic demo LoRA: {kind} eyes, {angle} view (make_demo_loras)"),
            );
            lora.metadata
                .insert("ss_output_name".into(), format!("{kind}_{angle}"));
            let path = out_dir.join(format!("{kind}_{angle}.safetensors"));
            lora.save(&path, Precision::F32)?;
            println!(
                "wrote {} ({} bytes)",
                path.display(),
                std::fs::metadata(&path)?.len()
            );
        }
    }
    Ok(())
}
