//! Does the model follow its captions? The UNet's denoising loss on a fixed set of corpus
//! images, each with its own caption, against the same images with another image's caption.
//! A model that ignores its text has the same loss both ways; the more the right caption
//! lowers the loss, the more the text steers what the model draws.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use slider_models::clip::ClipTextModel;
use slider_models::ddpm::standard_normal;
use slider_models::ddpm::{DdpmError, NoiseSchedule};
use slider_models::unet::UNet;

/// Images in the probe set (fewer when the corpus is smaller).
pub const PROBES: usize = 64;

/// Timesteps of the probes, spread evenly over this range: the noisy half of the schedule,
/// where the caption is most of what tells the model what to draw.
pub const TIMESTEPS: std::ops::Range<usize> = 300..950;

/// The probe set's noise is the same for every model measured.
const PROBE_SEED: u64 = 0x5eed_ca97;

/// Denoising losses of the probe set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaptionGain {
    /// Mean squared error of the noise prediction, each image with its own caption.
    pub own: f32,
    /// The same with the next probe image's caption (another identity, view and colours).
    pub other: f32,
}

impl CaptionGain {
    /// `1 - own / other`: 0 when the captions make no difference, larger the more the right
    /// caption helps (negative would mean a wrong caption helps more).
    pub fn gain(&self) -> f32 {
        if self.other > 0.0 {
            1.0 - self.own / self.other
        } else {
            0.0
        }
    }
}

/// Measures [`CaptionGain`] on up to [`PROBES`] of `latents` (spaced evenly through the
/// corpus, so consecutive probes are different identities) with their token ids `captions`,
/// `batch` images per forward pass.
pub fn measure(
    unet: &UNet,
    text: &ClipTextModel,
    latents: &Tensor<4>,
    captions: &[Vec<i64>],
    noise_schedule: &NoiseSchedule,
    batch: usize,
) -> Result<CaptionGain, DdpmError> {
    let device = latents.device();
    let [n, c, h, w] = latents.dims();
    let n = n.min(captions.len());
    let m = PROBES.min(n);
    if m == 0 {
        return Ok(CaptionGain {
            own: 0.0,
            other: 0.0,
        });
    }
    let picks: Vec<usize> = (0..m).map(|k| k * n / m).collect();
    let span = TIMESTEPS.end - TIMESTEPS.start;
    let timesteps: Vec<usize> = (0..m).map(|k| TIMESTEPS.start + k * span / m).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(PROBE_SEED);
    let noise: Tensor<4> = standard_normal(&mut rng, [m, c, h, w], &device);
    let width = captions[picks[0]].len();

    let (mut own, mut other) = (0.0f64, 0.0f64);
    for start in (0..m).step_by(batch.max(1)) {
        let len = batch.max(1).min(m - start);
        let rows = start..start + len;
        let x0 = latents
            .clone()
            .select(0, ids_tensor(&picks[rows.clone()], &device));
        let noise = noise.clone().narrow(0, start, len);
        let noisy = noise_schedule.add_noise(x0, noise.clone(), &timesteps[rows.clone()])?;
        let t = Tensor::<1>::from_data(
            TensorData::new(
                timesteps[rows.clone()]
                    .iter()
                    .map(|&t| t as f32)
                    .collect::<Vec<_>>(),
                [len],
            ),
            &device,
        );
        // Sum of squared errors with the captions of these corpus images, one per row.
        let squared_error = |caption_rows: Vec<usize>| {
            let ids: Vec<i64> = caption_rows
                .iter()
                .flat_map(|&i| captions[i].iter().copied())
                .collect();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [len, width]), &device);
            let context = text.forward(ids).last;
            let pred = unet.forward(noisy.clone(), t.clone(), context, None);
            f64::from((pred - noise.clone()).square().sum().into_scalar::<f32>())
        };
        own += squared_error(rows.clone().map(|k| picks[k]).collect());
        other += squared_error(rows.clone().map(|k| picks[(k + 1) % m]).collect());
    }
    let count = (m * c * h * w) as f64;
    Ok(CaptionGain {
        own: (own / count) as f32,
        other: (other / count) as f32,
    })
}

fn ids_tensor(picks: &[usize], device: &Device) -> Tensor<1, Int> {
    let idx: Vec<i64> = picks.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(idx, [picks.len()]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TinyBase;

    fn model() -> (UNet, ClipTextModel, Device) {
        let device = Device::flex();
        let spec = TinyBase::small_test().spec();
        // Random everywhere (no zero-initialised outputs), so the prediction depends on the
        // text from the start.
        let unet = spec.unet.init(&device);
        let text = spec.text_l.as_ref().map(|c| c.init_hf(&device));
        (
            unet,
            text.expect("the tiny base has a text encoder"),
            device,
        )
    }

    fn captions(distinct: bool, n: usize) -> Vec<Vec<i64>> {
        (0..n)
            .map(|i| {
                let token = if distinct { 400 + i as i64 * 37 } else { 400 };
                let mut ids = vec![49406, token, token + 1];
                ids.resize(77, 49407);
                ids
            })
            .collect()
    }

    #[test]
    fn identical_captions_give_no_gain_and_distinct_ones_change_the_loss() {
        let (unet, text, device) = model();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let latents: Tensor<4> = standard_normal(&mut rng, [6, 4, 8, 8], &device);
        let schedule = NoiseSchedule::stable_diffusion();

        let same = measure(&unet, &text, &latents, &captions(false, 6), &schedule, 4).unwrap();
        assert!(same.own > 0.0 && same.own.is_finite(), "{same:?}");
        assert_eq!(same.own, same.other, "one caption for all: nothing to gain");
        assert_eq!(same.gain(), 0.0);

        let distinct = measure(&unet, &text, &latents, &captions(true, 6), &schedule, 4).unwrap();
        assert_ne!(
            distinct.own, distinct.other,
            "a model whose output depends on the text must score the captions differently"
        );
        // The batch size only groups the work.
        let one_by_one = measure(&unet, &text, &latents, &captions(true, 6), &schedule, 1).unwrap();
        assert!((one_by_one.own - distinct.own).abs() <= 1e-5 * distinct.own);
        assert!((one_by_one.other - distinct.other).abs() <= 1e-5 * distinct.other);
    }
}
