//! Reading and writing kohya LoRA safetensors files, byte-compatible with Python's
//! `safetensors.torch.save_file`, and kohya's `sshs_model_hash` / `sshs_legacy_hash`.
//! Files are read whole into memory; the header is validated first (`header.rs`), so every
//! tensor's bytes exist and match its dtype and shape before a value is decoded.
//!
//! Layout of what we write (the same as the safetensors library writes it):
//! 8-byte little-endian header length, a compact JSON header (`__metadata__` first, then
//! one entry per tensor in data order) padded with spaces to a multiple of 8, then the
//! tensor bytes. Tensors are ordered by dtype, widest alignment first (I64, F32, BF16, F16:
//! the library's `Dtype` order, descending), then by name. Metadata keys are written in
//! sorted order (Python's writer uses a hash map, so its order varies from run to run; the
//! hashes below do not depend on it). Modules in diffusers names (`transformer.*`) are
//! written as diffusers writes them: `lora_A` / `lora_B`, no alpha (folded into the up).

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::LoraError;
use crate::header::{self, Dtype};
use crate::module::{AlphaStorage, Module, ModuleKind, TensorDtype};
use crate::transformer::Naming;
use crate::{Lora, Precision};

/// One tensor of a file, still in its stored bytes (whose length the header check has
/// matched to `dtype` x `shape`).
struct Raw<'a> {
    key: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

/// Which part of a module a tensor key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

impl Part {
    fn label(self) -> &'static str {
        match self {
            Part::Down => "down weight",
            Part::Up => "up weight",
            Part::Alpha => "alpha",
        }
    }
}

/// Reads a LoRA file into memory and parses it. No memory map: a file truncated or
/// rewritten while it is read gives a parse error (its length no longer matches its
/// header), never a SIGBUS.
pub fn load(path: &Path) -> Result<Lora, LoraError> {
    let bytes = std::fs::read(path).map_err(|source| LoraError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &bytes)
}

/// Parses the bytes of a safetensors LoRA file (`path` only labels errors).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Lora, LoraError> {
    let header = header::parse(path, bytes)?;
    let mut raws = Vec::with_capacity(header.entries.len());
    for entry in header.entries {
        let Some(slice) = bytes.get(entry.range.clone()) else {
            return Err(LoraError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor `{}` ends at byte {} but the file has {}",
                    entry.key,
                    entry.range.end,
                    bytes.len()
                ),
            });
        };
        raws.push(Raw {
            key: entry.key,
            dtype: entry.dtype,
            shape: entry.shape,
            bytes: slice,
        });
    }
    let modules = assemble(path, raws)?;
    Ok(Lora {
        modules,
        metadata: header.metadata,
    })
}

/// Splits a tensor key into (kohya module name, part). PEFT keys
/// (`<prefix>.<dotted.module>.lora_A.weight`) are renamed to kohya's convention.
fn split_key(key: &str) -> Option<(String, Part)> {
    for (suffix, part) in [
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ] {
        if let Some(module) = key.strip_suffix(suffix) {
            return Some((module.to_string(), part));
        }
    }
    for (suffix, part) in [(".lora_A.weight", Part::Down), (".lora_B.weight", Part::Up)] {
        if let Some(module) = key.strip_suffix(suffix) {
            return Some((peft_to_kohya(module), part));
        }
    }
    None
}

/// PEFT / diffusers module paths of the UNet models to kohya names:
/// `unet.down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`
/// (not re-mapped between the diffusers and original-UNet layouts). Names of the
/// transformer models (`transformer.*`, a PEFT `base_model.model.` prefix of their blocks
/// becomes `transformer.`) and names already in kohya's (`lora_*`) or ComfyUI's
/// (`diffusion_model.*`) form are kept: their layout is converted by `convert`, not here.
fn peft_to_kohya(module: &str) -> String {
    if module.starts_with("lora_")
        || module.starts_with("diffusion_model.")
        || module.starts_with("transformer.")
    {
        return module.to_string();
    }
    let module = module.strip_prefix("base_model.model.").unwrap_or(module);
    if is_transformer_block_path(module) {
        return format!("transformer.{module}");
    }
    let (prefix, rest) = if let Some(rest) = module.strip_prefix("text_encoder_2.") {
        ("lora_te2_", rest)
    } else if let Some(rest) = module.strip_prefix("text_encoder.") {
        ("lora_te_", rest)
    } else if let Some(rest) = module.strip_prefix("unet.") {
        ("lora_unet_", rest)
    } else {
        ("lora_unet_", module)
    };
    format!("{prefix}{}", rest.replace('.', "_"))
}

/// Module paths of the diffusers FLUX.1 / SD3 transformers (as PEFT writes them without a
/// `transformer.` prefix); the UNet models' paths start with `down_blocks`, `mid_block`, ...
fn is_transformer_block_path(module: &str) -> bool {
    [
        "transformer_blocks.",
        "single_transformer_blocks.",
        "time_text_embed.",
        "norm_out.",
        "x_embedder",
        "context_embedder",
        "proj_out",
    ]
    .iter()
    .any(|p| module.starts_with(p))
}

#[derive(Default)]
struct Parts<'a> {
    down: Option<Raw<'a>>,
    up: Option<Raw<'a>>,
    alpha: Option<Raw<'a>>,
}

fn assemble(path: &Path, raws: Vec<Raw<'_>>) -> Result<BTreeMap<String, Module>, LoraError> {
    let mut grouped: BTreeMap<String, Parts<'_>> = BTreeMap::new();
    for raw in raws {
        let Some((module, part)) = split_key(&raw.key) else {
            return Err(LoraError::UnknownTensor {
                path: path.to_path_buf(),
                key: raw.key,
            });
        };
        let entry = grouped.entry(module.clone()).or_default();
        let slot = match part {
            Part::Down => &mut entry.down,
            Part::Up => &mut entry.up,
            Part::Alpha => &mut entry.alpha,
        };
        // Two spellings of one module (kohya's and PEFT's) must not silently replace
        // each other.
        if let Some(first) = slot {
            return Err(LoraError::DuplicatePart {
                path: path.to_path_buf(),
                module,
                part: part.label(),
                first_key: first.key.clone(),
                second_key: raw.key,
            });
        }
        *slot = Some(raw);
    }
    let grouped: Vec<(String, Parts<'_>)> = grouped.into_iter().collect();
    let modules: Result<Vec<(String, Module)>, LoraError> = grouped
        .into_par_iter()
        .map(|(name, parts)| {
            let module = build_module(path, &name, parts)?;
            Ok((name, module))
        })
        .collect();
    Ok(modules?.into_iter().collect())
}

fn build_module(path: &Path, name: &str, parts: Parts<'_>) -> Result<Module, LoraError> {
    let p = || path.to_path_buf();
    let (down, up) = match (parts.down, parts.up) {
        (Some(d), Some(u)) => (d, u),
        (None, Some(u)) => {
            return Err(LoraError::UpWithoutDown {
                path: p(),
                module: name.into(),
                key: u.key,
            });
        }
        (Some(d), None) => {
            return Err(LoraError::DownWithoutUp {
                path: p(),
                module: name.into(),
                key: d.key,
            });
        }
        (None, None) => {
            let key = parts.alpha.map(|a| a.key).unwrap_or_default();
            return Err(LoraError::AlphaWithoutWeights {
                path: p(),
                module: name.into(),
                key,
            });
        }
    };
    let bad_shape = |raw: &Raw<'_>, detail: &str| LoraError::BadShape {
        path: p(),
        module: name.into(),
        key: raw.key.clone(),
        shape: raw.shape.clone(),
        detail: detail.into(),
    };
    let (kind, rank, in_dim) = match *down.shape.as_slice() {
        [r, i] => (ModuleKind::Linear, r, i),
        [r, i, kh, kw] => (ModuleKind::Conv { kh, kw }, r, i),
        _ => {
            return Err(bad_shape(
                &down,
                "a down weight has 2 (linear) or 4 (conv) dims",
            ));
        }
    };
    let (out_dim, up_rank) = match (kind, up.shape.as_slice()) {
        (ModuleKind::Linear, &[o, r]) => (o, r),
        (ModuleKind::Conv { .. }, &[o, r, 1, 1]) => (o, r),
        (ModuleKind::Linear, _) => {
            return Err(bad_shape(&up, "a linear module's up weight is [out, rank]"));
        }
        (ModuleKind::Conv { .. }, _) => {
            return Err(bad_shape(
                &up,
                "a conv module's up weight is [out, rank, 1, 1]",
            ));
        }
    };
    if up_rank != rank {
        return Err(LoraError::RankMismatch {
            path: p(),
            module: name.into(),
            down_key: down.key.clone(),
            down_rank: rank,
            up_key: up.key.clone(),
            up_rank,
        });
    }
    if rank == 0 {
        return Err(bad_shape(&down, "rank 0"));
    }
    if let Some(raw) = [&down, &up].into_iter().find(|r| r.shape.contains(&0)) {
        return Err(bad_shape(raw, "a dimension is 0"));
    }
    let (down_values, down_dtype) = decode_weight(path, name, &down)?;
    let (up_values, up_dtype) = decode_weight(path, name, &up)?;
    let (alpha, alpha_storage) = match &parts.alpha {
        None => (rank as f32, AlphaStorage::Absent),
        Some(raw) => decode_alpha(path, name, raw)?,
    };
    Ok(Module {
        kind,
        out_dim,
        in_dim,
        rank,
        up: up_values,
        down: down_values,
        alpha,
        alpha_storage,
        dtype: down_dtype.max(up_dtype),
    })
}

fn unsupported(path: &Path, raw: &Raw<'_>) -> LoraError {
    LoraError::UnsupportedDtype {
        path: path.to_path_buf(),
        key: raw.key.clone(),
        dtype: raw.dtype.to_string(),
    }
}

fn decode_weight(
    path: &Path,
    module: &str,
    raw: &Raw<'_>,
) -> Result<(Vec<f32>, TensorDtype), LoraError> {
    let (values, dtype): (Vec<f32>, TensorDtype) = match raw.dtype {
        Dtype::F32 => {
            let (words, _) = raw.bytes.as_chunks::<4>();
            (
                words.iter().map(|w| f32::from_le_bytes(*w)).collect(),
                TensorDtype::F32,
            )
        }
        Dtype::F16 => (half_to_f32::<f16>(raw.bytes), TensorDtype::F16),
        Dtype::Bf16 => (half_to_f32::<bf16>(raw.bytes), TensorDtype::Bf16),
        _ => return Err(unsupported(path, raw)),
    };
    check_finite(path, module, &raw.key, &values)?;
    Ok((values, dtype))
}

/// Little-endian 16-bit floats to f32, converted in bulk (F16C when the CPU has it).
fn half_to_f32<H>(bytes: &[u8]) -> Vec<f32>
where
    H: bytemuck::Pod + Default,
    [H]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    let (pairs, _) = bytes.as_chunks::<2>();
    let mut h = vec![H::default(); pairs.len()];
    // The file's bytes may be unaligned for 2-byte values: copy them into place.
    for (dst, src) in bytemuck::cast_slice_mut::<H, [u8; 2]>(&mut h)
        .iter_mut()
        .zip(pairs)
    {
        *dst = *src;
    }
    let mut out = vec![0f32; h.len()];
    h.convert_to_f32_slice(&mut out);
    out
}

fn check_finite(path: &Path, module: &str, key: &str, values: &[f32]) -> Result<(), LoraError> {
    match values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        None => Ok(()),
        Some((index, &value)) => Err(LoraError::NonFinite {
            path: path.to_path_buf(),
            module: module.into(),
            key: key.into(),
            value,
            index,
        }),
    }
}

fn decode_alpha(
    path: &Path,
    module: &str,
    raw: &Raw<'_>,
) -> Result<(f32, AlphaStorage), LoraError> {
    if raw.shape.iter().product::<usize>() != 1 {
        return Err(LoraError::BadShape {
            path: path.to_path_buf(),
            module: module.into(),
            key: raw.key.clone(),
            shape: raw.shape.clone(),
            detail: "alpha is a scalar".into(),
        });
    }
    let b = raw.bytes;
    let value = match raw.dtype {
        Dtype::F32 => b
            .first_chunk()
            .map(|w| (f32::from_le_bytes(*w), AlphaStorage::Float)),
        Dtype::F16 => b
            .first_chunk()
            .map(|w| (f16::from_le_bytes(*w).to_f32(), AlphaStorage::Float)),
        Dtype::Bf16 => b
            .first_chunk()
            .map(|w| (bf16::from_le_bytes(*w).to_f32(), AlphaStorage::Float)),
        Dtype::F64 => b
            .first_chunk()
            .map(|w| (f64::from_le_bytes(*w) as f32, AlphaStorage::Float)),
        Dtype::I64 => b
            .first_chunk()
            .map(|w| (i64::from_le_bytes(*w) as f32, AlphaStorage::Integer)),
        Dtype::I32 => b
            .first_chunk()
            .map(|w| (i32::from_le_bytes(*w) as f32, AlphaStorage::Integer)),
        _ => return Err(unsupported(path, raw)),
    };
    // The header check matched the byte length to the dtype, so `None` is unreachable;
    // still an error rather than a panic.
    let (value, storage) = value.ok_or_else(|| LoraError::Truncated {
        path: path.to_path_buf(),
        detail: format!("alpha `{}` has {} bytes", raw.key, b.len()),
    })?;
    check_finite(path, module, &raw.key, &[value])?;
    Ok((value, storage))
}

/// One tensor ready to be written.
struct Out {
    name: String,
    dtype: &'static str,
    /// Position in the safetensors library's `Dtype` enum; written in descending order.
    order: u8,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn encode(values: &[f32], precision: Precision) -> (&'static str, u8, Vec<u8>) {
    use half::slice::HalfFloatSliceExt;
    let bytes = match precision {
        Precision::F32 => little_endian_bytes(values),
        Precision::Bf16 => {
            let mut h = vec![bf16::ZERO; values.len()];
            h.convert_from_f32_slice(values);
            little_endian_bytes(&h)
        }
        Precision::F16 => {
            // The slice conversion detects F16C once and converts in bulk.
            let mut h = vec![f16::ZERO; values.len()];
            h.convert_from_f32_slice(values);
            little_endian_bytes(&h)
        }
    };
    let (name, order) = match precision {
        Precision::F32 => ("F32", 15),
        Precision::Bf16 => ("BF16", 12),
        Precision::F16 => ("F16", 11),
    };
    (name, order, bytes)
}

/// safetensors data is little-endian, which is the memory order on every target we build.
fn little_endian_bytes<T: bytemuck::Pod>(values: &[T]) -> Vec<u8> {
    const {
        assert!(
            cfg!(target_endian = "little"),
            "safetensors data is little-endian"
        )
    };
    bytemuck::cast_slice(values).to_vec()
}

fn tensors(lora: &Lora, precision: Precision) -> Vec<Out> {
    let mut out: Vec<Out> = lora
        .modules
        .par_iter()
        .flat_map_iter(|(name, m)| {
            // diffusers / ai-toolkit names are written as they write them: `lora_A` /
            // `lora_B` and no alpha (`alpha / rank` folded into the up factor).
            let diffusers = Naming::of(name) == Some(Naming::Diffusers);
            let folded;
            let m = if diffusers && m.alpha_storage != AlphaStorage::Absent {
                folded = crate::convert::fold_alpha(m.clone());
                &folded
            } else {
                m
            };
            let (up_key, down_key) = if diffusers {
                ("lora_B.weight", "lora_A.weight")
            } else {
                ("lora_up.weight", "lora_down.weight")
            };
            let (dtype, order, up) = encode(&m.up, precision);
            let (_, _, down) = encode(&m.down, precision);
            let mut v = vec![
                Out {
                    name: format!("{name}.{up_key}"),
                    dtype,
                    order,
                    shape: m.up_shape(),
                    bytes: up,
                },
                Out {
                    name: format!("{name}.{down_key}"),
                    dtype,
                    order,
                    shape: m.down_shape(),
                    bytes: down,
                },
            ];
            match m.alpha_storage {
                AlphaStorage::Absent => {}
                AlphaStorage::Float => {
                    let (dtype, order, bytes) = encode(&[m.alpha], precision);
                    v.push(Out {
                        name: format!("{name}.alpha"),
                        dtype,
                        order,
                        shape: vec![],
                        bytes,
                    });
                }
                AlphaStorage::Integer => v.push(Out {
                    name: format!("{name}.alpha"),
                    dtype: "I64",
                    order: 17,
                    shape: vec![],
                    bytes: (m.alpha.round() as i64).to_le_bytes().to_vec(),
                }),
            }
            v
        })
        .collect();
    out.sort_by(|a, b| b.order.cmp(&a.order).then_with(|| a.name.cmp(&b.name)));
    out
}

/// Serialises tensors and metadata exactly as the safetensors library does.
fn serialize(tensors: &[Out], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let json_str = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut header = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        header.push_str("\"__metadata__\":{");
        let items: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v)))
            .collect();
        header.push_str(&items.join(","));
        header.push('}');
        first = false;
    }
    let mut offset = 0usize;
    for t in tensors {
        if !first {
            header.push(',');
        }
        first = false;
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        let end = offset + t.bytes.len();
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            json_str(&t.name),
            t.dtype,
            shape.join(",")
        ));
        offset = end;
    }
    header.push('}');
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for t in tensors {
        out.extend_from_slice(&t.bytes);
    }
    out
}

/// kohya's `(sshs_model_hash, sshs_legacy_hash)` of a serialised file: sha256 of the bytes
/// after the header, and the first 8 hex digits of sha256 of bytes `0x100000..0x110000`.
pub fn kohya_hashes(serialized: &[u8]) -> (String, String) {
    // Any bytes give some hash (a short or odd input is hashed from where its header says
    // the data starts, clamped to its length), never a panic.
    let n = serialized
        .first_chunk::<8>()
        .map_or(0, |n| u64::from_le_bytes(*n));
    let start = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .map_or(serialized.len(), |s| s.min(serialized.len()));
    let tail = serialized.get(start..).unwrap_or_default();
    let model = hex::encode(Sha256::digest(tail));
    let lo = 0x100000.min(serialized.len());
    let hi = 0x110000.min(serialized.len());
    let legacy = hex::encode(Sha256::digest(serialized.get(lo..hi).unwrap_or_default()));
    let legacy = legacy.get(..8).unwrap_or(&legacy).to_string();
    (model, legacy)
}

/// The bytes of the file `save` writes: hashes computed as kohya does (over a
/// serialisation that keeps only `ss_*` metadata) and stored as `sshs_*` metadata.
pub fn to_bytes(lora: &Lora, precision: Precision) -> Vec<u8> {
    let tensors = tensors(lora, precision);
    let ss_only: BTreeMap<String, String> = lora
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (model_hash, legacy_hash) = kohya_hashes(&serialize(&tensors, &ss_only));
    let mut metadata = lora.metadata.clone();
    metadata.insert("sshs_model_hash".into(), model_hash);
    metadata.insert("sshs_legacy_hash".into(), legacy_hash);
    serialize(&tensors, &metadata)
}

/// Writes `bytes` to `path` atomically, through the project's one atomic write
/// (`slider_atomic`: temp file beside the target, fsync, rename, directory fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LoraError> {
    slider_atomic::write(path, bytes).map_err(|source| LoraError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests;
