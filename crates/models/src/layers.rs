//! Building blocks shared by the UNet, the VAE and the text encoders: layer constructors with
//! PyTorch's defaults, attention that never holds more than a bounded score matrix, the
//! sinusoidal timestep embedding and nearest-neighbour upsampling.

use crate::attention::{DEFAULT_TILE_SCORES, tiled_attention};
use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::module::attention as fused_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, FloatDType, Tensor};

/// `nn.Linear(d_in, d_out, bias)`.
pub fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

/// `nn.Conv2d(c_in, c_out, k, stride, padding = k / 2)`.
pub fn conv2d(c_in: usize, c_out: usize, k: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
        .init(device)
}

/// GroupNorm's group count in every released SD part (diffusers' `norm_num_groups` default);
/// other models say theirs in their configuration.
pub const GROUP_NORM_GROUPS: usize = 32;

/// `nn.GroupNorm(groups, channels, eps)`. Callers validate `channels % groups == 0` first
/// (burn asserts it).
pub fn group_norm(groups: usize, channels: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// `nn.LayerNorm(d, eps=1e-5)`.
pub fn layer_norm(d: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(d).with_epsilon(1e-5).init(device)
}

/// A norm computed in f32 whatever its input's dtype: a half-precision model keeps its norms'
/// weights in f32 (see [`crate::weights::fill_as`]) and accumulates their statistics there;
/// the result goes back to the input's dtype. For an f32 input both casts are no-ops.
pub trait NormF32<const D: usize> {
    /// The norm of `x`, computed in f32, in `x`'s dtype.
    fn forward_f32(&self, x: Tensor<D>) -> Tensor<D>;
}

impl<const D: usize> NormF32<D> for GroupNorm {
    fn forward_f32(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        self.forward(x.cast(FloatDType::F32)).cast(dtype)
    }
}

impl<const D: usize> NormF32<D> for LayerNorm {
    fn forward_f32(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        self.forward(x.cast(FloatDType::F32)).cast(dtype)
    }
}

/// The dtype a module computes in: that of its weight `w` (f32, or the half dtype a
/// checkpoint was loaded in). Inputs are cast to it where they enter a model.
pub fn compute_dtype<const D: usize>(w: &burn::module::Param<Tensor<D>>) -> DType {
    w.val().dtype()
}

/// A layer without parameters that keeps the index of a PyTorch `Sequential` slot
/// (activation or dropout) so the layers after it keep their checkpoint index.
#[derive(Module, Debug, Default)]
pub struct Slot;

/// Upper bound on the elements of one attention score block (`heads x queries x keys`);
/// queries are processed in chunks so a 1024 px SDXL self-attention stays bounded.
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// Multi-head scaled dot-product attention on `[batch, seq, heads * head_dim]` projections.
/// `causal` masks keys after the query (CLIP). Queries are split into chunks when the score
/// matrix would exceed [`MAX_SCORE_ELEMENTS`]; backends with a fused kernel (flex's flash
/// attention) never materialise it at all. Without a mask it is [`tiled_attention`], whose
/// backward keeps no score matrix; the causal form (the text encoder, trained only by
/// `slider-run pretrain`) is burn's attention.
pub fn multi_head_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    causal: bool,
) -> Tensor<3> {
    attention_within(q, k, v, heads, causal, MAX_SCORE_ELEMENTS)
}

fn attention_within(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    causal: bool,
    max_score_elements: usize,
) -> Tensor<3> {
    let [b, n_q, inner] = q.dims();
    let n_k = k.dims()[1];
    let d = inner / heads;
    let split = |t: Tensor<3>, n: usize| t.reshape([b, n, heads, d]).swap_dims(1, 2);
    let (q, k, v) = (split(q, n_q), split(k, n_k), split(v, n_k));
    let options = AttentionModuleOptions {
        is_causal: causal,
        ..Default::default()
    };
    let per_query = (b * heads * n_k).max(1);
    let chunk = (max_score_elements / per_query).max(1);
    let out = if causal {
        fused_attention(q, k, v, None::<Tensor<4, Bool>>, None, options)
    } else if n_q <= chunk {
        tiled_attention(q, k, v, DEFAULT_TILE_SCORES)
    } else {
        let mut parts = Vec::with_capacity(n_q.div_ceil(chunk));
        let mut start = 0;
        while start < n_q {
            let len = chunk.min(n_q - start);
            parts.push(tiled_attention(
                q.clone().narrow(2, start, len),
                k.clone(),
                v.clone(),
                DEFAULT_TILE_SCORES,
            ));
            start += len;
        }
        Tensor::cat(parts, 2)
    };
    out.swap_dims(1, 2).reshape([b, n_q, inner])
}

/// Sinusoidal embedding of `[batch]` timesteps as the LDM code writes it: `[cos, sin]` halves,
/// frequencies `exp(-ln(10000) * i / half)`.
pub fn timestep_embedding(timesteps: Tensor<1>, dim: usize) -> Tensor<2> {
    let half = dim / 2;
    let device = timesteps.device();
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::<1>::from_floats(freqs.as_slice(), &device).unsqueeze_dim::<2>(0);
    let args = timesteps.unsqueeze_dim::<2>(1) * freqs;
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
}

/// Nearest-neighbour 2x upsampling of `[b, c, h, w]`.
pub fn upsample_nearest_2x(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}

/// `[b, c, h, w]` -> `[b, h * w, c]`.
pub fn to_tokens(x: Tensor<4>) -> Tensor<3> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h * w]).swap_dims(1, 2)
}

/// `[b, h * w, c]` -> `[b, c, h, w]`.
pub fn from_tokens(x: Tensor<3>, h: usize, w: usize) -> Tensor<4> {
    let [b, _, c] = x.dims();
    x.swap_dims(1, 2).reshape([b, c, h, w])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
        let [b, n_q, inner] = q.dims();
        let n_k = k.dims()[1];
        let d = inner / heads;
        let q = q.reshape([b, n_q, heads, d]).swap_dims(1, 2);
        let k = k.reshape([b, n_k, heads, d]).swap_dims(1, 2);
        let v = v.reshape([b, n_k, heads, d]).swap_dims(1, 2);
        crate::attention::decomposed_attention(q, k, v)
            .swap_dims(1, 2)
            .reshape([b, n_q, inner])
    }

    #[test]
    fn attention_equals_the_textbook_formula() {
        let device = Device::flex();
        let dist = burn::tensor::Distribution::Normal(0.0, 1.0);
        // (queries, keys, heads, score budget): budgets below n_q * n_k force query chunks.
        for (n_q, n_k, heads, budget) in [
            (7, 7, 1, MAX_SCORE_ELEMENTS),
            (64, 5, 2, MAX_SCORE_ELEMENTS),
            (600, 600, 4, MAX_SCORE_ELEMENTS),
            (100, 30, 2, 2 * 2 * 30 * 7),
            (33, 33, 1, 1),
        ] {
            let q = Tensor::<3>::random([2, n_q, 8 * heads], dist, &device);
            let k = Tensor::<3>::random([2, n_k, 8 * heads], dist, &device);
            let v = Tensor::<3>::random([2, n_k, 8 * heads], dist, &device);
            let want = naive(q.clone(), k.clone(), v.clone(), heads);
            let got = attention_within(q, k, v, heads, false, budget);
            let err = (got - want.clone())
                .powi_scalar(2)
                .sum()
                .into_scalar::<f32>()
                .sqrt()
                / want.powi_scalar(2).sum().into_scalar::<f32>().sqrt();
            assert!(err < 1e-5, "n_q {n_q} n_k {n_k}: rel err {err}");
        }
    }

    #[test]
    fn upsampling_repeats_each_pixel() {
        let device = Device::flex();
        let x = Tensor::<4>::from_floats([[[[1.0, 2.0], [3.0, 4.0]]]], &device);
        let y = upsample_nearest_2x(x)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let want = [
            1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.,
        ];
        assert_eq!(y, want);
    }
}
