//! The `command` kind: runs an external program (any trainer, converter or script) with
//! `{name}` placeholders replaced by the paths of its declared inputs and outputs. The
//! program runs in a scratch dir; every declared output must exist when it exits 0.
//! `{{` and `}}` are literal braces (`slider_recipe::substitute_placeholders`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use slider_recipe::{CommandParams, NodeParams, substitute_placeholders};

use crate::child;
use crate::executor::{ExecError, Executor, Job, Produced};

/// The code version of the `command` kind, wherever its nodes run.
pub const COMMAND_CODE_VERSION: u32 = 1;

/// Runs `command` nodes.
pub struct CommandExecutor;

impl Executor for CommandExecutor {
    fn kind(&self) -> &str {
        "command"
    }

    fn code_version(&self) -> u32 {
        COMMAND_CODE_VERSION
    }

    fn execute(&self, job: &Job) -> Result<Vec<Produced>, ExecError> {
        let p = command_params(job)?;
        let line = CommandLine::new(p, job, job.out_dir)?;
        job.log.line(&line.shown());
        let stdout = job
            .log
            .clone_file()
            .map_err(|e| failed("opening", job.log.path(), e))?;
        let stderr = job
            .log
            .clone_file()
            .map_err(|e| failed("opening", job.log.path(), e))?;
        let mut cmd = Command::new(&line.program);
        cmd.args(&line.args)
            .current_dir(job.scratch_dir)
            .env("SLIDER_NODE", job.node)
            .env("SLIDER_OUT_DIR", job.out_dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        child::detach_and_tie(&mut cmd);
        let mut proc = cmd.spawn().map_err(|e| {
            ExecError::Failed(format!("cannot start `{}`: {e}", line.program.display()))
        })?;
        let status = child::wait_or_cancel(&mut proc, job.cancel).map_err(|e| {
            ExecError::Failed(format!("waiting for `{}`: {e}", line.program.display()))
        })?;
        let Some(status) = status else {
            return Err(ExecError::Cancelled);
        };
        if !status.success() {
            return Err(ExecError::Failed(
                line.failure(&status.to_string(), job.log.path()),
            ));
        }
        line.outputs(p, job.out_dir)
    }
}

/// The parameters of a command node.
pub(crate) fn command_params<'a>(job: &Job<'a>) -> Result<&'a CommandParams, ExecError> {
    match job.params {
        NodeParams::Command(p) => Ok(p),
        _ => Err(ExecError::Failed(format!(
            "`{}` is not a command node",
            job.node
        ))),
    }
}

/// A command node's program and arguments with every placeholder filled in, its outputs
/// under `out_root` (the node's temp dir here, the job folder's `out/` on a cluster).
pub(crate) struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl CommandLine {
    pub fn new(p: &CommandParams, job: &Job, out_root: &Path) -> Result<CommandLine, ExecError> {
        let places = placeholders(p, job, out_root)?;
        for (_, file) in &p.outputs {
            if let Some(parent) = out_root.join(file).parent() {
                fs::create_dir_all(parent).map_err(|e| failed("creating", parent, e))?;
            }
        }
        let argv = p
            .run
            .iter()
            .map(|a| substitute_placeholders(a, |n| places.get(n).cloned()))
            .collect::<Result<Vec<String>, String>>()
            .map_err(|name| {
                ExecError::Failed(format!("unknown placeholder `{{{name}}}` in `run`"))
            })?;
        let Some((program, args)) = argv.split_first() else {
            return Err(ExecError::Failed("`run` is empty".into()));
        };
        Ok(CommandLine {
            program: resolve_program(program, job.root),
            args: args.to_vec(),
        })
    }

    /// The line as the node's log shows it.
    pub fn shown(&self) -> String {
        format!("$ {} {}", self.program.display(), self.args.join(" "))
    }

    /// Why a program that ended with `status` failed, with the last lines it printed.
    pub fn failure(&self, status: &str, log: &Path) -> String {
        let tail = log_tail(log, 3);
        format!(
            "`{}` failed ({status}){}",
            self.program.display(),
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            }
        )
    }

    /// The declared outputs, each checked to exist under `out_root`.
    pub fn outputs(&self, p: &CommandParams, out_root: &Path) -> Result<Vec<Produced>, ExecError> {
        let mut produced = Vec::new();
        for (name, file) in &p.outputs {
            if !out_root.join(file).is_file() {
                return Err(ExecError::Failed(format!(
                    "`{}` exited successfully but did not create its declared output `{name}` ({{{name}}} = {})",
                    self.program.display(),
                    out_root.join(file).display()
                )));
            }
            produced.push(Produced {
                name: name.clone(),
                file: file.clone(),
            });
        }
        Ok(produced)
    }
}

fn failed(what: &str, path: &Path, e: std::io::Error) -> ExecError {
    ExecError::Failed(format!("{what} {}: {e}", path.display()))
}

/// A program given as a relative path with a `/` (`scripts/train.sh`) is relative to the
/// recipe's directory; a bare name is looked up on PATH.
fn resolve_program(program: &str, root: &Path) -> PathBuf {
    let p = Path::new(program);
    if p.is_relative() && program.contains('/') {
        root.join(p)
    } else {
        p.to_path_buf()
    }
}

/// Placeholder name -> path, for declared inputs and outputs.
fn placeholders(
    p: &CommandParams,
    job: &Job,
    out_root: &Path,
) -> Result<BTreeMap<String, String>, ExecError> {
    let mut map = BTreeMap::new();
    for (name, input) in &p.inputs {
        map.insert(name.clone(), job.input_path(input)?.display().to_string());
    }
    for (name, file) in &p.outputs {
        map.insert(name.clone(), out_root.join(file).display().to_string());
    }
    Ok(map)
}

/// The last `n` non-empty lines the program printed, for the error message.
fn log_tail(log: &Path, n: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("== ") && !l.starts_with("$ "))
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
