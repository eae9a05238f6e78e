//! The optimizers and learning-rate schedules of LoRA training, each equal to the implementation
//! kohya's `train_network.py` runs: CAME, AdamW and the schedules of `--lr_scheduler`.
//!
//! # Why the optimizers are functions over named tensors, not burn `Optimizer`s
//!
//! Each optimizer steps one parameter at a time, keyed by the parameter's name:
//! `optimizer.step(name, lr, param, grad) -> new param`. The trainer names LoRA parameters the
//! way kohya's files do (`lora_unet_..._to_q.lora_down.weight`), so the optimizer state saved in
//! a checkpoint is keyed by the same stable names as the LoRA itself, as plain f32 safetensors
//! with the reference's slot names (`exp_avg`, `exp_avg_sq_row`, ...), readable by any tool.
//! burn's `ModuleOptimizer` keys its state by `ParamId`s, which are random per process unless
//! the module itself is restored from a burn record, and it silently starts a fresh state for an
//! id it cannot match: a resume bug that would pass unnoticed. A named state that refuses to
//! load into other hyperparameters, and that round-trips bit for bit, makes resumed and
//! uninterrupted runs identical. The math runs as burn tensor operations on the parameter's
//! device (no host round trip per step); only [`Optimizer::state`] reads back.
//!
//! ```
//! use slider_optim::{LrSchedule, Optimizer, ScheduleKind};
//! use slider_models::burn::tensor::{Device, Tensor};
//!
//! let device = Device::flex();
//! let mut optimizer = Optimizer::from_kohya("CAME", &Default::default())?;
//! let schedule = LrSchedule::new(ScheduleKind::ConstantWithWarmup, 5e-5, 20, 400)?;
//! let mut down = Tensor::<2>::ones([4, 320], &device);
//! let grad = Tensor::<2>::ones([4, 320], &device);
//! down = optimizer.step("lora_unet_x.lora_down.weight", schedule.lr_at(1), down, grad)?;
//! let bytes = optimizer.state().to_bytes()?; // into the checkpoint
//! # let _ = (down, bytes);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod adamw;
mod args;
mod came;
pub mod lr_schedule;
#[cfg(test)]
mod reference;
mod resume;
mod state;

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor};

pub use adamw::{AdamW, AdamWConfig};
pub use came::{Came, CameConfig};
pub use lr_schedule::{LrSchedule, ScheduleError, ScheduleKind};
pub use resume::{ResumeError, ResumeState};
pub use state::{OptimizerError, OptimizerState};

/// One of the optimizers a recipe can name (`optimizer_type`).
#[derive(Debug, Clone)]
pub enum Optimizer {
    /// `came_pytorch.CAME`.
    Came(Came),
    /// `torch.optim.AdamW`.
    AdamW(AdamW),
}

impl Optimizer {
    /// The optimizer kohya would build for `--optimizer_type` (`CAME`, `came_pytorch.CAME`,
    /// `AdamW`; case-insensitive) and `--optimizer_args`.
    pub fn from_kohya(
        optimizer_type: &str,
        args: &BTreeMap<String, String>,
    ) -> Result<Self, OptimizerError> {
        match optimizer_type.to_ascii_lowercase().as_str() {
            "came" | "came_pytorch.came" => Ok(Self::Came(Came::new(CameConfig::from_args(args)?))),
            "adamw" | "torch.optim.adamw" => {
                Ok(Self::AdamW(AdamW::new(AdamWConfig::from_args(args)?)))
            }
            _ => Err(OptimizerError::Args(format!(
                "unknown optimizer_type `{optimizer_type}` (known: CAME, AdamW)"
            ))),
        }
    }

    /// Restores an optimizer built as [`Optimizer::from_kohya`] builds it from a saved state;
    /// refuses a state made by another optimizer or other hyperparameters.
    pub fn restore(
        optimizer_type: &str,
        args: &BTreeMap<String, String>,
        state: &OptimizerState,
        device: &Device,
    ) -> Result<Self, OptimizerError> {
        Ok(match Self::from_kohya(optimizer_type, args)? {
            Self::Came(c) => Self::Came(Came::from_state(*c.config(), state, device)?),
            Self::AdamW(a) => Self::AdamW(AdamW::from_state(*a.config(), state, device)?),
        })
    }

    /// `CAME` or `AdamW`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Came(_) => "CAME",
            Self::AdamW(_) => "AdamW",
        }
    }

    /// One step for the parameter `name`: returns its new value (without autodiff).
    pub fn step<const D: usize>(
        &mut self,
        name: &str,
        lr: f64,
        param: Tensor<D>,
        grad: Tensor<D>,
    ) -> Result<Tensor<D>, OptimizerError> {
        match self {
            Self::Came(c) => c.step(name, lr, param, grad),
            Self::AdamW(a) => a.step(name, lr, param, grad),
        }
    }

    /// The class kohya records in `ss_optimizer` (`<module>.<class>`, followed there by
    /// `(key=value,...)` when optimizer_args were given).
    pub fn kohya_class(&self) -> &'static str {
        match self {
            Self::Came(_) => "came_pytorch.CAME.CAME",
            Self::AdamW(_) => "torch.optim.adamw.AdamW",
        }
    }

    /// Steps taken for `name`.
    pub fn steps_of(&self, name: &str) -> u64 {
        match self {
            Self::Came(c) => c.steps_of(name),
            Self::AdamW(a) => a.steps_of(name),
        }
    }

    /// The whole state on the host, for a checkpoint.
    pub fn state(&self) -> OptimizerState {
        match self {
            Self::Came(c) => c.state(),
            Self::AdamW(a) => a.state(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_types_like_kohya() {
        let none = BTreeMap::new();
        let came = Some(("CAME", "came_pytorch.CAME.CAME"));
        let adamw = Some(("AdamW", "torch.optim.adamw.AdamW"));
        let cases = [
            ("CAME", came),
            ("came", came),
            ("came_pytorch.CAME", came),
            ("AdamW", adamw),
            ("adamw", adamw),
            ("torch.optim.AdamW", adamw),
            ("AdamW8bit", None),
            ("Lion", None),
        ];
        for (name, want) in cases {
            let got = Optimizer::from_kohya(name, &none)
                .ok()
                .map(|o| (o.name(), o.kohya_class()));
            assert_eq!(got, want, "{name}");
        }
    }

    /// The trainer's loop: a tracked parameter, its gradient from `backward`, a step that
    /// returns a plain tensor, tracked again for the next forward pass.
    #[test]
    fn steps_parameters_from_an_autodiff_graph() {
        let device = reference::device().autodiff();
        let none = BTreeMap::new();
        for kind in ["CAME", "AdamW"] {
            let mut optimizer = Optimizer::from_kohya(kind, &none).unwrap();
            let mut p = Tensor::<2>::from_floats([[1.0, -2.0], [3.0, 0.5]], &device).require_grad();
            let mut losses = Vec::new();
            for _ in 0..3 {
                let loss = p.clone().square().sum();
                let grads = loss.backward();
                losses.push(loss.into_scalar::<f32>());
                let grad = p.grad(&grads).unwrap();
                let next = optimizer.step("p", 0.01, p.clone(), grad).unwrap();
                assert!(!next.is_autodiff(), "{kind}");
                p = next.autodiff().require_grad();
            }
            assert!(
                losses[2] < losses[1] && losses[1] < losses[0],
                "{kind}: {losses:?}"
            );
            assert_eq!(optimizer.steps_of("p"), 3);
        }
    }

    #[test]
    fn state_refuses_other_settings_and_shapes() {
        let device = reference::device();
        let none = BTreeMap::new();
        let wd = BTreeMap::from([("weight_decay".to_owned(), "0.5".to_owned())]);
        let mut came = Optimizer::from_kohya("CAME", &none).unwrap();
        let p = Tensor::<2>::ones([2, 3], &device);
        let p = came.step("w", 0.1, p.clone(), p).unwrap();
        let state = came.state();
        assert!(Optimizer::restore("CAME", &none, &state, &device).is_ok());
        assert!(Optimizer::restore("CAME", &wd, &state, &device).is_err());
        assert!(Optimizer::restore("AdamW", &none, &state, &device).is_err());
        assert_eq!(came.steps_of("w"), 1);

        let other = Tensor::<2>::ones([3, 2], &device);
        let err = came.step("w", 0.1, other.clone(), other).unwrap_err();
        assert!(matches!(err, OptimizerError::StateShape { .. }), "{err}");
        let err = came
            .step("w", 0.1, p, Tensor::<2>::ones([2, 2], &device))
            .unwrap_err();
        assert!(matches!(err, OptimizerError::GradientShape { .. }), "{err}");
        assert_eq!(came.steps_of("w"), 1);
    }
}
