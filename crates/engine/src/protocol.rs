//! The engine's side of the worker protocol: a pool of worker processes, one per device.
//! The messages themselves are `slider_protocol::worker`'s (their wire format is documented
//! there). The engine runs one worker per device, one request at a time; a worker that dies
//! fails its node (not the run) and is restarted for the next request.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use slider_protocol::worker::{
    EngineMessage, Request, RequestInput, WorkerMessage, WorkerOutput, serve, to_line,
};

use crate::cancel::CancelToken;
use crate::child;
use crate::executor::{ExecError, Executor, Job, Placement, Produced, Progress};

/// How long a starting worker may take to say hello (loading a backend can be slow).
const HELLO_TIMEOUT: Duration = Duration::from_secs(120);

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
    /// The runner's code version of the request's kind (part of the node's key).
    code_version: u32,
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
        code_version: u32,
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
                    code_version,
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
    code_versions: BTreeMap<String, u32>,
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
            if let Ok(line) = to_line(&EngineMessage::Shutdown) {
                let _ = writeln!(running.stdin, "{line}");
            }
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
        if let Some(theirs) = running.code_versions.get(&job.request.kind)
            && *theirs != job.code_version
        {
            return Err(ExecError::Failed(format!(
                "the worker on {} runs `{}` at code version {theirs}, this runner keys it at \
                 version {}: the worker program is another build of slider-run; use the same \
                 build for both",
                self.device, job.request.kind, job.code_version
            )));
        }
        let line = to_line(&EngineMessage::Run(Box::new(job.request.clone())))
            .map_err(|e| ExecError::Failed(format!("cannot encode the request: {e}")))?;
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
            Ok(Ok(WorkerMessage::Hello {
                kinds,
                device,
                code_versions,
                ..
            })) => {
                tracing::debug!("worker on {device} supports {kinds:?} ({code_versions:?})");
                Ok(Running {
                    child: proc,
                    stdin,
                    messages,
                    kinds,
                    code_versions,
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
        let inputs = job
            .inputs
            .iter()
            .map(|(input, path)| RequestInput {
                input: input.clone(),
                path: path.clone(),
            })
            .collect();
        let request = Request {
            node: job.node.to_string(),
            key: job.key.to_string(),
            kind: self.kind.clone(),
            params: job.params.clone(),
            inputs,
            work_dir: job.work_dir.unwrap_or(job.scratch_dir).to_path_buf(),
            output_dir: job.out_dir.to_path_buf(),
        };
        let outputs = self.pool.run(request, self.code_version, &|p| {
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

#[cfg(test)]
mod tests;
