//! The one error type of the crate. Every variant names what a user needs to find the
//! problem: the file, the tensor key or module, and the offending values.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing or combining LoRAs.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is truncated: {detail}")]
    Truncated { path: PathBuf, detail: String },
    #[error("`{path}` is not a valid safetensors file: malformed header: {detail}")]
    MalformedHeader { path: PathBuf, detail: String },
    #[error(
        "`{path}` is not a valid safetensors file: malformed header: key `{key}` appears twice"
    )]
    DuplicateKey { path: PathBuf, key: String },
    #[error(
        "`{path}` is not a valid safetensors file: malformed header: tensor `{key}` has \
         unknown dtype `{dtype}`"
    )]
    UnknownDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error(
        "`{path}` is not a valid safetensors file: malformed header: tensor `{key}` has \
         data_offsets {found:?} but must start at {expected_start}{}, with its end not \
         before its start (tensors' byte ranges are contiguous, non-overlapping and start at 0)",
        previous.as_ref().map(|k| format!(", where `{k}` ends")).unwrap_or_default()
    )]
    BadOffsets {
        path: PathBuf,
        key: String,
        found: [usize; 2],
        expected_start: usize,
        previous: Option<String>,
    },
    #[error(
        "`{path}` is not a valid safetensors file: malformed header: tensor `{key}`: shape \
         {shape:?} of {dtype} needs {expected} bytes but its data_offsets span {found}"
    )]
    SizeMismatch {
        path: PathBuf,
        key: String,
        dtype: String,
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
    #[error(
        "`{path}` is not a valid safetensors file: malformed header: tensor `{key}`: the byte \
         size of shape {shape:?} of {dtype} overflows or is not a whole number of bytes"
    )]
    SizeOverflow {
        path: PathBuf,
        key: String,
        dtype: String,
        shape: Vec<usize>,
    },
    #[error(
        "`{path}` is not a valid safetensors file: the tensors end at byte {expected} but the \
         file has {found} bytes"
    )]
    TrailingBytes {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error(
        "`{path}`: module `{module}`: two tensors give its {part}: `{first_key}` and \
         `{second_key}`"
    )]
    DuplicatePart {
        path: PathBuf,
        module: String,
        part: &'static str,
        first_key: String,
        second_key: String,
    },
    #[error(
        "`{path}`: tensor `{key}` has dtype {dtype}, which is not supported \
         (LoRA weights must be F32, F16 or BF16; alpha may also be F64 or an integer)"
    )]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("`{path}`: module `{module}` has an up weight `{key}` but no down weight")]
    UpWithoutDown {
        path: PathBuf,
        module: String,
        key: String,
    },
    #[error("`{path}`: module `{module}` has a down weight `{key}` but no up weight")]
    DownWithoutUp {
        path: PathBuf,
        module: String,
        key: String,
    },
    #[error("`{path}`: module `{module}` has an alpha `{key}` but no up/down weights")]
    AlphaWithoutWeights {
        path: PathBuf,
        module: String,
        key: String,
    },
    #[error(
        "`{path}`: module `{module}`: rank mismatch: `{down_key}` has rank {down_rank} \
         but `{up_key}` has rank {up_rank}"
    )]
    RankMismatch {
        path: PathBuf,
        module: String,
        down_key: String,
        down_rank: usize,
        up_key: String,
        up_rank: usize,
    },
    #[error("`{path}`: module `{module}`: tensor `{key}` has a bad shape {shape:?}: {detail}")]
    BadShape {
        path: PathBuf,
        module: String,
        key: String,
        shape: Vec<usize>,
        detail: String,
    },
    #[error(
        "`{path}`: module `{module}`: tensor `{key}` holds a non-finite value ({value}) \
         at flat index {index}"
    )]
    NonFinite {
        path: PathBuf,
        module: String,
        key: String,
        value: f32,
        index: usize,
    },
    #[error(
        "`{path}`: tensor `{key}` is not part of a LoRA (expected `<module>.lora_down.weight`, \
         `<module>.lora_up.weight`, `<module>.alpha`, or PEFT's `lora_A`/`lora_B`)"
    )]
    UnknownTensor { path: PathBuf, key: String },
    #[error(
        "module `{module}`: shapes disagree between inputs: {first_shape} in input {first_input} \
         but {second_shape} in input {second_input} (are these LoRAs for the same base model?)"
    )]
    ShapeMismatch {
        module: String,
        first_input: usize,
        first_shape: String,
        second_input: usize,
        second_shape: String,
    },
    #[error("{0}")]
    LayoutMismatch(Box<LayoutMismatch>),
    #[error("module `{module}`: {detail}")]
    BadModule { module: String, detail: String },
    #[error("module `{module}`: the SVD did not converge")]
    SvdFailed { module: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Two inputs of one operation target different known base-model layouts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot combine a {first_layout} LoRA (input {first_input}, e.g. module `{first_module}` \
     {first_shape}) with a {second_layout} LoRA (input {second_input}, e.g. module \
     `{second_module}` {second_shape})"
)]
pub struct LayoutMismatch {
    pub first_input: usize,
    pub first_layout: String,
    pub first_module: String,
    pub first_shape: String,
    pub second_input: usize,
    pub second_layout: String,
    pub second_module: String,
    pub second_shape: String,
}
