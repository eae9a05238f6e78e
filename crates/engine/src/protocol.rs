//! The worker protocol and the engine's worker pool.
//!
//! A worker (`slider-run worker --device D`) speaks JSON lines: one JSON object per line on
//! stdin (from the engine) and stdout (to the engine); anything else goes to stderr.
//!
//! ```text
//! worker -> engine  {"type":"hello","kinds":["train"],"device":"cpu","version":"0.1.0"}
//! engine -> worker  {"type":"run","node":"small_front","key":"…","kind":"train","params":{…},
//!                    "inputs":[{"input":{"File":"/…/a.png"},"path":"/…/a.png"}],
//!                    "work_dir":"/…/work/<key>","output_dir":"/…/tmp/<key>-…"}
//! worker -> engine  {"type":"progress","step":10,"total":400,"loss":0.12,"message":"…"}
//! worker -> engine  {"type":"result","outputs":[{"name":"lora","file":"lora.safetensors"}]}
//!                or {"type":"error","message":"…"}
//! engine -> worker  {"type":"shutdown"}            (or stdin closed: the worker exits)
//! ```
//! Output files are written inside `output_dir`; the first output is the primary one. The
//! engine runs one worker per device, one request at a time; a worker that dies fails its
//! node (not the run) and is restarted for the next request.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use slider_recipe::Input;

use crate::cancel::CancelToken;
use crate::child;
use crate::executor::{ExecError, Executor, Job, Placement, Produced, Progress};

/// How long a starting worker may take to say hello (loading a backend can be slow).
const HELLO_TIMEOUT: Duration = Duration::from_secs(120);

/// A message from a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    Hello {
        kinds: Vec<String>,
        device: String,
        #[serde(default)]
        version: String,
    },
    Progress(Progress),
    Result {
        outputs: Vec<WorkerOutput>,
    },
    Error {
        message: String,
    },
}

/// One output file a worker wrote into `output_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerOutput {
    pub name: String,
    pub file: String,
}

/// A message to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EngineMessage {
    Run(Request),
    Shutdown,
}

/// One node for a worker to execute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub node: String,
    pub key: String,
    pub kind: String,
    /// The node's parameters as `slider_recipe::NodeParams` serialises them.
    pub params: Value,
    /// Every input with the file holding its content.
    pub inputs: Vec<RequestInput>,
    /// Persistent across interrupted runs: checkpoints go here.
    pub work_dir: PathBuf,
    pub output_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestInput {
    pub input: Value,
    pub path: PathBuf,
}

/// A node kind the worker program of this build supports, with its code version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerKind {
    pub kind: String,
    pub code_version: u32,
}

enum PoolEvent {
    Progress(Progress),
    Done(Result<Vec<WorkerOutput>, ExecError>),
}

struct PoolJob {
    request: Request,
    events: Sender<PoolEvent>,
}

/// One worker process per device, started on first use and restarted after a crash.
pub struct WorkerPool {
    queue: Mutex<Option<Sender<PoolJob>>>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// `command` is the worker program and its arguments; `--device D` is appended.
    /// Worker stderr goes to `log_dir/worker-<device>.log`.
    pub fn new(
        command: Vec<String>,
        devices: &[String],
        log_dir: PathBuf,
        cancel: CancelToken,
    ) -> WorkerPool {
        let (tx, rx) = mpsc::channel::<PoolJob>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = devices
            .iter()
            .map(|device| {
                let slot = Slot {
                    command: command.clone(),
                    device: device.clone(),
                    log_dir: log_dir.clone(),
                    cancel: cancel.clone(),
                    proc: None,
                };
                let rx = Arc::clone(&rx);
                std::thread::spawn(move || slot.serve(rx))
            })
            .collect();
        WorkerPool {
            queue: Mutex::new(Some(tx)),
            threads,
        }
    }

    /// Runs one request on the next free worker; `progress` sees its progress events.
    pub fn run(
        &self,
        request: Request,
        progress: &dyn Fn(Progress),
    ) -> Result<Vec<WorkerOutput>, ExecError> {
        let (tx, rx) = mpsc::channel();
        {
            let queue = self
                .queue
                .lock()
                .map_err(|_| ExecError::Failed("worker pool poisoned".into()))?;
            let Some(queue) = queue.as_ref() else {
                return Err(ExecError::Failed("worker pool is shut down".into()));
            };
            queue
                .send(PoolJob {
                    request,
                    events: tx,
                })
                .map_err(|_| ExecError::Failed("worker pool is shut down".into()))?;
        }
        loop {
            match rx.recv() {
                Ok(PoolEvent::Progress(p)) => progress(p),
                Ok(PoolEvent::Done(result)) => return result,
                Err(_) => return Err(ExecError::Failed("worker pool stopped".into())),
            }
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    messages: Receiver<Result<WorkerMessage, String>>,
    kinds: Vec<String>,
}

/// One device: owns its worker process (spawned from this long-lived thread, so the
/// process's parent-death signal fires only when the runner itself dies).
struct Slot {
    command: Vec<String>,
    device: String,
    log_dir: PathBuf,
    cancel: CancelToken,
    proc: Option<Running>,
}

impl Slot {
    fn serve(mut self, rx: Arc<Mutex<Receiver<PoolJob>>>) {
        loop {
            let job = match rx.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => break,
            };
            let Ok(job) = job else { break };
            let result = self.execute(&job);
            let _ = job.events.send(PoolEvent::Done(result));
        }
        if let Some(mut running) = self.proc.take() {
            let _ = writeln!(running.stdin, "{}", json_line(&EngineMessage::Shutdown));
            drop(running.stdin);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = running.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            child::terminate(&mut running.child, Duration::from_secs(1));
        }
    }

    fn execute(&mut self, job: &PoolJob) -> Result<Vec<WorkerOutput>, ExecError> {
        if self.proc.is_none() {
            self.proc = Some(self.start()?);
        }
        let Some(running) = self.proc.as_mut() else {
            return Err(ExecError::Failed("worker did not start".into()));
        };
        if !running.kinds.contains(&job.request.kind) {
            return Err(ExecError::Failed(format!(
                "the worker on {} does not support `{}` (it supports: {})",
                self.device,
                job.request.kind,
                running.kinds.join(", ")
            )));
        }
        let line = json_line(&EngineMessage::Run(job.request.clone()));
        if writeln!(running.stdin, "{line}")
            .and_then(|_| running.stdin.flush())
            .is_err()
        {
            return Err(self.crashed("while receiving the request"));
        }
        loop {
            if self.cancel.is_cancelled() {
                if let Some(mut r) = self.proc.take() {
                    child::terminate(&mut r.child, Duration::from_secs(2));
                }
                return Err(ExecError::Cancelled);
            }
            let Some(running) = self.proc.as_mut() else {
                return Err(ExecError::Failed("worker vanished".into()));
            };
            match running.messages.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(WorkerMessage::Progress(p))) => {
                    let _ = job.events.send(PoolEvent::Progress(p));
                }
                Ok(Ok(WorkerMessage::Result { outputs })) => return Ok(outputs),
                Ok(Ok(WorkerMessage::Error { message })) => return Err(ExecError::Failed(message)),
                Ok(Ok(WorkerMessage::Hello { .. })) => {
                    return Err(ExecError::Failed(
                        "the worker said hello twice (protocol error)".into(),
                    ));
                }
                Ok(Err(bad)) => {
                    return Err(ExecError::Failed(format!(
                        "protocol error from the worker: {bad}"
                    )));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.crashed("while running the node"));
                }
            }
        }
    }

    /// Reaps a dead worker; the next request starts a new one.
    fn crashed(&mut self, when: &str) -> ExecError {
        let status = match self.proc.take() {
            Some(mut r) => {
                drop(r.stdin);
                child::terminate(&mut r.child, Duration::from_millis(200));
                r.child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "killed".into())
            }
            None => "gone".into(),
        };
        ExecError::Failed(format!(
            "the worker on {} died {when} ({status}); see {}; it is restarted for the next node",
            self.device,
            self.stderr_log().display()
        ))
    }

    fn stderr_log(&self) -> PathBuf {
        let safe: String = self
            .device
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        self.log_dir.join(format!("worker-{safe}.log"))
    }

    fn start(&self) -> Result<Running, ExecError> {
        let Some((program, args)) = self.command.split_first() else {
            return Err(ExecError::Failed("no worker program configured".into()));
        };
        let log_path = self.stderr_log();
        let stderr = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| ExecError::Failed(format!("opening {}: {e}", log_path.display())))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg("--device")
            .arg(&self.device)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        child::detach_and_tie(&mut cmd);
        let mut proc = cmd
            .spawn()
            .map_err(|e| ExecError::Failed(format!("cannot start the worker `{program}`: {e}")))?;
        let (Some(stdin), Some(stdout)) = (proc.stdin.take(), proc.stdout.take()) else {
            return Err(ExecError::Failed("worker pipes missing".into()));
        };
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let msg = serde_json::from_str::<WorkerMessage>(&line)
                    .map_err(|e| format!("{e}: {line}"));
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        match messages.recv_timeout(HELLO_TIMEOUT) {
            Ok(Ok(WorkerMessage::Hello { kinds, device, .. })) => {
                tracing::debug!("worker on {device} supports {kinds:?}");
                Ok(Running {
                    child: proc,
                    stdin,
                    messages,
                    kinds,
                })
            }
            other => {
                child::terminate(&mut proc, Duration::from_millis(200));
                Err(ExecError::Failed(format!(
                    "the worker on {} did not say hello ({}); see {}",
                    self.device,
                    match other {
                        Ok(Ok(m)) => format!("first message was {m:?}"),
                        Ok(Err(e)) => e,
                        Err(_) => "it exited or timed out".into(),
                    },
                    log_path.display()
                )))
            }
        }
    }
}

/// The worker side of the protocol: says hello, then serves requests from `input` until
/// it closes or asks to shut down. `handler` runs one request (reporting progress through
/// its callback) and returns the output files or an error message.
pub fn serve_worker(
    device: &str,
    kinds: &[String],
    input: impl BufRead,
    mut output: impl Write,
    mut handler: impl FnMut(&Request, &mut dyn FnMut(Progress)) -> Result<Vec<WorkerOutput>, String>,
) -> std::io::Result<()> {
    let send = |out: &mut dyn Write, msg: &WorkerMessage| -> std::io::Result<()> {
        let line = serde_json::to_string(msg).map_err(std::io::Error::other)?;
        writeln!(out, "{line}")?;
        out.flush()
    };
    send(
        &mut output,
        &WorkerMessage::Hello {
            kinds: kinds.to_vec(),
            device: device.to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
    )?;
    for line in input.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<EngineMessage>(&line) {
            Ok(EngineMessage::Shutdown) => return Ok(()),
            Ok(EngineMessage::Run(req)) => {
                let result = if kinds.contains(&req.kind) {
                    let out = &mut output;
                    // A failed progress write shows up again when the reply is sent.
                    let mut report = |p: Progress| {
                        let _ = send(out, &WorkerMessage::Progress(p));
                    };
                    handler(&req, &mut report)
                } else {
                    Err(format!(
                        "this build of slider-run's worker cannot run `{}` nodes (it supports: {})",
                        req.kind,
                        if kinds.is_empty() {
                            "nothing yet".to_string()
                        } else {
                            kinds.join(", ")
                        }
                    ))
                };
                match result {
                    Ok(outputs) => WorkerMessage::Result { outputs },
                    Err(message) => WorkerMessage::Error { message },
                }
            }
            Err(e) => WorkerMessage::Error {
                message: format!("malformed request: {e}"),
            },
        };
        send(&mut output, &reply)?;
    }
    Ok(())
}

fn json_line(msg: &EngineMessage) -> String {
    serde_json::to_string(msg).unwrap_or_else(|_| "{\"type\":\"shutdown\"}".into())
}

/// Runs one worker-placed kind through a [`WorkerPool`].
pub struct WorkerExecutor {
    pub kind: String,
    pub code_version: u32,
    pub pool: Arc<WorkerPool>,
}

impl Executor for WorkerExecutor {
    fn kind(&self) -> &str {
        &self.kind
    }

    fn code_version(&self) -> u32 {
        self.code_version
    }

    fn placement(&self) -> Placement {
        Placement::Worker
    }

    fn checkpoints(&self) -> bool {
        true
    }

    fn execute(&self, job: &Job) -> Result<Vec<Produced>, ExecError> {
        let params = serde_json::to_value(job.params)
            .map_err(|e| ExecError::Failed(format!("serialising params: {e}")))?;
        let inputs = job
            .inputs
            .iter()
            .map(|(input, path)| RequestInput {
                input: input_json(input),
                path: path.clone(),
            })
            .collect();
        let request = Request {
            node: job.node.to_string(),
            key: job.key.to_string(),
            kind: self.kind.clone(),
            params,
            inputs,
            work_dir: job.work_dir.unwrap_or(job.scratch_dir).to_path_buf(),
            output_dir: job.out_dir.to_path_buf(),
        };
        let outputs = self.pool.run(request, &|p| {
            if let Some(m) = &p.message {
                job.log.line(m);
            }
            (job.progress)(p)
        })?;
        if outputs.is_empty() {
            return Err(ExecError::Failed("the worker reported no outputs".into()));
        }
        outputs
            .into_iter()
            .map(|o| {
                let inside = std::path::Path::new(&o.file);
                if inside.is_absolute()
                    || inside
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    return Err(ExecError::Failed(format!(
                        "worker output {} is not inside output_dir",
                        o.file
                    )));
                }
                if !job.out_dir.join(inside).is_file() {
                    return Err(ExecError::Failed(format!(
                        "the worker reported output {} but did not write it",
                        o.file
                    )));
                }
                Ok(Produced {
                    name: o.name,
                    file: o.file,
                })
            })
            .collect()
    }
}

fn input_json(input: &Input) -> Value {
    serde_json::to_value(input).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests;
