//! kohya-format LoRA files: read, write, inspect; exact merge, SVD merge and resize.
//!
//! Files are read into memory (never mapped) with their headers validated as the
//! safetensors library validates them (f32, f16, bf16; kohya's `lora_down`/`lora_up`/`alpha`
//! names, PEFT's `lora_A`/`lora_B` on input), and written atomically, byte for byte as
//! Python's safetensors writes them, with kohya's `sshs_*` hashes. The operations follow
//! kohya-ss/sd-scripts' semantics but never build a full `out x in` delta when the LoRA's
//! rank is smaller: QR of the stacked factors, SVD of the small core. Everything runs in
//! parallel over modules.
//!
//! Layouts: SD1.x and SDXL UNets (kohya names), and the FLUX.1 and SD3.5 (Large, Medium)
//! transformers in kohya, diffusers / ai-toolkit and ComfyUI names (`transformer.rs`),
//! detected by shape ([`detect_layout`]) and converted between exactly ([`convert`]);
//! merges convert inputs of one model in different layouts to the first one's.
//!
//! ```
//! use slider_lora::{svd_merge, resize, synth, DynamicMethod, ResizeOptions, SvdMergeOptions};
//!
//! let big = synth::random_lora(synth::Layout::Tiny, 4, 1.0, 1);
//! let small = synth::random_lora(synth::Layout::Tiny, 4, 1.0, 2);
//! // slider = +1.5 big - 1.5 small, re-factored to rank 8 (kohya's svd_merge_lora.py).
//! let slider = svd_merge(&[&big, &small], &[1.5, -1.5], &SvdMergeOptions::default()).unwrap();
//! let opts = ResizeOptions { new_rank: 4, new_conv_rank: 4, dynamic: Some(DynamicMethod::SvFro(0.75)) };
//! let (resized, stats) = resize(&slider, &opts).unwrap();
//! assert_eq!(stats.len(), resized.modules.len());
//! assert!(stats.iter().all(|s| s.new_rank <= 4));
//! ```

pub mod bench;
mod combine;
mod compare;
pub mod convert;
pub mod dense;
mod error;
mod file;
mod header;
pub mod inspect;
pub mod layout;
mod linalg;
pub mod lint;
mod lowrank;
mod merge;
mod module;
mod resize;
mod svd_merge;
pub mod synth;
pub mod transformer;
pub mod unet_names;

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

pub use compare::{delta_relative_error, module_delta_relative_error};
pub use convert::{ConvertReport, convert};
pub use error::{LayoutMismatch, LoraError};
pub use file::kohya_hashes;
pub use layout::{LayoutReport, UnetLayout, detect as detect_layout};
pub use merge::merge;
pub use module::{AlphaStorage, Module, ModuleKind, TensorDtype};
pub use resize::{
    DynamicMethod, ModuleResizeStats, RankRule, ResizeOptions, new_rank_for_spectrum,
    new_rank_for_spectrum_by, resize, resize_by_rule, resize_metadata,
};
pub use svd_merge::{SvdMergeOptions, svd_merge};
pub use transformer::{Model, Naming};

/// A LoRA: its adapted modules by kohya name (`lora_unet_...`) and its string metadata.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Lora {
    pub modules: BTreeMap<String, Module>,
    pub metadata: BTreeMap<String, String>,
}

/// Element type of the weights in a written file (kohya's `--save_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl FromStr for Precision {
    type Err = LoraError;

    /// kohya's spellings: `float` (also `fp32`, `f32`), `fp16`, `bf16`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "float" | "fp32" | "f32" | "float32" => Ok(Precision::F32),
            "fp16" | "f16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(LoraError::InvalidArgument(format!(
                "unknown precision `{other}` (expected float, fp16 or bf16)"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "float",
            Precision::F16 => "fp16",
            Precision::Bf16 => "bf16",
        })
    }
}

impl Lora {
    /// Reads a LoRA safetensors file (into memory, never mapped: a file truncated while it
    /// is read is an error, not a signal). Errors name the file and the key.
    pub fn load(path: &Path) -> Result<Lora, LoraError> {
        file::load(path)
    }

    /// Parses the bytes of a LoRA safetensors file; `label` names it in errors.
    pub fn from_bytes(label: &Path, bytes: &[u8]) -> Result<Lora, LoraError> {
        file::parse(label, bytes)
    }

    /// Writes the LoRA atomically with weights (and float alphas) in `precision`, setting
    /// `sshs_model_hash` / `sshs_legacy_hash` as kohya computes them. Refuses a LoRA that
    /// fails [`Lora::validate`] (it would write a file whose header lies).
    pub fn save(&self, path: &Path, precision: Precision) -> Result<(), LoraError> {
        self.validate()?;
        file::write_atomic(path, &self.to_bytes(precision))
    }

    /// Checks every module with [`Module::check`]; the first failure names its module.
    /// LoRAs read by [`Lora::load`] always pass; operations check their inputs with this.
    pub fn validate(&self) -> Result<(), LoraError> {
        use rayon::prelude::*;
        // In parallel; the error is still the first failing module in name order.
        let first_bad = self
            .modules
            .par_iter()
            .find_map_first(|(name, m)| m.check().err().map(|detail| (name, detail)));
        match first_bad {
            None => Ok(()),
            Some((name, detail)) => Err(LoraError::BadModule {
                module: name.clone(),
                detail,
            }),
        }
    }

    /// The exact bytes `save` writes.
    pub fn to_bytes(&self, precision: Precision) -> Vec<u8> {
        file::to_bytes(self, precision)
    }

    /// The layout this LoRA targets.
    pub fn layout(&self) -> LayoutReport {
        layout::detect(self)
    }
}
