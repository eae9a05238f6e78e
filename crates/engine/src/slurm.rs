//! The Slurm executor: each GPU node (`train`, `xy_plot`, `evaluate`) becomes one batch job
//! that runs this build's worker on that one request, against the store on a shared
//! filesystem; with `command_nodes: cluster` in the profile, each `command` node becomes a
//! job that runs its program. The runner submits, polls, adopts and cancels; only the runner
//! commits into `objects/`. The job's side is a short bash script ([`job_script`]).
//!
//! A job's folder, `jobs/<key>/` in the store, is the record of the node's jobs:
//!
//! ```text
//! request.jsonl   the worker's input: the `run` request, then `shutdown` (worker jobs)
//! job.sh          the batch script (re-run as it is on a requeue)
//! job_id          the job in flight (written right after sbatch; adopted by the next run)
//! submissions     one line per sbatch of this key: "<job id> <unix time, s.ms>"
//! out.jsonl       the worker's messages (hello, progress, result or error); truncated on
//!                 each start, so a requeued job's first attempt does not count
//! worker.log      the worker's stderr, or a command's stdout and stderr; slurm.log: the
//!                 batch script's
//! started         when the job's script began (unix seconds), for the scheduling figures
//! scratch/        a command's working directory (emptied on each start)
//! owner           the job id running in this folder (created with O_EXCL by the script)
//! exit            the worker's exit status, for jobs that have left the queue
//! out/            the worker's output_dir; moved into the node's temp dir when it is done
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use slider_protocol::worker::{EngineMessage, Request, RequestInput, WorkerMessage, to_line};
use slider_recipe::{ClusterProfile, JobResources};

use crate::command::{CommandLine, command_params};
use crate::error::EngineError;
use crate::executor::{ExecError, Executor, Job, Placement, Produced, Progress};
use crate::fsutil;

/// How long a job that Slurm reports ended may take to show its last lines (a shared
/// filesystem's attribute cache can lag behind the node that wrote them).
const LATENCY_WAIT: Duration = Duration::from_secs(10);
/// How often a waiting node looks at its job's output.
const TICK: Duration = Duration::from_millis(100);
/// Requeues allowed to one job when the profile does not say.
const DEFAULT_MAX_REQUEUES: u32 = 3;

/// Everything a run needs to put its GPU nodes on Slurm.
#[derive(Debug, Clone)]
pub struct SlurmSettings {
    pub profile: ClusterProfile,
    /// Every job of the run carries it (`squeue --name` finds them).
    pub job_name: String,
    /// Jobs in flight at once.
    pub max_jobs: usize,
    /// The worker program on the cluster's nodes and its leading arguments (`slider-run
    /// worker`); `--device D` is appended.
    pub worker_command: Vec<String>,
}

/// What a node's job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobProgram {
    /// This build's worker, on the node's request (its answer is in `out.jsonl`).
    Worker,
    /// A `command` node's program (its answer is its exit status and declared outputs).
    Command,
}

/// A job's state as `squeue` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub state: String,
    pub reason: String,
}

impl JobState {
    /// Slurm's states after which the job will not run again by itself.
    pub fn is_final(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "NODE_FAIL"
                | "OUT_OF_MEMORY"
                | "BOOT_FAIL"
                | "DEADLINE"
                | "PREEMPTED"
                | "SPECIAL_EXIT"
        )
    }
}

struct Poll {
    at: Option<Instant>,
    states: BTreeMap<String, JobState>,
    calls: u64,
}

/// The cluster as one run sees it: one batched, rate-limited `squeue` for every job of the
/// run, the set of jobs in flight, and the one `scancel` of an interrupted run.
pub struct SlurmCluster {
    settings: SlurmSettings,
    jobs_root: PathBuf,
    poll: Mutex<Poll>,
    in_flight: Mutex<BTreeSet<String>>,
    cancelled: AtomicBool,
}

impl SlurmCluster {
    /// Checks that Slurm answers and that the store may be used from other machines.
    pub fn open(settings: SlurmSettings, store_root: &Path) -> Result<SlurmCluster, EngineError> {
        if !settings.profile.allow_node_local_store
            && let Some(why) = node_local(store_root)
        {
            return Err(EngineError::Config(format!(
                "the store {} is on {why}, which the cluster's nodes cannot see; put the \
                 store on a shared filesystem (`--store DIR`), or set \
                 `allow_node_local_store: true` in the profile for a single-node cluster",
                store_root.display()
            )));
        }
        let jobs_root = store_root.join("jobs");
        std::fs::create_dir_all(&jobs_root)
            .map_err(EngineError::io("creating the jobs folder", &jobs_root))?;
        let cluster = SlurmCluster {
            settings,
            jobs_root,
            poll: Mutex::new(Poll {
                at: None,
                states: BTreeMap::new(),
                calls: 0,
            }),
            in_flight: Mutex::new(BTreeSet::new()),
            cancelled: AtomicBool::new(false),
        };
        cluster.squeue().map_err(|e| {
            EngineError::Config(format!(
                "`--executor slurm`, but Slurm does not answer: {e}"
            ))
        })?;
        Ok(cluster)
    }

    pub fn settings(&self) -> &SlurmSettings {
        &self.settings
    }

    /// How many `squeue` calls this run made (the poll is batched: not one per job).
    pub fn poll_calls(&self) -> u64 {
        self.poll.lock().map(|p| p.calls).unwrap_or(0)
    }

    /// Every job of this job name that Slurm still lists, by id.
    fn squeue(&self) -> Result<BTreeMap<String, JobState>, String> {
        squeue(Some(&self.settings.job_name))
    }

    /// The state of job `id`, from a poll at most `poll_interval_s` old. `None`: Slurm does
    /// not list it (never submitted under this name, or gone from the controller's memory).
    pub fn state(&self, id: &str) -> Result<Option<JobState>, ExecError> {
        let interval = Duration::from_secs_f64(self.settings.profile.poll_interval_s);
        let mut poll = self
            .poll
            .lock()
            .map_err(|_| ExecError::Failed("slurm poll state poisoned".into()))?;
        if poll.at.is_none_or(|at| at.elapsed() >= interval) {
            let states = self.squeue().map_err(ExecError::Failed)?;
            poll.states = states;
            poll.at = Some(Instant::now());
            poll.calls += 1;
        }
        Ok(poll.states.get(id).cloned())
    }

    /// Forgets the last poll, so the next [`SlurmCluster::state`] asks Slurm.
    fn invalidate(&self) {
        if let Ok(mut p) = self.poll.lock() {
            p.at = None;
        }
    }

    /// One `scancel` of every job of this run in flight (the first call does it).
    pub fn cancel_all(&self) {
        if self.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        let ids: Vec<String> = self
            .in_flight
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        if ids.is_empty() {
            return;
        }
        tracing::warn!("cancelling slurm jobs {}", ids.join(" "));
        match Command::new("scancel").args(&ids).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(
                "scancel failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => tracing::warn!("cannot run scancel: {e}"),
        }
    }

    fn scancel(id: &str) {
        let _ = Command::new("scancel").arg(id).output();
    }

    fn track(&self, id: &str, on: bool) {
        if let Ok(mut s) = self.in_flight.lock() {
            if on {
                s.insert(id.to_string());
            } else {
                s.remove(id);
            }
        }
    }

    /// Submits the job of one node; returns its id.
    fn submit(&self, dir: &JobDir, resources: &JobResources) -> Result<String, ExecError> {
        let signal_before = resources.signal_before_s.unwrap_or(120);
        let mut cmd = Command::new("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--job-name={}", self.settings.job_name))
            .arg(format!("--chdir={}", dir.path.display()))
            .arg(format!("--output={}", dir.file("slurm.log").display()))
            .arg("--open-mode=append")
            .arg("--requeue")
            .arg(format!("--signal=B:USR1@{signal_before}"));
        for (flag, value) in [
            ("partition", &resources.partition),
            ("gres", &resources.gres),
            ("mem", &resources.mem),
            ("time", &resources.time),
            ("account", &resources.account),
        ] {
            if let Some(v) = value {
                cmd.arg(format!("--{flag}={v}"));
            }
        }
        if let Some(c) = resources.cpus {
            cmd.arg(format!("--cpus-per-task={c}"));
        }
        cmd.args(&resources.extra).arg(dir.file("job.sh"));
        let out = cmd
            .output()
            .map_err(|e| ExecError::Failed(format!("cannot run sbatch: {e}")))?;
        if !out.status.success() {
            return Err(ExecError::Failed(format!(
                "sbatch refused the job ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(ExecError::Failed(format!(
                "sbatch printed no job id: {text:?}"
            )));
        }
        self.track(&id, true);
        dir.record_submission(&id)?;
        self.invalidate();
        Ok(id)
    }
}

/// This user's jobs that Slurm lists (of one job name, when given), by id: one call.
fn squeue(job_name: Option<&str>) -> Result<BTreeMap<String, JobState>, String> {
    let mut cmd = Command::new("squeue");
    cmd.args(["--noheader", "--me", "--states=all", "--format=%i|%T|%r"]);
    if let Some(name) = job_name {
        cmd.arg(format!("--name={name}"));
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run squeue: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "squeue failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, '|');
            let (id, state) = (f.next()?, f.next()?);
            Some((
                id.to_string(),
                JobState {
                    state: state.to_string(),
                    reason: f.next().unwrap_or("").trim().to_string(),
                },
            ))
        })
        .collect())
}

/// The Slurm job of a node, as `slider-run status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClusterJob {
    pub id: String,
    /// Slurm's state (`PENDING (Resources)`, `RUNNING`, ...), or how the job folder says
    /// it ended, or why it could not be asked.
    pub state: String,
}

/// The jobs recorded in the store for these keys (`jobs/<key>/job_id`), with their states
/// from one `squeue` call of this user's jobs.
pub fn cluster_jobs(store_root: &Path, keys: &[&str]) -> BTreeMap<String, ClusterJob> {
    let recorded: Vec<(String, JobDir, String)> = keys
        .iter()
        .filter_map(|key| {
            let dir = JobDir {
                path: store_root.join("jobs").join(key),
            };
            let id = dir.job_id()?;
            Some((key.to_string(), dir, id))
        })
        .collect();
    if recorded.is_empty() {
        return BTreeMap::new();
    }
    // All of this user's jobs, filtered here: `--jobs` with one id Slurm has forgotten
    // fails the whole call.
    let listed = squeue(None);
    recorded
        .into_iter()
        .map(|(key, dir, id)| {
            let state = match (listed.as_ref().map(|l| l.get(&id)), dir.exit_status()) {
                (Ok(Some(s)), _) if s.state == "PENDING" && !s.reason.is_empty() => {
                    format!("{} ({})", s.state, s.reason)
                }
                (Ok(Some(s)), _) => s.state.clone(),
                (_, Some(rc)) => format!("ended, exit status {rc}"),
                (Ok(None), None) => "not listed by squeue".to_string(),
                (Err(e), None) => e.clone(),
            };
            (key, ClusterJob { id, state })
        })
        .collect()
}

/// Why `root` looks node-local, if it does: a memory filesystem, or a temp directory.
fn node_local(root: &Path) -> Option<String> {
    let probe = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let canonical = probe.canonicalize().unwrap_or_else(|_| probe.to_path_buf());
    for local in ["/tmp", "/dev/shm", "/run"] {
        if canonical.starts_with(local) {
            return Some(format!("{local} (node-local)"));
        }
    }
    let c = std::ffi::CString::new(canonical.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut fs) } != 0 {
        return None;
    }
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    #[allow(clippy::unnecessary_cast)]
    match fs.f_type as i64 {
        TMPFS_MAGIC => Some("a tmpfs (node-local memory)".into()),
        RAMFS_MAGIC => Some("a ramfs (node-local memory)".into()),
        _ => None,
    }
}

/// Quotes `s` for bash.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The line of the batch script that starts the worker on the node's request, in the
/// background (its pid becomes `$worker`).
pub fn worker_launch(worker: &[String], device: &str) -> String {
    let worker: Vec<String> = worker.iter().map(|w| quote(w)).collect();
    format!(
        "{} --device {} < request.jsonl > out.jsonl 2>> worker.log &",
        worker.join(" "),
        quote(device)
    )
}

/// The lines that start a command node's program in the background, in an emptied
/// `scratch/`, with its outputs' folders made under `out/` (a requeued job starts clean).
pub fn command_launch(
    node: &str,
    out_dir: &Path,
    program: &Path,
    args: &[String],
    out_parents: &[PathBuf],
) -> String {
    let mut mk = vec![quote("scratch")];
    mk.extend(out_parents.iter().map(|p| quote(&p.display().to_string())));
    let argv: Vec<String> = std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .map(|a| quote(&a))
        .collect();
    format!(
        "rm -rf scratch out && mkdir -p out {mk} || exit 70\n\
         ( cd scratch && exec env SLIDER_NODE={node} SLIDER_OUT_DIR={out} {argv} ) \
         < /dev/null >> worker.log 2>&1 &",
        mk = mk.join(" "),
        node = quote(node),
        out = quote(&out_dir.display().to_string()),
        argv = argv.join(" "),
    )
}

/// The batch script of one node. It refuses to run beside another job of the same node,
/// guards against requeueing itself in a loop, forwards a time-limit warning (SIGUSR1) to
/// the program as SIGTERM (a training checkpoints and stops) and requeues the job, so it
/// resumes from that checkpoint. `launch` starts the program in the background
/// ([`worker_launch`], [`command_launch`]).
pub fn job_script(node: &str, key: &str, dir: &Path, launch: &str, max_requeues: u32) -> String {
    let node_line: String = node.chars().filter(|c| !c.is_control()).collect();
    format!(
        r#"#!/bin/bash
# slider-run: node {node_line}, key {key}. Written by the runner; re-run as it is on a requeue.
set -u
cd {dir} || exit 70
date +%s.%N > started
restarts=${{SLURM_RESTART_COUNT:-0}}
if [ "$restarts" -gt {max_requeues} ]; then
    echo "slider-run: requeued $restarts times (max_requeues {max_requeues}): giving up" >&2
    exit 75
fi
# One job at a time in this node's folder: the owner file holds the job id.
if ! ( set -o noclobber; echo "$SLURM_JOB_ID" > owner ) 2>/dev/null; then
    holder=$(cat owner 2>/dev/null)
    if [ "$holder" != "$SLURM_JOB_ID" ] && [ -n "$holder" ] \
        && squeue -h -j "$holder" -o %T 2>/dev/null | grep -qE 'RUNNING|COMPLETING|SUSPENDED'; then
        echo "slider-run: job $holder is already working on this node" >&2
        exit 75
    fi
    echo "$SLURM_JOB_ID" > owner.$SLURM_JOB_ID && mv owner.$SLURM_JOB_ID owner
fi
rm -f exit
worker=
on_time_limit() {{
    [ -n "$worker" ] && kill -TERM "$worker" 2>/dev/null && wait "$worker"
    if [ "$restarts" -lt {max_requeues} ]; then
        echo "slider-run: time limit near: checkpointed, requeueing" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
}}
trap on_time_limit USR1
# scancel and requeue signal every process of the job: the worker checkpoints by itself.
trap '[ -n "$worker" ] && wait "$worker"; exit 143' TERM INT
{launch}
worker=$!
wait "$worker"
rc=$?
echo "$rc" > exit.tmp && mv exit.tmp exit
exit "$rc"
"#,
        dir = quote(&dir.display().to_string()),
    )
}

/// A node's job folder.
struct JobDir {
    path: PathBuf,
}

impl JobDir {
    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn job_id(&self) -> Option<String> {
        let id = std::fs::read_to_string(self.file("job_id")).ok()?;
        let id = id.trim();
        (!id.is_empty() && id.chars().all(|c| c.is_ascii_digit())).then(|| id.to_string())
    }

    /// The program's exit status, once the script has written it.
    fn exit_status(&self) -> Option<i32> {
        std::fs::read_to_string(self.file("exit"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn record_submission(&self, id: &str) -> Result<(), ExecError> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            ExecError::Failed(format!("{what} {}: {e}", p.display()))
        };
        let path = self.file("job_id");
        slider_atomic::write(&path, format!("{id}\n").as_bytes())
            .map_err(|e| io("cannot write", &path, e))?;
        let path = self.file("submissions");
        let mut all = std::fs::read_to_string(&path).unwrap_or_default();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        all.push_str(&format!("{id} {now:.3}\n"));
        slider_atomic::write(&path, all.as_bytes()).map_err(|e| io("cannot write", &path, e))
    }

    /// A fresh attempt: the old answer, exit file, owner and outputs removed.
    fn prepare(&self, request: Option<&Request>, script: &str) -> Result<(), ExecError> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            ExecError::Failed(format!("{what} {}: {e}", p.display()))
        };
        for f in ["out.jsonl", "exit", "owner", "job_id", "started"] {
            let p = self.file(f);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("cannot remove", &p, e)),
            }
        }
        let out = self.file("out");
        if out.exists() {
            fsutil::remove_any(&out).map_err(|e| io("cannot remove", &out, e))?;
        }
        std::fs::create_dir_all(&out).map_err(|e| io("cannot create", &out, e))?;
        if let Some(request) = request {
            self.write_request(request)?;
        }
        let p = self.file("job.sh");
        slider_atomic::write(&p, script.as_bytes()).map_err(|e| io("cannot write", &p, e))
    }

    fn write_request(&self, request: &Request) -> Result<(), ExecError> {
        let lines = [
            to_line(&EngineMessage::Run(Box::new(request.clone()))),
            to_line(&EngineMessage::Shutdown),
        ];
        let mut text = String::new();
        for l in lines {
            let l = l.map_err(|e| ExecError::Failed(format!("cannot encode the request: {e}")))?;
            text.push_str(&l);
            text.push('\n');
        }
        let p = self.file("request.jsonl");
        slider_atomic::write(&p, text.as_bytes())
            .map_err(|e| ExecError::Failed(format!("cannot write {}: {e}", p.display())))
    }
}

/// Reads the worker's messages from `out.jsonl` as they are appended; starts over when the
/// file is truncated (the job was requeued and began again).
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        Tail {
            path,
            offset: 0,
            partial: String::new(),
        }
    }

    /// New complete lines, and whether the file started over since the last call.
    fn read(&mut self) -> (Vec<String>, bool) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return (Vec::new(), false);
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let restarted = len < self.offset;
        if restarted {
            self.offset = 0;
            self.partial.clear();
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return (Vec::new(), restarted);
        }
        let mut lines = Vec::new();
        let mut reader = BufReader::new(f);
        let mut buf = String::new();
        while let Ok(n) = reader.read_line(&mut buf) {
            if n == 0 {
                break;
            }
            self.offset += n as u64;
            if buf.ends_with('\n') {
                let line = std::mem::take(&mut self.partial) + buf.trim_end();
                if !line.trim().is_empty() {
                    lines.push(line);
                }
            } else {
                self.partial.push_str(&buf);
            }
            buf.clear();
        }
        (lines, restarted)
    }
}

/// Runs one worker-placed kind as Slurm jobs.
pub struct SlurmExecutor {
    pub kind: String,
    pub code_version: u32,
    pub program: JobProgram,
    pub cluster: Arc<SlurmCluster>,
}

/// What the worker said in the current attempt.
#[derive(Default)]
struct Answer {
    hello: bool,
    last: Option<Result<Vec<slider_protocol::worker::WorkerOutput>, String>>,
}

impl SlurmExecutor {
    fn request(&self, job: &Job, out_dir: &Path) -> Request {
        Request {
            node: job.node.to_string(),
            key: job.key.to_string(),
            kind: self.kind.clone(),
            params: job.params.clone(),
            inputs: job
                .inputs
                .iter()
                .map(|(input, path)| RequestInput {
                    input: input.clone(),
                    path: path.clone(),
                })
                .collect(),
            work_dir: job.work_dir.unwrap_or(job.scratch_dir).to_path_buf(),
            output_dir: out_dir.to_path_buf(),
        }
    }

    /// Takes in the worker's new messages; a wrong code version cancels the job.
    fn absorb(
        &self,
        job: &Job,
        id: &str,
        lines: Vec<String>,
        answer: &mut Answer,
    ) -> Result<(), ExecError> {
        for line in lines {
            let msg = match serde_json::from_str::<WorkerMessage>(&line) {
                Ok(m) => m,
                Err(e) => {
                    answer.last = Some(Err(format!("protocol error from the worker: {e}: {line}")));
                    continue;
                }
            };
            match msg {
                WorkerMessage::Hello { code_versions, .. } => {
                    answer.hello = true;
                    let theirs = code_versions.get(&self.kind).copied();
                    if theirs != Some(self.code_version) {
                        SlurmCluster::scancel(id);
                        return Err(ExecError::Failed(format!(
                            "slurm job {id}: the worker on the cluster runs `{}` at code \
                             version {}, this runner keys it at version {}: the cluster's \
                             slider-run is another build; install the same build there \
                             (profile `command:`)",
                            self.kind,
                            theirs.map_or("none".into(), |v| v.to_string()),
                            self.code_version
                        )));
                    }
                }
                WorkerMessage::Progress(p) => {
                    if let Some(m) = &p.message {
                        job.log.line(m);
                    }
                    (job.progress)(p);
                }
                WorkerMessage::Result { outputs } => answer.last = Some(Ok(outputs)),
                WorkerMessage::Error { message } => answer.last = Some(Err(message)),
            }
        }
        Ok(())
    }

    /// Waits for job `id` to end; returns the worker's answer (None: it gave none) and the
    /// final state.
    fn wait(&self, job: &Job, dir: &JobDir, id: &str) -> Result<(Answer, String), ExecError> {
        let cluster = &self.cluster;
        let mut tail = Tail::new(dir.file("out.jsonl"));
        let mut answer = Answer::default();
        let mut shown = String::new();
        let mut ended: Option<(Instant, String)> = None;
        let mut unlisted_since: Option<Instant> = None;
        loop {
            if job.cancel.is_cancelled() {
                cluster.cancel_all();
                return Err(ExecError::Cancelled);
            }
            let (lines, restarted) = tail.read();
            if restarted {
                answer = Answer::default();
            }
            self.absorb(job, id, lines, &mut answer)?;
            let answered = match self.program {
                JobProgram::Worker => answer.last.is_some(),
                JobProgram::Command => dir.exit_status().is_some(),
            };
            if let Some((since, state)) = &ended {
                if answered || since.elapsed() >= LATENCY_WAIT {
                    return Ok((answer, state.clone()));
                }
            } else {
                let state = cluster.state(id)?;
                let label = match &state {
                    Some(s) if s.state == "PENDING" => format!("queued ({})", s.reason),
                    Some(s) => s.state.to_lowercase(),
                    None => "not listed".into(),
                };
                if label != shown {
                    job.log.line(&format!("slurm job {id}: {label}"));
                    (job.progress)(Progress {
                        message: Some(format!("slurm job {id}: {label}")),
                        ..Progress::default()
                    });
                    shown = label;
                }
                if state.is_some() {
                    unlisted_since = None;
                }
                let final_state = match state {
                    Some(s) if s.is_final() => Some(s.state),
                    Some(_) => None,
                    // Gone from the controller's memory: the exit file tells how it ended,
                    // and a job that left none is taken as lost after a while.
                    None => match std::fs::read_to_string(dir.file("exit")) {
                        Ok(c) => Some(format!("with exit status {}", c.trim())),
                        Err(_) => {
                            let since = *unlisted_since.get_or_insert_with(Instant::now);
                            (since.elapsed() >= LATENCY_WAIT).then(|| {
                                "unlisted (gone from the queue without an exit file)".into()
                            })
                        }
                    },
                };
                if let Some(s) = final_state {
                    ended = Some((Instant::now(), s));
                    continue;
                }
                if answered && std::fs::metadata(dir.file("exit")).is_ok() {
                    // The program answered and exited; Slurm will say COMPLETED shortly.
                    ended = Some((Instant::now(), "COMPLETED".into()));
                    continue;
                }
            }
            std::thread::sleep(TICK);
        }
    }

    /// Moves the outputs the worker wrote into the job folder into the node's temp dir.
    fn collect(
        job: &Job,
        dir: &JobDir,
        outputs: Vec<Produced>,
    ) -> Result<Vec<Produced>, ExecError> {
        if outputs.is_empty() {
            return Err(ExecError::Failed("the job reported no outputs".into()));
        }
        let from_root = dir.file("out");
        outputs
            .into_iter()
            .map(|o| {
                let inside = Path::new(&o.file);
                if inside.is_absolute()
                    || inside
                        .components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(ExecError::Failed(format!(
                        "worker output {} is not inside output_dir",
                        o.file
                    )));
                }
                let (from, to) = (from_root.join(inside), job.out_dir.join(inside));
                if !from.is_file() {
                    return Err(ExecError::Failed(format!(
                        "the worker reported output {} but did not write it",
                        o.file
                    )));
                }
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        ExecError::Failed(format!("cannot create {}: {e}", parent.display()))
                    })?;
                }
                std::fs::rename(&from, &to).map_err(|e| {
                    ExecError::Failed(format!(
                        "cannot move {} to {}: {e}",
                        from.display(),
                        to.display()
                    ))
                })?;
                Ok(o)
            })
            .collect()
    }

    /// The batch script's and the worker's stderr, into the node's log.
    fn copy_logs(job: &Job, dir: &JobDir, id: &str) {
        for f in ["slurm.log", "worker.log"] {
            if let Ok(text) = std::fs::read_to_string(dir.file(f)) {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    job.log.line(&format!("[slurm job {id} {f}] {line}"));
                }
            }
        }
    }
}

impl Executor for SlurmExecutor {
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
        self.program == JobProgram::Worker
    }

    fn execute(&self, job: &Job) -> Result<Vec<Produced>, ExecError> {
        let cluster = &self.cluster;
        let settings = cluster.settings();
        let resources = settings.profile.for_kind(&self.kind);
        let dir = JobDir {
            path: cluster.jobs_root.join(job.key),
        };
        std::fs::create_dir_all(&dir.path)
            .map_err(|e| ExecError::Failed(format!("cannot create {}: {e}", dir.path.display())))?;
        let out_root = dir.file("out");
        let (launch, request, command) = match self.program {
            JobProgram::Worker => {
                let device = resources.device.clone().unwrap_or_else(|| "cpu".into());
                let launch = worker_launch(&settings.worker_command, &device);
                (launch, Some(self.request(job, &out_root)), None)
            }
            JobProgram::Command => {
                let p = command_params(job)?;
                let line = CommandLine::new(p, job, &out_root)?;
                let parents: Vec<PathBuf> = p
                    .outputs
                    .iter()
                    .filter_map(|(_, f)| out_root.join(f).parent().map(Path::to_path_buf))
                    .collect();
                let launch =
                    command_launch(job.node, &out_root, &line.program, &line.args, &parents);
                job.log.line(&line.shown());
                (launch, None, Some((p, line)))
            }
        };
        let script = job_script(
            job.node,
            job.key,
            &dir.path,
            &launch,
            resources.max_requeues.unwrap_or(DEFAULT_MAX_REQUEUES),
        );
        // A job of this key left by an earlier runner (killed, or stopped before the job
        // ended): waited for instead of submitted again, when Slurm still has it.
        let mut id = match dir.job_id() {
            Some(id) => match cluster.state(&id)? {
                Some(s) if !s.is_final() || s.state == "COMPLETED" => {
                    job.log
                        .line(&format!("adopting slurm job {id} ({})", s.state));
                    cluster.track(&id, true);
                    Some(id)
                }
                _ => None,
            },
            None => None,
        };
        let mut retries_left = resources.retries.unwrap_or(0);
        loop {
            let current = match id.take() {
                Some(id) => id,
                None => {
                    dir.prepare(request.as_ref(), &script)?;
                    let id = cluster.submit(&dir, &resources)?;
                    job.log.line(&format!(
                        "submitted slurm job {id} (job name {})",
                        settings.job_name
                    ));
                    id
                }
            };
            let waited = self.wait(job, &dir, &current);
            cluster.track(&current, false);
            let (answer, state) = waited?;
            Self::copy_logs(job, &dir, &current);
            if let Some((p, line)) = &command {
                match dir.exit_status() {
                    Some(0) => return Self::collect(job, &dir, line.outputs(p, &out_root)?),
                    Some(rc) => {
                        let why =
                            line.failure(&format!("exit status {rc}"), &dir.file("worker.log"));
                        return Err(ExecError::Failed(format!("{why} (slurm job {current})")));
                    }
                    None => {}
                }
            }
            match answer.last {
                Some(Ok(outputs)) => {
                    let produced = outputs
                        .into_iter()
                        .map(|o| Produced {
                            name: o.name,
                            file: o.file,
                        })
                        .collect();
                    return Self::collect(job, &dir, produced);
                }
                Some(Err(message)) if state == "COMPLETED" || answer.hello => {
                    return Err(ExecError::Failed(format!(
                        "{message} (slurm job {current})"
                    )));
                }
                _ if retries_left > 0 => {
                    retries_left -= 1;
                    job.log.line(&format!(
                        "slurm job {current} ended {state} without an answer: resubmitting \
                         ({retries_left} retries left)"
                    ));
                }
                _ => {
                    return Err(ExecError::Failed(format!(
                        "slurm job {current} ended {state} without an answer from the worker; \
                         see {}",
                        job.log.path().display()
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn the_tail_reads_whole_lines_and_starts_over_after_a_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.jsonl");
        let mut t = Tail::new(p.clone());
        assert_eq!(t.read(), (vec![], false));
        std::fs::write(&p, "one\ntw").unwrap();
        assert_eq!(t.read(), (vec!["one".to_string()], false));
        std::fs::write(&p, "one\ntwo\n").unwrap();
        assert_eq!(t.read(), (vec!["two".to_string()], false));
        std::fs::write(&p, "x\n").unwrap();
        assert_eq!(t.read(), (vec!["x".to_string()], true));
    }

    #[test]
    fn final_states_are_slurms() {
        let s = |state: &str| JobState {
            state: state.into(),
            reason: String::new(),
        };
        assert!(s("COMPLETED").is_final() && s("NODE_FAIL").is_final());
        assert!(
            !s("PENDING").is_final() && !s("REQUEUED").is_final() && !s("COMPLETING").is_final()
        );
    }

    #[test]
    fn memory_and_temp_filesystems_are_node_local() {
        assert!(node_local(Path::new("/tmp/x/.slider")).is_some());
        assert!(node_local(Path::new("/dev/shm/s")).is_some());
        // A system folder on the root disk (the checkout itself may be under /tmp).
        assert!(node_local(Path::new("/usr/lib/.slider")).is_none());
    }
}
