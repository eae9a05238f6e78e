//! `toyworld pairs | corpus | render`: the toy eye-size world on disk (training pairs, a
//! captioned pretraining corpus, single images).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use miette::{IntoDiagnostic, WrapErr};
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
    }
    Ok(ExitCode::SUCCESS)
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
