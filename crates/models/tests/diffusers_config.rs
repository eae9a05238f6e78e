//! Checkpoints whose architecture the shapes cannot reveal, loaded with diffusers' own
//! `config.json` (as `from_single_file(config=...)`): the UNets of
//! `tests/fixtures/make_config_fixtures.py` (GroupNorm with 8 and 16 groups, 3 heads, 8-wide
//! heads from per-level counts) must equal diffusers' output, and be refused without it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use slider_models::checkpoint::decode_f32;
use slider_models::diffusers_config::{BaseConfig, Contradiction};
use slider_models::{Checkpoint, CheckpointError, ConfigError, Heads, HostTensor, StableDiffusion};

/// REFERENCE.md: f32 forward pass vs a reference of the same precision.
const FORWARD_TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/config")
        .join(name)
}

fn read_io(name: &str) -> (BTreeMap<String, HostTensor>, HostTensor) {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut inputs = BTreeMap::new();
    let mut expected = None;
    for (key, view) in st.tensors() {
        let t = HostTensor {
            shape: view.shape().to_vec(),
            values: decode_f32(view.dtype(), view.data()).unwrap(),
        };
        if key == "expected.noise_pred" {
            expected = Some(t);
        } else {
            inputs.insert(key, t);
        }
    }
    (inputs, expected.expect("expected.noise_pred"))
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

/// (model, the heads the config gives, GroupNorm groups).
const MODELS: [(&str, Heads, usize); 2] = [
    ("groups8", Heads::Count(3), 8),
    ("heads8", Heads::Dim(8), 16),
];

#[test]
fn unusual_unets_with_their_config_equal_diffusers() {
    let device = slider_models::open_device("cpu").unwrap();
    for (name, heads, groups) in MODELS {
        let ckpt = Checkpoint::open(fixture(&format!("{name}.safetensors"))).unwrap();
        let config = BaseConfig::load(fixture(&format!("{name}.config.json"))).unwrap();
        let model = StableDiffusion::load_with(&ckpt, &config, &device).unwrap();
        assert_eq!(model.spec.unet.heads, heads, "{name}");
        assert_eq!(model.spec.unet.norm_num_groups, groups, "{name}");
        assert!(model.spec.assumptions(&ckpt, &config).is_empty(), "{name}");
        let (inputs, want) = read_io(&format!("{name}_io.safetensors"));
        let outputs = model.forward_named(&inputs, &device).unwrap();
        let err = relative_error(&outputs["noise_pred"], &want);
        eprintln!("{name} noise_pred: relative error {err:.2e} against diffusers");
        assert!(err < FORWARD_TOLERANCE, "{name}: relative error {err:e}");
    }
}

#[test]
fn without_their_config_they_are_refused_saying_what_shapes_cannot_tell() {
    let device = slider_models::open_device("cpu").unwrap();
    for (name, _, _) in MODELS {
        let ckpt = Checkpoint::open(fixture(&format!("{name}.safetensors"))).unwrap();
        let err = StableDiffusion::load(&ckpt, &device).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, CheckpointError::Architecture { part: "UNet", .. }),
            "{name}: {message}"
        );
        for needle in [
            "GroupNorm",
            "32 groups",
            "cannot tell",
            "config.json",
            "--config",
        ] {
            assert!(
                message.contains(needle),
                "{name}: `{needle}` not in: {message}"
            );
        }
    }
}

#[test]
fn a_config_the_weights_contradict_names_the_key_and_the_tensor() {
    let ckpt = Checkpoint::open(fixture("groups8.safetensors")).unwrap();
    let text = std::fs::read_to_string(fixture("heads8.config.json")).unwrap();
    let config = BaseConfig::from_json(&text, &fixture("heads8.config.json")).unwrap();
    let err =
        StableDiffusion::load_with(&ckpt, &config, &slider_models::open_device("cpu").unwrap())
            .unwrap_err();
    let message = err.to_string();
    let CheckpointError::Config(ConfigError::Contradicts(c)) = err else {
        panic!("not a contradiction: {message}");
    };
    let Contradiction {
        key,
        tensor,
        expected,
        actual,
        ..
    } = *c;
    assert_eq!(key, "block_out_channels", "{message}");
    assert_eq!(
        tensor, "model.diffusion_model.time_embed.0.weight",
        "{message}"
    );
    assert_eq!((expected, actual.as_str()), (vec![64, 16], "[96, 24]"));
}
