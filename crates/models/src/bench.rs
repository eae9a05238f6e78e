//! Measurement helpers shared by the benchmarks (`slider-run bench torch`, the `unet_forward`
//! and `train_steps` examples): seconds per UNet forward and per sampler step after warm-up
//! runs, medians, the process's peak RSS, and the random base checkpoints they run on.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};

use crate::checkpoint::{CheckpointError, ModelSpec, StoreDtype, write_random_checkpoint};
use crate::clip::TextConfig;
use crate::sample::{Generator, SampleError, SampleJob};
use crate::unet::UNetConfig;

/// How many runs a measurement makes: `warmup` untimed, then `repeat` timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runs {
    pub warmup: usize,
    pub repeat: usize,
}

/// The median of `values` (the upper one of the middle two for an even count); `None` when
/// empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

/// This process's peak resident set size in MiB (`VmHWM` of `/proc/self/status`); `None` where
/// the kernel does not say (not Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Parameters of the UNet `spec` describes, counted from its checkpoint shapes.
pub fn unet_parameters(spec: &ModelSpec) -> usize {
    spec.expected_keys()
        .iter()
        .filter(|(part, _, _)| *part == "unet")
        .map(|(_, _, shape)| shape.iter().product::<usize>())
        .sum()
}

/// `spec` with a one-layer CLIP-L of the same width: the text encoder runs once per training
/// or sampling run, so its depth changes no per-step time, and the checkpoint is written and
/// loaded faster.
pub fn with_one_layer_text(spec: ModelSpec) -> ModelSpec {
    ModelSpec {
        text_l: spec.text_l.map(|t| TextConfig { layers: 1, ..t }),
        ..spec
    }
}

/// `dir/name.safetensors`: a checkpoint of `spec` with random f16 weights (seed 1), written
/// unless already there (the writer is atomic, so a present file is complete).
pub fn random_base(dir: &Path, name: &str, spec: &ModelSpec) -> Result<PathBuf, CheckpointError> {
    let path = dir.join(format!("{name}.safetensors"));
    if !path.is_file() {
        write_random_checkpoint(&path, spec, StoreDtype::F16, 1)?;
    }
    Ok(path)
}

/// Seconds of each timed forward of a randomly initialised `config` UNet (batch 1,
/// `latent` x `latent` latents, a 77-token context, timestep 500), ending when the output's
/// sum is on the host. The first warm-up run also materialises the lazily initialised weights.
pub fn unet_forward_seconds(
    config: &UNetConfig,
    latent: usize,
    runs: Runs,
    device: &Device,
    mut each: impl FnMut(usize, f64),
) -> Vec<f64> {
    let unet = config.init(device);
    let dist = Distribution::Normal(0.0, 1.0);
    let sample = Tensor::<4>::random([1, config.in_channels, latent, latent], dist, device);
    let context = Tensor::<3>::random([1, 77, config.context_dim], dist, device);
    let y = config
        .adm_in_channels
        .map(|adm| Tensor::<2>::random([1, adm], dist, device));
    let timestep = Tensor::<1>::from_floats([500.0], device);
    let mut times = Vec::new();
    for i in 0..runs.warmup + runs.repeat {
        let t = Instant::now();
        let out = unet.forward(sample.clone(), timestep.clone(), context.clone(), y.clone());
        let _checksum = out.sum().into_scalar::<f32>();
        let secs = t.elapsed().as_secs_f64();
        each(i, secs);
        if i >= runs.warmup {
            times.push(secs);
        }
    }
    times
}

/// Seconds of each timed sampler step of `job` on `generator` (no LoRA): the time between
/// successive step reports, which is one step of the loop (model input, the UNet call, with
/// guidance its batch of 2, the scheduler's update). `job.steps` is set to
/// `max(warmup, 1) + repeat`; the first `max(warmup, 1)` steps are untimed (the first also
/// carries the text encoding and the initial noise).
pub fn sampler_step_seconds(
    generator: &Generator,
    job: &SampleJob,
    runs: Runs,
    mut each: impl FnMut(usize, f64),
) -> Result<Vec<f64>, SampleError> {
    let untimed = runs.warmup.max(1);
    let job = SampleJob {
        steps: untimed + runs.repeat,
        ..job.clone()
    };
    let mut last = Instant::now();
    let mut times = Vec::new();
    generator.generate_with_progress(&job, &[], |step, _| {
        let secs = last.elapsed().as_secs_f64();
        last = Instant::now();
        each(step - 1, secs);
        if step > untimed {
            times.push(secs);
        }
    })?;
    Ok(times)
}

/// Seconds of each timed attention forward and backward under autodiff: `q` of `q_dims`, `k`
/// and `v` of `kv_dims` (`[batch, heads, tokens, head_dim]`), all three tracked, the loss a
/// fixed random weighting of the output; a run ends when the three gradients' sum is on the
/// host. `tiled` picks the UNet's memory-efficient op ([`crate::attention::tiled_attention`]),
/// otherwise burn's decomposed form.
pub fn attention_seconds(
    q_dims: [usize; 4],
    kv_dims: [usize; 4],
    tiled: bool,
    runs: Runs,
    device: &Device,
    mut each: impl FnMut(usize, f64),
) -> Vec<f64> {
    use crate::attention::{DEFAULT_TILE_SCORES, decomposed_attention, tiled_attention};
    let device = device.clone().autodiff();
    let dist = Distribution::Normal(0.0, 1.0);
    let q = Tensor::<4>::random(q_dims, dist, &device);
    let k = Tensor::<4>::random(kv_dims, dist, &device);
    let v = Tensor::<4>::random(kv_dims, dist, &device);
    let weight = Tensor::<4>::random(q_dims, dist, &device);
    let mut times = Vec::new();
    for i in 0..runs.warmup + runs.repeat {
        let (q, k, v) = (
            q.clone().require_grad(),
            k.clone().require_grad(),
            v.clone().require_grad(),
        );
        let t = Instant::now();
        let out = if tiled {
            tiled_attention(q.clone(), k.clone(), v.clone(), DEFAULT_TILE_SCORES)
        } else {
            decomposed_attention(q.clone(), k.clone(), v.clone())
        };
        let grads = (out * weight.clone()).sum().backward();
        let checksum: f32 = [&q, &k, &v]
            .iter()
            .filter_map(|t| t.grad(&grads))
            .map(|g| g.sum().into_scalar::<f32>())
            .sum();
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(checksum);
        each(i, secs);
        if i >= runs.warmup {
            times.push(secs);
        }
    }
    times
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_value() {
        for (values, want) in [
            (vec![], None),
            (vec![3.0], Some(3.0)),
            (vec![5.0, 1.0, 3.0], Some(3.0)),
            (vec![4.0, 1.0], Some(4.0)),
        ] {
            assert_eq!(median(&values), want, "{values:?}");
        }
    }

    #[test]
    fn the_tiny_unet_has_its_documented_parameter_count() {
        assert_eq!(unet_parameters(&ModelSpec::tiny()), 6_826_244);
    }
}
