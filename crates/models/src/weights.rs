//! The one place where module paths become checkpoint keys, and back.
//!
//! Our modules are named after the original LDM/SGM layout (`input_blocks.1.0.in_layers.0`), so
//! a parameter's key is its burn module path with three renames: norms store `gamma`/`beta`
//! where PyTorch says `weight`/`bias`, burn's `Linear` keeps `[in, out]` where PyTorch keeps
//! `[out, in]` (so linear weights are transposed on the way in and out), and enum variants
//! (which only pick a layer kind) add nothing to the path.

use std::collections::BTreeMap;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{DType, FloatDType, Tensor, TensorData};

/// Where a parameter's values sit in the checkpoint, and how they are laid out there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOf {
    /// Key relative to the part's prefix, e.g. `time_embed.0.weight`.
    pub key: String,
    /// Stored transposed (`[out, in]`) relative to our `[in, out]`.
    pub transposed: bool,
}

/// The module path while burn walks a module (a `ModuleVisitor` / `ModuleMapper` calls
/// `enter` and `exit` from its `enter_module` / `exit_module`); enum variants add nothing to it.
/// The one place module paths become names: checkpoint keys here, training names in
/// pretraining.
#[derive(Debug, Default)]
pub struct ModulePath {
    stack: Vec<(String, String)>,
}

impl ModulePath {
    /// Enters the field `name` of container type `container` (`Struct:Linear`, `Enum:..`).
    pub fn enter(&mut self, name: &str, container: &str) {
        self.stack.push((name.to_string(), container.to_string()));
    }

    /// Leaves the innermost field.
    pub fn exit(&mut self) {
        self.stack.pop();
    }

    /// `prefix` and the path's fields joined by `.` (enum variants skipped), e.g.
    /// `unet.input_blocks.1.0.in_layers.2.weight`.
    pub fn name(&self, prefix: &str) -> String {
        let mut out = prefix.to_string();
        for (name, container) in &self.stack {
            if !container.starts_with("Enum:") {
                out.push('.');
                out.push_str(name);
            }
        }
        out
    }

    /// The container type holding the parameter (`Struct:Linear`, `Struct:GroupNorm`, ...).
    pub fn parent(&self) -> &str {
        self.stack.last().map(|(_, c)| c.as_str()).unwrap_or("")
    }

    /// The parameter's own field name.
    pub fn leaf(&self) -> &str {
        self.stack.last().map(|(n, _)| n.as_str()).unwrap_or("")
    }

    /// Whether the parameter belongs to a norm (GroupNorm, LayerNorm).
    pub fn in_norm(&self) -> bool {
        matches!(self.parent(), "Struct:GroupNorm" | "Struct:LayerNorm")
    }

    /// The checkpoint key of the parameter at the current path: the path with norm
    /// `gamma`/`beta` renamed `weight`/`bias`, and whether a linear weight is stored transposed.
    pub fn key(&self) -> KeyOf {
        let is_norm = self.in_norm();
        let mut key = self.name("");
        let leaf = self.leaf();
        let mut transposed = false;
        match (leaf, is_norm, self.parent()) {
            ("gamma", true, _) => key.replace_range(key.len() - leaf.len().., "weight"),
            ("beta", true, _) => key.replace_range(key.len() - leaf.len().., "bias"),
            ("weight", _, "Struct:Linear") => transposed = true,
            _ => {}
        }
        KeyOf {
            key: key.trim_start_matches('.').to_owned(),
            transposed,
        }
    }
}

/// Every parameter of a module: key, our shape (after any transposition), in visiting order.
pub fn param_keys<M: burn::module::Module>(module: &M) -> Vec<(KeyOf, Vec<usize>)> {
    struct Keys {
        path: ModulePath,
        out: Vec<(KeyOf, Vec<usize>)>,
    }
    impl ModuleVisitor for Keys {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out
                .push((self.path.key(), param.lazy_shape().dims::<D>().to_vec()));
        }
    }
    let mut keys = Keys {
        path: ModulePath::default(),
        out: Vec::new(),
    };
    module.visit(&mut keys);
    keys.out
}

/// The values of every parameter in the checkpoint's layout (`[out, in]` linears): for writers.
pub fn param_values<M: burn::module::Module>(module: &M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    struct Values {
        path: ModulePath,
        out: Vec<(String, Vec<usize>, Vec<f32>)>,
    }
    impl ModuleVisitor for Values {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let key = self.path.key();
            let data = param.val().into_data();
            let shape = data.shape().to_vec();
            let values = data
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            let (shape, values) = if key.transposed && shape.len() == 2 {
                (
                    vec![shape[1], shape[0]],
                    transpose(&values, shape[0], shape[1]),
                )
            } else {
                (shape, values)
            };
            self.out.push((key.key, shape, values));
        }
    }
    let mut values = Values {
        path: ModulePath::default(),
        out: Vec::new(),
    };
    module.visit(&mut values);
    values.out
}

/// A source of f32 values by key in the checkpoint's own layout.
pub trait TensorSource {
    /// Shape of the stored tensor, `None` when the key is absent.
    fn shape_of(&self, key: &str) -> Option<Vec<usize>>;
    /// The stored values converted to f32 (the key is known to exist).
    fn values_f32(&self, key: &str) -> Result<Vec<f32>, String>;
}

/// What went wrong while filling one module: keys relative to the part's prefix.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FillReport {
    /// Keys the module needs and the source lacks.
    pub missing: Vec<String>,
    /// (key, expected shape in the checkpoint's layout, found shape).
    pub misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Keys whose values could not be read.
    pub unreadable: Vec<(String, String)>,
    /// Keys consumed, for the unexpected-key check.
    pub consumed: Vec<String>,
}

/// Replaces every parameter of `module` with the values stored under `prefix + key`, in f32.
/// Parameters whose key is missing or mis-shaped are left as they were and reported.
pub fn fill<M: burn::module::Module, S: TensorSource>(
    module: M,
    source: &S,
    prefix: &str,
) -> (M, FillReport) {
    fill_as(module, source, prefix, FloatDType::F32)
}

/// [`fill`] with every parameter stored in `dtype`, except the norms' (GroupNorm, LayerNorm),
/// which stay f32 because norms compute in f32 ([`crate::layers::NormF32`]). Each tensor is
/// converted on its own as it is read, so a half-precision model never exists in f32 whole.
pub fn fill_as<M: burn::module::Module, S: TensorSource>(
    module: M,
    source: &S,
    prefix: &str,
    dtype: FloatDType,
) -> (M, FillReport) {
    struct Filler<'a, S> {
        path: ModulePath,
        source: &'a S,
        prefix: &'a str,
        dtype: FloatDType,
        report: FillReport,
    }
    impl<S: TensorSource> ModuleMapper for Filler<'_, S> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let key = self.path.key();
            let full = format!("{}{}", self.prefix, key.key);
            let ours = param.lazy_shape().dims::<D>().to_vec();
            let stored_expected = if key.transposed && ours.len() == 2 {
                vec![ours[1], ours[0]]
            } else {
                ours.clone()
            };
            let Some(found) = self.source.shape_of(&full) else {
                self.report.missing.push(full);
                return param;
            };
            if found != stored_expected {
                self.report.misshaped.push((full, stored_expected, found));
                return param;
            }
            let values = match self.source.values_f32(&full) {
                Ok(v) => v,
                Err(e) => {
                    self.report.unreadable.push((full, e));
                    return param;
                }
            };
            if values.len() != ours.iter().product::<usize>() {
                let why = format!("{} values for shape {found:?}", values.len());
                self.report.unreadable.push((full, why));
                return param;
            }
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                let why = format!("non-finite value {} at element {i}", values[i]);
                self.report.unreadable.push((full, why));
                return param;
            }
            let values = if key.transposed && ours.len() == 2 {
                transpose(&values, found[0], found[1])
            } else {
                values
            };
            self.report.consumed.push(full);
            let device = param.lazy_device();
            let dtype = if self.path.in_norm() {
                FloatDType::F32
            } else {
                self.dtype
            };
            let tensor = Tensor::<D>::from_data(
                TensorData::new(values, ours),
                (&device, DType::from(dtype)),
            );
            let id = param.id;
            param.transform_for_load(tensor, id)
        }
    }
    let mut filler = Filler {
        path: ModulePath::default(),
        source,
        prefix,
        dtype,
        report: FillReport::default(),
    };
    let module = module.map(&mut filler);
    (module, filler.report)
}

/// Adds `deltas[key]` (flattened to 2-D, in our layout: linear weights `[in, out]`) to the
/// parameter stored under `key`, reshaped to the parameter's shape. The sum keeps the delta's
/// autodiff graph, so gradients flow into whatever the delta was computed from while the base
/// stays a constant. Returns the keys of `deltas` that no parameter has.
pub fn add_to_params<M: burn::module::Module>(
    module: M,
    mut deltas: BTreeMap<String, Tensor<2>>,
) -> (M, Vec<String>) {
    struct Adder {
        path: ModulePath,
        deltas: BTreeMap<String, Tensor<2>>,
    }
    impl ModuleMapper for Adder {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(delta) = self.deltas.remove(&self.path.key().key) else {
                return param;
            };
            let base = param.val();
            let dims: [usize; D] = base.dims();
            let delta = delta.reshape(dims).cast(base.dtype());
            Param::initialized(param.id, base + delta)
        }
    }
    let mut adder = Adder {
        path: ModulePath::default(),
        deltas: std::mem::take(&mut deltas),
    };
    let module = module.map(&mut adder);
    (module, adder.deltas.into_keys().collect())
}

/// Row-major `[rows, cols]` -> `[cols, rows]`.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// A source backed by an in-memory map (tests, and writers' round trips).
impl TensorSource for BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    fn shape_of(&self, key: &str) -> Option<Vec<usize>> {
        self.get(key).map(|(s, _)| s.clone())
    }
    fn values_f32(&self, key: &str) -> Result<Vec<f32>, String> {
        self.get(key)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("no tensor {key}"))
    }
}
