//! Benchmark: forward time and peak memory of a UNet configuration at 64x64 latents
//! (512 px for SD1.5), and burn's raw conv/matmul speed. The PyTorch baseline is
//! `tests/fixtures/unet_forward_torch.py`; `slider-run bench torch` runs both in one go.
//!
//! ```text
//! cargo run -p slider-models --release --example unet_forward -- sd15 [runs] [device]
//! cargo run -p slider-models --release --example unet_forward -- tiny 5
//! cargo run -p slider-models --release --example unet_forward -- kernels
//! ```

use std::time::Instant;

use slider_models::bench::{Runs, peak_rss_mib, unet_forward_seconds};
use slider_models::burn::tensor::{Device, Distribution, Tensor};
use slider_models::{UNetConfig, open_device};

fn median(v: Vec<f64>) -> f64 {
    slider_models::bench::median(&v).unwrap_or(f64::NAN)
}

fn kernels(device: &Device) {
    let ad = device.clone().autodiff();
    let dist = Distribution::Normal(0.0, 1.0);
    let mut conv = Vec::new();
    for _ in 0..7 {
        let x = Tensor::<4>::random([1, 64, 64, 64], dist, &ad).require_grad();
        let w = Tensor::<4>::random([64, 64, 3, 3], dist, &ad).require_grad();
        let t = Instant::now();
        let y = slider_models::burn::tensor::module::conv2d(
            x.clone(),
            w.clone(),
            None,
            slider_models::burn::tensor::ops::ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
        );
        let grads = y.sum().backward();
        let gx = x.grad(&grads).map(|g| g.sum().into_scalar::<f32>());
        let gw = w.grad(&grads).map(|g| g.sum().into_scalar::<f32>());
        assert!(gx.is_some() && gw.is_some());
        conv.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut mm = Vec::new();
    let n = 1024usize;
    for _ in 0..7 {
        let a = Tensor::<2>::random([n, n], dist, &ad).require_grad();
        let b = Tensor::<2>::random([n, n], dist, &ad).require_grad();
        let t = Instant::now();
        let grads = a.clone().matmul(b.clone()).sum().backward();
        let ga = a.grad(&grads).map(|g| g.sum().into_scalar::<f32>());
        let gb = b.grad(&grads).map(|g| g.sum().into_scalar::<f32>());
        assert!(ga.is_some() && gb.is_some());
        mm.push(t.elapsed().as_secs_f64());
    }
    // fwd + two backward matmuls: 3 * 2 n^3 flops.
    let gflops = 6.0 * (n as f64).powi(3) / median(mm.clone()) / 1e9;
    println!(
        "conv2d 64->64 3x3 on 1x64x64x64 fwd+bwd: median {:.1} ms",
        median(conv)
    );
    println!(
        "matmul 1024^2 fwd+bwd: median {:.1} ms, {gflops:.1} GFLOP/s",
        median(mm) * 1e3
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("tiny");
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    let device_name = args.get(2).map(String::as_str).unwrap_or("cpu");
    let device = match open_device(device_name) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if which == "kernels" {
        kernels(&device);
        return;
    }
    let config = match which {
        "sd15" => UNetConfig::sd15(),
        "sdxl" => UNetConfig::sdxl(),
        "tiny" => UNetConfig::tiny(),
        other => {
            eprintln!("unknown configuration {other}: sd15, sdxl, tiny or kernels");
            std::process::exit(2);
        }
    };
    let size = if which == "sdxl" { 128 } else { 64 };
    // The warm-up pass also materialises the lazily initialised weights.
    let runs = Runs {
        warmup: 1,
        repeat: runs,
    };
    let times = unet_forward_seconds(&config, size, runs, &device, |i, secs| {
        eprintln!("run {i}: {secs:.3} s")
    });
    println!(
        "{which} UNet forward, 1x4x{size}x{size} latents, {device_name}: median {:.3} s over {} runs, peak RSS {:.0} MiB",
        median(times),
        runs.repeat,
        peak_rss_mib().unwrap_or(f64::NAN)
    );
}
