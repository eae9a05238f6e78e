//! The scheduler: walks the plan's DAG, keys each node as soon as its inputs are done,
//! serves cached nodes from the store, runs the rest (in-process kinds `--jobs` at a time,
//! worker kinds one per device), publishes outputs and writes the lockfile.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use petgraph::Direction;
use serde::Serialize;
use slider_recipe::{Input, Plan};

use crate::cancel::CancelToken;
use crate::command::COMMAND_CODE_VERSION;
use crate::error::EngineError;
use crate::executor::{ExecError, Executor, Executors, Job, NodeLog, Placement, Progress};
use crate::fingerprint::{FileHashMemo, FileStamp, Fingerprint, fingerprint};
use crate::journal::{Journal, JournalState};
use crate::lockfile::{LockedNode, Lockfile, lockfile_path};
use crate::protocol::{WorkerExecutor, WorkerKind, WorkerPool};
use crate::sd_scripts::{self, SdScriptsExecutor, TrainDispatch};
use crate::slurm::{JobProgram, SlurmCluster, SlurmExecutor, SlurmSettings};
use crate::store::{MANIFEST_FORMAT, Manifest, OutputFile, Store};
use crate::{fsutil, in_process_executors};

/// How to run a plan.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// In-process nodes running at once.
    pub jobs: usize,
    /// Keep running independent branches after a failure (default).
    pub keep_going: bool,
    /// One worker per device (`cpu`, `cuda:0`, ...).
    pub devices: Vec<String>,
    /// The worker program and its arguments (`slider-run worker`); `--device D` is appended.
    pub worker_command: Vec<String>,
    /// The kinds the worker program of this build supports.
    pub worker_kinds: Vec<WorkerKind>,
    pub cancel: CancelToken,
    /// Copy finished outputs to the recipe's `outputs` paths.
    pub publish: bool,
    /// Write `RECIPE.lock` after a run without failures.
    pub write_lockfile: bool,
    /// Run the worker kinds as Slurm jobs instead of on local workers (`--executor slurm`).
    pub slurm: Option<SlurmSettings>,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            keep_going: true,
            devices: vec!["cpu".into()],
            worker_command: Vec::new(),
            worker_kinds: Vec::new(),
            cancel: CancelToken::new(),
            publish: true,
            write_lockfile: true,
            slurm: None,
        }
    }
}

/// What the scheduler reports while it runs (the CLI draws progress bars from it).
#[derive(Debug)]
pub enum Event<'a> {
    Planned {
        nodes: usize,
    },
    Cached {
        node: &'a str,
    },
    Started {
        node: &'a str,
        kind: &'a str,
    },
    Progress {
        node: &'a str,
        progress: &'a Progress,
    },
    Finished {
        node: &'a str,
        ok: bool,
        wall_s: f64,
    },
    Skipped {
        node: &'a str,
        reason: &'a str,
    },
}

/// Receives [`Event`]s, from several threads.
pub trait Observer: Sync {
    fn event(&self, event: Event<'_>);
}

/// An observer that ignores everything.
pub struct Silent;

impl Observer for Silent {
    fn event(&self, _: Event<'_>) {}
}

/// One node in the run summary.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub name: String,
    pub kind: String,
    pub key: Option<String>,
    pub wall_s: f64,
    pub log: Option<PathBuf>,
    pub error: Option<String>,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub ran: Vec<NodeReport>,
    pub cached: Vec<NodeReport>,
    pub failed: Vec<NodeReport>,
    /// Not run because an input failed, or the run was interrupted / stopped first.
    pub skipped: Vec<NodeReport>,
    pub interrupted: bool,
    pub wall_s: f64,
    /// Bytes of input files hashed (0 when every file hash came from the memo).
    pub hashed_bytes: u64,
    pub published: Vec<PathBuf>,
    pub publish_errors: Vec<String>,
    pub lockfile: Option<PathBuf>,
    pub store: PathBuf,
    /// Final key of every node that finished (ran or cached).
    #[serde(skip)]
    pub keys: BTreeMap<String, String>,
}

impl RunSummary {
    pub fn success(&self) -> bool {
        self.failed.is_empty()
            && self.skipped.is_empty()
            && !self.interrupted
            && self.publish_errors.is_empty()
    }
}

/// Code versions of every kind this build can run: the in-process executors plus the
/// worker's kinds.
pub fn kind_versions(worker_kinds: &[WorkerKind]) -> BTreeMap<String, u32> {
    let mut map: BTreeMap<String, u32> = in_process_executors()
        .iter()
        .map(|e| (e.kind().to_string(), e.code_version()))
        .collect();
    for k in worker_kinds {
        map.entry(k.kind.clone()).or_insert(k.code_version);
    }
    map
}

/// Refuses, before anything runs, a plan with node kinds this build cannot execute.
pub fn check_supported(plan: &Plan, worker_kinds: &[WorkerKind]) -> Result<(), EngineError> {
    let versions = kind_versions(worker_kinds);
    let missing: Vec<&slider_recipe::Node> = plan
        .nodes
        .iter()
        .filter(|n| !versions.contains_key(n.params.kind()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let kinds: BTreeSet<String> = missing
        .iter()
        .map(|n| format!("`{}`", n.params.kind()))
        .collect();
    Err(EngineError::UnsupportedKinds {
        nodes: missing.iter().map(|n| format!("`{}`", n.name)).collect(),
        kinds: kinds.into_iter().collect(),
        supported: worker_kinds.iter().map(|k| k.kind.clone()).collect(),
    })
}

/// For each node, the indices of the nodes it reads.
pub(crate) fn dependencies(plan: &Plan) -> Vec<Vec<usize>> {
    let mut deps = vec![Vec::new(); plan.nodes.len()];
    for gi in plan.graph.node_indices() {
        let consumer = plan.graph[gi];
        for src in plan.graph.neighbors_directed(gi, Direction::Incoming) {
            let producer = plan.graph[src];
            if consumer < deps.len() && !deps[consumer].contains(&producer) {
                deps[consumer].push(producer);
            }
        }
    }
    deps
}

/// For each node, the indices of the nodes that read it (`deps` turned around).
fn consumers(deps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut consumers = vec![Vec::new(); deps.len()];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            consumers[d].push(i);
        }
    }
    consumers
}

/// Where an input's content lives and its hash.
#[derive(Debug, Clone)]
pub(crate) struct Produced {
    pub path: PathBuf,
    pub hash: String,
}

/// A node's key with what it was made from.
pub(crate) struct Keyed {
    pub fp: Fingerprint,
    /// Each input with the file holding its content.
    pub inputs: Vec<(Input, PathBuf)>,
    /// Each input file with the stamp it had when it was hashed.
    pub stamps: Vec<(PathBuf, Option<FileStamp>)>,
}

/// Fingerprints a node whose inputs are `produced` (by node index) or files (via `memo`).
pub(crate) fn fingerprint_node(
    plan: &Plan,
    index: &HashMap<&str, usize>,
    i: usize,
    version: u32,
    memo: &mut FileHashMemo,
    produced: &[Option<Produced>],
) -> Result<Keyed, EngineError> {
    let (mut inputs, mut stamps) = (Vec::new(), Vec::new());
    let fp = fingerprint(&plan.nodes[i].params, version, |input| match input {
        Input::File(p) => {
            let h = memo
                .hash(p)
                .map_err(EngineError::io("hashing input file", p))?;
            inputs.push((input.clone(), p.clone()));
            stamps.push((p.clone(), memo.stamp(p)));
            Ok(Some(h))
        }
        Input::Node(name) => {
            let Some(&j) = index.get(name.as_str()) else {
                return Err(EngineError::UnknownNode(name.clone()));
            };
            Ok(produced[j].as_ref().map(|p| {
                inputs.push((input.clone(), p.path.clone()));
                p.hash.clone()
            }))
        }
    })?;
    Ok(Keyed { fp, inputs, stamps })
}

enum Outcome {
    Done(Manifest),
    Failed(String),
    Cancelled,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Done,
    Failed,
}

/// Runs a plan against the store at `store_root`.
pub fn run(
    plan: &Plan,
    store_root: &Path,
    opts: &RunOptions,
    observer: &dyn Observer,
) -> Result<RunSummary, EngineError> {
    let started = Instant::now();
    check_supported(plan, &opts.worker_kinds)?;
    let (store, _lock) = Store::open_for_writing(store_root)?;
    let needs_worker = plan.nodes.iter().any(|n| {
        !sd_scripts::is_sd_scripts(&n.params)
            && opts.worker_kinds.iter().any(|k| k.kind == n.params.kind())
    });
    let commands_on_cluster = opts
        .slurm
        .as_ref()
        .is_some_and(|s| s.profile.command_nodes_on_cluster);
    let needs_cluster = needs_worker
        || (commands_on_cluster && plan.nodes.iter().any(|n| n.params.kind() == "command"));
    let cluster = match (&opts.slurm, needs_cluster) {
        (Some(settings), true) => Some(Arc::new(SlurmCluster::open(
            settings.clone(),
            store.root(),
        )?)),
        _ => None,
    };
    let pool = (needs_worker && opts.slurm.is_none()).then(|| {
        Arc::new(WorkerPool::new(
            opts.worker_command.clone(),
            &opts.devices,
            store.root().join("logs"),
            opts.cancel.clone(),
        ))
    });
    let mut executors = Executors::default();
    for e in in_process_executors() {
        executors.insert(e);
    }
    if let Some(cluster) = &cluster {
        for k in &opts.worker_kinds {
            executors.insert(Arc::new(SlurmExecutor {
                kind: k.kind.clone(),
                code_version: k.code_version,
                program: JobProgram::Worker,
                cluster: Arc::clone(cluster),
            }));
        }
        if commands_on_cluster {
            executors.insert(Arc::new(SlurmExecutor {
                kind: "command".into(),
                code_version: COMMAND_CODE_VERSION,
                program: JobProgram::Command,
                cluster: Arc::clone(cluster),
            }));
        }
    }
    if let Some(pool) = &pool {
        for k in &opts.worker_kinds {
            executors.insert(Arc::new(WorkerExecutor {
                kind: k.kind.clone(),
                code_version: k.code_version,
                pool: Arc::clone(pool),
            }));
        }
    }
    if plan
        .nodes
        .iter()
        .any(|n| sd_scripts::is_sd_scripts(&n.params))
    {
        let burn = executors.get("train").cloned();
        executors.insert(Arc::new(TrainDispatch {
            burn,
            sd_scripts: SdScriptsExecutor::new(&opts.devices),
        }));
    }
    let mut s = Scheduler::new(plan, &store, opts, observer)?;
    observer.event(Event::Planned {
        nodes: plan.nodes.len(),
    });
    let (tx, rx) = mpsc::channel::<(usize, Outcome, f64)>();
    std::thread::scope(|scope| -> Result<(), EngineError> {
        loop {
            if opts.cancel.is_cancelled() && !s.stop {
                tracing::warn!("interrupted: stopping running nodes");
                s.summary.interrupted = true;
                s.stop = true;
            }
            s.key_ready_nodes(&executors)?;
            // Dispatch within the limits.
            while let Some((i, keyed)) = s.next_to_start() {
                let Some(exec) = executors.get(plan.nodes[i].params.kind()).cloned() else {
                    continue;
                };
                s.started(i, keyed.fp.key.as_deref().unwrap_or_default());
                let tx = tx.clone();
                let store = &store;
                scope.spawn(move || {
                    let t0 = Instant::now();
                    let outcome =
                        execute_node(plan, i, exec.as_ref(), store, keyed, opts, observer);
                    let _ = tx.send((i, outcome, t0.elapsed().as_secs_f64()));
                });
            }
            s.save_journal_throttled();
            if s.is_finished() {
                break;
            }
            let (i, outcome, wall_s) = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let placement = executors
                .get(plan.nodes[i].params.kind())
                .map(|e| e.placement());
            s.finished(i, placement, outcome, wall_s);
        }
        Ok(())
    })?;
    drop(pool);
    s.finish(started)
}

/// A node (by index) with its key, waiting for a free slot.
type Queued = (usize, Keyed);

/// Each node's `NodeParams::work_estimate` plus the largest such sum over the nodes that
/// read it, recursively: how much work at least still follows once the node starts.
/// Starting the most urgent ready node first keeps the longest chain moving (list scheduling
/// by critical path): on the default recipe, the long `evaluate` of the finished slider
/// starts before the short check grids of the trainings. Consumers already in the store
/// count too (the sum is over the plan, before any key is known); that only orders nodes.
fn urgency(plan: &Plan, deps: &[Vec<usize>], consumers: &[Vec<usize>]) -> Vec<f64> {
    let n = plan.nodes.len();
    let mut urgency: Vec<f64> = plan
        .nodes
        .iter()
        .map(|node| node.params.work_estimate())
        .collect();
    // From the sinks towards the sources: a node is done once all its consumers are.
    let mut pending: Vec<usize> = consumers.iter().map(Vec::len).collect();
    let mut done: Vec<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    while let Some(i) = done.pop() {
        let after = consumers[i].iter().map(|&c| urgency[c]).fold(0.0, f64::max);
        urgency[i] += after;
        for &d in &deps[i] {
            pending[d] -= 1;
            if pending[d] == 0 {
                done.push(d);
            }
        }
    }
    urgency
}

/// Takes the queued node with the highest urgency; among equals, the one queued first.
fn most_urgent(queue: &mut VecDeque<Queued>, urgency: &[f64]) -> Option<Queued> {
    let mut best: Option<(usize, f64)> = None;
    for (pos, (i, _)) in queue.iter().enumerate() {
        let u = urgency.get(*i).copied().unwrap_or(0.0);
        if best.is_none_or(|(_, b)| u > b) {
            best = Some((pos, u));
        }
    }
    queue.remove(best?.0)
}

/// The state of one run: which nodes wait, run, are done or failed, what they produced, the
/// queues, the journal and the summary so far. [`run`] drives it: key what is ready, start
/// what the limits allow, record what finishes.
struct Scheduler<'a> {
    plan: &'a Plan,
    store: &'a Store,
    opts: &'a RunOptions,
    observer: &'a dyn Observer,
    index: HashMap<&'a str, usize>,
    versions: BTreeMap<String, u32>,
    memo: FileHashMemo,
    journal: Journal,
    journal_path: PathBuf,
    journal_dirty: bool,
    journal_saved: Instant,
    deps: Vec<Vec<usize>>,
    consumers: Vec<Vec<usize>>,
    /// Each node's work plus the most work on a path from it to a sink: of the nodes queued
    /// for a slot, the highest starts first (critical path first).
    urgency: Vec<f64>,
    waiting_on: Vec<usize>,
    state: Vec<State>,
    produced: Vec<Option<Produced>>,
    keys: Vec<Option<String>>,
    manifests: Vec<Option<Manifest>>,
    ready: VecDeque<usize>,
    queued_in_process: VecDeque<Queued>,
    queued_worker: VecDeque<Queued>,
    running_in_process: usize,
    running_worker: usize,
    summary: RunSummary,
    stop: bool,
}

impl<'a> Scheduler<'a> {
    fn new(
        plan: &'a Plan,
        store: &'a Store,
        opts: &'a RunOptions,
        observer: &'a dyn Observer,
    ) -> Result<Self, EngineError> {
        let n = plan.nodes.len();
        let deps = dependencies(plan);
        let consumers = consumers(&deps);
        let waiting_on: Vec<usize> = deps.iter().map(Vec::len).collect();
        let journal_path = store.journal_path(&plan.recipe_path);
        let mut journal = Journal::load(&journal_path)?;
        journal.runner_pid = Some(std::process::id());
        Ok(Scheduler {
            plan,
            store,
            opts,
            observer,
            index: plan.index_by_name(),
            versions: kind_versions(&opts.worker_kinds),
            memo: FileHashMemo::load(&store.memo_path()),
            journal,
            journal_path,
            journal_dirty: false,
            // Throttles journal writes for plans with many quick nodes; the first one is
            // immediate so `status` sees a running node at once.
            journal_saved: Instant::now()
                .checked_sub(Duration::from_secs(1))
                .unwrap_or_else(Instant::now),
            ready: (0..n).filter(|&i| waiting_on[i] == 0).collect(),
            urgency: urgency(plan, &deps, &consumers),
            deps,
            consumers,
            waiting_on,
            state: vec![State::Waiting; n],
            produced: vec![None; n],
            keys: vec![None; n],
            manifests: vec![None; n],
            queued_in_process: VecDeque::new(),
            queued_worker: VecDeque::new(),
            running_in_process: 0,
            running_worker: 0,
            summary: RunSummary {
                ran: vec![],
                cached: vec![],
                failed: vec![],
                skipped: vec![],
                interrupted: false,
                wall_s: 0.0,
                hashed_bytes: 0,
                published: vec![],
                publish_errors: vec![],
                lockfile: None,
                store: store.root().to_path_buf(),
                keys: BTreeMap::new(),
            },
            stop: false,
        })
    }

    fn report(
        &self,
        i: usize,
        key: Option<&str>,
        wall_s: f64,
        log: Option<PathBuf>,
        error: Option<String>,
    ) -> NodeReport {
        NodeReport {
            name: self.plan.nodes[i].name.clone(),
            kind: self.plan.nodes[i].params.kind().to_string(),
            key: key.map(str::to_string),
            wall_s,
            log,
            error,
        }
    }

    /// Node `i` is done: its consumers wait on one input less.
    fn release_consumers(&mut self, i: usize) {
        for &c in &self.consumers[i] {
            self.waiting_on[c] -= 1;
            if self.waiting_on[c] == 0 {
                self.ready.push_back(c);
            }
        }
    }

    /// Keys every ready node; cached ones finish at once (and may make more ready), the rest
    /// join the queue of their placement.
    fn key_ready_nodes(&mut self, executors: &Executors) -> Result<(), EngineError> {
        while !self.stop
            && let Some(i) = self.ready.pop_front()
        {
            let node = &self.plan.nodes[i];
            let version = self.versions.get(node.params.kind()).copied().unwrap_or(0);
            let keyed = match fingerprint_node(
                self.plan,
                &self.index,
                i,
                version,
                &mut self.memo,
                &self.produced,
            ) {
                Ok(keyed) => keyed,
                Err(e) => {
                    self.state[i] = State::Failed;
                    let report = self.report(i, None, 0.0, None, Some(e.to_string()));
                    self.summary.failed.push(report);
                    self.observer.event(Event::Finished {
                        node: &node.name,
                        ok: false,
                        wall_s: 0.0,
                    });
                    self.stop |= !self.opts.keep_going;
                    continue;
                }
            };
            let Some(key) = keyed.fp.key.clone() else {
                return Err(EngineError::Internal(format!(
                    "`{}` became ready with pending inputs",
                    node.name
                )));
            };
            self.keys[i] = Some(key.clone());
            if let Some(m) = self.store.manifest(&key)? {
                self.cached(i, &key, m)?;
                continue;
            }
            let Some(exec) = executors.get(node.params.kind()) else {
                return Err(EngineError::Internal(format!(
                    "no executor for `{}`",
                    node.params.kind()
                )));
            };
            match exec.placement() {
                Placement::InProcess => self.queued_in_process.push_back((i, keyed)),
                Placement::Worker => self.queued_worker.push_back((i, keyed)),
            }
        }
        Ok(())
    }

    /// Node `i`'s key `key` is in the store with manifest `m`.
    fn cached(&mut self, i: usize, key: &str, m: Manifest) -> Result<(), EngineError> {
        let Some(primary) = m.primary() else {
            return Err(EngineError::Corrupt {
                what: "manifest",
                path: self.store.object_dir(key),
                message: "no outputs".into(),
            });
        };
        self.produced[i] = Some(Produced {
            path: self.store.object_dir(key).join(&primary.file),
            hash: primary.hash.clone(),
        });
        self.state[i] = State::Done;
        let report = self.report(i, Some(key), 0.0, Some(self.store.log_path(key)), None);
        self.summary.cached.push(report);
        let name = &self.plan.nodes[i].name;
        let unchanged = self
            .journal
            .nodes
            .get(name)
            .is_some_and(|e| e.state == JournalState::Done && e.key.as_deref() == Some(key));
        if !unchanged {
            self.journal
                .set(name, JournalState::Done, Some(key), None, None);
            self.journal_dirty = true;
        }
        self.manifests[i] = Some(m);
        self.observer.event(Event::Cached { node: name });
        self.release_consumers(i);
        Ok(())
    }

    /// Worker nodes at once: one per local device, or the cluster's `max_jobs`.
    fn worker_slots(&self) -> usize {
        match &self.opts.slurm {
            Some(s) => s.max_jobs.max(1),
            None => self.opts.devices.len().max(1),
        }
    }

    /// The next queued node the limits allow to start (in-process nodes `--jobs` at a time,
    /// worker nodes one per device), counted as running.
    fn next_to_start(&mut self) -> Option<Queued> {
        if self.stop {
            return None;
        }
        if self.running_in_process < self.opts.jobs.max(1) && !self.queued_in_process.is_empty() {
            self.running_in_process += 1;
            most_urgent(&mut self.queued_in_process, &self.urgency)
        } else if self.running_worker < self.worker_slots() && !self.queued_worker.is_empty() {
            self.running_worker += 1;
            most_urgent(&mut self.queued_worker, &self.urgency)
        } else {
            None
        }
    }

    /// Node `i` starts with key `key`.
    fn started(&mut self, i: usize, key: &str) {
        let node = &self.plan.nodes[i];
        self.state[i] = State::Running;
        self.journal.set(
            &node.name,
            JournalState::Running,
            Some(key),
            Some(&self.store.log_path(key)),
            None,
        );
        self.journal_dirty = true;
        self.observer.event(Event::Started {
            node: &node.name,
            kind: node.params.kind(),
        });
    }

    fn save_journal_throttled(&mut self) {
        if self.journal_dirty && self.journal_saved.elapsed() > Duration::from_millis(250) {
            save_journal(&self.journal, &self.journal_path);
            self.journal_dirty = false;
            self.journal_saved = Instant::now();
        }
    }

    /// Nothing runs and nothing more will start.
    fn is_finished(&self) -> bool {
        self.running_in_process + self.running_worker == 0
            && (self.stop
                || (self.ready.is_empty()
                    && self.queued_in_process.is_empty()
                    && self.queued_worker.is_empty()))
    }

    /// Records node `i`'s outcome after `wall_s` seconds.
    fn finished(&mut self, i: usize, placement: Option<Placement>, outcome: Outcome, wall_s: f64) {
        match placement {
            Some(Placement::Worker) => self.running_worker -= 1,
            _ => self.running_in_process -= 1,
        }
        let name = self.plan.nodes[i].name.as_str();
        let key = self.keys[i].clone();
        let log = key.as_deref().map(|k| self.store.log_path(k));
        let (journal_state, error, ok) = match outcome {
            Outcome::Done(m) => {
                if let Some(primary) = m.primary() {
                    self.produced[i] = Some(Produced {
                        path: self.store.object_dir(&m.key).join(&primary.file),
                        hash: primary.hash.clone(),
                    });
                }
                self.state[i] = State::Done;
                let report = self.report(i, key.as_deref(), wall_s, log.clone(), None);
                self.summary.ran.push(report);
                self.manifests[i] = Some(m);
                self.release_consumers(i);
                (JournalState::Done, None, true)
            }
            Outcome::Failed(err) => {
                self.state[i] = State::Failed;
                let report = self.report(i, key.as_deref(), wall_s, log.clone(), Some(err.clone()));
                self.summary.failed.push(report);
                self.stop |= !self.opts.keep_going;
                (JournalState::Failed, Some(err), false)
            }
            Outcome::Cancelled => {
                self.state[i] = State::Waiting;
                self.summary.interrupted = true;
                (JournalState::Failed, Some("interrupted".into()), false)
            }
        };
        self.journal
            .set(name, journal_state, key.as_deref(), log.as_deref(), error);
        self.observer.event(Event::Finished {
            node: name,
            ok,
            wall_s,
        });
        self.journal_dirty = true;
    }

    /// After the last node: the skipped nodes with their reasons, the keys, publishing, the
    /// lockfile, the journal and the memo.
    fn finish(mut self, started: Instant) -> Result<RunSummary, EngineError> {
        let plan = self.plan;
        for i in 0..plan.nodes.len() {
            if self.state[i] == State::Waiting {
                let reason = self.skip_reason(i);
                self.observer.event(Event::Skipped {
                    node: &plan.nodes[i].name,
                    reason: &reason,
                });
                let report = self.report(i, None, 0.0, None, Some(reason));
                self.summary.skipped.push(report);
            }
        }
        for (i, k) in self.keys.iter().enumerate() {
            if let (State::Done, Some(k)) = (self.state[i], k) {
                self.summary
                    .keys
                    .insert(plan.nodes[i].name.clone(), k.clone());
            }
        }
        if self.opts.publish {
            publish(
                plan,
                &self.index,
                &self.produced,
                &mut self.memo,
                &mut self.summary,
            );
        }
        if self.opts.write_lockfile
            && self.summary.failed.is_empty()
            && self.summary.skipped.is_empty()
            && !self.summary.interrupted
        {
            self.summary.lockfile = Some(self.write_lockfile()?);
        }
        self.journal.runner_pid = None;
        if self.journal_dirty {
            save_journal(&self.journal, &self.journal_path);
        }
        self.summary.hashed_bytes = self.memo.hashed_bytes;
        self.memo
            .save(&self.store.memo_path())
            .map_err(EngineError::io("writing", self.store.memo_path()))?;
        self.summary.wall_s = started.elapsed().as_secs_f64();
        Ok(self.summary)
    }

    /// Why node `i`, still waiting at the end, did not run.
    fn skip_reason(&self, i: usize) -> String {
        let failed_inputs: Vec<&str> = self.deps[i]
            .iter()
            .filter(|&&d| self.state[d] == State::Failed)
            .map(|&d| self.plan.nodes[d].name.as_str())
            .collect();
        if self.summary.interrupted {
            "interrupted".to_string()
        } else if !failed_inputs.is_empty() {
            format!("input failed: {}", failed_inputs.join(", "))
        } else if self.stop {
            "stopped after a failure (--no-keep-going)".to_string()
        } else {
            "an upstream node did not finish".to_string()
        }
    }

    fn write_lockfile(&self) -> Result<PathBuf, EngineError> {
        let lock = Lockfile {
            format: crate::lockfile::LOCKFILE_FORMAT,
            nodes: self
                .plan
                .nodes
                .iter()
                .zip(&self.manifests)
                .filter_map(|(node, m)| {
                    let m = m.as_ref()?;
                    Some((
                        node.name.clone(),
                        LockedNode {
                            kind: m.kind.clone(),
                            key: m.key.clone(),
                            outputs: m.outputs.clone(),
                        },
                    ))
                })
                .collect(),
        };
        let path = lockfile_path(&self.plan.recipe_path);
        lock.write(&path)?;
        Ok(path)
    }
}

fn save_journal(journal: &Journal, path: &Path) {
    if let Err(e) = journal.save(path) {
        tracing::warn!("could not write the run journal {}: {e}", path.display());
    }
}

/// Copies finished primary outputs to the recipe's `outputs` paths (skipping files that
/// already hold the right bytes, per the hash memo).
fn publish(
    plan: &Plan,
    index: &HashMap<&str, usize>,
    produced: &[Option<Produced>],
    memo: &mut FileHashMemo,
    summary: &mut RunSummary,
) {
    for (name, dest) in &plan.outputs {
        let Some(p) = index.get(name.as_str()).and_then(|&i| produced[i].as_ref()) else {
            summary.publish_errors.push(format!(
                "`{name}` did not finish, so {} was not published",
                dest.display()
            ));
            continue;
        };
        if memo.lookup(dest) == Some(p.hash.as_str()) {
            summary.published.push(dest.clone());
            continue;
        }
        let result = fsutil::copy_atomic(&p.path, dest).and_then(|()| fs::metadata(dest));
        match result {
            Ok(meta) => {
                memo.record(dest, &meta, p.hash.clone());
                summary.published.push(dest.clone());
            }
            Err(e) => summary
                .publish_errors
                .push(format!("publishing `{name}` to {}: {e}", dest.display())),
        }
    }
}

/// Runs one node into a temp dir and commits it to the store.
#[allow(clippy::too_many_arguments)]
/// The input files whose stamp changed since they were hashed for the key.
fn changed_inputs(stamps: &[(PathBuf, Option<FileStamp>)]) -> Vec<&Path> {
    stamps
        .iter()
        .filter(|(path, stamp)| stamp.is_none() || FileStamp::read(path) != *stamp)
        .map(|(path, _)| path.as_path())
        .collect()
}

fn execute_node(
    plan: &Plan,
    i: usize,
    exec: &dyn Executor,
    store: &Store,
    keyed: Keyed,
    opts: &RunOptions,
    observer: &dyn Observer,
) -> Outcome {
    let Keyed { fp, inputs, stamps } = keyed;
    let node = &plan.nodes[i];
    let Some(key) = fp.key.clone() else {
        return Outcome::Failed("node has no key".into());
    };
    let log = match NodeLog::create(&store.log_path(&key)) {
        Ok(l) => l,
        Err(e) => return Outcome::Failed(format!("cannot open the node log: {e}")),
    };
    log.line(&format!(
        "== slider-run: node `{}` ({}) key {key}",
        node.name,
        node.params.kind()
    ));
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let t0 = Instant::now();
    let dirs = (|| -> Result<(PathBuf, PathBuf, Option<PathBuf>), EngineError> {
        let out = store.new_tmp_dir(&key)?;
        let scratch = store.new_tmp_dir(&format!("{key}.scratch"))?;
        let work = if exec.checkpoints() {
            let w = store.work_dir(&key);
            fs::create_dir_all(&w).map_err(EngineError::io("creating work dir", &w))?;
            Some(w)
        } else {
            None
        };
        Ok((out, scratch, work))
    })();
    let (out_dir, scratch, work) = match dirs {
        Ok(d) => d,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let progress = |p: Progress| {
        observer.event(Event::Progress {
            node: &node.name,
            progress: &p,
        })
    };
    let job = Job {
        node: &node.name,
        key: &key,
        params: &node.params,
        root: &plan.root,
        inputs: &inputs,
        out_dir: &out_dir,
        scratch_dir: &scratch,
        work_dir: work.as_deref(),
        log: &log,
        cancel: &opts.cancel,
        progress: &progress,
    };
    let result = exec.execute(&job);
    let _ = fsutil::remove_any(&scratch);
    // An input edited while the node ran: the result may come from content the key does not
    // describe, so it is not committed under that key.
    let changed = changed_inputs(&stamps);
    let result = match result {
        Ok(_) if !changed.is_empty() => Err(ExecError::Failed(format!(
            "input {} changed while the node ran; its result was discarded (the key was made \
             from the content before the change): run again",
            changed
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        other => other,
    };
    let outcome = match result {
        Ok(outputs) => {
            let mut files = Vec::new();
            for o in outputs {
                let path = out_dir.join(&o.file);
                match (fsutil::hash_file(&path), fs::metadata(&path)) {
                    (Ok(hash), Ok(meta)) => files.push(OutputFile {
                        name: o.name,
                        file: o.file,
                        hash,
                        size: meta.len(),
                    }),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = fsutil::remove_any(&out_dir);
                        return Outcome::Failed(format!("reading output {}: {e}", path.display()));
                    }
                }
            }
            let manifest = Manifest {
                format: MANIFEST_FORMAT,
                key: key.clone(),
                kind: node.params.kind().to_string(),
                code_version: exec.code_version(),
                outputs: files,
                started_unix_s,
                wall_s: t0.elapsed().as_secs_f64(),
                backend: match exec.placement() {
                    Placement::InProcess => "cpu".into(),
                    Placement::Worker => match &opts.slurm {
                        Some(s) => format!("slurm (job name {})", s.job_name),
                        None => format!("worker ({})", opts.devices.join(",")),
                    },
                },
                engine_version: env!("CARGO_PKG_VERSION").into(),
                doc: fp.doc,
                sources: fp.sources,
            };
            match store.commit(&out_dir, &manifest) {
                Ok(()) => {
                    if let Some(w) = &work {
                        let _ = fsutil::remove_any(w);
                    }
                    log.line(&format!("== done in {:.3} s", manifest.wall_s));
                    Outcome::Done(manifest)
                }
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
        Err(ExecError::Cancelled) => Outcome::Cancelled,
        Err(ExecError::Failed(msg)) => {
            log.line(&format!("== failed: {msg}"));
            Outcome::Failed(msg)
        }
    };
    if !matches!(outcome, Outcome::Done(_)) {
        let _ = fsutil::remove_any(&out_dir);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_plans::{plan, sh};
    use slider_recipe::NodeParams;

    fn train(steps: usize) -> NodeParams {
        let mut t = crate::test_plans::train(Input::File("/base.safetensors".into()));
        if let NodeParams::Train(t) = &mut t {
            t.max_train_steps = steps;
        }
        t
    }

    #[test]
    fn urgency_adds_the_most_work_that_follows() {
        let dir = tempfile::tempdir().unwrap();
        // a (10 steps) feeds b (20 steps) and a command; c (25 steps) feeds nothing.
        let mut b = train(20);
        if let NodeParams::Train(t) = &mut b {
            t.base = Input::Node("a".into());
        }
        let use_a = sh(
            "cat {x} > {out}",
            &[("x", Input::Node("a".into()))],
            &[("out", "o")],
        );
        let p = plan(
            dir.path(),
            vec![
                ("a", train(10)),
                ("b", b),
                ("use_a", use_a),
                ("c", train(25)),
            ],
            &[],
        );
        let deps = dependencies(&p);
        let consumers = consumers(&deps);
        let step = p.nodes[0].params.work_estimate() / 10.0;
        let per_step: Vec<f64> = urgency(&p, &deps, &consumers)
            .iter()
            .map(|u| u / step)
            .collect();
        assert_eq!(per_step, [30.0, 20.0, 0.0, 25.0]);
    }

    #[test]
    fn the_most_urgent_queued_node_is_taken_first_and_ties_keep_queue_order() {
        let keyed = || Keyed {
            fp: Fingerprint {
                doc: serde_json::Value::Null,
                sources: vec![],
                key: None,
            },
            inputs: vec![],
            stamps: vec![],
        };
        let mut queue: VecDeque<Queued> = [3, 0, 1, 2].into_iter().map(|i| (i, keyed())).collect();
        let urgency = [5.0, 7.0, 7.0, 1.0];
        let order: Vec<usize> =
            std::iter::from_fn(|| most_urgent(&mut queue, &urgency).map(|(i, _)| i)).collect();
        assert_eq!(order, [1, 2, 0, 3]);
    }
}
