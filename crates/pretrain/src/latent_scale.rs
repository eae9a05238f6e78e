//! Makes a freshly trained autoencoder speak SD1's latent convention: `mean * 0.18215` should
//! have unit variance. We measure the latent spread `std` over the corpus and fold
//! `k = 1 / (0.18215 * std)` into the 1x1 convolutions around the latent space: `quant_conv`'s
//! mean outputs are multiplied by `k` and its log-variance outputs shifted by `2 ln k` (the
//! same distribution, scaled), and `post_quant_conv`'s input weights divided by `k`, so that
//! `decode(k z) == decode_before(z)`. An exact reparametrisation: only the latents' units change.

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};

use slider_models::vae::Vae;

/// Standard deviation of all latent values (the encoder means) of `images` `[n, 3, h, w]`,
/// encoded in batches of `batch`.
pub fn latent_std(vae: &Vae, images: &Tensor<4>, batch: usize) -> f64 {
    let [n, ..] = images.dims();
    let (mut sum, mut sum_sq, mut count) = (0.0f64, 0.0f64, 0usize);
    for start in (0..n).step_by(batch.max(1)) {
        let len = batch.max(1).min(n - start);
        let (mean, _) = vae.encode(images.clone().narrow(0, start, len));
        let values = mean
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        for v in values {
            let v = f64::from(v);
            sum += v;
            sum_sq += v * v;
            count += 1;
        }
    }
    let count = count.max(1) as f64;
    let mean = sum / count;
    (sum_sq / count - mean * mean).max(0.0).sqrt()
}

/// Multiplies the latent space of `vae` by `k` (see the module docs); `k > 0`.
pub fn fold_latent_scale(mut vae: Vae, k: f32) -> Vae {
    let device = vae.quant_conv.weight.val().device();
    let [out2, ..] = vae.quant_conv.weight.val().dims();
    let z = out2 / 2;
    let per_output: Vec<f32> = (0..out2).map(|c| if c < z { k } else { 1.0 }).collect();
    let scale = Tensor::<1>::from_data(TensorData::new(per_output, [out2]), &device);
    let shift: Vec<f32> = (0..out2)
        .map(|c| if c < z { 0.0 } else { 2.0 * k.ln() })
        .collect();
    let shift = Tensor::<1>::from_data(TensorData::new(shift, [out2]), &device);

    let w = &vae.quant_conv.weight;
    let scaled = w.val() * scale.clone().reshape([out2, 1, 1, 1]);
    vae.quant_conv.weight = Param::initialized(w.id, scaled);
    if let Some(b) = &vae.quant_conv.bias {
        let shifted = b.val() * scale + shift;
        vae.quant_conv.bias = Some(Param::initialized(b.id, shifted));
    }

    let w = &vae.post_quant_conv.weight;
    let [_, z_in, ..] = w.val().dims();
    let divided = w.val().div_scalar(k);
    debug_assert_eq!(z_in, z);
    vae.post_quant_conv.weight = Param::initialized(w.id, divided);
    vae
}

/// Sets the bias of `quant_conv`'s log-variance outputs to `value` (training starts from a
/// posterior of std `exp(value / 2)`).
pub fn start_log_variance(mut vae: Vae, value: f32) -> Vae {
    if let Some(b) = &vae.quant_conv.bias {
        let [out2] = b.val().dims();
        let device = b.val().device();
        let v: Vec<f32> = (0..out2)
            .map(|c| if c < out2 / 2 { 0.0 } else { value })
            .collect();
        let t = Tensor::<1>::from_data(TensorData::new(v, [out2]), &device);
        vae.quant_conv.bias = Some(Param::initialized(b.id, t));
    }
    vae
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::init_seeded;
    use burn::tensor::{Device, Distribution};
    use slider_models::vae::VaeConfig;

    /// A two-level autoencoder, small enough for a test.
    fn small_vae() -> VaeConfig {
        VaeConfig {
            in_channels: 3,
            ch: 32,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            z_channels: 4,
            norm_num_groups: 32,
        }
    }

    fn relative_error(a: Tensor<4>, b: Tensor<4>) -> f32 {
        let diff = (a - b.clone()).square().sum().sqrt().into_scalar::<f32>();
        diff / b.square().sum().sqrt().into_scalar::<f32>()
    }

    #[test]
    fn folding_the_scale_is_an_exact_reparametrisation() {
        let device = Device::flex();
        let vae = init_seeded(small_vae().init(&device), "vae", 7, |_| false);
        let image = Tensor::<4>::random([2, 3, 16, 16], Distribution::Uniform(-1.0, 1.0), &device);
        let (mean, logvar) = vae.encode(image.clone());
        let decoded = vae.decode(mean.clone());

        for k in [3.5f32, 0.25] {
            let folded = fold_latent_scale(vae.clone(), k);
            let (mean_k, logvar_k) = folded.encode(image.clone());
            assert!(relative_error(mean_k.clone(), mean.clone().mul_scalar(k)) < 1e-6);
            let shifted = logvar.clone().add_scalar(2.0 * k.ln());
            assert!(relative_error(logvar_k, shifted) < 1e-5);
            let decoded_k = folded.decode(mean.clone().mul_scalar(k));
            assert!(relative_error(decoded_k, decoded.clone()) < 1e-5, "k = {k}");
        }
    }

    #[test]
    fn the_measured_std_becomes_sd1_unit_variance() {
        let device = Device::flex();
        let vae = init_seeded(small_vae().init(&device), "vae", 3, |_| false);
        let images = Tensor::<4>::random([4, 3, 16, 16], Distribution::Uniform(-1.0, 1.0), &device);
        let std = latent_std(&vae, &images, 3);
        let k = 1.0 / (slider_models::vae::SD1_SCALING_FACTOR as f64 * std);
        let folded = fold_latent_scale(vae, k as f32);
        let scaled_std =
            latent_std(&folded, &images, 4) * slider_models::vae::SD1_SCALING_FACTOR as f64;
        assert!((scaled_std - 1.0).abs() < 1e-4, "{scaled_std}");
    }
}
