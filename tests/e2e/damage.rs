//! Damaged checkpoints through every command that reads one: `inspect`, `model inspect`,
//! `sample` and a one-step `train` recipe. A seeded generator takes a valid random checkpoint
//! and damages it one way at a time (shapes reversed, swapped, resized, zeroed or given an extra
//! axis; keys dropped or renamed; other dtypes; NaN and infinity; truncation; broken headers,
//! overlapping offsets; a UNet whose GroupNorm cannot split its channels). Every command must
//! end with a non-zero exit and a message: never a panic (exit 101, or "panicked at" in any
//! output or log) and never a signal.
//!
//! `SLIDER_CKPT_DAMAGE_CASES` (default 100) and `SLIDER_CKPT_DAMAGE_SEED` (default 17) set the
//! campaign's size and seed.

use std::fs;
use std::path::Path;
use std::process::Output;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value, json};
use slider_models::checkpoint::{ModelSpec, StoreDtype, write_random_checkpoint};

use crate::slider_run;

/// One stored tensor: name, dtype name, shape, bytes.
#[derive(Clone)]
struct Tensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// A safetensors file taken apart: `__metadata__` and the tensors in data order.
#[derive(Clone)]
struct File {
    metadata: Option<Value>,
    tensors: Vec<Tensor>,
}

impl File {
    fn parse(bytes: &[u8]) -> File {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut metadata = None;
        let mut tensors = Vec::new();
        for (name, entry) in header {
            if name == "__metadata__" {
                metadata = Some(entry);
                continue;
            }
            let offsets: Vec<usize> =
                serde_json::from_value(entry["data_offsets"].clone()).unwrap();
            tensors.push((
                offsets[0],
                Tensor {
                    name,
                    dtype: entry["dtype"].as_str().unwrap().to_owned(),
                    shape: serde_json::from_value(entry["shape"].clone()).unwrap(),
                    bytes: data[offsets[0]..offsets[1]].to_vec(),
                },
            ));
        }
        tensors.sort_by_key(|(start, _)| *start);
        let tensors = tensors.into_iter().map(|(_, t)| t).collect();
        File { metadata, tensors }
    }

    /// The header (with contiguous offsets) and the data.
    fn header_and_data(&self) -> (Map<String, Value>, Vec<u8>) {
        let mut header = Map::new();
        if let Some(m) = &self.metadata {
            header.insert("__metadata__".into(), m.clone());
        }
        let mut data = Vec::new();
        for t in &self.tensors {
            let start = data.len();
            data.extend_from_slice(&t.bytes);
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()]}),
            );
        }
        (header, data)
    }

    fn assemble(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
        let mut text = serde_json::to_vec(header).unwrap();
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        out.extend_from_slice(data);
        out
    }

    fn to_bytes(&self) -> Vec<u8> {
        let (header, data) = self.header_and_data();
        Self::assemble(&header, &data)
    }
}

fn random_f32_bytes(n: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    (0..n)
        .flat_map(|_| rng.random_range(-0.1f32..0.1).to_le_bytes())
        .collect()
}

/// Keys the loader may do without (buffers): damage elsewhere.
fn optional(name: &str) -> bool {
    name.ends_with("position_ids") || name.ends_with("logit_scale")
}

const KINDS: usize = 15;

/// Damage number `kind` applied to `file` at places drawn from `rng`; returns the new bytes and
/// a description.
fn damage(file: &File, kind: usize, rng: &mut ChaCha8Rng) -> (Vec<u8>, String) {
    let mut f = file.clone();
    let pick = |f: &File, rng: &mut ChaCha8Rng, ok: &dyn Fn(&Tensor) -> bool| -> usize {
        let candidates: Vec<usize> = (0..f.tensors.len())
            .filter(|&i| ok(&f.tensors[i]) && !optional(&f.tensors[i].name))
            .collect();
        candidates[rng.random_range(0..candidates.len())]
    };
    let what = match kind {
        0 => {
            let i = pick(&f, rng, &|t| {
                t.shape.len() == 4 && t.shape.iter().rev().copied().collect::<Vec<_>>() != t.shape
            });
            f.tensors[i].shape.reverse();
            format!(
                "conv weight {} with its dimensions reversed",
                f.tensors[i].name
            )
        }
        1 => {
            let i = pick(&f, rng, &|t| t.shape.len() == 2 && t.shape[0] != t.shape[1]);
            f.tensors[i].shape.swap(0, 1);
            format!("matrix {} transposed in the header", f.tensors[i].name)
        }
        2 => {
            // Not the embeddings: more tokens or positions is a valid, larger model.
            let i = pick(&f, rng, &|t| {
                !t.shape.is_empty() && t.dtype == "F32" && !t.name.contains("embedding")
            });
            let t = &mut f.tensors[i];
            let axis = rng.random_range(0..t.shape.len());
            t.shape[axis] += rng.random_range(1..4);
            t.bytes = random_f32_bytes(t.shape.iter().product(), rng);
            format!("{} resized to {:?}", t.name, t.shape)
        }
        3 => {
            let i = pick(&f, rng, &|_| true);
            let t = f.tensors.remove(i);
            format!("{} missing", t.name)
        }
        4 => {
            let i = pick(&f, rng, &|_| true);
            f.tensors[i].name.push_str("_renamed");
            format!("{} renamed", f.tensors[i].name)
        }
        5 => {
            let i = pick(&f, rng, &|t| t.dtype == "F32");
            let t = &mut f.tensors[i];
            let (dtype, width) =
                [("U8", 1), ("I16", 2), ("I64", 8), ("BOOL", 1)][rng.random_range(0..4)];
            t.dtype = dtype.into();
            t.bytes = vec![0; t.shape.iter().product::<usize>() * width];
            format!("{} stored as {dtype}", t.name)
        }
        6 | 7 => {
            let i = pick(&f, rng, &|t| t.dtype == "F32" && !t.bytes.is_empty());
            let t = &mut f.tensors[i];
            let at = rng.random_range(0..t.bytes.len() / 4) * 4;
            let value = if kind == 6 {
                f32::NAN
            } else {
                f32::NEG_INFINITY
            };
            t.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            format!("{value} in {}", t.name)
        }
        8 => {
            let mut bytes = f.to_bytes();
            let cut = rng.random_range(0..bytes.len() - 1);
            bytes.truncate(cut);
            return (bytes, format!("truncated to {cut} bytes"));
        }
        9 => {
            let mut bytes = f.to_bytes();
            let n = [0u64, 3, u64::MAX, 1 << 40, bytes.len() as u64][rng.random_range(0..5)];
            bytes[..8].copy_from_slice(&n.to_le_bytes());
            return (bytes, format!("header length field {n}"));
        }
        10 => {
            let bytes = f.to_bytes();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let cut = rng.random_range(1..n);
            let mut out = (cut as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&bytes[8..8 + cut]);
            out.extend_from_slice(&bytes[8 + n..]);
            return (out, format!("header cut to {cut} of {n} bytes"));
        }
        11 => {
            let (mut header, data) = f.header_and_data();
            let i = pick(&f, rng, &|t| t.bytes.len() >= 8);
            let name = &f.tensors[i].name;
            let entry = header.get_mut(name).unwrap();
            let start = entry["data_offsets"][0].as_u64().unwrap();
            let end = entry["data_offsets"][1].as_u64().unwrap();
            let shift = if start >= 4 { start - 4 } else { start + 4 };
            entry["data_offsets"] = json!([shift, shift + (end - start)]);
            return (
                File::assemble(&header, &data),
                format!("{name}'s bytes overlap a neighbour's"),
            );
        }
        12 => {
            let i = pick(&f, rng, &|t| !t.shape.is_empty());
            let t = &mut f.tensors[i];
            let axis = rng.random_range(0..t.shape.len());
            t.shape[axis] = 0;
            t.bytes.clear();
            format!("{} given an empty axis: {:?}", t.name, t.shape)
        }
        13 => {
            let i = pick(&f, rng, &|t| t.name.ends_with("input_blocks.0.0.weight"));
            let t = &mut f.tensors[i];
            t.shape[0] = [16usize, 48, 40][rng.random_range(0..3)];
            t.bytes = random_f32_bytes(t.shape.iter().product(), rng);
            format!(
                "UNet conv_in widened to {} channels (GroupNorm cannot split them)",
                t.shape[0]
            )
        }
        _ => {
            let i = pick(&f, rng, &|t| !t.shape.is_empty());
            f.tensors[i].shape.push(1);
            format!("{} given an extra axis", f.tensors[i].name)
        }
    };
    (f.to_bytes(), what)
}

const TRAIN_RECIPE: &str = r#"
nodes:
  one:
    kind: train
    base: base.safetensors
    images: [face.png]
    caption: a face
    max_train_steps: 1
    resolution: 64
    network_dim: 2
    network_train_unet_only: true
outputs:
  one: out/one.safetensors
"#;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The four commands on `dir/base.safetensors`, each with its output.
fn commands(dir: &Path) -> Vec<(&'static str, Output)> {
    let run = |args: &[&str]| slider_run().current_dir(dir).args(args).output().unwrap();
    vec![
        ("inspect", run(&["inspect", "base.safetensors"])),
        (
            "model inspect",
            run(&["model", "inspect", "base.safetensors"]),
        ),
        (
            "sample",
            run(&[
                "sample",
                "--base",
                "base.safetensors",
                "--prompt",
                "a face",
                "--steps",
                "1",
                "--width",
                "32",
                "--height",
                "32",
                "--out",
                "sample.png",
            ]),
        ),
        ("train", run(&["recipe.yaml"])),
    ]
}

/// Every `.log` file under `dir`, concatenated.
fn logs(dir: &Path) -> String {
    let mut all = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                all.push_str(&fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    all
}

fn setup(dir: &Path, base: &[u8]) {
    fs::write(dir.join("base.safetensors"), base).unwrap();
    fs::write(dir.join("recipe.yaml"), TRAIN_RECIPE).unwrap();
    image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    })
    .save(dir.join("face.png"))
    .unwrap();
}

#[test]
fn damaged_checkpoints_get_an_error_from_every_command_never_a_panic() {
    let cases: usize = std::env::var("SLIDER_CKPT_DAMAGE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("SLIDER_CKPT_DAMAGE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(17);
    let root = tempfile::tempdir().unwrap();
    let good = root.path().join("good.safetensors");
    write_random_checkpoint(&good, &ModelSpec::small_test(), StoreDtype::F32, 5).unwrap();
    let good = fs::read(&good).unwrap();

    // The undamaged file passes every command but `inspect`, which reads LoRAs only.
    let dir = root.path().join("undamaged");
    fs::create_dir(&dir).unwrap();
    setup(&dir, &good);
    for (command, out) in commands(&dir) {
        assert_eq!(
            out.status.success(),
            command != "inspect",
            "undamaged, {command}: {}",
            text(&out)
        );
    }

    let file = File::parse(&good);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in 0..cases {
        let kind = case % KINDS;
        let (bytes, what) = damage(&file, kind, &mut rng);
        let dir = root.path().join(format!("case{case}"));
        fs::create_dir(&dir).unwrap();
        setup(&dir, &bytes);
        for (command, out) in commands(&dir) {
            runs += 1;
            let all = format!("{}{}", text(&out), logs(&dir));
            let code = out.status.code();
            let clean = matches!(code, Some(c) if c != 0 && c != 101)
                && !all.contains("panicked at")
                && !text(&out).trim().is_empty();
            if !clean {
                failures.push(format!(
                    "case {case} ({what}), {command}: exit {code:?}\n{all}"
                ));
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!(
        "{cases} damaged checkpoints (seed {seed}), {runs} command runs, {} not clean",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {runs} runs did not end in a clean error:\n{}",
        failures.len(),
        failures.join("\n---\n")
    );
}
