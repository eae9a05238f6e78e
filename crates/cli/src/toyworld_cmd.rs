//! `toyworld pairs | corpus | render | train-eye-meter`: the toy eye-size world on disk
//! (training pairs, a captioned pretraining corpus, single images) and the eye meter that
//! measures eye size in generated images.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use miette::{IntoDiagnostic, WrapErr};
use slider_evaluate::eye_meter::{self, EyeMeterTrainConfig, ViewAccuracy};
use slider_toyworld::{
    Identity, PAIR_SEED, View, caption, render, save_png, write_corpus, write_pairs,
};

#[derive(Subcommand, Debug)]
pub enum ToyworldCommand {
    /// Write the slider method's training pairs: one identity, small and big eyes, at front,
    /// 45 degrees and side view (`{small,big}_{front,45deg,side}.png`).
    Pairs {
        /// Output folder (the shipped pairs live in `assets/pairs`).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the identity.
        #[arg(long, default_value_t = PAIR_SEED)]
        seed: u64,
        /// Image width and height in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
    },
    /// Write a captioned corpus in kohya's dataset layout (`NAME.png` + `NAME.txt`) and
    /// `labels.csv` with the true eye size and eye boxes: identities in all three views, eye
    /// sizes uniform over [0, 1].
    Corpus {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Number of images (three per identity).
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image width and height in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
    },
    /// Render one image and print its caption and eye boxes.
    Render {
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the identity.
        #[arg(long, default_value_t = PAIR_SEED)]
        seed: u64,
        /// front, 45deg or side.
        #[arg(long, default_value = "front")]
        view: View,
        /// Eye size in [0, 1].
        #[arg(long, default_value_t = 0.5)]
        eye_size: f32,
        /// Image width and height in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
    },
    /// Train the eye meter (a small CNN reading eye size and eye boxes) on freshly rendered,
    /// augmented toy images, score it on held-out images and write its weights.
    TrainEyeMeter {
        /// Output safetensors file (the shipped meter: assets/eye-meter/eye-meter.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Seeds the initial weights and every training image.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Optimizer steps.
        #[arg(long, default_value_t = EyeMeterTrainConfig::default().steps)]
        steps: usize,
        /// Images per step.
        #[arg(long, default_value_t = EyeMeterTrainConfig::default().batch)]
        batch: usize,
        /// Held-out images per view for the accuracy report.
        #[arg(long, default_value_t = 200)]
        eval_images: usize,
        /// Compute device: `cpu`, `wgpu:N` or `cuda:N` (GPU builds only).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

pub fn run(cmd: ToyworldCommand, quiet: bool) -> miette::Result<ExitCode> {
    match cmd {
        ToyworldCommand::Pairs { out, seed, size } => {
            let written = write_pairs(&out, seed, size).into_diagnostic()?;
            if !quiet {
                println!(
                    "wrote {} training images to {}",
                    written.len(),
                    out.display()
                );
            }
        }
        ToyworldCommand::Corpus {
            out,
            count,
            seed,
            size,
        } => corpus(&out, count, seed, size, quiet)?,
        ToyworldCommand::Render {
            out,
            seed,
            view,
            eye_size,
            size,
        } => {
            let identity = Identity::from_seed(seed);
            let drawn = render(&identity, view, eye_size, size);
            save_png(&out, &drawn.image)
                .into_diagnostic()
                .wrap_err("writing the image")?;
            if !quiet {
                println!("{}", caption(&identity, view, eye_size));
                for b in &drawn.eye_boxes {
                    println!("eye box: {:.2} {:.2} {:.2} {:.2}", b[0], b[1], b[2], b[3]);
                }
            }
        }
        ToyworldCommand::TrainEyeMeter {
            out,
            seed,
            steps,
            batch,
            eval_images,
            device,
        } => {
            let config = EyeMeterTrainConfig {
                seed,
                steps,
                batch,
                ..Default::default()
            };
            train_meter(&out, &config, eval_images, &device, quiet)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn train_meter(
    out: &Path,
    config: &EyeMeterTrainConfig,
    eval_images: usize,
    device: &str,
    quiet: bool,
) -> miette::Result<()> {
    let device = slider_models::open_device(device).into_diagnostic()?;
    let bar = if quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(config.steps as u64)
    };
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} steps {msg} {eta}") {
        bar.set_style(style);
    }
    let (meter, report) = eye_meter::train_eye_meter(config, &device, &mut |p| {
        bar.set_position(p.step as u64);
        bar.set_message(format!("loss {:.4}", p.loss));
    })
    .into_diagnostic()
    .wrap_err("training the eye meter")?;
    bar.finish_and_clear();
    let tail = report.losses.len().clamp(1, 50);
    let final_loss = report.losses.iter().rev().take(tail).sum::<f32>() / tail as f32;
    let plain = eye_meter::evaluate(&meter, config.seed, eval_images, false).into_diagnostic()?;
    let augmented =
        eye_meter::evaluate(&meter, config.seed, eval_images, true).into_diagnostic()?;
    let table = accuracy_table(&plain, &augmented);
    let extra = vec![
        (
            "train_seconds".to_string(),
            format!("{:.0}", report.seconds),
        ),
        ("final_loss".to_string(), format!("{final_loss:.5}")),
        ("held_out".to_string(), table.clone()),
    ];
    meter
        .save(out, &extra)
        .into_diagnostic()
        .wrap_err_with(|| format!("writing {}", out.display()))?;
    if !quiet {
        println!(
            "trained {} parameters for {} steps x {} images in {:.0} s (loss of the last {tail} steps {final_loss:.4})",
            report.parameters, report.steps, config.batch, report.seconds
        );
        println!("held-out accuracy ({eval_images} images per view):\n{table}");
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// A markdown table of held-out accuracy, plain renders then augmented ones.
fn accuracy_table(plain: &[ViewAccuracy], augmented: &[ViewAccuracy]) -> String {
    let mut out = String::from(
        "| images | view | eye size MAE | Spearman | eye count right | box MAE (px) |\n\
         |---|---|---|---|---|---|\n",
    );
    for (label, rows) in [("rendered", plain), ("augmented", augmented)] {
        for r in rows {
            out.push_str(&format!(
                "| {label} | {} | {:.3} | {:.3} | {:.1}% | {:.2} |\n",
                r.view,
                r.mae,
                r.spearman,
                100.0 * r.eye_count_accuracy,
                r.box_mae_px
            ));
        }
    }
    out
}

fn corpus(out: &Path, count: usize, seed: u64, size: u32, quiet: bool) -> miette::Result<()> {
    let bar = if quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(count as u64)
    };
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} images {eta}") {
        bar.set_style(style);
    }
    let summary = write_corpus(out, count, seed, size, &mut |n| bar.set_position(n as u64))
        .into_diagnostic()
        .wrap_err_with(|| format!("writing the corpus to {}", out.display()))?;
    bar.finish_and_clear();
    if !quiet {
        println!(
            "wrote {} captioned images and {} to {}",
            summary.images,
            summary
                .labels
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            out.display()
        );
    }
    Ok(())
}
