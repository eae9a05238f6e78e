//! LoRAs baked into a single-file Stable Diffusion checkpoint, as kohya-ss/sd-scripts'
//! `networks/merge_lora.py` (SD1.x) and `networks/sdxl_merge_lora.py` (SDXL) do:
//! `W += ratio * alpha / rank * up @ down` for every module of every LoRA, LoCon (3x3 conv)
//! modules and text-encoder modules included, in the checkpoint's own keys, order and
//! dtypes (unless `save_precision` is given).
//!
//! Differences from kohya, on purpose: every LoRA module must adapt a weight of the
//! checkpoint with its shape, or nothing is written and the error names the module (kohya
//! logs "no module found" and goes on); NaN or infinite values in the checkpoint or a LoRA are
//! an error; the checkpoint is streamed tensor by tensor (read once, never mapped, one tensor
//! in memory at a time) instead of being converted to diffusers and back, so keys kohya's
//! conversion would drop or rename are kept as they are; the sum is formed in f64 and rounded
//! once into the stored dtype.
//!
//! ```no_run
//! use std::path::Path;
//! use slider_bake::{BakeOptions, merge_into_model};
//! let report = merge_into_model(
//!     Path::new("sd15.safetensors"),
//!     &[(Path::new("small.safetensors").to_path_buf(), 1.0)],
//!     Path::new("merged.safetensors"),
//!     &BakeOptions::default(),
//! )?;
//! assert!(report.modules > 0);
//! # Ok::<(), slider_bake::BakeError>(())
//! ```

mod bake;
mod error;
pub mod targets;
pub mod tensors;

use std::path::{Path, PathBuf};

pub use bake::{BakeOptions, BakeReport, LoraInput, bake};
pub use error::{BakeError, Misfit};
use slider_lora::Lora;

/// Reads each LoRA (validated by `slider-lora`) and bakes them, with their ratios, into the
/// checkpoint `base`, writing `save_to` atomically.
pub fn merge_into_model(
    base: &Path,
    models: &[(PathBuf, f64)],
    save_to: &Path,
    opts: &BakeOptions,
) -> Result<BakeReport, BakeError> {
    let loras: Vec<Lora> = models
        .iter()
        .map(|(p, _)| Lora::load(p))
        .collect::<Result<_, _>>()?;
    let inputs: Vec<LoraInput<'_>> = models
        .iter()
        .zip(&loras)
        .map(|((label, ratio), lora)| LoraInput {
            label,
            lora,
            ratio: *ratio,
        })
        .collect();
    bake(base, &inputs, save_to, opts, &|| false)?
        .ok_or_else(|| BakeError::InvalidArgument("stopped".into()))
}
