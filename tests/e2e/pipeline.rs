//! End-to-end tests of running recipes: caching, re-running exactly what changed, resume
//! after `kill -9`, the runner lock, plan-time refusals, `explain`, `verify`, `gc`, and the
//! worker process. Inputs are synthetic LoRAs and `command` nodes running small sh scripts.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use slider_lora::synth::{Layout, random_lora};

use crate::slider_run;

/// A temp dir holding a recipe and its inputs.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        let p = Project {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        for (name, seed) in [("big.safetensors", 1), ("small.safetensors", 2)] {
            random_lora(Layout::Tiny, 4, 1.0, seed)
                .save(&p.path(name), slider_lora::Precision::F32)
                .expect("write lora");
        }
        fs::write(p.path("notes.txt"), "some notes\n").unwrap();
        p
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn recipe(&self, text: &str) -> PathBuf {
        let path = self.path("recipe.yaml");
        fs::write(&path, text).unwrap();
        path
    }

    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = slider_run();
        c.current_dir(self.dir.path()).args(args);
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("slider-run runs")
    }

    /// `slider-run recipe.yaml --json`, asserting success; the summary.
    fn run(&self) -> Summary {
        let out = self.output(&["recipe.yaml", "--json"]);
        assert!(out.status.success(), "run failed:\n{}", text(&out));
        Summary::parse(&out)
    }

    fn spawn_run(&self) -> Child {
        self.cmd(&["recipe.yaml", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    }

    /// Every file under the store's `tmp/`, and the store's keys.
    fn store_state(&self) -> (Vec<PathBuf>, BTreeSet<String>) {
        let tmp: Vec<PathBuf> = fs::read_dir(self.path(".slider/tmp"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let keys = fs::read_dir(self.path(".slider/objects"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        (tmp, keys)
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[derive(Debug, PartialEq)]
struct Summary {
    ran: BTreeSet<String>,
    cached: BTreeSet<String>,
    failed: BTreeSet<String>,
}

impl Summary {
    fn parse(out: &Output) -> Summary {
        let v: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)));
        assert!(v["wall_s"].as_f64().is_some(), "wall_s present");
        let set = |k: &str| {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect()
        };
        Summary {
            ran: set("ran"),
            cached: set("cached"),
            failed: set("failed"),
        }
    }
}

/// miette's rendering with its line wrapping and gutters removed.
fn one_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .replace('│', " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

const RECIPE: &str = r#"
nodes:
  slider:
    kind: svd_merge
    models: [big.safetensors, small.safetensors]
    ratios: [1.5, -1.5]
    new_rank: 8
  eyes:
    kind: resize
    model: slider
    new_rank: 4
  size:
    kind: command
    run: [sh, -c, "wc -c < {lora} > {out}"]
    inputs: {lora: eyes}
    outputs: {out: size.txt}
  copy:
    kind: command
    run: [sh, -c, "cat {notes} > {out}"]
    inputs: {notes: notes.txt}
    outputs: {out: copy.txt}
outputs:
  eyes: out/eyes.safetensors
"#;

#[test]
fn reruns_exactly_what_changed_and_explains_why() {
    let p = Project::new();
    let all = ["slider", "eyes", "size", "copy"];
    // (step, recipe text or None to keep, touch files first, expected ran)
    let steps: Vec<(&str, String, bool, Vec<&str>)> = vec![
        (
            "first run executes everything",
            RECIPE.into(),
            false,
            all.to_vec(),
        ),
        ("second run executes nothing", RECIPE.into(), false, vec![]),
        (
            "editing one param re-runs that node and its dependents",
            RECIPE.replace("new_rank: 4", "new_rank: 3"),
            false,
            vec!["eyes", "size"],
        ),
        (
            "touching inputs re-runs nothing",
            RECIPE.replace("new_rank: 4", "new_rank: 3"),
            true,
            vec![],
        ),
        (
            "renaming a node re-runs nothing",
            RECIPE
                .replace("new_rank: 4", "new_rank: 3")
                .replace("  copy:", "  copy_notes:"),
            false,
            vec![],
        ),
    ];
    for (step, recipe, touch, ran) in steps {
        p.recipe(&recipe);
        if touch {
            let later = std::time::SystemTime::now() + Duration::from_secs(60);
            for f in ["big.safetensors", "notes.txt"] {
                fs::File::options()
                    .write(true)
                    .open(p.path(f))
                    .unwrap()
                    .set_modified(later)
                    .unwrap();
            }
        }
        if step.starts_with("editing") {
            let out = p.output(&["explain", "recipe.yaml", "eyes"]);
            let why = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success()
                    && why.contains("- new_rank: 4")
                    && why.contains("+ new_rank: 3"),
                "{}",
                text(&out)
            );
            let out = p.output(&["recipe.yaml", "--dry-run"]);
            let dry = String::from_utf8_lossy(&out.stdout);
            assert!(
                dry.contains("would run  eyes")
                    && dry.contains("waits on `eyes`")
                    && !dry.contains("would run  slider"),
                "{dry}"
            );
        }
        let s = p.run();
        assert_eq!(s.ran, set(&ran), "{step}");
        let names: BTreeSet<String> = s.ran.union(&s.cached).cloned().collect();
        assert_eq!(
            names.len(),
            4,
            "{step}: every node ran or was cached: {s:?}"
        );
        assert!(s.failed.is_empty(), "{step}");
    }
    let out = p.output(&["status", "recipe.yaml"]);
    let status = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        status.lines().filter(|l| l.starts_with("fresh")).count(),
        4,
        "{status}"
    );
    let out = p.output(&["explain", "recipe.yaml", "size"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("is fresh"),
        "{}",
        text(&out)
    );
    assert!(slider_lora::Lora::load(&p.path("out/eyes.safetensors")).is_ok());

    let out = p.output(&["verify", "recipe.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = p.output(&["gc", "recipe.yaml"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed 2 entries"),
        "{}",
        text(&out)
    );
}

/// Kills the runner (SIGKILL) as soon as `ready` holds, then re-runs; the outputs must equal
/// those of an uninterrupted run and no temp files may remain.
fn kill_and_resume(recipe: &str, ready: impl Fn(&Project) -> bool) {
    let reference = Project::new();
    reference.recipe(recipe);
    reference.run();

    let p = Project::new();
    p.recipe(recipe);
    let mut child = p.spawn_run();
    let t0 = Instant::now();
    while !ready(&p) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the run never reached the kill point"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before the kill point"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));

    let s = p.run();
    assert!(!s.ran.is_empty(), "the interrupted node ran again");
    let (tmp, _) = p.store_state();
    assert!(tmp.is_empty(), "stale temp files remain: {tmp:?}");
    assert_eq!(
        p.store_state().1,
        reference.store_state().1,
        "same store keys as an uninterrupted run"
    );
    assert_eq!(
        fs::read_to_string(p.path("recipe.lock")).unwrap(),
        fs::read_to_string(reference.path("recipe.lock")).unwrap(),
        "same keys and output hashes as an uninterrupted run"
    );
}

#[test]
fn kill_9_in_the_middle_of_a_command_then_resume() {
    let recipe = r#"
nodes:
  slow:
    kind: command
    run: [sh, -c, "echo first half > {out}; sleep 1; echo second half >> {out}"]
    outputs: {out: slow.txt}
  after:
    kind: command
    run: [sh, -c, "cat {x} {x} > {out}"]
    inputs: {x: slow}
    outputs: {out: after.txt}
"#;
    // Killed once the command has half-written its output in the temp dir.
    kill_and_resume(recipe, |p| {
        p.store_state()
            .0
            .iter()
            .any(|d| d.join("slow.txt").is_file())
    });
}

#[test]
fn kill_9_in_the_middle_of_a_merge_then_resume() {
    let recipe = r#"
nodes:
  big_merge:
    kind: svd_merge
    models: [big.safetensors, small.safetensors, big.safetensors, small.safetensors]
    ratios: [1.5, -1.5, 0.5, -0.5]
    new_rank: 16
  after:
    kind: resize
    model: big_merge
    new_rank: 4
"#;
    // The merge's temp dir exists from its start until it is renamed into objects/.
    kill_and_resume(recipe, |p| {
        p.store_state()
            .0
            .iter()
            .any(|d| !d.to_string_lossy().contains(".scratch"))
    });
}

#[test]
fn a_second_concurrent_runner_is_refused_with_the_holders_pid() {
    let p = Project::new();
    p.recipe(
        r#"
nodes:
  slow:
    kind: command
    run: [sh, -c, "sleep 5; echo done > {out}"]
    outputs: {out: o.txt}
"#,
    );
    let mut first = p.spawn_run();
    let t0 = Instant::now();
    while fs::read_to_string(p.path(".slider/lock"))
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = p.output(&["recipe.yaml"]);
    // The journal says `slow` is running as soon as it starts.
    let mut status = p.output(&["status", "recipe.yaml"]);
    while !String::from_utf8_lossy(&status.stdout).starts_with("running")
        && t0.elapsed() < Duration::from_secs(4)
    {
        std::thread::sleep(Duration::from_millis(20));
        status = p.output(&["status", "recipe.yaml"]);
    }
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!out.status.success());
    let err = one_line(&out.stderr);
    assert!(
        err.contains(&format!(
            "in use by another slider-run (pid {} on host ",
            first.id()
        )),
        "{}",
        text(&out)
    );
    let status_text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status_text.starts_with("running  slow"),
        "{}",
        text(&status)
    );
}

#[test]
fn ctrl_c_stops_cleanly_and_the_next_run_resumes() {
    let p = Project::new();
    p.recipe(
        r#"
nodes:
  quick:
    kind: command
    run: [sh, -c, "echo quick > {out}"]
    outputs: {out: q.txt}
  slow:
    kind: command
    run: [sh, -c, "echo half > {out}; sleep 30; echo rest >> {out}"]
    inputs: {q: quick}
    outputs: {out: s.txt}
"#,
    );
    let child = p.spawn_run();
    let t0 = Instant::now();
    while !p.store_state().0.iter().any(|d| d.join("s.txt").is_file()) {
        assert!(t0.elapsed() < Duration::from_secs(30), "slow never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the running command was stopped"
    );
    let s = Summary::parse(&out);
    assert_eq!((s.ran, s.failed), (set(&["quick"]), set(&[])));
    assert!(
        p.store_state().0.is_empty(),
        "nothing half-written is left in the store"
    );
    assert_eq!(
        p.store_state().1.len(),
        1,
        "only the finished node is in the store"
    );
    // The next run resumes: only the interrupted node runs.
    p.recipe(
        &fs::read_to_string(p.path("recipe.yaml"))
            .unwrap()
            .replace("sleep 30; ", ""),
    );
    assert_eq!(p.run().ran, set(&["slow"]));
}

#[test]
fn the_worker_says_hello_and_refuses_kinds_it_does_not_have() {
    let mut child = slider_run()
        .args(["worker", "--device", "cpu"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // A merge runs in the engine, never in the worker; a train request without its
    // parameters is malformed.
    let merge = r#"{"type":"run","node":"n","key":"k","kind":"merge","params":{"kind":"merge","models":[{"Node":"a"}],"ratios":[1.0],"save_precision":"float"},"inputs":[],"work_dir":"/tmp","output_dir":"/tmp"}"#;
    let train = r#"{"type":"run","node":"n","key":"k","kind":"train","params":{},"inputs":[],"work_dir":"/tmp","output_dir":"/tmp"}"#;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{merge}").unwrap();
        writeln!(stdin, "{train}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "hello");
    assert_eq!(lines[0]["device"], "cpu");
    assert_eq!(lines[1]["type"], "error");
    let refused = lines[1]["message"].as_str().unwrap();
    assert!(refused.contains("`merge`"), "{refused}");
    assert_eq!(lines[2]["type"], "error");
    let malformed = lines[2]["message"].as_str().unwrap();
    assert!(malformed.contains("malformed request"), "{malformed}");
}

#[test]
fn the_merge_only_recipe_runs_reruns_nothing_and_explains_an_edit() {
    let p = Project::new();
    let loras = p.path("loras");
    fs::create_dir_all(&loras).unwrap();
    for (i, angle) in ["front", "45deg", "side"].iter().enumerate() {
        for (j, size) in ["big", "small"].iter().enumerate() {
            random_lora(Layout::Tiny, 4, 1.0, (10 * i + j) as u64)
                .save(
                    &loras.join(format!("{size}_{angle}.safetensors")),
                    slider_lora::Precision::F32,
                )
                .unwrap();
        }
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/merge-only.yaml");
    let original = fs::read_to_string(&repo).unwrap();
    p.recipe(&original.replace("loras: ../assets/loras", "loras: loras"));
    let first = p.run();
    assert_eq!(first.ran.len(), 5, "{first:?}");
    assert!(p.path("out/eyesize.safetensors").is_file());
    assert!(p.run().ran.is_empty());

    p.recipe(
        &original
            .replace("loras: ../assets/loras", "loras: loras")
            .replace("dynamic_param: 0.75", "dynamic_param: 0.5"),
    );
    let out = p.output(&["explain", "recipe.yaml", "eyesize"]);
    let why = String::from_utf8_lossy(&out.stdout);
    assert!(
        why.contains("- dynamic_param: 0.75") && why.contains("+ dynamic_param: 0.5"),
        "{}",
        text(&out)
    );
    assert_eq!(p.run().ran, set(&["eyesize"]));
}

/// SIGTERM to a worker in the middle of training (what the runner sends when it is cancelled)
/// ends the run at the next step with a checkpoint in the work dir, so the next run resumes.
#[test]
fn sigterm_to_a_training_worker_leaves_a_checkpoint_to_resume_from() {
    use slider_models::checkpoint::{ModelSpec, StoreDtype, write_random_checkpoint};
    use std::io::{BufRead, BufReader, Write};

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.safetensors");
    write_random_checkpoint(&base, &ModelSpec::small_test(), StoreDtype::F32, 5).unwrap();
    let image = dir.path().join("a.png");
    image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, 90])
    })
    .save(&image)
    .unwrap();
    let (work, out) = (dir.path().join("work"), dir.path().join("out"));
    fs::create_dir_all(&work).unwrap();
    fs::create_dir_all(&out).unwrap();
    let file = |p: &Path| serde_json::json!({ "File": p });
    let params = serde_json::json!({
        "kind": "train", "base": file(&base), "images": [file(&image)], "caption": "a face",
        "learning_rate": 1e-3, "unet_lr": null, "train_batch_size": 1, "max_train_steps": 100000,
        "network_dim": 2, "network_alpha": 1.0, "conv_dim": null, "conv_alpha": null,
        "network_train_unet_only": true, "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "optimizer_type": "AdamW", "optimizer_args": {}, "seed": 1, "resolution": 32,
        "noise_offset": 0.0, "min_snr_gamma": null, "mixed_precision": "no",
        "gradient_checkpointing": false, "save_precision": "float", "checkpoint_every": 100000
    });
    let inputs = [&base, &image].map(|p| serde_json::json!({"input": file(p), "path": p}));
    let request = serde_json::json!({
        "type": "run", "node": "t", "key": "k", "kind": "train", "params": params,
        "inputs": inputs, "work_dir": work, "output_dir": out
    });
    let mut child = slider_run()
        .args(["worker", "--device", "cpu"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{request}").unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Past the hello and a few steps, then the signal.
    let mut progressed = 0;
    while progressed < 3 {
        let line: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_ne!(line["type"], "error", "{line}");
        if line["type"] == "progress" {
            progressed += 1;
        }
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let reply = loop {
        let line: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if line["type"] != "progress" {
            break line;
        }
    };
    assert_eq!(reply["type"], "error", "{reply}");
    let message = reply["message"].as_str().unwrap();
    assert!(message.contains("stopped"), "{message}");
    let step = slider_optim::ResumeState::step_of(&work.join("checkpoint.safetensors"))
        .expect("a checkpoint in the work dir");
    assert!(step >= 3, "checkpoint at step {step}");
    drop(stdin);
    let _ = child.wait();
}
