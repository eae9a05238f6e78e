//! File format tests: byte-level round trips, agreement with the safetensors library's
//! writer and kohya's hashes, and every malformed input with the message it must give.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::*;
use crate::synth::{self, Layout};

fn tiny(seed: u64) -> Lora {
    synth::random_lora(Layout::Tiny, 4, 1.0, seed)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A file of hand-made tensors, written in the given order.
fn craft(entries: Vec<(&str, &'static str, Vec<usize>, Vec<u8>)>) -> Vec<u8> {
    let outs: Vec<Out> = entries
        .into_iter()
        .map(|(name, dtype, shape, bytes)| Out {
            name: name.into(),
            dtype,
            order: 0,
            shape,
            bytes,
        })
        .collect();
    serialize(&outs, &BTreeMap::new())
}

fn error_of(bytes: &[u8]) -> String {
    match parse(Path::new("x.safetensors"), bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn round_trip_is_byte_identical_in_every_precision() {
    let lora = tiny(1);
    for precision in [Precision::F32, Precision::F16, Precision::Bf16] {
        let bytes = lora.to_bytes(precision);
        let back = parse(Path::new("mem"), &bytes).expect("parses");
        assert_eq!(back.modules.len(), lora.modules.len());
        assert_eq!(back.to_bytes(precision), bytes, "{precision}");
    }
}

#[test]
fn save_and_load_through_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.safetensors");
    let lora = tiny(2);
    lora.save(&path, Precision::F32).expect("saves");
    let back = Lora::load(&path).expect("loads");
    assert_eq!(back.modules, lora.modules);
    for (k, v) in &lora.metadata {
        assert_eq!(back.metadata.get(k), Some(v), "{k}");
    }
    assert!(back.metadata.contains_key("sshs_model_hash"));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("lists")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
}

#[test]
fn writer_matches_the_safetensors_library_byte_for_byte() {
    let mut lora = tiny(3);
    // One metadata key, so the library's hash-map order cannot differ from ours.
    lora.metadata = BTreeMap::from([("ss_network_dim".to_string(), "4".to_string())]);
    if let Some(m) = lora.modules.values_mut().next() {
        m.alpha_storage = AlphaStorage::Integer;
    }
    for precision in [Precision::F32, Precision::F16, Precision::Bf16] {
        let outs = tensors(&lora, precision);
        let ours = serialize(&outs, &lora.metadata);
        let views: Vec<(String, TensorView<'_>)> = outs
            .iter()
            .map(|t| {
                let dtype = match t.dtype {
                    "F32" => Dtype::F32,
                    "F16" => Dtype::F16,
                    "BF16" => Dtype::BF16,
                    "I64" => Dtype::I64,
                    other => panic!("unexpected dtype {other}"),
                };
                let view = TensorView::new(dtype, t.shape.clone(), &t.bytes).expect("view");
                (t.name.clone(), view)
            })
            .collect();
        let metadata: HashMap<String, String> = lora.metadata.clone().into_iter().collect();
        let theirs = safetensors::serialize(views, Some(metadata)).expect("serialises");
        assert_eq!(ours, theirs, "{precision}");
    }
}

#[test]
fn hashes_are_kohyas_over_the_ss_only_serialisation() {
    // SD1 at rank 4 is larger than 1.1 MB, so the legacy hash covers real tensor bytes.
    let mut lora = synth::random_lora(Layout::Sd1, 4, 1.0, 4);
    lora.metadata = BTreeMap::from([
        ("ss_network_dim".to_string(), "4".to_string()),
        ("modelspec.title".to_string(), "not hashed".to_string()),
    ]);
    let written = parse(Path::new("mem"), &lora.to_bytes(Precision::F16)).expect("parses");

    // Independently: the library's serialisation with only the `ss_*` key.
    let outs = tensors(&lora, Precision::F16);
    let views: Vec<(String, TensorView<'_>)> = outs
        .iter()
        .map(|t| {
            let dtype = if t.dtype == "F16" {
                Dtype::F16
            } else {
                Dtype::I64
            };
            (
                t.name.clone(),
                TensorView::new(dtype, t.shape.clone(), &t.bytes).expect("view"),
            )
        })
        .collect();
    let ss_only = HashMap::from([("ss_network_dim".to_string(), "4".to_string())]);
    let bytes = safetensors::serialize(views, Some(ss_only)).expect("serialises");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let model = hex::encode(Sha256::digest(&bytes[8 + n..]));
    let legacy = hex::encode(Sha256::digest(&bytes[0x100000..0x110000]))[..8].to_string();
    assert!(bytes.len() > 0x110000);
    assert_eq!(written.metadata["sshs_model_hash"], model);
    assert_eq!(written.metadata["sshs_legacy_hash"], legacy);
    assert_eq!(written.metadata["modelspec.title"], "not hashed");
}

#[test]
fn tensor_order_is_dtype_descending_then_name() {
    let mut lora = tiny(5);
    for m in lora.modules.values_mut() {
        m.alpha_storage = AlphaStorage::Integer;
    }
    let outs = tensors(&lora, Precision::F16);
    let alphas = outs.iter().take_while(|t| t.dtype == "I64").count();
    assert_eq!(alphas, lora.modules.len(), "I64 alphas come first");
    let names: Vec<&str> = outs[alphas..].iter().map(|t| t.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
}

#[test]
fn reads_peft_names_and_missing_alpha() {
    let bytes = craft(vec![
        (
            "base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight",
            "F32",
            vec![2, 3],
            f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        ),
        (
            "base_model.model.down_blocks.0.attentions.0.proj_in.lora_B.weight",
            "F32",
            vec![4, 2],
            f32_bytes(&[0.5; 8]),
        ),
    ]);
    let lora = parse(Path::new("peft.safetensors"), &bytes).expect("parses");
    let m = &lora.modules["lora_unet_down_blocks_0_attentions_0_proj_in"];
    assert_eq!((m.out_dim, m.in_dim, m.rank), (4, 3, 2));
    assert_eq!((m.alpha, m.alpha_storage), (2.0, AlphaStorage::Absent));
}

#[test]
fn reads_f16_bf16_weights_and_integer_alpha() {
    let h: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let b: Vec<u8> = [0.25f32, 4.0]
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let bytes = craft(vec![
        ("m.lora_down.weight", "F16", vec![1, 2], h),
        ("m.lora_up.weight", "BF16", vec![2, 1], b),
        ("m.alpha", "I64", vec![], 8i64.to_le_bytes().to_vec()),
    ]);
    let lora = parse(Path::new("x"), &bytes).expect("parses");
    let m = &lora.modules["m"];
    assert_eq!(m.down, vec![1.5, -2.0]);
    assert_eq!(m.up, vec![0.25, 4.0]);
    assert_eq!((m.alpha, m.alpha_storage), (8.0, AlphaStorage::Integer));
}

#[test]
fn bad_inputs_give_messages_naming_file_and_key() {
    let down = || f32_bytes(&[1.0; 6]);
    let up = || f32_bytes(&[1.0; 8]);
    let good_header = craft(vec![
        ("m.lora_down.weight", "F32", vec![2, 3], down()),
        ("m.lora_up.weight", "F32", vec![4, 2], up()),
    ]);
    let mut nan_up = f32_bytes(&[1.0; 8]);
    nan_up[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut huge_header = good_header.clone();
    huge_header[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let mut bad_json = (6u64).to_le_bytes().to_vec();
    bad_json.extend_from_slice(b"{nope}");
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "up without down",
            craft(vec![("m.lora_up.weight", "F32", vec![4, 2], up())]),
            &[
                "`x.safetensors`",
                "module `m`",
                "up weight `m.lora_up.weight` but no down",
            ],
        ),
        (
            "down without up",
            craft(vec![("m.lora_down.weight", "F32", vec![2, 3], down())]),
            &["module `m`", "down weight `m.lora_down.weight` but no up"],
        ),
        (
            "rank mismatch",
            craft(vec![
                ("m.lora_down.weight", "F32", vec![2, 3], down()),
                ("m.lora_up.weight", "F32", vec![2, 4], up()),
            ]),
            &[
                "rank mismatch",
                "`m.lora_down.weight` has rank 2",
                "`m.lora_up.weight` has rank 4",
            ],
        ),
        (
            "non-finite",
            craft(vec![
                ("m.lora_down.weight", "F32", vec![2, 3], down()),
                ("m.lora_up.weight", "F32", vec![4, 2], nan_up),
            ]),
            &[
                "module `m`",
                "tensor `m.lora_up.weight`",
                "non-finite value (NaN)",
                "index 3",
            ],
        ),
        (
            "truncated data",
            good_header[..good_header.len() - 5].to_vec(),
            &[
                "`x.safetensors` is truncated",
                "tensor `m.lora_up.weight` ends at byte",
            ],
        ),
        (
            "truncated length",
            vec![1, 2, 3],
            &["is truncated", "3 bytes"],
        ),
        (
            "header longer than the file",
            good_header[..20].to_vec(),
            &["is truncated", "the header needs"],
        ),
        (
            "header over the limit",
            huge_header,
            &["malformed header", "100 MB"],
        ),
        ("not JSON", bad_json, &["malformed header", "invalid JSON"]),
        (
            "unsupported dtype",
            craft(vec![
                ("m.lora_down.weight", "I8", vec![2, 3], vec![1; 6]),
                ("m.lora_up.weight", "F32", vec![4, 2], up()),
            ]),
            &["tensor `m.lora_down.weight` has dtype I8", "not supported"],
        ),
        (
            "unknown tensor",
            craft(vec![(
                "m.hada_w1_a",
                "F32",
                vec![2],
                f32_bytes(&[1.0, 2.0]),
            )]),
            &["tensor `m.hada_w1_a` is not part of a LoRA"],
        ),
        (
            "size disagrees with shape",
            craft(vec![("m.lora_down.weight", "F32", vec![2, 4], down())]),
            &[
                "malformed header",
                "tensor `m.lora_down.weight`",
                "shape [2, 4] of F32 needs 32 bytes but its data_offsets span 24",
            ],
        ),
        (
            "conv up not 1x1",
            craft(vec![
                ("m.lora_down.weight", "F32", vec![2, 3, 1, 1], down()),
                ("m.lora_up.weight", "F32", vec![4, 2], up()),
            ]),
            &["bad shape [4, 2]", "[out, rank, 1, 1]"],
        ),
    ];
    for (what, bytes, needles) in cases {
        let message = error_of(&bytes);
        for needle in needles {
            assert!(
                message.contains(needle),
                "{what}: `{message}` lacks `{needle}`"
            );
        }
    }
}

#[test]
fn loading_a_missing_file_names_it() {
    let err = Lora::load(Path::new("/nonexistent/dir/none.safetensors")).expect_err("fails");
    assert!(
        err.to_string()
            .contains("cannot read `/nonexistent/dir/none.safetensors`")
    );
}

/// A file from a hand-written header (tensor entries as JSON text) and data bytes.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn headers_are_validated_as_the_safetensors_library_does() {
    let t = |name: &str, dtype: &str, shape: &str, s: usize, e: usize| {
        format!("\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape},\"data_offsets\":[{s},{e}]}}")
    };
    let down = t("m.lora_down.weight", "F32", "[2,3]", 0, 24);
    let up = t("m.lora_up.weight", "F32", "[4,2]", 24, 56);
    let data = vec![0u8; 56];
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "overlapping ranges",
            raw_file(
                &format!(
                    "{{{down},{}}}",
                    t("m.lora_up.weight", "F32", "[4,2]", 16, 48)
                ),
                &data[..48],
            ),
            &[
                "tensor `m.lora_up.weight` has data_offsets [16, 48] but must start at 24",
                "where `m.lora_down.weight` ends",
                "non-overlapping",
            ],
        ),
        (
            "a gap between tensors",
            raw_file(
                &format!(
                    "{{{down},{}}}",
                    t("m.lora_up.weight", "F32", "[4,2]", 28, 60)
                ),
                &[0u8; 60],
            ),
            &["`m.lora_up.weight` has data_offsets [28, 60] but must start at 24"],
        ),
        (
            "data not starting at 0",
            raw_file(
                &format!(
                    "{{{},{}}}",
                    t("m.lora_down.weight", "F32", "[2,3]", 8, 32),
                    t("m.lora_up.weight", "F32", "[4,2]", 32, 64)
                ),
                &[0u8; 64],
            ),
            &["`m.lora_down.weight` has data_offsets [8, 32] but must start at 0"],
        ),
        (
            "offsets running backwards",
            raw_file(
                &format!("{{{}}}", t("m.lora_down.weight", "F32", "[2,3]", 0, 0)),
                &[],
            ),
            &["needs 24 bytes but its data_offsets span 0"],
        ),
        (
            "bytes after the last tensor",
            raw_file(&format!("{{{down},{up}}}"), &[0u8; 64]),
            &["the tensors end at byte", "but the file has"],
        ),
        (
            "unknown dtype",
            raw_file(
                &format!(
                    "{{{},{up}}}",
                    t("m.lora_down.weight", "F33", "[2,3]", 0, 24)
                ),
                &data,
            ),
            &["tensor `m.lora_down.weight` has unknown dtype `F33`"],
        ),
        (
            "a key twice",
            raw_file(&format!("{{{down},{down},{up}}}"), &data),
            &["key `m.lora_down.weight` appears twice"],
        ),
        (
            "size overflow",
            raw_file(
                &format!(
                    "{{{}}}",
                    t(
                        "m.lora_down.weight",
                        "F32",
                        "[4294967296,4294967296,16]",
                        0,
                        24
                    )
                ),
                &[0u8; 24],
            ),
            &["tensor `m.lora_down.weight`", "overflows"],
        ),
        (
            "sub-byte size",
            raw_file(
                &format!("{{{}}}", t("m.lora_down.weight", "F4", "[3]", 0, 1)),
                &[0u8; 1],
            ),
            &["not a whole number of bytes"],
        ),
        (
            "header is a JSON array",
            raw_file("[1,2]   ", &[]),
            &["invalid JSON", "a JSON object"],
        ),
        (
            "metadata not strings",
            raw_file("{\"__metadata__\":{\"a\":1}}", &[]),
            &["`__metadata__` is not a string-to-string map"],
        ),
        (
            "a zero dimension",
            craft(vec![
                ("m.lora_down.weight", "F32", vec![2, 0], vec![]),
                ("m.lora_up.weight", "F32", vec![4, 2], f32_bytes(&[1.0; 8])),
            ]),
            &[
                "`m.lora_down.weight` has a bad shape [2, 0]",
                "a dimension is 0",
            ],
        ),
        (
            "kohya and PEFT names of one module",
            craft(vec![
                (
                    "lora_unet_a.lora_down.weight",
                    "F32",
                    vec![2, 3],
                    f32_bytes(&[1.0; 6]),
                ),
                (
                    "unet.a.lora_A.weight",
                    "F32",
                    vec![2, 3],
                    f32_bytes(&[1.0; 6]),
                ),
                (
                    "lora_unet_a.lora_up.weight",
                    "F32",
                    vec![4, 2],
                    f32_bytes(&[1.0; 8]),
                ),
            ]),
            &[
                "module `lora_unet_a`: two tensors give its down weight",
                "`lora_unet_a.lora_down.weight`",
                "`unet.a.lora_A.weight`",
            ],
        ),
        (
            "alpha not a scalar",
            craft(vec![
                (
                    "m.lora_down.weight",
                    "F32",
                    vec![2, 3],
                    f32_bytes(&[1.0; 6]),
                ),
                ("m.lora_up.weight", "F32", vec![4, 2], f32_bytes(&[1.0; 8])),
                ("m.alpha", "F32", vec![2], f32_bytes(&[1.0; 2])),
            ]),
            &["`m.alpha` has a bad shape [2]", "alpha is a scalar"],
        ),
    ];
    for (what, bytes, needles) in cases {
        let message = error_of(&bytes);
        assert!(message.contains("`x.safetensors`"), "{what}: {message}");
        for needle in needles {
            assert!(
                message.contains(needle),
                "{what}: `{message}` lacks `{needle}`"
            );
        }
    }
    // The reference accepts tensors listed out of data order: so do we.
    let reordered = raw_file(&format!("{{{up},{down}}}"), &data);
    assert!(parse(Path::new("x"), &reordered).is_ok());
}

#[test]
fn a_file_truncated_on_disk_is_an_error_not_a_signal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.safetensors");
    let bytes = tiny(9).to_bytes(Precision::F16);
    for cut in [bytes.len() - 1, bytes.len() / 2, 100, 8, 3] {
        std::fs::write(&path, &bytes[..cut]).expect("writes");
        let err = Lora::load(&path).expect_err("truncated");
        assert!(
            err.to_string().contains("is truncated"),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn modules_built_in_code_are_checked_before_use() {
    let mut lora = tiny(10);
    let name = lora.modules.keys().next().cloned().expect("modules");
    if let Some(m) = lora.modules.get_mut(&name) {
        m.up.pop();
    }
    let err = lora.validate().expect_err("inconsistent");
    assert!(
        err.to_string()
            .contains(&format!("module `{name}`: up factor has"))
    );
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(
        lora.save(&dir.path().join("x.safetensors"), Precision::F32)
            .is_err()
    );
    assert!(crate::merge(&[&lora], &[1.0]).is_err());
    assert!(crate::resize(&lora, &crate::ResizeOptions::default()).is_err());
}
