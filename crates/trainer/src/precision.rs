//! Mixed precision as kohya's `mixed_precision`: the dtypes the frozen model is held and
//! computed in, and fp16's dynamic loss scale (PyTorch's `GradScaler`, which kohya's
//! accelerate uses for fp16). bf16 has f32's exponent range and needs no scale.

use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

use slider_models::checkpoint::Precision;
use slider_protocol::names::MixedPrecision;

/// The dtypes of the UNet and the VAE: the `mixed_precision` dtype for both, except the VAE
/// under `no_half_vae`. The LoRA factors, their gradients, the optimizer and the loss stay
/// f32 whatever this says.
pub fn model_precision(mixed: MixedPrecision, no_half_vae: bool) -> Precision {
    let unet = match mixed {
        MixedPrecision::No => FloatDType::F32,
        MixedPrecision::Fp16 => FloatDType::F16,
        MixedPrecision::Bf16 => FloatDType::BF16,
    };
    Precision {
        unet,
        vae: if no_half_vae { FloatDType::F32 } else { unet },
    }
}

/// The first scale (`GradScaler`'s `init_scale`).
const INITIAL_SCALE: f32 = 65536.0;
/// Steps without an overflow before the scale doubles (`growth_interval`).
const GROWTH_INTERVAL: usize = 2000;

/// fp16's dynamic loss scale: the loss is multiplied by `scale` before the backward pass so
/// small gradients survive fp16, and the factor gradients are divided by it. A step whose
/// gradients are not finite is skipped (factors and optimizer unchanged) and halves the
/// scale; every [`GROWTH_INTERVAL`] finite steps in a row double it. Part of the checkpoint,
/// so a resumed run scales as the uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f32,
    /// Finite steps since the scale last changed.
    pub good_steps: usize,
    /// Steps skipped so far; the learning-rate schedule does not count them.
    #[serde(default)]
    pub skipped: usize,
}

impl LossScaler {
    /// A scaler for fp16, none otherwise.
    pub fn for_precision(mixed: MixedPrecision) -> Option<Self> {
        (mixed == MixedPrecision::Fp16).then_some(Self {
            scale: INITIAL_SCALE,
            good_steps: 0,
            skipped: 0,
        })
    }

    /// After a step: `finite` tells whether every unscaled gradient was finite (the step was
    /// taken) or not (it was skipped).
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps == GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
            self.skipped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fp16_scales_and_only_half_vaes_follow_the_unet() {
        assert!(LossScaler::for_precision(MixedPrecision::No).is_none());
        assert!(LossScaler::for_precision(MixedPrecision::Bf16).is_none());
        assert!(LossScaler::for_precision(MixedPrecision::Fp16).is_some());
        let p = model_precision(MixedPrecision::Bf16, false);
        assert_eq!((p.unet, p.vae), (FloatDType::BF16, FloatDType::BF16));
        let p = model_precision(MixedPrecision::Fp16, true);
        assert_eq!((p.unet, p.vae), (FloatDType::F16, FloatDType::F32));
        let p = model_precision(MixedPrecision::No, false);
        assert_eq!((p.unet, p.vae), (FloatDType::F32, FloatDType::F32));
    }

    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_the_interval() {
        let mut s = LossScaler::for_precision(MixedPrecision::Fp16).unwrap();
        s.update(false);
        assert_eq!((s.scale, s.good_steps, s.skipped), (32768.0, 0, 1));
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!((s.scale, s.good_steps), (32768.0, GROWTH_INTERVAL - 1));
        s.update(true);
        assert_eq!((s.scale, s.good_steps, s.skipped), (65536.0, 0, 1));
    }
}
