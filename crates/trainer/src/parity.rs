//! One training step against the reference: the LoRA gradients of our UNet for a fixed latent,
//! noise, timestep and conditioning equal those of diffusers' UNet with the same rank-4 LoRA
//! attached as kohya attaches it (fixtures of `tests/fixtures/make_train_fixtures.py`), within
//! REFERENCE.md's 1e-3 relative Frobenius error, for the SD1-style and SDXL-style tiny models.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use slider_lora::{AlphaStorage, Lora, Module, TensorDtype};

use slider_models::checkpoint::{Checkpoint, StableDiffusion};
use slider_models::ddpm::NoiseSchedule;
use slider_models::forward::{HostTensor, read_tensors};
use slider_models::lora::{Factor, LoraNetwork, locon_targets, lora_targets};

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

/// (checkpoint, step fixture): the SD1-style model (conv projections, diffusers-style names),
/// the SDXL-style one (linear projections, original names, added conditioning), and the SD1
/// model with LoCon modules (3x3 and strided convolutions, time-embedding projections).
#[test]
fn one_step_lora_gradients_equal_the_references() {
    let device = Device::flex();
    for (checkpoint, step) in [
        ("sd1_tiny.safetensors", "train/sd1_step.safetensors"),
        ("sdxl_tiny.safetensors", "train/sdxl_step.safetensors"),
        ("sd1_tiny.safetensors", "train/sd1_locon_step.safetensors"),
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

        let conv = meta
            .get("conv_rank")
            .map(|r| (r.parse::<usize>().unwrap(), number("conv_alpha")));

        // Our targets are exactly the modules the reference adapted, under kohya's names.
        let mut targets = lora_targets(unet);
        if conv.is_some() {
            targets.extend(locon_targets(unet));
            targets.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let reference_names: Vec<&str> = io
            .keys()
            .filter_map(|k| k.strip_prefix("grad.")?.strip_suffix(".lora_down.weight"))
            .collect();
        let ours: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(ours, reference_names, "{checkpoint}");

        let mut lora = Lora::default();
        for (index, t) in targets.iter().enumerate() {
            let fan_in = t.in_dim * t.kind.window();
            let bound = 1.0 / (fan_in as f64).sqrt();
            let (rank, alpha) = match conv {
                Some(conv) if t.kind.window() > 1 => conv,
                _ => (rank, alpha),
            };
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

        // Gradients that are zero in exact arithmetic are compared by size, not direction: in
        // the LoCon case a ResNet block whose output GroupNorm has one channel per group (32
        // channels) cancels the per-channel time-embedding shift, so its `time_emb_proj`
        // factors get only rounding noise (~1e-10 against ~1e-2 elsewhere) on both sides.
        let mut pairs = Vec::new();
        for (name, m) in &network.modules {
            for (which, factor) in [("lora_down.weight", &m.down), ("lora_up.weight", &m.up)] {
                let got = match factor {
                    Factor::Linear(p) => p.grad(&grads).map(|g| g.into_data()),
                    Factor::Conv(p) => p.grad(&grads).map(|g| g.into_data()),
                }
                .unwrap_or_else(|| panic!("no gradient for {name}.{which}"));
                let want = &io[&format!("grad.{name}.{which}")];
                assert_eq!(got.shape().to_vec(), want.shape, "{name}.{which}");
                pairs.push((
                    format!("{name}.{which}"),
                    got.try_to_vec::<f32>().unwrap(),
                    want.values.clone(),
                ));
            }
        }
        let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let zero = 1e-6 * pairs.iter().map(|(_, _, w)| norm(w)).fold(0.0, f64::max);
        let mut worst = BTreeMap::new();
        let mut off = Vec::new();
        for (name, got, want) in &pairs {
            if norm(want) < zero {
                if norm(got) >= zero {
                    off.push(format!(
                        "{name} (zero in the reference, {:.2e} here)",
                        norm(got)
                    ));
                }
                continue;
            }
            let err = relative_error(got, want);
            if err >= 1e-3 {
                off.push(format!("{name} ({err:.2e})"));
            }
            worst.insert(name.clone(), err);
        }
        assert!(off.is_empty(), "{step}: gradients off: {}", off.join(", "));
        let (name, err) = worst.iter().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
        eprintln!(
            "{step}: {} gradients compared, worst {name} at {err:.2e}",
            worst.len()
        );
    }
}
