//! A quick look at what a base model generates: deterministic DDIM (eta 0, SD's "leading"
//! timestep spacing with offset 1) with classifier-free guidance, a grid of captions x seeds
//! written as one PNG. Enough to judge a pretraining run; the samplers proper live elsewhere.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::PretrainError;
use super::corpus::to_rgb;
use slider_models::checkpoint::StableDiffusion;
use slider_models::ddpm::NoiseSchedule;
use slider_models::tokenizer::Tokenizer;
use slider_models::vae::{SD1_SCALING_FACTOR, Vae};

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewConfig {
    /// One grid row per caption.
    pub captions: Vec<String>,
    /// One grid column per seed.
    pub seeds: Vec<u64>,
    /// DDIM steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub cfg_scale: f32,
    /// Image side in pixels (a multiple of the VAE's downsampling).
    pub size: usize,
}

/// Generates `captions x seeds` images with `model` (UNet, VAE and CLIP-L required).
pub fn generate(
    model: &StableDiffusion,
    config: &PreviewConfig,
    device: &Device,
) -> Result<Vec<Vec<image::RgbImage>>, PretrainError> {
    let (Some(vae), Some(text)) = (&model.vae, &model.text_l) else {
        return Err(PretrainError::Config(
            "previews need a model with a VAE and a CLIP-L text encoder".into(),
        ));
    };
    let tokenizer = Tokenizer::clip().map_err(|e| PretrainError::Config(e.to_string()))?;
    let encode = |caption: &str| {
        let ids = super::token_ids(&tokenizer, caption);
        let n = ids.len();
        text.forward(Tensor::<2, Int>::from_data(
            TensorData::new(ids, [1, n]),
            device,
        ))
        .last
    };
    let downsample = 1usize << model.spec.vae.as_ref().map_or(0, |v| v.ch_mult.len() - 1);
    let side = config.size / downsample;
    let schedule = NoiseSchedule::stable_diffusion();
    let ac = schedule.alphas_cumprod();
    let steps = config.steps.clamp(1, ac.len());
    let ratio = ac.len() / steps;
    let timesteps: Vec<usize> = (0..steps).rev().map(|i| i * ratio + 1).collect();
    let uncond = encode("");

    let mut grid = Vec::with_capacity(config.captions.len());
    for caption in &config.captions {
        let cond = encode(caption);
        let context = Tensor::cat(vec![uncond.clone(), cond], 0);
        let mut row = Vec::with_capacity(config.seeds.len());
        for &seed in &config.seeds {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let n = 4 * side * side;
            let noise: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
            let mut x = Tensor::<4>::from_data(TensorData::new(noise, [1, 4, side, side]), device);
            for &t in &timesteps {
                let t = t.min(ac.len() - 1);
                let input = Tensor::cat(vec![x.clone(), x.clone()], 0);
                let tt = Tensor::<1>::from_data(TensorData::new(vec![t as f32; 2], [2]), device);
                let eps = model.unet.forward(input, tt, context.clone(), None);
                let mut halves = eps.chunk(2, 0);
                let (Some(e_c), Some(e_u)) = (halves.pop(), halves.pop()) else {
                    return Err(PretrainError::Config("guidance batch lost a half".into()));
                };
                let eps = e_u.clone() + (e_c - e_u).mul_scalar(config.cfg_scale);
                let a = f64::from(ac[t]);
                let a_prev = if t >= ratio {
                    f64::from(ac[t - ratio])
                } else {
                    f64::from(ac[0])
                };
                let x0 = (x - eps.clone().mul_scalar((1.0 - a).sqrt())).div_scalar(a.sqrt());
                x = x0.mul_scalar(a_prev.sqrt()) + eps.mul_scalar((1.0 - a_prev).sqrt());
            }
            let image = vae.decode(x.div_scalar(SD1_SCALING_FACTOR));
            let [_, _, h, w] = image.dims();
            let values = image
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            row.push(to_rgb(&values, h, w));
        }
        grid.push(row);
    }
    Ok(grid)
}

/// How many corpus images [`write_reconstructions`] shows.
pub const RECONSTRUCTED_IMAGES: usize = 12;

/// Encodes (posterior mean) and decodes the first [`RECONSTRUCTED_IMAGES`] of `images`
/// (`[n, 3, h, w]` in [-1, 1]), writes originals over reconstructions to `path` as a PNG and
/// returns the mean absolute error.
pub fn write_reconstructions(
    vae: &Vae,
    images: &Tensor<4>,
    path: &Path,
) -> Result<f32, PretrainError> {
    let [n, _, h, w] = images.dims();
    let n = n.min(RECONSTRUCTED_IMAGES);
    let x = images.clone().narrow(0, 0, n);
    let (mean, _) = vae.encode(x.clone());
    let recon = vae.decode(mean);
    let error = (recon.clone() - x.clone())
        .abs()
        .mean()
        .into_scalar::<f32>();
    let rows: Vec<Vec<image::RgbImage>> = [x, recon]
        .into_iter()
        .map(|t| {
            let v = t
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            v.chunks(3 * h * w).map(|c| to_rgb(c, h, w)).collect()
        })
        .collect();
    write_png(path, &tile(&rows))?;
    Ok(error)
}

/// Tiles rows of equally sized images with a 2-pixel white gutter.
pub fn tile(rows: &[Vec<image::RgbImage>]) -> image::RgbImage {
    let (w, h) = rows
        .first()
        .and_then(|r| r.first())
        .map_or((0, 0), |i| i.dimensions());
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let gap = 2;
    let mut out = image::RgbImage::from_pixel(
        cols * (w + gap) + gap,
        rows.len() as u32 * (h + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let x = gap + c as u32 * (w + gap);
            let y = gap + r as u32 * (h + gap);
            image::imageops::replace(&mut out, img, i64::from(x), i64::from(y));
        }
    }
    out
}

/// Writes `image` as a PNG atomically (temp file beside it, fsync, rename).
pub fn write_png(path: &Path, image: &image::RgbImage) -> Result<(), PretrainError> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| PretrainError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
    write_atomic(path, &bytes)
}

/// Creates the parent directory, then writes `bytes` to `path` atomically (temp file in the
/// same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PretrainError> {
    let io = |source| PretrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    slider_atomic::write(path, bytes).map_err(io)
}
