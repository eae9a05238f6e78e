//! Memory-efficient attention for training: `softmax(q k^T / sqrt(d)) v` whose backward keeps
//! no score matrix between the forward and the backward.
//!
//! Under autodiff, burn runs every attention as the decomposed textbook form (matmul, softmax,
//! matmul) and keeps its exponentials and probabilities for the backward: two `heads x n_q x
//! n_k` maps per attention, alive from the forward until the backward reaches it. This op
//! instead keeps only `q`, `k` and `v`. Its forward is the backend's own fused attention
//! (cubecl's flash kernels under `autotune`; flex's tiled flash attention, except in f32,
//! below). Its backward walks the queries in tiles of at most `tile_scores` scores,
//! recomputes each tile's probabilities from `q` and `k`, and accumulates the gradients:
//!
//! ```text
//! P  = softmax(Q_t K^T s)          dP = dO_t V^T
//! dS = P * (dP - rowsum(P * dP))   dQ_t = dS K s    dK += dS^T Q_t s    dV += P^T dO_t
//! ```
//!
//! with `s = 1 / sqrt(d)`. Half-precision inputs are widened to f32 for the backward (the
//! softmax's gradient is a difference of nearly equal terms), and the gradients are cast back
//! to the inputs' dtype. One op serves every backend through burn's backend-extension
//! dispatch: flex, the cubecl runtimes (wgpu, cuda) and `Autodiff` over either.
//!
//! On flex in f32 both directions are `slider-attention`'s fused CPU kernels instead: the
//! forward also keeps each query row's log-sum-exp (`n_q` values per head), and the backward
//! recomputes the probabilities block by block from it, with every product and softmax step
//! fused, so no map larger than a 64 x 256 block exists at any time.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::{
    Backend, Dispatch, Flex, Slice, TensorMetadata, backend_extension, tensor::FloatTensor,
};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, FloatDType, Tensor};

/// Scores per backward tile when the caller has no reason to choose: 4 Mi elements, 16 MiB
/// in f32 for each of the tile's four maps (scores, probabilities, their gradient, and the
/// product).
pub const DEFAULT_TILE_SCORES: usize = 1 << 22;

/// Attention as a backend extension: the forward is the backend's fused attention, and the
/// `Autodiff` implementation registers the tiled, recomputing backward described in the
/// module's documentation.
#[backend_extension(Flex, Autodiff, Cube: cfg(any(feature = "wgpu", feature = "cuda")))]
pub trait TiledAttentionBackend: Backend {
    /// `softmax(q k^T / sqrt(d)) v` on `[batch, heads, n, d]` tensors, without a mask.
    /// `tile_scores` bounds the scores the backward holds at once.
    fn tiled_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tile_scores: usize,
    ) -> FloatTensor<Self> {
        let _ = tile_scores;
        Self::attention(q, k, v, None, None, AttentionModuleOptions::default())
    }
}

impl TiledAttentionBackend for Flex {
    fn tiled_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        _tile_scores: usize,
    ) -> FloatTensor<Self> {
        match fused::forward::<Self>(&q, &k, &v) {
            Some((out, _)) => out,
            None => <Self as burn::backend::ops::ModuleOps<Self>>::attention(
                q,
                k,
                v,
                None,
                None,
                AttentionModuleOptions::default(),
            ),
        }
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl TiledAttentionBackend for burn::backend::Cube {}

impl<B: Backend, C: CheckpointStrategy> TiledAttentionBackend for Autodiff<B, C> {
    fn tiled_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tile_scores: usize,
    ) -> FloatTensor<Self> {
        let forward =
            |q, k, v| B::attention(q, k, v, None, None, AttentionModuleOptions::default());
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (out, fused) = match fused::forward::<B>(&q, &k, &v) {
                    Some((out, lse)) => (out.clone(), Some((out, lse))),
                    None => (forward(q.clone(), k.clone(), v.clone()), None),
                };
                prep.finish(
                    AttentionState {
                        q,
                        k,
                        v,
                        fused,
                        tile_scores,
                    },
                    out,
                )
            }
            OpsKind::UnTracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                prep.finish(match fused::forward::<B>(&q, &k, &v) {
                    Some((out, _)) => out,
                    None => forward(q, k, v),
                })
            }
        }
    }
}

/// What the backward keeps of one attention: its inputs and, where the fused CPU kernel ran,
/// its output and log-sum-exp; nothing of size `n_q x n_k`.
#[derive(Clone, Debug)]
struct AttentionState<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    fused: Option<(FloatTensor<B>, FloatTensor<B>)>,
    tile_scores: usize,
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: Backend> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let grad_out = grads.consume::<B>(&ops.node);
        let AttentionState {
            q,
            k,
            v,
            fused,
            tile_scores,
        } = ops.state;
        let want = Wanted {
            q: q_node.is_some(),
            k: k_node.is_some(),
            v: v_node.is_some(),
        };
        let fused_grads = fused
            .as_ref()
            .and_then(|(out, lse)| fused::backward::<B>([&q, &k, &v, out, lse, &grad_out]));
        let (dq, dk, dv) = match fused_grads {
            Some([dq, dk, dv]) => (
                want.q.then_some(dq),
                want.k.then_some(dk),
                want.v.then_some(dv),
            ),
            None => attention_gradients::<B>(q, k, v, grad_out, tile_scores, want),
        };
        for (node, grad) in [(q_node, dq), (k_node, dk), (v_node, dv)] {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// Which input gradients a backward needs (an input that is not tracked needs none).
#[derive(Clone, Copy, Debug)]
struct Wanted {
    q: bool,
    k: bool,
    v: bool,
}

type Grads<B> = (
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
);

/// The tiled backward: the gradients of `q`, `k` and `v` given the output's gradient, each in
/// its input's dtype, computed in f32 one tile of queries at a time.
fn attention_gradients<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    grad_out: FloatTensor<B>,
    tile_scores: usize,
    want: Wanted,
) -> Grads<B> {
    let dtypes = (q.dtype(), k.dtype(), v.dtype());
    let [b, h, n_q, d] = q.shape().dims::<4>();
    let n_k = k.shape().dims::<4>()[2];
    let scale = 1.0 / (d.max(1) as f64).sqrt();
    let q = widen::<B>(q);
    let k = widen::<B>(k);
    let v_t = B::float_transpose(widen::<B>(v));
    let grad_out = widen::<B>(grad_out);
    let k_t = B::float_transpose(k.clone());
    let rows = (tile_scores / (b * h * n_k).max(1)).clamp(1, n_q.max(1));

    let mut dq_tiles = Vec::with_capacity(n_q.div_ceil(rows));
    let mut dk: Option<FloatTensor<B>> = None;
    let mut dv: Option<FloatTensor<B>> = None;
    let accumulate = |sum: &mut Option<FloatTensor<B>>, part: FloatTensor<B>| {
        *sum = Some(match sum.take() {
            Some(sum) => B::float_add(sum, part),
            None => part,
        });
    };
    let mut start = 0;
    while start < n_q {
        let end = (start + rows).min(n_q);
        let tile = |t: &FloatTensor<B>| B::float_slice(t.clone(), &query_rows(start, end));
        let (q_t, do_t) = (tile(&q), tile(&grad_out));
        let scores = B::float_mul_scalar(B::float_matmul(q_t.clone(), k_t.clone()), scale.into());
        let p = softmax_last::<B>(scores);
        if want.v {
            accumulate(
                &mut dv,
                B::float_matmul(B::float_transpose(p.clone()), do_t.clone()),
            );
        }
        if want.q || want.k {
            let dp = B::float_matmul(do_t, v_t.clone());
            let row = B::float_sum_dim(B::float_mul(p.clone(), dp.clone()), 3);
            let ds = B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, row)), scale.into());
            if want.k {
                accumulate(
                    &mut dk,
                    B::float_matmul(B::float_transpose(ds.clone()), q_t),
                );
            }
            if want.q {
                dq_tiles.push(B::float_matmul(ds, k.clone()));
            }
        }
        start = end;
    }
    let dq = (want.q && !dq_tiles.is_empty()).then(|| B::float_cat(dq_tiles, 2));
    (
        dq.map(|t| narrow_to::<B>(t, dtypes.0)),
        dk.map(|t| narrow_to::<B>(t, dtypes.1)),
        dv.map(|t| narrow_to::<B>(t, dtypes.2)),
    )
}

/// The slices of a `[batch, heads, n, d]` tensor that keep the queries `start..end`.
fn query_rows(start: usize, end: usize) -> [Slice; 4] {
    [
        Slice::from(..),
        Slice::from(..),
        Slice::new(start as isize, Some(end as isize), 1),
        Slice::from(..),
    ]
}

/// `softmax` over the last dimension, shifted by the row maximum.
fn softmax_last<B: Backend>(scores: FloatTensor<B>) -> FloatTensor<B> {
    let max = B::float_max_dim(scores.clone(), 3);
    let e = B::float_exp(B::float_sub(scores, max));
    let sum = B::float_sum_dim(e.clone(), 3);
    B::float_div(e, sum)
}

/// A half-precision tensor in f32; any other unchanged.
fn widen<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    match t.dtype() {
        DType::F16 | DType::BF16 => B::float_cast(t, FloatDType::F32),
        _ => t,
    }
}

/// A gradient computed by [`widen`]'s rule, back in its input's `dtype`.
fn narrow_to<B: Backend>(t: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    match dtype {
        DType::F16 | DType::BF16 => B::float_cast(t, FloatDType::from(dtype)),
        _ => t,
    }
}

/// `softmax(q k^T / sqrt(d)) v` on `[batch, heads, n, d]` tensors, whatever the device: the
/// backend's fused forward, and under autodiff the tiled backward of this module with at most
/// `tile_scores` scores alive at once.
pub fn tiled_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, tile_scores: usize) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as TiledAttentionBackend>::tiled_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        tile_scores,
    ))
}

/// The decomposed textbook form `softmax(q k^T / sqrt(d)) v`, op by op: what burn's autodiff
/// runs for any attention, and the reference [`tiled_attention`] is checked against.
pub fn decomposed_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let d = q.dims()[3];
    let scores = q.matmul(k.swap_dims(2, 3)) / (d.max(1) as f64).sqrt();
    burn::tensor::activation::softmax(scores, 3).matmul(v)
}

/// `slider-attention`'s kernels where the backend is flex and every tensor is f32; `None`
/// anywhere else (the caller then runs the backend-generic path).
mod fused {
    use burn::backend::flex::FlexTensor;
    use burn::backend::{Backend, tensor::FloatTensor};
    use burn::tensor::{DType, TensorData};
    use slider_attention::Dims;
    use std::any::Any;

    /// `softmax(q k^T / sqrt(d)) v` and the log-sum-exp `[batch, heads, n_q]`.
    pub(super) fn forward<B: Backend>(
        q: &FloatTensor<B>,
        k: &FloatTensor<B>,
        v: &FloatTensor<B>,
    ) -> Option<(FloatTensor<B>, FloatTensor<B>)> {
        let [q, k, v] = [flex::<B>(q)?, flex::<B>(k)?, flex::<B>(v)?];
        let (dims, [b, h, n_q, _]) = dims(q, k, v)?;
        let len = dims.lengths();
        let (mut out, mut lse) = (vec![0f32; len.out], vec![0f32; len.lse]);
        let [q, k, v] = [q, k, v].map(FlexTensor::to_contiguous);
        slider_attention::forward(
            dims,
            q.as_slice()?,
            k.as_slice()?,
            v.as_slice()?,
            &mut out,
            &mut lse,
        )
        .ok()?;
        Some((
            tensor::<B>(out, vec![b, h, n_q, dims.d_v])?,
            tensor::<B>(lse, vec![b, h, n_q])?,
        ))
    }

    /// `[dq, dk, dv]` from `[q, k, v, out, lse, d_out]` of a [`forward`].
    pub(super) fn backward<B: Backend>(
        tensors: [&FloatTensor<B>; 6],
    ) -> Option<[FloatTensor<B>; 3]> {
        let [q, k, v, out, lse, d_out] = tensors;
        let [q, k, v, out, lse, d_out] = [
            flex::<B>(q)?,
            flex::<B>(k)?,
            flex::<B>(v)?,
            flex::<B>(out)?,
            flex::<B>(lse)?,
            flex::<B>(d_out)?,
        ];
        let (dims, [b, h, n_q, d]) = dims(q, k, v)?;
        let n_k = dims.n_k;
        if d_out.layout().shape().as_slice() != [b, h, n_q, dims.d_v] {
            return None;
        }
        let len = dims.lengths();
        let (mut dq, mut dk, mut dv) = (vec![0f32; len.q], vec![0f32; len.k], vec![0f32; len.v]);
        let [q, k, v, out, lse, d_out] = [q, k, v, out, lse, d_out].map(FlexTensor::to_contiguous);
        slider_attention::backward(
            dims,
            q.as_slice()?,
            k.as_slice()?,
            v.as_slice()?,
            out.as_slice()?,
            lse.as_slice()?,
            d_out.as_slice()?,
            &mut dq,
            &mut dk,
            &mut dv,
        )
        .ok()?;
        Some([
            tensor::<B>(dq, vec![b, h, n_q, d])?,
            tensor::<B>(dk, vec![b, h, n_k, d])?,
            tensor::<B>(dv, vec![b, h, n_k, dims.d_v])?,
        ])
    }

    /// The kernel's dims for `[batch, heads, n, width]` inputs that agree, with the query's
    /// shape; `None` for anything the backend's own attention should judge.
    fn dims(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> Option<(Dims, [usize; 4])> {
        let four = |t: &FlexTensor| -> Option<[usize; 4]> {
            (t.dtype() == DType::F32)
                .then(|| t.layout().shape().as_slice().try_into().ok())
                .flatten()
        };
        let ([b, h, n_q, d], [bk, hk, n_k, dk], [bv, hv, nv, d_v]) = (four(q)?, four(k)?, four(v)?);
        let agree = (bk, hk, dk) == (b, h, d) && (bv, hv, nv) == (b, h, n_k);
        let dims = Dims {
            heads: b * h,
            n_q,
            n_k,
            d,
            d_v,
        };
        agree.then_some((dims, [b, h, n_q, d]))
    }

    /// The tensor as flex's, when `B` is flex.
    fn flex<B: Backend>(t: &FloatTensor<B>) -> Option<&FlexTensor> {
        (t as &dyn Any).downcast_ref::<FlexTensor>()
    }

    /// A flex tensor as `B`'s, when `B` is flex.
    fn tensor<B: Backend>(values: Vec<f32>, shape: Vec<usize>) -> Option<FloatTensor<B>> {
        let mut slot = Some(FlexTensor::from_data(TensorData::new(values, shape)));
        (&mut slot as &mut dyn Any)
            .downcast_mut::<Option<FloatTensor<B>>>()?
            .take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use rand::SeedableRng;

    /// Normal values from `seed`, the same whatever else runs (the device's own generator is
    /// shared by the tests running beside this one).
    fn normal(seed: u64, dims: [usize; 4], device: &Device) -> Tensor<4> {
        crate::standard_normal(
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            dims,
            device,
        )
    }

    /// The relative Frobenius error (`crate::fixtures::rel_error`) of two tensors of any dtype.
    fn rel_err(got: Tensor<4>, want: Tensor<4>) -> f64 {
        let host = |t: Tensor<4>| -> Vec<f32> {
            t.into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("a float tensor reads back as f32")
        };
        crate::fixtures::rel_error(&host(got), &host(want))
    }

    struct Run {
        out: Tensor<4>,
        grads: [Option<Tensor<4>>; 3],
    }

    /// One attention on `device`: its output, and the gradients of a fixed random weighting
    /// of it with respect to the tracked inputs.
    fn run(
        inputs: &[Tensor<4>; 3],
        tracked: [bool; 3],
        dtype: FloatDType,
        f: impl Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
    ) -> Run {
        let [q, k, v] = inputs.clone().map(|t| t.cast(dtype));
        let track = |t: Tensor<4>, on: bool| if on { t.require_grad() } else { t };
        let (q, k, v) = (
            track(q, tracked[0]),
            track(k, tracked[1]),
            track(v, tracked[2]),
        );
        let out = f(q.clone(), k.clone(), v.clone());
        let weight = normal(99, out.dims(), &out.device());
        let loss = (out.clone().cast(FloatDType::F32) * weight).sum();
        let grads = loss.backward();
        let grad = |t: &Tensor<4>, on: bool| on.then(|| t.grad(&grads)).flatten();
        Run {
            out: out.detach(),
            grads: [
                grad(&q, tracked[0]),
                grad(&k, tracked[1]),
                grad(&v, tracked[2]),
            ],
        }
    }

    fn inputs(dims: [[usize; 4]; 2], device: &Device) -> [Tensor<4>; 3] {
        let [q_dims, kv_dims] = dims;
        [
            normal(1, q_dims, device),
            normal(2, kv_dims, device),
            normal(3, kv_dims, device),
        ]
    }

    /// `(q dims, k/v dims, tile_scores)`: self- and cross-attention, one tile, several tiles
    /// with a ragged last one, and one query per tile.
    const CASES: [([usize; 4], [usize; 4], usize); 5] = [
        ([1, 1, 16, 8], [1, 1, 16, 8], DEFAULT_TILE_SCORES),
        ([2, 2, 37, 8], [2, 2, 29, 8], DEFAULT_TILE_SCORES),
        ([2, 2, 37, 8], [2, 2, 29, 8], 2 * 2 * 29 * 5),
        ([1, 3, 64, 16], [1, 3, 7, 16], 3 * 7),
        ([1, 1, 300, 4], [1, 1, 300, 4], 1000),
    ];

    #[test]
    fn forward_and_gradients_equal_the_decomposed_form() {
        let device = Device::flex().autodiff();
        for (q_dims, kv_dims, tile) in CASES {
            let inputs = inputs([q_dims, kv_dims], &device);
            let want = run(&inputs, [true; 3], FloatDType::F32, decomposed_attention);
            let got = run(&inputs, [true; 3], FloatDType::F32, |q, k, v| {
                tiled_attention(q, k, v, tile)
            });
            let err = rel_err(got.out, want.out);
            assert!(
                err < 1e-5,
                "{q_dims:?} x {kv_dims:?}, tile {tile}: out {err}"
            );
            for (name, (g, w)) in ["q", "k", "v"]
                .iter()
                .zip(got.grads.into_iter().zip(want.grads))
            {
                let (Some(g), Some(w)) = (g, w) else {
                    panic!("{name}: a gradient is missing");
                };
                let err = rel_err(g, w);
                assert!(
                    err < 1e-5,
                    "{q_dims:?} x {kv_dims:?}, tile {tile}: d{name} {err}"
                );
            }
        }
    }

    #[test]
    fn untracked_inputs_get_no_gradient_and_the_rest_are_unchanged() {
        let device = Device::flex().autodiff();
        let (q_dims, kv_dims, tile) = CASES[2];
        let inputs = inputs([q_dims, kv_dims], &device);
        for tracked in [
            [true, false, false],
            [false, true, false],
            [false, false, true],
        ] {
            let want = run(&inputs, tracked, FloatDType::F32, decomposed_attention);
            let got = run(&inputs, tracked, FloatDType::F32, |q, k, v| {
                tiled_attention(q, k, v, tile)
            });
            for (i, (g, w)) in got.grads.into_iter().zip(want.grads).enumerate() {
                match (g, w) {
                    (None, None) => assert!(!tracked[i]),
                    (Some(g), Some(w)) => assert!(rel_err(g, w) < 1e-5, "input {i}"),
                    _ => panic!("input {i}: gradient presence differs"),
                }
            }
        }
    }

    #[test]
    fn half_precision_inputs_get_gradients_in_their_dtype_close_to_f32() {
        let device = Device::flex().autodiff();
        let (q_dims, kv_dims, tile) = CASES[2];
        let inputs = inputs([q_dims, kv_dims], &device);
        let want = run(&inputs, [true; 3], FloatDType::F32, decomposed_attention);
        for dtype in [FloatDType::F16, FloatDType::BF16] {
            let got = run(&inputs, [true; 3], dtype, |q, k, v| {
                tiled_attention(q, k, v, tile)
            });
            assert_eq!(got.out.dtype(), DType::from(dtype));
            // Rounding the inputs alone costs about 2^-11 (f16) and 2^-8 (bf16) relative.
            let tol = if dtype == FloatDType::F16 { 5e-3 } else { 4e-2 };
            let err = rel_err(got.out, want.out.clone());
            assert!(err < tol, "{dtype:?}: out {err}");
            for (i, (g, w)) in got.grads.into_iter().zip(want.grads.clone()).enumerate() {
                let (Some(g), Some(w)) = (g, w) else {
                    panic!("{dtype:?}: a gradient is missing");
                };
                assert_eq!(g.dtype(), DType::from(dtype));
                let err = rel_err(g, w);
                assert!(err < tol, "{dtype:?}: gradient {i} {err}");
            }
        }
    }

    #[test]
    fn on_flex_in_f32_both_directions_are_the_fused_kernels() {
        let device = Device::flex().autodiff();
        let (q_dims, kv_dims, tile) = CASES[1];
        let inputs = inputs([q_dims, kv_dims], &device);
        let got = run(&inputs, [true; 3], FloatDType::F32, |q, k, v| {
            tiled_attention(q, k, v, tile)
        });
        let host = |t: &Tensor<4>| t.to_data().try_to_vec::<f32>().expect("f32");
        let [q, k, v] = inputs.each_ref().map(host);
        let dims = slider_attention::Dims {
            heads: q_dims[0] * q_dims[1],
            n_q: q_dims[2],
            n_k: kv_dims[2],
            d: q_dims[3],
            d_v: kv_dims[3],
        };
        let len = dims.lengths();
        let (mut out, mut lse) = (vec![0.0; len.out], vec![0.0; len.lse]);
        slider_attention::forward(dims, &q, &k, &v, &mut out, &mut lse).expect("dims fit");
        assert_eq!(
            host(&got.out),
            out,
            "the forward is the kernel's, bit for bit"
        );
        let weight = host(&normal(99, got.out.dims(), &device));
        let mut grads = [q.clone(), k.clone(), v.clone()].map(|t| vec![0.0; t.len()]);
        let [dq, dk, dv] = &mut grads;
        slider_attention::backward(dims, &q, &k, &v, &out, &lse, &weight, dq, dk, dv)
            .expect("dims fit");
        for (got, want) in got.grads.iter().zip(&grads) {
            let got = host(got.as_ref().expect("tracked"));
            assert_eq!(&got, want, "the gradients are the kernel's, bit for bit");
        }
    }

    #[test]
    fn without_autodiff_it_equals_the_decomposed_form() {
        let device = Device::flex();
        let (q_dims, kv_dims, tile) = CASES[1];
        let [q, k, v] = inputs([q_dims, kv_dims], &device);
        let want = decomposed_attention(q.clone(), k.clone(), v.clone());
        let got = tiled_attention(q, k, v, tile);
        assert!(rel_err(got, want) < 1e-5);
    }
}
