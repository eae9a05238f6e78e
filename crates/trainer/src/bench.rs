//! The training-step measurement shared by `slider-run bench torch` and the `train_steps`
//! example: the whole trainer ([`train`]) on one generated image with the method's settings
//! (rank 4 / alpha 1 on kohya's targets, CAME at 5e-5, batch 1, UNet only), timed per step.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use burn::tensor::Device;
use slider_models::bench::Runs;
use slider_protocol::names::{LrScheduler, MixedPrecision, Optimizer};
use slider_protocol::params::Precision;

use crate::{TrainConfig, TrainError, train};

/// What [`training_step_seconds`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTimes {
    /// Seconds of each timed step (after the warm-up steps).
    pub seconds: Vec<f64>,
    /// Adapted modules of the trained LoRA.
    pub lora_modules: usize,
}

/// Trains `base` (a checkpoint with UNet, VAE and text encoder) on one generated
/// `resolution` px image for `max(runs.warmup, 1) + runs.repeat` steps in a fresh work folder
/// under `scratch`, and returns the seconds of the timed steps (the last `runs.repeat`; the
/// first step's time also carries the loading, so it is never timed). A step is everything the trainer
/// does per step: timestep and noise, the noisy latent, the forward with LoRA branches, the
/// loss, the backward and CAME's update of every factor. The latent and the caption are
/// computed once before the first step, as in every run.
pub fn training_step_seconds(
    base: &Path,
    resolution: usize,
    runs: Runs,
    scratch: &Path,
    mut each: impl FnMut(usize, f64),
) -> Result<StepTimes, TrainError> {
    let io = |source| TrainError::Io {
        path: scratch.to_path_buf(),
        source,
    };
    let dir = scratch.join(format!("train-{resolution}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let image = dir.join("image.png");
    gradient_image(resolution)
        .save(&image)
        .map_err(|e| TrainError::Image {
            path: image.clone(),
            message: e.to_string(),
        })?;
    let untimed = runs.warmup.max(1);
    let config = method_config(base, &image, resolution, untimed + runs.repeat);
    let device = Device::flex();
    let mut last = Instant::now();
    let mut seconds = Vec::new();
    let outcome = train(
        &config,
        &dir.join("work"),
        &dir.join("out"),
        &device,
        |p| {
            let secs = last.elapsed().as_secs_f64();
            last = Instant::now();
            each(p.step - 1, secs);
            if p.step > untimed {
                seconds.push(secs);
            }
        },
        &AtomicBool::new(false),
    )?;
    let lora_modules = slider_lora::Lora::load(&outcome.lora)?.modules.len();
    // The folder is scratch; a failed removal leaves it for the caller's clean-up.
    let _ = std::fs::remove_dir_all(&dir);
    Ok(StepTimes {
        seconds,
        lora_modules,
    })
}

/// The default recipe's training settings for `steps` steps on one image.
pub fn method_config(base: &Path, image: &Path, resolution: usize, steps: usize) -> TrainConfig {
    TrainConfig {
        base: base.to_path_buf(),
        base_config: None,
        images: vec![image.to_path_buf()],
        caption: "a photo of sks".into(),
        learning_rate: 5e-5,
        unet_lr: None,
        train_batch_size: 1,
        max_train_steps: steps,
        network_dim: 4,
        network_alpha: 1.0,
        conv_dim: None,
        conv_alpha: None,
        lr_scheduler: LrScheduler::ConstantWithWarmup,
        lr_warmup_steps: 1,
        optimizer_type: Optimizer::Came,
        optimizer_args: BTreeMap::new(),
        seed: 0,
        resolution,
        noise_offset: 0.0,
        min_snr_gamma: None,
        mixed_precision: MixedPrecision::No,
        no_half_vae: false,
        gradient_checkpointing: false,
        save_precision: Precision::Float,
        checkpoint_every: 0,
        comment: String::new(),
    }
}

/// A colour gradient, `size` px square.
pub fn gradient_image(size: usize) -> image::RgbImage {
    let s = size.max(1) as u32;
    image::RgbImage::from_fn(s, s, |x, y| {
        image::Rgb([(x * 255 / s) as u8, (y * 255 / s) as u8, 128])
    })
}
