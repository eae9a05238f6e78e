//! `slider-run bench slurm`: what putting nodes on Slurm costs. A recipe of `n` short
//! `command` nodes (each writes one line) runs twice in one process, on the runner and as
//! Slurm jobs (`command_nodes: cluster`), each into a fresh store, and every job's record in
//! its job folder gives the time of each phase:
//!
//! | phase | from | to |
//! |---|---|---|
//! | submit | the node starts (manifest `started_unix_s`) | `sbatch` returned (`submissions`) |
//! | queue | `sbatch` returned | the batch script began (`started`) |
//! | run | the script began | it wrote `exit` (the file's mtime) |
//! | notice | `exit` written | the runner committed the node (manifest start + wall) |
//!
//! "notice" is the poll latency as a user sees it: the batched `squeue` interval, the read
//! of the worker's answer and the commit.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use slider_recipe::ClusterProfile;

use crate::error::EngineError;
use crate::run::{RunOptions, Silent, run};
use crate::slurm::SlurmSettings;
use crate::store::Store;

/// The figures of one benchmark.
#[derive(Debug, Clone)]
pub struct ClusterBench {
    pub nodes: usize,
    pub max_jobs: usize,
    pub poll_interval_s: f64,
    /// Whole run on the runner (in-process command nodes), seconds.
    pub local_wall_s: f64,
    /// Whole run through Slurm, seconds.
    pub slurm_wall_s: f64,
    /// Per phase (the module's table): (name, per-job seconds, sorted).
    pub phases: Vec<(&'static str, Vec<f64>)>,
}

impl ClusterBench {
    /// Median, 90th percentile and maximum of a phase.
    pub fn summary(values: &[f64]) -> (f64, f64, f64) {
        let at = |q: f64| {
            if values.is_empty() {
                return f64::NAN;
            }
            let i = ((values.len() - 1) as f64 * q).round() as usize;
            values[i.min(values.len() - 1)]
        };
        (at(0.5), at(0.9), at(1.0))
    }
}

/// The recipe: `n` command nodes, each writing its own number (distinct keys).
pub fn bench_recipe(n: usize) -> String {
    let values: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    format!(
        "# slider-run bench slurm: {n} short command nodes.\n\
         matrix:\n  i: [{}]\n\
         nodes:\n  n_${{i}}:\n    kind: command\n    run: [sh, -c, 'echo ${{i}} > {{out}}']\n    \
         outputs: {{out: out.txt}}\n",
        values.join(", ")
    )
}

/// Runs the benchmark in `dir` (created; it must be where the cluster's nodes see it).
/// `settings.profile` is used as given, with `command_nodes: cluster` forced on.
pub fn run_cluster_bench(
    dir: &Path,
    nodes: usize,
    mut settings: SlurmSettings,
    on_step: &mut dyn FnMut(&str),
) -> Result<ClusterBench, EngineError> {
    settings.profile.command_nodes_on_cluster = true;
    let recipe = dir.join("bench.yaml");
    std::fs::create_dir_all(dir).map_err(EngineError::io("creating", dir))?;
    slider_atomic::write(&recipe, bench_recipe(nodes).as_bytes())
        .map_err(EngineError::io("writing", &recipe))?;
    let plan = slider_recipe::load(&recipe, &[])
        .map_err(|e| EngineError::Config(format!("the benchmark's recipe: {e}")))?;

    let mut timed = |label: &str, store: &Path, slurm: Option<SlurmSettings>| {
        on_step(label);
        let opts = RunOptions {
            publish: false,
            write_lockfile: false,
            slurm,
            ..RunOptions::default()
        };
        let summary = run(&plan, store, &opts, &Silent)?;
        if !summary.success() || summary.ran.len() != nodes {
            let why: Vec<String> = summary
                .failed
                .iter()
                .map(|f| format!("{}: {}", f.name, f.error.clone().unwrap_or_default()))
                .collect();
            return Err(EngineError::Config(format!(
                "the {label} run did not run all {nodes} nodes: {}",
                why.join("; ")
            )));
        }
        Ok(summary.wall_s)
    };
    let local_store = dir.join("store-local");
    let slurm_store = dir.join("store-slurm");
    let local_wall_s = timed("local run", &local_store, None)?;
    let (max_jobs, poll_interval_s) = (settings.max_jobs, settings.profile.poll_interval_s);
    let slurm_wall_s = timed("slurm run", &slurm_store, Some(settings))?;
    let phases = phases(&slurm_store)?;
    Ok(ClusterBench {
        nodes,
        max_jobs,
        poll_interval_s,
        local_wall_s,
        slurm_wall_s,
        phases,
    })
}

/// A profile for the single-node test cluster (store beside the benchmark, fast polling).
pub fn test_cluster_profile(job_name: &str) -> ClusterProfile {
    ClusterProfile {
        job_name: Some(job_name.to_string()),
        poll_interval_s: 0.5,
        allow_node_local_store: true,
        command_nodes_on_cluster: true,
        ..ClusterProfile::default()
    }
}

fn phases(store_root: &Path) -> Result<Vec<(&'static str, Vec<f64>)>, EngineError> {
    let store = Store::at(store_root);
    let jobs = store_root.join("jobs");
    let mut submit = Vec::new();
    let mut queue = Vec::new();
    let mut running = Vec::new();
    let mut notice = Vec::new();
    for key in store.keys()? {
        let Some(m) = store.manifest(&key)? else {
            continue;
        };
        let dir: PathBuf = jobs.join(&key);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let submitted: Option<f64> = read("submissions")
            .lines()
            .last()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|t| t.parse().ok());
        let started: Option<f64> = read("started").trim().parse().ok();
        let exited: Option<f64> = std::fs::metadata(dir.join("exit"))
            .and_then(|md| md.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64());
        let (Some(submitted), Some(started), Some(exited)) = (submitted, started, exited) else {
            return Err(EngineError::Config(format!(
                "the job folder {} lacks its submission, start or exit record",
                dir.display()
            )));
        };
        submit.push(submitted - m.started_unix_s);
        queue.push(started - submitted);
        running.push(exited - started);
        notice.push(m.started_unix_s + m.wall_s - exited);
    }
    let mut out = vec![
        ("submit (node start -> sbatch returned)", submit),
        ("queue (sbatch -> script began)", queue),
        ("run (script began -> exit written)", running),
        ("notice (exit written -> committed)", notice),
    ];
    for (_, v) in &mut out {
        v.sort_by(f64::total_cmp);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_recipe_has_n_distinct_command_nodes() {
        let text = bench_recipe(5);
        let plan = slider_recipe::load_str(&text, Path::new("bench.yaml"), &[]).unwrap();
        assert_eq!(plan.nodes.len(), 5);
        assert!(plan.nodes.iter().all(|n| n.params.kind() == "command"));
    }

    #[test]
    fn the_summary_is_median_p90_and_max() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(ClusterBench::summary(&v), (6.0, 9.0, 10.0));
    }
}
