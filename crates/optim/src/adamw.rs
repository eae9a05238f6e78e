//! AdamW as `torch.optim.AdamW` computes it on the CPU (its single-tensor path): decoupled
//! weight decay first, moments by `lerp` and `addcmul`, bias correction of both moments, `eps`
//! added after the bias-corrected square root.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::args::{self, OptimizerArgs};
use super::state::{OptimizerError, OptimizerState, check_gradient, take_state, to_host};

/// AdamW's hyperparameters, with torch's names and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Decay of the first and second moments.
    pub betas: [f64; 2],
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (`p *= 1 - lr * weight_decay`).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// The configuration kohya would build from `--optimizer_args` (`betas`, `eps`,
    /// `weight_decay`); unknown keys (`amsgrad` included: not implemented) are refused.
    pub fn from_args(args: &BTreeMap<String, String>) -> Result<Self, OptimizerError> {
        let mut config = Self::default();
        let mut args = OptimizerArgs::new("AdamW", args);
        if let Some(v) = args.floats::<2>("betas")? {
            config.betas = v;
        }
        if let Some(v) = args.float("eps")? {
            config.eps = v;
        }
        if let Some(v) = args.float("weight_decay")? {
            config.weight_decay = v;
        }
        args.finish()?;
        if config.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(args::invalid("AdamW", "betas must lie in [0, 1)"));
        }
        Ok(config)
    }
}

/// The AdamW optimizer over named parameters.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    params: BTreeMap<String, ParamState>,
}

#[derive(Debug, Clone)]
struct ParamState {
    step: u64,
    shape: Vec<usize>,
    /// First moment, flattened.
    exp_avg: Tensor<1>,
    /// Second moment, flattened.
    exp_avg_sq: Tensor<1>,
}

impl AdamW {
    /// An AdamW optimizer with no state yet.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            params: BTreeMap::new(),
        }
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Steps taken for `name` (0 before its first step).
    pub fn steps_of(&self, name: &str) -> u64 {
        self.params.get(name).map_or(0, |s| s.step)
    }

    /// One step for the parameter `name` with learning rate `lr`: returns the new value.
    /// Takes and returns tensors without autodiff; the state lives on the parameter's device.
    pub fn step<const D: usize>(
        &mut self,
        name: &str,
        lr: f64,
        param: Tensor<D>,
        grad: Tensor<D>,
    ) -> Result<Tensor<D>, OptimizerError> {
        let dims = param.dims();
        check_gradient(name, &dims, &grad.dims())?;
        let shape = dims.to_vec();
        let numel: usize = shape.iter().product();
        let param = param.inner().reshape([numel]);
        let grad = grad.inner().reshape([numel]);
        let state = match take_state(&mut self.params, name, &shape, |s| &s.shape)? {
            Some(s) => s,
            None => {
                let device = param.device();
                ParamState {
                    step: 0,
                    shape,
                    exp_avg: Tensor::zeros([numel], &device),
                    exp_avg_sq: Tensor::zeros([numel], &device),
                }
            }
        };
        let (param, state) = self.update(lr, param, grad, state);
        self.params.insert(name.to_owned(), state);
        Ok(param.reshape(dims))
    }

    fn update(
        &self,
        lr: f64,
        param: Tensor<1>,
        grad: Tensor<1>,
        state: ParamState,
    ) -> (Tensor<1>, ParamState) {
        let AdamWConfig {
            betas: [beta1, beta2],
            eps,
            weight_decay,
        } = self.config;
        let step = state.step + 1;
        let mut param = param;
        if weight_decay != 0.0 {
            param = param.mul_scalar(1.0 - lr * weight_decay);
        }
        // torch's `lerp_(grad, 1 - beta1)`: `m + w (g - m)` for weights below one half.
        let w = 1.0 - beta1;
        let exp_avg = if w < 0.5 {
            state.exp_avg.clone() + (grad.clone() - state.exp_avg).mul_scalar(w)
        } else {
            grad.clone() - (grad.clone() - state.exp_avg).mul_scalar(1.0 - w)
        };
        let exp_avg_sq = state.exp_avg_sq.mul_scalar(beta2) + grad.square().mul_scalar(1.0 - beta2);

        let step_f = step as f64;
        let bias_correction1 = 1.0 - beta1.powf(step_f);
        let bias_correction2 = 1.0 - beta2.powf(step_f);
        let step_size = lr / bias_correction1;
        let denom = exp_avg_sq
            .clone()
            .sqrt()
            .div_scalar(bias_correction2.sqrt())
            .add_scalar(eps);
        let param = param + (exp_avg.clone() / denom).mul_scalar(-step_size);
        let state = ParamState {
            step,
            shape: state.shape,
            exp_avg,
            exp_avg_sq,
        };
        (param, state)
    }

    /// The state on the host, with torch's slot names (`exp_avg`, `exp_avg_sq`) and shapes.
    pub fn state(&self) -> OptimizerState {
        let mut steps = BTreeMap::new();
        let mut tensors = BTreeMap::new();
        for (name, s) in &self.params {
            steps.insert(name.clone(), s.step);
            tensors.insert(
                format!("{name}.exp_avg"),
                to_host(&s.exp_avg, s.shape.clone()),
            );
            tensors.insert(
                format!("{name}.exp_avg_sq"),
                to_host(&s.exp_avg_sq, s.shape.clone()),
            );
        }
        OptimizerState {
            optimizer: "AdamW".into(),
            hyperparameters: hyperparameters(&self.config),
            steps,
            tensors,
        }
    }

    /// Restores an optimizer from [`AdamW::state`]'s output, its tensors on `device`. The
    /// configuration must equal the one the state was made with.
    pub fn from_state(
        config: AdamWConfig,
        state: &OptimizerState,
        device: &Device,
    ) -> Result<Self, OptimizerError> {
        state.check_origin("AdamW", &hyperparameters(&config))?;
        let mut params = BTreeMap::new();
        for (name, &step) in &state.steps {
            let shape = state
                .tensors
                .get(&format!("{name}.exp_avg"))
                .map(|t| t.shape.clone())
                .ok_or_else(|| {
                    OptimizerError::Damaged(format!("tensor `{name}.exp_avg` is missing"))
                })?;
            let numel = shape.iter().product();
            params.insert(
                name.clone(),
                ParamState {
                    step,
                    shape,
                    exp_avg: state.tensor(name, "exp_avg", [numel], device)?,
                    exp_avg_sq: state.tensor(name, "exp_avg_sq", [numel], device)?,
                },
            );
        }
        Ok(Self { config, params })
    }
}

fn hyperparameters(config: &AdamWConfig) -> String {
    serde_json::to_string(config).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Optimizer;
    use crate::reference::{self, Case};

    fn config(case: &Case) -> AdamWConfig {
        let betas: Vec<f64> = case.config["betas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        AdamWConfig {
            betas: [betas[0], betas[1]],
            eps: case.config["eps"].as_f64().unwrap(),
            weight_decay: case.config["weight_decay"].as_f64().unwrap(),
        }
    }

    #[test]
    fn matches_torch_adamw_step_by_step() {
        let cases = reference::optimizer_cases("adamw.safetensors");
        assert_eq!(cases.len(), 2);
        for case in &cases {
            let mut optimizer = Optimizer::AdamW(AdamW::new(config(case)));
            reference::check_against(&mut optimizer, case, "AdamW");
        }
    }

    #[test]
    fn resume_is_bit_identical() {
        let case = &reference::optimizer_cases("adamw.safetensors")[1];
        let device = reference::device();
        let fresh = || Optimizer::AdamW(AdamW::new(config(case)));
        let restore = |s: &OptimizerState| {
            Optimizer::AdamW(AdamW::from_state(config(case), s, &device).unwrap())
        };
        reference::check_resume(case, fresh, restore);
    }

    #[test]
    fn optimizer_args_like_kohya() {
        let args = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cases = [
            (args(&[]), Some(AdamWConfig::default())),
            (
                args(&[
                    ("weight_decay", "0.1"),
                    ("betas", "0.9,0.99"),
                    ("eps", "1e-6"),
                ]),
                Some(AdamWConfig {
                    betas: [0.9, 0.99],
                    eps: 1e-6,
                    weight_decay: 0.1,
                }),
            ),
            (args(&[("amsgrad", "True")]), None),
            (args(&[("betas", "(0.9, 1.0)")]), None),
        ];
        for (a, want) in cases {
            assert_eq!(AdamWConfig::from_args(&a).ok(), want, "{a:?}");
        }
    }
}
