//! A safetensors file read by its header alone (checked as the reference implementation
//! checks it: bounded length, strict JSON, no duplicate keys, known dtypes, offsets tiling the
//! data section to the end of the file), its tensors then read one at a time in data order,
//! and the header of the file written in their place. Nothing is memory-mapped and no file is
//! ever held whole.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde::de::{Deserializer, MapAccess, Visitor};

use crate::error::BakeError;

/// Largest header accepted (the reference's `MAX_HEADER_SIZE`).
const MAX_HEADER: u64 = 100_000_000;

/// Element types of the format, with their width in bytes (sub-byte types are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    I16,
    U16,
    F16,
    Bf16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    fn parse(name: &str) -> Option<Dtype> {
        Some(match name {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E4M3" => Dtype::F8E4M3,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::Bf16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    pub fn width(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// The floating-point types this crate decodes, adds to and converts.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::Bf16 | Dtype::F32 | Dtype::F64)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of the header.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Bytes of its data.
    pub len: usize,
}

impl Entry {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A checked header: metadata and the tensors in data order.
#[derive(Debug)]
pub struct Header {
    pub metadata: BTreeMap<String, String>,
    pub entries: Vec<Entry>,
}

#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// The top-level JSON object in file order, duplicates kept so they can be refused.
struct Ordered(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// An open safetensors file, positioned at its first tensor.
pub struct Reader {
    path: PathBuf,
    file: BufReader<File>,
    pub header: Header,
}

impl Reader {
    /// Opens `path` and checks its header against the file's size.
    pub fn open(path: &Path) -> Result<Reader, BakeError> {
        let io = |source| BakeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |detail: String| BakeError::Format {
            path: path.to_path_buf(),
            detail,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut file = BufReader::with_capacity(1 << 20, file);
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| bad(format!("{size} bytes, shorter than the header length")))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || n + 8 > size {
            return Err(bad(format!(
                "header length {n} does not fit (file of {size} bytes, limit 100 MB)"
            )));
        }
        let mut text = vec![0u8; n as usize];
        file.read_exact(&mut text).map_err(io)?;
        let header = parse_header(&text, size - 8 - n).map_err(bad)?;
        Ok(Reader {
            path: path.to_path_buf(),
            file,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the next tensor's bytes into `buf` (tensors come in data order).
    pub fn read_next(&mut self, entry: &Entry, buf: &mut Vec<u8>) -> Result<(), BakeError> {
        buf.resize(entry.len, 0);
        self.file.read_exact(buf).map_err(|source| BakeError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

fn parse_header(text: &[u8], data_len: u64) -> Result<Header, String> {
    let text = std::str::from_utf8(text).map_err(|e| format!("header is not UTF-8: {e}"))?;
    let Ordered(items) =
        serde_json::from_str(text).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let mut metadata = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut raw = Vec::with_capacity(items.len());
    for (key, value) in items {
        if !seen.insert(key.clone()) {
            return Err(format!("key `{key}` appears twice in the header"));
        }
        if key == "__metadata__" {
            metadata = serde_json::from_value(value)
                .map_err(|e| format!("`__metadata__` is not a string-to-string map: {e}"))?;
            continue;
        }
        let info: RawInfo =
            serde_json::from_value(value).map_err(|e| format!("entry `{key}`: {e}"))?;
        let dtype = Dtype::parse(&info.dtype)
            .ok_or_else(|| format!("entry `{key}`: unsupported dtype {}", info.dtype))?;
        raw.push((key, dtype, info.shape, info.data_offsets));
    }
    raw.sort_by_key(|r| r.3);
    let mut cursor = 0usize;
    let mut entries = Vec::with_capacity(raw.len());
    for (key, dtype, shape, (start, end)) in raw {
        if start != cursor || end < start {
            return Err(format!(
                "entry `{key}`: data offsets [{start}, {end}] do not follow the previous tensor (expected to start at {cursor})"
            ));
        }
        let size = shape
            .iter()
            .try_fold(dtype.width(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("entry `{key}`: shape {shape:?} overflows"))?;
        if end - start != size {
            return Err(format!(
                "entry `{key}`: {} bytes for {dtype} {shape:?}, which needs {size}",
                end - start
            ));
        }
        cursor = end;
        entries.push(Entry {
            key,
            dtype,
            shape,
            len: size,
        });
    }
    if cursor as u64 != data_len {
        return Err(format!(
            "the tensors cover {cursor} bytes but the data section has {data_len}"
        ));
    }
    Ok(Header { metadata, entries })
}

/// The header bytes (length prefix included) of a file holding `entries` in this order:
/// compact JSON, `__metadata__` first, padded with spaces to a multiple of 8 as Python's
/// safetensors writes it.
pub fn header_bytes(
    metadata: &BTreeMap<String, String>,
    entries: &[(String, Dtype, Vec<usize>)],
) -> Vec<u8> {
    let mut json = String::from("{");
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":{");
        let fields: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", quote(k), quote(v)))
            .collect();
        json.push_str(&fields.join(","));
        json.push('}');
    }
    let mut offset = 0usize;
    for (key, dtype, shape) in entries {
        let len = shape.iter().product::<usize>() * dtype.width();
        if json.len() > 1 {
            json.push(',');
        }
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        json.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            quote(key),
            dtype.name(),
            dims.join(","),
            offset + len
        ));
        offset += len;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

/// Stored float values to f64 (`dtype` is a float type).
pub fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F16 => bytes
            .as_chunks::<2>()
            .0
            .iter()
            .map(|b| f16::from_le_bytes(*b).to_f64())
            .collect(),
        Dtype::Bf16 => bytes
            .as_chunks::<2>()
            .0
            .iter()
            .map(|b| bf16::from_le_bytes(*b).to_f64())
            .collect(),
        Dtype::F32 => bytes
            .as_chunks::<4>()
            .0
            .iter()
            .map(|b| f64::from(f32::from_le_bytes(*b)))
            .collect(),
        Dtype::F64 => bytes
            .as_chunks::<8>()
            .0
            .iter()
            .map(|b| f64::from_le_bytes(*b))
            .collect(),
        _ => Vec::new(),
    }
}

/// f64 values rounded (to nearest even) into `dtype`'s bytes; the first value that is not
/// finite after rounding is returned as an error with its index.
pub fn encode(dtype: Dtype, values: &[f64], out: &mut Vec<u8>) -> Result<(), (usize, f64)> {
    out.clear();
    out.reserve(values.len() * dtype.width());
    for (i, &v) in values.iter().enumerate() {
        let finite = match dtype {
            Dtype::F16 => {
                let h = f16::from_f64(v);
                out.extend_from_slice(&h.to_le_bytes());
                h.is_finite()
            }
            Dtype::Bf16 => {
                let h = bf16::from_f64(v);
                out.extend_from_slice(&h.to_le_bytes());
                h.is_finite()
            }
            Dtype::F32 => {
                let x = v as f32;
                out.extend_from_slice(&x.to_le_bytes());
                x.is_finite()
            }
            Dtype::F64 => {
                out.extend_from_slice(&v.to_le_bytes());
                v.is_finite()
            }
            _ => false,
        };
        if !finite {
            return Err((i, v));
        }
    }
    Ok(())
}

/// The first value of a float tensor that is NaN or infinite.
pub fn first_non_finite(dtype: Dtype, bytes: &[u8]) -> Option<(usize, f64)> {
    let bad = |i: usize, v: f64| (!v.is_finite()).then_some((i, v));
    match dtype {
        // Exponent bits all ones: checked on the bits, without converting.
        Dtype::F16 => bytes
            .as_chunks::<2>()
            .0
            .iter()
            .enumerate()
            .find_map(|(i, b)| {
                let bits = u16::from_le_bytes(*b);
                (bits & 0x7c00 == 0x7c00).then(|| (i, f16::from_bits(bits).to_f64()))
            }),
        Dtype::Bf16 => bytes
            .as_chunks::<2>()
            .0
            .iter()
            .enumerate()
            .find_map(|(i, b)| {
                let bits = u16::from_le_bytes(*b);
                (bits & 0x7f80 == 0x7f80).then(|| (i, bf16::from_bits(bits).to_f64()))
            }),
        Dtype::F32 => bytes
            .as_chunks::<4>()
            .0
            .iter()
            .enumerate()
            .find_map(|(i, b)| bad(i, f64::from(f32::from_le_bytes(*b)))),
        Dtype::F64 => bytes
            .as_chunks::<8>()
            .0
            .iter()
            .enumerate()
            .find_map(|(i, b)| bad(i, f64::from_le_bytes(*b))),
        _ => None,
    }
}
