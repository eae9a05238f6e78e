//! `slider-run`: argument parsing, logging, and error rendering. No logic lives here that a
//! test would want to call; each subcommand family is one module.

mod bake_cmd;
mod bench_torch;
mod bench_train;
mod lora_cmd;
mod model_cmd;
mod pipeline_cmd;
mod pretrain_cmd;
mod sample_cmd;
mod toyworld_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Declarative, cached, resumable slider-LoRA pipelines.
#[derive(Parser, Debug)]
#[command(name = "slider-run", version, about)]
struct Cli {
    /// Increase log detail (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only print errors.
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(flatten)]
    run: pipeline_cmd::RunArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Pipeline(pipeline_cmd::PipelineCommand),
    #[command(flatten)]
    Lora(lora_cmd::LoraCommand),
    /// Bake LoRAs into a checkpoint, as kohya's `networks/merge_lora.py` /
    /// `sdxl_merge_lora.py` with `--sd_model`.
    ///
    /// W += ratio * alpha / rank * up @ down for every module of every LoRA (LoCon and text
    /// encoders included), in the checkpoint's own keys, order and dtypes unless
    /// --save_precision is given. Streams the checkpoint tensor by tensor; every LoRA module
    /// must fit the checkpoint, or nothing is written and the error names the module.
    #[command(name = "merge-into-model")]
    MergeIntoModel(bake_cmd::MergeIntoModelArgs),
    /// Base models: inspect checkpoints, run forward passes for parity checks.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Train the tiny base model (VAE, text encoder, UNet) from scratch on a captioned corpus.
    Pretrain(pretrain_cmd::PretrainArgs),
    /// Generate one image from a base model, a prompt and LoRAs at given weights (PNG with
    /// AUTOMATIC1111-style `parameters`).
    Sample(sample_cmd::SampleArgs),
    /// The toy eye-size world: training pairs, a captioned corpus, single images.
    #[command(subcommand)]
    Toyworld(toyworld_cmd::ToyworldCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The one-shot commands that print reports (`inspect | head`) end quietly when their
    // reader goes, as other Unix tools do, instead of panicking on the failed print (Rust
    // ignores SIGPIPE). The runner and the worker keep ignoring it: a worker that dies must
    // be an EPIPE error for the runner, not a signal that kills it.
    if matches!(
        cli.command,
        Some(Command::Lora(_) | Command::Model(_) | Command::Toyworld(_))
    ) {
        // SAFETY: restoring a signal's default disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        Some(Command::Pipeline(cmd)) => pipeline_cmd::run(cmd, cli.quiet),
        Some(Command::Lora(cmd)) => lora_cmd::run(cmd, cli.verbose > 0),
        Some(Command::MergeIntoModel(args)) => bake_cmd::run(args),
        Some(Command::Model(cmd)) => model_cmd::run(cmd),
        Some(Command::Pretrain(args)) => pretrain_cmd::run(args, cli.quiet),
        Some(Command::Sample(args)) => sample_cmd::run(args, cli.quiet),
        Some(Command::Toyworld(cmd)) => toyworld_cmd::run(cmd, cli.quiet),
        None => pipeline_cmd::run_recipe(cli.run, cli.quiet),
    };
    match result {
        Ok(code) => code,
        Err(report) => {
            eprintln!("{report:?}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
