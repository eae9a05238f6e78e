//! CAME (confidence-guided adaptive memory-efficient optimization) exactly as `came_pytorch`
//! computes it: factored second moments for parameters of two or more dimensions, an RMS clip of
//! the update, a confidence (instability) estimate that rescales the momentum, decoupled weight
//! decay and no bias correction.
//!
//! A parameter of shape `[..., R, C]` is viewed as `[B, R, C]` (`B` = the product of the leading
//! dimensions, so a conv weight `[out, in, kh, kw]` has its statistics over `kh` and `kw`, as in
//! `came_pytorch`): the row statistics are means over `C` (shape `[..., R]`), the column
//! statistics means over `R` (shape `[..., C]`). One-dimensional parameters keep a full second
//! moment and use the momentum itself as the update.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::args::{self, OptimizerArgs};
use super::state::{OptimizerError, OptimizerState, check_gradient, take_state, to_host};

/// CAME's hyperparameters, with `came_pytorch`'s names and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CameConfig {
    /// Decay of the momentum, of the squared gradient and of the instability.
    pub betas: [f64; 3],
    /// Added to the squared gradient and to the instability.
    pub eps: [f64; 2],
    /// Largest RMS of the normalised update.
    pub clip_threshold: f64,
    /// Decoupled weight decay (`p -= weight_decay * lr * p`).
    pub weight_decay: f64,
}

impl Default for CameConfig {
    fn default() -> Self {
        Self {
            betas: [0.9, 0.999, 0.9999],
            eps: [1e-30, 1e-16],
            clip_threshold: 1.0,
            weight_decay: 0.0,
        }
    }
}

impl CameConfig {
    /// The configuration kohya would build from `--optimizer_args` (`betas=0.9,0.999,0.9999`,
    /// `eps=...`, `clip_threshold=...`, `weight_decay=...`); unknown keys are refused.
    pub fn from_args(args: &BTreeMap<String, String>) -> Result<Self, OptimizerError> {
        let mut config = Self::default();
        let mut args = OptimizerArgs::new("CAME", args);
        if let Some(v) = args.floats::<3>("betas")? {
            config.betas = v;
        }
        if let Some(v) = args.floats::<2>("eps")? {
            config.eps = v;
        }
        if let Some(v) = args.float("clip_threshold")? {
            config.clip_threshold = v;
        }
        if let Some(v) = args.float("weight_decay")? {
            config.weight_decay = v;
        }
        args.finish()?;
        if config.betas.iter().any(|b| !(0.0..=1.0).contains(b)) {
            return Err(args::invalid("CAME", "betas must lie in [0, 1]"));
        }
        Ok(config)
    }
}

/// The CAME optimizer over named parameters; see the module documentation.
#[derive(Debug, Clone)]
pub struct Came {
    config: CameConfig,
    params: BTreeMap<String, ParamState>,
}

#[derive(Debug, Clone)]
struct ParamState {
    step: u64,
    shape: Vec<usize>,
    /// Momentum of the clipped update, `[B, R, C]`.
    exp_avg: Tensor<3>,
    second: Second,
}

// A few hundred of these live at once; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Second {
    /// Row statistics `[B, R, 1]`, column statistics `[B, 1, C]`.
    Factored {
        sq_row: Tensor<3>,
        sq_col: Tensor<3>,
        res_row: Tensor<3>,
        res_col: Tensor<3>,
    },
    /// A full second moment `[1, 1, N]`.
    Full { sq: Tensor<3> },
}

/// The `[B, R, C]` view of a parameter shape and whether its second moment is factored.
fn view(shape: &[usize]) -> ([usize; 3], bool) {
    match shape {
        [] => ([1, 1, 1], false),
        [n] => ([1, 1, *n], false),
        [lead @ .., r, c] => ([lead.iter().product(), *r, *c], true),
    }
}

/// `avg * beta + x * (1 - beta)`.
fn ema(avg: Tensor<3>, x: Tensor<3>, beta: f64) -> Tensor<3> {
    avg.mul_scalar(beta) + x.mul_scalar(1.0 - beta)
}

/// The factored estimate `(row / mean(row))^-1/2 (outer) col^-1/2`, `[B, R, C]`.
fn approx(row: Tensor<3>, col: Tensor<3>) -> Tensor<3> {
    let row_mean = row.clone().mean_dim(1);
    let r = (row / row_mean).sqrt().recip();
    let c = col.sqrt().recip();
    r * c
}

impl Came {
    /// A CAME optimizer with no state yet.
    pub fn new(config: CameConfig) -> Self {
        Self {
            config,
            params: BTreeMap::new(),
        }
    }

    /// The hyperparameters.
    pub fn config(&self) -> &CameConfig {
        &self.config
    }

    /// Steps taken for `name` (0 before its first step).
    pub fn steps_of(&self, name: &str) -> u64 {
        self.params.get(name).map_or(0, |s| s.step)
    }

    /// One step for the parameter `name` with learning rate `lr`: returns the new value.
    /// Takes and returns tensors without autodiff (inputs with autodiff are stripped of it); the
    /// state lives on the parameter's device.
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
        let (view_dims, factored) = view(&shape);
        let param = param.inner().reshape(view_dims);
        let grad = grad.inner().reshape(view_dims);
        let state = match take_state(&mut self.params, name, &shape, |s| &s.shape)? {
            Some(s) => s,
            None => ParamState::zeros(shape, view_dims, factored, &param.device()),
        };
        let (param, state) = self.update(lr, param, grad, state);
        self.params.insert(name.to_owned(), state);
        Ok(param.reshape(dims))
    }

    fn update(
        &self,
        lr: f64,
        param: Tensor<3>,
        grad: Tensor<3>,
        state: ParamState,
    ) -> (Tensor<3>, ParamState) {
        let CameConfig {
            betas: [beta1, beta2, beta3],
            eps: [eps1, eps2],
            clip_threshold,
            weight_decay,
        } = self.config;
        let numel = grad.shape().num_elements();
        let g2 = grad.clone().square().add_scalar(eps1);

        // 1. Normalise the gradient by the (factored) second moment.
        let (u, second) = match state.second {
            Second::Factored {
                sq_row,
                sq_col,
                res_row,
                res_col,
            } => {
                let sq_row = ema(sq_row, g2.clone().mean_dim(2), beta2);
                let sq_col = ema(sq_col, g2.mean_dim(1), beta2);
                let u = approx(sq_row.clone(), sq_col.clone()) * grad;
                let second = Second::Factored {
                    sq_row,
                    sq_col,
                    res_row,
                    res_col,
                };
                (u, second)
            }
            Second::Full { sq } => {
                let sq = ema(sq, g2, beta2);
                let u = sq.clone().sqrt().recip() * grad;
                (u, Second::Full { sq })
            }
        };

        // 2. Clip the update to an RMS of at most `clip_threshold` (on the device: no sync).
        let rms = u
            .clone()
            .square()
            .sum()
            .sqrt()
            .div_scalar((numel as f64).sqrt());
        let divisor = rms.div_scalar(clip_threshold).clamp_min(1.0);
        let u = u / divisor.reshape([1, 1, 1]);

        // 3. Momentum.
        let exp_avg = ema(state.exp_avg, u.clone(), beta1);

        // 4. Confidence: rescale the momentum by the instability of the update.
        let (update, second) = match second {
            Second::Factored {
                sq_row,
                sq_col,
                res_row,
                res_col,
            } => {
                let res = (u - exp_avg.clone()).square().add_scalar(eps2);
                let res_row = ema(res_row, res.clone().mean_dim(2), beta3);
                let res_col = ema(res_col, res.mean_dim(1), beta3);
                let update = approx(res_row.clone(), res_col.clone()) * exp_avg.clone();
                let second = Second::Factored {
                    sq_row,
                    sq_col,
                    res_row,
                    res_col,
                };
                (update, second)
            }
            full @ Second::Full { .. } => (exp_avg.clone(), full),
        };

        // 5. Decoupled weight decay, then the step.
        let mut param = param;
        if weight_decay != 0.0 {
            param = param.clone() + param.mul_scalar(-weight_decay * lr);
        }
        let param = param - update.mul_scalar(lr);
        let state = ParamState {
            step: state.step + 1,
            shape: state.shape,
            exp_avg,
            second,
        };
        (param, state)
    }

    /// The state on the host, with `came_pytorch`'s slot names and shapes.
    pub fn state(&self) -> OptimizerState {
        let mut steps = BTreeMap::new();
        let mut tensors = BTreeMap::new();
        for (name, s) in &self.params {
            steps.insert(name.clone(), s.step);
            let mut put = |slot: &str, t: &Tensor<3>, shape: Vec<usize>| {
                tensors.insert(format!("{name}.{slot}"), to_host(t, shape));
            };
            put("exp_avg", &s.exp_avg, s.shape.clone());
            match &s.second {
                Second::Factored {
                    sq_row,
                    sq_col,
                    res_row,
                    res_col,
                } => {
                    let (row_shape, col_shape) = factored_shapes(&s.shape);
                    put("exp_avg_sq_row", sq_row, row_shape.clone());
                    put("exp_avg_sq_col", sq_col, col_shape.clone());
                    put("exp_avg_res_row", res_row, row_shape);
                    put("exp_avg_res_col", res_col, col_shape);
                }
                Second::Full { sq } => put("exp_avg_sq", sq, s.shape.clone()),
            }
        }
        OptimizerState {
            optimizer: "CAME".into(),
            hyperparameters: hyperparameters(&self.config),
            steps,
            tensors,
        }
    }

    /// Restores an optimizer from [`Came::state`]'s output, its tensors on `device`. The
    /// configuration must equal the one the state was made with.
    pub fn from_state(
        config: CameConfig,
        state: &OptimizerState,
        device: &Device,
    ) -> Result<Self, OptimizerError> {
        state.check_origin("CAME", &hyperparameters(&config))?;
        let mut params = BTreeMap::new();
        for (name, &step) in &state.steps {
            let shape = state
                .tensors
                .get(&format!("{name}.exp_avg"))
                .map(|t| t.shape.clone())
                .ok_or_else(|| {
                    OptimizerError::Damaged(format!("tensor `{name}.exp_avg` is missing"))
                })?;
            let (dims, factored) = view(&shape);
            let [b, r, c] = dims;
            let second = if factored {
                Second::Factored {
                    sq_row: state.tensor(name, "exp_avg_sq_row", [b, r, 1], device)?,
                    sq_col: state.tensor(name, "exp_avg_sq_col", [b, 1, c], device)?,
                    res_row: state.tensor(name, "exp_avg_res_row", [b, r, 1], device)?,
                    res_col: state.tensor(name, "exp_avg_res_col", [b, 1, c], device)?,
                }
            } else {
                Second::Full {
                    sq: state.tensor(name, "exp_avg_sq", dims, device)?,
                }
            };
            let exp_avg = state.tensor(name, "exp_avg", dims, device)?;
            params.insert(
                name.clone(),
                ParamState {
                    step,
                    shape,
                    exp_avg,
                    second,
                },
            );
        }
        Ok(Self { config, params })
    }
}

impl ParamState {
    fn zeros(shape: Vec<usize>, dims: [usize; 3], factored: bool, device: &Device) -> Self {
        let [b, r, c] = dims;
        let zeros = |d: [usize; 3]| Tensor::<3>::zeros(d, device);
        let second = if factored {
            Second::Factored {
                sq_row: zeros([b, r, 1]),
                sq_col: zeros([b, 1, c]),
                res_row: zeros([b, r, 1]),
                res_col: zeros([b, 1, c]),
            }
        } else {
            Second::Full { sq: zeros(dims) }
        };
        Self {
            step: 0,
            shape,
            exp_avg: zeros(dims),
            second,
        }
    }
}

/// `came_pytorch`'s shapes of the row (`shape[:-1]`) and column (`shape[:-2] + shape[-1:]`)
/// statistics.
fn factored_shapes(shape: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let n = shape.len();
    let row = shape[..n - 1].to_vec();
    let mut col = shape[..n - 2].to_vec();
    col.push(shape[n - 1]);
    (row, col)
}

fn hyperparameters(config: &CameConfig) -> String {
    serde_json::to_string(config).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Optimizer;
    use crate::reference::{self, Case};

    fn config(case: &Case) -> CameConfig {
        let f = |k: &str| case.config[k].as_f64().unwrap();
        let arr = |k: &str| -> Vec<f64> {
            case.config[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let betas = arr("betas");
        let eps = arr("eps");
        CameConfig {
            betas: [betas[0], betas[1], betas[2]],
            eps: [eps[0], eps[1]],
            clip_threshold: f("clip_threshold"),
            weight_decay: f("weight_decay"),
        }
    }

    #[test]
    fn matches_came_pytorch_step_by_step() {
        let cases = reference::optimizer_cases("came.safetensors");
        assert_eq!(cases.len(), 2);
        for case in &cases {
            let mut optimizer = Optimizer::Came(Came::new(config(case)));
            reference::check_against(&mut optimizer, case, "CAME");
        }
    }

    #[test]
    fn resume_is_bit_identical() {
        let case = &reference::optimizer_cases("came.safetensors")[0];
        let device = reference::device();
        let fresh = || Optimizer::Came(Came::new(config(case)));
        let restore = |s: &OptimizerState| {
            Optimizer::Came(Came::from_state(config(case), s, &device).unwrap())
        };
        reference::check_resume(case, fresh, restore);
    }

    /// Parameter shape, its `[B, R, C]` view, factored, and the row and column statistics' shapes.
    type ShapeCase<'a> = (
        &'a [usize],
        [usize; 3],
        bool,
        Option<(&'a [usize], &'a [usize])>,
    );

    #[test]
    fn statistics_follow_came_pytorch_shapes() {
        let cases: [ShapeCase; 5] = [
            (&[7], [1, 1, 7], false, None),
            (&[4, 320], [1, 4, 320], true, Some((&[4], &[320]))),
            (&[320, 4], [1, 320, 4], true, Some((&[320], &[4]))),
            (
                &[4, 320, 1, 1],
                [1280, 1, 1],
                true,
                Some((&[4, 320, 1], &[4, 320, 1])),
            ),
            (
                &[4, 64, 3, 3],
                [256, 3, 3],
                true,
                Some((&[4, 64, 3], &[4, 64, 3])),
            ),
        ];
        for (shape, dims, factored, stats) in cases {
            assert_eq!(view(shape), (dims, factored), "{shape:?}");
            if let Some((row, col)) = stats {
                let (r, c) = factored_shapes(shape);
                assert_eq!((r.as_slice(), c.as_slice()), (row, col), "{shape:?}");
            }
        }
    }

    #[test]
    fn optimizer_args_like_kohya() {
        let args = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ok = [
            (args(&[]), CameConfig::default()),
            (
                args(&[("weight_decay", "0.01"), ("betas", "(0.9, 0.99, 0.999)")]),
                CameConfig {
                    weight_decay: 0.01,
                    betas: [0.9, 0.99, 0.999],
                    ..CameConfig::default()
                },
            ),
            (
                args(&[("eps", "[1e-30,1e-12]"), ("clip_threshold", "2")]),
                CameConfig {
                    eps: [1e-30, 1e-12],
                    clip_threshold: 2.0,
                    ..CameConfig::default()
                },
            ),
        ];
        for (a, want) in ok {
            assert_eq!(CameConfig::from_args(&a).unwrap(), want, "{a:?}");
        }
        let bad = [
            args(&[("betas", "0.9,0.999")]),
            args(&[("lr_decay", "1")]),
            args(&[("weight_decay", "lots")]),
            args(&[("betas", "0.9,1.5,0.9")]),
        ];
        for a in bad {
            assert!(CameConfig::from_args(&a).is_err(), "{a:?}");
        }
    }
}
