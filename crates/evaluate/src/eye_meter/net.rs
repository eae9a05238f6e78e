//! The eye meter's network: six 3x3/1x1 convolutions (three of stride 2, 64 -> 8 pixels), each
//! normalised per image, with ReLU; an eye-mask head on the 32x32 features (a 1x1 conv: which
//! 2x2 pixel cells are eye), whose mask pools those features into an "eye descriptor"; then
//! two fully connected layers from the flattened 8x8 features, the eye descriptor and the mask
//! area to 11 outputs: the eye size, and for two eye slots (left to right) a presence logit and
//! a box in unit image coordinates. The mask is trained densely (one label per cell), which is
//! what makes the small eyes learnable in minutes on a CPU. Parameters are plain tensors keyed
//! by name, so training can mark them as autodiff leaves and step them one by one.

use std::collections::{BTreeMap, HashMap};

use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Input width and height in pixels.
pub const INPUT_SIZE: usize = 64;
/// Outputs per image: eye size, then two slots of (presence logit, x0, y0, x1, y1).
pub const OUTPUTS: usize = 11;

/// `(name, in channels, out channels, kernel, stride)`.
const CONVS: [(&str, usize, usize, usize, usize); 6] = [
    ("conv1", 3, 16, 3, 1),
    ("conv2", 16, 32, 3, 2),
    ("conv3", 32, 48, 3, 2),
    ("conv4", 48, 64, 3, 1),
    ("conv5", 64, 64, 3, 2),
    ("conv6", 64, 16, 1, 1),
];
/// Spatial size after the convolutions.
const FEATURE_SIZE: usize = INPUT_SIZE / 8;
/// The convolution whose output the eye-mask head reads (32x32, 32 channels).
const MASK_AFTER: usize = 1;
const MASK_CHANNELS: usize = 32;
/// Side of the eye mask in cells (each cell is 2x2 input pixels).
pub(crate) const MASK_SIZE: usize = INPUT_SIZE / 2;
/// `(name, in features, out features)`.
const DENSE: [(&str, usize, usize); 2] = [
    (
        "fc1",
        16 * FEATURE_SIZE * FEATURE_SIZE + MASK_CHANNELS + 1,
        64,
    ),
    ("fc2", 64, OUTPUTS),
];

/// Per-image normalisation without parameters (layer norm over channels and pixels): zero
/// mean, unit variance. It keeps training fast without batch statistics, so a reading never
/// depends on the other images of a batch, and it keeps the channels' relative strengths.
fn normalize(x: Tensor<4>) -> Tensor<4> {
    let mean = x.clone().mean_dim(3).mean_dim(2).mean_dim(1);
    let centred = x - mean;
    let var = centred.clone().square().mean_dim(3).mean_dim(2).mean_dim(1);
    centred / var.add_scalar(1e-5).sqrt()
}

/// One parameter.
#[derive(Debug, Clone)]
pub(crate) enum Param {
    Conv(Tensor<4>),
    Dense(Tensor<2>),
    Bias(Tensor<1>),
}

impl Param {
    fn shape(&self) -> Vec<usize> {
        match self {
            Param::Conv(t) => t.dims().to_vec(),
            Param::Dense(t) => t.dims().to_vec(),
            Param::Bias(t) => t.dims().to_vec(),
        }
    }

    fn to_host(&self) -> Vec<f32> {
        let data = match self {
            Param::Conv(t) => t.clone().into_data(),
            Param::Dense(t) => t.clone().into_data(),
            Param::Bias(t) => t.clone().into_data(),
        };
        data.convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default()
    }

    fn conv(&self) -> Option<&Tensor<4>> {
        match self {
            Param::Conv(t) => Some(t),
            _ => None,
        }
    }

    fn dense(&self) -> Option<&Tensor<2>> {
        match self {
            Param::Dense(t) => Some(t),
            _ => None,
        }
    }

    fn bias(&self) -> Option<&Tensor<1>> {
        match self {
            Param::Bias(t) => Some(t),
            _ => None,
        }
    }
}

/// The network's parameters, keyed `conv1.weight`, `conv1.bias`, ..., `fc2.bias` (PyTorch's
/// layouts: conv `[out, in, k, k]`, dense `[out, in]`).
#[derive(Debug, Clone)]
pub(crate) struct Net {
    pub(crate) params: BTreeMap<String, Param>,
    pub(crate) device: Device,
}

/// Every parameter's name and shape, in a fixed order.
fn layout() -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for (name, c_in, c_out, k, _) in CONVS {
        out.push((format!("{name}.weight"), vec![c_out, c_in, k, k]));
        out.push((format!("{name}.bias"), vec![c_out]));
    }
    out.push(("mask.weight".to_string(), vec![1, MASK_CHANNELS, 1, 1]));
    out.push(("mask.bias".to_string(), vec![1]));
    for (name, d_in, d_out) in DENSE {
        out.push((format!("{name}.weight"), vec![d_out, d_in]));
        out.push((format!("{name}.bias"), vec![d_out]));
    }
    out
}

fn make_param(shape: &[usize], values: Vec<f32>, device: &Device) -> Param {
    match *shape {
        [a, b, c, d] => Param::Conv(Tensor::from_data(
            TensorData::new(values, [a, b, c, d]),
            device,
        )),
        [a, b] => Param::Dense(Tensor::from_data(TensorData::new(values, [a, b]), device)),
        _ => Param::Bias(Tensor::from_data(
            TensorData::new(values, [shape.iter().product::<usize>()]),
            device,
        )),
    }
}

impl Net {
    /// Fresh parameters: He-normal weights (the last layer scaled down), zero biases.
    pub(crate) fn init(rng: &mut ChaCha8Rng, device: &Device) -> Net {
        let mut params = BTreeMap::new();
        for (name, shape) in layout() {
            let numel: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; numel]
            } else {
                let fan_in: usize = shape[1..].iter().product();
                // ReLU layers keep their activations' scale; the output layer starts near zero.
                let gain = if name.starts_with("fc2") { 0.01 } else { 2.0 };
                let std = (gain / fan_in as f64).sqrt() as f32;
                (0..numel)
                    .map(|_| std * rng.sample::<f32, _>(StandardNormal))
                    .collect()
            };
            params.insert(name, make_param(&shape, values, device));
        }
        Net {
            params,
            device: device.clone(),
        }
    }

    /// Parameters from host tensors, every name and shape checked.
    pub(crate) fn from_host(
        mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
        device: &Device,
    ) -> Result<Net, String> {
        let mut params = BTreeMap::new();
        for (name, shape) in layout() {
            let (got, values) = tensors
                .remove(&name)
                .ok_or_else(|| format!("tensor `{name}` is missing"))?;
            if got != shape {
                return Err(format!(
                    "tensor `{name}` has shape {got:?}, expected {shape:?}"
                ));
            }
            params.insert(name.clone(), make_param(&shape, values, device));
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(format!("unexpected tensor `{extra}`"));
        }
        Ok(Net {
            params,
            device: device.clone(),
        })
    }

    /// `(name, shape, values)` of every parameter, in name order.
    pub(crate) fn to_host(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        self.params
            .iter()
            .map(|(name, p)| (name.clone(), p.shape(), p.to_host()))
            .collect()
    }

    pub(crate) fn device(&self) -> Device {
        self.device.clone()
    }

    /// Number of scalar parameters.
    pub(crate) fn parameter_count(&self) -> usize {
        layout()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// `[batch, 3, 64, 64]` in `[-1, 1]` to `[batch, OUTPUTS]`.
    pub(crate) fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_with_mask(x).0
    }

    /// The outputs and the eye-mask logits `[batch, 1, 32, 32]`.
    pub(crate) fn forward_with_mask(&self, x: Tensor<4>) -> (Tensor<2>, Tensor<4>) {
        let conv = |name: &str| -> (Tensor<4>, Tensor<1>) {
            let weight = self.params[&format!("{name}.weight")].conv().cloned();
            let bias = self.params[&format!("{name}.bias")].bias().cloned();
            let (Some(weight), Some(bias)) = (weight, bias) else {
                unreachable!("layout() gives every conv a 4-d weight and a bias");
            };
            (weight, bias)
        };
        let mut x = x;
        let mut mask = None;
        let mut descriptor = None;
        for (i, (name, _, _, k, stride)) in CONVS.into_iter().enumerate() {
            let (weight, bias) = conv(name);
            let options = ConvOptions::new([stride, stride], [k / 2, k / 2], [1, 1], 1);
            x = relu(normalize(conv2d(x, weight, Some(bias), options)));
            if i == MASK_AFTER {
                let (weight, bias) = conv("mask");
                let logits = conv2d(
                    x.clone(),
                    weight,
                    Some(bias),
                    ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
                );
                let [batch, c, h, w] = x.dims();
                let weights = sigmoid(logits.clone()).reshape([batch, 1, h * w]);
                let area = weights.clone().sum_dim(2).reshape([batch, 1]);
                let features = x.clone().reshape([batch, c, h * w]);
                // Sums over cells, scaled so a typical eye (a dozen cells) gives unit-sized
                // values: the mask's area is the eye-size cue, the pooled features say what the
                // masked cells look like.
                let pooled = (features * weights)
                    .sum_dim(2)
                    .reshape([batch, c])
                    .div_scalar(12.0);
                descriptor = Some(Tensor::cat(vec![pooled, area.div_scalar(12.0)], 1));
                mask = Some(logits);
            }
        }
        let (Some(mask), Some(descriptor)) = (mask, descriptor) else {
            unreachable!("MASK_AFTER indexes one of CONVS");
        };
        let [batch, c, h, w] = x.dims();
        let flat: Tensor<2> = x.reshape([batch, c * h * w]);
        let mut y = Tensor::cat(vec![flat, descriptor], 1);
        for (i, (name, _, _)) in DENSE.iter().enumerate() {
            let weight = self.params[&format!("{name}.weight")].dense().cloned();
            let bias = self.params[&format!("{name}.bias")].bias().cloned();
            let (Some(weight), Some(bias)) = (weight, bias) else {
                unreachable!("layout() gives every dense layer a 2-d weight and a bias");
            };
            y = y.matmul(weight.transpose()) + bias.unsqueeze_dim(0);
            if i + 1 < DENSE.len() {
                y = relu(y);
            }
        }
        (y, mask)
    }
}
