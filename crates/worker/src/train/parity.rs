//! One training step against the reference: the LoRA gradients of our UNet for a fixed latent,
//! noise, timestep and conditioning equal those of diffusers' UNet with the same rank-4 LoRA
//! attached as kohya attaches it (fixtures of `tests/fixtures/make_train_fixtures.py`), within
//! REFERENCE.md's 1e-3 relative Frobenius error, for the SD1-style and SDXL-style tiny models.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use slider_lora::{AlphaStorage, Lora, Module, TensorDtype};

use crate::checkpoint::{Checkpoint, StableDiffusion};
use crate::forward::{HostTensor, read_tensors};
use crate::lora::{Factor, LoraNetwork, lora_targets};
use crate::train::NoiseSchedule;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The factor values of `make_train_fixtures.py`'s `factor_values`, for the `index`-th module
/// in name order: the same f64 formula rounded to f32.
fn factor_values(index: usize, n: usize, down: bool, bound: f64) -> Vec<f32> {
    let m = index as f64;
    (0..n)
        .map(|i| {
            let i = i as f64;
            let v = if down {
                bound * (1.3 + 0.7 * i + 2.1 * m).sin()
            } else {
                0.05 * (0.3 + 1.1 * i + 0.9 * m).cos()
            };
            v as f32
        })
        .collect()
}

fn tensor<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(t.values.clone(), t.shape.clone()), device)
}

fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum();
    (diff / norm).sqrt()
}

/// (checkpoint, step fixture): the SD1-style model (conv projections, diffusers-style names)
/// and the SDXL-style one (linear projections, original names, added conditioning).
#[test]
fn one_step_lora_gradients_equal_the_references() {
    let device = Device::flex();
    for (checkpoint, step) in [
        ("sd1_tiny.safetensors", "train/sd1_step.safetensors"),
        ("sdxl_tiny.safetensors", "train/sdxl_step.safetensors"),
    ] {
        let model = StableDiffusion::load(&Checkpoint::open(fixture(checkpoint)).unwrap(), &device)
            .unwrap();
        let unet = &model.unet;
        let io = read_tensors(&fixture(step)).unwrap();
        let bytes = std::fs::read(fixture(step)).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        let number = |k: &str| meta[k].parse::<f64>().unwrap();
        let (rank, alpha, multiplier) = (
            number("rank") as usize,
            number("alpha"),
            number("multiplier"),
        );

        // Our targets are exactly the modules the reference adapted, under kohya's names.
        let targets = lora_targets(unet);
        let reference_names: Vec<&str> = io
            .keys()
            .filter_map(|k| k.strip_prefix("grad.")?.strip_suffix(".lora_down.weight"))
            .collect();
        let ours: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(ours, reference_names, "{checkpoint}");

        let mut lora = Lora::default();
        for (index, t) in targets.iter().enumerate() {
            let fan_in = t.in_dim * t.kind.window();
            let bound = 1.0 / (t.in_dim as f64).sqrt();
            lora.modules.insert(
                t.name.clone(),
                Module {
                    kind: t.kind,
                    out_dim: t.out_dim,
                    in_dim: t.in_dim,
                    rank,
                    down: factor_values(index, rank * fan_in, true, bound),
                    up: factor_values(index, t.out_dim * rank, false, 0.05),
                    alpha: alpha as f32,
                    alpha_storage: AlphaStorage::Float,
                    dtype: TensorDtype::F32,
                },
            );
        }
        let mut network = LoraNetwork::from_lora(&lora, unet, &device).unwrap();
        for m in network.modules.values_mut() {
            m.down = m.down.clone().tracked();
            m.up = m.up.clone().tracked();
        }

        let timesteps: Vec<usize> = io["timesteps"].values.iter().map(|&t| t as usize).collect();
        let noise: Tensor<4> = tensor(&io["noise"], &device);
        let noisy = NoiseSchedule::stable_diffusion()
            .add_noise(tensor(&io["x0"], &device), noise.clone(), &timesteps)
            .unwrap();
        let noisy_values = noisy.clone().into_data().try_to_vec::<f32>().unwrap();
        let err = relative_error(&noisy_values, &io["noisy"].values);
        assert!(err < 1e-5, "{checkpoint}: noisy latents off by {err}");

        let y = unet.takes_added_conditioning().then(|| {
            unet.added_conditioning(
                tensor(&io["text_embeds"], &device),
                tensor(&io["time_ids"], &device),
            )
        });
        let pred = network.forward(
            unet,
            multiplier,
            noisy,
            tensor(&io["timesteps"], &device),
            tensor(&io["encoder_hidden_states"], &device),
            y,
        );
        let loss = (pred - noise).square().mean();
        let grads = loss.backward();
        let loss = loss.into_scalar::<f32>();
        let err = relative_error(&[loss], &io["loss"].values);
        assert!(err < 1e-4, "{checkpoint}: loss {loss} off by {err}");

        let mut worst = BTreeMap::new();
        for (name, m) in &network.modules {
            for (which, factor) in [("lora_down.weight", &m.down), ("lora_up.weight", &m.up)] {
                let got = match factor {
                    Factor::Linear(p) => p.grad(&grads).map(|g| g.into_data()),
                    Factor::Conv(p) => p.grad(&grads).map(|g| g.into_data()),
                }
                .unwrap_or_else(|| panic!("no gradient for {name}.{which}"));
                let want = &io[&format!("grad.{name}.{which}")];
                assert_eq!(got.shape().to_vec(), want.shape, "{name}.{which}");
                let err = relative_error(&got.try_to_vec::<f32>().unwrap(), &want.values);
                assert!(err < 1e-3, "{checkpoint}: {name}.{which} off by {err}");
                worst.insert(format!("{name}.{which}"), err);
            }
        }
        let (name, err) = worst.iter().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
        eprintln!(
            "{checkpoint}: {} gradients, worst {name} at {err:.2e}",
            worst.len()
        );
    }
}
