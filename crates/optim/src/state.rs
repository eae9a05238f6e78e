//! Optimizer state as plain host data — named f32 tensors and per-parameter step counts — and
//! its safetensors form. Values travel as raw little-endian f32, so a state saved and loaded
//! again is bit-identical and a resumed run continues exactly where it stopped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};

use slider_models::HostTensor;

/// Metadata key naming the optimizer (`CAME`, `AdamW`).
pub(crate) const KEY_OPTIMIZER: &str = "slider.optimizer";
/// Metadata key holding the hyperparameters as JSON.
pub(crate) const KEY_HYPERPARAMETERS: &str = "slider.hyperparameters";
/// Metadata key holding `{parameter: steps taken}` as JSON.
pub(crate) const KEY_STEPS: &str = "slider.steps";

/// Why an optimizer cannot step, or its state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum OptimizerError {
    /// A parameter and its gradient differ in shape.
    #[error("parameter `{name}` has shape {param:?} but its gradient has shape {grad:?}")]
    GradientShape {
        /// The parameter.
        name: String,
        /// Its shape.
        param: Vec<usize>,
        /// The gradient's shape.
        grad: Vec<usize>,
    },
    /// A parameter changed shape since the optimizer first saw it.
    #[error("parameter `{name}` has shape {now:?}; the optimizer state was made for {before:?}")]
    StateShape {
        /// The parameter.
        name: String,
        /// Its shape now.
        now: Vec<usize>,
        /// The shape the state belongs to.
        before: Vec<usize>,
    },
    /// A saved state is for another optimizer or other hyperparameters.
    #[error(
        "the saved optimizer state is for {saved}, not {wanted}: resume with the settings it was made with"
    )]
    Mismatch {
        /// What the file holds.
        saved: String,
        /// What the optimizer is.
        wanted: String,
    },
    /// A saved state lacks a tensor or holds one of the wrong size.
    #[error("the saved optimizer state is incomplete or damaged: {0}")]
    Damaged(String),
    /// `optimizer_type` or `optimizer_args` cannot be used.
    #[error("{0}")]
    Args(String),
    /// A state file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Every tensor of a state file, which must all be f32.
pub(crate) fn f32_tensors(
    file: &safetensors::SafeTensors<'_>,
) -> Result<Vec<(String, HostTensor)>, String> {
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            if view.dtype() != Dtype::F32 {
                return Err(format!("tensor `{name}` is {:?}, not F32", view.dtype()));
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let shape = view.shape().to_vec();
            Ok((name, HostTensor { shape, values }))
        })
        .collect()
}

/// The whole state of an optimizer, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// `CAME` or `AdamW`.
    pub optimizer: String,
    /// The hyperparameters as JSON; a state only loads into an optimizer with equal ones.
    pub hyperparameters: String,
    /// Steps taken per parameter name.
    pub steps: BTreeMap<String, u64>,
    /// State tensors named `<parameter>.<slot>`, with the reference implementation's slot
    /// names and shapes (`exp_avg`, `exp_avg_sq`, `exp_avg_sq_row`, ...).
    pub tensors: BTreeMap<String, HostTensor>,
}

impl OptimizerState {
    /// Serialises to safetensors bytes (f32 tensors; optimizer, hyperparameters and steps in
    /// the metadata).
    pub fn to_bytes(&self) -> Result<Vec<u8>, OptimizerError> {
        let bytes: Vec<(&String, &HostTensor, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(k, t)| (k, t, bytemuck::cast_slice::<f32, u8>(&t.values).to_vec()))
            .collect();
        let mut views = Vec::with_capacity(bytes.len());
        for (name, t, raw) in &bytes {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), raw)
                .map_err(|e| OptimizerError::Damaged(format!("tensor `{name}`: {e}")))?;
            views.push((name.as_str(), view));
        }
        let steps = serde_json::to_string(&self.steps)
            .map_err(|e| OptimizerError::Damaged(e.to_string()))?;
        let metadata = HashMap::from([
            (KEY_OPTIMIZER.to_owned(), self.optimizer.clone()),
            (KEY_HYPERPARAMETERS.to_owned(), self.hyperparameters.clone()),
            (KEY_STEPS.to_owned(), steps),
        ]);
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| OptimizerError::Damaged(e.to_string()))
    }

    /// Parses bytes written by [`OptimizerState::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OptimizerError> {
        let damaged = |m: String| OptimizerError::Damaged(m);
        let file =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| damaged(e.to_string()))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| damaged(e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let get = |key: &str| {
            metadata
                .get(key)
                .cloned()
                .ok_or_else(|| damaged(format!("metadata `{key}` is missing")))
        };
        let steps = serde_json::from_str(&get(KEY_STEPS)?)
            .map_err(|e| damaged(format!("metadata `{KEY_STEPS}`: {e}")))?;
        let tensors = f32_tensors(&file).map_err(damaged)?.into_iter().collect();
        Ok(Self {
            optimizer: get(KEY_OPTIMIZER)?,
            hyperparameters: get(KEY_HYPERPARAMETERS)?,
            steps,
            tensors,
        })
    }

    /// Writes the state to `path` atomically (temporary file in the same directory, fsync,
    /// rename).
    pub fn save(&self, path: &Path) -> Result<(), OptimizerError> {
        let bytes = self.to_bytes()?;
        slider_atomic::write(path, &bytes).map_err(|source| OptimizerError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a state written by [`OptimizerState::save`].
    pub fn load(path: &Path) -> Result<Self, OptimizerError> {
        let bytes = std::fs::read(path).map_err(|source| OptimizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Checks that this state was made by `optimizer` with `hyperparameters`.
    pub(crate) fn check_origin(
        &self,
        optimizer: &str,
        hyperparameters: &str,
    ) -> Result<(), OptimizerError> {
        if self.optimizer != optimizer || self.hyperparameters != hyperparameters {
            return Err(OptimizerError::Mismatch {
                saved: format!("{} {}", self.optimizer, self.hyperparameters),
                wanted: format!("{optimizer} {hyperparameters}"),
            });
        }
        Ok(())
    }

    /// The tensor `<param>.<slot>`, which must hold `dims.product()` values, on `device`.
    pub(crate) fn tensor<const D: usize>(
        &self,
        param: &str,
        slot: &str,
        dims: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, OptimizerError> {
        let key = format!("{param}.{slot}");
        let t = self
            .tensors
            .get(&key)
            .ok_or_else(|| OptimizerError::Damaged(format!("tensor `{key}` is missing")))?;
        let len: usize = dims.iter().product();
        if t.values.len() != len {
            return Err(OptimizerError::Damaged(format!(
                "tensor `{key}` has {} values; the parameter needs {len}",
                t.values.len()
            )));
        }
        Ok(Tensor::from_data(
            TensorData::new(t.values.clone(), dims),
            device,
        ))
    }
}

/// Reads a device tensor back as `shape` (the reference's shape for this slot).
pub(crate) fn to_host<const D: usize>(t: &Tensor<D>, shape: Vec<usize>) -> HostTensor {
    let values = t
        .to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    HostTensor { shape, values }
}

/// Refuses a gradient whose shape is not its parameter's.
pub(crate) fn check_gradient(
    name: &str,
    param: &[usize],
    grad: &[usize],
) -> Result<(), OptimizerError> {
    if grad == param {
        return Ok(());
    }
    Err(OptimizerError::GradientShape {
        name: name.to_owned(),
        param: param.to_vec(),
        grad: grad.to_vec(),
    })
}

/// Takes the state kept for `name` out of `states`, or `None` before its first step. State
/// recorded for another shape is refused and left in place.
pub(crate) fn take_state<S>(
    states: &mut BTreeMap<String, S>,
    name: &str,
    shape: &[usize],
    shape_of: impl Fn(&S) -> &[usize],
) -> Result<Option<S>, OptimizerError> {
    match states.get(name) {
        Some(s) if shape_of(s) != shape => Err(OptimizerError::StateShape {
            name: name.to_owned(),
            now: shape.to_vec(),
            before: shape_of(s).to_vec(),
        }),
        _ => Ok(states.remove(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OptimizerState {
        OptimizerState {
            optimizer: "CAME".into(),
            hyperparameters: "{\"a\":1}".into(),
            steps: BTreeMap::from([("lora.down.weight".to_owned(), 3)]),
            tensors: BTreeMap::from([
                (
                    "lora.down.weight.exp_avg".to_owned(),
                    HostTensor {
                        shape: vec![2, 2],
                        values: vec![1.0, -0.0, f32::MIN_POSITIVE, 1e-30],
                    },
                ),
                (
                    "lora.down.weight.exp_avg_sq_row".to_owned(),
                    HostTensor {
                        shape: vec![2],
                        values: vec![3.5, f32::MAX],
                    },
                ),
            ]),
        }
    }

    #[test]
    fn bytes_round_trip_bit_for_bit() {
        let state = sample();
        let back = OptimizerState::from_bytes(&state.to_bytes().unwrap()).unwrap();
        assert_eq!(back, state);
        let bits = |s: &OptimizerState| -> Vec<u32> {
            s.tensors
                .values()
                .flat_map(|t| t.values.iter().map(|v| v.to_bits()))
                .collect()
        };
        assert_eq!(bits(&back), bits(&state));
    }

    #[test]
    fn file_round_trip_and_no_temporary_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        sample().save(&path).unwrap();
        assert_eq!(OptimizerState::load(&path).unwrap(), sample());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn origin_must_match() {
        let state = sample();
        let cases = [
            ("CAME", "{\"a\":1}", true),
            ("AdamW", "{\"a\":1}", false),
            ("CAME", "{\"a\":2}", false),
        ];
        for (optimizer, hyper, ok) in cases {
            assert_eq!(
                state.check_origin(optimizer, hyper).is_ok(),
                ok,
                "{optimizer} {hyper}"
            );
        }
    }

    #[test]
    fn damaged_bytes_are_refused() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes.truncate(bytes.len() - 3);
        assert!(matches!(
            OptimizerState::from_bytes(&bytes),
            Err(OptimizerError::Damaged(_))
        ));
    }
}
