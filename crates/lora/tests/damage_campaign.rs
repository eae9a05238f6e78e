//! A seeded campaign of damaged LoRA files through the library's load and inspect path:
//! byte flips in the header and the data, truncations, a corrupted header length,
//! overlapping and non-contiguous offsets, wrong and unknown dtypes, shapes that disagree
//! with sizes or with each other, NaN/inf weights, missing alphas. Every file must give an
//! `Err` with a message naming it, or an `Ok` whose LoRA passes `validate`, inspects to
//! finite norms and round-trips through the writer; never a panic. Files Python's
//! safetensors (the Rust crate it wraps) refuses must be refused too.
//!
//! `SLIDER_DAMAGE_CASES` raises the number of files (default 600) for a longer run;
//! `SLIDER_DAMAGE_SEED` changes the seed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};
use slider_lora::synth::{self, Layout};
use slider_lora::{AlphaStorage, Lora, Precision, inspect};

const DEFAULT_SEED: u64 = 0x51DE_DA3A;
const DEFAULT_CASES: usize = 600;

/// The valid files damage starts from.
fn bases() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (seed, precision) in [
        (1, Precision::F32),
        (2, Precision::F16),
        (3, Precision::Bf16),
    ] {
        let mut lora = synth::random_lora(Layout::Tiny, 4, 1.0, seed);
        // Keep files small (a few modules) so many cases run fast, with one integer alpha
        // and one absent alpha among them.
        let keep: Vec<String> = lora.modules.keys().step_by(9).cloned().collect();
        lora.modules.retain(|k, _| keep.contains(k));
        let mut storages = [AlphaStorage::Integer, AlphaStorage::Absent].into_iter();
        for m in lora.modules.values_mut() {
            if let Some(s) = storages.next() {
                m.alpha_storage = s;
            }
        }
        out.push(lora.to_bytes(precision));
    }
    out
}

/// Header JSON object and data section of a valid file.
fn split(bytes: &[u8]) -> (Map<String, Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("valid base header");
    let Value::Object(map) = header else {
        panic!("base header is an object")
    };
    (map, bytes[8 + n..].to_vec())
}

fn join(map: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(map).expect("serialises");
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out
}

fn tensor_keys(map: &Map<String, Value>) -> Vec<String> {
    map.keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

fn offsets(map: &Map<String, Value>, key: &str) -> (u64, u64) {
    let o = &map[key]["data_offsets"];
    (
        o[0].as_u64().expect("offset"),
        o[1].as_u64().expect("offset"),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Damage {
    HeaderByteFlip,
    DataByteFlip,
    Truncate,
    HeaderLength,
    OverlappingOffsets,
    GapInOffsets,
    WrongDtype,
    UnknownDtype,
    ShapeSizeDisagree,
    RankMismatch,
    NonFiniteWeight,
    MissingAlphaEntry,
    AlphaRemovedCleanly,
}

const DAMAGES: [Damage; 13] = [
    Damage::HeaderByteFlip,
    Damage::DataByteFlip,
    Damage::Truncate,
    Damage::HeaderLength,
    Damage::OverlappingOffsets,
    Damage::GapInOffsets,
    Damage::WrongDtype,
    Damage::UnknownDtype,
    Damage::ShapeSizeDisagree,
    Damage::RankMismatch,
    Damage::NonFiniteWeight,
    Damage::MissingAlphaEntry,
    Damage::AlphaRemovedCleanly,
];

impl Damage {
    /// Damage after which no valid file can remain.
    fn always_fatal(self) -> bool {
        !matches!(
            self,
            // A dtype swapped for one of the same width (F16 <-> BF16, I64 -> F64 alpha)
            // reinterprets bytes that may still be valid values.
            Damage::HeaderByteFlip
                | Damage::DataByteFlip
                | Damage::WrongDtype
                | Damage::AlphaRemovedCleanly
        )
    }
}

fn damage(base: &[u8], kind: Damage, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let (mut map, mut data) = split(base);
    let keys = tensor_keys(&map);
    let pick =
        |rng: &mut ChaCha8Rng, keys: &[String]| keys[rng.random_range(0..keys.len())].clone();
    match kind {
        Damage::HeaderByteFlip => {
            let mut b = base.to_vec();
            let n = u64::from_le_bytes(b[..8].try_into().expect("8")) as usize;
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(8..8 + n);
                b[i] ^= 1 << rng.random_range(0..8);
            }
            b
        }
        Damage::DataByteFlip => {
            let mut b = base.to_vec();
            let n = u64::from_le_bytes(b[..8].try_into().expect("8")) as usize;
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(8 + n..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
            b
        }
        Damage::Truncate => {
            let cut = rng.random_range(0..base.len());
            base[..cut].to_vec()
        }
        Damage::HeaderLength => {
            let mut b = base.to_vec();
            let n = u64::from_le_bytes(b[..8].try_into().expect("8"));
            let wrong = match rng.random_range(0..4) {
                0 => rng.random::<u64>(),
                1 => n + rng.random_range(1..64),
                2 => n.saturating_sub(rng.random_range(1..64)),
                _ => 100_000_001,
            };
            b[..8].copy_from_slice(&wrong.to_le_bytes());
            b
        }
        Damage::OverlappingOffsets | Damage::GapInOffsets => {
            let key = pick(rng, &keys);
            let (s, e) = offsets(&map, &key);
            let shift = rng.random_range(1..8u64);
            let (s, e) = if kind == Damage::GapInOffsets {
                (s + shift, e + shift)
            } else if s >= shift {
                (s - shift, e - shift)
            } else {
                // The first tensor: make the next one overlap it instead.
                (s, e + shift)
            };
            map[&key]["data_offsets"] = serde_json::json!([s, e]);
            if kind == Damage::GapInOffsets {
                data.extend(std::iter::repeat_n(0u8, shift as usize));
            }
            join(&map, &data)
        }
        Damage::WrongDtype => {
            let key = pick(rng, &keys);
            let dtypes = [
                "F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3",
            ];
            let current = map[&key]["dtype"].as_str().expect("dtype").to_string();
            let others: Vec<&str> = dtypes.iter().copied().filter(|d| *d != current).collect();
            map[&key]["dtype"] = Value::from(others[rng.random_range(0..others.len())]);
            join(&map, &data)
        }
        Damage::UnknownDtype => {
            let key = pick(rng, &keys);
            let names = ["F33", "f32", "", "FLOAT", "F8_E9M9", "Q4_0"];
            map[&key]["dtype"] = Value::from(names[rng.random_range(0..names.len())]);
            join(&map, &data)
        }
        Damage::ShapeSizeDisagree => {
            let key = pick(rng, &keys);
            let mut shape: Vec<u64> = map[&key]["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim"))
                .collect();
            match (shape.is_empty(), rng.random_range(0..3)) {
                (true, _) | (_, 0) => shape.push(rng.random_range(2..5)),
                (false, 1) => {
                    let i = rng.random_range(0..shape.len());
                    shape[i] += rng.random_range(1..4);
                }
                _ => {
                    let i = rng.random_range(0..shape.len());
                    shape[i] = u64::MAX / 2;
                }
            }
            map[&key]["shape"] = serde_json::json!(shape);
            join(&map, &data)
        }
        Damage::RankMismatch => {
            // An up weight [out, r] reshaped to [out * r / 2, 2] (or [out * r, 1]): the byte
            // size still matches, the rank does not.
            let ups: Vec<String> = keys
                .iter()
                .filter(|k| k.ends_with("lora_up.weight"))
                .cloned()
                .collect();
            let key = pick(rng, &ups);
            let shape: Vec<u64> = map[&key]["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim"))
                .collect();
            let total: u64 = shape[..2].iter().product();
            let r = if rng.random_bool(0.5) { 2 } else { 1 };
            let mut new = vec![total / r, r];
            new.extend_from_slice(&shape[2..]);
            map[&key]["shape"] = serde_json::json!(new);
            join(&map, &data)
        }
        Damage::NonFiniteWeight => {
            let weights: Vec<String> = keys
                .iter()
                .filter(|k| k.ends_with(".weight"))
                .cloned()
                .collect();
            let key = pick(rng, &weights);
            let (s, e) = offsets(&map, &key);
            let dtype = map[&key]["dtype"].as_str().expect("dtype");
            let bad: Vec<u8> = match (dtype, rng.random_range(0..3)) {
                ("F32", 0) => f32::NAN.to_le_bytes().to_vec(),
                ("F32", 1) => f32::INFINITY.to_le_bytes().to_vec(),
                ("F32", _) => f32::NEG_INFINITY.to_le_bytes().to_vec(),
                ("F16", 0) => half::f16::NAN.to_le_bytes().to_vec(),
                ("F16", _) => half::f16::INFINITY.to_le_bytes().to_vec(),
                (_, 0) => half::bf16::NAN.to_le_bytes().to_vec(),
                _ => half::bf16::NEG_INFINITY.to_le_bytes().to_vec(),
            };
            let width = bad.len() as u64;
            let slot = rng.random_range(0..(e - s) / width);
            let at = (s + slot * width) as usize;
            data[at..at + bad.len()].copy_from_slice(&bad);
            join(&map, &data)
        }
        Damage::MissingAlphaEntry => {
            // The header loses an alpha entry but its bytes stay: a hole in the data.
            let alphas: Vec<String> = keys
                .iter()
                .filter(|k| k.ends_with(".alpha"))
                .cloned()
                .collect();
            let key = pick(rng, &alphas);
            map.remove(&key);
            join(&map, &data)
        }
        Damage::AlphaRemovedCleanly => {
            // A well-formed file without one module's alpha: alpha = rank, a valid LoRA.
            let alphas: Vec<String> = keys
                .iter()
                .filter(|k| k.ends_with(".alpha"))
                .cloned()
                .collect();
            let key = pick(rng, &alphas);
            let (s, e) = offsets(&map, &key);
            let width = e - s;
            map.remove(&key);
            data.drain(s as usize..e as usize);
            for k in tensor_keys(&map) {
                let (ks, ke) = offsets(&map, &k);
                if ks >= e {
                    map[&k]["data_offsets"] = serde_json::json!([ks - width, ke - width]);
                }
            }
            join(&map, &data)
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    tried: usize,
    errors: usize,
    ok: usize,
    panics: usize,
    reference_refused_we_accepted: usize,
    fatal_accepted: usize,
    unnamed_errors: usize,
}

/// Load + inspect, and for an accepted file the checks that it is really valid.
fn load_and_inspect(label: &Path, bytes: &[u8]) -> Result<(), String> {
    let lora = Lora::from_bytes(label, bytes).map_err(|e| e.to_string())?;
    lora.validate()
        .map_err(|e| format!("accepted but invalid: {e}"))?;
    let summary = inspect::summarize(&lora);
    assert_eq!(summary.module_count, lora.modules.len());
    assert!(
        summary.modules.iter().all(|m| m.delta_norm.is_finite()),
        "accepted with a non-finite delta norm"
    );
    let again = Lora::from_bytes(label, &lora.to_bytes(Precision::F32))
        .map_err(|e| format!("accepted but does not round-trip: {e}"))?;
    // Values survive the f32 writer exactly (only the recorded file dtype differs).
    let mut as_f32 = lora.clone();
    for m in as_f32.modules.values_mut() {
        m.dtype = slider_lora::TensorDtype::F32;
    }
    assert_eq!(again.modules, as_f32.modules);
    Ok(())
}

#[test]
fn damaged_lora_files_give_errors_never_panics() {
    let seed = std::env::var("SLIDER_DAMAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let cases = std::env::var("SLIDER_DAMAGE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let bases = bases();
    for b in &bases {
        load_and_inspect(Path::new("base"), b).expect("the bases are valid");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut counts = Counts::default();
    let mut per_kind = std::collections::BTreeMap::<Damage, (usize, usize)>::new();
    // Panics are caught and counted; keep the default hook from printing each one.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..cases {
        let kind = DAMAGES[i % DAMAGES.len()];
        let base = &bases[rng.random_range(0..bases.len())];
        let bytes = damage(base, kind, &mut rng);
        let label = format!("damaged-{i}.safetensors");
        let reference_ok = safetensors::SafeTensors::deserialize(&bytes).is_ok();
        counts.tried += 1;
        let entry = per_kind.entry(kind).or_default();
        entry.0 += 1;
        match catch_unwind(AssertUnwindSafe(|| {
            load_and_inspect(Path::new(&label), &bytes)
        })) {
            Err(_) => counts.panics += 1,
            Ok(Ok(())) => {
                counts.ok += 1;
                if !reference_ok {
                    counts.reference_refused_we_accepted += 1;
                }
                if kind.always_fatal() {
                    counts.fatal_accepted += 1;
                }
            }
            Ok(Err(message)) => {
                counts.errors += 1;
                entry.1 += 1;
                if !message.contains(&label) || message.contains("accepted but") {
                    counts.unnamed_errors += 1;
                    eprintln!("{kind:?}: {message}");
                }
            }
        }
    }
    std::panic::set_hook(hook);
    println!(
        "damage campaign, seed {seed:#x}: tried {}, errors {}, ok {}, panics {}",
        counts.tried, counts.errors, counts.ok, counts.panics
    );
    for (kind, (tried, errors)) in &per_kind {
        println!("  {kind:?}: {tried} tried, {errors} errors");
    }
    assert!(counts.tried >= 300);
    assert_eq!(counts.panics, 0, "{counts:?}");
    assert_eq!(counts.reference_refused_we_accepted, 0, "{counts:?}");
    assert_eq!(counts.fatal_accepted, 0, "{counts:?}");
    assert_eq!(counts.unnamed_errors, 0, "{counts:?}");
    // The harmless kinds do produce accepted files (the campaign is not all errors).
    assert!(counts.ok > 0, "{counts:?}");
}
