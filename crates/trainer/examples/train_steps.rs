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

use std::time::Instant;

use slider_models::bench::{Runs, peak_rss_mib, random_base, with_one_layer_text};
use slider_models::burn::tensor::{Device, Distribution, Tensor};
use slider_models::checkpoint::ModelSpec;
use slider_models::lora::{Factor, LoraNetwork};
use slider_models::unet::UNetConfig;
use slider_trainer::bench::training_step_seconds;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("forms") {
        args.next();
        return compare_forms(args);
    }
    let resolution: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(128);
    let steps: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let base = random_base(dir.path(), "tiny", &with_one_layer_text(ModelSpec::tiny()))?;
    let runs = Runs {
        warmup: 2,
        repeat: steps,
    };
    let times = training_step_seconds(&base, resolution, runs, dir.path(), |_, _| {})?;
    let timed: f64 = times.seconds.iter().sum();
    let peak = peak_rss_mib().map_or("unknown".into(), |m| format!("{m:.0} MiB"));
    println!(
        "tiny UNet, {resolution} px ({} px latents), rank 4, CAME, batch 1: {:.2} steps/s over {steps} steps; peak RSS {peak}; whole run {:.1} s",
        resolution / 2,
        steps as f64 / timed,
        started.elapsed().as_secs_f64()
    );
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
