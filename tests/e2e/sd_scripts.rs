//! The gated sd-scripts tier: `trainer: sd-scripts` with the real kohya-ss/sd-scripts on the
//! CPU. A random full-size SD1.5 checkpoint from our writer, trained at 64 x 64 for a few
//! steps: the recipe trains two LoRAs, merges and resizes them; the runner is killed with
//! SIGKILL mid-training and the next run resumes from kohya's saved state; a third run runs
//! nothing.
//!
//! It runs only where sd-scripts is installed: `SLIDER_SD_SCRIPTS` names the checkout and
//! `SLIDER_SD_SCRIPTS_PYTHON` (or the checkout's `venv/bin/python`) the Python with torch and
//! sd-scripts' requirements (docs/sd-scripts.md). Without it, the test prints one line and
//! passes: CI has no checkout, so this is the tier CI skips, with `CI=true` too. About 6
//! minutes on 2 cores:
//! `SLIDER_SD_SCRIPTS=/opt/sd-scripts SLIDER_SD_SCRIPTS_PYTHON=/tmp/sdvenv/bin/python cargo test
//! --workspace --test e2e sd_scripts -- --nocapture`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use slider_models::ModelSpec;
use slider_models::checkpoint::{StoreDtype, write_random_checkpoint};

use crate::{json_of, slider_run};

/// The checkout, or `None` (with the one-line message) when sd-scripts is not installed.
fn installed() -> Option<PathBuf> {
    let checkout = std::env::var_os("SLIDER_SD_SCRIPTS").map(PathBuf::from);
    match checkout {
        Some(c) if c.join("train_network.py").is_file() => Some(c),
        _ => {
            eprintln!(
                "skipped: sd-scripts is not installed (set SLIDER_SD_SCRIPTS to a kohya-ss/sd-scripts checkout; docs/sd-scripts.md)"
            );
            None
        }
    }
}

const RECIPE: &str = "\
base: base.safetensors
defaults:
  train:
    trainer: sd-scripts
    caption: 1girl, solo, looking at viewer
    optimizer_type: CAME
    learning_rate: 1.0e-4
    network_dim: 4
    network_alpha: 1
    network_train_unet_only: true
    lr_warmup_steps: 1
    max_train_steps: 6
    checkpoint_every: 2
    resolution: 64
    seed: 42
nodes:
  small:
    kind: train
    images: [pairs/small_front.png]
  big:
    kind: train
    images: [pairs/big_front.png]
  slider:
    kind: svd_merge
    models: [big, small]
    ratios: [1.5, -1.5]
    new_rank: 8
  eyesize:
    kind: resize
    model: slider
    new_rank: 4
    dynamic_method: sv_fro
    dynamic_param: 0.75
    save_precision: fp16
outputs:
  eyesize: out/eyesize.safetensors
  small: out/small.safetensors
";

fn project(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::os::unix::fs::symlink(repo.join("assets/pairs"), dir.join("pairs")).unwrap();
    write_random_checkpoint(
        dir.join("base.safetensors"),
        &ModelSpec::sd15(),
        StoreDtype::F16,
        7,
    )
    .unwrap();
    let recipe = dir.join("eyesize-sd-scripts.yaml");
    fs::write(&recipe, RECIPE).unwrap();
    recipe
}

/// The first complete kohya state under the store's work dirs.
fn saved_state(store: &Path) -> Option<PathBuf> {
    let work = fs::read_dir(store.join("work")).ok()?;
    for node in work.flatten() {
        for attempt in fs::read_dir(node.path().join("attempts"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for state in fs::read_dir(attempt.path()).into_iter().flatten().flatten() {
                if state.path().join("random_states_0.pkl").is_file() {
                    return Some(state.path());
                }
            }
        }
    }
    None
}

fn names(v: &Value, key: &str) -> Vec<String> {
    let mut n: Vec<String> = v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            x.as_str()
                .map_or_else(|| x["name"].as_str().unwrap().to_string(), str::to_string)
        })
        .collect();
    n.sort();
    n
}

#[test]
fn sd_scripts_trains_merges_resizes_resumes_after_sigkill_and_reruns_nothing() {
    let Some(_checkout) = installed() else {
        return;
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let recipe = project(dir.path());
    let store = dir.path().join(".slider");

    // 1. Killed with SIGKILL once a training has saved its first state.
    let mut first = slider_run()
        .arg(&recipe)
        .arg("--json")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    let state = loop {
        if let Some(s) = saved_state(&store) {
            break s;
        }
        assert!(
            first.try_wait().unwrap().is_none(),
            "the run ended before any state was saved"
        );
        assert!(Instant::now() < deadline, "no state saved in 15 minutes");
        std::thread::sleep(Duration::from_millis(200));
    };
    // Past the state's last file, into the next steps.
    std::thread::sleep(Duration::from_secs(1));
    first.kill().unwrap();
    first.wait().unwrap();
    eprintln!("killed after {:?}, state {}", t0.elapsed(), state.display());

    // 2. The next run resumes that training and finishes the recipe.
    let second = json_of(slider_run().arg(&recipe).arg("--json"));
    assert_eq!(
        names(&second, "ran"),
        ["big", "eyesize", "slider", "small"],
        "{second}"
    );
    let logs: String = fs::read_dir(store.join("logs"))
        .unwrap()
        .flatten()
        .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("resuming at step 2 from"),
        "no resume in the logs"
    );

    let out = dir.path().join("out");
    let eyesize = slider_lora::Lora::load(&out.join("eyesize.safetensors")).unwrap();
    assert!(!eyesize.modules.is_empty() && eyesize.modules.values().all(|m| m.rank <= 4));
    let small = slider_lora::Lora::load(&out.join("small.safetensors")).unwrap();
    assert_eq!(small.modules.len(), 192, "kohya's SD1 UNet targets");
    assert!(
        small.modules.keys().all(|k| k.starts_with("lora_unet_")),
        "UNet only"
    );
    assert_eq!(
        small.metadata.get("ss_network_module").map(String::as_str),
        Some("networks.lora")
    );
    let layout = slider_lora::detect_layout(&small);
    assert_eq!(
        layout.unet,
        Some(slider_lora::layout::UnetLayout::Known(
            slider_lora::layout::Layout::Sd1
        ))
    );
    // Every step's loss, the resumed ones included, in the node's `loss` output.
    for node in fs::read_dir(store.join("objects")).unwrap().flatten() {
        let csv = node.path().join("loss.csv");
        if csv.is_file() {
            let text = fs::read_to_string(&csv).unwrap();
            let steps: Vec<&str> = text
                .lines()
                .skip(1)
                .map(|l| l.split(',').next().unwrap())
                .collect();
            assert_eq!(steps, ["1", "2", "3", "4", "5", "6"], "{}", csv.display());
        }
    }

    // 3. Nothing left to do.
    let third = json_of(slider_run().arg(&recipe).arg("--json"));
    assert!(names(&third, "ran").is_empty(), "{third}");
    assert_eq!(names(&third, "cached").len(), 4, "{third}");
    eprintln!("sd-scripts tier: {:?}", t0.elapsed());
}
