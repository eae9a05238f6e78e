//! `slider-models`: the Stable Diffusion models on burn — the UNet (SD1.x, SDXL and a `tiny`
//! configuration of the same architecture), the KL autoencoder, the CLIP text encoders and
//! CLIP's tokenizer — loaded from the single-file checkpoints users have (original LDM/SGM key
//! layout) and equal to the reference implementation within 1e-4 relative error.
//!
//! Compute runs on burn's pure-Rust `flex` CPU backend by default; the `wgpu` and `cuda`
//! features add GPUs, chosen at run time with [`open_device`].
//!
//! ```no_run
//! use slider_models::{Checkpoint, StableDiffusion, Tokenizer, Padding, open_device};
//! use burn::tensor::{Int, Tensor, TensorData};
//!
//! let device = open_device("cpu")?;
//! let ckpt = Checkpoint::open("model.safetensors")?;
//! let model = StableDiffusion::load(&ckpt, &device)?; // fails with every bad key listed
//! let ids = Tokenizer::clip()?.tokenize("a photo of a cat", Padding::EndToken);
//! let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
//! let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 77]), &device);
//! let context = model.text_l.as_ref().map(|clip| clip.forward(ids).last);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod attention;
pub mod bench;
pub mod checkpoint;
pub mod clip;
pub mod ddpm;
pub mod device;
pub mod diffusers_config;
#[doc(hidden)]
pub mod fixtures;
pub mod forward;
pub mod layers;
pub mod lora;
pub mod sample;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use burn;
pub use checkpoint::{
    Checkpoint, CheckpointError, Family, KeyReport, ModelSpec, Precision, StableDiffusion,
    StoreDtype, check_keys, check_values, write_random_checkpoint,
};
pub use clip::{ClipTextModel, OpenClipText, TextConfig, TextOutput};
pub use ddpm::{DdpmError, NoiseSchedule, apply_noise_offset, standard_normal};
pub use device::{
    DeviceError, DeviceSpec, WgpuAdapter, describe_device, open_device, parse_device,
    wgpu_adapter_count,
};
pub use diffusers_config::{BaseConfig, ConfigError};
pub use forward::{ForwardError, HostTensor};
pub use lora::{AdapterError, LoraNetwork, lora_targets};
pub use tokenizer::{Padding, Tokenizer};
pub use unet::{Heads, UNet, UNetConfig, UNetInput};
pub use vae::{Vae, VaeConfig};
