//! The GPU-backend tier in f16 (where the adapter has it): see `backend_parity/mod.rs`.

mod backend_parity;

#[test]
fn forward_train_step_and_sampler_step_equal_flex_in_f16() {
    backend_parity::check(backend_parity::Precision::F16);
}
