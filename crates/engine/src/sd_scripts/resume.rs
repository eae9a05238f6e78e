//! Resume across attempts. sd-scripts restarts its step count at 0 in a resumed run, so its
//! state folders (`lora-step00000004-state`) give steps within one attempt only. Each
//! attempt therefore writes into its own folder named by the true step it started from,
//! `attempts/from-00000008/`, and a state's true step is that start plus its own count.

use std::fs;
use std::path::{Path, PathBuf};

use super::args::OUTPUT_NAME;

/// A complete state sd-scripts can resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct State {
    pub dir: PathBuf,
    /// The training step it was saved after, counted from the node's first attempt.
    pub step: u64,
}

/// The folder of the attempt that starts at `step`.
pub(crate) fn attempt_dir(attempts: &Path, step: u64) -> PathBuf {
    attempts.join(format!("from-{step:08}"))
}

/// The latest complete state before `max_steps` (a state at the last step may lack the
/// final LoRA, which is written after it: that attempt's last steps are redone).
pub(crate) fn latest_state(attempts: &Path, max_steps: u64) -> Option<State> {
    let mut best: Option<State> = None;
    for attempt in read_names(attempts) {
        let Some(start) = number_in(&attempt, "from-", "") else {
            continue;
        };
        let dir = attempts.join(&attempt);
        for name in read_names(&dir) {
            let prefix = format!("{OUTPUT_NAME}-step");
            let Some(own) = number_in(&name, &prefix, "-state") else {
                continue;
            };
            let state = dir.join(&name);
            let step = start + own;
            if own == 0 || step >= max_steps || !complete(&state) {
                continue;
            }
            if best.as_ref().is_none_or(|b| step > b.step) {
                best = Some(State { dir: state, step });
            }
        }
    }
    best
}

/// accelerate writes `random_states_0.pkl` last and sd-scripts' hook `train_state.json`
/// first: a folder with both was written to the end.
fn complete(state: &Path) -> bool {
    ["train_state.json", "random_states_0.pkl"]
        .iter()
        .all(|f| fs::metadata(state.join(f)).is_ok_and(|m| m.is_file() && m.len() > 0))
}

fn read_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

fn number_in(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(attempts: &Path, start: u64, own: u64, files: &[&str]) {
        let dir = attempt_dir(attempts, start).join(format!("lora-step{own:08}-state"));
        fs::create_dir_all(&dir).unwrap();
        for f in files {
            fs::write(dir.join(f), b"x").unwrap();
        }
    }

    #[test]
    fn the_latest_complete_state_before_the_end_counts_across_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path();
        let whole = ["train_state.json", "random_states_0.pkl"];
        assert_eq!(latest_state(a, 12), None);
        state(a, 0, 4, &whole);
        assert_eq!(latest_state(a, 12).map(|s| s.step), Some(4));
        // The resumed attempt from step 4 saved its own step 4: the true step 8.
        state(a, 4, 4, &whole);
        assert_eq!(latest_state(a, 12).map(|s| s.step), Some(8));
        // Killed while writing the next one: not complete, not taken.
        state(a, 8, 2, &["train_state.json"]);
        assert_eq!(latest_state(a, 12).map(|s| s.step), Some(8));
        // A state at the last step is not resumed from.
        state(a, 8, 4, &whole);
        let s = latest_state(a, 12).unwrap();
        assert_eq!(
            (s.step, s.dir),
            (8, attempt_dir(a, 4).join("lora-step00000004-state"))
        );
        assert_eq!(latest_state(a, 13).map(|s| s.step), Some(12));
    }
}
