//! Parity with the reference implementations (diffusers, transformers, open_clip) on the tiny
//! random models of `tests/fixtures/make_fixtures.py`: every `expected.<name>` tensor of an io
//! file must equal our output `<name>` within REFERENCE.md's forward-pass tolerance.

use std::collections::BTreeMap;
use std::path::PathBuf;

use slider_models::checkpoint::{decode_f32, write_safetensors};
use slider_models::weights::TensorSource;
use slider_models::{
    Checkpoint, CheckpointError, Family, Heads, HostTensor, ModelSpec, Padding, StableDiffusion,
    StoreDtype, Tokenizer,
};

/// REFERENCE.md: f32 forward pass vs a reference of the same precision.
const FORWARD_TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn read_io(name: &str) -> (BTreeMap<String, HostTensor>, BTreeMap<String, HostTensor>) {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut inputs = BTreeMap::new();
    let mut expected = BTreeMap::new();
    for (key, view) in st.tensors() {
        let t = HostTensor {
            shape: view.shape().to_vec(),
            values: decode_f32(view.dtype(), view.data()).unwrap(),
        };
        match key.strip_prefix("expected.") {
            Some(out) => expected.insert(out.to_string(), t),
            None => inputs.insert(key, t),
        };
    }
    (inputs, expected)
}

fn relative_error(got: &HostTensor, want: &HostTensor) -> f64 {
    assert_eq!(got.shape, want.shape);
    let (mut diff, mut norm) = (0f64, 0f64);
    for (g, w) in got.values.iter().zip(&want.values) {
        diff += (f64::from(*g) - f64::from(*w)).powi(2);
        norm += f64::from(*w).powi(2);
    }
    (diff / norm).sqrt()
}

fn check_parity(checkpoint: &str, io: &str) -> ModelSpec {
    let device = slider_models::open_device("cpu").unwrap();
    let ckpt = Checkpoint::open(fixture(checkpoint)).unwrap();
    let model = StableDiffusion::load(&ckpt, &device).unwrap();
    let (inputs, expected) = read_io(io);
    let outputs = model.forward_named(&inputs, &device).unwrap();
    assert!(!expected.is_empty());
    for (name, want) in &expected {
        let got = outputs
            .get(name)
            .unwrap_or_else(|| panic!("no output {name}"));
        let err = relative_error(got, want);
        eprintln!("{checkpoint} {name}: relative error {err:.2e}");
        assert!(err < FORWARD_TOLERANCE, "{name}: relative error {err:e}");
    }
    model.spec
}

#[test]
fn sd1_style_unet_vae_and_clip_l_equal_the_reference() {
    let spec = check_parity("sd1_tiny.safetensors", "sd1_tiny_io.safetensors");
    assert_eq!(spec.family, Family::Sd1);
    assert_eq!(spec.unet.channel_mult, vec![1, 2]);
    assert_eq!(spec.unet.transformer_depth, vec![1, 0]);
    assert_eq!(spec.unet.heads, Heads::Count(2));
    assert!(!spec.unet.use_linear_projection);
    assert!(spec.vae.is_some() && spec.text_g.is_none());
}

#[test]
fn sdxl_style_unet_and_both_text_encoders_equal_the_reference() {
    let spec = check_parity("sdxl_tiny.safetensors", "sdxl_tiny_io.safetensors");
    assert_eq!(spec.family, Family::Sdxl);
    assert_eq!(spec.unet.num_res_blocks, 2);
    assert_eq!(spec.unet.transformer_depth, vec![0, 2]);
    assert_eq!(spec.unet.transformer_depth_middle, 2);
    assert_eq!(spec.unet.heads, Heads::Dim(16));
    assert_eq!(spec.unet.adm_in_channels, Some(80));
    assert!(spec.unet.use_linear_projection);
    assert!(spec.vae.is_none(), "the SDXL fixture carries no VAE");
}

#[test]
fn tokenizer_equals_open_clip_on_every_reference_prompt() {
    let text = std::fs::read_to_string(fixture("tokenizer_reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert!(cases.len() >= 50);
    let tokenizer = Tokenizer::clip().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tokenizer.tokenize(prompt, Padding::Zero);
        if got != want {
            failures.push(format!("{prompt:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Rewrites the SD1 fixture with one key dropped, one added under the UNet prefix and one
/// reshaped; loading must fail and name exactly those three.
#[test]
fn loading_lists_every_missing_unexpected_and_misshaped_key() {
    let ckpt = Checkpoint::open(fixture("sd1_tiny.safetensors")).unwrap();
    let dropped = "model.diffusion_model.input_blocks.1.1.proj_in.bias";
    let added = "model.diffusion_model.input_blocks.1.1.extra.weight";
    let reshaped = "first_stage_model.decoder.conv_in.bias";
    let mut entries: Vec<(String, Vec<usize>)> = ckpt
        .keys()
        .filter(|k| *k != dropped)
        .map(|k| (k.to_string(), ckpt.shape_of(k).unwrap()))
        .collect();
    entries.push((added.to_string(), vec![3]));
    for (key, shape) in &mut entries {
        if key == reshaped {
            shape.push(1);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.safetensors");
    write_safetensors(&path, &entries, StoreDtype::F32, ckpt.metadata(), |key| {
        ckpt.values_f32(key).unwrap_or_else(|_| vec![0.0; 3])
    })
    .unwrap();
    let broken = Checkpoint::open(&path).unwrap();
    let err =
        StableDiffusion::load(&broken, &slider_models::open_device("cpu").unwrap()).unwrap_err();
    let CheckpointError::Mismatch { report, .. } = &err else {
        panic!("expected a key mismatch, got {err}");
    };
    assert_eq!(report.missing, vec![dropped.to_string()]);
    assert_eq!(report.unexpected, vec![added.to_string()]);
    assert_eq!(report.misshaped.len(), 1);
    assert_eq!(report.misshaped[0].0, reshaped);
    let message = err.to_string();
    for key in [dropped, added, reshaped] {
        assert!(message.contains(key), "{message}");
    }
}

/// Our writer stores a model in the same layout: loading what it wrote gives the same outputs.
#[test]
fn written_checkpoints_load_back_identically() {
    let device = slider_models::open_device("cpu").unwrap();
    let ckpt = Checkpoint::open(fixture("sd1_tiny.safetensors")).unwrap();
    let model = StableDiffusion::load(&ckpt, &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.safetensors");
    model.save(&path, StoreDtype::F32).unwrap();
    let copy = Checkpoint::open(&path).unwrap();
    assert_eq!(ModelSpec::detect(&copy).unwrap(), model.spec);
    let reloaded = StableDiffusion::load(&copy, &device).unwrap();
    let (inputs, _) = read_io("sd1_tiny_io.safetensors");
    let a = model.forward_named(&inputs, &device).unwrap();
    let b = reloaded.forward_named(&inputs, &device).unwrap();
    assert_eq!(a, b);
}
