//! Running recipes: run (the default), status, explain, verify, gc, and the worker process.

#[path = "pipeline/progress.rs"]
mod progress;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use miette::{IntoDiagnostic, WrapErr};
use serde_json::json;
use slider_engine::inspect::{self, Freshness};
use slider_engine::protocol::{self, WorkerKind};
use slider_engine::verify::{self, Verdict};
use slider_engine::{CancelToken, Lockfile, RunOptions, RunSummary, Store, lockfile_path};
use slider_protocol::quality::QualityFile;
use slider_recipe::Plan;

/// The node kinds this build's worker (`slider-run worker`) executes, with their code
/// versions. The one place the worker crate extends when it gains a trainer or sampler.
/// The kinds the worker runs, with their code versions (owned by `slider-worker`).
pub fn worker_kinds() -> Vec<WorkerKind> {
    slider_worker::KINDS
        .iter()
        .map(|k| WorkerKind {
            kind: k.name.into(),
            code_version: k.code_version,
        })
        .collect()
}

/// Arguments of the default command: `slider-run RECIPE`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The recipe to run.
    pub recipe: Option<PathBuf>,
    /// Show what would run and why; execute nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub exec: ExecArgs,
    /// Print one JSON object on stdout at the end (`ran`, `cached`, `failed`, `wall_s`, ...).
    #[arg(long)]
    pub json: bool,
}

/// How a recipe is loaded and where its store is.
#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// Override a recipe value, e.g. `--set train.max_train_steps=10` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The store directory (default: `.slider/` next to the recipe).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
}

/// How nodes are executed.
#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// In-process nodes (merges, resizes, commands) run at once [default: CPU count].
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Devices for GPU nodes, one worker each: `cpu`, `cpu,cpu`, `cuda:0,cuda:1`
    /// [default: two CPU workers on a machine with 2 or more cores, else one].
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Stop starting nodes after the first failure (default: independent branches go on).
    #[arg(long)]
    pub no_keep_going: bool,
    /// Keep running independent branches after a failure (the default).
    #[arg(long, overrides_with = "no_keep_going")]
    pub keep_going: bool,
    /// Where GPU nodes run: `local` workers (the default), or one Slurm job each (`slurm`:
    /// the store must be on a filesystem the cluster's nodes share; docs/cluster.md).
    #[arg(long, value_enum, default_value_t = ExecutorKind::Local)]
    pub executor: ExecutorKind,
    /// The cluster profile (YAML): per node kind the partition, gres, cpus, mem, time,
    /// account, extra sbatch flags and device; none of it enters a node's key.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Slurm jobs in flight at once [default: the profile's `max_jobs`, else 8].
    #[arg(long, value_name = "N")]
    pub max_jobs: Option<usize>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorKind {
    Local,
    Slurm,
}

/// Jobs in flight without `--max-jobs` or a profile's `max_jobs`.
const DEFAULT_MAX_JOBS: usize = 8;

#[derive(Subcommand, Debug)]
pub enum PipelineCommand {
    /// Every node of a recipe: fresh / stale / failed / running.
    Status {
        recipe: PathBuf,
        #[command(flatten)]
        plan: PlanArgs,
        #[arg(long)]
        json: bool,
    },
    /// Why a node is (not) up to date: what changed since its last successful run.
    Explain {
        recipe: PathBuf,
        node: String,
        #[command(flatten)]
        plan: PlanArgs,
        #[arg(long)]
        json: bool,
    },
    /// Re-execute a recipe without the store and compare with its lockfile (CI).
    Verify {
        recipe: PathBuf,
        /// Only these nodes (and what they read); comma-separated.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Accept LoRA outputs whose deltas differ by at most this relative Frobenius error.
        #[arg(long)]
        tolerance: Option<f64>,
        #[command(flatten)]
        plan: PlanArgs,
        #[command(flatten)]
        exec: ExecArgs,
        #[arg(long)]
        json: bool,
    },
    /// Drop store entries that none of the given recipes' lockfiles (or lockfiles) reference.
    Gc {
        /// Recipes (their `.lock` files) or lockfiles whose results to keep.
        #[arg(required = true)]
        keep: Vec<PathBuf>,
        /// The store (default: `.slider/` next to the first recipe).
        #[arg(long)]
        store: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Serve GPU nodes over JSON lines on stdin/stdout (started by the engine).
    #[command(hide = true)]
    Worker {
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

pub fn run(cmd: PipelineCommand, quiet: bool) -> miette::Result<ExitCode> {
    match cmd {
        PipelineCommand::Status { recipe, plan, json } => status(&recipe, &plan, json),
        PipelineCommand::Explain {
            recipe,
            node,
            plan,
            json,
        } => explain(&recipe, &node, &plan, json),
        PipelineCommand::Verify {
            recipe,
            nodes,
            tolerance,
            plan,
            exec,
            json,
        } => verify(&recipe, &nodes, tolerance, &plan, &exec, json, quiet),
        PipelineCommand::Gc { keep, store, json } => gc(&keep, store, json),
        PipelineCommand::Worker { device } => worker(&device),
    }
}

pub fn run_recipe(args: RunArgs, quiet: bool) -> miette::Result<ExitCode> {
    let Some(recipe) = args.recipe else {
        return Err(miette::miette!(
            "no recipe given; try `slider-run recipes/eyesize.yaml` or `slider-run --help`"
        ));
    };
    let plan = load(&recipe, &args.plan)?;
    let store = store_root(&plan, &args.plan);
    if args.dry_run {
        return dry_run(&plan, &store, args.json);
    }
    let opts = run_options(&args.exec, &plan)?;
    let bars = progress::Bars::new(quiet);
    let summary = slider_engine::run(&plan, &store, &opts, &bars).into_diagnostic();
    bars.finish();
    let summary = summary?;
    let report = slider_engine::report::write_or_warn(&plan, &summary, &worker_kinds());
    if args.json {
        println!("{}", summary_json(&summary, report.as_deref()));
    } else if !quiet {
        print!("{}", summary_text(&summary, report.as_deref()));
    } else {
        eprint!("{}", failures_text(&summary));
    }
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else if summary.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn load(recipe: &Path, args: &PlanArgs) -> miette::Result<Plan> {
    slider_recipe::load(recipe, &args.set).map_err(miette::Report::new)
}

fn store_root(plan: &Plan, args: &PlanArgs) -> PathBuf {
    args.store
        .clone()
        .unwrap_or_else(|| Store::default_root(&plan.recipe_path))
}

/// The Slurm settings of `--executor slurm` (None for local), refusing cluster flags that
/// would do nothing.
fn slurm_settings(
    exec: &ExecArgs,
    plan: &Plan,
    exe: &Path,
) -> miette::Result<Option<slider_engine::slurm::SlurmSettings>> {
    if exec.executor == ExecutorKind::Local {
        for (given, flag) in [
            (exec.profile.is_some(), "--profile"),
            (exec.max_jobs.is_some(), "--max-jobs"),
        ] {
            if given {
                return Err(miette::miette!(
                    "{flag} is for `--executor slurm`; without it GPU nodes run on local workers"
                ));
            }
        }
        return Ok(None);
    }
    if !exec.devices.is_empty() {
        return Err(miette::miette!(
            "--devices picks local workers; with `--executor slurm` the device is the profile's \
             `device:` (per kind)"
        ));
    }
    let kinds = worker_kinds();
    let names: Vec<&str> = kinds.iter().map(|k| k.kind.as_str()).collect();
    let profile = match &exec.profile {
        Some(p) => slider_recipe::load_profile(p, &names).map_err(miette::Report::new)?,
        None => slider_recipe::ClusterProfile::default(),
    };
    let job_name = profile.job_name.clone().unwrap_or_else(|| {
        let stem = plan
            .recipe_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let safe: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("slider-{safe}")
    });
    let max_jobs = exec
        .max_jobs
        .or(profile.max_jobs)
        .unwrap_or(DEFAULT_MAX_JOBS)
        .max(1);
    let mut worker_command = profile
        .command
        .clone()
        .unwrap_or_else(|| vec![exe.display().to_string()]);
    worker_command.push("worker".into());
    Ok(Some(slider_engine::slurm::SlurmSettings {
        profile,
        job_name,
        max_jobs,
        worker_command,
    }))
}

fn run_options(exec: &ExecArgs, plan: &Plan) -> miette::Result<RunOptions> {
    let cancel = CancelToken::new();
    cancel
        .cancel_on_signals()
        .map_err(|e| miette::miette!("{e}"))?;
    let exe = std::env::current_exe()
        .into_diagnostic()
        .wrap_err("locating the slider-run binary")?;
    let defaults = RunOptions::default();
    Ok(RunOptions {
        jobs: exec.jobs.unwrap_or(defaults.jobs).max(1),
        keep_going: !exec.no_keep_going,
        devices: if exec.devices.is_empty() {
            default_devices()
        } else {
            exec.devices.clone()
        },
        slurm: slurm_settings(exec, plan, &exe)?,
        worker_command: vec![exe.display().to_string(), "worker".into()],
        worker_kinds: worker_kinds(),
        cancel,
        ..defaults
    })
}

fn names(reports: &[slider_engine::NodeReport]) -> Vec<&str> {
    reports.iter().map(|r| r.name.as_str()).collect()
}

fn summary_json(s: &RunSummary, report: Option<&Path>) -> serde_json::Value {
    json!({
        "ran": names(&s.ran),
        "cached": names(&s.cached),
        "failed": names(&s.failed),
        "skipped": names(&s.skipped),
        "interrupted": s.interrupted,
        "wall_s": s.wall_s,
        "hashed_bytes": s.hashed_bytes,
        "published": s.published,
        "publish_errors": s.publish_errors,
        "lockfile": s.lockfile,
        "store": s.store,
        "report": report,
        "nodes": {
            "ran": s.ran,
            "cached": s.cached,
            "failed": s.failed,
            "skipped": s.skipped,
        },
    })
}

fn summary_text(s: &RunSummary, report: Option<&Path>) -> String {
    let mut out = String::new();
    for r in &s.ran {
        out.push_str(&format!(
            "  ran     {:<24} {:>8.2} s  {}\n",
            r.name,
            r.wall_s,
            r.log
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ));
    }
    out.push_str(&failures_text(s));
    out.push_str(&format!(
        "{} ran, {} cached, {} failed{} in {:.2} s\n",
        s.ran.len(),
        s.cached.len(),
        s.failed.len(),
        if s.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} not run", s.skipped.len())
        },
        s.wall_s
    ));
    for p in &s.published {
        out.push_str(&format!("output: {}\n", p.display()));
        if let Some(line) = quality_line(p) {
            out.push_str(&format!("        {line}\n"));
        }
    }
    if let Some(report) = report {
        out.push_str(&format!("report: {}\n", report.display()));
    }
    if s.interrupted {
        out.push_str("interrupted: finished nodes are kept; run again to resume\n");
    }
    out
}

/// Without `--devices`: two CPU workers where there are two cores or more. One worker keeps
/// about one core busy (the trainer's small ops leave the second idle), so two halve the
/// default recipe's training time on a 2-core machine; results are the same bytes.
fn default_devices() -> Vec<String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    vec!["cpu".to_string(); cores.clamp(1, 2)]
}

/// One line of slider-quality figures when `path` is an `evaluate` node's `quality.json`.
fn quality_line(path: &Path) -> Option<String> {
    if path.extension()? != "json" {
        return None;
    }
    let report = QualityFile::parse(&std::fs::read(path).ok()?)?;
    Some(report.summary_line())
}

fn failures_text(s: &RunSummary) -> String {
    let mut out = String::new();
    for r in &s.failed {
        out.push_str(&format!(
            "  FAILED  {:<24} {:>8.2} s  {}\n          {}\n",
            r.name,
            r.wall_s,
            r.log
                .as_deref()
                .map(|p| format!("log: {}", p.display()))
                .unwrap_or_default(),
            r.error.as_deref().unwrap_or("")
        ));
    }
    for r in &s.skipped {
        out.push_str(&format!(
            "  not run {:<24} {}\n",
            r.name,
            r.error.as_deref().unwrap_or("")
        ));
    }
    for e in &s.publish_errors {
        out.push_str(&format!("  not published: {e}\n"));
    }
    out
}

fn dry_run(plan: &Plan, store: &Path, json: bool) -> miette::Result<ExitCode> {
    slider_engine::check_supported(plan, &worker_kinds()).into_diagnostic()?;
    let st = inspect::status(plan, store, &worker_kinds()).into_diagnostic()?;
    let (fresh, stale): (Vec<_>, Vec<_>) = st.iter().partition(|s| s.state == Freshness::Fresh);
    if json {
        let would_run: Vec<_> = stale
            .iter()
            .map(|s| json!({"node": s.name, "why": s.changes.iter().map(|c| c.summary()).collect::<Vec<_>>()}))
            .collect();
        println!(
            "{}",
            json!({"would_run": would_run, "fresh": fresh.iter().map(|s| &s.name).collect::<Vec<_>>()})
        );
        return Ok(ExitCode::SUCCESS);
    }
    for s in &stale {
        let why: Vec<String> = s.changes.iter().map(|c| c.summary()).collect();
        println!("would run  {:<24} {}", s.name, why.join("; "));
    }
    println!(
        "{} would run, {} fresh (nothing was executed)",
        stale.len(),
        fresh.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn status(recipe: &Path, args: &PlanArgs, json: bool) -> miette::Result<ExitCode> {
    let plan = load(recipe, args)?;
    let st = inspect::status(&plan, &store_root(&plan, args), &worker_kinds()).into_diagnostic()?;
    if json {
        println!("{}", serde_json::to_string(&st).into_diagnostic()?);
        return Ok(ExitCode::SUCCESS);
    }
    for s in &st {
        let why: Vec<String> = s.changes.iter().map(|c| c.summary()).collect();
        let detail = match s.state {
            Freshness::Failed => s.error.clone().unwrap_or_default(),
            Freshness::Fresh => s
                .key
                .as_deref()
                .map(|k| format!("key {}", &k[..12]))
                .unwrap_or_default(),
            _ => why.join("; "),
        };
        let detail = match &s.job {
            Some(j) => format!("[slurm job {}: {}] {detail}", j.id, j.state),
            None => detail,
        };
        println!(
            "{:<8} {:<24} {:<10} {}",
            s.state.to_string(),
            s.name,
            s.kind,
            detail
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn explain(recipe: &Path, node: &str, args: &PlanArgs, json: bool) -> miette::Result<ExitCode> {
    let plan = load(recipe, args)?;
    let st = inspect::explain(&plan, &store_root(&plan, args), node, &worker_kinds())
        .into_diagnostic()?;
    if json {
        println!("{}", serde_json::to_string(&st).into_diagnostic()?);
    } else {
        print!("{}", st.explanation());
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn verify(
    recipe: &Path,
    nodes: &[String],
    tolerance: Option<f64>,
    args: &PlanArgs,
    exec: &ExecArgs,
    json: bool,
    quiet: bool,
) -> miette::Result<ExitCode> {
    let plan = load(recipe, args)?;
    let opts = run_options(exec, &plan)?;
    let bars = progress::Bars::new(quiet);
    let comparer = slider_engine::lora_delta_error;
    let tol = tolerance.map(|t| (t, &comparer as &verify::LoraComparer));
    let report =
        verify::verify(&plan, &store_root(&plan, args), nodes, tol, &opts, &bars).into_diagnostic();
    bars.finish();
    let report = report?;
    if json {
        println!(
            "{}",
            json!({"ok": report.ok(), "rows": report.rows, "wall_s": report.wall_s})
        );
    } else {
        for r in &report.rows {
            let text = match &r.verdict {
                Verdict::Identical => "identical".to_string(),
                Verdict::WithinTolerance { max_error } => {
                    format!("within tolerance (max relative delta error {max_error:.3e})")
                }
                Verdict::Differs { detail } => format!("DIFFERS: {detail}"),
                Verdict::KeyChanged { locked, now } => format!(
                    "KEY CHANGED: {} in the lockfile, {} now (the recipe or an input changed since it was locked)",
                    &locked[..12.min(locked.len())],
                    &now[..12.min(now.len())]
                ),
                Verdict::NotInLockfile => "NOT IN LOCKFILE".to_string(),
                Verdict::Failed { error } => format!("FAILED: {error}"),
            };
            println!("{:<24} {text}", r.node);
        }
        println!(
            "{} ({} nodes re-executed in {:.2} s)",
            if report.ok() {
                "verified"
            } else {
                "verification FAILED"
            },
            report.rows.len(),
            report.wall_s
        );
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn gc(keep: &[PathBuf], store: Option<PathBuf>, json: bool) -> miette::Result<ExitCode> {
    let mut keys = BTreeSet::new();
    for path in keep {
        let lock_path = if path.extension().is_some_and(|e| e == "lock") {
            path.clone()
        } else {
            lockfile_path(path)
        };
        let lock = Lockfile::read(&lock_path).into_diagnostic()?;
        keys.extend(lock.keys().map(str::to_string));
    }
    let store = match store {
        Some(s) => s,
        None => Store::default_root(&std::path::absolute(&keep[0]).into_diagnostic()?),
    };
    let report = slider_engine::gc(&store, &keys).into_diagnostic()?;
    if json {
        println!("{}", serde_json::to_string(&report).into_diagnostic()?);
    } else {
        println!(
            "removed {} entries ({:.1} MB), kept {} in {}",
            report.removed_objects,
            report.removed_bytes as f64 / 1e6,
            report.kept_objects,
            store.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn worker(device: &str) -> miette::Result<ExitCode> {
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    // SIGTERM (the runner cancelling) or SIGINT ends a training run at the next step with a
    // checkpoint in its work dir, so the next run resumes there; a second signal exits at once.
    let stop = CancelToken::new();
    stop.cancel_on_signals()
        .map_err(|e| miette::miette!("{e}"))?;
    protocol::serve(
        device,
        &slider_worker::versions(),
        stdin,
        stdout,
        |req, progress| slider_worker::execute(req, device, progress, stop.flag()),
    )
    .into_diagnostic()?;
    Ok(ExitCode::SUCCESS)
}

/// `slider-run bench slurm`: the cost of a Slurm job, and a recipe of short command nodes
/// run locally and through Slurm (`slider_engine::cluster_bench`).
pub fn bench_slurm(args: &crate::lora_cmd::BenchArgs) -> miette::Result<ExitCode> {
    use slider_engine::cluster_bench::{ClusterBench, run_cluster_bench, test_cluster_profile};
    if args.nodes == 0 {
        return Err(miette::miette!("--nodes must be at least 1"));
    }
    let job_name = format!("slider-bench-{}", std::process::id());
    let mut profile = match &args.profile {
        Some(p) => {
            let kinds = worker_kinds();
            let names: Vec<&str> = kinds.iter().map(|k| k.kind.as_str()).collect();
            slider_recipe::load_profile(p, &names).map_err(miette::Report::new)?
        }
        None => test_cluster_profile(&job_name),
    };
    profile.job_name.get_or_insert(job_name);
    let max_jobs = args
        .max_jobs
        .or(profile.max_jobs)
        .unwrap_or(DEFAULT_MAX_JOBS);
    let exe = std::env::current_exe().into_diagnostic()?;
    let settings = slider_engine::slurm::SlurmSettings {
        job_name: profile.job_name.clone().unwrap_or_default(),
        max_jobs,
        worker_command: vec![exe.display().to_string(), "worker".into()],
        profile,
    };
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()
            .into_diagnostic()?
            .join(format!("slider-bench-slurm-{}", std::process::id())),
    };
    if dir.exists() {
        return Err(miette::miette!(
            "{} exists; the benchmark needs a new folder (--dir)",
            dir.display()
        ));
    }
    let bar = crate::lora_cmd::spinner("bench slurm");
    let result = run_cluster_bench(&dir, args.nodes, settings, &mut |step: &str| {
        tracing::info!("{step}");
        bar.set_message(step.to_string());
    });
    bar.finish_and_clear();
    let b = result.into_diagnostic()?;
    println!(
        "{} command nodes (`sh -c 'echo N > out'`), max_jobs {}, poll interval {} s",
        b.nodes, b.max_jobs, b.poll_interval_s
    );
    println!();
    println!("| run | wall (s) | per node (s) |");
    println!("|---|---|---|");
    for (label, wall) in [
        ("local (in-process)", b.local_wall_s),
        ("slurm (one job per node)", b.slurm_wall_s),
    ] {
        println!("| {label} | {wall:.2} | {:.3} |", wall / b.nodes as f64);
    }
    println!(
        "| ratio slurm / local | {:.1}x | |",
        b.slurm_wall_s / b.local_wall_s.max(1e-9)
    );
    println!();
    println!("| phase of one job | median (s) | p90 (s) | max (s) |");
    println!("|---|---|---|---|");
    for (name, values) in &b.phases {
        let (m, p90, max) = ClusterBench::summary(values);
        println!("| {name} | {m:.3} | {p90:.3} | {max:.3} |");
    }
    println!("\nrecipe and stores: {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_reports_get_their_summary_line_and_other_files_none() {
        let dir = tempfile::tempdir().unwrap();
        let quality =
            r#"{"lora": "eyesize", "pooled": {"spearman": 0.96, "outside_inside_ratio": 0.1}}"#;
        let want = QualityFile::parse(quality.as_bytes()).map(|q| q.summary_line());
        assert!(want.is_some());
        let cases = [
            ("q.json", quality, want),
            ("other.json", r#"{"lora": "x"}"#, None),
            ("grid.png", quality, None),
        ];
        for (name, content, want) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            assert_eq!(quality_line(&path), want, "{name}");
        }
    }
}
