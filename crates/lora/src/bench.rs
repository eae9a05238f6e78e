//! The LoRA benchmarks, by the fast path against the dense path kohya takes (full
//! `out x in` deltas, full SVD, f32) for the same work:
//! - `slider-run bench lora`: the method's merge chain on synthetic SDXL-layout LoRAs (722
//!   modules, rank 4, alpha 1);
//! - `slider-run bench lora-flux`: a FLUX.1 pair merge (one input in kohya names, one in
//!   diffusers / ai-toolkit names, converted before merging) and an `sv_fro` resize of the
//!   result (314 layers, rank 16).
//!
//! The dense path is timed on a fixed sample, one module per distinct (kind, shape) class
//! (8 classes in SDXL), and extrapolated by the number of modules in each class: every
//! module of a class does identical dense work. The fast path is timed on all modules.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::error::LoraError;
use crate::module::{Module, ModuleKind};
use crate::synth::{self, Layout};
use crate::transformer::Naming;
use crate::{DynamicMethod, Lora, Precision, ResizeOptions, SvdMergeOptions, dense};

/// One operation of the chain.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub operation: String,
    /// Fast path, all modules.
    pub fast: Duration,
    /// Dense path, extrapolated from `dense_modules_timed` modules to all of them.
    pub dense: Duration,
    pub dense_modules_timed: usize,
    pub modules: usize,
}

impl BenchRow {
    pub fn ratio(&self) -> f64 {
        self.dense.as_secs_f64() / self.fast.as_secs_f64().max(1e-12)
    }
}

/// Modules grouped by (kind, out, in): the first module name of each class and its size.
fn classes(lora: &Lora) -> Vec<(String, usize)> {
    let mut by_shape: BTreeMap<(ModuleKind, usize, usize), (String, usize)> = BTreeMap::new();
    for (name, m) in &lora.modules {
        let e = by_shape
            .entry((m.kind, m.out_dim, m.in_dim))
            .or_insert_with(|| (name.clone(), 0));
        e.1 += 1;
    }
    by_shape.into_values().collect()
}

fn dense_merge_time(
    run: bool,
    inputs: &[&Lora],
    ratios: &[f64],
    opts: &SvdMergeOptions,
) -> Result<(Duration, usize), LoraError> {
    let mut total = Duration::ZERO;
    if !run {
        return Ok((total, 0));
    }
    let sample = classes(inputs[0]);
    for (name, count) in &sample {
        let parts: Vec<(&Module, f64)> = inputs
            .iter()
            .zip(ratios)
            .filter_map(|(l, &r)| l.modules.get(name).map(|m| (m, r)))
            .collect();
        let first = parts[0].0;
        let wanted = if first.kind.is_spatial_conv() {
            opts.new_conv_rank
        } else {
            opts.new_rank
        };
        let k = wanted.min(first.in_dim).min(first.out_dim);
        let start = Instant::now();
        dense::svd_merge_module_f32(&parts, k, opts.clamp_quantile).ok_or_else(|| {
            LoraError::SvdFailed {
                module: name.clone(),
            }
        })?;
        total += start.elapsed() * (*count as u32);
    }
    Ok((total, sample.len()))
}

fn dense_resize_time(
    run: bool,
    input: &Lora,
    opts: &ResizeOptions,
) -> Result<(Duration, usize), LoraError> {
    let mut total = Duration::ZERO;
    if !run {
        return Ok((total, 0));
    }
    let sample = classes(input);
    for (name, count) in &sample {
        let m = &input.modules[name];
        let max_rank = if m.kind.is_conv() {
            opts.new_conv_rank
        } else {
            opts.new_rank
        };
        let start = Instant::now();
        dense::resize_module_f32(m, max_rank, opts.dynamic).ok_or_else(|| {
            LoraError::SvdFailed {
                module: name.clone(),
            }
        })?;
        total += start.elapsed() * (*count as u32);
    }
    Ok((total, sample.len()))
}

/// Runs the chain; `progress` is told which step starts.
pub fn run_lora_bench(progress: &mut dyn FnMut(&str)) -> Result<Vec<BenchRow>, LoraError> {
    run_lora_bench_with(progress, true)
}

/// [`run_lora_bench`], with the dense path timed (`with_dense`) or skipped (its figures zero):
/// the fast path alone takes seconds, the dense sample more than a minute.
pub fn run_lora_bench_with(
    progress: &mut dyn FnMut(&str),
    with_dense: bool,
) -> Result<Vec<BenchRow>, LoraError> {
    progress("generating 6 synthetic SDXL LoRAs");
    let inputs = sdxl_bench_inputs();
    run_lora_chain(&inputs, progress, with_dense)
}

/// The six inputs of [`run_lora_bench`]: `(big, small)` for the front, 45deg and side
/// angles (SDXL layout, rank 4, alpha 1, fixed seeds).
pub fn sdxl_bench_inputs() -> Vec<(Lora, Lora)> {
    (0..ANGLES.len() as u64)
        .map(|i| {
            (
                synth::random_lora(Layout::Sdxl, 4, 1.0, 100 + 2 * i),
                synth::random_lora(Layout::Sdxl, 4, 1.0, 101 + 2 * i),
            )
        })
        .collect()
}

const ANGLES: [&str; 3] = ["front", "45deg", "side"];

/// The chain of [`run_lora_bench`] on given inputs (one `(big, small)` pair per angle, see
/// [`sdxl_bench_inputs`]), so that repeated runs can share one generation.
pub fn run_lora_chain(
    inputs: &[(Lora, Lora)],
    progress: &mut dyn FnMut(&str),
    with_dense: bool,
) -> Result<Vec<BenchRow>, LoraError> {
    let angles = ANGLES;
    let Some(modules) = inputs.first().map(|(big, _)| big.modules.len()) else {
        return Err(LoraError::InvalidArgument("no bench inputs".into()));
    };
    let pair_opts = SvdMergeOptions {
        new_rank: 8,
        new_conv_rank: 8,
        clamp_quantile: Some(0.99),
    };
    let mut rows = Vec::new();
    let mut sliders = Vec::new();
    for (angle, (big, small)) in angles.iter().zip(inputs) {
        let op = format!("svd-merge {angle}: +1.5 big -1.5 small, rank 8");
        progress(&op);
        let start = Instant::now();
        let slider = crate::svd_merge(&[big, small], &[1.5, -1.5], &pair_opts)?;
        let fast = start.elapsed();
        let (dense, timed) = dense_merge_time(with_dense, &[big, small], &[1.5, -1.5], &pair_opts)?;
        rows.push(BenchRow {
            operation: op,
            fast,
            dense,
            dense_modules_timed: timed,
            modules,
        });
        sliders.push(slider);
    }
    let op = "svd-merge 3 angles, rank 8".to_string();
    progress(&op);
    let refs: Vec<&Lora> = sliders.iter().collect();
    let start = Instant::now();
    let slider = crate::svd_merge(&refs, &[1.0, 1.0, 1.0], &pair_opts)?;
    let fast = start.elapsed();
    let (dense, timed) = dense_merge_time(with_dense, &refs, &[1.0, 1.0, 1.0], &pair_opts)?;
    rows.push(BenchRow {
        operation: op,
        fast,
        dense,
        dense_modules_timed: timed,
        modules,
    });

    let op = "resize sv_fro 0.75, max rank 4, to fp16".to_string();
    progress(&op);
    let resize_opts = ResizeOptions {
        new_rank: 4,
        new_conv_rank: 4,
        dynamic: Some(DynamicMethod::SvFro(0.75)),
    };
    let start = Instant::now();
    let (resized, _) = crate::resize(&slider, &resize_opts)?;
    let resize_time = start.elapsed();
    let start = Instant::now();
    let bytes = resized.to_bytes(Precision::F16);
    let serialise = start.elapsed();
    tracing::debug!(bytes = bytes.len(), "fp16 file");
    let (dense, timed) = dense_resize_time(with_dense, &slider, &resize_opts)?;
    rows.push(BenchRow {
        operation: op,
        fast: resize_time + serialise,
        dense: dense + serialise,
        dense_modules_timed: timed,
        modules,
    });
    let total = BenchRow {
        operation: "whole chain".into(),
        fast: rows.iter().map(|r| r.fast).sum(),
        dense: rows.iter().map(|r| r.dense).sum(),
        dense_modules_timed: rows.iter().map(|r| r.dense_modules_timed).sum(),
        modules: modules * rows.len(),
    };
    rows.push(total);
    Ok(rows)
}

/// The FLUX.1 benchmark: `+1.5 big -1.5 small` svd-merged to rank 16 (clamp 0.99) with
/// `small` in diffusers names (the merge converts it; the conversion is timed with the
/// merge), then an `sv_fro 0.75` resize (max rank 16) written as fp16. Inputs: every layer
/// of FLUX.1 (314) at `rank` 16, alpha 16.
pub fn run_flux_bench(progress: &mut dyn FnMut(&str)) -> Result<Vec<BenchRow>, LoraError> {
    run_flux_bench_with(progress, true)
}

/// [`run_flux_bench`], with the dense path timed (`with_dense`) or skipped (its figures zero).
pub fn run_flux_bench_with(
    progress: &mut dyn FnMut(&str),
    with_dense: bool,
) -> Result<Vec<BenchRow>, LoraError> {
    progress("generating 2 synthetic FLUX.1 LoRAs (314 layers, rank 16)");
    let inputs = flux_bench_inputs()?;
    run_flux_pair(&inputs, progress, with_dense)
}

/// Rank (and alpha) of the FLUX.1 bench inputs.
const FLUX_RANK: usize = 16;

/// The inputs of [`run_flux_bench`].
pub struct FluxBenchInputs {
    /// Every FLUX.1 layer in kohya names, rank 16, alpha 16.
    pub big: Lora,
    /// Another such LoRA in diffusers / ai-toolkit names.
    pub small: Lora,
    /// `small` in kohya names (what the dense route is timed on).
    pub small_kohya: Lora,
}

/// Generates the inputs of [`run_flux_bench`] (fixed seeds).
pub fn flux_bench_inputs() -> Result<FluxBenchInputs, LoraError> {
    let rank = FLUX_RANK;
    let big = synth::random_lora(Layout::Flux, rank, rank as f32, 300);
    let small_kohya = synth::random_lora(Layout::Flux, rank, rank as f32, 301);
    let (small, _) = crate::convert(&small_kohya, Naming::Diffusers)?;
    Ok(FluxBenchInputs {
        big,
        small,
        small_kohya,
    })
}

/// The two steps of [`run_flux_bench`] on given inputs, so that repeated runs can share one
/// generation.
pub fn run_flux_pair(
    inputs: &FluxBenchInputs,
    progress: &mut dyn FnMut(&str),
    with_dense: bool,
) -> Result<Vec<BenchRow>, LoraError> {
    let rank = FLUX_RANK;
    let FluxBenchInputs {
        big,
        small,
        small_kohya,
    } = inputs;
    let modules = big.modules.len();
    let merge_opts = SvdMergeOptions {
        new_rank: rank,
        new_conv_rank: rank,
        clamp_quantile: Some(0.99),
    };
    let mut rows = Vec::new();
    let op = "svd-merge +1.5 kohya -1.5 diffusers, rank 16".to_string();
    progress(&op);
    let start = Instant::now();
    let slider = crate::svd_merge(&[big, small], &[1.5, -1.5], &merge_opts)?;
    let fast = start.elapsed();
    // The dense route does the same sums and SVDs on the layers in one naming.
    let (dense, timed) =
        dense_merge_time(with_dense, &[big, small_kohya], &[1.5, -1.5], &merge_opts)?;
    rows.push(BenchRow {
        operation: op,
        fast,
        dense,
        dense_modules_timed: timed,
        modules,
    });
    let op = "resize sv_fro 0.75, max rank 16, to fp16".to_string();
    progress(&op);
    let resize_opts = ResizeOptions {
        new_rank: rank,
        new_conv_rank: rank,
        dynamic: Some(DynamicMethod::SvFro(0.75)),
    };
    let start = Instant::now();
    let (resized, _) = crate::resize(&slider, &resize_opts)?;
    let resize_time = start.elapsed();
    let start = Instant::now();
    let bytes = resized.to_bytes(Precision::F16);
    let serialise = start.elapsed();
    tracing::debug!(bytes = bytes.len(), "fp16 file");
    let (dense, timed) = dense_resize_time(with_dense, &slider, &resize_opts)?;
    rows.push(BenchRow {
        operation: op,
        fast: resize_time + serialise,
        dense: dense + serialise,
        dense_modules_timed: timed,
        modules,
    });
    rows.push(BenchRow {
        operation: "pair merge + resize".into(),
        fast: rows.iter().map(|r| r.fast).sum(),
        dense: rows.iter().map(|r| r.dense).sum(),
        dense_modules_timed: rows.iter().map(|r| r.dense_modules_timed).sum(),
        modules: modules * rows.len(),
    });
    Ok(rows)
}
