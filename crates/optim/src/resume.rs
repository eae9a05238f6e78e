//! The one resume-state file of every training loop (LoRA training, pretraining): the trained
//! tensors by name, the optimizer's state, the settings it was made with and the loop's
//! position, in one safetensors file written atomically.
//!
//! Layout: every trained tensor as f32 under its own name; the optimizer's tensors as
//! `optim/<parameter>.<slot>`; in the metadata the settings (`slider.state.settings`), the
//! step (`slider.state.step`), the loop's own progress JSON (`slider.state.progress`: losses,
//! stage, ...) and the optimizer's name, hyperparameters and per-parameter steps (the keys of
//! [`OptimizerState`]). Any tool that reads safetensors can read it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use slider_models::HostTensor;

use crate::OptimizerState;
use crate::state::{KEY_HYPERPARAMETERS, KEY_OPTIMIZER, KEY_STEPS, f32_tensors};

const KEY_SETTINGS: &str = "slider.state.settings";
const KEY_STEP: &str = "slider.state.step";
const KEY_PROGRESS: &str = "slider.state.progress";
const OPTIMIZER_PREFIX: &str = "optim/";

/// Everything a training loop needs to continue where it stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumeState {
    /// The settings the state was made with (JSON); a state resumes only the same settings.
    pub settings: String,
    /// Steps done.
    pub step: usize,
    /// The loop's own position and history, as JSON (losses, stage, ...).
    pub progress: String,
    /// The trained tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
    /// The optimizer's state.
    pub optimizer: OptimizerState,
}

/// Why a state file cannot be resumed.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// Reading or writing the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a resume state of this format (an earlier version's, or another file).
    #[error("{path} is not a resume state of this version of slider-run (no `{KEY_SETTINGS}`)")]
    OtherFormat {
        /// The file.
        path: PathBuf,
    },
    /// Made with other settings.
    #[error(
        "{path} was made with other settings ({found}); use another work dir or the same settings"
    )]
    OtherSettings {
        /// The file.
        path: PathBuf,
        /// The settings in the file.
        found: String,
    },
    /// Unreadable or inconsistent.
    #[error("{path} is damaged: {message}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ResumeState {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let optimizer = self
            .optimizer
            .tensors
            .iter()
            .map(|(name, t)| (format!("{OPTIMIZER_PREFIX}{name}"), t));
        let named: Vec<(String, &HostTensor)> = self
            .tensors
            .iter()
            .map(|(name, t)| (name.clone(), t))
            .chain(optimizer)
            .collect();
        let raw: Vec<Vec<u8>> = named
            .iter()
            .map(|(_, t)| bytemuck::cast_slice::<f32, u8>(&t.values).to_vec())
            .collect();
        let mut views = Vec::with_capacity(named.len());
        for ((name, t), bytes) in named.iter().zip(&raw) {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), bytes)
                .map_err(|e| format!("tensor `{name}`: {e}"))?;
            views.push((name.as_str(), view));
        }
        let steps = serde_json::to_string(&self.optimizer.steps).map_err(|e| e.to_string())?;
        let metadata = HashMap::from([
            (KEY_SETTINGS.to_owned(), self.settings.clone()),
            (KEY_STEP.to_owned(), self.step.to_string()),
            (KEY_PROGRESS.to_owned(), self.progress.clone()),
            (KEY_OPTIMIZER.to_owned(), self.optimizer.optimizer.clone()),
            (
                KEY_HYPERPARAMETERS.to_owned(),
                self.optimizer.hyperparameters.clone(),
            ),
            (KEY_STEPS.to_owned(), steps),
        ]);
        safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
    }

    /// Writes the state to `path` atomically (creating its directory).
    pub fn write(&self, path: &Path) -> Result<(), ResumeError> {
        let bytes = self.to_bytes().map_err(|message| ResumeError::Damaged {
            path: path.to_path_buf(),
            message,
        })?;
        let io = |source| ResumeError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        slider_atomic::write(path, &bytes).map_err(io)
    }

    /// Reads the state at `path`: `None` when there is none, an error when it cannot resume
    /// `settings` (other settings, another format, damage).
    pub fn read(path: &Path, settings: &str) -> Result<Option<ResumeState>, ResumeError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ResumeError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::parse(path, &bytes, settings).map(Some)
    }

    /// The step a state file records, without checking its settings (`None` without a
    /// readable state).
    pub fn step_of(path: &Path) -> Option<usize> {
        let bytes = std::fs::read(path).ok()?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
        header.metadata().as_ref()?.get(KEY_STEP)?.parse().ok()
    }

    fn parse(path: &Path, bytes: &[u8], settings: &str) -> Result<ResumeState, ResumeError> {
        let damaged = |message: String| ResumeError::Damaged {
            path: path.to_path_buf(),
            message,
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| damaged(e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let Some(found) = metadata.get(KEY_SETTINGS) else {
            return Err(ResumeError::OtherFormat {
                path: path.to_path_buf(),
            });
        };
        if found != settings {
            return Err(ResumeError::OtherSettings {
                path: path.to_path_buf(),
                found: found.clone(),
            });
        }
        let get = |key: &str| {
            metadata
                .get(key)
                .cloned()
                .ok_or_else(|| damaged(format!("metadata `{key}` is missing")))
        };
        let step = get(KEY_STEP)?
            .parse()
            .map_err(|e| damaged(format!("metadata `{KEY_STEP}`: {e}")))?;
        let steps = serde_json::from_str(&get(KEY_STEPS)?)
            .map_err(|e| damaged(format!("metadata `{KEY_STEPS}`: {e}")))?;
        let file =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| damaged(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        let mut optimizer_tensors = BTreeMap::new();
        for (name, tensor) in f32_tensors(&file).map_err(damaged)? {
            match name.strip_prefix(OPTIMIZER_PREFIX) {
                Some(rest) => optimizer_tensors.insert(rest.to_owned(), tensor),
                None => tensors.insert(name, tensor),
            };
        }
        Ok(ResumeState {
            settings: settings.to_owned(),
            step,
            progress: get(KEY_PROGRESS)?,
            tensors,
            optimizer: OptimizerState {
                optimizer: get(KEY_OPTIMIZER)?,
                hyperparameters: get(KEY_HYPERPARAMETERS)?,
                steps,
                tensors: optimizer_tensors,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ResumeState {
        let t = |shape: Vec<usize>, base: f32| HostTensor {
            values: (0..shape.iter().product::<usize>())
                .map(|i| base + i as f32 * 0.25)
                .collect(),
            shape,
        };
        ResumeState {
            settings: r#"{"lr":1e-4}"#.into(),
            step: 7,
            progress: r#"{"losses":[0.5,0.25]}"#.into(),
            tensors: BTreeMap::from([
                ("a.lora_down.weight".to_owned(), t(vec![2, 3], 1.0)),
                ("vae.conv.weight".to_owned(), t(vec![1, 2, 1, 1], -1.0)),
            ]),
            optimizer: OptimizerState {
                optimizer: "AdamW".into(),
                hyperparameters: r#"{"betas":[0.9,0.999]}"#.into(),
                steps: BTreeMap::from([("a.lora_down.weight".to_owned(), 7)]),
                tensors: BTreeMap::from([(
                    "a.lora_down.weight.exp_avg".to_owned(),
                    t(vec![2, 3], 0.0),
                )]),
            },
        }
    }

    #[test]
    fn a_state_round_trips_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("work/state.safetensors");
        let s = state();
        s.write(&path).unwrap();
        let back = ResumeState::read(&path, &s.settings).unwrap().unwrap();
        assert_eq!(back, s);
        assert_eq!(ResumeState::step_of(&path), Some(7));
        // Writing what was read gives the same state again.
        back.write(&path).unwrap();
        assert_eq!(ResumeState::read(&path, &s.settings).unwrap().unwrap(), s);
    }

    #[test]
    fn absent_other_settings_other_formats_and_damage_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        assert!(ResumeState::read(&path, "{}").unwrap().is_none());
        let s = state();
        s.write(&path).unwrap();
        let err = ResumeState::read(&path, r#"{"lr":2e-4}"#).unwrap_err();
        assert!(matches!(err, ResumeError::OtherSettings { .. }), "{err}");
        // An optimizer state alone is a safetensors file of another format.
        std::fs::write(&path, s.optimizer.to_bytes().unwrap()).unwrap();
        let err = ResumeState::read(&path, &s.settings).unwrap_err();
        assert!(matches!(err, ResumeError::OtherFormat { .. }), "{err}");
        let bytes = s.to_bytes().unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = ResumeState::read(&path, &s.settings).unwrap_err();
        assert!(matches!(err, ResumeError::Damaged { .. }), "{err}");
    }
}
