//! Benchmark: the single operations of a UNet forward at the tiny UNet's first level (64
//! channels, 64x64 latents, 4096 tokens), to find where time goes. PyTorch figures for the
//! same shapes are in docs/benchmarks.md.
//!
//! `cargo run -p slider-models --example ops_probe`

use slider_models::burn::nn::GroupNormConfig;
use slider_models::burn::tensor::{Distribution, Tensor};
use slider_models::layers::{conv2d, multi_head_attention};
use std::time::Instant;
fn t<F: FnMut() -> f32>(name: &str, mut f: F) {
    f();
    let s = Instant::now();
    for _ in 0..5 {
        assert!(f().is_finite());
    }
    println!("{name}: {:.1} ms", s.elapsed().as_secs_f64() * 200.0);
}
fn main() {
    let d = slider_models::open_device("cpu").unwrap();
    let n = Distribution::Normal(0.0, 1.0);
    let x = Tensor::<4>::random([1, 64, 64, 64], n, &d);
    let c = conv2d(64, 64, 3, 1, &d);
    t("conv 64->64 3x3 64x64", || {
        c.forward(x.clone()).sum().into_scalar::<f32>()
    });
    let g = GroupNormConfig::new(32, 64).init(&d);
    t("groupnorm 64ch 64x64", || {
        g.forward(x.clone()).sum().into_scalar::<f32>()
    });
    t("silu", || {
        slider_models::burn::tensor::activation::silu(x.clone())
            .sum()
            .into_scalar::<f32>()
    });
    let q = Tensor::<3>::random([1, 4096, 64], n, &d);
    t("attention 4096x4096 4 heads d16", || {
        multi_head_attention(q.clone(), q.clone(), q.clone(), 4, false)
            .sum()
            .into_scalar::<f32>()
    });
    for ch in [256usize, 1024, 4096] {
        t(&format!("naive chunk {ch}"), || {
            naive(q.clone(), q.clone(), q.clone(), 4, ch)
                .sum()
                .into_scalar::<f32>()
        });
    }
    let l = slider_models::layers::linear(64, 512, true, &d);
    t("linear 4096x64->512", || {
        l.forward(q.clone()).sum().into_scalar::<f32>()
    });
}
/// Attention from matmuls and softmax, queries in chunks: the unfused alternative.
fn naive(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, chunk: usize) -> Tensor<3> {
    let [b, n_q, inner] = q.dims();
    let n_k = k.dims()[1];
    let d = inner / heads;
    let q = q.reshape([b, n_q, heads, d]).swap_dims(1, 2) * (1.0 / (d as f64).sqrt());
    let kt = k
        .reshape([b, n_k, heads, d])
        .swap_dims(1, 2)
        .swap_dims(2, 3);
    let v = v.reshape([b, n_k, heads, d]).swap_dims(1, 2);
    let mut parts = vec![];
    let mut s = 0;
    while s < n_q {
        let len = chunk.min(n_q - s);
        let sc = q.clone().narrow(2, s, len).matmul(kt.clone());
        let p = slider_models::burn::tensor::activation::softmax(sc, 3);
        parts.push(p.matmul(v.clone()));
        s += len;
    }
    Tensor::cat(parts, 2)
        .swap_dims(1, 2)
        .reshape([b, n_q, inner])
}
