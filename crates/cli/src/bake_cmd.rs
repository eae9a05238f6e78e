//! `merge-into-model`: LoRAs baked into a checkpoint, with the flag names of kohya's
//! `networks/merge_lora.py` / `sdxl_merge_lora.py` (snake_case; kebab-case accepted).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use miette::{IntoDiagnostic, Result, miette};
use slider_bake::BakeOptions;
use slider_lora::Precision;

#[derive(Args, Debug)]
pub struct MergeIntoModelArgs {
    /// The checkpoint (single-file SD1.x / SDXL safetensors, original layout).
    #[arg(long = "sd_model", visible_aliases = ["sd-model", "ckpt_path", "ckpt-path"])]
    sd_model: PathBuf,
    /// LoRA files to bake in.
    #[arg(long, num_args = 1.., required = true)]
    models: Vec<PathBuf>,
    /// One ratio per model (negative values subtract).
    #[arg(long, num_args = 1.., required = true, allow_negative_numbers = true)]
    ratios: Vec<f64>,
    /// Output checkpoint.
    #[arg(long = "save_to", visible_alias = "save-to")]
    save_to: PathBuf,
    /// Store every float tensor as float, fp16 or bf16 [default: each tensor's own dtype].
    #[arg(long = "save_precision", visible_alias = "save-precision", value_parser = parse_precision)]
    save_precision: Option<Precision>,
}

fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    s.parse().map_err(|e: slider_lora::LoraError| e.to_string())
}

pub fn run(args: MergeIntoModelArgs) -> Result<ExitCode> {
    if args.models.len() != args.ratios.len() {
        return Err(miette!(
            "{} models but {} ratios: give one ratio per model, in the same order",
            args.models.len(),
            args.ratios.len()
        ));
    }
    let models: Vec<(PathBuf, f64)> = args.models.into_iter().zip(args.ratios).collect();
    let start = Instant::now();
    let report = slider_bake::merge_into_model(
        &args.sd_model,
        &models,
        &args.save_to,
        &BakeOptions {
            save_precision: args.save_precision,
        },
    )
    .into_diagnostic()?;
    println!(
        "wrote {}: {} LoRA modules baked into {} of {} tensors ({:.1} MB) in {:.1?}",
        args.save_to.display(),
        report.modules,
        report.adapted_tensors,
        report.tensors,
        report.bytes as f64 / 1e6,
        start.elapsed()
    );
    Ok(ExitCode::SUCCESS)
}
