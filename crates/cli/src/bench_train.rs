//! `slider-run bench train`: seconds per training step and peak memory of one LoRA training
//! configuration next to the plain one (f32, no recomputation), on a random full-size
//! checkpoint from our writer. Each configuration runs in a child process of its own, so its
//! peak resident set (`VmHWM`, which stands in for device memory: the same tensors live there)
//! is its alone. `--device` runs it on a GPU backend (`wgpu:auto`, `cuda:0`, in a build with
//! that feature); there the backend allocator's high-water mark is the device memory.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use slider_models::bench::median;
use slider_models::checkpoint::{ModelSpec, StoreDtype, write_random_checkpoint};
use slider_models::device::open_device;
use slider_protocol::names::MixedPrecision;
use slider_trainer::bench::{gradient_image, method_config};
use slider_trainer::{TrainConfig, train};

/// The base models `bench train` can write.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BenchModel {
    /// The embedded default's architecture (tiny UNet, full CLIP-L).
    Tiny,
    /// Stable Diffusion 1.5 (860 M UNet parameters).
    Sd15,
    /// SDXL (2.6 B UNet parameters, two text encoders).
    Sdxl,
}

impl BenchModel {
    fn spec(self) -> ModelSpec {
        match self {
            BenchModel::Tiny => ModelSpec::tiny(),
            BenchModel::Sd15 => ModelSpec::sd15(),
            BenchModel::Sdxl => ModelSpec::sdxl(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            BenchModel::Tiny => "tiny",
            BenchModel::Sd15 => "sd15",
            BenchModel::Sdxl => "sdxl",
        }
    }
}

/// Options of `bench train` (flattened into `bench`'s arguments).
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// `train`: the architecture of the random checkpoint.
    #[arg(long, value_enum, default_value = "sd15")]
    pub model: BenchModel,
    /// `train`: image side in pixels [default: 512, 1024 for sdxl, 64 for tiny].
    #[arg(long, value_name = "PX")]
    pub resolution: Option<usize>,
    /// `train`: `mixed_precision` of the measured row (the frozen UNet and VAE in that dtype).
    #[arg(long, value_name = "no|fp16|bf16", default_value = "no", value_parser = parse_precision)]
    pub mixed_precision: MixedPrecision,
    /// `train`: `gradient_checkpointing` in the measured row.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// `train`: `no_half_vae` in the measured row (the VAE in f32 for the one-time encode).
    #[arg(long)]
    pub no_half_vae: bool,
    /// `train`: timed steps after one warm-up step.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub steps: usize,
    /// `train`: leave out the plain row (f32, no recomputation).
    #[arg(long)]
    pub no_baseline: bool,
    /// `train`: the device to train on (`cpu`, or `wgpu:auto`, `wgpu:cpu`, `wgpu:N`, `cuda:N`
    /// in a build with that backend's feature).
    #[arg(long, value_name = "SPEC", default_value = "cpu")]
    pub device: String,
    /// `train`: a checkpoint to train on instead of a random one of `--model`'s layout.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Internal: run the job in this file and print its report line.
    #[arg(long, value_name = "FILE", hide = true)]
    pub train_job: Option<PathBuf>,
}

fn parse_precision(s: &str) -> std::result::Result<MixedPrecision, String> {
    MixedPrecision::from_name(s).ok_or_else(|| {
        format!(
            "unknown precision {s:?}: one of {}",
            MixedPrecision::names().join(", ")
        )
    })
}

/// One configuration, as handed to the child process.
#[derive(Debug, Serialize, Deserialize)]
struct ChildJob {
    config: TrainConfig,
    device: String,
    work: PathBuf,
    out: PathBuf,
}

/// What a child reports on its last stdout line.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    /// Seconds from the start to the end of the first step (loading, caching, one step).
    first_step_s: f64,
    /// Seconds of each timed step.
    step_s: Vec<f64>,
    /// Peak resident set of the whole run (loading included), bytes.
    peak_rss: u64,
    /// Peak resident set of the timed steps alone (the high-water mark is reset after the
    /// warm-up step, when the VAE and text encoders are already freed), bytes.
    step_peak_rss: Option<u64>,
    /// On a GPU backend, the most its allocator held from the device after any step, bytes.
    device_reserved: Option<u64>,
}

/// Runs the benchmark (or, with `--train-job`, one row of it) and prints its table.
pub fn run(bench: &TrainArgs, dir: Option<&Path>) -> Result<ExitCode> {
    let dir_given = dir;
    if let Some(job) = &bench.train_job {
        return bench_train_child(job);
    }
    let resolution = bench.resolution.unwrap_or(match bench.model {
        BenchModel::Tiny => 64,
        BenchModel::Sd15 => 512,
        BenchModel::Sdxl => 1024,
    });
    if bench.steps == 0 {
        bail!("--steps must be at least 1");
    }
    // Checked here, opened only in each child: a GPU context in this process too would hold
    // device memory while the child is measured.
    slider_models::parse_device(&bench.device)?;
    let spec = bench.model.spec();
    let multiple = spec.pixel_multiple();
    if resolution == 0 || !resolution.is_multiple_of(multiple) {
        bail!(
            "--resolution {} must be a positive multiple of {multiple} for {}",
            resolution,
            bench.model.name()
        );
    }
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => std::env::temp_dir().join(format!("slider-bench-train-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let base = match &bench.checkpoint {
        Some(path) => path.clone(),
        None => {
            let path = dir.join(format!("{}-random.safetensors", bench.model.name()));
            if !path.exists() {
                let bar = crate::lora_cmd::spinner(&format!(
                    "writing a random {} checkpoint (f16)",
                    bench.model.name()
                ));
                write_random_checkpoint(&path, &spec, StoreDtype::F16, 7)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                bar.finish_and_clear();
            }
            path
        }
    };
    let image = dir.join("image.png");
    gradient_image(resolution)
        .save(&image)
        .with_context(|| format!("cannot write {}", image.display()))?;

    let mut rows = vec![(bench.mixed_precision, bench.gradient_checkpointing)];
    if !bench.no_baseline && rows[0] != (MixedPrecision::No, false) {
        rows.push((MixedPrecision::No, false));
    }
    let vae_factor = 1usize
        << spec
            .vae
            .as_ref()
            .map_or(0, |v| v.ch_mult.len().saturating_sub(1));
    let latent = resolution / vae_factor;
    println!(
        "{} at {resolution} px ({latent}x{latent} latents), batch 1, rank 4 on kohya's targets, \
         CAME, {} timed step(s) after one warm-up step, on {}; each row in its own \
         process",
        bench.model.name(),
        bench.steps,
        bench.device.trim()
    );
    println!(
        "| mixed_precision | gradient_checkpointing | load + first step | s/step | peak RSS, \
         whole run | peak RSS, timed steps | device memory (allocator) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (i, &(precision, recompute)) in rows.iter().enumerate() {
        let config = TrainConfig {
            mixed_precision: precision,
            gradient_checkpointing: recompute,
            no_half_vae: bench.no_half_vae && precision != MixedPrecision::No,
            ..method_config(&base, &image, resolution, 1 + bench.steps)
        };
        let job = ChildJob {
            config,
            device: bench.device.clone(),
            work: dir.join(format!("work-{i}")),
            out: dir.join(format!("out-{i}")),
        };
        let _ = std::fs::remove_dir_all(&job.work);
        let report = run_child(&dir.join(format!("job-{i}.json")), &job)?;
        let median = median(&report.step_s).unwrap_or(f64::NAN);
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        println!(
            "| {} | {} | {:.1} s | {:.2} | {:.2} GiB | {} | {} |",
            precision.name(),
            recompute,
            report.first_step_s,
            median,
            gib(report.peak_rss),
            report
                .step_peak_rss
                .map_or("-".to_owned(), |b| format!("{:.2} GiB", gib(b))),
            report
                .device_reserved
                .map_or("-".to_owned(), |b| format!("{:.2} GiB", gib(b)))
        );
    }
    if dir_given.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one configuration in a child process (`bench train --child JOB`) and reads its report.
fn run_child(job_path: &Path, job: &ChildJob) -> Result<ChildReport> {
    let bytes = serde_json::to_vec(job)?;
    slider_atomic::write(job_path, &bytes)
        .with_context(|| format!("cannot write {}", job_path.display()))?;
    let exe = std::env::current_exe().context("cannot find this program")?;
    let bar = crate::lora_cmd::spinner(&format!(
        "training {} step(s): mixed_precision {}, gradient_checkpointing {}",
        job.config.max_train_steps,
        job.config.mixed_precision.name(),
        job.config.gradient_checkpointing
    ));
    let output = Command::new(exe)
        .args(["bench", "train", "--train-job"])
        .arg(job_path)
        .stdin(Stdio::null())
        .stderr(if std::io::stderr().is_terminal() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .output()
        .context("cannot start the benchmark's child process")?;
    bar.finish_and_clear();
    if !output.status.success() {
        bail!(
            "the training step failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("the child's report {last:?}"))
}

/// The child's side: trains `job`, timing every step, and prints its report as JSON.
fn bench_train_child(job_path: &Path) -> Result<ExitCode> {
    let bytes =
        std::fs::read(job_path).with_context(|| format!("cannot read {}", job_path.display()))?;
    let job: ChildJob = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a benchmark job", job_path.display()))?;
    let device = open_device(&job.device)?;
    let started = Instant::now();
    let mut marks = Vec::new();
    let mut device_reserved: Option<u64> = None;
    let mut whole_run_peak = None;
    let stop = AtomicBool::new(false);
    train(
        &job.config,
        &job.work,
        &job.out,
        &device,
        |_| {
            if marks.is_empty() {
                whole_run_peak = peak_rss();
                reset_peak_rss();
            }
            // Where the backend has a pool (the GPU ones), what it holds once the step is done:
            // the step's tensors are back in the pool, which keeps them.
            if let Some(usage) = device.memory_pool_usage() {
                device_reserved = Some(device_reserved.unwrap_or(0).max(usage.bytes_reserved));
            }
            marks.push(Instant::now());
        },
        &stop,
    )?;
    let first_step_s = marks
        .first()
        .map_or(f64::NAN, |t| (*t - started).as_secs_f64());
    let step_s = marks
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let report = ChildReport {
        first_step_s,
        step_s,
        peak_rss: whole_run_peak.max(peak_rss()).unwrap_or(0),
        step_peak_rss: (marks.len() > 1).then(peak_rss).flatten(),
        device_reserved,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// This process's peak resident set in bytes (`VmHWM`).
fn peak_rss() -> Option<u64> {
    slider_models::bench::peak_rss_mib().map(|mib| (mib * 1_048_576.0) as u64)
}

/// Starts the peak resident set again from the current one (Linux: `5` to `clear_refs`).
fn reset_peak_rss() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        tracing::warn!("cannot reset the peak resident set: {e}");
    }
}
