//! The GPU-backend tier: the tiny base model (`assets/tiny-sd`) on a cubecl device (wgpu by
//! default; `SLIDER_PARITY_DEVICE=cuda:0` or `wgpu:cpu` picks another) against the same
//! computation on `flex`, the CPU backend every other test and the golden bytes run on.
//!
//! Four checks, each a table row printed with its figures:
//! - `forward`: CLIP-L text encoder, UNet noise prediction (batch 2, 16x16 latents) and VAE
//!   decode of the base model;
//! - `train step`: one training step's LoRA gradients (rank 4, kohya's targets, every
//!   factor non-zero, MSE loss against the noise, as the trainer's step);
//! - `sampler step`: one guided Euler a step (CFG 7.5, the UNet on `[negative; positive]`)
//!   from the scaled initial latent, and the VAE decode of its result;
//! - `attention`: the memory-efficient attention op (`slider_models::attention`) on the
//!   device, forward and gradients with its backward split into tiles, against the
//!   decomposed textbook form on flex (tolerance: the train step's).
//!
//! Two precisions, each its own test binary: `f32`, and `f16` as `mixed_precision: fp16`
//! trains (the UNet and the VAE held and computed in f16, norms, LoRA factors, gradients
//! and loss in f32, the loss scaled by 2^16 as the trainer's first step does). The f16 tier
//! runs only where the adapter has 16-bit float, and compares with flex running the same
//! f16 computation; it is an ignored test (lavapipe takes too long to compile its shaders),
//! which `scripts/gpu-check.sh` runs.
//!
//! Error measures, over each tensor: `rel` is the relative Frobenius error
//! `|got - want| / |want|` (REFERENCE.md's measure) and `max abs` the largest elementwise
//! difference. The tolerances (`Tolerance`) are per precision.
//!
//! Without a device (no Vulkan driver, no adapter) a check skips with one line; under
//! `CI=true` it fails instead, so CI cannot pass without having run it.

use std::path::PathBuf;

use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use slider_models::lora::Factor;
use slider_models::sample::{SamplerKind, Scheduler};
use slider_models::{
    BaseConfig, Checkpoint, DeviceSpec, LoraNetwork, Padding, StableDiffusion, Tokenizer,
    standard_normal,
};

/// The dtype a check runs in on the device under test (flex always runs f32).
#[allow(dead_code)] // each test binary constructs one of them
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
}

/// Largest accepted relative Frobenius error per check, by precision.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub forward: f64,
    pub gradients: f64,
    pub sampler: f64,
}

impl Precision {
    /// The models' precision for this tier: what `mixed_precision` loads.
    pub fn model(self) -> slider_models::checkpoint::Precision {
        let dtype = match self {
            Self::F32 => FloatDType::F32,
            Self::F16 => FloatDType::F16,
        };
        slider_models::checkpoint::Precision {
            unet: dtype,
            vae: dtype,
        }
    }

    /// The loss scale of the trainer's first step in this precision (fp16's starts at 2^16,
    /// so small gradients do not flush to zero in the f16 backward).
    pub fn loss_scale(self) -> f32 {
        match self {
            Self::F32 => 1.0,
            Self::F16 => 65536.0,
        }
    }

    /// f32: REFERENCE.md's figures for one network forward (1e-4) and after one training step
    /// (1e-3); the sampler step is a forward and a few elementwise ops. f16: both sides round
    /// every activation to ten bits of mantissa (unit roundoff 4.9e-4), in different orders
    /// of summation, through ~20 layers of the tiny model (docs/benchmarks.md, "wgpu on
    /// lavapipe", gives what was measured).
    pub fn tolerance(self) -> Tolerance {
        match self {
            Self::F32 => Tolerance {
                forward: 1e-4,
                gradients: 1e-3,
                sampler: 1e-4,
            },
            Self::F16 => Tolerance {
                forward: 2e-2,
                gradients: 5e-2,
                sampler: 2e-2,
            },
        }
    }
}

/// What one comparison measured.
#[derive(Debug, Clone, Copy)]
pub struct Error {
    pub rel: f64,
    pub max_abs: f64,
}

pub fn compare(got: &[f32], want: &[f32]) -> Error {
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - f64::from(*w)).abs())
        .fold(0.0f64, f64::max);
    Error {
        rel: slider_models::fixtures::rel_error(got, want),
        max_abs,
    }
}

/// The device under test, from `SLIDER_PARITY_DEVICE` (default `wgpu:auto`), opened in
/// `precision`; `None` (after one line on stderr) when this machine has none, or lacks f16.
/// Under `CI=true` a missing device panics: CI must run this tier.
pub fn device_under_test(precision: Precision) -> Option<Device> {
    let spec = std::env::var("SLIDER_PARITY_DEVICE").unwrap_or_else(|_| "wgpu:auto".into());
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let missing = |why: String| -> Option<Device> {
        assert!(
            !ci,
            "CI=true and no device for the backend tier ({spec}): {why}; CI builds with \
             `--features slider-models/wgpu` and installs mesa-vulkan-drivers (scripts/test)"
        );
        eprintln!("skipped: no device `{spec}` for the GPU-backend tier: {why}");
        None
    };
    // In order: a build without the backend, a machine without an adapter, a device that
    // does not open; each says which.
    if let Err(e) = slider_models::parse_device(&spec) {
        return missing(e.to_string());
    }
    if matches!(DeviceSpec::parse(&spec), Ok(DeviceSpec::Wgpu(_)))
        && slider_models::wgpu_adapter_count() == 0
    {
        return missing(
            "no wgpu adapter (install a Vulkan driver, e.g. Debian's mesa-vulkan-drivers)".into(),
        );
    }
    let device = match slider_models::open_device(&spec) {
        Ok(device) => device,
        Err(e) => return missing(e.to_string()),
    };
    if precision == Precision::F16 && !device.supports_dtype(DType::F16) {
        eprintln!("skipped: `{spec}` has no 16-bit float (no SHADER_F16)");
        return None;
    }
    Some(device)
}

fn tiny_base() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-sd/tiny-sd.safetensors")
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("a float tensor reads back as f32")
}

/// The same host values on a device, in f32.
fn on<const D: usize>(values: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn normal<const D: usize>(seed: u64, shape: [usize; D]) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    host(standard_normal(&mut rng, shape, &Device::flex()))
}

const PROMPT: &str = "1girl, portrait, big eyes, front view";
const NEGATIVE: &str = "";
const LATENT: [usize; 4] = [1, 4, 16, 16];

/// Every output of the checks on one device, as host values, in a fixed order.
pub struct Outputs {
    pub forward: Vec<(&'static str, Vec<f32>)>,
    pub gradients: Vec<(String, Vec<f32>)>,
    pub sampler: Vec<(&'static str, Vec<f32>)>,
    pub attention: Vec<(&'static str, Vec<f32>)>,
}

/// How the `attention` check computes attention: the device under test runs the UNet's
/// memory-efficient op, flex the decomposed textbook form it must equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionForm {
    Tiled,
    Decomposed,
}

/// The `attention` check: a cross-attention (40 queries, 24 keys, 2 heads of 16) forced into
/// three backward tiles, its output and the gradients of a fixed weighting of it with respect
/// to `q`, `k` and `v`, all three in the precision's dtype.
fn attention_check(
    device: &Device,
    precision: Precision,
    form: AttentionForm,
) -> Vec<(&'static str, Vec<f32>)> {
    const Q: [usize; 4] = [1, 2, 40, 16];
    const KV: [usize; 4] = [1, 2, 24, 16];
    let dtype = precision.model().unet;
    let device = device.clone().autodiff();
    let input = |seed, dims| {
        on(&normal(seed, dims), dims, &device)
            .cast(dtype)
            .require_grad()
    };
    let (q, k, v) = (input(11, Q), input(12, KV), input(13, KV));
    let out = match form {
        AttentionForm::Tiled => {
            slider_models::attention::tiled_attention(q.clone(), k.clone(), v.clone(), 2 * 24 * 14)
        }
        AttentionForm::Decomposed => {
            slider_models::attention::decomposed_attention(q.clone(), k.clone(), v.clone())
        }
    };
    let weight = on(&normal(14, Q), Q, &device);
    let grads = (out.clone().cast(FloatDType::F32) * weight)
        .sum()
        .backward();
    let grad = |t: &Tensor<4>| host(t.grad(&grads).expect("attention inputs are tracked"));
    vec![
        ("output", host(out.detach())),
        ("d query", grad(&q)),
        ("d key", grad(&k)),
        ("d value", grad(&v)),
    ]
}

/// Runs the checks' computations on `device`, the UNet and the VAE in `precision`.
pub fn run_all(device: &Device, precision: Precision, form: AttentionForm) -> Outputs {
    let started = std::time::Instant::now();
    let stage = |what: &str| {
        eprintln!(
            "  {device:?}: {what} at {:.1} s",
            started.elapsed().as_secs_f64()
        )
    };
    let ckpt = Checkpoint::open(tiny_base()).expect("the tiny base model opens");
    let model = StableDiffusion::load_in(&ckpt, &BaseConfig::none(), precision.model(), device)
        .expect("the tiny base model loads");
    let unet = &model.unet;
    let clip = model.text_l.as_ref().expect("the tiny base has CLIP-L");
    let vae = model.vae.as_ref().expect("the tiny base has a VAE");
    let tokenizer = Tokenizer::clip().expect("CLIP's tokenizer");
    let ids = |text: &str| {
        let ids: Vec<i64> = tokenizer
            .tokenize(text, Padding::EndToken)
            .into_iter()
            .map(i64::from)
            .collect();
        let n = ids.len();
        Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), device)
    };
    let positive = clip.forward(ids(PROMPT)).last;
    let negative = clip.forward(ids(NEGATIVE)).last;
    let context = Tensor::cat(vec![negative, positive.clone()], 0);

    // forward: the UNet on two different latents and timesteps, then a VAE decode.
    let x = on(&normal(1, [2, 4, 16, 16]), [2, 4, 16, 16], device);
    let t = on(&[981.0, 263.0], [2], device);
    let eps = unet.forward(x.clone(), t, context.clone(), None);
    let decoded = vae.decode(x.narrow(0, 0, 1).div_scalar(0.18215));
    let _ = host(decoded.clone());
    stage("forward");
    let forward = vec![
        ("clip last layer", host(positive.clone())),
        ("unet eps", host(eps)),
        ("vae decode", host(decoded)),
    ];

    // train step: a rank-4 LoRA with every factor non-zero, MSE against the noise.
    let mut network = LoraNetwork::init(unet, 4, 1.0, 7, device).expect("a LoRA on the tiny UNet");
    for (i, m) in network.modules.values_mut().enumerate() {
        let shape = m.up.shape();
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|j| 0.05 * (0.3 + 1.1 * j as f32 + 0.9 * i as f32).cos())
            .collect();
        m.up = match shape[..] {
            [a, b] => Factor::Linear(on(&values, [a, b], device)),
            [a, b, c, d] => Factor::Conv(on(&values, [a, b, c, d], device)),
            _ => unreachable!("factors are matrices or 4-d kernels"),
        };
        m.down = m.down.clone().tracked();
        m.up = m.up.clone().tracked();
    }
    let x0 = on(&normal(2, LATENT), LATENT, device);
    let noise = on(&normal(3, LATENT), LATENT, device);
    let noisy = slider_models::NoiseSchedule::stable_diffusion()
        .add_noise(x0, noise.clone(), &[500])
        .expect("timestep 500 is in the schedule");
    let pred = network.forward(
        unet,
        1.0,
        noisy,
        on(&[500.0], [1], device),
        context.clone().narrow(0, 1, 1),
        None,
    );
    let scale = precision.loss_scale();
    let loss = (pred - noise).square().mean().mul_scalar(scale);
    let grads = loss.backward();
    stage("backward");
    let mut gradients = Vec::new();
    for (name, m) in &network.modules {
        for (which, factor) in [("down", &m.down), ("up", &m.up)] {
            let g: Vec<f32> = match factor {
                Factor::Linear(p) => p.grad(&grads).map(host),
                Factor::Conv(p) => p.grad(&grads).map(host),
            }
            .unwrap_or_else(|| panic!("no gradient for {name}.{which}"))
            .into_iter()
            .map(|g| g / scale)
            .collect();
            gradients.push((format!("{name}.{which}"), g));
        }
    }

    stage("gradients read");
    // sampler step: guided Euler a from the scaled initial latent, then the decode.
    let mut scheduler = Scheduler::new(SamplerKind::EulerAncestral, 20).expect("20 steps");
    let latents = on(&normal(4, LATENT), LATENT, device).mul_scalar(scheduler.init_noise_sigma());
    let input = scheduler
        .scale_model_input(latents.clone(), 0)
        .expect("step 0");
    let input = Tensor::cat(vec![input.clone(), input], 0);
    let t = scheduler.timesteps()[0];
    let prediction = unet.forward(input, on(&[t, t], [2], device), context, None);
    let mut halves = prediction.chunk(2, 0);
    let (cond, uncond) = (halves.pop().expect("cond"), halves.pop().expect("uncond"));
    let guided = slider_models::sample::classifier_free_guidance(uncond, cond, 7.5);
    let step_noise = on(&normal(5, LATENT), LATENT, device);
    let stepped = scheduler
        .step(0, guided, latents, Some(step_noise))
        .expect("step 0");
    let image = vae.decode(stepped.clone().div_scalar(0.18215));
    stage("sampler step");
    let sampler = vec![
        ("latents after step", host(stepped)),
        ("its decode", host(image)),
    ];

    let attention = attention_check(device, precision, form);
    stage("attention");
    Outputs {
        forward,
        gradients,
        sampler,
        attention,
    }
}

/// The worst error over a check's tensors, with the tensor it was on; the errors of all of
/// them printed as one line each.
fn worst<N: AsRef<str>>(
    check: &str,
    got: &[(N, Vec<f32>)],
    want: &[(N, Vec<f32>)],
) -> (String, Error) {
    let mut worst = (
        String::new(),
        Error {
            rel: 0.0,
            max_abs: 0.0,
        },
    );
    let mut max_abs = 0.0f64;
    for ((name, g), (_, w)) in got.iter().zip(want) {
        let e = compare(g, w);
        max_abs = max_abs.max(e.max_abs);
        if check != "train step" {
            eprintln!(
                "  {check:<12} {:<20} rel {:.2e}  max abs {:.2e}",
                name.as_ref(),
                e.rel,
                e.max_abs
            );
        }
        if e.rel >= worst.1.rel {
            worst = (name.as_ref().to_owned(), e);
        }
    }
    worst.1.max_abs = max_abs;
    worst
}

/// Runs the tier in `precision` on the device under test against flex, prints a table and
/// asserts the tolerances.
pub fn check(precision: Precision) {
    let Some(device) = device_under_test(precision) else {
        return;
    };
    let started = std::time::Instant::now();
    let want = run_all(&Device::flex(), precision, AttentionForm::Decomposed);
    let flex_s = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let got = run_all(&device, precision, AttentionForm::Tiled);
    let device_s = started.elapsed().as_secs_f64();
    let tol = precision.tolerance();
    eprintln!(
        "backend tier, {precision:?} on {} vs flex {precision:?} (flex {flex_s:.1} s, device {device_s:.1} s):",
        slider_models::describe_device(&device)
    );
    let rows = [
        (
            "forward",
            worst("forward", &got.forward, &want.forward),
            tol.forward,
        ),
        (
            "train step",
            worst("train step", &got.gradients, &want.gradients),
            tol.gradients,
        ),
        (
            "sampler step",
            worst("sampler step", &got.sampler, &want.sampler),
            tol.sampler,
        ),
        (
            "attention",
            worst("attention", &got.attention, &want.attention),
            tol.gradients,
        ),
    ];
    eprintln!("| check | worst tensor | rel (Frobenius) | max abs | tolerance (rel) |");
    let mut off = Vec::new();
    for (check, (tensor, e), tol) in &rows {
        eprintln!(
            "| {check} | {tensor} | {:.2e} | {:.2e} | {tol:.0e} |",
            e.rel, e.max_abs
        );
        if e.rel.is_nan() || e.rel >= *tol {
            off.push(format!("{check}: {tensor} at {:.2e} >= {tol:.0e}", e.rel));
        }
    }
    assert!(got.gradients.len() == want.gradients.len() && !got.gradients.is_empty());
    assert!(off.is_empty(), "{precision:?} off flex: {}", off.join("; "));
}

/// How far flex's own f16 computation is from its f32 one, tensor by tensor: the floor an f16
/// device can reach against flex's f16, since the two differ at least by their own rounding.
/// Prints each check's worst tensors; asserts only that both runs produced every tensor.
#[allow(dead_code)] // the f16 test binary's diagnostic
pub fn print_f16_against_f32_on_flex() {
    let device = Device::flex();
    let half = run_all(&device, Precision::F16, AttentionForm::Tiled);
    let full = run_all(&device, Precision::F32, AttentionForm::Tiled);
    assert_eq!(half.gradients.len(), full.gradients.len());
    let mut errors: Vec<(String, Error)> = half
        .gradients
        .iter()
        .zip(&full.gradients)
        .map(|((name, h), (_, f))| (name.clone(), compare(h, f)))
        .collect();
    errors.sort_by(|a, b| b.1.rel.total_cmp(&a.1.rel));
    eprintln!("flex f16 against flex f32, the training step's gradients, worst first:");
    for (name, e) in errors.iter().take(8) {
        eprintln!("  {name:<80} rel {:.2e}  max abs {:.2e}", e.rel, e.max_abs);
    }
    for (check, h, f) in [
        ("forward", &half.forward, &full.forward),
        ("sampler step", &half.sampler, &full.sampler),
    ] {
        for ((name, h), (_, f)) in h.iter().zip(f.iter()) {
            let e = compare(h, f);
            eprintln!(
                "  {check:<12} {name:<20} rel {:.2e}  max abs {:.2e}",
                e.rel, e.max_abs
            );
        }
    }
}
