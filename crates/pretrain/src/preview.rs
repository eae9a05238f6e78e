//! A quick look at what a base model generates, through the samplers every node uses (DDIM
//! here: deterministic, so a preview is a pure function of the model): a sheet of captions x
//! seeds, and the autoencoder's reconstructions of corpus images, as labelled check grids.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use slider_models::checkpoint::StableDiffusion;
use slider_models::sample::{Generator, SampleJob, SamplerKind};
use slider_models::vae::Vae;

use super::PretrainError;
use super::corpus::to_rgb;

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

fn preview_error(e: impl std::fmt::Display) -> PretrainError {
    PretrainError::Config(format!("preview: {e}"))
}

/// Generates `captions x seeds` images with `model` (UNet, VAE and CLIP-L required), each with
/// an empty negative prompt.
pub fn generate(
    model: &StableDiffusion,
    config: &PreviewConfig,
    device: &Device,
) -> Result<Vec<Vec<image::RgbImage>>, PretrainError> {
    let generator = Generator::from_model(model.clone(), device).map_err(preview_error)?;
    config
        .captions
        .iter()
        .map(|caption| {
            config
                .seeds
                .iter()
                .map(|&seed| {
                    let job = SampleJob {
                        prompt: caption.clone(),
                        negative_prompt: String::new(),
                        seed,
                        steps: config.steps,
                        cfg_scale: f64::from(config.cfg_scale),
                        sampler: SamplerKind::Ddim,
                        width: config.size,
                        height: config.size,
                    };
                    generator.generate(&job, &[]).map_err(preview_error)
                })
                .collect()
        })
        .collect()
}

/// Writes `generate`'s images as one labelled sheet: a row per caption, a column per seed.
pub fn write_samples(
    path: &Path,
    grid: &[Vec<image::RgbImage>],
    config: &PreviewConfig,
) -> Result<(), PretrainError> {
    let x: Vec<String> = config.seeds.iter().map(|s| format!("seed {s}")).collect();
    let y: Vec<String> = config
        .captions
        .iter()
        .map(|c| {
            if c.is_empty() {
                "(no caption)".into()
            } else {
                c.clone()
            }
        })
        .collect();
    let title = format!("DDIM, {} steps, CFG {}", config.steps, config.cfg_scale);
    let sheet = slider_grid::compose(grid, &x, &y, Some(&title)).map_err(preview_error)?;
    slider_grid::write_png(path, &sheet, &[]).map_err(preview_error)
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
    let labels = ["original".to_owned(), "reconstruction".to_owned()];
    let sheet = slider_grid::compose(&rows, &[], &labels, None).map_err(preview_error)?;
    slider_grid::write_png(path, &sheet, &[]).map_err(preview_error)?;
    Ok(error)
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
