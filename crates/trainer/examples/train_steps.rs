//! Training throughput: steps/s of the LoRA trainer on the tiny configuration, and the cost of
//! the two ways to run adapters in a training step.
//!
//! `cargo run -p slider-trainer --example train_steps -- [RESOLUTION] [STEPS]` (the dev profile
//! builds dependencies at opt-level 3): the whole trainer (rank 4, CAME, batch 1, UNet only)
//! on the tiny model, defaults 128 px (64x64 latents with the tiny 2x VAE) and 20 timed steps
//! after 2 warm-up steps, then the process's peak RSS. The base is the `tiny` UNet and VAE with
//! a one-layer CLIP of CLIP-L's width (the text encoder runs once per run, so its depth does not
//! change steps/s).
//!
//! `... --example train_steps -- forms CONFIG LATENT [REPS]` (CONFIG `tiny`, `sd15` or `sdxl`,
//! LATENT the latent side): forward + backward of the UNet with a rank-4 LoRA on kohya's
//! targets, once as low-rank branches beside the frozen modules (what the trainer runs) and once
//! with the deltas added to the weights (`LoraNetwork::apply`, the inference form), alternating,
//! median of REPS (default 3) each.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use slider_models::burn::tensor::{Device, Distribution, Tensor};
use slider_models::checkpoint::{ModelSpec, StoreDtype, write_random_checkpoint};
use slider_models::clip::TextConfig;
use slider_models::lora::{Factor, LoraNetwork};
use slider_models::open_device;
use slider_models::unet::UNetConfig;
use slider_trainer::{TrainConfig, train};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("forms") {
        args.next();
        return compare_forms(args);
    }
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
        base_config: None,
        images: vec![image],
        caption: "a photo of sks".into(),
        learning_rate: 5e-5,
        unet_lr: None,
        train_batch_size: 1,
        max_train_steps: warmup + steps,
        network_dim: 4,
        network_alpha: 1.0,
        conv_dim: None,
        conv_alpha: None,
        lr_scheduler: slider_protocol::names::LrScheduler::ConstantWithWarmup,
        lr_warmup_steps: 1,
        optimizer_type: slider_protocol::names::Optimizer::Came,
        optimizer_args: BTreeMap::new(),
        seed: 0,
        resolution,
        noise_offset: 0.0,
        min_snr_gamma: None,
        mixed_precision: slider_protocol::names::MixedPrecision::No,
        gradient_checkpointing: false,
        save_precision: slider_protocol::params::Precision::Float,
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

/// Seconds of one forward + backward of `unet` with `network` (tracked factors) as branches
/// (`branch`) or added to the weights, ending when the factors' gradients are on the host.
fn adapted_step(
    unet: &slider_models::UNet,
    network: &LoraNetwork,
    inputs: &(Tensor<4>, Tensor<1>, Tensor<3>, Option<Tensor<2>>),
    branch: bool,
) -> Result<f64, Box<dyn std::error::Error>> {
    let (x, t, context, y) = inputs.clone();
    let started = Instant::now();
    let pred = if branch {
        network.forward(unet, 1.0, x.clone(), t, context, y)
    } else {
        network.apply(unet, 1.0)?.forward(x.clone(), t, context, y)
    };
    let loss = (pred - x).square().mean();
    let grads = loss.backward();
    for m in network.modules.values() {
        for f in [&m.down, &m.up] {
            let g = match f {
                Factor::Linear(p) => p.grad(&grads).map(|g| g.sum()),
                Factor::Conv(p) => p.grad(&grads).map(|g| g.sum()),
            };
            g.ok_or("a factor got no gradient")?.into_scalar::<f32>();
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

fn compare_forms(mut args: impl Iterator<Item = String>) -> Result<(), Box<dyn std::error::Error>> {
    let name = args.next().unwrap_or_else(|| "tiny".into());
    let config = match name.as_str() {
        "tiny" => UNetConfig::tiny(),
        "sd15" => UNetConfig::sd15(),
        "sdxl" => UNetConfig::sdxl(),
        other => return Err(format!("unknown config `{other}` (tiny, sd15, sdxl)").into()),
    };
    let latent: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(32);
    let reps: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let device = Device::flex();
    let unet = config.init(&device);
    let mut network = LoraNetwork::init(&unet, 4, 1.0, 0, &device)?;
    for m in network.modules.values_mut() {
        m.down = m.down.clone().tracked();
        m.up = m.up.clone().tracked();
    }
    let normal = Distribution::Normal(0.0, 1.0);
    let inputs = (
        Tensor::<4>::random([1, 4, latent, latent], normal, &device),
        Tensor::<1>::from_floats([500.0], &device),
        Tensor::<3>::random([1, 77, config.context_dim], normal, &device),
        config
            .adm_in_channels
            .map(|adm| Tensor::<2>::random([1, adm], normal, &device)),
    );
    adapted_step(&unet, &network, &inputs, true)?; // warm-up
    let (mut branch, mut delta) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        branch.push(adapted_step(&unet, &network, &inputs, true)?);
        delta.push(adapted_step(&unet, &network, &inputs, false)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, d) = (median(&mut branch), median(&mut delta));
    println!(
        "{name} UNet, {latent}x{latent} latents, rank 4 on {} modules, forward + backward, median of {reps}: branches {b:.3} s, deltas added to the weights {d:.3} s ({:.2}x)",
        network.modules.len(),
        d / b
    );
    Ok(())
}
