//! Test support for the crates whose tests sample (grids, evaluation): a small random base and
//! a LoRA with non-zero factors on every target of its UNet. Not part of the API.

use std::path::Path;

use burn::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Generator;
use crate::checkpoint::{ModelSpec, StoreDtype, write_random_checkpoint};
use crate::lora::{LoraNetwork, lora_targets};

pub fn small_generator(dir: &Path) -> Generator {
    let path = dir.join("base.safetensors");
    write_random_checkpoint(&path, &ModelSpec::small_test(), StoreDtype::F32, 5).unwrap();
    Generator::load(&path, &Device::flex()).unwrap()
}

/// A LoRA on every target of `generator`'s UNet with non-zero factors.
pub fn random_lora(generator: &Generator, seed: u64) -> slider_lora::Lora {
    let device = Device::flex();
    let mut network = LoraNetwork::init(&generator.model.unet, 2, 2.0, seed, &device).unwrap();
    let mut lora = network.to_lora().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for m in lora.modules.values_mut() {
        for v in &mut m.up {
            *v = rng.random::<f32>() - 0.5;
        }
    }
    network = LoraNetwork::from_lora(&lora, &generator.model.unet, &device).unwrap();
    assert_eq!(
        network.modules.len(),
        lora_targets(&generator.model.unet).len()
    );
    lora
}
