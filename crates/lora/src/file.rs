//! Reading and writing kohya LoRA safetensors files, byte-compatible with Python's
//! `safetensors.torch.save_file`, and kohya's `sshs_model_hash` / `sshs_legacy_hash`.
//!
//! Layout of what we write (the same as the safetensors library writes it):
//! 8-byte little-endian header length, a compact JSON header (`__metadata__` first, then
//! one entry per tensor in data order) padded with spaces to a multiple of 8, then the
//! tensor bytes. Tensors are ordered by dtype, widest alignment first (I64, F32, BF16, F16:
//! the library's `Dtype` order, descending), then by name. Metadata keys are written in
//! sorted order (Python's writer uses a hash map, so its order varies from run to run; the
//! hashes below do not depend on it).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::LoraError;
use crate::module::{AlphaStorage, Module, ModuleKind, TensorDtype};
use crate::{Lora, Precision};

/// Largest header we accept (the safetensors library's own limit).
const MAX_HEADER: usize = 100_000_000;

#[derive(Debug, serde::Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// One tensor of a file, still in its stored bytes.
struct Raw<'a> {
    key: String,
    dtype: String,
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

/// Reads a LoRA from a memory-mapped safetensors file.
pub fn load(path: &Path) -> Result<Lora, LoraError> {
    let read_err = |source| LoraError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len < 8 {
        return Err(LoraError::Truncated {
            path: path.to_path_buf(),
            detail: format!("{len} bytes, shorter than the 8-byte header length"),
        });
    }
    // SAFETY: the map is read-only and lives only for this call; a file changed by another
    // process while we read it can give wrong values but not unsoundness on the platforms
    // we support (the bytes are copied out immediately).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(read_err)?;
    parse(path, &map)
}

/// Parses the bytes of a safetensors LoRA file (`path` only labels errors).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Lora, LoraError> {
    let (metadata, raws) = parse_tensors(path, bytes)?;
    let modules = assemble(path, raws)?;
    Ok(Lora { modules, metadata })
}

fn parse_tensors<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<(BTreeMap<String, String>, Vec<Raw<'a>>), LoraError> {
    let malformed = |detail: String| LoraError::MalformedHeader {
        path: path.to_path_buf(),
        detail,
    };
    let truncated = |detail: String| LoraError::Truncated {
        path: path.to_path_buf(),
        detail,
    };
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(truncated(format!(
            "{} bytes, shorter than the 8-byte header length",
            bytes.len()
        )));
    };
    let mut n = [0u8; 8];
    n.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER as u64 {
        return Err(malformed(format!(
            "header length {n} is over the 100 MB limit"
        )));
    }
    let n = n as usize;
    let Some(header) = bytes.get(8..8 + n) else {
        return Err(truncated(format!(
            "the header needs {} bytes but the file has {}",
            8 + n,
            bytes.len()
        )));
    };
    let header = std::str::from_utf8(header).map_err(|e| malformed(format!("not UTF-8: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(header).map_err(|e| malformed(format!("invalid JSON: {e}")))?;
    let serde_json::Value::Object(entries) = json else {
        return Err(malformed("the header is not a JSON object".into()));
    };
    let data = &bytes[8 + n..];
    let mut metadata = BTreeMap::new();
    let mut raws = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        if key == "__metadata__" {
            let map: HashMap<String, String> = serde_json::from_value(value).map_err(|e| {
                malformed(format!("`__metadata__` is not a string-to-string map: {e}"))
            })?;
            metadata.extend(map);
            continue;
        }
        let info: RawInfo =
            serde_json::from_value(value).map_err(|e| malformed(format!("entry `{key}`: {e}")))?;
        let (start, end) = info.data_offsets;
        let elems = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let width = dtype_width(&info.dtype);
        let expected = match (elems, width) {
            (Some(e), Some(w)) => e.checked_mul(w),
            _ => None,
        };
        if end < start {
            return Err(malformed(format!(
                "entry `{key}`: data_offsets [{start}, {end}] run backwards"
            )));
        }
        if let Some(expected) = expected
            && expected != end - start
        {
            return Err(malformed(format!(
                "entry `{key}`: shape {:?} of {} needs {expected} bytes but data_offsets \
                 span {}",
                info.shape,
                info.dtype,
                end - start
            )));
        }
        let Some(slice) = data.get(start..end) else {
            return Err(truncated(format!(
                "tensor `{key}` ends at byte {} but the file has {}",
                8 + n + end,
                bytes.len()
            )));
        };
        raws.push(Raw {
            key,
            dtype: info.dtype,
            shape: info.shape,
            bytes: slice,
        });
    }
    Ok((metadata, raws))
}

fn dtype_width(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
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

/// PEFT / diffusers module paths to kohya names: `unet.down_blocks.0.attentions.0.proj_in`
/// -> `lora_unet_down_blocks_0_attentions_0_proj_in`. Names are not re-mapped between the
/// diffusers and original-UNet layouts.
fn peft_to_kohya(module: &str) -> String {
    let module = module.strip_prefix("base_model.model.").unwrap_or(module);
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
        let entry = grouped.entry(module).or_default();
        match part {
            Part::Down => entry.down = Some(raw),
            Part::Up => entry.up = Some(raw),
            Part::Alpha => entry.alpha = Some(raw),
        }
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
        dtype: raw.dtype.clone(),
    }
}

fn decode_weight(
    path: &Path,
    module: &str,
    raw: &Raw<'_>,
) -> Result<(Vec<f32>, TensorDtype), LoraError> {
    let (values, dtype): (Vec<f32>, TensorDtype) = match raw.dtype.as_str() {
        "F32" => (
            raw.bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            TensorDtype::F32,
        ),
        "F16" => (half_to_f32::<f16>(raw.bytes), TensorDtype::F16),
        "BF16" => (half_to_f32::<bf16>(raw.bytes), TensorDtype::Bf16),
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
    let n = bytes.len() / 2;
    let mut h = vec![H::default(); n];
    // The mapped bytes may be unaligned for 2-byte values: copy them into place.
    bytemuck::cast_slice_mut::<H, u8>(&mut h).copy_from_slice(&bytes[..n * 2]);
    let mut out = vec![0f32; h.len()];
    h.convert_to_f32_slice(&mut out);
    out
}

fn check_finite(path: &Path, module: &str, key: &str, values: &[f32]) -> Result<(), LoraError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(LoraError::NonFinite {
            path: path.to_path_buf(),
            module: module.into(),
            key: key.into(),
            value: values[index],
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
    let (value, storage) = match raw.dtype.as_str() {
        "F32" => (
            f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            AlphaStorage::Float,
        ),
        "F16" => (
            f16::from_le_bytes([b[0], b[1]]).to_f32(),
            AlphaStorage::Float,
        ),
        "BF16" => (
            bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            AlphaStorage::Float,
        ),
        "F64" => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            (f64::from_le_bytes(a) as f32, AlphaStorage::Float)
        }
        "I64" => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            (i64::from_le_bytes(a) as f32, AlphaStorage::Integer)
        }
        "I32" => (
            i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            AlphaStorage::Integer,
        ),
        _ => return Err(unsupported(path, raw)),
    };
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
            let (dtype, order, up) = encode(&m.up, precision);
            let (_, _, down) = encode(&m.down, precision);
            let mut v = vec![
                Out {
                    name: format!("{name}.lora_up.weight"),
                    dtype,
                    order,
                    shape: m.up_shape(),
                    bytes: up,
                },
                Out {
                    name: format!("{name}.lora_down.weight"),
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
    let mut n = [0u8; 8];
    n.copy_from_slice(&serialized[..8]);
    let start = (8 + u64::from_le_bytes(n) as usize).min(serialized.len());
    let model = hex::encode(Sha256::digest(&serialized[start..]));
    let lo = 0x100000.min(serialized.len());
    let hi = 0x110000.min(serialized.len());
    let legacy = hex::encode(Sha256::digest(&serialized[lo..hi]));
    (model, legacy[..8].to_string())
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
