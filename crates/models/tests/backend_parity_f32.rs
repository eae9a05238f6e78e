//! The GPU-backend tier in f32: see `backend_parity/mod.rs`. Its own test binary, so the two
//! precisions run one after the other instead of sharing a (software) device's cores.

mod backend_parity;

#[test]
fn forward_train_step_and_sampler_step_equal_flex_in_f32() {
    backend_parity::check(backend_parity::Precision::F32);
}
