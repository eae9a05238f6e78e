//! Learning-rate schedules as kohya builds them (diffusers/transformers `get_scheduler`, a
//! `LambdaLR`): `lr_at(step) = base_lr * factor(step)`, with the factor computed in the same
//! order of f64 operations as the Python lambdas, so the values agree to the last bit or two.
//! Warmup is a linear ramp from 0: `factor = step / max(1, warmup)` for `step < warmup`.
//! `step` counts optimizer steps from 0 (kohya steps the scheduler after each optimizer step,
//! so step `k` trains with `lr_at(k)`).

use std::f64::consts::PI;

/// Why a schedule cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// kohya refuses warmup with the plain `constant` schedule.
    #[error(
        "constant does not require `num_warmup_steps`. Set None or 0 (use constant_with_warmup for a warmup)"
    )]
    WarmupWithConstant,
    /// Polynomial decay needs `lr_end < base_lr`.
    #[error("lr_end ({lr_end}) must be smaller than initial lr ({base_lr})")]
    LrEnd {
        /// The end learning rate.
        lr_end: f64,
        /// The initial learning rate.
        base_lr: f64,
    },
    /// Polynomial decay over zero steps divides by zero in the reference.
    #[error("polynomial decay needs more training steps ({total}) than warmup steps ({warmup})")]
    NoDecaySteps {
        /// Warmup steps.
        warmup: usize,
        /// Training steps.
        total: usize,
    },
    /// A learning rate that is negative or not finite.
    #[error("learning rate {0} must be a finite number >= 0")]
    LearningRate(f64),
    /// A scheduler name kohya does not know.
    #[error(
        "unknown lr_scheduler `{0}` (known: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial)"
    )]
    Unknown(String),
}

/// The shape of a schedule, with its own parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleKind {
    /// `constant`: the base learning rate throughout (no warmup allowed).
    Constant,
    /// `constant_with_warmup`.
    ConstantWithWarmup,
    /// `linear`: from the base rate down to 0 at `total` steps.
    Linear,
    /// `cosine`: half a cosine from the base rate down to 0 at `total` steps.
    Cosine,
    /// `cosine_with_restarts`: `num_cycles` hard-restarted cosines (kohya's
    /// `--lr_scheduler_num_cycles`, default 1).
    CosineWithRestarts {
        /// Number of cosine cycles.
        num_cycles: u32,
    },
    /// `polynomial`: `(base - lr_end) * remaining^power + lr_end`, then `lr_end` after `total`
    /// (kohya's `--lr_scheduler_power`, default 1; `lr_end` default 1e-7).
    Polynomial {
        /// Exponent of the decay.
        power: f64,
        /// Learning rate at and after `total` steps.
        lr_end: f64,
    },
}

impl ScheduleKind {
    /// The schedule kohya names `name`, with kohya's defaults for its parameters.
    pub fn from_name(name: &str) -> Result<Self, ScheduleError> {
        Ok(match name {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "cosine_with_restarts" => Self::CosineWithRestarts { num_cycles: 1 },
            "polynomial" => Self::Polynomial {
                power: 1.0,
                lr_end: 1e-7,
            },
            _ => return Err(ScheduleError::Unknown(name.to_owned())),
        })
    }

    /// kohya's name for it (`ss_lr_scheduler`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::CosineWithRestarts { .. } => "cosine_with_restarts",
            Self::Polynomial { .. } => "polynomial",
        }
    }
}

/// A learning-rate schedule over a training run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    kind: ScheduleKind,
    base_lr: f64,
    warmup: usize,
    total: usize,
}

impl LrSchedule {
    /// A schedule of `total` training steps (`max_train_steps`) starting with `warmup` steps
    /// of linear warmup from 0 to `base_lr`.
    pub fn new(
        kind: ScheduleKind,
        base_lr: f64,
        warmup: usize,
        total: usize,
    ) -> Result<Self, ScheduleError> {
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            return Err(ScheduleError::LearningRate(base_lr));
        }
        match kind {
            ScheduleKind::Constant if warmup > 0 => return Err(ScheduleError::WarmupWithConstant),
            ScheduleKind::Polynomial { lr_end, .. } => {
                if lr_end.is_nan() || base_lr <= lr_end {
                    return Err(ScheduleError::LrEnd { lr_end, base_lr });
                }
                if warmup == total {
                    return Err(ScheduleError::NoDecaySteps { warmup, total });
                }
            }
            _ => {}
        }
        Ok(Self {
            kind,
            base_lr,
            warmup,
            total,
        })
    }

    /// The schedule's kind.
    pub fn kind(&self) -> ScheduleKind {
        self.kind
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.factor_at(step)
    }

    /// The multiplier of the base learning rate at `step` (`LambdaLR`'s lambda).
    pub fn factor_at(&self, step: usize) -> f64 {
        let (w, t, s) = (self.warmup, self.total, step);
        if !matches!(self.kind, ScheduleKind::Constant) && s < w {
            return s as f64 / w.max(1) as f64;
        }
        // Python ints subtract exactly; so do these signed differences.
        let (w_i, t_i, s_i) = (w as i64, t as i64, s as i64);
        let progress = || (s_i - w_i) as f64 / (t_i - w_i).max(1) as f64;
        match self.kind {
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => {
                let remaining = (t_i - s_i) as f64 / (t_i - w_i).max(1) as f64;
                remaining.max(0.0)
            }
            ScheduleKind::Cosine => {
                let num_cycles = 0.5;
                (0.5 * (1.0 + (PI * num_cycles * 2.0 * progress()).cos())).max(0.0)
            }
            ScheduleKind::CosineWithRestarts { num_cycles } => {
                let progress = progress();
                if progress >= 1.0 {
                    return 0.0;
                }
                (0.5 * (1.0 + (PI * ((f64::from(num_cycles) * progress) % 1.0)).cos())).max(0.0)
            }
            ScheduleKind::Polynomial { power, lr_end } => {
                let lr_init = self.base_lr;
                if s > t {
                    return lr_end / lr_init;
                }
                let lr_range = lr_init - lr_end;
                let decay_steps = (t_i - w_i) as f64;
                let pct_remaining = 1.0 - (s_i - w_i) as f64 / decay_steps;
                let decay = lr_range * pct_remaining.powf(power) + lr_end;
                decay / lr_init
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case of `lr_schedules.json`: diffusers' (and transformers') learning rate at every
    /// step from 0 to `total + 10`.
    #[test]
    fn matches_diffusers_get_scheduler() {
        let path = crate::reference::fixture("lr_schedules.json");
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(cases.len(), 15);
        let mut worst = 0.0f64;
        for case in &cases {
            let name = case["kind"].as_str().unwrap();
            let kind = match ScheduleKind::from_name(name).unwrap() {
                ScheduleKind::CosineWithRestarts { .. } => ScheduleKind::CosineWithRestarts {
                    num_cycles: case["num_cycles"].as_u64().unwrap() as u32,
                },
                ScheduleKind::Polynomial { lr_end, .. } => ScheduleKind::Polynomial {
                    power: case["power"].as_f64().unwrap(),
                    lr_end: case
                        .get("lr_end")
                        .and_then(|v| v.as_f64())
                        .unwrap_or(lr_end),
                },
                other => other,
            };
            let base = case["base_lr"].as_f64().unwrap();
            let warmup = case["warmup"].as_u64().unwrap() as usize;
            let total = case["total"].as_u64().unwrap() as usize;
            let schedule = LrSchedule::new(kind, base, warmup, total).unwrap();
            for (step, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
                let want = want.as_f64().unwrap();
                let got = schedule.lr_at(step);
                let err = (got - want).abs() / base;
                assert!(
                    err <= 1e-9,
                    "{name} w{warmup} t{total} step {step}: {got} vs {want}"
                );
                worst = worst.max(err);
            }
        }
        eprintln!("lr schedules: worst error relative to the base rate {worst:e}");
    }

    #[test]
    fn the_method_settings() {
        // CAME, lr 5e-5, warmup 20, 400 steps, constant_with_warmup.
        let s = LrSchedule::new(ScheduleKind::ConstantWithWarmup, 5e-5, 20, 400).unwrap();
        let cases = [
            (0, 0.0),
            (1, 5e-5 / 20.0),
            (10, 2.5e-5),
            (19, 5e-5 * 0.95),
            (20, 5e-5),
            (399, 5e-5),
        ];
        for (step, want) in cases {
            assert!((s.lr_at(step) - want).abs() < 1e-18, "step {step}");
        }
    }

    #[test]
    fn refusals_like_kohya_and_diffusers() {
        let poly = |lr_end| ScheduleKind::Polynomial { power: 1.0, lr_end };
        let cases = [
            (
                ScheduleKind::Constant,
                1e-4,
                10,
                100,
                Some(ScheduleError::WarmupWithConstant),
            ),
            (ScheduleKind::Constant, 1e-4, 0, 100, None),
            (
                poly(1e-4),
                1e-4,
                0,
                100,
                Some(ScheduleError::LrEnd {
                    lr_end: 1e-4,
                    base_lr: 1e-4,
                }),
            ),
            (
                poly(1e-7),
                1e-4,
                100,
                100,
                Some(ScheduleError::NoDecaySteps {
                    warmup: 100,
                    total: 100,
                }),
            ),
            (poly(1e-7), 1e-4, 120, 100, None),
            (
                ScheduleKind::Linear,
                -1.0,
                0,
                10,
                Some(ScheduleError::LearningRate(-1.0)),
            ),
        ];
        for (kind, lr, warmup, total, want) in cases {
            assert_eq!(
                LrSchedule::new(kind, lr, warmup, total).err(),
                want,
                "{kind:?}"
            );
        }
        assert!(ScheduleKind::from_name("cosine_annealing").is_err());
        for name in [
            "constant",
            "constant_with_warmup",
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
        ] {
            assert_eq!(ScheduleKind::from_name(name).unwrap().name(), name);
        }
    }
}
