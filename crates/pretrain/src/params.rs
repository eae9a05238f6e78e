//! Whole-module training on burn modules through their parameter paths: seeded initialisation,
//! marking every parameter as an autodiff leaf, global-norm gradient clipping and an AdamW step
//! keyed by a stable name (`<part>.<module path>`), and the named host values a resumable
//! checkpoint stores. Names never depend on burn's per-process `ParamId`s, so a restored run
//! finds its optimizer state again.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use slider_models::weights::ModulePath;
use slider_optim::{AdamW, OptimizerError};

/// Initial values of every parameter of `module` from `seed`, PyTorch-style and independent of
/// the order burn visits parameters in (each parameter draws from a stream named by its path):
/// Linear and Conv2d weights uniform in `+-1/sqrt(fan_in)`, biases 0, norm scales 1 and shifts
/// 0, embeddings normal with std 0.02 (0.01 for position embeddings, as CLIP). Parameters
/// whose name `zero` accepts start at 0 (LDM zero-initialises the last layer of every residual
/// branch and the UNet's output).
pub fn init_seeded<M: Module>(module: M, prefix: &str, seed: u64, zero: fn(&str) -> bool) -> M {
    struct Init<'a> {
        path: ModulePath,
        prefix: &'a str,
        seed: u64,
        zero: fn(&str) -> bool,
    }
    impl ModuleMapper for Init<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let name = self.path.name(self.prefix);
            let shape: [usize; D] = param.lazy_shape().dims();
            let n: usize = shape.iter().product();
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(fnv1a(name.as_bytes()));
            let parent = self.path.parent();
            let leaf = self.path.leaf();
            let values: Vec<f32> = if (self.zero)(&name) {
                vec![0.0; n]
            } else if matches!(parent, "Struct:GroupNorm" | "Struct:LayerNorm") {
                vec![if leaf == "gamma" { 1.0 } else { 0.0 }; n]
            } else if leaf == "bias" {
                vec![0.0; n]
            } else if parent == "Struct:Embedding" {
                let std = if name.contains("position") {
                    0.01
                } else {
                    0.02
                };
                (0..n)
                    .map(|_| std * rng.sample::<f32, _>(StandardNormal))
                    .collect()
            } else {
                // Linear weights are `[in, out]` in burn, conv weights `[out, in, kh, kw]`.
                let fan_in = match (parent, D) {
                    ("Struct:Linear", 2) => shape[0],
                    _ => n / shape[0].max(1),
                };
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
            };
            let device = param.lazy_device();
            let tensor = Tensor::<D>::from_data(TensorData::new(values, shape), &device);
            Param::initialized(param.id, tensor)
        }
    }
    module.map(&mut Init {
        path: ModulePath::default(),
        prefix,
        seed,
        zero,
    })
}

/// Every parameter of `module` as an autodiff leaf that keeps its gradient.
pub fn tracked<M: Module>(module: M) -> M {
    struct Track;
    impl ModuleMapper for Track {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let value = param.val().without_autodiff().autodiff().require_grad();
            Param::initialized(param.id, value)
        }
    }
    module.map(&mut Track)
}

/// Every parameter of `module` without autodiff (for inference and saving).
pub fn untracked<M: Module>(module: M) -> M {
    struct Untrack;
    impl ModuleMapper for Untrack {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            Param::initialized(param.id, param.val().without_autodiff())
        }
    }
    module.map(&mut Untrack)
}

/// The gradients of a module's parameters by name, flattened.
pub type NamedGrads = BTreeMap<String, Tensor<1>>;

/// Takes the gradient of every parameter of the tracked `module` out of `grads`, by name.
/// Errors with the names of parameters no gradient reached.
pub fn take_grads<M: Module>(
    module: &M,
    prefix: &str,
    grads: &mut Gradients,
    into: &mut NamedGrads,
) -> Result<(), OptimizerError> {
    struct Take<'a> {
        path: ModulePath,
        prefix: &'a str,
        grads: &'a mut Gradients,
        into: &'a mut NamedGrads,
        missing: Vec<String>,
    }
    impl ModuleVisitor for Take<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let name = self.path.name(self.prefix);
            match param.val().grad_remove(self.grads) {
                Some(g) => {
                    let n = g.shape().num_elements();
                    self.into.insert(name, g.reshape([n]));
                }
                None => self.missing.push(name),
            }
        }
    }
    let mut take = Take {
        path: ModulePath::default(),
        prefix,
        grads,
        into,
        missing: Vec::new(),
    };
    module.visit(&mut take);
    if take.missing.is_empty() {
        Ok(())
    } else {
        Err(OptimizerError::Args(format!(
            "no gradient reached {} parameter(s), e.g. `{}`",
            take.missing.len(),
            take.missing[0]
        )))
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`, with its 1e-6 in the denominator); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut NamedGrads, max_norm: f64) -> f64 {
    let total: f64 = grads
        .values()
        .map(|g| f64::from(g.clone().square().sum().into_scalar::<f32>()))
        .sum();
    let norm = total.sqrt();
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for g in grads.values_mut() {
            *g = g.clone().mul_scalar(scale);
        }
    }
    norm
}

/// One AdamW step for every parameter of `module` with the gradient of the same name; returns
/// the module with the new values (no autodiff).
pub fn adamw_step<M: Module>(
    module: M,
    prefix: &str,
    grads: &mut NamedGrads,
    optimizer: &mut AdamW,
    lr: f64,
) -> Result<M, OptimizerError> {
    struct Step<'a> {
        path: ModulePath,
        prefix: &'a str,
        grads: &'a mut NamedGrads,
        optimizer: &'a mut AdamW,
        lr: f64,
        error: Option<OptimizerError>,
    }
    impl ModuleMapper for Step<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let name = self.path.name(self.prefix);
            let value = param.val().without_autodiff();
            if self.error.is_some() {
                return Param::initialized(param.id, value);
            }
            let Some(grad) = self.grads.remove(&name) else {
                self.error = Some(OptimizerError::Args(format!(
                    "no gradient for parameter `{name}`"
                )));
                return Param::initialized(param.id, value);
            };
            let dims: [usize; D] = value.dims();
            match self
                .optimizer
                .step(&name, self.lr, value.clone(), grad.reshape(dims))
            {
                Ok(new) => Param::initialized(param.id, new),
                Err(e) => {
                    self.error = Some(e);
                    Param::initialized(param.id, value)
                }
            }
        }
    }
    let mut step = Step {
        path: ModulePath::default(),
        prefix,
        grads,
        optimizer,
        lr,
        error: None,
    };
    let module = module.map(&mut step);
    match step.error {
        Some(e) => Err(e),
        None => Ok(module),
    }
}

/// Every parameter's name, shape and values (burn's own layout), for checkpoints.
pub fn named_values<M: Module>(module: &M, prefix: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    struct Values<'a> {
        path: ModulePath,
        prefix: &'a str,
        out: Vec<(String, Vec<usize>, Vec<f32>)>,
    }
    impl ModuleVisitor for Values<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data();
            let shape = data.shape().to_vec();
            let values = data
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            self.out.push((self.path.name(self.prefix), shape, values));
        }
    }
    let mut values = Values {
        path: ModulePath::default(),
        prefix,
        out: Vec::new(),
    };
    module.visit(&mut values);
    values.out
}

/// Replaces every parameter of `module` with `values[name]`; errors with the names that are
/// missing or of another shape.
pub fn load_named<M: Module>(
    module: M,
    prefix: &str,
    values: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) -> Result<M, String> {
    struct Load<'a> {
        path: ModulePath,
        prefix: &'a str,
        values: &'a mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
        bad: Vec<String>,
    }
    impl ModuleMapper for Load<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let name = self.path.name(self.prefix);
            let shape: [usize; D] = param.lazy_shape().dims();
            match self.values.remove(&name) {
                Some((s, v)) if s == shape && v.len() == s.iter().product::<usize>() => {
                    let device = param.lazy_device();
                    let t = Tensor::<D>::from_data(TensorData::new(v, shape), &device);
                    Param::initialized(param.id, t)
                }
                _ => {
                    self.bad.push(name);
                    param
                }
            }
        }
    }
    let mut load = Load {
        path: ModulePath::default(),
        prefix,
        values,
        bad: Vec::new(),
    };
    let module = module.map(&mut load);
    if load.bad.is_empty() {
        Ok(module)
    } else {
        Err(format!(
            "{} parameter(s) missing or mis-shaped, e.g. `{}`",
            load.bad.len(),
            load.bad[0]
        ))
    }
}

/// FNV-1a, a stable hash of a parameter name (the RNG stream of its initial values).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
