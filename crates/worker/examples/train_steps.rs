//! Training throughput of the tiny configuration: steps/s of the LoRA trainer (rank 4, CAME,
//! batch 1, UNet only) and the process's peak RSS.
//!
//! `cargo run -p slider-worker --example train_steps -- [RESOLUTION] [STEPS]` (the dev profile
//! builds dependencies at opt-level 3)
//! (defaults 128 px, i.e. 64x64 latents with the tiny 2x VAE, and 20 timed steps after 2
//! warm-up steps). The base is the `tiny` UNet and VAE with a one-layer CLIP of CLIP-L's width
//! (the text encoder runs once per run, so its depth does not change steps/s).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use slider_worker::checkpoint::{ModelSpec, StoreDtype, write_random_checkpoint};
use slider_worker::clip::TextConfig;
use slider_worker::open_device;
use slider_worker::train::{TrainConfig, train};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let resolution: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(128);
    let steps: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let warmup = 2;
    let dir = tempfile::tempdir()?;
    let spec = ModelSpec {
        text_l: Some(TextConfig {
            layers: 1,
            ..TextConfig::clip_l()
        }),
        ..ModelSpec::tiny()
    };
    let base = dir.path().join("base.safetensors");
    write_random_checkpoint(&base, &spec, StoreDtype::F16, 1)?;
    let image = dir.path().join("image.png");
    write_png(&image, resolution)?;
    let config = TrainConfig {
        base,
        images: vec![image],
        caption: "a photo of sks".into(),
        learning_rate: 5e-5,
        unet_lr: None,
        train_batch_size: 1,
        max_train_steps: warmup + steps,
        network_dim: 4,
        network_alpha: 1.0,
        lr_scheduler: "constant_with_warmup".into(),
        lr_warmup_steps: 1,
        optimizer_type: "CAME".into(),
        optimizer_args: BTreeMap::new(),
        seed: 0,
        resolution,
        noise_offset: 0.0,
        min_snr_gamma: None,
        mixed_precision: "no".into(),
        gradient_checkpointing: false,
        save_precision: "float".into(),
        checkpoint_every: 0,
        comment: String::new(),
    };
    let device = open_device("cpu")?;
    let mut timed_from = None;
    let mut timed_to = Instant::now();
    let started = Instant::now();
    train(
        &config,
        &dir.path().join("work"),
        &dir.path().join("out"),
        &device,
        |p| {
            if p.step == warmup {
                timed_from = Some(Instant::now());
            }
            timed_to = Instant::now();
        },
        &AtomicBool::new(false),
    )?;
    let timed = timed_to.duration_since(timed_from.unwrap_or(started));
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    println!(
        "tiny UNet, {resolution} px ({} px latents), rank 4, CAME, batch 1: {:.2} steps/s over {steps} steps; peak RSS {peak}; whole run {:.1} s",
        resolution / 2,
        steps as f64 / timed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A gradient test image through the `image` crate.
fn write_png(path: &std::path::Path, size: usize) -> Result<(), Box<dyn std::error::Error>> {
    let s = size as u32;
    let img = image::RgbImage::from_fn(s, s, |x, y| {
        image::Rgb([(x * 255 / s) as u8, (y * 255 / s) as u8, 128])
    });
    img.save(path)?;
    Ok(())
}
