//! `model inspect` and `model forward`: base checkpoints, for users and parity checks.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum ModelCommand {}

pub fn run(cmd: ModelCommand) -> miette::Result<ExitCode> {
    match cmd {}
}
