//! The DDPM forward (noising) process Stable Diffusion was trained with, as kohya sets it up:
//! 1000 steps of "scaled_linear" betas from 0.00085 to 0.012, `add_noise`, the per-timestep
//! signal-to-noise ratio with its min-SNR-gamma loss weight, and the noise offset.
//!
//! The schedule is computed as diffusers computes it — betas in f32 from torch's `linspace`
//! formula, `alphas_cumprod` as a running product accumulated in f64 and stored in f32 — so the
//! values match the reference's to within an ulp or two.

use burn::tensor::{Tensor, TensorData};

/// Why noise cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DdpmError {
    /// A timestep outside the schedule.
    #[error("timestep {timestep} is outside the schedule of {steps} steps")]
    Timestep {
        /// The timestep.
        timestep: usize,
        /// Number of steps of the schedule.
        steps: usize,
    },
    /// Not one timestep per sample.
    #[error("{timesteps} timesteps for a batch of {batch}")]
    Batch {
        /// Timesteps given.
        timesteps: usize,
        /// Batch size.
        batch: usize,
    },
}

/// A DDPM noise schedule: `betas` and their cumulative `alphas_cumprod`.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// Stable Diffusion's training schedule (SD1.x and SDXL): 1000 scaled-linear steps from
    /// 0.00085 to 0.012.
    pub fn stable_diffusion() -> Self {
        Self::scaled_linear(0.00085, 0.012, 1000)
    }

    /// `betas = linspace(sqrt(beta_start), sqrt(beta_end), steps)^2`, in f32 as torch computes
    /// it (`steps` >= 2).
    pub fn scaled_linear(beta_start: f64, beta_end: f64, steps: usize) -> Self {
        let start = beta_start.sqrt() as f32;
        let end = beta_end.sqrt() as f32;
        let step = (end - start) / (steps.max(2) - 1) as f32;
        let halfway = steps / 2;
        // torch's linspace fills the first half forwards from `start` and the second half
        // backwards from `end`, so both ends are exact.
        let betas: Vec<f32> = (0..steps)
            .map(|i| {
                let b = if i < halfway {
                    start + step * i as f32
                } else {
                    end - step * (steps - i - 1) as f32
                };
                b * b
            })
            .collect();
        let mut product = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                product *= f64::from(1.0f32 - b);
                product as f32
            })
            .collect();
        Self {
            betas,
            alphas_cumprod,
        }
    }

    /// Number of training timesteps (1000).
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    /// `beta_t`.
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// `alpha_bar_t = prod_{s <= t} (1 - beta_s)`.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn alpha_bar(&self, t: usize) -> Result<f32, DdpmError> {
        self.alphas_cumprod
            .get(t)
            .copied()
            .ok_or(DdpmError::Timestep {
                timestep: t,
                steps: self.steps(),
            })
    }

    /// Signal-to-noise ratio `(sqrt(ab) / sqrt(1 - ab))^2` at `t`, in f32 as kohya computes it
    /// (`prepare_scheduler_for_custom_training`).
    pub fn snr(&self, t: usize) -> Result<f32, DdpmError> {
        let ab = self.alpha_bar(t)?;
        let ratio = ab.sqrt() / (1.0 - ab).sqrt();
        Ok(ratio * ratio)
    }

    /// kohya's `apply_snr_weight` for epsilon prediction: the per-sample loss weight
    /// `min(snr_t, gamma) / snr_t`.
    pub fn min_snr_weight(&self, t: usize, gamma: f32) -> Result<f32, DdpmError> {
        let snr = self.snr(t)?;
        Ok(snr.min(gamma) / snr)
    }

    /// diffusers' `add_noise`: `sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`, with one timestep per
    /// sample of the batch.
    pub fn add_noise(
        &self,
        x0: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[usize],
    ) -> Result<Tensor<4>, DdpmError> {
        let batch = x0.dims()[0];
        if timesteps.len() != batch {
            return Err(DdpmError::Batch {
                timesteps: timesteps.len(),
                batch,
            });
        }
        let mut signal = Vec::with_capacity(batch);
        let mut noise_scale = Vec::with_capacity(batch);
        for &t in timesteps {
            let ab = self.alpha_bar(t)?;
            signal.push(ab.sqrt());
            noise_scale.push((1.0 - ab).sqrt());
        }
        let device = x0.device();
        let column =
            |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [batch, 1, 1, 1]), &device);
        Ok(x0 * column(signal) + noise * column(noise_scale))
    }
}

/// kohya's noise offset: `noise + noise_offset * offset_noise`, where `offset_noise` is a
/// standard-normal `[batch, channels, 1, 1]` tensor drawn by the caller (one value per sample
/// and channel, shifting the whole channel).
pub fn apply_noise_offset(
    noise: Tensor<4>,
    noise_offset: f64,
    offset_noise: Tensor<4>,
) -> Tensor<4> {
    if noise_offset == 0.0 {
        return noise;
    }
    noise + offset_noise.mul_scalar(noise_offset)
}

/// Standard normal noise of `shape`, drawn from `rng` in row-major order: the one noise
/// source of sampling, training and pretraining, so a seed and stream give the same tensor
/// everywhere.
pub fn standard_normal<const D: usize>(
    rng: &mut rand_chacha::ChaCha8Rng,
    shape: [usize; D],
    device: &burn::tensor::Device,
) -> Tensor<D> {
    use rand::Rng;
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| rng.sample(rand_distr::StandardNormal))
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self as reference, rel_error};

    fn max_rel(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| ((f64::from(x) - f64::from(y)) / f64::from(y).abs()).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn schedule_matches_diffusers_and_kohya() {
        let (fx, _) = reference::read("ddpm.safetensors");
        let s = NoiseSchedule::stable_diffusion();
        assert_eq!(s.steps(), 1000);
        let snr: Vec<f32> = (0..1000).map(|t| s.snr(t).unwrap()).collect();
        let weights: Vec<f32> = (0..1000)
            .map(|t| s.min_snr_weight(t, 5.0).unwrap())
            .collect();
        let cases: [(&str, &[f32], f64); 4] = [
            ("betas", s.betas(), 1e-6),
            ("alphas_cumprod", s.alphas_cumprod(), 1e-6),
            ("all_snr", &snr, 1e-5),
            ("snr_weight_all.gamma5", &weights, 1e-5),
        ];
        for (name, ours, tol) in cases {
            let err = max_rel(ours, &fx[name].values);
            eprintln!("{name}: worst relative error {err:e}");
            assert!(err <= tol, "{name}: {err:e}");
        }
        // The ends of the schedule, as published for SD.
        assert!((s.betas()[0] - 0.00085).abs() < 1e-10);
        assert!((s.betas()[999] - 0.012).abs() < 1e-9);
        assert!((s.alphas_cumprod()[999] - 0.0047).abs() < 1e-4);
    }

    #[test]
    fn min_snr_weight_is_one_where_snr_is_below_gamma() {
        let s = NoiseSchedule::stable_diffusion();
        for t in [0usize, 100, 300, 500, 999] {
            let (snr, w) = (s.snr(t).unwrap(), s.min_snr_weight(t, 5.0).unwrap());
            let want = if snr <= 5.0 { 1.0 } else { 5.0 / snr };
            assert!(
                (w - want).abs() <= 1e-6 * want,
                "t {t}: snr {snr} weight {w}"
            );
        }
        assert!(s.snr(1000).is_err());
    }

    #[test]
    fn add_noise_matches_diffusers() {
        let (fx, _) = reference::read("ddpm.safetensors");
        let device = reference::device();
        let up = |name: &str| {
            let t = &fx[name];
            let dims: [usize; 4] = t.shape.clone().try_into().unwrap();
            Tensor::<4>::from_data(TensorData::new(t.values.clone(), dims), &device)
        };
        let timesteps: Vec<usize> = fx["timesteps"].values.iter().map(|&t| t as usize).collect();
        let s = NoiseSchedule::stable_diffusion();
        let noisy = s.add_noise(up("x0"), up("noise"), &timesteps).unwrap();
        let got = noisy.into_data().try_to_vec::<f32>().unwrap();
        let err = rel_error(&got, &fx["noisy"].values);
        assert!(err < 1e-6, "add_noise: {err:e}");
        let weights: Vec<f32> = timesteps
            .iter()
            .map(|&t| s.min_snr_weight(t, 5.0).unwrap())
            .collect();
        assert!(max_rel(&weights, &fx["snr_weight.gamma5"].values) < 1e-5);

        let err = s
            .add_noise(up("x0"), up("noise"), &timesteps[..2])
            .unwrap_err();
        assert_eq!(
            err,
            DdpmError::Batch {
                timesteps: 2,
                batch: 3
            }
        );
        let err = s
            .add_noise(up("x0"), up("noise"), &[0, 1, 1000])
            .unwrap_err();
        assert_eq!(
            err,
            DdpmError::Timestep {
                timestep: 1000,
                steps: 1000
            }
        );
    }

    #[test]
    fn noise_offset_shifts_each_channel() {
        let device = reference::device();
        let noise = Tensor::<4>::zeros([2, 3, 2, 2], &device);
        let offsets: Vec<f32> = vec![1.0, -2.0, 0.5, 3.0, 0.0, -1.0];
        let offset =
            Tensor::<4>::from_data(TensorData::new(offsets.clone(), [2, 3, 1, 1]), &device);
        let cases = [(0.0, 0.0f32), (0.1, 0.1), (0.0357, 0.0357)];
        for (amount, scale) in cases {
            let out = apply_noise_offset(noise.clone(), amount, offset.clone());
            let v = out.into_data().try_to_vec::<f32>().unwrap();
            for (i, x) in v.iter().enumerate() {
                let want = offsets[i / 4] * scale;
                assert!(
                    (x - want).abs() <= 1e-7,
                    "offset {amount} element {i}: {x} vs {want}"
                );
            }
        }
    }
}
