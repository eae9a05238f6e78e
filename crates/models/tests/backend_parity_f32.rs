//! The GPU-backend tier in f32: see `backend_parity/mod.rs`. Its own test binary (process),
//! because the f16 tier sets the device's default dtype, which is once per process.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod backend_parity;

#[test]
fn forward_train_step_and_sampler_step_equal_flex_in_f32() {
    backend_parity::check(backend_parity::Precision::F32);
}
