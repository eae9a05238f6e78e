//! Running recipes: run (the default), status, explain, verify, gc, and the worker process.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

/// Arguments of the default command: `slider-run RECIPE`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The recipe to run.
    pub recipe: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum PipelineCommand {}

pub fn run(cmd: PipelineCommand) -> miette::Result<ExitCode> {
    match cmd {}
}

pub fn run_recipe(args: RunArgs, _quiet: bool) -> miette::Result<ExitCode> {
    match args.recipe {
        Some(recipe) => Err(miette::miette!(
            "running recipes is not built yet ({})",
            recipe.display()
        )),
        None => Err(miette::miette!(
            "no recipe given; try `slider-run recipes/eyesize.yaml` or `slider-run --help`"
        )),
    }
}
