//! Scheduler specifications, on hand-built plans of `command` nodes (sh scripts), LoRA
//! nodes on synthetic LoRAs, and worker nodes served by a test worker.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use petgraph::graph::DiGraph;
use slider_recipe::{
    CommandParams, Input, MergeParams, Node, NodeParams, Origin, Plan, Precision, ResizeParams,
    SvdMergeParams,
};

use crate::inspect::{Change, Freshness, status};
use crate::protocol::WorkerKind;
use crate::{CancelToken, RunOptions, RunSummary, Silent, Store, gc, lockfile_path, run};

/// A plan from (name, params); edges come from the params' node inputs.
pub fn plan(dir: &Path, nodes: Vec<(&str, NodeParams)>, outputs: &[(&str, &str)]) -> Plan {
    let recipe_path = dir.join("recipe.yaml");
    let nodes: Vec<Node> = nodes
        .into_iter()
        .map(|(name, params)| Node {
            name: name.into(),
            params,
            origin: Origin {
                file: recipe_path.clone(),
                line: 1,
                column: 1,
            },
        })
        .collect();
    let mut graph = DiGraph::new();
    let idx: Vec<_> = (0..nodes.len()).map(|i| graph.add_node(i)).collect();
    for (i, n) in nodes.iter().enumerate() {
        for input in n.params.inputs() {
            if let Input::Node(name) = input {
                let j = nodes
                    .iter()
                    .position(|m| &m.name == name)
                    .expect("known node");
                graph.add_edge(idx[j], idx[i], ());
            }
        }
    }
    let outputs = outputs
        .iter()
        .map(|(n, p)| (n.to_string(), dir.join(p)))
        .collect();
    Plan {
        recipe_path,
        root: dir.to_path_buf(),
        nodes,
        graph,
        outputs,
    }
}

/// A `command` node running `sh -c script`, with `{name}` placeholders.
pub fn sh(script: &str, inputs: &[(&str, Input)], outputs: &[(&str, &str)]) -> NodeParams {
    NodeParams::Command(CommandParams {
        run: vec!["sh".into(), "-c".into(), script.into()],
        inputs: inputs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        outputs: outputs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
}

fn node(name: &str) -> Input {
    Input::Node(name.into())
}

fn names(reports: &[crate::NodeReport]) -> BTreeSet<String> {
    reports.iter().map(|r| r.name.clone()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn go(plan: &Plan, store: &Path) -> RunSummary {
    run(
        plan,
        store,
        &RunOptions {
            jobs: 2,
            ..RunOptions::default()
        },
        &Silent,
    )
    .unwrap()
}

/// a -> b -> d, c -> d; `a`'s content depends on `word`.
fn diamond(dir: &Path, word: &str, b_suffix: &str) -> Plan {
    plan(
        dir,
        vec![
            (
                "a",
                sh(&format!("echo {word} > {{out}}"), &[], &[("out", "a.txt")]),
            ),
            ("c", sh("echo c > {out}", &[], &[("out", "c.txt")])),
            (
                "b",
                sh(
                    &format!("cat {{x}} > {{out}}; echo b{b_suffix} >> {{out}}"),
                    &[("x", node("a"))],
                    &[("out", "b.txt")],
                ),
            ),
            (
                "d",
                sh(
                    "cat {x} {y} > {out}",
                    &[("x", node("b")), ("y", node("c"))],
                    &[("out", "d.txt")],
                ),
            ),
        ],
        &[("d", "published/d.txt")],
    )
}

#[test]
fn reruns_exactly_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join(".slider");
    // (step, plan, expected ran, expected cached)
    let steps: Vec<(&str, Plan, Vec<&str>, Vec<&str>)> = vec![
        (
            "first run",
            diamond(dir.path(), "hello", ""),
            vec!["a", "b", "c", "d"],
            vec![],
        ),
        (
            "no-op",
            diamond(dir.path(), "hello", ""),
            vec![],
            vec!["a", "b", "c", "d"],
        ),
        (
            "edit b",
            diamond(dir.path(), "hello", "2"),
            vec!["b", "d"],
            vec!["a", "c"],
        ),
        (
            "edit a",
            diamond(dir.path(), "bye", "2"),
            vec!["a", "b", "d"],
            vec!["c"],
        ),
        (
            "back to an earlier state",
            diamond(dir.path(), "hello", ""),
            vec![],
            vec!["a", "b", "c", "d"],
        ),
    ];
    for (what, p, ran, cached) in steps {
        let s = go(&p, &store);
        assert_eq!(names(&s.ran), set(&ran), "{what}: ran");
        assert_eq!(names(&s.cached), set(&cached), "{what}: cached");
        assert!(s.success(), "{what}: {s:?}");
    }
    assert_eq!(
        fs::read_to_string(dir.path().join("published/d.txt")).unwrap(),
        "hello\nb\nc\n"
    );
    assert!(lockfile_path(&dir.path().join("recipe.yaml")).exists());
}

#[test]
fn early_cutoff_keeps_dependents_fresh_when_output_bytes_are_equal() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join(".slider");
    let p = |script: &str| {
        plan(
            dir.path(),
            vec![
                ("up", sh(script, &[], &[("out", "o.txt")])),
                (
                    "down",
                    sh("cat {x} > {out}", &[("x", node("up"))], &[("out", "o.txt")]),
                ),
            ],
            &[],
        )
    };
    go(&p("echo same > {out}"), &store);
    let s = go(&p("printf 'same\\n' > {out}"), &store);
    assert_eq!(names(&s.ran), set(&["up"]));
    assert_eq!(names(&s.cached), set(&["down"]));
}

#[test]
fn a_failure_stops_its_dependents_only_unless_no_keep_going() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan(
        dir.path(),
        vec![
            ("bad", sh("echo oops >&2; exit 3", &[], &[("out", "o")])),
            (
                "after_bad",
                sh("cat {x} > {out}", &[("x", node("bad"))], &[("out", "o")]),
            ),
            (
                "good",
                sh("sleep 0.3; echo ok > {out}", &[], &[("out", "o")]),
            ),
            ("forgot_output", sh("true", &[], &[("out", "o")])),
        ],
        &[],
    );
    let s = go(&p, &dir.path().join("s1"));
    assert_eq!(names(&s.failed), set(&["bad", "forgot_output"]));
    assert_eq!(names(&s.skipped), set(&["after_bad"]));
    assert_eq!(names(&s.ran), set(&["good"]));
    let bad = s.failed.iter().find(|r| r.name == "bad").unwrap();
    assert!(
        bad.error
            .as_ref()
            .unwrap()
            .ends_with("(exit status: 3): oops"),
        "{bad:?}"
    );
    assert!(
        fs::read_to_string(bad.log.as_ref().unwrap())
            .unwrap()
            .contains("oops")
    );
    let forgot = s.failed.iter().find(|r| r.name == "forgot_output").unwrap();
    assert!(
        forgot
            .error
            .as_ref()
            .unwrap()
            .contains("did not create its declared output `out`"),
        "{forgot:?}"
    );
    assert!(
        !lockfile_path(&p.recipe_path).exists(),
        "no lockfile after failures"
    );

    let opts = RunOptions {
        jobs: 1,
        keep_going: false,
        ..RunOptions::default()
    };
    let s = run(&p, &dir.path().join("s2"), &opts, &Silent).unwrap();
    assert_eq!(names(&s.failed), set(&["bad"]));
    assert_eq!(s.ran.len(), 0);
}

#[test]
fn unsupported_kinds_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan(
        dir.path(),
        vec![("train_me", train(Input::File(dir.path().join("base"))))],
        &[],
    );
    let err = run(
        &p,
        &dir.path().join(".slider"),
        &RunOptions::default(),
        &Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("no executor for kind") && err.contains("`train_me`"),
        "{err}"
    );
    assert!(!dir.path().join(".slider").exists(), "nothing was created");
}

#[test]
fn cancelling_kills_the_running_command_and_leaves_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join(".slider");
    let p = plan(
        dir.path(),
        vec![(
            "slow",
            sh(
                "echo partial > {out}; sleep 30; echo done >> {out}",
                &[],
                &[("out", "o")],
            ),
        )],
        &[],
    );
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        c2.cancel();
    });
    let t0 = std::time::Instant::now();
    let s = run(
        &p,
        &store,
        &RunOptions {
            cancel,
            ..RunOptions::default()
        },
        &Silent,
    )
    .unwrap();
    assert!(t0.elapsed().as_secs() < 10, "the child was killed");
    assert!(s.interrupted);
    assert_eq!(Store::at(&store).keys().unwrap(), Vec::<String>::new());
    assert_eq!(
        fs::read_dir(store.join("tmp")).unwrap().count(),
        0,
        "temp dirs removed"
    );
}

#[test]
fn status_and_explain_say_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join(".slider");
    go(&diamond(dir.path(), "hello", ""), &store);
    let st = status(&diamond(dir.path(), "hello", "2"), &store, &[]).unwrap();
    let by: BTreeMap<&str, (Freshness, Vec<String>)> = st
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                (s.state, s.changes.iter().map(Change::summary).collect()),
            )
        })
        .collect();
    assert_eq!(by["a"], (Freshness::Fresh, vec![]));
    assert_eq!(by["b"].0, Freshness::Stale);
    assert_eq!(
        by["b"].1,
        vec![
            r#"run[2]: "cat {x} > {out}; echo b >> {out}" -> "cat {x} > {out}; echo b2 >> {out}""#
        ]
    );
    assert_eq!(
        by["d"],
        (Freshness::Stale, vec!["waits on `b`".to_string()])
    );
    let text = st.iter().find(|s| s.name == "b").unwrap().explanation();
    assert!(
        text.contains("- run[2]") && text.contains("+ run[2]"),
        "{text}"
    );

    // A renamed node has no recorded run under its new name, but the same key: fresh.
    let renamed = plan(
        dir.path(),
        vec![(
            "a_renamed",
            sh("echo hello > {out}", &[], &[("out", "a.txt")]),
        )],
        &[],
    );
    assert_eq!(
        status(&renamed, &store, &[]).unwrap()[0].state,
        Freshness::Fresh
    );
}

#[test]
fn gc_keeps_only_what_lockfiles_reference() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join(".slider");
    go(&diamond(dir.path(), "one", ""), &store);
    let s = go(&diamond(dir.path(), "two", ""), &store);
    assert_eq!(Store::at(&store).keys().unwrap().len(), 7);
    let keep: BTreeSet<String> = s.keys.values().cloned().collect();
    let report = gc(&store, &keep).unwrap();
    assert_eq!((report.removed_objects, report.kept_objects), (3, 4));
    assert_eq!(go(&diamond(dir.path(), "two", ""), &store).ran.len(), 0);
}

pub(crate) fn train(base: Input) -> NodeParams {
    NodeParams::Train(slider_recipe::TrainParams {
        base,
        base_config: None,
        images: vec![],
        caption: "a".into(),
        learning_rate: 5e-5,
        unet_lr: None,
        train_batch_size: 1,
        max_train_steps: 2,
        network_dim: 4,
        network_alpha: 1.0,
        conv_dim: None,
        conv_alpha: None,
        network_train_unet_only: true,
        lr_scheduler: slider_recipe::LrScheduler::Constant,
        lr_warmup_steps: 0,
        optimizer_type: slider_recipe::Optimizer::Came,
        optimizer_args: BTreeMap::new(),
        seed: 1,
        resolution: 64,
        noise_offset: 0.0,
        min_snr_gamma: None,
        mixed_precision: slider_recipe::MixedPrecision::No,
        no_half_vae: false,
        gradient_checkpointing: false,
        save_precision: Precision::Float,
        checkpoint_every: 0,
        training_comment: String::new(),
        trainer: slider_recipe::Trainer::Burn,
        sd_scripts: None,
    })
}

/// A worker in sh: "trains" by writing the base file's bytes; dies if the caption is `crash`.
const SH_WORKER: &str = r#"echo '{"type":"hello","kinds":["train"],"device":"cpu"}'
while read -r line; do
  case "$line" in *'"type":"shutdown"'*) exit 0 ;; *'"caption":"crash"'*) exit 9 ;; esac
  out=$(printf '%s' "$line" | sed -n 's/.*"output_dir":"\([^"]*\)".*/\1/p')
  base=$(printf '%s' "$line" | sed -n 's/.*"inputs":\[{"input":{"File":"[^"]*"},"path":"\([^"]*\)".*/\1/p')
  echo '{"type":"progress","step":1,"total":1}'
  cp "$base" "$out/lora.safetensors"
  echo '{"type":"result","outputs":[{"name":"lora","file":"lora.safetensors"}]}'
done
"#;

/// A temporary folder with a base file, and run options whose one worker slot (`cpu`) is
/// [`SH_WORKER`].
fn sh_worker_world() -> (tempfile::TempDir, PathBuf, RunOptions) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.bin");
    fs::write(&base, "weights").unwrap();
    let worker = dir.path().join("worker.sh");
    fs::write(&worker, SH_WORKER).unwrap();
    let opts = RunOptions {
        worker_command: vec!["sh".into(), worker.display().to_string()],
        worker_kinds: vec![WorkerKind {
            kind: "train".into(),
            code_version: 1,
        }],
        devices: vec!["cpu".into()],
        ..RunOptions::default()
    };
    (dir, base, opts)
}

#[test]
fn worker_nodes_run_on_the_pool_and_a_crash_fails_only_that_node() {
    let (dir, base, opts) = sh_worker_world();
    let mut crash = train(Input::File(base.clone()));
    if let NodeParams::Train(t) = &mut crash {
        t.caption = "crash".into();
    }
    let p = plan(
        dir.path(),
        vec![
            ("ok", train(Input::File(base.clone()))),
            ("crashes", crash),
            (
                "uses_ok",
                sh("cat {x} > {out}", &[("x", node("ok"))], &[("out", "o")]),
            ),
        ],
        &[("uses_ok", "out.txt")],
    );
    let s = run(&p, &dir.path().join(".slider"), &opts, &Silent).unwrap();
    assert_eq!(names(&s.ran), set(&["ok", "uses_ok"]));
    assert_eq!(names(&s.failed), set(&["crashes"]));
    assert!(
        s.failed[0].error.as_ref().unwrap().contains("died"),
        "{:?}",
        s.failed
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "weights"
    );
}

/// Records the order in which nodes start.
struct StartOrder(std::sync::Mutex<Vec<String>>);

impl crate::Observer for StartOrder {
    fn event(&self, event: crate::Event<'_>) {
        if let crate::Event::Started { node, .. } = event {
            self.0.lock().unwrap().push(node.to_owned());
        }
    }
}

#[test]
fn with_one_slot_the_node_with_the_most_work_ahead_starts_first() {
    let (dir, base, opts) = sh_worker_world();
    let steps = |n: usize| {
        let mut t = train(Input::File(base.clone()));
        if let NodeParams::Train(t) = &mut t {
            t.max_train_steps = n;
            t.caption = format!("{n} steps");
        }
        t
    };
    // In plan order the short one comes first; FIFO would start it first.
    let p = plan(
        dir.path(),
        vec![
            ("short", steps(2)),
            ("long", steps(50)),
            ("middle", steps(10)),
        ],
        &[],
    );
    let order = StartOrder(std::sync::Mutex::new(Vec::new()));
    let s = run(&p, &dir.path().join(".slider"), &opts, &order).unwrap();
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert_eq!(*order.0.lock().unwrap(), ["long", "middle", "short"]);
}

fn lora_file(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let path = dir.join(name);
    slider_lora::synth::random_lora(slider_lora::synth::Layout::Tiny, 4, 1.0, seed)
        .save(&path, slider_lora::Precision::F32)
        .unwrap();
    path
}

#[test]
fn lora_kinds_run_in_process_and_verify_against_the_lockfile() {
    let dir = tempfile::tempdir().unwrap();
    let a = lora_file(dir.path(), "a.safetensors", 1);
    let b = lora_file(dir.path(), "b.safetensors", 2);
    let p = plan(
        dir.path(),
        vec![
            (
                "slider",
                NodeParams::SvdMerge(SvdMergeParams {
                    models: vec![Input::File(b.clone()), Input::File(a.clone())],
                    ratios: vec![1.5, -1.5],
                    new_rank: 8,
                    new_conv_rank: 8,
                    precision: Precision::Float,
                    save_precision: Precision::Float,
                    clamp_quantile: Some(0.99),
                }),
            ),
            (
                "sum",
                NodeParams::Merge(MergeParams {
                    models: vec![node("slider"), Input::File(a.clone())],
                    ratios: vec![1.0, 0.5],
                    save_precision: Precision::Fp16,
                }),
            ),
            (
                "small",
                NodeParams::Resize(ResizeParams {
                    model: node("sum"),
                    new_rank: 4,
                    new_conv_rank: 4,
                    dynamic_method: Some(slider_recipe::DynamicMethod::SvFro),
                    dynamic_param: Some(0.75),
                    rank_rule: Default::default(),
                    save_precision: Precision::Fp16,
                }),
            ),
        ],
        &[("small", "out/eyes.safetensors")],
    );
    let store = dir.path().join(".slider");
    let s = go(&p, &store);
    assert_eq!(names(&s.ran), set(&["slider", "sum", "small"]), "{s:?}");
    let out = slider_lora::Lora::load(&dir.path().join("out/eyes.safetensors")).unwrap();
    assert!(!out.modules.is_empty());

    let report =
        crate::verify::verify(&p, &store, &[], None, &RunOptions::default(), &Silent).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.rows.len(), 3);
}

#[test]
fn verify_reports_a_nondeterministic_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join(".slider");
    let p = plan(
        dir.path(),
        vec![
            ("stable", sh("echo 1 > {out}", &[], &[("out", "o")])),
            ("clock", sh("date +%s%N > {out}", &[], &[("out", "o")])),
        ],
        &[],
    );
    go(&p, &store);
    let report =
        crate::verify::verify(&p, &store, &[], None, &RunOptions::default(), &Silent).unwrap();
    let verdicts: BTreeMap<&str, bool> = report
        .rows
        .iter()
        .map(|r| {
            (
                r.node.as_str(),
                matches!(r.verdict, crate::verify::Verdict::Identical),
            )
        })
        .collect();
    assert_eq!(verdicts, [("clock", false), ("stable", true)].into());
    let only = crate::verify::verify(
        &p,
        &store,
        &["stable".into()],
        None,
        &RunOptions::default(),
        &Silent,
    )
    .unwrap();
    assert!(only.ok() && only.rows.len() == 1);
}

#[test]
fn verify_tolerance_accepts_small_lora_delta_differences_only() {
    let dir = tempfile::tempdir().unwrap();
    let a = lora_file(dir.path(), "a.safetensors", 1);
    let b = lora_file(dir.path(), "b.safetensors", 2);
    let p = plan(
        dir.path(),
        vec![(
            "sum",
            NodeParams::Merge(MergeParams {
                models: vec![Input::File(a), Input::File(b)],
                ratios: vec![1.0, -1.0],
                save_precision: Precision::Float,
            }),
        )],
        &[],
    );
    let store = dir.path().join(".slider");
    let key = go(&p, &store).keys["sum"].clone();
    // Pretend the locked result came from another backend: every `up` scaled by 1 + 1e-4.
    let locked_file = Store::at(&store).object_dir(&key).join(crate::LORA_FILE);
    let mut other = slider_lora::Lora::load(&locked_file).unwrap();
    for m in other.modules.values_mut() {
        m.up.iter_mut().for_each(|x| *x *= 1.0 + 1e-4);
    }
    other
        .save(&locked_file, slider_lora::Precision::F32)
        .unwrap();
    let lock_path = lockfile_path(&p.recipe_path);
    let mut lock = crate::Lockfile::read(&lock_path).unwrap();
    lock.nodes.get_mut("sum").unwrap().outputs[0].hash =
        crate::fsutil::hash_file(&locked_file).unwrap();
    lock.write(&lock_path).unwrap();

    let comparer = crate::lora_delta_error;
    // (tolerance, accepted?)
    let cases = [(None, false), (Some(1e-3), true), (Some(1e-6), false)];
    for (tol, accepted) in cases {
        let tol = tol.map(|t| (t, &comparer as &crate::verify::LoraComparer));
        let report =
            crate::verify::verify(&p, &store, &[], tol, &RunOptions::default(), &Silent).unwrap();
        assert_eq!(
            report.ok(),
            accepted,
            "{tol:?}: {report:?}",
            tol = tol.map(|t| t.0)
        );
        if accepted {
            let crate::verify::Verdict::WithinTolerance { max_error } = report.rows[0].verdict
            else {
                panic!()
            };
            assert!((max_error - 1e-4).abs() < 2e-5, "{max_error}");
        }
    }
}

/// An input file edited while its node runs: the result is not committed under the key of the
/// old content; the next run keys the new content and succeeds.
#[test]
fn an_input_edited_while_its_node_runs_is_not_cached_under_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.txt");
    fs::write(&src, "before\n").unwrap();
    let p = plan(
        dir.path(),
        vec![(
            "copy",
            // The script reads its input, then (like a user saving the file mid-run) edits it.
            sh(
                "cat {x} > {out}; echo edited >> {x}",
                &[("x", Input::File(src.clone()))],
                &[("out", "copy.txt")],
            ),
        )],
        &[("copy", "published/copy.txt")],
    );
    let store = dir.path().join(".slider");
    let first = go(&p, &store);
    assert_eq!(names(&first.failed), set(&["copy"]));
    let error = first.failed[0].error.as_deref().unwrap_or_default();
    assert!(
        error.contains("changed while the node ran") && error.contains("src.txt"),
        "{error}"
    );
    assert!(
        Store::at(&store).keys().unwrap().is_empty(),
        "nothing committed"
    );
    assert!(!dir.path().join("published/copy.txt").exists());
    // With the input left alone, the node runs on the new content and is cached.
    let p = plan(
        dir.path(),
        vec![(
            "copy",
            sh(
                "cat {x} > {out}",
                &[("x", Input::File(src.clone()))],
                &[("out", "copy.txt")],
            ),
        )],
        &[("copy", "published/copy.txt")],
    );
    let second = go(&p, &store);
    assert_eq!(names(&second.ran), set(&["copy"]));
    assert_eq!(
        fs::read_to_string(dir.path().join("published/copy.txt")).unwrap(),
        "before\nedited\n"
    );
}
