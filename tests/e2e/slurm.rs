//! `--executor slurm` against a real single-node Slurm cluster (scripts/cluster-up.sh:
//! munged, slurmctld, slurmd, two fake GPUs), with the workers on the CPU. Without a cluster
//! these tests skip with one line; with `CI=true` they fail instead.
//!
//! Each test has its own job name, so the squeue counts of one never see another's jobs.
//! Stores live under the target dir: the executor refuses node-local ones (/tmp, tmpfs).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::crash::{published, text};
use crate::eyesize::{SHORT, project};
use crate::slider_run;

/// Whether a cluster answers; `false` (after one line) where it may be missing.
fn cluster_is_up() -> bool {
    let up = Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .is_ok_and(|o| {
            let s = String::from_utf8_lossy(&o.stdout);
            // `completing`: another test's jobs are ending on the node, which still answers.
            o.status.success()
                && ["idle", "mixed", "allocated", "completing"]
                    .iter()
                    .any(|t| s.contains(t))
        });
    if !up {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and no Slurm cluster answers: scripts/test starts one (scripts/cluster-up.sh)"
        );
        eprintln!("skipped: no Slurm cluster here (scripts/cluster-up.sh starts one, as root)");
    }
    up
}

struct Project {
    _dir: tempfile::TempDir,
    root: PathBuf,
    recipe: PathBuf,
    profile: PathBuf,
    job_name: String,
}

/// The default recipe in a fresh folder under the target dir, and a profile for the test
/// cluster (`extra` is appended to it).
fn slurm_project(test: &str, extra: &str) -> Project {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().to_path_buf();
    let recipe = project(&root);
    let job_name = format!("slider-e2e-{test}-{}", std::process::id());
    let profile = root.join("cluster.yaml");
    fs::write(
        &profile,
        format!(
            "job_name: {job_name}\npoll_interval_s: 0.3\n\
             # The test cluster is this machine: its target dir is as local as it gets.\n\
             allow_node_local_store: true\n{extra}"
        ),
    )
    .unwrap();
    Project {
        _dir: dir,
        root,
        recipe,
        profile,
        job_name,
    }
}

fn args(p: &Project, more: &[&str]) -> Vec<String> {
    let mut a = vec![p.recipe.display().to_string()];
    a.extend(SHORT.iter().chain(more).map(|s| s.to_string()));
    a.extend([
        "--executor".into(),
        "slurm".into(),
        "--profile".into(),
        p.profile.display().to_string(),
        "--json".into(),
    ]);
    a
}

/// Job id -> state of every job of `name` that Slurm lists.
fn jobs(name: &str) -> BTreeMap<String, String> {
    let out = Command::new("squeue")
        .args(["-h", "--states=all", "-o", "%i %T", "-n", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(i, s)| (i.to_string(), s.trim().to_string()))
        .collect()
}

fn live(name: &str) -> Vec<String> {
    jobs(name)
        .into_iter()
        .filter(|(_, s)| {
            [
                "PENDING",
                "RUNNING",
                "CONFIGURING",
                "COMPLETING",
                "REQUEUED",
            ]
            .contains(&s.as_str())
        })
        .map(|(i, _)| i)
        .collect()
}

fn running(name: &str) -> usize {
    jobs(name).values().filter(|s| *s == "RUNNING").count()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

/// The outputs and lock file of the shortened recipe run locally (computed once).
fn local_reference() -> &'static BTreeMap<PathBuf, Vec<u8>> {
    static REFERENCE: OnceLock<BTreeMap<PathBuf, Vec<u8>>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let recipe = project(dir.path());
        let out = slider_run().arg(&recipe).args(SHORT).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        published(dir.path())
    })
}

/// The submissions of each key (`jobs/<key>/submissions`, one line per sbatch).
fn submissions(p: &Project) -> BTreeMap<String, usize> {
    let jobs = p.root.join("recipes/.slider/jobs");
    fs::read_dir(&jobs)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let n = fs::read_to_string(e.path().join("submissions"))
                        .map(|t| t.lines().count())
                        .unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), n)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn assert_same_as_local(p: &Project) {
    let got = published(&p.root);
    let want = local_reference();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in want {
        assert!(
            got.get(path) == Some(bytes),
            "{} differs from the local run",
            path.display()
        );
    }
}

/// (a) and (e): the keys (the lock file) and every output equal a local run, and with a
/// 1-GPU gres per job on the two fake GPUs never more than two jobs run at once, though the
/// node has CPU slots for four.
#[test]
fn slurm_runs_equal_local_runs_and_two_gpus_run_two_jobs_at_a_time() {
    if !cluster_is_up() {
        return;
    }
    let p = slurm_project("same", "default: {gres: 'gpu:1', cpus: 1}\n");
    let mut child = slider_run()
        .args(args(&p, &[]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut most = 0;
    while child.try_wait().unwrap().is_none() {
        most = most.max(running(&p.job_name));
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let summary = json(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(summary["ran"].as_array().unwrap().len(), 20, "{summary}");
    assert_same_as_local(&p);
    assert!((1..=2).contains(&most), "{most} jobs ran at once on 2 GPUs");
    // 15 GPU nodes (6 trainings, 7 grids, 2 evaluations), each submitted once.
    let subs = submissions(&p);
    assert_eq!(subs.len(), 15, "{subs:?}");
    assert!(subs.values().all(|&n| n == 1), "{subs:?}");
    // A second run finds everything in the store and submits nothing.
    let again = json(&slider_run().args(args(&p, &[])).output().unwrap());
    assert_eq!(again["ran"].as_array().unwrap().len(), 0, "{again}");
    assert!(submissions(&p).values().all(|&n| n == 1));
}

/// (b): Ctrl-C ends every job of the run within 5 s, and nothing is committed.
#[test]
fn ctrl_c_cancels_every_job_of_the_run_and_commits_nothing() {
    if !cluster_is_up() {
        return;
    }
    let p = slurm_project("cancel", "");
    let child = slider_run()
        .args(args(&p, &["--set", "train.max_train_steps=400"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while running(&p.job_name) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no job started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let signalled = Instant::now();
    // slurmd sends SIGTERM, then SIGKILL after the cluster's KillWait (5 s), and the job
    // stays COMPLETING until its processes are reaped: 15 s leaves room for a loaded machine
    // (a CI run had one job left after 5 s, beside the lavapipe tier and clippy).
    let mut left = live(&p.job_name);
    while !left.is_empty() && signalled.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(50));
        left = live(&p.job_name);
    }
    assert!(
        left.is_empty(),
        "jobs still in squeue 15 s after Ctrl-C: {left:?}"
    );
    eprintln!(
        "Ctrl-C: every job gone from the queue after {:.2} s",
        signalled.elapsed().as_secs_f64()
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let objects = p.root.join("recipes/.slider/objects");
    let committed: Vec<_> = fs::read_dir(&objects)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        committed.is_empty(),
        "committed after Ctrl-C: {committed:?}"
    );
}

/// (c): `scontrol requeue` of a training in the middle gives the same bytes: the job comes
/// back, resumes from its checkpoint in `work/<key>` and finishes as if never stopped.
#[test]
fn a_training_requeued_mid_way_gives_the_same_bytes() {
    if !cluster_is_up() {
        return;
    }
    let steps = [
        "--set",
        "train.max_train_steps=16",
        "--set",
        "train.checkpoint_every=4",
    ];
    // The local run of the same settings.
    let reference = {
        let dir = tempfile::tempdir().unwrap();
        let recipe = project(dir.path());
        let out = slider_run()
            .arg(&recipe)
            .args(SHORT)
            .args(steps)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        published(dir.path())
    };
    let p = slurm_project("requeue", "");
    let store = p.root.join("recipes/.slider");
    let child = slider_run()
        .args(args(&p, &steps))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let requeued = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no training checkpointed"
        );
        let found = fs::read_dir(store.join("work")).ok().and_then(|d| {
            d.flatten().find_map(|e| {
                let key = e.file_name();
                let id = fs::read_to_string(store.join("jobs").join(&key).join("job_id")).ok()?;
                let id = id.trim().to_string();
                (e.path().join("checkpoint.safetensors").is_file()
                    && jobs(&p.job_name).get(&id).map(String::as_str) == Some("RUNNING"))
                .then_some((key, id))
            })
        });
        if let Some(f) = found {
            break f;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (key, id) = requeued;
    let rq = Command::new("scontrol")
        .args(["requeue", &id])
        .output()
        .unwrap();
    assert!(rq.status.success(), "{}", text(&rq));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let show = Command::new("scontrol")
        .args(["show", "job", &id])
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains("Restarts=1"),
        "job {id} was not restarted: {show}"
    );
    let got = published(&p.root);
    for (path, bytes) in &reference {
        assert!(
            got.get(path) == Some(bytes),
            "{} differs after the requeue",
            path.display()
        );
    }
    assert_eq!(submissions(&p).get(&*key.to_string_lossy()), Some(&1));
}

/// (d): a node whose jobs fail is reported failed, with its job id and log, while its
/// siblings finish.
#[test]
fn a_failing_node_fails_alone_and_names_its_job() {
    if !cluster_is_up() {
        return;
    }
    // The grids' worker is asked for a device it does not have; sbatch refuses the
    // evaluations' partition.
    let p = slurm_project(
        "fail",
        "kinds:\n  xy_plot: {device: 'cuda:7'}\n  evaluate: {partition: no_such_partition}\n",
    );
    let out = slider_run().args(args(&p, &[])).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let s = json(&out);
    let failed: Vec<&serde_json::Value> = s["nodes"]["failed"].as_array().unwrap().iter().collect();
    let names: Vec<&str> = failed.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(failed.len(), 9, "{names:?}");
    for f in &failed {
        let (name, error) = (f["name"].as_str().unwrap(), f["error"].as_str().unwrap());
        if name.starts_with("check_") {
            assert!(error.contains("slurm job "), "{name}: {error}");
            let log = fs::read_to_string(f["log"].as_str().unwrap()).unwrap();
            assert!(log.contains("submitted slurm job"), "{log}");
        } else {
            assert!(name.starts_with("quality_"), "{name}");
            assert!(error.contains("sbatch refused the job"), "{name}: {error}");
        }
    }
    // The trainings and the merges finished.
    let ran: Vec<&str> = s["ran"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ran.len(), 11, "{ran:?}");
}

/// (f): a runner killed with -9 leaves its jobs running; the next run adopts them (by the
/// job ids in the job folders) instead of submitting them again.
#[test]
fn after_kill_9_of_the_runner_each_key_is_submitted_once() {
    if !cluster_is_up() {
        return;
    }
    let p = slurm_project("adopt", "");
    let mut child = slider_run()
        .args(args(&p, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while running(&p.job_name) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no job started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !live(&p.job_name).is_empty(),
        "the jobs did not outlive the runner"
    );
    // `status` names the jobs of the nodes that are not done.
    let status = slider_run()
        .arg("status")
        .arg(&p.recipe)
        .args(SHORT)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.lines().any(|l| l.contains("[slurm job ")), "{shown}");
    let out = slider_run().args(args(&p, &[])).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let subs = submissions(&p);
    assert_eq!(subs.len(), 15, "{subs:?}");
    assert!(
        subs.values().all(|&n| n == 1),
        "a key was submitted twice: {subs:?}"
    );
    let logs = fs::read_dir(p.root.join("recipes/.slider/logs")).unwrap();
    let adopted = logs
        .flatten()
        .filter(|e| fs::read_to_string(e.path()).is_ok_and(|t| t.contains("adopting slurm job")))
        .count();
    assert!(adopted >= 1, "no job was adopted");
    assert_same_as_local(&p);
}

/// The store must be where the cluster's nodes can see it: /tmp and tmpfs are refused.
#[test]
fn a_node_local_store_is_refused() {
    if !cluster_is_up() {
        return;
    }
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let recipe = project(dir.path());
    let out = slider_run()
        .arg(&recipe)
        .args(SHORT)
        .args(["--executor", "slurm"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("is on /tmp (node-local)"), "{all}");
    assert!(!Path::new(&dir.path().join("recipes/.slider/jobs")).exists());
}

/// `command_nodes: cluster`: command nodes run as jobs (their outputs equal a local run's,
/// their keys too), and a failing program fails only its node, naming its exit status, its
/// job and its last lines.
#[test]
fn command_nodes_run_as_jobs_with_the_keys_of_a_local_run() {
    if !cluster_is_up() {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let recipe = dir.path().join("cmds.yaml");
    fs::write(
        &recipe,
        "matrix:\n  i: [1, 2, 3]\nnodes:\n  n_${i}:\n    kind: command\n    \
         run: [sh, -c, 'echo ${i} > {out}; pwd > {cwd}']\n    \
         outputs: {out: out.txt, cwd: cwd.txt}\n  \
         sum:\n    kind: command\n    inputs: {a: n_1, b: n_2, c: n_3}\n    \
         run: [sh, -c, 'cat {a} {b} {c} > {out}']\n    outputs: {out: sum.txt}\n  \
         broken:\n    kind: command\n    run: [sh, -c, 'echo it went wrong >&2; exit 3']\n    \
         outputs: {out: never.txt}\n",
    )
    .unwrap();
    let job_name = format!("slider-e2e-cmd-{}", std::process::id());
    let profile = dir.path().join("cluster.yaml");
    fs::write(
        &profile,
        format!(
            "job_name: {job_name}\npoll_interval_s: 0.3\nallow_node_local_store: true\n\
             command_nodes: cluster\nkinds:\n  command: {{cpus: 1}}\n"
        ),
    )
    .unwrap();
    let run = |store: &str, slurm: bool| {
        let mut c = slider_run();
        c.arg(&recipe)
            .args(["--store", store, "--json"])
            .current_dir(dir.path());
        if slurm {
            c.args(["--executor", "slurm", "--profile"]).arg(&profile);
        }
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        json(&out)
    };
    let local = run("local", false);
    let cluster = run("cluster", true);
    let keys = |s: &serde_json::Value| -> BTreeMap<String, String> {
        s["nodes"]["ran"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap().into(),
                    n["key"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    assert_eq!(keys(&local).len(), 4, "{local}");
    assert_eq!(keys(&cluster), keys(&local));
    let sum_key = &keys(&cluster)["sum"];
    assert_eq!(
        fs::read_to_string(
            dir.path()
                .join("cluster/objects")
                .join(sum_key)
                .join("sum.txt")
        )
        .unwrap(),
        "1\n2\n3\n"
    );
    // Each ran in its job folder's scratch dir, on the cluster.
    let n1 = &keys(&cluster)["n_1"];
    let cwd =
        fs::read_to_string(dir.path().join("cluster/objects").join(n1).join("cwd.txt")).unwrap();
    assert!(cwd.trim().ends_with(&format!("jobs/{n1}/scratch")), "{cwd}");
    let failed = &cluster["nodes"]["failed"];
    let error = failed[0]["error"].as_str().unwrap();
    assert_eq!(failed[0]["name"], "broken", "{cluster}");
    assert!(error.contains("exit status 3"), "{error}");
    assert!(error.contains("slurm job "), "{error}");
    assert!(error.contains("it went wrong"), "{error}");
}
