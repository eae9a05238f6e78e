//! Cluster profiles (`--profile cluster.yaml`): how the GPU nodes of a run become Slurm jobs.
//! Nothing here enters a node's key; a profile only says where and with what resources a node
//! runs. Read with the recipe's YAML tree, so every problem has a line:column.
//!
//! ```yaml
//! job_name: slider-eyesize        # default: slider-<recipe name>
//! max_jobs: 8                     # jobs in flight (default 8; --max-jobs wins)
//! poll_interval_s: 2              # one batched squeue per interval (>= 0.2)
//! command: [/shared/bin/slider-run]   # slider-run on the cluster's nodes (default: this one)
//! command_nodes: local            # `cluster`: `command` nodes run as jobs too (default local)
//! default:                        # every GPU kind
//!   partition: gpu
//!   gres: gpu:1
//!   cpus: 4
//!   mem: 16G
//!   time: "04:00:00"
//!   account: lab
//!   extra: ["--qos=normal"]
//!   device: cuda:0                # the worker's device inside the job
//!   retries: 1                    # resubmissions of a job that ended without an answer
//!   max_requeues: 3               # the guard against a job requeueing itself in a loop
//!   signal_before_s: 120          # SIGUSR1 this long before the time limit: checkpoint, requeue
//! kinds:
//!   train: {time: "08:00:00"}     # per kind, over `default`
//!   command: {gres: "gpu:1"}      # only with `command_nodes: cluster`
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use crate::RecipeError;
use crate::diag::{Diag, Sources, Span, closest};
use crate::yaml::{self, Entry, Value, Yaml};

/// The resources and behaviour of the jobs of one node kind. `None` leaves Slurm's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobResources {
    pub partition: Option<String>,
    pub gres: Option<String>,
    pub cpus: Option<u32>,
    pub mem: Option<String>,
    pub time: Option<String>,
    pub account: Option<String>,
    /// Further `sbatch` flags, each one argument (`--qos=normal`).
    pub extra: Vec<String>,
    /// The worker's device inside the job (`cpu`, `cuda:0`, `wgpu:0`).
    pub device: Option<String>,
    pub retries: Option<u32>,
    pub max_requeues: Option<u32>,
    pub signal_before_s: Option<u32>,
}

impl JobResources {
    /// `over` on top of `self`: its set fields win, `extra` flags are appended.
    fn overlaid(&self, over: &JobResources) -> JobResources {
        let pick = |a: &Option<String>, b: &Option<String>| b.clone().or_else(|| a.clone());
        JobResources {
            partition: pick(&self.partition, &over.partition),
            gres: pick(&self.gres, &over.gres),
            cpus: over.cpus.or(self.cpus),
            mem: pick(&self.mem, &over.mem),
            time: pick(&self.time, &over.time),
            account: pick(&self.account, &over.account),
            extra: self.extra.iter().chain(&over.extra).cloned().collect(),
            device: pick(&self.device, &over.device),
            retries: over.retries.or(self.retries),
            max_requeues: over.max_requeues.or(self.max_requeues),
            signal_before_s: over.signal_before_s.or(self.signal_before_s),
        }
    }
}

/// A whole profile.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterProfile {
    pub job_name: Option<String>,
    pub max_jobs: Option<usize>,
    pub poll_interval_s: f64,
    /// The program (and leading arguments) that runs `slider-run` on the cluster's nodes.
    pub command: Option<Vec<String>>,
    /// Accept a store on a node-local filesystem (a single-node cluster).
    pub allow_node_local_store: bool,
    /// `command` nodes run as cluster jobs too (`command_nodes: cluster`), not on the runner.
    pub command_nodes_on_cluster: bool,
    pub default: JobResources,
    pub kinds: BTreeMap<String, JobResources>,
}

impl Default for ClusterProfile {
    fn default() -> ClusterProfile {
        ClusterProfile {
            job_name: None,
            max_jobs: None,
            poll_interval_s: DEFAULT_POLL_INTERVAL_S,
            command: None,
            allow_node_local_store: false,
            command_nodes_on_cluster: false,
            default: JobResources::default(),
            kinds: BTreeMap::new(),
        }
    }
}

const DEFAULT_POLL_INTERVAL_S: f64 = 2.0;
/// Faster polling than this would be one squeue call per job per second on a busy cluster.
const MIN_POLL_INTERVAL_S: f64 = 0.2;

impl ClusterProfile {
    /// The resources of `kind`'s jobs: `default` with the kind's own entry over it.
    pub fn for_kind(&self, kind: &str) -> JobResources {
        match self.kinds.get(kind) {
            Some(k) => self.default.overlaid(k),
            None => self.default.clone(),
        }
    }
}

const TOP: &[&str] = &[
    "job_name",
    "max_jobs",
    "poll_interval_s",
    "command",
    "allow_node_local_store",
    "command_nodes",
    "default",
    "kinds",
];
const RESOURCE_KEYS: &[&str] = &[
    "partition",
    "gres",
    "cpus",
    "mem",
    "time",
    "account",
    "extra",
    "device",
    "retries",
    "max_requeues",
    "signal_before_s",
];

/// Reads a profile file. `gpu_kinds` are the kinds that run as jobs (the worker's); a
/// `kinds:` entry for any other kind is refused, since it would have no effect.
pub fn load_profile(path: &Path, gpu_kinds: &[&str]) -> Result<ClusterProfile, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_profile_str(&text, path, gpu_kinds)
}

/// The same from text; `path` names the file in messages.
pub fn load_profile_str(
    text: &str,
    path: &Path,
    gpu_kinds: &[&str],
) -> Result<ClusterProfile, RecipeError> {
    let sources = Sources::new(path.display().to_string(), text);
    let mut r = Reader { diags: Vec::new() };
    let profile = match yaml::parse(text, 0, 0) {
        Ok(doc) => r.profile(&doc, gpu_kinds),
        Err(d) => {
            r.diags.push(d);
            ClusterProfile::default()
        }
    };
    if r.diags.is_empty() {
        Ok(profile)
    } else {
        Err(sources.error(r.diags))
    }
}

struct Reader {
    diags: Vec<Diag>,
}

impl Reader {
    fn wrong(&mut self, key: &str, y: &Yaml, expected: &str) {
        self.diags.push(Diag::new(
            "profile::wrong_type",
            format!("`{key}` must be {expected}"),
            y.span,
            format!("found {}", y.value.describe()),
        ));
    }

    fn unknown(&mut self, key: &str, span: Span, known: &[&str], what: &str) {
        let help = match closest(key, known.iter().copied()) {
            Some(c) => format!("did you mean `{c}`?"),
            None => format!("{what} has: {}", known.join(", ")),
        };
        self.diags.push(
            Diag::new(
                "profile::unknown_key",
                format!("unknown key `{key}`"),
                span,
                format!("not a key of {what}"),
            )
            .help(help),
        );
    }

    fn map<'a>(&mut self, key: &str, y: &'a Yaml) -> &'a [Entry] {
        match &y.value {
            Value::Map(entries) => entries,
            Value::Null => &[],
            _ => {
                self.wrong(key, y, "a mapping");
                &[]
            }
        }
    }

    fn text(&mut self, key: &str, y: &Yaml) -> Option<String> {
        match &y.value {
            Value::Str(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            _ => {
                self.wrong(key, y, "a non-empty string");
                None
            }
        }
    }

    fn whole(&mut self, key: &str, y: &Yaml, min: i64) -> Option<u64> {
        match y.value {
            Value::Int(i) if i >= min => u64::try_from(i).ok(),
            _ => {
                self.wrong(key, y, &format!("a whole number >= {min}"));
                None
            }
        }
    }

    fn strings(&mut self, key: &str, y: &Yaml) -> Vec<String> {
        match &y.value {
            Value::Str(s) if !s.trim().is_empty() => vec![s.clone()],
            Value::Seq(items) if !items.is_empty() => {
                items.iter().filter_map(|i| self.text(key, i)).collect()
            }
            _ => {
                self.wrong(key, y, "a string or a non-empty list of strings");
                Vec::new()
            }
        }
    }

    fn profile(&mut self, doc: &Yaml, gpu_kinds: &[&str]) -> ClusterProfile {
        let mut p = ClusterProfile::default();
        let entries = self.map("the profile", doc);
        // `command` nodes are jobs only when the profile says so, wherever that line is.
        for e in entries.iter().filter(|e| e.key == "command_nodes") {
            match &e.value.value {
                Value::Str(s) if s == "local" => p.command_nodes_on_cluster = false,
                Value::Str(s) if s == "cluster" => p.command_nodes_on_cluster = true,
                _ => self.wrong("command_nodes", &e.value, "`local` or `cluster`"),
            }
        }
        let mut job_kinds: Vec<&str> = gpu_kinds.to_vec();
        if p.command_nodes_on_cluster {
            job_kinds.push("command");
        }
        let gpu_kinds = job_kinds.as_slice();
        for e in entries {
            let y = &e.value;
            match e.key.as_str() {
                "job_name" => {
                    p.job_name = self.text("job_name", y);
                    if let Some(n) = &p.job_name
                        && n.chars().any(|c| c.is_whitespace() || c == ',')
                    {
                        self.diags.push(Diag::new(
                            "profile::bad_value",
                            "`job_name` cannot contain spaces or commas (squeue --name lists names)",
                            y.span,
                            "here",
                        ));
                    }
                }
                "max_jobs" => p.max_jobs = self.whole("max_jobs", y, 1).map(|n| n as usize),
                "poll_interval_s" => match y.value {
                    Value::Int(i) if i as f64 >= MIN_POLL_INTERVAL_S => {
                        p.poll_interval_s = i as f64
                    }
                    Value::Float(f) if f >= MIN_POLL_INTERVAL_S && f.is_finite() => {
                        p.poll_interval_s = f
                    }
                    _ => self.wrong(
                        "poll_interval_s",
                        y,
                        &format!("a number of seconds >= {MIN_POLL_INTERVAL_S}"),
                    ),
                },
                "command" => {
                    let c = self.strings("command", y);
                    p.command = (!c.is_empty()).then_some(c);
                }
                "allow_node_local_store" => match y.value {
                    Value::Bool(b) => p.allow_node_local_store = b,
                    _ => self.wrong("allow_node_local_store", y, "true or false"),
                },
                "command_nodes" => {}
                "default" => p.default = self.resources("default", y),
                "kinds" => {
                    for k in self.map("kinds", y) {
                        if k.key == "command" && !p.command_nodes_on_cluster {
                            self.diags.push(
                                Diag::new(
                                    "profile::unknown_kind",
                                    "`command` nodes run on the runner's machine",
                                    k.key_span,
                                    "not a cluster job without `command_nodes: cluster`",
                                )
                                .help("add `command_nodes: cluster` to run them as jobs"),
                            );
                            continue;
                        }
                        if !gpu_kinds.contains(&k.key.as_str()) {
                            let mut d = Diag::new(
                                "profile::unknown_kind",
                                format!("`{}` nodes do not run as cluster jobs", k.key),
                                k.key_span,
                                "not a GPU kind",
                            )
                            .help(format!(
                                "the kinds that run as jobs: {}",
                                gpu_kinds.join(", ")
                            ));
                            if let Some(c) = closest(&k.key, gpu_kinds.iter().copied()) {
                                d = d.help(format!("did you mean `{c}`?"));
                            }
                            self.diags.push(d);
                            continue;
                        }
                        let r = self.resources(&k.key, &k.value);
                        p.kinds.insert(k.key.clone(), r);
                    }
                }
                other => self.unknown(other, e.key_span, TOP, "a cluster profile"),
            }
        }
        p
    }

    fn resources(&mut self, section: &str, y: &Yaml) -> JobResources {
        let mut r = JobResources::default();
        for e in self.map(section, y) {
            let v = &e.value;
            let key = e.key.as_str();
            match key {
                "partition" => r.partition = self.text(key, v),
                "gres" => r.gres = self.text(key, v),
                "mem" => r.mem = self.text(key, v),
                "time" => r.time = self.text(key, v),
                "account" => r.account = self.text(key, v),
                "device" => r.device = self.text(key, v),
                "extra" => r.extra = self.strings(key, v),
                "cpus" => r.cpus = self.whole(key, v, 1).and_then(|n| u32::try_from(n).ok()),
                "retries" => r.retries = self.whole(key, v, 0).and_then(|n| u32::try_from(n).ok()),
                "max_requeues" => {
                    r.max_requeues = self.whole(key, v, 0).and_then(|n| u32::try_from(n).ok())
                }
                "signal_before_s" => {
                    r.signal_before_s = self.whole(key, v, 1).and_then(|n| u32::try_from(n).ok())
                }
                other => self.unknown(other, e.key_span, RESOURCE_KEYS, &format!("`{section}`")),
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: &[&str] = &["train", "xy_plot", "evaluate"];

    fn load(text: &str) -> Result<ClusterProfile, RecipeError> {
        load_profile_str(text, Path::new("cluster.yaml"), GPU)
    }

    /// Each problem as "line:column message".
    fn problems(err: &RecipeError) -> Vec<String> {
        err.problems()
            .iter()
            .map(|p| {
                let l = p.location();
                format!("{}:{} {}", l.line, l.column, p.message())
            })
            .collect()
    }

    #[test]
    fn a_kinds_entry_overlays_the_default() {
        let p = load(
            "max_jobs: 3\npoll_interval_s: 0.5\ncommand: /opt/slider-run\ndefault:\n  partition: gpu\n  gres: gpu:1\n  extra: --qos=low\n  retries: 2\nkinds:\n  train: {time: '08:00:00', extra: [--exclusive], retries: 0}\n",
        )
        .unwrap();
        assert_eq!(p.max_jobs, Some(3));
        assert_eq!(p.poll_interval_s, 0.5);
        assert_eq!(p.command, Some(vec!["/opt/slider-run".to_string()]));
        let t = p.for_kind("train");
        assert_eq!(t.partition.as_deref(), Some("gpu"));
        assert_eq!(t.time.as_deref(), Some("08:00:00"));
        assert_eq!(t.extra, ["--qos=low", "--exclusive"]);
        assert_eq!(t.retries, Some(0));
        let e = p.for_kind("evaluate");
        assert_eq!((e.time, e.retries), (None, Some(2)));
    }

    #[test]
    fn unknown_keys_cpu_kinds_and_bad_values_are_refused_with_their_place() {
        let err = load("defualt: {}\nkinds:\n  merge: {cpus: 2}\n  train: {cpu: 2, retries: -1}\npoll_interval_s: 0.01\njob_name: two words\n")
            .unwrap_err();
        assert_eq!(
            problems(&err),
            [
                "1:1 unknown key `defualt`",
                "3:3 `merge` nodes do not run as cluster jobs",
                "4:11 unknown key `cpu`",
                "4:28 `retries` must be a whole number >= 0",
                "5:18 `poll_interval_s` must be a number of seconds >= 0.2",
                "6:11 `job_name` cannot contain spaces or commas (squeue --name lists names)",
            ]
        );
    }

    #[test]
    fn command_nodes_are_jobs_only_when_the_profile_says_so() {
        let p = load("kinds:\n  command: {gres: 'gpu:1'}\ncommand_nodes: cluster\n").unwrap();
        assert!(p.command_nodes_on_cluster);
        assert_eq!(p.for_kind("command").gres.as_deref(), Some("gpu:1"));
        assert!(
            !load("command_nodes: local\n")
                .unwrap()
                .command_nodes_on_cluster
        );
        for (text, expected) in [
            (
                "kinds:\n  command: {cpus: 1}\n",
                "2:3 `command` nodes run on the runner's machine",
            ),
            (
                "command_nodes: remote\n",
                "1:16 `command_nodes` must be `local` or `cluster`",
            ),
        ] {
            assert_eq!(problems(&load(text).unwrap_err()), [expected], "{text}");
        }
    }

    #[test]
    fn an_empty_profile_is_all_defaults() {
        assert_eq!(load("").unwrap(), ClusterProfile::default());
        assert!(load("[1, 2]").is_err());
    }
}
