//! `slider-run pretrain`: trains the tiny base model from scratch on a captioned corpus
//! (resumable from `--work-dir`), writes it, and renders a preview grid of samples.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use miette::{IntoDiagnostic, WrapErr};
use slider_engine::CancelToken;
use slider_models::open_device;
use slider_models::{Checkpoint, StableDiffusion};
use slider_pretrain::caption_gain;
use slider_pretrain::{
    Corpus, PretrainConfig, PretrainError, PreviewConfig, Stage, TinyBase, pretrain, preview,
};

/// Train a small Stable Diffusion base model (VAE, CLIP text encoder, UNet) from scratch.
#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// Corpus folder: `NAME.png` (square RGB) + `NAME.txt` (caption), kohya's layout.
    #[arg(long)]
    corpus: PathBuf,
    /// First write a toy-world corpus of N 64x64 images (drawn from `--seed`) into `--corpus`,
    /// so one command reproduces everything.
    #[arg(long, value_name = "N")]
    generate_corpus: Option<usize>,
    /// Where to write the model (SD1 single-file safetensors, f16).
    #[arg(long)]
    out: PathBuf,
    /// Resumable state, `loss.csv` and `samples.png`. Re-running with the same settings
    /// continues from the last checkpoint.
    #[arg(long, default_value = "pretrain-work")]
    work_dir: PathBuf,
    /// Source of everything random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Autoencoder training steps.
    #[arg(long, default_value_t = 500)]
    vae_steps: usize,
    /// UNet + text encoder training steps. Step counts may change between a stop and the
    /// resume (the schedule then follows the new total).
    #[arg(long, default_value_t = 2000)]
    unet_steps: usize,
    /// Images per UNet step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Images per autoencoder step.
    #[arg(long, default_value_t = 4)]
    vae_batch_size: usize,
    /// The autoencoder trains on random crops of this side (0: whole images; crops are
    /// cheaper but learn colour badly, see docs/pretrain.md).
    #[arg(long, default_value_t = 0)]
    vae_crop: usize,
    /// Peak learning rate of the UNet and text encoder (AdamW, warmup then cosine).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Peak learning rate of the autoencoder.
    #[arg(long, default_value_t = 1e-3)]
    vae_lr: f64,
    /// UNet `model_channels` (multiple of 32).
    #[arg(long, default_value_t = 64)]
    unet_channels: usize,
    /// VAE `ch` (multiple of 32; 64 or more, see the crate docs).
    #[arg(long, default_value_t = 64)]
    vae_channels: usize,
    /// VAE width multipliers per level, comma-separated (three levels: 4x-downsampled
    /// latents).
    #[arg(long, value_delimiter = ',', default_value = "1,1,1")]
    vae_ch_mult: Vec<usize>,
    /// Text encoder width (multiple of its 2 heads).
    #[arg(long, default_value_t = 64)]
    text_width: usize,
    /// Min-SNR weighting of the UNet loss (gamma; 0 turns it off).
    #[arg(long, default_value_t = 5.0)]
    min_snr_gamma: f64,
    /// Save the resumable state every N steps.
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Pause (save the state and exit 0) once the UNet stage has done this many steps, e.g.
    /// to go on later with another `--unet-steps` (docs/pretrain.md: the shipped base was
    /// made so). No effect when the state is already at or past it.
    #[arg(long, value_name = "STEP")]
    stop_at_unet_step: Option<usize>,
    /// Captions of the preview grid's rows (repeatable).
    #[arg(long = "preview-caption")]
    preview_captions: Vec<String>,
    /// Compute device: `cpu`, `wgpu:N` or `cuda:N` (GPU builds only).
    #[arg(long, default_value = "cpu")]
    device: String,
}

const DEFAULT_PREVIEW: &[&str] = &[
    "1girl, red hair, side view",
    "1girl, solo, upper body, front view, looking at viewer, black hair, long hair, blue eyes",
    "1girl, solo, upper body, three-quarter view, blonde hair, ponytail, green eyes",
    "1girl, solo, upper body, side view, profile, blue hair, short hair, red shirt",
];

pub fn run(args: PretrainArgs, quiet: bool) -> miette::Result<ExitCode> {
    let device = open_device(&args.device).into_diagnostic()?;
    let config = PretrainConfig {
        model: TinyBase {
            unet_channels: args.unet_channels,
            vae_channels: args.vae_channels,
            vae_ch_mult: args.vae_ch_mult.clone(),
            text_width: args.text_width,
            ..TinyBase::default()
        },
        seed: args.seed,
        vae_steps: args.vae_steps,
        unet_steps: args.unet_steps,
        vae_batch_size: args.vae_batch_size,
        vae_crop: args.vae_crop,
        batch_size: args.batch_size,
        vae_lr: args.vae_lr,
        lr: args.lr,
        checkpoint_every: args.checkpoint_every,
        min_snr_gamma: (args.min_snr_gamma != 0.0).then_some(args.min_snr_gamma),
        ..PretrainConfig::default()
    };
    if let Some(count) = args.generate_corpus {
        let bar = bar_for(quiet, count as u64);
        bar.set_prefix("corpus");
        slider_toyworld::write_corpus(&args.corpus, count, args.seed, 64, &mut |n| {
            bar.set_position(n as u64)
        })
        .into_diagnostic()
        .wrap_err("writing the toy-world corpus")?;
        bar.finish_and_clear();
    }
    let corpus = Corpus::load(&args.corpus, &device).into_diagnostic()?;
    tracing::info!(images = corpus.len(), size = corpus.size, "corpus loaded");

    let cancel = CancelToken::new();
    cancel
        .cancel_on_signals()
        .map_err(|e| miette::miette!("{e}"))?;
    let stop = AtomicBool::new(false);
    let bar = bar_for(quiet, 0);
    let started = Instant::now();
    let mut stage = None;
    let result = pretrain(
        &config,
        &corpus,
        &args.work_dir,
        &args.out,
        &device,
        |p| {
            if stage != Some(p.stage) {
                stage = Some(p.stage);
                bar.set_prefix(p.stage.to_string());
                bar.set_length(p.total as u64);
                bar.reset();
            }
            bar.set_position(p.step as u64);
            bar.set_message(format!("loss {:.4}", p.loss));
            if p.step % 50 == 0 {
                tracing::info!(stage = %p.stage, step = p.step, loss = p.loss, "pretraining");
            }
            let pause = p.stage == Stage::Unet && Some(p.step) == args.stop_at_unet_step;
            if cancel.is_cancelled() || pause {
                stop.store(true, Ordering::Relaxed);
            }
        },
        &stop,
    );
    bar.finish_and_clear();
    let outcome = match result {
        Ok(o) => o,
        Err(PretrainError::Stopped { stage, step })
            if stage == Stage::Unet && Some(step) == args.stop_at_unet_step =>
        {
            eprintln!(
                "paused at step {step} of the {stage} stage (--stop-at-unet-step); run again to go on"
            );
            return Ok(ExitCode::SUCCESS);
        }
        Err(PretrainError::Stopped { stage, step }) => {
            eprintln!(
                "stopped at step {step} of the {stage} stage; run the same command to resume"
            );
            return Ok(ExitCode::from(130));
        }
        Err(e) => return Err(e).into_diagnostic(),
    };
    let seconds = started.elapsed().as_secs_f64();

    let captions: Vec<String> = if args.preview_captions.is_empty() {
        DEFAULT_PREVIEW.iter().map(|s| s.to_string()).collect()
    } else {
        args.preview_captions.clone()
    };
    let ckpt = Checkpoint::open(&outcome.model).into_diagnostic()?;
    let model = StableDiffusion::load(&ckpt, &device)
        .into_diagnostic()
        .wrap_err("reloading the written model")?;
    let preview_config = PreviewConfig {
        captions: captions.clone(),
        seeds: (0..4).collect(),
        steps: 30,
        cfg_scale: 5.0,
        size: corpus.size,
    };
    let grid = preview::generate(&model, &preview_config, &device).into_diagnostic()?;
    let samples = args.work_dir.join("samples.png");
    preview::write_samples(&samples, &grid, &preview_config).into_diagnostic()?;

    let size = std::fs::metadata(&outcome.model)
        .map(|m| m.len())
        .unwrap_or(0);
    if !quiet {
        println!(
            "model       {} ({:.1} MB)",
            outcome.model.display(),
            size as f64 / 1e6
        );
        println!("losses      {}", outcome.loss_csv.display());
        println!(
            "autoencoder {} (top row originals; mean absolute error {:.3} on [-1, 1])",
            outcome.reconstructions.display(),
            outcome.reconstruction_error
        );
        println!(
            "samples     {} (rows: {}; columns: seeds 0-3, DDIM 30 steps, cfg 5)",
            samples.display(),
            captions.join(" | ")
        );
        println!(
            "final loss  vae {:.4}, unet {:.4} (mean of the last 50 steps); latent std before scaling {:.3}",
            outcome.final_vae_loss, outcome.final_unet_loss, outcome.latent_std
        );
        let gain = outcome.caption_gain;
        println!(
            "captions    the right caption lowers the denoising loss by {:.1}% ({:.4} vs {:.4} with another image's caption; {} probes, t {}..{})",
            100.0 * gain.gain(),
            gain.own,
            gain.other,
            caption_gain::PROBES,
            caption_gain::TIMESTEPS.start,
            caption_gain::TIMESTEPS.end
        );
        println!(
            "time        {seconds:.0} s this invocation ({} vae + {} unet steps in all)",
            config.vae_steps, config.unet_steps
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bar_for(quiet: bool, len: u64) -> ProgressBar {
    let bar = if quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>6} [{bar:30}] {pos}/{len} {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}
