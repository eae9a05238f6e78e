//! Text-to-image sampling with a loaded SD1- or SDXL-family checkpoint: the four samplers of
//! the recipe language (equal to diffusers' schedulers for SD1.5's config, see [`schedule`]),
//! classifier-free guidance with a negative prompt, seeded noise, and LoRAs applied to the UNet
//! at any weight; the whole loop equals diffusers' text-to-image pipelines given the same text
//! conditioning and initial noise.
//!
//! ```no_run
//! use std::path::Path;
//! use slider_models::sample::{Generator, SampleJob, SamplerKind};
//! use slider_models::open_device;
//!
//! let device = open_device("cpu")?;
//! let generator = Generator::load(Path::new("assets/tiny-sd/tiny-sd.safetensors"), &device)?;
//! let job = SampleJob {
//!     prompt: "1girl, red hair, side view".into(),
//!     negative_prompt: String::new(),
//!     seed: 3,
//!     steps: 20,
//!     cfg_scale: 7.0,
//!     sampler: SamplerKind::EulerAncestral,
//!     width: 64,
//!     height: 64,
//! };
//! let slider = slider_lora::Lora::load(Path::new("eyesize.safetensors"))?;
//! let image = generator.generate(&job, &[(&slider, 1.5)])?; // an image::RgbImage
//! # let _ = image;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod generator;
pub mod schedule;
#[doc(hidden)]
pub mod test_support;

pub use generator::{Generator, classifier_free_guidance};
pub use schedule::{SamplerKind, ScheduleError, Scheduler, UnknownSampler};

use crate::checkpoint::CheckpointError;
use crate::lora::AdapterError;
use crate::tokenizer::TokenizerError;

/// One image to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleJob {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from (the unconditional half of guidance; empty for none).
    pub negative_prompt: String,
    /// Seeds the initial noise (and an ancestral sampler's noise at every step).
    pub seed: u64,
    /// Sampling steps.
    pub steps: usize,
    /// Classifier-free guidance scale; at 1 or below the negative prompt is not evaluated.
    pub cfg_scale: f64,
    /// The sampler.
    pub sampler: SamplerKind,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
}

impl SampleJob {
    /// The settings in AUTOMATIC1111's `parameters` text format (prompt, `Negative prompt:`,
    /// then `Steps: .., Sampler: .., CFG scale: .., Seed: .., Size: WxH`).
    pub fn a1111_parameters(&self) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        text.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}",
            self.steps,
            self.sampler.a1111_name(),
            self.cfg_scale,
            self.seed,
            self.width,
            self.height
        ));
        text
    }
}

/// Why an image cannot be generated.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// The base model.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The tokenizer.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A LoRA that does not fit the base model.
    #[error("LoRA does not fit the base model: {0}")]
    Adapter(#[from] AdapterError),
    /// Steps or sampler.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// The checkpoint lacks a part sampling needs.
    #[error("the base model has no {0}; sampling needs the UNet, the VAE and the text encoder(s)")]
    MissingPart(&'static str),
    /// A size the UNet and VAE cannot process.
    #[error(
        "{width}x{height} is not a size this model can generate: width and height must be positive multiples of {multiple} (the VAE's and the UNet's downsampling together)"
    )]
    Size {
        /// Requested width.
        width: usize,
        /// Requested height.
        height: usize,
        /// What both must be multiples of.
        multiple: usize,
    },
    /// A tensor could not be read back from the device.
    #[error("reading the image back from the device: {0}")]
    Readback(String),
}
