//! `slider-run sample`: one image from a base checkpoint, a prompt and LoRAs at given weights,
//! written as a PNG with AUTOMATIC1111's `parameters` text.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use miette::{IntoDiagnostic, WrapErr};
use serde_json::json;
use slider_models::open_device;
use slider_models::sample::{Generator, SampleJob, SamplerKind};

/// Arguments of `slider-run sample`.
#[derive(Args, Debug)]
pub struct SampleArgs {
    /// The base model: a single-file SD1.x or SDXL checkpoint (`.safetensors`).
    #[arg(long)]
    pub base: PathBuf,
    /// The base model's diffusers `config.json` (UNet) or a diffusers-layout folder
    /// (`unet/`, `vae/`, `text_encoder/`...): what the checkpoint's shapes cannot tell.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from (classifier-free guidance's unconditional half).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Seed of the initial noise (and of an ancestral sampler's noise).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Guidance scale (at 1 or below the negative prompt is not used).
    #[arg(long, default_value_t = 7.0)]
    pub cfg_scale: f64,
    /// Sampler: euler, euler_a, ddim, dpmpp_2m (DPM++ 2M Karras).
    #[arg(long, default_value = "euler_a")]
    pub sampler: SamplerKind,
    /// Image width in pixels (a multiple of the model's downsampling: 8 for the tiny model,
    /// 64 for SD1.5, 32 for SDXL).
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Image height in pixels.
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// A LoRA to apply, `FILE` or `FILE:WEIGHT` (weight 1 by default); repeatable, applied in
    /// order.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<String>,
    /// Where to write the PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Compute device: `cpu`, `wgpu:N` or `cuda:N` (GPU builds only).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: SampleArgs, quiet: bool) -> miette::Result<ExitCode> {
    let loras = args
        .loras
        .iter()
        .map(|spec| parse_lora(spec))
        .collect::<miette::Result<Vec<_>>>()?;
    let files = loras
        .iter()
        .map(|(path, _)| {
            slider_lora::Lora::load(path)
                .into_diagnostic()
                .wrap_err_with(|| format!("reading the LoRA {}", path.display()))
        })
        .collect::<miette::Result<Vec<_>>>()?;
    let weighted: Vec<(&slider_lora::Lora, f64)> = files
        .iter()
        .zip(&loras)
        .map(|(f, (_, w))| (f, *w))
        .collect();

    let device = open_device(&args.device).into_diagnostic()?;
    let config = crate::model_cmd::base_config(args.config.as_deref())?;
    let started = Instant::now();
    let generator = Generator::load_with(&args.base, &config, &device)
        .into_diagnostic()
        .wrap_err_with(|| format!("loading {}", args.base.display()))?;
    let loaded_s = started.elapsed().as_secs_f64();
    let job = SampleJob {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        seed: args.seed,
        steps: args.steps,
        cfg_scale: args.cfg_scale,
        sampler: args.sampler,
        width: args.width,
        height: args.height,
    };
    let bar = if quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(job.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("sample [{bar:30}] {pos}/{len} steps ({eta})")
            .into_diagnostic()?,
    );
    let sampling = Instant::now();
    let image = generator
        .generate_with_progress(&job, &weighted, |step, _| bar.set_position(step as u64))
        .into_diagnostic()?;
    bar.finish_and_clear();
    let sampled_s = sampling.elapsed().as_secs_f64();

    let mut parameters = job.a1111_parameters();
    if !loras.is_empty() {
        let list: Vec<String> = loras
            .iter()
            .map(|(p, w)| format!("{}:{w}", p.display()))
            .collect();
        parameters.push_str(&format!(", LoRAs: {}", list.join(" ")));
    }
    let settings = json!({
        "kind": "sample",
        "base": args.base,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "steps": job.steps,
        "cfg_scale": job.cfg_scale,
        "sampler": job.sampler.recipe_name(),
        "width": job.width,
        "height": job.height,
        "loras": loras.iter().map(|(p, w)| json!({"file": p, "weight": w})).collect::<Vec<_>>(),
    });
    let text = [
        ("parameters".to_owned(), parameters),
        ("slider-run".to_owned(), settings.to_string()),
    ];
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .into_diagnostic()
            .wrap_err_with(|| format!("creating {}", dir.display()))?;
    }
    slider_grid::write_png(&args.out, &image, &text).into_diagnostic()?;
    if !quiet {
        println!(
            "wrote {} ({}x{}, {} {} steps): model loaded in {loaded_s:.2} s, sampled in {sampled_s:.2} s",
            args.out.display(),
            job.width,
            job.height,
            job.sampler,
            job.steps,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `FILE` or `FILE:WEIGHT`; the weight is whatever follows the last `:` when it parses as a
/// number, so paths with colons still work.
fn parse_lora(spec: &str) -> miette::Result<(PathBuf, f64)> {
    if let Some((file, weight)) = spec.rsplit_once(':')
        && let Ok(w) = weight.parse::<f64>()
    {
        if !w.is_finite() {
            return Err(miette::miette!(
                "--lora {spec}: the weight must be a finite number"
            ));
        }
        return Ok((PathBuf::from(file), w));
    }
    Ok((PathBuf::from(spec), 1.0))
}
