//! The safetensors header, parsed and validated the way the reference implementation
//! (huggingface `safetensors`, `SafeTensors::read_metadata`) does, before any tensor byte
//! is looked at: header length bounded and in the file, a strict JSON object, known dtypes,
//! and data offsets that tile the data section exactly (sorted by offset they start at 0,
//! each begins where the previous one ends, each spans dtype size x shape bytes, and the
//! last one ends at the end of the file).
//!
//! Stricter than the reference in one point: a key that appears twice in the header is an
//! error (the reference keeps one of the two silently).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};

use crate::error::LoraError;

/// Largest header accepted (the reference's `MAX_HEADER_SIZE`).
pub(crate) const MAX_HEADER: u64 = 100_000_000;

/// Element types the safetensors format defines, with their width in bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dtype {
    Bool,
    F4,
    F6E2M3,
    F6E3M2,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
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
            "F4" => Dtype::F4,
            "F6_E2M3" => Dtype::F6E2M3,
            "F6_E3M2" => Dtype::F6E3M2,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E8M0" => Dtype::F8E8M0,
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

    fn bits(self) -> usize {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 | Dtype::F8E8M0 => {
                8
            }
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::Bf16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 64,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::F4 => "F4",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
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
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of the header, validated: `range` is inside the data section.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the whole file.
    pub range: Range<usize>,
}

/// A validated header: the string metadata and the tensors in data order.
#[derive(Debug)]
pub(crate) struct Header {
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

/// Parses and validates the header of the safetensors file `bytes` (`path` labels errors).
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Header, LoraError> {
    let data_start = data_start(path, bytes)?;
    let Some(header) = bytes.get(8..data_start) else {
        return Err(LoraError::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "the header needs {data_start} bytes but the file has {}",
                bytes.len()
            ),
        });
    };
    parse_json(path, header, data_start, bytes.len())
}

/// Reads and validates only the header of the safetensors file at `path` (its first
/// 8 + header-length bytes), checking the tensors' data offsets against the file's length:
/// a multi-gigabyte checkpoint is never read or mapped.
pub(crate) fn read_header(path: &Path) -> Result<Header, LoraError> {
    use std::io::Read;
    let read_err = |source| LoraError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let file_len = file.metadata().map_err(read_err)?.len();
    let mut prefix = Vec::with_capacity(8);
    (&mut file)
        .take(8)
        .read_to_end(&mut prefix)
        .map_err(read_err)?;
    let data_start = data_start(path, &prefix)?;
    let file_len = usize::try_from(file_len).map_err(|_| LoraError::MalformedHeader {
        path: path.to_path_buf(),
        detail: format!("file length {file_len} overflows"),
    })?;
    if data_start > file_len {
        return Err(LoraError::Truncated {
            path: path.to_path_buf(),
            detail: format!("the header needs {data_start} bytes but the file has {file_len}"),
        });
    }
    let mut header = Vec::with_capacity(data_start - 8);
    (&mut file)
        .take((data_start - 8) as u64)
        .read_to_end(&mut header)
        .map_err(read_err)?;
    if header.len() != data_start - 8 {
        return Err(LoraError::Truncated {
            path: path.to_path_buf(),
            detail: "the file ended while its header was read".into(),
        });
    }
    parse_json(path, &header, data_start, file_len)
}

/// Where the data section starts (8 + the header length in the first 8 bytes).
fn data_start(path: &Path, bytes: &[u8]) -> Result<usize, LoraError> {
    let Some(len_bytes) = bytes.first_chunk::<8>() else {
        return Err(LoraError::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "{} bytes, shorter than the 8-byte header length",
                bytes.len()
            ),
        });
    };
    let n = u64::from_le_bytes(*len_bytes);
    let malformed = |detail: String| LoraError::MalformedHeader {
        path: path.to_path_buf(),
        detail,
    };
    if n > MAX_HEADER {
        return Err(malformed(format!(
            "header length {n} is over the 100 MB limit"
        )));
    }
    usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .ok_or_else(|| malformed(format!("header length {n} overflows")))
}

/// Validates the header JSON `header` of a file of `file_len` bytes whose data section
/// starts at `data_start`.
fn parse_json(
    path: &Path,
    header: &[u8],
    data_start: usize,
    file_len: usize,
) -> Result<Header, LoraError> {
    let p = || path.to_path_buf();
    let malformed = |detail: String| LoraError::MalformedHeader { path: p(), detail };
    let header = std::str::from_utf8(header).map_err(|e| malformed(format!("not UTF-8: {e}")))?;
    let Ordered(items) =
        serde_json::from_str(header).map_err(|e| malformed(format!("invalid JSON: {e}")))?;
    let mut seen = HashSet::new();
    let mut metadata = BTreeMap::new();
    let mut entries = Vec::with_capacity(items.len());
    for (key, value) in items {
        if !seen.insert(key.clone()) {
            return Err(LoraError::DuplicateKey { path: p(), key });
        }
        if key == "__metadata__" {
            metadata = serde_json::from_value(value).map_err(|e| {
                malformed(format!("`__metadata__` is not a string-to-string map: {e}"))
            })?;
            continue;
        }
        let info: RawInfo =
            serde_json::from_value(value).map_err(|e| malformed(format!("entry `{key}`: {e}")))?;
        let Some(dtype) = Dtype::parse(&info.dtype) else {
            return Err(LoraError::UnknownDtype {
                path: p(),
                key,
                dtype: info.dtype,
            });
        };
        let (start, end) = info.data_offsets;
        entries.push((key, dtype, info.shape, start, end));
    }
    // The reference sorts by offsets, then requires the tensors to tile the data section.
    entries.sort_by_key(|&(_, _, _, start, end)| (start, end));
    let mut cursor = 0usize;
    let mut previous: Option<String> = None;
    let mut out = Vec::with_capacity(entries.len());
    for (key, dtype, shape, start, end) in entries {
        if start != cursor || end < start {
            return Err(LoraError::BadOffsets {
                path: p(),
                key,
                found: [start, end],
                expected_start: cursor,
                previous,
            });
        }
        let size = byte_size(dtype, &shape).ok_or_else(|| LoraError::SizeOverflow {
            path: p(),
            key: key.clone(),
            dtype: dtype.to_string(),
            shape: shape.clone(),
        })?;
        if end - start != size {
            return Err(LoraError::SizeMismatch {
                path: p(),
                key,
                dtype: dtype.to_string(),
                shape,
                expected: size,
                found: end - start,
            });
        }
        let range = start
            .checked_add(data_start)
            .zip(end.checked_add(data_start))
            .map(|(s, e)| s..e)
            .ok_or_else(|| malformed(format!("entry `{key}`: data offsets overflow")))?;
        cursor = end;
        previous = Some(key.clone());
        out.push(Entry {
            key,
            dtype,
            shape,
            range,
        });
    }
    let data_len = file_len - data_start;
    if cursor > data_len {
        return Err(LoraError::Truncated {
            path: p(),
            detail: format!(
                "the tensors need {cursor} bytes of data (tensor `{}` ends at byte {}) but \
                 the file has {data_len} after the header",
                previous.unwrap_or_default(),
                data_start + cursor
            ),
        });
    }
    if cursor < data_len {
        return Err(LoraError::TrailingBytes {
            path: p(),
            expected: data_start + cursor,
            found: file_len,
        });
    }
    Ok(Header {
        metadata,
        entries: out,
    })
}

/// `product(shape) * bits / 8`, or `None` on overflow or a size that is not whole bytes.
fn byte_size(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    let bits = elements.checked_mul(dtype.bits())?;
    (bits % 8 == 0).then_some(bits / 8)
}
