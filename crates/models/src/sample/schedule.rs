//! The four samplers as diffusers defines them for Stable Diffusion 1.5's scheduler config
//! (1000 scaled-linear training steps, `steps_offset: 1`, no `timestep_spacing`, so each
//! scheduler's own default): timesteps, sigmas, input scaling and one update per step.
//!
//! | recipe name | diffusers scheduler | spacing | sigmas | state |
//! |---|---|---|---|---|
//! | `euler` | `EulerDiscreteScheduler` | linspace (float timesteps) | interpolated | none |
//! | `euler_a` | `EulerAncestralDiscreteScheduler` | linspace | interpolated | noise per step |
//! | `ddim` | `DDIMScheduler`, eta 0, `set_alpha_to_one: false` | leading + offset 1 | none | none |
//! | `dpmpp_2m` | `DPMSolverMultistepScheduler`, dpmsolver++, order 2, Karras | Karras (rounded) | Karras | previous x0 |
//!
//! Scalars are computed in f32 in the reference's order of operations (diffusers holds its
//! sigmas as f32 tensors), the schedule tables in f64 where numpy does, so the updates agree
//! with diffusers' to a few ulps.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Tensor;

use crate::ddpm::NoiseSchedule;

/// A sampler a recipe can name (`sampler:`), spelled as in recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// `euler`: Euler's method on the probability-flow ODE.
    Euler,
    /// `euler_a`: Euler ancestral (fresh noise at every step).
    EulerAncestral,
    /// `ddim`: DDIM with eta 0 (deterministic).
    Ddim,
    /// `dpmpp_2m`: DPM-Solver++ 2M with Karras sigmas.
    DpmPp2mKarras,
}

impl SamplerKind {
    /// Every sampler, in the order of the recipe documentation.
    pub const ALL: [SamplerKind; 4] = [
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Ddim,
        SamplerKind::DpmPp2mKarras,
    ];

    /// The recipe spelling (`euler`, `euler_a`, `ddim`, `dpmpp_2m`).
    pub fn recipe_name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_a",
            SamplerKind::Ddim => "ddim",
            SamplerKind::DpmPp2mKarras => "dpmpp_2m",
        }
    }

    /// The name AUTOMATIC1111 writes in a PNG's `parameters` (`Sampler: Euler a`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::Ddim => "DDIM",
            SamplerKind::DpmPp2mKarras => "DPM++ 2M Karras",
        }
    }

    /// Whether each step draws fresh noise.
    pub fn is_ancestral(self) -> bool {
        self == SamplerKind::EulerAncestral
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.recipe_name())
    }
}

/// A sampler name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown sampler `{0}` (known: euler, euler_a, ddim, dpmpp_2m)")]
pub struct UnknownSampler(pub String);

impl From<slider_protocol::names::Sampler> for SamplerKind {
    fn from(sampler: slider_protocol::names::Sampler) -> Self {
        use slider_protocol::names::Sampler;
        match sampler {
            Sampler::Ddim => SamplerKind::Ddim,
            Sampler::Euler => SamplerKind::Euler,
            Sampler::EulerA => SamplerKind::EulerAncestral,
            Sampler::Dpmpp2m => SamplerKind::DpmPp2mKarras,
        }
    }
}

impl FromStr for SamplerKind {
    type Err = UnknownSampler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.recipe_name() == s)
            .ok_or_else(|| UnknownSampler(s.to_owned()))
    }
}

/// Why a schedule cannot be built or stepped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Zero steps, or more than the 1000 training timesteps.
    #[error("{steps} sampling steps: expected 1 to {train_steps}")]
    Steps {
        /// Steps asked for.
        steps: usize,
        /// Training timesteps of the schedule.
        train_steps: usize,
    },
    /// A step index outside the schedule.
    #[error("step {index} of a {steps}-step schedule")]
    Index {
        /// The index.
        index: usize,
        /// Steps of the schedule.
        steps: usize,
    },
    /// An ancestral step without its noise.
    #[error("{0} needs fresh noise at every step")]
    NoNoise(SamplerKind),
}

/// One sampler set up for a number of steps: what diffusers' scheduler is after
/// `set_timesteps(steps)`, plus the multistep state.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SamplerKind,
    timesteps: Vec<f32>,
    /// `steps + 1` values ending in 0 (Euler, Euler a, DPM++); empty for DDIM.
    sigmas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    /// DPM++ 2M: the previous step's predicted x0.
    previous_x0: Option<Tensor<4>>,
}

impl Scheduler {
    /// The sampler `kind` over Stable Diffusion's training schedule, for `steps` steps.
    pub fn new(kind: SamplerKind, steps: usize) -> Result<Self, ScheduleError> {
        let schedule = NoiseSchedule::stable_diffusion();
        let train_steps = schedule.steps();
        if steps == 0 || steps > train_steps {
            return Err(ScheduleError::Steps { steps, train_steps });
        }
        let alphas_cumprod = schedule.alphas_cumprod().to_vec();
        // diffusers: ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, in f32, by timestep.
        let table: Vec<f32> = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        let (timesteps, sigmas) = match kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let timesteps = linspace_timesteps(train_steps, steps);
                let mut sigmas: Vec<f32> = timesteps
                    .iter()
                    .map(|&t| interpolate(&table, f64::from(t)) as f32)
                    .collect();
                sigmas.push(0.0);
                (timesteps, sigmas)
            }
            SamplerKind::Ddim => {
                let ratio = train_steps / steps;
                let timesteps = (0..steps)
                    .rev()
                    .map(|i| (i * ratio + STEPS_OFFSET) as f32)
                    .collect();
                (timesteps, Vec::new())
            }
            SamplerKind::DpmPp2mKarras => {
                let log_table: Vec<f32> = table.iter().map(|s| s.ln()).collect();
                let karras = karras_sigmas(
                    f64::from(table[0]),
                    f64::from(table[train_steps - 1]),
                    steps,
                );
                let timesteps = karras
                    .iter()
                    .map(|&s| sigma_to_t(s, &log_table).round_ties_even() as f32)
                    .collect();
                let mut sigmas: Vec<f32> = karras.iter().map(|&s| s as f32).collect();
                sigmas.push(0.0);
                (timesteps, sigmas)
            }
        };
        Ok(Self {
            kind,
            timesteps,
            sigmas,
            alphas_cumprod,
            previous_x0: None,
        })
    }

    /// The sampler.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// The timesteps the UNet sees, one per step (Euler's are fractional).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// `steps + 1` noise levels ending in 0; empty for DDIM, which has none.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The standard deviation of the initial latent noise.
    pub fn init_noise_sigma(&self) -> f32 {
        match self.kind {
            // linspace spacing: the largest sigma itself.
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                self.sigmas.iter().copied().fold(0.0, f32::max)
            }
            SamplerKind::Ddim | SamplerKind::DpmPp2mKarras => 1.0,
        }
    }

    /// The UNet's input at step `index`: the Euler samplers work on `x0 + sigma * eps` and
    /// divide by `sqrt(sigma^2 + 1)`; the others pass the sample through.
    pub fn scale_model_input(
        &self,
        sample: Tensor<4>,
        index: usize,
    ) -> Result<Tensor<4>, ScheduleError> {
        self.check(index)?;
        Ok(match self.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let sigma = self.sigmas[index];
                sample.div_scalar((sigma * sigma + 1.0).sqrt())
            }
            SamplerKind::Ddim | SamplerKind::DpmPp2mKarras => sample,
        })
    }

    /// The sample after step `index`, from the (guided) noise prediction at that step. Steps
    /// must be taken in order (DPM++ 2M remembers the previous one). `noise` is the standard
    /// normal draw of an ancestral step, ignored by the others.
    pub fn step(
        &mut self,
        index: usize,
        model_output: Tensor<4>,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>, ScheduleError> {
        self.check(index)?;
        Ok(match self.kind {
            SamplerKind::Euler => {
                let (sigma, next) = (self.sigmas[index], self.sigmas[index + 1]);
                let x0 = sample.clone() - model_output.mul_scalar(sigma);
                let derivative = (sample.clone() - x0).div_scalar(sigma);
                sample + derivative.mul_scalar(next - sigma)
            }
            SamplerKind::EulerAncestral => {
                let noise = noise.ok_or(ScheduleError::NoNoise(self.kind))?;
                let (from, to) = (self.sigmas[index], self.sigmas[index + 1]);
                let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
                let down = (to * to - up * up).sqrt();
                let x0 = sample.clone() - model_output.mul_scalar(from);
                let derivative = (sample.clone() - x0).div_scalar(from);
                sample + derivative.mul_scalar(down - from) + noise.mul_scalar(up)
            }
            SamplerKind::Ddim => {
                let t = self.timesteps[index] as usize;
                let ratio = self.alphas_cumprod.len() / self.timesteps.len();
                let a_t = self.alphas_cumprod[t];
                // `set_alpha_to_one: false`: the step past t = 0 lands on alpha_bar_0.
                let a_prev = match t.checked_sub(ratio) {
                    Some(prev) => self.alphas_cumprod[prev],
                    None => self.alphas_cumprod[0],
                };
                let x0 = (sample - model_output.clone().mul_scalar((1.0 - a_t).sqrt()))
                    .div_scalar(a_t.sqrt());
                let direction = model_output.mul_scalar((1.0 - a_prev).sqrt());
                x0.mul_scalar(a_prev.sqrt()) + direction
            }
            SamplerKind::DpmPp2mKarras => self.dpmpp_2m_step(index, model_output, sample),
        })
    }

    /// DPM-Solver++ (midpoint) of order 2: first order on the first step and on the last
    /// (which lands on sigma 0), second order in between with the previous x0 prediction.
    fn dpmpp_2m_step(&mut self, index: usize, eps: Tensor<4>, sample: Tensor<4>) -> Tensor<4> {
        let vp = |sigma: f32| {
            let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
            (alpha, sigma * alpha)
        };
        let lambda = |(alpha, sigma): (f32, f32)| alpha.ln() - sigma.ln();
        let (alpha_s0, sigma_s0) = vp(self.sigmas[index]);
        let (alpha_t, sigma_t) = vp(self.sigmas[index + 1]);
        let x0 = (sample.clone() - eps.mul_scalar(sigma_s0)).div_scalar(alpha_s0);
        let h = lambda((alpha_t, sigma_t)) - lambda((alpha_s0, sigma_s0));
        let coefficient = alpha_t * ((-h).exp() - 1.0);
        let last = index + 1 == self.timesteps.len();
        let next = match self.previous_x0.take() {
            Some(x0_prev) if index > 0 && !last => {
                let h0 = lambda((alpha_s0, sigma_s0)) - lambda(vp(self.sigmas[index - 1]));
                let r0 = h0 / h;
                let d1 = (x0.clone() - x0_prev).mul_scalar(1.0 / r0);
                sample.mul_scalar(sigma_t / sigma_s0)
                    - x0.clone().mul_scalar(coefficient)
                    - d1.mul_scalar(0.5 * coefficient)
            }
            _ => sample.mul_scalar(sigma_t / sigma_s0) - x0.clone().mul_scalar(coefficient),
        };
        self.previous_x0 = Some(x0);
        next
    }

    fn check(&self, index: usize) -> Result<(), ScheduleError> {
        if index < self.timesteps.len() {
            Ok(())
        } else {
            Err(ScheduleError::Index {
                index,
                steps: self.timesteps.len(),
            })
        }
    }
}

/// SD1.5's `steps_offset`, used by the "leading" spacing (DDIM).
const STEPS_OFFSET: usize = 1;

/// `np.linspace(0, train_steps - 1, steps, dtype=float32)[::-1]`.
fn linspace_timesteps(train_steps: usize, steps: usize) -> Vec<f32> {
    let stop = (train_steps - 1) as f64;
    if steps == 1 {
        return vec![0.0];
    }
    let step = stop / (steps - 1) as f64;
    (0..steps)
        .rev()
        .map(|i| {
            if i == steps - 1 {
                stop as f32
            } else {
                (i as f64 * step) as f32
            }
        })
        .collect()
}

/// `np.interp(t, arange(len(table)), table)`.
fn interpolate(table: &[f32], t: f64) -> f64 {
    let last = table.len() - 1;
    if t <= 0.0 {
        return f64::from(table[0]);
    }
    if t >= last as f64 {
        return f64::from(table[last]);
    }
    let lo = t.floor() as usize;
    let (a, b) = (f64::from(table[lo]), f64::from(table[lo + 1]));
    (b - a) * (t - lo as f64) + a
}

/// Karras et al.'s schedule (rho 7) from `sigma_max` down to `sigma_min` in `steps` values.
fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..steps)
        .map(|i| {
            let ramp = if steps == 1 {
                0.0
            } else {
                i as f64 / (steps - 1) as f64
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// diffusers' `_sigma_to_t`: the (fractional) timestep whose sigma is `sigma`, interpolating
/// linearly in log-sigma between the two neighbouring training timesteps.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let below = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - f64::from(l) >= 0.0)
        .count();
    let low_idx = below.saturating_sub(1).min(log_sigmas.len() - 2);
    let (low, high) = (
        f64::from(log_sigmas[low_idx]),
        f64::from(log_sigmas[low_idx + 1]),
    );
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use burn::tensor::{Device, TensorData};

    use super::*;
    use crate::HostTensor;

    /// Every sampler name the recipe accepts reaches the sampler of that name.
    #[test]
    fn every_recipe_sampler_is_the_sampler_of_its_name() {
        for &sampler in slider_protocol::names::Sampler::ALL {
            assert_eq!(SamplerKind::from(sampler).recipe_name(), sampler.name());
        }
        assert_eq!(
            slider_protocol::names::Sampler::ALL.len(),
            SamplerKind::ALL.len()
        );
    }

    /// `tests/fixtures/sampler/schedulers.safetensors` (make_sampler_fixtures.py).
    fn fixtures() -> BTreeMap<String, HostTensor> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/sampler/schedulers.safetensors"
        );
        let bytes = std::fs::read(path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        file.tensors()
            .into_iter()
            .map(|(k, v)| {
                let values = v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let shape = v.shape().to_vec();
                (k, HostTensor { shape, values })
            })
            .collect()
    }

    fn tensor(t: &HostTensor) -> Tensor<4> {
        let dims: [usize; 4] = t.shape.clone().try_into().unwrap();
        Tensor::from_data(TensorData::new(t.values.clone(), dims), &Device::flex())
    }

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Relative Frobenius error of `got` against `want`.
    fn rel_error(got: &[f32], want: &[f32]) -> f64 {
        assert_eq!(got.len(), want.len());
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (&g, &w) in got.iter().zip(want) {
            diff += (f64::from(g) - f64::from(w)).powi(2);
            norm += f64::from(w).powi(2);
        }
        (diff / norm).sqrt()
    }

    fn max_rel(got: &[f32], want: &[f32]) -> f64 {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        got.iter()
            .zip(want)
            .map(|(&g, &w)| {
                let scale = f64::from(w).abs().max(1e-12);
                (f64::from(g) - f64::from(w)).abs() / scale
            })
            .fold(0.0, f64::max)
    }

    const STEP_COUNTS: [usize; 2] = [20, 30];

    #[test]
    fn sampler_names_are_the_recipe_spellings() {
        let cases = [
            ("euler", Some(SamplerKind::Euler)),
            ("euler_a", Some(SamplerKind::EulerAncestral)),
            ("ddim", Some(SamplerKind::Ddim)),
            ("dpmpp_2m", Some(SamplerKind::DpmPp2mKarras)),
            ("Euler", None),
            ("dpmpp_2m_karras", None),
            ("", None),
        ];
        for (name, want) in cases {
            assert_eq!(name.parse::<SamplerKind>().ok(), want, "{name}");
            if let Some(kind) = want {
                assert_eq!(kind.to_string(), name);
            }
        }
        let err = "plms".parse::<SamplerKind>().unwrap_err();
        assert!(err.to_string().contains("euler_a"), "{err}");
    }

    #[test]
    fn schedules_equal_diffusers() {
        let fx = fixtures();
        for kind in SamplerKind::ALL {
            for steps in STEP_COUNTS {
                let s = Scheduler::new(kind, steps).unwrap();
                let key = |what: &str| format!("{kind}.{steps}.{what}");
                let timesteps = &fx[&key("timesteps")].values;
                let err = max_rel(s.timesteps(), timesteps);
                assert!(err <= 1e-7, "{kind} {steps} timesteps: {err:e}");
                match fx.get(&key("sigmas")) {
                    Some(want) => {
                        let err = max_rel(s.sigmas(), &want.values);
                        eprintln!("{kind} {steps}: sigmas worst relative error {err:e}");
                        assert!(err <= 1e-6, "{kind} {steps} sigmas: {err:e}");
                    }
                    None => assert!(s.sigmas().is_empty(), "{kind}"),
                }
                let want = fx[&key("init_noise_sigma")].values[0];
                assert!(
                    (s.init_noise_sigma() - want).abs() <= 1e-6 * want,
                    "{kind} {steps}: init sigma {} vs {want}",
                    s.init_noise_sigma()
                );
            }
        }
    }

    /// Every update of every sampler, fed the reference's sample before the step: the scaled
    /// UNet input and the next sample equal diffusers' (DPM++ 2M's second-order steps use the
    /// x0 remembered from our own previous step).
    #[test]
    fn every_update_equals_diffusers() {
        let fx = fixtures();
        let mut worst = 0.0f64;
        for kind in SamplerKind::ALL {
            for steps in STEP_COUNTS {
                let key = |what: String| format!("{kind}.{steps}.{what}");
                let mut s = Scheduler::new(kind, steps).unwrap();
                let mut before = fx[&key("start".into())].clone();
                for k in 0..steps {
                    let sample = tensor(&before);
                    let input = s.scale_model_input(sample.clone(), k).unwrap();
                    let err =
                        rel_error(&values(input), &fx[&key(format!("model_input.{k}"))].values);
                    assert!(err < 1e-6, "{kind} {steps} input {k}: {err:e}");
                    let output = tensor(&fx[&key(format!("model_output.{k}"))]);
                    let noise = fx.get(&key(format!("noise.{k}"))).map(tensor);
                    let next = s.step(k, output, sample, noise).unwrap();
                    let want = &fx[&key(format!("sample.{k}"))];
                    let err = rel_error(&values(next), &want.values);
                    worst = worst.max(err);
                    assert!(err < 1e-5, "{kind} {steps} step {k}: {err:e}");
                    before = want.clone();
                }
            }
        }
        eprintln!("worst relative error of one update: {worst:e}");
    }

    /// Whole trajectories from the initial noise, each step fed our own previous sample.
    #[test]
    fn whole_trajectories_equal_diffusers() {
        let fx = fixtures();
        for kind in SamplerKind::ALL {
            for steps in STEP_COUNTS {
                let key = |what: String| format!("{kind}.{steps}.{what}");
                let mut s = Scheduler::new(kind, steps).unwrap();
                let mut sample = tensor(&fx[&key("start".into())]);
                for k in 0..steps {
                    let output = tensor(&fx[&key(format!("model_output.{k}"))]);
                    let noise = fx.get(&key(format!("noise.{k}"))).map(tensor);
                    sample = s.step(k, output, sample, noise).unwrap();
                }
                let want = &fx[&key(format!("sample.{}", steps - 1))].values;
                let err = rel_error(&values(sample), want);
                eprintln!("{kind} {steps}: final sample relative error {err:e}");
                assert!(err < 1e-5, "{kind} {steps}: {err:e}");
            }
        }
    }

    #[test]
    fn step_counts_and_indices_are_checked() {
        let device = Device::flex();
        let zeros = || Tensor::<4>::zeros([1, 4, 2, 2], &device);
        for kind in SamplerKind::ALL {
            for steps in [0, 1001] {
                assert_eq!(
                    Scheduler::new(kind, steps).unwrap_err(),
                    ScheduleError::Steps {
                        steps,
                        train_steps: 1000
                    }
                );
            }
            // One step goes from the top of the schedule straight to a clean sample.
            let mut s = Scheduler::new(kind, 1).unwrap();
            assert_eq!(s.timesteps().len(), 1);
            if !s.sigmas().is_empty() {
                assert_eq!(s.sigmas().last(), Some(&0.0));
            }
            let next = s.step(0, zeros(), zeros(), Some(zeros())).unwrap();
            assert!(values(next).iter().all(|v| v.is_finite()), "{kind}");
            assert_eq!(
                s.step(1, zeros(), zeros(), Some(zeros())).unwrap_err(),
                ScheduleError::Index { index: 1, steps: 1 }
            );
        }
        let mut s = Scheduler::new(SamplerKind::EulerAncestral, 5).unwrap();
        assert_eq!(
            s.step(0, zeros(), zeros(), None).unwrap_err(),
            ScheduleError::NoNoise(SamplerKind::EulerAncestral)
        );
    }
}
