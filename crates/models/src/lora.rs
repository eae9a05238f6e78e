//! LoRA adapters on the UNet: kohya's `networks.lora` target modules and names, trainable
//! low-rank factors, and the same adapters applied at any weight for inference.
//!
//! kohya adapts, in every spatial transformer, `proj_in`, `proj_out` and each transformer
//! block's `attn{1,2}.to_{q,k,v}`, `attn{1,2}.to_out.0`, `ff.net.0.proj` and `ff.net.2`. Names
//! are `lora_unet_` followed by the module path with `.` replaced by `_`: the original
//! (LDM/SGM) path for SDXL (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), the
//! diffusers path for SD1-family UNets (`lora_unet_down_blocks_0_attentions_0_proj_in`), which
//! [`lora_targets`] derives from our original-layout modules. With kohya's `conv_dim`
//! ("LoCon") the ResNet blocks' and samplers' modules are adapted too ([`locon_targets`]).
//!
//! Two ways to run the adapted UNet, equal up to rounding:
//! - training ([`LoraNetwork::forward`]) runs kohya's `LoRAModule.forward`,
//!   `W x + multiplier * alpha / rank * up(down(x))`, as a branch beside each frozen module
//!   ([`UNet::forward_adapted`]): the base weights stay constants of the autodiff graph and the
//!   backward pass forms no weight-sized gradient, only the factors' (SD1.5 at 32x32 latents:
//!   forward + backward 2.1x faster than with the deltas added, docs/benchmarks.md);
//! - inference ([`LoraNetwork::apply`]) adds the delta to the weights once, the way ComfyUI and
//!   A1111 apply a LoRA, so sampling costs what the base model costs.

use std::collections::{BTreeMap, HashMap};

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::tensor::module::{conv2d, linear};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Bool, Device, Gradients, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slider_lora::unet_names::{
    diffusers_path, diffusers_resnet_path, is_locon_module, is_transformer_module,
};
use slider_lora::{AlphaStorage, Lora, Module as FileModule, ModuleKind, TensorDtype};

use crate::unet::{Adapters, Layer, UNet, UNetInput};
use crate::weights::{add_to_params, param_keys};

/// Why an adapter cannot be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A LoRA names a module this UNet does not have (another architecture, or a text
    /// encoder module).
    #[error("the LoRA adapts `{0}`, which this UNet does not have")]
    UnknownModule(String),
    /// A LoRA module's shape differs from the UNet's.
    #[error("LoRA module `{name}` is {found}; this UNet's is {expected}")]
    Shape {
        /// The module.
        name: String,
        /// What the LoRA holds.
        found: String,
        /// What the UNet has.
        expected: String,
    },
    /// `network_dim` 0.
    #[error("network_dim must be at least 1")]
    ZeroRank,
    /// A tensor could not be read back from the device.
    #[error("cannot read LoRA tensor `{0}` from the device")]
    Readback(String),
}

/// One module kohya adapts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// kohya's name, `lora_unet_...`.
    pub name: String,
    /// The checkpoint key of its weight, `input_blocks.1.1.proj_in.weight`.
    pub key: String,
    /// Linear or 1x1 convolution.
    pub kind: ModuleKind,
    /// Output features.
    pub out_dim: usize,
    /// Input features (channels for a convolution).
    pub in_dim: usize,
}

/// The modules kohya's `networks.lora` adapts in `unet` without conv options, sorted by name.
pub fn lora_targets(unet: &UNet) -> Vec<Target> {
    targets_where(unet, is_transformer_module)
}

/// The modules kohya's `networks.lora` adds with `conv_dim` ("LoCon"), sorted by name: in every
/// ResNet block the two 3x3 convolutions, the time-embedding projection and the 1x1 skip
/// convolution, and every down/upsampler's 3x3 convolution. The 3x3 convolutions take
/// `conv_dim`/`conv_alpha`, the others `network_dim`/`network_alpha`, as in kohya. Names
/// follow [`lora_targets`]' rule: `lora_unet_down_blocks_0_resnets_0_conv1`,
/// `..._time_emb_proj`, `..._conv_shortcut`, `lora_unet_down_blocks_0_downsamplers_0_conv`,
/// `lora_unet_up_blocks_0_upsamplers_0_conv` for SD1-family UNets, the original paths
/// (`lora_unet_input_blocks_1_0_in_layers_2`, `lora_unet_input_blocks_3_0_op`, ...) for SDXL.
pub fn locon_targets(unet: &UNet) -> Vec<Target> {
    targets_where(unet, is_locon_module)
}

/// Every module a network of `unet` may adapt: [`lora_targets`] and [`locon_targets`].
fn all_targets(unet: &UNet) -> BTreeMap<String, Target> {
    lora_targets(unet)
        .into_iter()
        .chain(locon_targets(unet))
        .map(|t| (t.name.clone(), t))
        .collect()
}

fn targets_where(unet: &UNet, wanted: fn(&str) -> bool) -> Vec<Target> {
    let diffusers_names = !unet.takes_added_conditioning();
    let out_blocks = unet.output_blocks.len();
    let downsamplers = unet
        .input_blocks
        .iter()
        .filter(|block| matches!(block.first(), Some(Layer::Down(_))))
        .count();
    let levels = downsamplers + 1;
    let per_level = (out_blocks / levels).max(1);
    let mut targets: Vec<Target> = param_keys(unet)
        .into_iter()
        .filter_map(|(key, shape)| {
            let path = key.key.strip_suffix(".weight")?;
            if !wanted(path) {
                return None;
            }
            let (kind, out_dim, in_dim) = match shape.as_slice() {
                [i, o] => (ModuleKind::Linear, *o, *i),
                [o, i, kh, kw] => (ModuleKind::Conv { kh: *kh, kw: *kw }, *o, *i),
                _ => return None,
            };
            // A ResNet or sampler path first: `output_blocks.N.1.conv` is an upsampler, not
            // a spatial transformer's module.
            let named = if diffusers_names {
                diffusers_resnet_path(path, per_level)
                    .or_else(|| diffusers_path(path, per_level))?
            } else {
                path.to_owned()
            };
            Some(Target {
                name: format!("lora_unet_{}", named.replace('.', "_")),
                key: key.key.clone(),
                kind,
                out_dim,
                in_dim,
            })
        })
        .collect();
    targets.sort_by(|a, b| a.name.cmp(&b.name));
    targets
}

/// A low-rank factor in kohya's tensor shape: `[rank, in]`/`[out, rank]` for linear modules,
/// `[rank, in, kh, kw]`/`[out, rank, 1, 1]` for convolutions (the optimizer sees the same
/// shapes as kohya's, which matters for CAME's factored moments).
#[derive(Debug, Clone)]
pub enum Factor {
    /// Of a linear module.
    Linear(Tensor<2>),
    /// Of a convolution.
    Conv(Tensor<4>),
}

impl Factor {
    /// A factor of `shape` from row-major `values`; their count must match the shape.
    fn from_values(
        name: &str,
        values: Vec<f32>,
        shape: &[usize],
        device: &Device,
    ) -> Result<Self, AdapterError> {
        let mismatch = || AdapterError::Shape {
            name: name.to_owned(),
            found: format!("{} values", values.len()),
            expected: format!("shape {shape:?}"),
        };
        if values.len() != shape.iter().product::<usize>() {
            return Err(mismatch());
        }
        Ok(match *shape {
            [a, b, c, d] => Self::Conv(Tensor::from_data(
                TensorData::new(values, [a, b, c, d]),
                device,
            )),
            [a, b] => Self::Linear(Tensor::from_data(TensorData::new(values, [a, b]), device)),
            _ => return Err(mismatch()),
        })
    }

    /// The factor as a matrix (`[rows, rest]`).
    pub fn matrix(&self) -> Tensor<2> {
        match self {
            Self::Linear(t) => t.clone(),
            Self::Conv(t) => {
                let [a, b, c, d] = t.dims();
                t.clone().reshape([a, b * c * d])
            }
        }
    }

    /// Its shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Linear(t) => t.dims().to_vec(),
            Self::Conv(t) => t.dims().to_vec(),
        }
    }

    /// The values on the host, row-major.
    pub fn to_host(&self) -> Option<Vec<f32>> {
        let data = match self {
            Self::Linear(t) => t.clone().into_data(),
            Self::Conv(t) => t.clone().into_data(),
        };
        data.convert::<f32>().try_to_vec::<f32>().ok()
    }

    /// Marks the factor as a tracked autodiff leaf.
    pub fn tracked(self) -> Self {
        match self {
            Self::Linear(t) => Self::Linear(t.autodiff().require_grad()),
            Self::Conv(t) => Self::Conv(t.autodiff().require_grad()),
        }
    }

    /// Whether every value is finite, on the device (`[1]`; combine several before reading).
    pub fn all_finite(&self) -> Tensor<1, Bool> {
        match self {
            Self::Linear(t) => t.clone().is_finite().all(),
            Self::Conv(t) => t.clone().is_finite().all(),
        }
    }

    /// The factor without autodiff.
    pub fn untracked(self) -> Self {
        match self {
            Self::Linear(t) => Self::Linear(t.without_autodiff()),
            Self::Conv(t) => Self::Conv(t.without_autodiff()),
        }
    }
}

/// The trainable (or loaded) factors of one adapted module.
#[derive(Debug, Clone)]
pub struct AdapterModule {
    /// The module it adapts.
    pub target: Target,
    /// `network_dim`.
    pub rank: usize,
    /// `network_alpha`; the delta is scaled by `alpha / rank`.
    pub alpha: f32,
    /// `lora_down.weight`.
    pub down: Factor,
    /// `lora_up.weight`.
    pub up: Factor,
}

impl AdapterModule {
    /// `multiplier * alpha / rank * up @ down` in our layout of the base weight, flattened to
    /// 2-D (linear `[in, out]`, convolution `[out, in * kh * kw]`).
    fn delta(&self, multiplier: f64) -> Tensor<2> {
        let scale = multiplier * f64::from(self.alpha) / self.rank as f64;
        let (up, down) = (self.up.matrix(), self.down.matrix());
        match self.target.kind {
            ModuleKind::Linear => down.transpose().matmul(up.transpose()).mul_scalar(scale),
            ModuleKind::Conv { .. } => up.matmul(down).mul_scalar(scale),
        }
    }
}

impl AdapterModule {
    /// `multiplier * alpha / rank * up(down(x))` for a linear module's input `[b, n, in]`.
    fn linear_branch(&self, x: &Tensor<3>, multiplier: f64) -> Option<Tensor<3>> {
        let (Factor::Linear(down), Factor::Linear(up)) = (&self.down, &self.up) else {
            return None;
        };
        let scale = multiplier * f64::from(self.alpha) / self.rank as f64;
        // The factors (and so their gradients and optimizer state) stay f32; a half-precision
        // UNet's branch computes in its dtype, and autodiff casts the gradients back.
        let dtype = x.dtype();
        let low = linear(x.clone(), down.clone().cast(dtype).transpose(), None);
        Some(linear(low, up.clone().cast(dtype).transpose(), None).mul_scalar(scale))
    }

    /// The same for a convolution: `down` with the base convolution's window, stride and
    /// padding, then `up` as a 1x1 convolution.
    fn conv_branch(&self, base: &Conv2d, x: &Tensor<4>, multiplier: f64) -> Option<Tensor<4>> {
        let (Factor::Conv(down), Factor::Conv(up)) = (&self.down, &self.up) else {
            return None;
        };
        let scale = multiplier * f64::from(self.alpha) / self.rank as f64;
        let dtype = x.dtype();
        let down_conv = Conv2d {
            weight: Param::initialized(base.weight.id, down.clone().cast(dtype)),
            bias: None,
            ..base.clone()
        };
        let low = down_conv.forward(x.clone());
        let pointwise = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
        Some(conv2d(low, up.clone().cast(dtype), None, pointwise).mul_scalar(scale))
    }
}

/// A network's adapters as branches at one multiplier, looked up by module path, for
/// [`UNet::forward_adapted`].
pub struct Branches<'a> {
    by_path: HashMap<&'a str, &'a AdapterModule>,
    multiplier: f64,
}

impl Adapters for Branches<'_> {
    fn linear(&self, path: &str, x: &Tensor<3>) -> Option<Tensor<3>> {
        self.by_path.get(path)?.linear_branch(x, self.multiplier)
    }

    fn conv(&self, path: &str, conv: &Conv2d, x: &Tensor<4>) -> Option<Tensor<4>> {
        self.by_path
            .get(path)?
            .conv_branch(conv, x, self.multiplier)
    }
}

/// The ranks and alphas of a network: kohya's `network_dim`/`network_alpha` and, for LoCon,
/// `conv_dim`/`conv_alpha` (the 3x3 convolutions' rank and alpha).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetworkDims {
    /// `network_dim`.
    pub rank: usize,
    /// `network_alpha`.
    pub alpha: f32,
    /// `(conv_dim, conv_alpha)`; `None` adapts no ResNet or sampler module.
    pub conv: Option<(usize, f32)>,
}

/// A set of adapters on one UNet: kohya's LoRA network.
#[derive(Debug, Clone)]
pub struct LoraNetwork {
    /// By kohya name.
    pub modules: BTreeMap<String, AdapterModule>,
}

impl LoraNetwork {
    /// A fresh network on every target of `unet` as kohya initialises it: `lora_down`
    /// kaiming-uniform with `a = sqrt(5)` (uniform in +-1/sqrt(fan_in)), `lora_up` zeros.
    /// The values come from `seed` (ChaCha8), module by module in name order.
    pub fn init(
        unet: &UNet,
        rank: usize,
        alpha: f32,
        seed: u64,
        device: &Device,
    ) -> Result<Self, AdapterError> {
        let dims = NetworkDims {
            rank,
            alpha,
            conv: None,
        };
        Self::init_with(unet, dims, seed, device)
    }

    /// [`LoraNetwork::init`] for any [`NetworkDims`]: with `conv` set, on [`locon_targets`]
    /// too (3x3 convolutions at the conv rank and alpha, the rest at `rank` and `alpha`).
    pub fn init_with(
        unet: &UNet,
        dims: NetworkDims,
        seed: u64,
        device: &Device,
    ) -> Result<Self, AdapterError> {
        if dims.rank == 0 || dims.conv.is_some_and(|(rank, _)| rank == 0) {
            return Err(AdapterError::ZeroRank);
        }
        let mut targets = lora_targets(unet);
        if dims.conv.is_some() {
            targets.extend(locon_targets(unet));
            targets.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut modules = BTreeMap::new();
        for target in targets {
            let window = target.kind.window();
            let (rank, alpha) = match dims.conv {
                Some(conv) if window > 1 => conv,
                _ => (dims.rank, dims.alpha),
            };
            let fan_in = target.in_dim * window;
            let bound = 1.0 / (fan_in as f32).sqrt();
            let down: Vec<f32> = (0..rank * fan_in)
                .map(|_| (2.0 * rng.random::<f32>() - 1.0) * bound)
                .collect();
            let (down_shape, up_shape) = factor_shapes(&target, rank);
            let module = AdapterModule {
                down: Factor::from_values(&target.name, down, &down_shape, device)?,
                up: Factor::from_values(
                    &target.name,
                    vec![0.0; target.out_dim * rank],
                    &up_shape,
                    device,
                )?,
                rank,
                alpha,
                target,
            };
            modules.insert(module.target.name.clone(), module);
        }
        Ok(Self { modules })
    }

    /// The adapters of a LoRA file (LoCon modules included), checked against `unet`'s
    /// targets.
    pub fn from_lora(lora: &Lora, unet: &UNet, device: &Device) -> Result<Self, AdapterError> {
        let targets = all_targets(unet);
        let mut modules = BTreeMap::new();
        for (name, m) in &lora.modules {
            let target = targets
                .get(name)
                .ok_or_else(|| AdapterError::UnknownModule(name.clone()))?;
            if m.kind != target.kind || m.out_dim != target.out_dim || m.in_dim != target.in_dim {
                return Err(AdapterError::Shape {
                    name: name.clone(),
                    found: format!("{} {}x{}", m.kind, m.out_dim, m.in_dim),
                    expected: format!("{} {}x{}", target.kind, target.out_dim, target.in_dim),
                });
            }
            let (down_shape, up_shape) = factor_shapes(target, m.rank);
            modules.insert(
                name.clone(),
                AdapterModule {
                    target: target.clone(),
                    rank: m.rank,
                    alpha: m.alpha,
                    down: Factor::from_values(name, m.down.clone(), &down_shape, device)?,
                    up: Factor::from_values(name, m.up.clone(), &up_shape, device)?,
                },
            );
        }
        Ok(Self { modules })
    }

    /// The network as a kohya LoRA (f32 factors, float alphas, no metadata).
    pub fn to_lora(&self) -> Result<Lora, AdapterError> {
        let mut lora = Lora::default();
        for (name, m) in &self.modules {
            let read = |f: &Factor, what: &str| {
                f.to_host()
                    .ok_or_else(|| AdapterError::Readback(format!("{name}.{what}")))
            };
            lora.modules.insert(
                name.clone(),
                FileModule {
                    kind: m.target.kind,
                    out_dim: m.target.out_dim,
                    in_dim: m.target.in_dim,
                    rank: m.rank,
                    up: read(&m.up, "lora_up.weight")?,
                    down: read(&m.down, "lora_down.weight")?,
                    alpha: m.alpha,
                    alpha_storage: AlphaStorage::Float,
                    dtype: TensorDtype::F32,
                },
            );
        }
        Ok(lora)
    }

    /// The adapters as branches at `multiplier`, for [`UNet::forward_adapted`].
    pub fn branches(&self, multiplier: f64) -> Branches<'_> {
        let by_path = self
            .modules
            .values()
            .map(|m| {
                let key = m.target.key.as_str();
                (key.strip_suffix(".weight").unwrap_or(key), m)
            })
            .collect();
        Branches {
            by_path,
            multiplier,
        }
    }

    /// `unet`'s noise prediction with every adapter as a branch at `multiplier` (see
    /// [`UNet::forward`] for the arguments): the training forward pass. Tracked factors get
    /// gradients; the base weights get none.
    pub fn forward(
        &self,
        unet: &UNet,
        multiplier: f64,
        sample: Tensor<4>,
        timestep: Tensor<1>,
        context: Tensor<3>,
        y: Option<Tensor<2>>,
    ) -> Tensor<4> {
        unet.forward_adapted(sample, timestep, context, y, &self.branches(multiplier))
    }

    /// The gradients of `loss(prediction)` for every tracked factor, with `unet`'s forward pass
    /// recomputed one unit at a time in the backward pass (kohya's `gradient_checkpointing`;
    /// see [`UNet::recomputed_gradients`]). The same gradients as a backward pass through
    /// [`LoraNetwork::forward`] up to the order of sums, at the memory of one unit's graph.
    /// Returns the loss without autodiff (`None` only for a UNet without units) and the
    /// gradient containers; look a factor's gradient up in each.
    pub fn recomputed_gradients(
        &self,
        unet: &UNet,
        multiplier: f64,
        input: UNetInput,
        loss: &dyn Fn(Tensor<4>) -> Tensor<1>,
    ) -> (Option<Tensor<1>>, Vec<Gradients>) {
        let plain = LoraNetwork {
            modules: self
                .modules
                .iter()
                .map(|(name, m)| {
                    let m = AdapterModule {
                        down: m.down.clone().untracked(),
                        up: m.up.clone().untracked(),
                        ..m.clone()
                    };
                    (name.clone(), m)
                })
                .collect(),
        };
        unet.recomputed_gradients(
            input,
            (&plain.branches(multiplier), &self.branches(multiplier)),
            loss,
        )
    }

    /// `unet` with every adapter added at `multiplier` (any weight, negative included): the
    /// inference form, which costs nothing per step. Tracked factors make the result's
    /// weights tracked.
    pub fn apply(&self, unet: &UNet, multiplier: f64) -> Result<UNet, AdapterError> {
        let deltas: BTreeMap<String, Tensor<2>> = self
            .modules
            .values()
            .map(|m| (m.target.key.clone(), m.delta(multiplier)))
            .collect();
        let (patched, unused) = add_to_params(unet.clone(), deltas);
        match unused.into_iter().next() {
            Some(key) => Err(AdapterError::UnknownModule(key)),
            None => Ok(patched),
        }
    }
}

/// Shapes of `lora_down.weight` and `lora_up.weight` as kohya stores them.
fn factor_shapes(target: &Target, rank: usize) -> (Vec<usize>, Vec<usize>) {
    match target.kind {
        ModuleKind::Linear => (vec![rank, target.in_dim], vec![target.out_dim, rank]),
        ModuleKind::Conv { kh, kw } => (
            vec![rank, target.in_dim, kh, kw],
            vec![target.out_dim, rank, 1, 1],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::{Heads, UNetConfig};
    use slider_lora::layout::Layout;

    /// (UNet, kohya's module count, the layout list our names must equal).
    #[test]
    fn targets_are_kohyas_modules_and_names() {
        let device = Device::flex();
        for (label, config, count, layout) in [
            ("sd15", UNetConfig::sd15(), 192, Layout::Sd1),
            ("sdxl", UNetConfig::sdxl(), 722, Layout::Sdxl),
        ] {
            let unet = config.init(&device);
            let targets = lora_targets(&unet);
            assert_eq!(targets.len(), count, "{label}");
            let ours: Vec<_> = targets
                .iter()
                .map(|t| (t.name.clone(), t.kind, t.out_dim, t.in_dim))
                .collect();
            let want: Vec<_> = layout
                .modules()
                .into_iter()
                .map(|m| (m.name, m.kind, m.out_dim, m.in_dim))
                .collect();
            assert_eq!(ours, want, "{label}");
        }
    }

    #[test]
    fn sd1_family_names_map_original_blocks_to_diffusers_blocks() {
        // (original path, num_res_blocks + 1, diffusers path)
        let cases = [
            (
                "input_blocks.1.1.proj_in",
                3,
                Some("down_blocks.0.attentions.0.proj_in"),
            ),
            (
                "input_blocks.2.1.proj_in",
                3,
                Some("down_blocks.0.attentions.1.proj_in"),
            ),
            (
                "input_blocks.4.1.proj_out",
                3,
                Some("down_blocks.1.attentions.0.proj_out"),
            ),
            (
                "input_blocks.8.1.x",
                3,
                Some("down_blocks.2.attentions.1.x"),
            ),
            (
                "input_blocks.3.1.x",
                2,
                Some("down_blocks.1.attentions.0.x"),
            ),
            (
                "middle_block.1.transformer_blocks.0.attn1.to_q",
                3,
                Some("mid_block.attentions.0.transformer_blocks.0.attn1.to_q"),
            ),
            ("output_blocks.3.1.x", 3, Some("up_blocks.1.attentions.0.x")),
            (
                "output_blocks.11.1.x",
                3,
                Some("up_blocks.3.attentions.2.x"),
            ),
            ("output_blocks.5.1.x", 2, Some("up_blocks.2.attentions.1.x")),
            ("input_blocks.0.0", 3, None),
            ("out.2", 3, None),
        ];
        for (path, per_level, want) in cases {
            assert_eq!(diffusers_path(path, per_level).as_deref(), want, "{path}");
        }
    }

    /// (UNet, LoCon modules, names that must be among them with their kind): kohya adds every
    /// ResNet block's conv1/conv2 (3x3), time_emb_proj (linear) and conv_shortcut (1x1, where
    /// the channels change) and every sampler's 3x3 conv.
    #[test]
    fn locon_targets_are_kohyas_resnet_and_sampler_modules() {
        let device = Device::flex();
        let conv3 = ModuleKind::Conv { kh: 3, kw: 3 };
        let conv1 = ModuleKind::Conv { kh: 1, kw: 1 };
        let cases = [
            (
                UNetConfig::sd15(),
                // 22 ResNet blocks x 3, 14 skip convolutions, 3 + 3 samplers.
                86,
                vec![
                    ("lora_unet_down_blocks_0_resnets_0_conv1", conv3, 320, 320),
                    ("lora_unet_down_blocks_0_resnets_1_conv2", conv3, 320, 320),
                    (
                        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                        conv1,
                        640,
                        320,
                    ),
                    (
                        "lora_unet_down_blocks_1_resnets_0_time_emb_proj",
                        ModuleKind::Linear,
                        640,
                        1280,
                    ),
                    (
                        "lora_unet_down_blocks_2_downsamplers_0_conv",
                        conv3,
                        1280,
                        1280,
                    ),
                    ("lora_unet_mid_block_resnets_1_conv2", conv3, 1280, 1280),
                    (
                        "lora_unet_up_blocks_0_resnets_2_conv_shortcut",
                        conv1,
                        1280,
                        2560,
                    ),
                    ("lora_unet_up_blocks_0_upsamplers_0_conv", conv3, 1280, 1280),
                    ("lora_unet_up_blocks_3_resnets_2_conv1", conv3, 320, 640),
                ],
            ),
            (
                UNetConfig::sdxl(),
                // 17 ResNet blocks x 3, 11 skip convolutions, 2 + 2 samplers.
                66,
                vec![
                    ("lora_unet_input_blocks_1_0_in_layers_2", conv3, 320, 320),
                    (
                        "lora_unet_input_blocks_1_0_emb_layers_1",
                        ModuleKind::Linear,
                        320,
                        1280,
                    ),
                    ("lora_unet_input_blocks_3_0_op", conv3, 320, 320),
                    (
                        "lora_unet_input_blocks_4_0_skip_connection",
                        conv1,
                        640,
                        320,
                    ),
                    ("lora_unet_middle_block_2_out_layers_3", conv3, 1280, 1280),
                    ("lora_unet_output_blocks_2_2_conv", conv3, 1280, 1280),
                    ("lora_unet_output_blocks_5_2_conv", conv3, 640, 640),
                    (
                        "lora_unet_output_blocks_8_0_skip_connection",
                        conv1,
                        320,
                        640,
                    ),
                ],
            ),
        ];
        for (config, count, names) in cases {
            let unet = config.init(&device);
            let locon = locon_targets(&unet);
            assert_eq!(locon.len(), count);
            for (name, kind, out_dim, in_dim) in names {
                let t = locon.iter().find(|t| t.name == name);
                let t = t.unwrap_or_else(|| panic!("missing {name}"));
                assert_eq!(
                    (t.kind, t.out_dim, t.in_dim),
                    (kind, out_dim, in_dim),
                    "{name}"
                );
            }
            let standard = lora_targets(&unet);
            assert!(
                locon
                    .iter()
                    .all(|t| !standard.iter().any(|s| s.key == t.key))
            );
        }
    }

    /// With conv options the 3x3 convolutions take `conv_dim`/`conv_alpha`, everything else
    /// `network_dim`/`network_alpha`; without them nothing outside the transformers is adapted.
    #[test]
    fn conv_dims_apply_to_3x3_convolutions_only() {
        let device = Device::flex();
        let unet = small_unet(&device);
        let dims = NetworkDims {
            rank: 4,
            alpha: 1.0,
            conv: Some((2, 0.5)),
        };
        let net = LoraNetwork::init_with(&unet, dims, 1, &device).unwrap();
        assert_eq!(
            net.modules.len(),
            lora_targets(&unet).len() + locon_targets(&unet).len()
        );
        for m in net.modules.values() {
            let want = match m.target.kind {
                ModuleKind::Conv { kh: 3, kw: 3 } => (2, 0.5),
                _ => (4, 1.0),
            };
            assert_eq!((m.rank, m.alpha), want, "{}", m.target.name);
        }
        let lora = net.to_lora().unwrap();
        let back = LoraNetwork::from_lora(&lora, &unet, &device).unwrap();
        assert_eq!(back.to_lora().unwrap(), lora);
        let plain = LoraNetwork::init(&unet, 4, 1.0, 1, &device).unwrap();
        assert_eq!(plain.modules.len(), lora_targets(&unet).len());
        let zero = NetworkDims {
            conv: Some((0, 1.0)),
            ..dims
        };
        assert!(LoraNetwork::init_with(&unet, zero, 1, &device).is_err());
    }

    #[test]
    fn tiny_unet_follows_sd1_naming() {
        let unet = UNetConfig::tiny().init(&Device::flex());
        let targets = lora_targets(&unet);
        // 2 down, 1 middle and 4 up spatial transformers, one block each: 12 modules apiece.
        assert_eq!(targets.len(), 7 * 12);
        for want in [
            "lora_unet_down_blocks_0_attentions_0_proj_in",
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
            "lora_unet_mid_block_attentions_0_proj_out",
            "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2",
            "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn1_to_out_0",
        ] {
            assert!(targets.iter().any(|t| t.name == want), "missing {want}");
        }
    }

    fn small_unet_config() -> UNetConfig {
        UNetConfig {
            model_channels: 32,
            context_dim: 16,
            ..UNetConfig::tiny()
        }
    }

    fn small_unet(device: &Device) -> UNet {
        small_unet_config().init(device)
    }

    /// The gradient of `factor`, flattened, from whichever of `containers` holds it.
    fn flat_gradient(factor: &Factor, containers: &[Gradients]) -> Option<Tensor<1>> {
        containers.iter().find_map(|c| match factor {
            Factor::Linear(p) => p.grad(c).map(|g| g.reshape([-1])),
            Factor::Conv(p) => p.grad(c).map(|g| g.reshape([-1])),
        })
    }

    /// kohya's initialisation with non-zero `up` factors (a fresh network's are zero, which
    /// would leave every branch, and every `down` gradient, at zero).
    fn trained_looking_network(unet: &UNet, dims: NetworkDims, device: &Device) -> LoraNetwork {
        let mut net = LoraNetwork::init_with(unet, dims, 5, device).unwrap();
        for (i, m) in net.modules.values_mut().enumerate() {
            let n = m.target.out_dim * m.rank;
            let up: Vec<f32> = (0..n)
                .map(|j| ((i * 7 + j) % 11) as f32 * 0.02 - 0.1)
                .collect();
            m.up = Factor::from_values("test", up, &m.up.shape(), device).unwrap();
        }
        net
    }

    #[test]
    fn init_is_kohyas_and_changes_nothing_until_trained() {
        let device = Device::flex();
        let unet = small_unet(&device);
        let net = LoraNetwork::init(&unet, 4, 1.0, 7, &device).unwrap();
        for m in net.modules.values() {
            let bound = 1.0 / ((m.target.in_dim * m.target.kind.window()) as f32).sqrt();
            let down = m.down.to_host().unwrap();
            assert!(down.iter().all(|v| v.abs() <= bound), "{}", m.target.name);
            assert!(down.iter().any(|v| *v != 0.0));
            assert!(m.up.to_host().unwrap().iter().all(|v| *v == 0.0));
        }
        let again = LoraNetwork::init(&unet, 4, 1.0, 7, &device).unwrap();
        let other = LoraNetwork::init(&unet, 4, 1.0, 8, &device).unwrap();
        let first = |n: &LoraNetwork| n.modules.values().next().unwrap().down.to_host();
        assert_eq!(first(&net), first(&again));
        assert_ne!(first(&net), first(&other));
        assert!(LoraNetwork::init(&unet, 0, 1.0, 7, &device).is_err());
    }

    /// The patched weight equals `W + multiplier * alpha / rank * up @ down` in the
    /// checkpoint's `[out, in]` layout, for linear and 1x1-conv modules and several weights.
    /// A LoRA whose factor holds fewer values than its shape says is an error naming the
    /// module, never a panic inside burn.
    #[test]
    fn a_factor_of_the_wrong_length_is_refused_by_name() {
        let device = Device::flex();
        let unet = small_unet(&device);
        let mut lora = LoraNetwork::init(&unet, 2, 1.0, 3, &device)
            .unwrap()
            .to_lora()
            .unwrap();
        let (name, module) = lora.modules.iter_mut().next().unwrap();
        let name = name.clone();
        module.up.pop();
        let err = LoraNetwork::from_lora(&lora, &unet, &device).unwrap_err();
        assert!(err.to_string().contains(&name), "{err}");
    }

    #[test]
    fn applying_adds_the_scaled_delta_to_the_weights() {
        let device = Device::flex();
        let unet = small_unet(&device);
        let mut net = LoraNetwork::init(&unet, 2, 1.0, 3, &device).unwrap();
        for m in net.modules.values_mut() {
            let n = m.target.out_dim * m.rank;
            let up: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.01 - 0.03).collect();
            m.up = Factor::from_values("test", up, &m.up.shape(), &device).unwrap();
        }
        let lora = net.to_lora().unwrap();
        let base = crate::weights::param_values(&unet);
        for w in [1.0, -0.5, 2.0] {
            let patched = crate::weights::param_values(&net.apply(&unet, w).unwrap());
            for ((key, _, before), (_, _, after)) in base.iter().zip(&patched) {
                let Some((name, m)) = lora
                    .modules
                    .iter()
                    .find(|(n, _)| net.modules[*n].target.key == *key)
                else {
                    assert_eq!(before, after, "{key} is not adapted");
                    continue;
                };
                let scale = w as f32 * m.alpha / m.rank as f32;
                let k = m.in_flat();
                for o in 0..m.out_dim {
                    for i in 0..k {
                        let d: f32 = (0..m.rank)
                            .map(|r| m.up[o * m.rank + r] * m.down[r * k + i])
                            .sum();
                        let want = before[o * k + i] + scale * d;
                        let got = after[o * k + i];
                        assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{name}");
                    }
                }
            }
        }
    }

    /// The training form (branches beside the frozen modules) and the inference form (deltas
    /// added to the weights) give the same prediction, at several weights, LoCon modules
    /// included: every adapter is reached under its module path, and the branch is
    /// `multiplier * alpha / rank * up(down x)` (3x3 and strided convolutions too).
    #[test]
    fn branches_predict_what_the_patched_unet_predicts() {
        let device = Device::flex();
        let unet = small_unet(&device);
        let dims = NetworkDims {
            rank: 3,
            alpha: 2.0,
            conv: Some((2, 1.0)),
        };
        let net = trained_looking_network(&unet, dims, &device);
        let dist = burn::tensor::Distribution::Normal(0.0, 1.0);
        let x = Tensor::<4>::random([2, 4, 16, 16], dist, &device);
        let context = Tensor::<3>::random([2, 5, 16], dist, &device);
        let t = Tensor::<1>::from_floats([10.0, 700.0], &device);
        let base = unet.forward(x.clone(), t.clone(), context.clone(), None);
        let rel = |a: Tensor<4>, b: Tensor<4>| {
            let d = (a - b.clone()).square().sum().into_scalar::<f32>().sqrt();
            d / b.square().sum().into_scalar::<f32>().sqrt()
        };
        for w in [1.0, -0.5, 2.0] {
            let patched = net.apply(&unet, w).unwrap();
            let want = patched.forward(x.clone(), t.clone(), context.clone(), None);
            let got = net.forward(&unet, w, x.clone(), t.clone(), context.clone(), None);
            assert!(
                rel(want.clone(), base.clone()) > 1e-3,
                "weight {w} changes the output"
            );
            let err = rel(got, want);
            assert!(err < 1e-5, "weight {w}: relative error {err}");
        }
    }

    /// Per-unit recomputation gives every factor the gradient of the plain backward pass
    /// (relative error <= 1e-6, the bound of `gradient_checkpointing`), on an SD1-shaped UNet
    /// with LoCon (convolution projections, 3x3 and strided convolution adapters) and an
    /// SDXL-shaped one (linear projections, two transformer blocks per level, the added
    /// conditioning), batch 2.
    #[test]
    fn recomputed_gradients_equal_the_plain_backward() {
        let device = Device::flex();
        let sdxl_like = UNetConfig {
            transformer_depth: vec![0, 2, 2],
            use_linear_projection: true,
            adm_in_channels: Some(12),
            size_embed_dim: 2,
            heads: Heads::Dim(16),
            ..small_unet_config()
        };
        for (config, conv) in [(small_unet_config(), Some((2, 1.0))), (sdxl_like, None)] {
            let unet = config.init(&device);
            let dims = NetworkDims {
                rank: 3,
                alpha: 2.0,
                conv,
            };
            let mut net = trained_looking_network(&unet, dims, &device);
            for m in net.modules.values_mut() {
                m.up = m.up.clone().tracked();
                m.down = m.down.clone().tracked();
            }
            // Fixed inputs: the bound is checked on the same numbers every run.
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            use crate::ddpm::standard_normal as normal;
            let input = UNetInput {
                sample: normal(&mut rng, [2, 4, 16, 16], &device),
                timestep: Tensor::<1>::from_floats([10.0, 700.0], &device),
                context: normal(&mut rng, [2, 5, 16], &device),
                y: config
                    .adm_in_channels
                    .map(|adm| normal(&mut rng, [2, adm], &device)),
            };
            let target = normal(&mut rng, [2, 4, 16, 16], &device);
            let loss = |pred: Tensor<4>| (pred - target.clone()).square().mean();

            let pred = net.forward(
                &unet,
                1.0,
                input.sample.clone(),
                input.timestep.clone(),
                input.context.clone(),
                input.y.clone(),
            );
            let plain_loss = loss(pred);
            let plain = plain_loss.backward();
            let (recomputed_loss, containers) = net.recomputed_gradients(&unet, 1.0, input, &loss);
            // Both forwards run the same attention (on flex in f32, `slider-attention`'s
            // kernel): the losses agree up to the rounding of the recomputation.
            let recomputed_loss = recomputed_loss.unwrap().into_scalar::<f32>();
            let plain_loss_value = plain_loss.into_scalar::<f32>();
            assert!(
                (recomputed_loss - plain_loss_value).abs() <= 1e-6 * plain_loss_value.abs(),
                "loss {recomputed_loss} vs {plain_loss_value}"
            );

            let mut pairs = Vec::new();
            for (name, m) in &net.modules {
                for factor in [&m.down, &m.up] {
                    let (want, got) = (
                        flat_gradient(factor, std::slice::from_ref(&plain))
                            .unwrap_or_else(|| panic!("{name}: no plain gradient")),
                        flat_gradient(factor, &containers)
                            .unwrap_or_else(|| panic!("{name}: no recomputed gradient")),
                    );
                    let norm = want.clone().square().sum().into_scalar::<f32>().sqrt();
                    let diff = (got - want).square().sum().into_scalar::<f32>().sqrt();
                    pairs.push((name.clone(), norm, diff));
                }
            }
            // A factor whose gradient is zero in exact arithmetic (the time embedding of a
            // ResBlock whose GroupNorm has one channel per group: a per-channel shift is
            // normalised away) has rounding noise on both sides: its difference is measured
            // against the largest gradient instead of its own.
            let largest = pairs.iter().map(|p| p.1).fold(0f32, f32::max);
            let (real, zero): (Vec<_>, Vec<_>) = pairs.iter().partition(|p| p.1 > 1e-3 * largest);
            assert!(
                real.len() * 10 >= pairs.len() * 9,
                "only {} of {} factors have a gradient",
                real.len(),
                pairs.len()
            );
            let worst_zero = zero.iter().map(|p| p.2 / largest).fold(0f32, f32::max);
            assert!(
                worst_zero <= 1e-6,
                "zero gradients differ by {worst_zero:e}"
            );
            // The gradients as one vector: relative error <= 1e-6 (the bound of
            // `gradient_checkpointing`); each factor on its own within 1e-5 (the sums run in
            // another order, so a factor's last bits differ).
            let total = pairs.iter().map(|p| p.1 * p.1).sum::<f32>().sqrt();
            let total_diff = pairs.iter().map(|p| p.2 * p.2).sum::<f32>().sqrt();
            let overall = total_diff / total;
            let worst = real.iter().map(|p| p.2 / p.1).fold(0f32, f32::max);
            println!(
                "{} factors: relative error {overall:e} over all, worst factor {worst:e}; {} with \
                 zero gradients, within {worst_zero:e} of the largest",
                real.len(),
                zero.len()
            );
            assert!(overall <= 1e-6, "relative error {overall:e}");
            assert!(worst <= 1e-5, "worst factor's relative error {worst:e}");
        }
    }

    /// One training step's LoRA gradients with the shipped tiny base held in fp16 and in bf16
    /// (the frozen weights and activations in the half dtype, norms in f32, factors f32)
    /// against the same step in f32, with and without recomputation. The bounds are the ones
    /// docs/benchmarks.md ("Mixed precision") gives: relative error of all gradients as one
    /// vector <= 3e-3 (fp16; its 11-bit mantissa) and <= 1.5e-2 (bf16; 8 bits), so a half
    /// step points where the f32 step points.
    #[test]
    fn half_precision_gradients_follow_the_f32_ones() {
        use crate::checkpoint::{Checkpoint, Precision, StableDiffusion};
        use crate::diffusers_config::BaseConfig;
        use burn::tensor::FloatDType;

        let device = Device::flex();
        let base = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../assets/tiny-sd/tiny-sd.safetensors"
        );
        let ckpt = Checkpoint::open(base).unwrap();
        let load = |dtype| {
            let precision = Precision {
                unet: dtype,
                vae: dtype,
            };
            StableDiffusion::load_in(&ckpt, &BaseConfig::none(), precision, &device)
                .unwrap()
                .unet
        };
        let reference = load(FloatDType::F32);
        let dims = NetworkDims {
            rank: 4,
            alpha: 1.0,
            conv: None,
        };
        let net = trained_looking_network(&reference, dims, &device);
        let context_dim = reference
            .input_blocks
            .iter()
            .flatten()
            .find_map(|l| match l {
                Layer::Attn(a) => Some(a.transformer_blocks[0].attn2.to_k.weight.dims()[0]),
                _ => None,
            });
        // The default recipe's shape: 16x16 latents, a 77-token caption; fixed inputs.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        use crate::ddpm::standard_normal as normal;
        let input = || UNetInput {
            sample: normal(&mut ChaCha8Rng::seed_from_u64(4), [1, 4, 16, 16], &device),
            timestep: Tensor::<1>::from_floats([400.0], &device),
            context: normal(
                &mut ChaCha8Rng::seed_from_u64(5),
                [1, 77, context_dim.unwrap()],
                &device,
            ),
            y: None,
        };
        let target = normal(&mut rng, [1, 4, 16, 16], &device);
        // fp16 trains with a loss scale (the trainer's starts at 2^16); the gradients are
        // divided by it again.
        let gradients = |unet: &UNet, recompute: bool, scale: f32| -> Vec<f32> {
            let mut net = net.clone();
            for m in net.modules.values_mut() {
                m.up = m.up.clone().tracked();
                m.down = m.down.clone().tracked();
            }
            let loss = |pred: Tensor<4>| (pred - target.clone()).square().mean().mul_scalar(scale);
            let containers = if recompute {
                net.recomputed_gradients(unet, 1.0, input(), &loss).1
            } else {
                let i = input();
                let pred = net.forward(unet, 1.0, i.sample, i.timestep, i.context, i.y);
                assert_eq!(pred.dtype(), burn::tensor::DType::F32);
                vec![loss(pred).backward()]
            };
            let mut all = Vec::new();
            for m in net.modules.values() {
                for factor in [&m.down, &m.up] {
                    let g =
                        flat_gradient(factor, &containers).expect("every factor gets a gradient");
                    assert_eq!(
                        g.dtype(),
                        burn::tensor::DType::F32,
                        "factor gradients stay f32"
                    );
                    let g = g.div_scalar(scale).into_data().try_to_vec::<f32>().unwrap();
                    all.extend(g);
                }
            }
            all
        };
        let want = gradients(&reference, false, 1.0);
        let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(norm > 0.0);
        for (dtype, scale, bound) in [
            (FloatDType::F16, 65536.0, 3e-3),
            (FloatDType::BF16, 1.0, 1.5e-2),
        ] {
            let unet = load(dtype);
            assert_eq!(unet.out.2.weight.val().dtype(), dtype.into());
            assert_eq!(
                unet.out.0.gamma.as_ref().map(|g| g.val().dtype()),
                Some(burn::tensor::DType::F32)
            );
            for recompute in [false, true] {
                let got = gradients(&unet, recompute, scale);
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{dtype:?}: non-finite gradient"
                );
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                let err = diff / norm;
                println!("{dtype:?}, recompute {recompute}: relative error {err:e}");
                assert!(
                    err <= bound,
                    "{dtype:?}, recompute {recompute}: {err:e} > {bound:e}"
                );
            }
        }
    }

    #[test]
    fn a_saved_lora_loads_back_and_foreign_modules_are_refused() {
        let device = Device::flex();
        let unet = small_unet(&device);
        let net = LoraNetwork::init(&unet, 3, 2.0, 1, &device).unwrap();
        let lora = net.to_lora().unwrap();
        let back = LoraNetwork::from_lora(&lora, &unet, &device).unwrap();
        assert_eq!(back.to_lora().unwrap(), lora);

        let mut foreign = lora.clone();
        let m = foreign.modules.values().next().unwrap().clone();
        foreign.modules.insert("lora_te_text_model_x".into(), m);
        assert!(matches!(
            LoraNetwork::from_lora(&foreign, &unet, &device),
            Err(AdapterError::UnknownModule(_))
        ));
        let mut misshaped = lora;
        misshaped.modules.values_mut().next().unwrap().in_dim += 1;
        assert!(matches!(
            LoraNetwork::from_lora(&misshaped, &unet, &device),
            Err(AdapterError::Shape { .. })
        ));
    }
}
