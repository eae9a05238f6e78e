//! `svd-merge`, `merge`, `resize`, `inspect`, `bench lora`: the LoRA tools standalone.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum LoraCommand {}

pub fn run(cmd: LoraCommand, _verbose: bool) -> miette::Result<ExitCode> {
    match cmd {}
}
