//! The GPU-backend tier in f16 (where the adapter has it): see `backend_parity/mod.rs`.

mod backend_parity;

/// Ignored in `cargo test`: on lavapipe (CI's adapter) Mesa compiles a second set of shaders
/// for it, 1058 s alone, and there one training-step gradient is over its tolerance
/// (docs/benchmarks.md, "wgpu on lavapipe"). `scripts/gpu-check.sh` runs it on a GPU; by
/// hand, on the build `scripts/test` made (selecting one test target with `--test` instead
/// rebuilt burn here): `cargo test --workspace --features slider-models/wgpu --
/// --include-ignored equal_flex_in_f16 --nocapture`.
#[test]
#[ignore = "minutes of shader compiling on a software Vulkan: scripts/gpu-check.sh runs it"]
fn forward_train_step_and_sampler_step_equal_flex_in_f16() {
    backend_parity::check(backend_parity::Precision::F16);
}

/// A diagnostic, seconds on flex alone: how far flex's f16 computation is from its f32 one,
/// per tensor (the floor any f16 device's error against flex's f16 sits on). `cargo test
/// --workspace --features slider-models/wgpu -- --ignored f16_against_f32 --nocapture`.
#[test]
#[ignore = "a diagnostic that prints figures"]
fn flex_f16_against_f32() {
    backend_parity::print_f16_against_f32_on_flex();
}
