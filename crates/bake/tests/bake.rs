//! `merge_into_model` against a dense f64 reference: the tiny bases (SD1 f32, SDXL with mixed
//! dtypes, the shipped f16 base) with a LoRA on every module kohya adapts, text encoders and
//! LoCon included; full-size SD1.5 / SDXL key layouts (every module's name and shape, and
//! the numbers on a sample of full-size weights); and the refusals, each naming the module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};
use slider_bake::{BakeError, BakeOptions, merge_into_model};
use slider_lora::layout::ModuleSpec;
use slider_lora::{Lora, ModuleKind, Precision, synth};
use slider_models::checkpoint::{ModelSpec, StoreDtype, write_safetensors};
use slider_models::lora::{locon_targets, lora_targets};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A module kohya's merge adapts: its name, the checkpoint key, the rows of it, the shape.
#[derive(Debug, Clone)]
struct Expected {
    spec: ModuleSpec,
    key: String,
    row0: usize,
}

/// Independent of the crate's own mapping: UNet modules from the models crate's kohya
/// targets (derived from the burn modules), text-encoder modules spelled out here.
fn expected(spec: &ModelSpec, shapes: &BTreeMap<String, Vec<usize>>) -> Vec<Expected> {
    let unet = spec.unet.init(&slider_models::fixtures::device());
    let mut out: Vec<Expected> = lora_targets(&unet)
        .into_iter()
        .chain(locon_targets(&unet))
        .map(|t| Expected {
            spec: ModuleSpec {
                name: t.name,
                kind: t.kind,
                out_dim: t.out_dim,
                in_dim: t.in_dim,
            },
            key: format!("model.diffusion_model.{}", t.key),
            row0: 0,
        })
        .collect();
    let linear = |name: String, key: &str, out_dim: usize, row0: usize| -> Expected {
        Expected {
            spec: ModuleSpec {
                name,
                kind: ModuleKind::Linear,
                out_dim,
                in_dim: shapes[key][1],
            },
            key: key.to_string(),
            row0,
        }
    };
    let sdxl = spec.text_g.is_some();
    if let Some(t) = &spec.text_l {
        let (name, prefix) = if sdxl {
            ("lora_te1_", "conditioner.embedders.0.transformer.")
        } else {
            ("lora_te_", "cond_stage_model.transformer.")
        };
        for l in 0..t.layers {
            for m in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "mlp.fc1",
                "mlp.fc2",
            ] {
                let path = format!("text_model.encoder.layers.{l}.{m}");
                let key = format!("{prefix}{path}.weight");
                let out_dim = shapes[&key][0];
                out.push(linear(
                    format!("{name}{}", path.replace('.', "_")),
                    &key,
                    out_dim,
                    0,
                ));
            }
        }
    }
    if let Some(t) = &spec.text_g {
        for l in 0..t.layers {
            let p = format!("conditioner.embedders.1.model.transformer.resblocks.{l}.");
            let n = |m: &str| format!("lora_te2_text_model_encoder_layers_{l}_{m}");
            let qkv = format!("{p}attn.in_proj_weight");
            let d = t.hidden;
            for (i, part) in ["q", "k", "v"].iter().enumerate() {
                out.push(linear(n(&format!("self_attn_{part}_proj")), &qkv, d, i * d));
            }
            for (m, key) in [
                ("self_attn_out_proj", "attn.out_proj.weight"),
                ("mlp_fc1", "mlp.c_fc.weight"),
                ("mlp_fc2", "mlp.c_proj.weight"),
            ] {
                let key = format!("{p}{key}");
                let out_dim = shapes[&key][0];
                out.push(linear(n(m), &key, out_dim, 0));
            }
        }
    }
    out
}

/// A LoRA on `targets`, ranks 1..=4 and alphas varying by module.
fn lora_on(targets: &[Expected], seed: u64) -> Lora {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let modules = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let rank = 1 + (i + seed as usize) % 4;
            let alpha = 0.5 + (i % 3) as f32;
            (
                t.spec.name.clone(),
                synth::random_module(&t.spec, rank, alpha, &mut rng),
            )
        })
        .collect();
    Lora {
        modules,
        metadata: BTreeMap::new(),
    }
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn encode(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| match dtype {
            Dtype::F32 => (v as f32).to_le_bytes().to_vec(),
            Dtype::F16 => f16::from_f64(v).to_le_bytes().to_vec(),
            Dtype::BF16 => bf16::from_f64(v).to_le_bytes().to_vec(),
            other => panic!("unexpected dtype {other:?}"),
        })
        .collect()
}

fn shapes_of(bytes: &[u8]) -> BTreeMap<String, Vec<usize>> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect()
}

/// Every tensor of `base` with the LoRAs added densely in f64, in the stored dtype or
/// `save`: (dtype, shape, bytes) by key.
fn reference(
    base: &[u8],
    targets: &[Expected],
    loras: &[(&Lora, f64)],
    save: Option<Dtype>,
) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let st = SafeTensors::deserialize(base).unwrap();
    let mut out = BTreeMap::new();
    for (key, view) in st.tensors() {
        let float = matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16);
        let dtype = match save {
            Some(d) if float => d,
            _ => view.dtype(),
        };
        let on_key: Vec<&Expected> = targets.iter().filter(|t| t.key == key).collect();
        if on_key.is_empty() && dtype == view.dtype() {
            out.insert(key, (dtype, view.shape().to_vec(), view.data().to_vec()));
            continue;
        }
        let mut w = decode(view.dtype(), view.data());
        let cols = w.len() / view.shape()[0];
        for (lora, ratio) in loras {
            let mut mods: Vec<(&String, &Expected)> = on_key
                .iter()
                .filter_map(|t| {
                    lora.modules
                        .get_key_value(&t.spec.name)
                        .map(|(n, _)| (n, *t))
                })
                .collect();
            mods.sort_by(|a, b| a.0.cmp(b.0));
            for (name, t) in mods {
                let m = &lora.modules[name];
                let scale = ratio * f64::from(m.alpha) / m.rank as f64;
                // The dense delta, then W += scale * delta.
                let mut delta = vec![0f64; m.out_dim * cols];
                for o in 0..m.out_dim {
                    for i in 0..cols {
                        for r in 0..m.rank {
                            delta[o * cols + i] +=
                                f64::from(m.up[o * m.rank + r]) * f64::from(m.down[r * cols + i]);
                        }
                    }
                }
                for (j, d) in delta.iter().enumerate() {
                    w[t.row0 * cols + j] += scale * d;
                }
            }
        }
        out.insert(key, (dtype, view.shape().to_vec(), encode(dtype, &w)));
    }
    out
}

fn assert_file_equals(path: &Path, want: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), want.len(), "tensor count");
    let mut differing = 0;
    for (key, (dtype, shape, data)) in want {
        let got = st.tensor(key).unwrap_or_else(|_| panic!("{key} missing"));
        assert_eq!(got.dtype(), *dtype, "{key}");
        assert_eq!(got.shape(), shape.as_slice(), "{key}");
        if got.data() != data.as_slice() {
            differing += 1;
            eprintln!("{key}: values differ from the dense reference");
        }
    }
    assert_eq!(differing, 0, "tensors differing from the reference");
}

/// Two LoRAs on every module of `base`, baked, equal to the reference byte for byte.
fn check_base(base: &Path, save: Option<Precision>) {
    let bytes = std::fs::read(base).unwrap();
    let shapes = shapes_of(&bytes);
    let ckpt = slider_models::Checkpoint::open(base).unwrap();
    let spec = ModelSpec::detect(&ckpt).unwrap();
    let targets = expected(&spec, &shapes);
    assert!(
        targets.iter().any(|t| t.spec.kind.is_spatial_conv()),
        "LoCon modules"
    );
    let a = lora_on(&targets, 1);
    let b = lora_on(&targets, 2);
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    a.save(&pa, Precision::F32).unwrap();
    b.save(&pb, Precision::F32).unwrap();
    let out = dir.path().join("merged.safetensors");
    let report = merge_into_model(
        base,
        &[(pa, 0.75), (pb, -1.25)],
        &out,
        &BakeOptions {
            save_precision: save,
        },
    )
    .unwrap();
    assert_eq!(report.modules, 2 * targets.len(), "every module consumed");
    let save_dtype = save.map(|p| match p {
        Precision::F32 => Dtype::F32,
        Precision::F16 => Dtype::F16,
        Precision::Bf16 => Dtype::BF16,
    });
    let want = reference(&bytes, &targets, &[(&a, 0.75), (&b, -1.25)], save_dtype);
    assert_file_equals(&out, &want);
    // The metadata is the checkpoint's.
    let (_, meta_in) = SafeTensors::read_metadata(&bytes).unwrap();
    let out_bytes = std::fs::read(&out).unwrap();
    let (_, meta_out) = SafeTensors::read_metadata(&out_bytes).unwrap();
    assert_eq!(meta_in.metadata(), meta_out.metadata());
}

#[test]
fn sd1_tiny_equals_the_dense_reference() {
    check_base(&root().join("tests/fixtures/sd1_tiny.safetensors"), None);
}

#[test]
fn sdxl_tiny_with_mixed_dtypes_equals_the_dense_reference() {
    check_base(&root().join("tests/fixtures/sdxl_tiny.safetensors"), None);
}

#[test]
fn shipped_tiny_base_equals_the_dense_reference() {
    check_base(&root().join("assets/tiny-sd/tiny-sd.safetensors"), None);
}

#[test]
fn save_precision_converts_every_float_tensor() {
    for p in [Precision::Bf16, Precision::F32, Precision::F16] {
        check_base(
            &root().join("tests/fixtures/sdxl_tiny.safetensors"),
            Some(p),
        );
    }
}

fn full_size_shapes(spec: &ModelSpec) -> BTreeMap<String, Vec<usize>> {
    spec.expected_keys()
        .into_iter()
        .map(|(_, k, s)| (k, s))
        .collect()
}

/// The whole SD1.5 and SDXL layouts by header: every module kohya adapts (192 / 722
/// transformer modules, the LoCon modules, every text-encoder module) resolves to its key,
/// and nothing else does.
#[test]
fn full_size_layouts_resolve_every_module() {
    for (label, spec, te) in [
        ("sd15", ModelSpec::sd15(), 12 * 6),
        ("sdxl", ModelSpec::sdxl(), 12 * 6 + 32 * 6),
    ] {
        let shapes = full_size_shapes(&spec);
        let ours = slider_bake::targets::targets(&shapes);
        let want = expected(&spec, &shapes);
        let unet = want
            .iter()
            .filter(|t| t.spec.name.starts_with("lora_unet_"))
            .count();
        assert_eq!(want.len() - unet, te, "{label}: text-encoder modules");
        for t in &want {
            let got = ours
                .get(&t.spec.name)
                .unwrap_or_else(|| panic!("{label}: {}", t.spec.name));
            assert_eq!(got.key, t.key, "{label}: {}", t.spec.name);
            assert_eq!(
                got.rows.clone().map_or(0, |r| r.start),
                t.row0,
                "{}",
                t.spec.name
            );
        }
        assert_eq!(ours.len(), want.len(), "{label}: no other targets");
    }
}

/// Full-size weights, on a sample: a checkpoint holding every 1-D tensor of the full layout
/// (so the structure is the real one) and every 25th adaptable weight at its full size.
#[test]
fn full_size_sample_equals_the_dense_reference() {
    for (label, spec, every) in [
        ("sd15", ModelSpec::sd15(), 25),
        ("sdxl", ModelSpec::sdxl(), 60),
    ] {
        let shapes = full_size_shapes(&spec);
        let all = expected(&spec, &shapes);
        let mut picked: Vec<Expected> = all.iter().step_by(every).cloned().collect();
        // bigG's fused q/k/v: all three parts of one layer.
        picked.extend(
            all.iter()
                .filter(|t| t.key.ends_with("resblocks.3.attn.in_proj_weight"))
                .cloned(),
        );
        let entries: Vec<(String, Vec<usize>)> = shapes
            .iter()
            .filter(|(k, s)| s.len() == 1 || picked.iter().any(|t| &t.key == *k))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.safetensors");
        let mut state = 7u64;
        write_safetensors(&base, &entries, StoreDtype::F16, &BTreeMap::new(), |key| {
            let n: usize = shapes[key].iter().product();
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
                })
                .collect()
        })
        .unwrap();
        let lora = lora_on(&picked, 3);
        let lp = dir.path().join("lora.safetensors");
        lora.save(&lp, Precision::F16).unwrap();
        let lora = Lora::load(&lp).unwrap();
        let out = dir.path().join("merged.safetensors");
        let report = merge_into_model(&base, &[(lp, 1.5)], &out, &BakeOptions::default()).unwrap();
        assert_eq!(
            report.modules,
            picked.len(),
            "{label}: every module consumed"
        );
        let bytes = std::fs::read(&base).unwrap();
        assert_file_equals(&out, &reference(&bytes, &picked, &[(&lora, 1.5)], None));
    }
}

fn bake_err(base: &Path, lora: &Lora) -> (BakeError, bool) {
    let dir = tempfile::tempdir().unwrap();
    let lp = dir.path().join("bad.safetensors");
    lora.save(&lp, Precision::F32).unwrap();
    let out = dir.path().join("out.safetensors");
    let err = merge_into_model(base, &[(lp, 1.0)], &out, &BakeOptions::default()).unwrap_err();
    (err, out.exists())
}

#[test]
fn a_module_that_does_not_fit_is_named_and_nothing_is_written() {
    let base = root().join("tests/fixtures/sd1_tiny.safetensors");
    let bytes = std::fs::read(&base).unwrap();
    let spec = ModelSpec::detect(&slider_models::Checkpoint::open(&base).unwrap()).unwrap();
    let targets = expected(&spec, &shapes_of(&bytes));
    let good = lora_on(&targets, 4);
    let first = targets[0].spec.name.clone();
    // (what is changed, text the error must hold)
    let cases: Vec<(Lora, Vec<String>)> = vec![
        {
            let mut l = good.clone();
            let m = l.modules[&first].clone();
            l.modules
                .insert("lora_unet_down_blocks_9_attentions_0_proj_in".into(), m);
            (
                l,
                vec![
                    "lora_unet_down_blocks_9_attentions_0_proj_in".into(),
                    "adapts no weight".into(),
                ],
            )
        },
        {
            let mut l = good.clone();
            let mut spec = targets[0].spec.clone();
            spec.in_dim += 1;
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            l.modules
                .insert(first.clone(), synth::random_module(&spec, 2, 1.0, &mut rng));
            (l, vec![first.clone(), targets[0].key.clone()])
        },
        {
            // An SDXL name on an SD1 checkpoint.
            let mut l = good.clone();
            let m = l.modules[&first].clone();
            l.modules
                .insert("lora_unet_input_blocks_4_1_proj_in".into(), m);
            (l, vec!["lora_unet_input_blocks_4_1_proj_in".into()])
        },
    ];
    for (lora, needles) in cases {
        let (err, written) = bake_err(&base, &lora);
        let text = err.to_string();
        for n in &needles {
            assert!(text.contains(n.as_str()), "`{n}` not in: {text}");
        }
        assert!(
            matches!(err, BakeError::DoesNotFit { ref misfits, .. } if misfits.len() == 1),
            "{text}"
        );
        assert!(!written, "nothing written on error");
    }
}

#[test]
fn non_finite_checkpoint_values_and_ratios_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("nan.safetensors");
    let key = "model.diffusion_model.middle_block.1.proj_in.weight".to_string();
    let entries = vec![(key.clone(), vec![4, 4])];
    write_safetensors(&base, &entries, StoreDtype::F32, &BTreeMap::new(), |_| {
        let mut v = vec![0.5f32; 16];
        v[5] = f32::NAN;
        v
    })
    .unwrap();
    let spec = ModuleSpec {
        name: "lora_unet_mid_block_attentions_0_proj_in".into(),
        kind: ModuleKind::Linear,
        out_dim: 4,
        in_dim: 4,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let lora = Lora {
        modules: [(
            spec.name.clone(),
            synth::random_module(&spec, 1, 1.0, &mut rng),
        )]
        .into(),
        metadata: BTreeMap::new(),
    };
    let (err, written) = bake_err(&base, &lora);
    assert!(
        matches!(&err, BakeError::NonFinite { key: k, index: 5, .. } if *k == key),
        "{err}"
    );
    assert!(!written);

    let lp = dir.path().join("l.safetensors");
    lora.save(&lp, Precision::F32).unwrap();
    let err = merge_into_model(
        &base,
        &[(lp, f64::NAN)],
        &dir.path().join("o.safetensors"),
        &BakeOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a finite number"), "{err}");
}
