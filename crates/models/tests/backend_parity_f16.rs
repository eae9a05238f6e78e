//! The GPU-backend tier in f16 (where the adapter has it): see `backend_parity/mod.rs`.

mod backend_parity;

/// Ignored in `cargo test`: on lavapipe (CI's adapter) Mesa compiles a second set of shaders
/// for it, and it had not finished after 20 minutes (docs/benchmarks.md, "wgpu on
/// lavapipe"). `scripts/gpu-check.sh` runs it on a GPU; by hand:
/// `cargo test --workspace --features slider-models/wgpu --test backend_parity_f16 --
/// --include-ignored --nocapture`.
#[test]
#[ignore = "minutes of shader compiling on a software Vulkan: scripts/gpu-check.sh runs it"]
fn forward_train_step_and_sampler_step_equal_flex_in_f16() {
    backend_parity::check(backend_parity::Precision::F16);
}
