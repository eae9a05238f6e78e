//! The runner killed with SIGKILL at seeded random moments of the shortened default recipe
//! (mid-training included), and the same recipe on a "full disk" (RLIMIT_FSIZE, SIGXFSZ
//! ignored, so a write past the limit fails with EFBIG as on a full disk), each followed by a
//! run to the end. Every published output and the lock file must be byte-identical to an
//! uninterrupted run, and every store entry must read after every kill.
//!
//! The kills come in chains: a project is killed, resumed and killed again, five times, and
//! then run to the end, so each kill after the first lands in a run that resumes a killed
//! one. Both run in `cargo test` (and so in CI): about 4 and 3 minutes on 2 cores. Longer
//! campaign: `SLIDER_KILL_CASES=100 SLIDER_KILL_SEED=9 cargo test -p slider-cli --test e2e
//! crash -- --nocapture`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::eyesize::{SHORT, project};
use crate::slider_run;

/// The shortened recipe, with trainings long enough to be killed in the middle and
/// checkpointed often enough that a kill lands after a checkpoint.
fn args(recipe: &Path) -> Vec<String> {
    let mut a = vec![recipe.display().to_string()];
    a.extend(SHORT.iter().map(|s| s.to_string()));
    for s in ["train.max_train_steps=16", "train.checkpoint_every=4"] {
        a.extend(["--set".to_string(), s.to_string()]);
    }
    a.push("--json".into());
    a
}

/// Every published output (`recipes/out/**`) and the lock file, by path relative to the
/// project, with their bytes. The HTML report is left out: it shows wall times.
pub(crate) fn published(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, into);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                into.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, &dir.join("recipes/out"), &mut files);
    for e in fs::read_dir(dir.join("recipes")).unwrap().flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "lock") {
            files.insert(
                path.strip_prefix(dir).unwrap().into(),
                fs::read(&path).unwrap(),
            );
        }
    }
    files
}

pub(crate) fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Never a panic, a signal or an internal error: what a clean failure is not.
fn unclean(out: &Output) -> Option<String> {
    let all = text(out);
    if out.status.code().is_none() {
        Some(format!("killed by a signal: {all}"))
    } else if out.status.code() == Some(101) || all.contains("panicked at") {
        Some(format!("panicked: {all}"))
    } else {
        None
    }
}

/// What is wrong in the store under `dir` (empty when every entry is readable): each
/// `objects/<key>` has a manifest naming its key, and every output file it lists is there
/// with its size and reads as what it is (a LoRA, a PNG, JSON).
fn unreadable_store_entries(dir: &Path) -> Vec<String> {
    let store = slider_engine::Store::at(dir.join("recipes/.slider"));
    let keys = match store.keys() {
        Ok(k) => k,
        Err(e) => return vec![format!("the store's keys: {e}")],
    };
    let mut bad = Vec::new();
    for key in keys {
        let manifest = match store.manifest(&key) {
            Ok(Some(m)) if m.key == key => m,
            Ok(Some(m)) => {
                bad.push(format!("{key}: manifest names key {}", m.key));
                continue;
            }
            Ok(None) => {
                bad.push(format!("{key}: no manifest"));
                continue;
            }
            Err(e) => {
                bad.push(format!("{key}: {e}"));
                continue;
            }
        };
        for out in &manifest.outputs {
            let path = store.object_dir(&key).join(&out.file);
            let len = fs::metadata(&path).map(|m| m.len()).ok();
            if len != Some(out.size) {
                bad.push(format!(
                    "{key}/{}: size {len:?}, manifest {}",
                    out.file, out.size
                ));
                continue;
            }
            let readable = match path.extension().and_then(|x| x.to_str()) {
                Some("safetensors") if manifest.kind == "merge_into_model" => true,
                Some("safetensors") => slider_lora::Lora::load(&path)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
                    .err()
                    .is_none(),
                Some("png") => image::open(&path).is_ok(),
                Some("json") => serde_json::from_slice::<serde_json::Value>(
                    &fs::read(&path).unwrap_or_default(),
                )
                .is_ok(),
                _ => true,
            };
            if !readable {
                bad.push(format!("{key}/{}: does not read as its kind", out.file));
            }
        }
    }
    bad
}

/// Checks the store, runs to the end and checks the store and the outputs against
/// `reference`.
fn finish_and_compare(
    dir: &Path,
    recipe: &Path,
    reference: &BTreeMap<PathBuf, Vec<u8>>,
    what: &str,
) -> Vec<String> {
    let mut divergences: Vec<String> = unreadable_store_entries(dir)
        .into_iter()
        .map(|b| format!("{what}: before the re-run: {b}"))
        .collect();
    let out = slider_run().args(args(recipe)).output().unwrap();
    if !out.status.success() {
        divergences.push(format!("{what}: the run to the end failed: {}", text(&out)));
        return divergences;
    }
    let got = published(dir);
    if got.keys().ne(reference.keys()) {
        divergences.push(format!(
            "{what}: published files {:?}, expected {:?}",
            got.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>()
        ));
    }
    for (path, bytes) in reference {
        if got.get(path) != Some(bytes) {
            divergences.push(format!(
                "{what}: {} differs from the uninterrupted run",
                path.display()
            ));
        }
    }
    divergences.extend(
        unreadable_store_entries(dir)
            .into_iter()
            .map(|b| format!("{what}: after the run: {b}")),
    );
    divergences
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The uninterrupted run: its outputs and how long it took.
fn reference() -> (BTreeMap<PathBuf, Vec<u8>>, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let recipe = project(dir.path());
    let t0 = Instant::now();
    let out = slider_run().args(args(&recipe)).output().unwrap();
    let took = t0.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    (published(dir.path()), took)
}

/// Whether any training had a checkpoint in its work dir at this moment.
fn training_checkpointed(dir: &Path) -> bool {
    fs::read_dir(dir.join("recipes/.slider/work"))
        .map(|d| {
            d.flatten()
                .any(|e| e.path().join("checkpoint.safetensors").is_file())
        })
        .unwrap_or(false)
}

/// How many kills each project takes before its run to the end.
const KILLS_PER_CHAIN: u64 = 5;

#[test]
fn kill_9_at_random_moments_of_the_default_recipe_then_run_to_the_end() {
    let cases = env_or("SLIDER_KILL_CASES", 20);
    let seed = env_or("SLIDER_KILL_SEED", 23);
    let (reference, took) = reference();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut mid_training, mut finished_first) = (0, 0);
    let mut divergences = Vec::new();
    let mut case = 0;
    while case < cases {
        let dir = tempfile::tempdir().unwrap();
        let recipe = project(dir.path());
        let chain_start = case;
        for _ in 0..KILLS_PER_CHAIN.min(cases - case) {
            // Up to half the uninterrupted run's time from each start: a chain's kills
            // land from before the first node starts to the grids and the evaluations.
            let at = took.mul_f64(rng.random_range(0.02..0.5));
            let mut child = slider_run()
                .args(args(&recipe))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let t0 = Instant::now();
            let mut checkpointed = false;
            while t0.elapsed() < at && child.try_wait().unwrap().is_none() {
                checkpointed |= training_checkpointed(dir.path());
                std::thread::sleep(Duration::from_millis(5));
            }
            if child.try_wait().unwrap().is_some() {
                finished_first += 1;
            } else {
                child.kill().unwrap();
                child.wait().unwrap();
                mid_training += usize::from(checkpointed && training_checkpointed(dir.path()));
            }
            divergences.extend(unreadable_store_entries(dir.path()).into_iter().map(|b| {
                format!(
                    "kill {case} (at {:.2} s): before the next run: {b}",
                    at.as_secs_f64()
                )
            }));
            case += 1;
        }
        divergences.extend(finish_and_compare(
            dir.path(),
            &recipe,
            &reference,
            &format!("kills {chain_start}..{case}"),
        ));
    }
    eprintln!(
        "kill -9 campaign, seed {seed}: {cases} kills in chains of {KILLS_PER_CHAIN}, \
         {mid_training} with a training checkpointed mid-way, {finished_first} finished \
         before the kill, {} divergences (reference run {:.1} s)",
        divergences.len(),
        took.as_secs_f64()
    );
    assert!(divergences.is_empty(), "{divergences:#?}");
    assert!(
        mid_training > 0 || cases < 5,
        "no kill landed in the middle of a training"
    );
}

/// A run whose every file write is capped at `limit` bytes (RLIMIT_FSIZE, inherited by the
/// workers), as a disk that fills up at that point would fail it.
fn run_with_file_size_limit(recipe: &Path, limit: u64) -> Output {
    let mut cmd = slider_run();
    cmd.args(args(recipe));
    // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs before exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

#[test]
fn a_full_disk_fails_cleanly_and_the_next_run_recovers() {
    let (reference, _) = reference();
    let (mut divergences, mut succeeded) = (Vec::new(), Vec::new());
    // From the journal's first lines to the LoRA files, the grids and the trainer's
    // checkpoints (the base is about 2 MB, a LoRA tens of kB).
    for limit in [0, 512, 16 << 10, 64 << 10, 256 << 10, 1 << 20] {
        let dir = tempfile::tempdir().unwrap();
        let recipe = project(dir.path());
        let out = run_with_file_size_limit(&recipe, limit);
        if let Some(why) = unclean(&out) {
            divergences.push(format!("limit {limit}: {why}"));
        }
        if out.status.success() {
            // No file of this run grew past the limit: nothing to fail.
            succeeded.push(limit);
        } else if !text(&out).contains("File too large") {
            // On stderr, or with `--json` in the report's failed nodes: the write that
            // failed, with the system's reason (EFBIG, as ENOSPC would be for a full disk).
            divergences.push(format!(
                "limit {limit}: failed without naming the write: {}",
                text(&out)
            ));
        }
        divergences.extend(finish_and_compare(
            dir.path(),
            &recipe,
            &reference,
            &format!("limit {limit}"),
        ));
    }
    eprintln!(
        "full disk: 6 limits, {} divergences; runs that fit under their limit: {succeeded:?}",
        divergences.len()
    );
    assert!(divergences.is_empty(), "{divergences:#?}");
    assert!(
        succeeded.len() <= 1,
        "most limits must cut a write: {succeeded:?}"
    );
}
