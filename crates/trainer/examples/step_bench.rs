//! Seconds per training step and peak memory of the whole trainer on any device, for
//! `scripts/gpu-check.sh`:
//!
//! ```text
//! cargo run -p slider-trainer --features slider-models/wgpu --example step_bench -- \
//!     --device wgpu:auto --model tiny|sd15|sdxl [--resolution N] [--steps N] \
//!     [--mixed-precision no|fp16|bf16] [--gradient-checkpointing] [--cache DIR]
//! ```
//!
//! `tiny` trains on the shipped base (`assets/tiny-sd`); `sd15` and `sdxl` on a random
//! full-size checkpoint (f16, the existing writer), written once into `--cache` (default
//! `target/step-bench`). One image of the resolution, rank 4 on kohya's targets, CAME, batch
//! 1: `train` as a recipe's `train` node runs it, so whatever precision and recompute the
//! trainer implements is what is measured. One warm-up step (kernel compilation, autotune),
//! then `--steps` timed steps (default 3). When the trainer refuses the precision or recompute
//! asked for, the refusal is printed and the step is measured without them.
//!
//! Prints one Markdown table row: model, resolution, device, settings, s/step, the device
//! allocator's high-water mark seen after each step (`reserved`: what the backend holds from
//! the device; on `cpu` there is none), and the process's peak RSS (on `cpu` and on a
//! software Vulkan, the device memory is this).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use slider_models::checkpoint::{ModelSpec, StoreDtype, write_random_checkpoint};
use slider_protocol::names::{LrScheduler, MixedPrecision, Optimizer};
use slider_trainer::{TrainConfig, train};

type Error = Box<dyn std::error::Error>;

struct Args {
    device: String,
    model: String,
    resolution: Option<usize>,
    steps: usize,
    mixed_precision: MixedPrecision,
    gradient_checkpointing: bool,
    cache: PathBuf,
}

fn parse_args() -> Result<Args, Error> {
    let mut args = Args {
        device: "cpu".into(),
        model: "tiny".into(),
        resolution: None,
        steps: 3,
        mixed_precision: MixedPrecision::No,
        gradient_checkpointing: false,
        cache: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/step-bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => args.device = value()?,
            "--model" => args.model = value()?,
            "--resolution" => args.resolution = Some(value()?.parse()?),
            "--steps" => args.steps = value()?.parse()?,
            "--mixed-precision" => {
                let name = value()?;
                args.mixed_precision = MixedPrecision::from_name(&name).ok_or_else(|| {
                    format!("--mixed-precision: `{name}` is not no, fp16 or bf16")
                })?;
            }
            "--gradient-checkpointing" => args.gradient_checkpointing = true,
            "--cache" => args.cache = PathBuf::from(value()?),
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    if args.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    Ok(args)
}

fn main() -> Result<(), Error> {
    let args = parse_args()?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (base, default_resolution) = match args.model.as_str() {
        "tiny" => (repo.join("assets/tiny-sd/tiny-sd.safetensors"), 64),
        "sd15" => (random_base(&args.cache, "sd15", &ModelSpec::sd15())?, 512),
        "sdxl" => (random_base(&args.cache, "sdxl", &ModelSpec::sdxl())?, 1024),
        other => return Err(format!("unknown model `{other}` (tiny, sd15, sdxl)").into()),
    };
    let resolution = args.resolution.unwrap_or(default_resolution);
    let device = slider_models::open_device(&args.device)?;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("image.png");
    write_png(&image, resolution)?;
    let mut config = TrainConfig {
        base,
        base_config: None,
        images: vec![image],
        caption: "a photo of sks".into(),
        learning_rate: 5e-5,
        unet_lr: None,
        train_batch_size: 1,
        max_train_steps: 1 + args.steps,
        network_dim: 4,
        network_alpha: 1.0,
        conv_dim: None,
        conv_alpha: None,
        lr_scheduler: LrScheduler::Constant,
        lr_warmup_steps: 0,
        optimizer_type: Optimizer::Came,
        optimizer_args: BTreeMap::new(),
        seed: 0,
        resolution,
        noise_offset: 0.0,
        min_snr_gamma: None,
        mixed_precision: args.mixed_precision,
        gradient_checkpointing: args.gradient_checkpointing,
        save_precision: slider_protocol::params::Precision::Float,
        checkpoint_every: 0,
        comment: String::new(),
    };
    let mut measured = measure(&config, dir.path(), &device);
    let asked = config.mixed_precision != MixedPrecision::No || config.gradient_checkpointing;
    if let (Err(e), true) = (&measured, asked) {
        eprintln!(
            "step_bench: the trainer refused mixed_precision {} / gradient_checkpointing {}: {e}; measuring without them",
            config.mixed_precision.name(),
            config.gradient_checkpointing
        );
        config.mixed_precision = MixedPrecision::No;
        config.gradient_checkpointing = false;
        measured = measure(&config, dir.path(), &device);
    }
    let m = measured?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "| {} | {resolution} | {} | {}{} | {:.3} | {} | {:.2} GiB |",
        args.model,
        slider_models::describe_device(&device),
        config.mixed_precision.name(),
        if config.gradient_checkpointing {
            " + recompute"
        } else {
            ""
        },
        m.seconds_per_step,
        m.reserved
            .map(|b| format!("{:.2} GiB", gib(b)))
            .unwrap_or_else(|| "-".into()),
        gib(peak_rss()),
    );
    Ok(())
}

struct Measured {
    seconds_per_step: f64,
    reserved: Option<u64>,
}

fn measure(
    config: &TrainConfig,
    dir: &Path,
    device: &slider_models::burn::tensor::Device,
) -> Result<Measured, Error> {
    let (mut timed_from, mut timed_to) = (None, Instant::now());
    let mut reserved: Option<u64> = None;
    let run = dir.join(format!(
        "run-{}-{}",
        config.mixed_precision.name(),
        config.gradient_checkpointing
    ));
    train(
        config,
        &run.join("work"),
        &run.join("out"),
        device,
        |p| {
            if let Some(usage) = device.memory_pool_usage() {
                reserved = Some(reserved.unwrap_or(0).max(usage.bytes_reserved));
            }
            if p.step == 1 {
                timed_from = Some(Instant::now());
            }
            timed_to = Instant::now();
        },
        &AtomicBool::new(false),
    )?;
    let from = timed_from.ok_or("no step finished")?;
    Ok(Measured {
        seconds_per_step: timed_to.duration_since(from).as_secs_f64()
            / (config.max_train_steps - 1) as f64,
        reserved,
    })
}

/// A random full-size checkpoint of `spec` in `cache` (f16), written on first use.
fn random_base(cache: &Path, name: &str, spec: &ModelSpec) -> Result<PathBuf, Error> {
    let path = cache.join(format!("{name}-random-f16.safetensors"));
    if !path.is_file() {
        std::fs::create_dir_all(cache)?;
        let started = Instant::now();
        write_random_checkpoint(&path, spec, StoreDtype::F16, 1)?;
        eprintln!(
            "step_bench: wrote {} in {:.0} s",
            path.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(path)
}

/// The process's peak resident set (VmHWM), 0 where /proc is not there.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// A gradient test image through the `image` crate.
fn write_png(path: &Path, size: usize) -> Result<(), Error> {
    let s = size as u32;
    let img = image::RgbImage::from_fn(s, s, |x, y| {
        image::Rgb([(x * 255 / s) as u8, (y * 255 / s) as u8, 128])
    });
    img.save(path)?;
    Ok(())
}
