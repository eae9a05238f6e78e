//! What can go wrong while baking: every error names the file, and the module or key.

use std::path::PathBuf;

/// One LoRA module that does not fit the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit {
    /// The LoRA file.
    pub lora: PathBuf,
    /// The module's kohya name.
    pub module: String,
    /// Why it does not fit.
    pub detail: String,
}

impl std::fmt::Display for Misfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: module `{}` {}",
            self.lora.display(),
            self.module,
            self.detail
        )
    }
}

fn list(misfits: &[Misfit]) -> String {
    const SHOWN: usize = 12;
    let mut s: Vec<String> = misfits
        .iter()
        .take(SHOWN)
        .map(|m| format!("  {m}"))
        .collect();
    if misfits.len() > SHOWN {
        s.push(format!("  ... and {} more", misfits.len() - SHOWN));
    }
    s.join("\n")
}

#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("{path}: tensor `{key}` has dtype {dtype}, which cannot be {what}")]
    Dtype {
        path: PathBuf,
        key: String,
        dtype: String,
        what: &'static str,
    },
    #[error("{path}: tensor `{key}` holds {value} at flat index {index}")]
    NonFinite {
        path: PathBuf,
        key: String,
        value: f64,
        index: usize,
    },
    #[error(
        "{path}: adding the LoRAs to `{key}` gives {value} at flat index {index} (out of the range of {dtype}); lower the ratios or pass --save_precision float"
    )]
    Overflow {
        path: PathBuf,
        key: String,
        dtype: String,
        value: f64,
        index: usize,
    },
    #[error("reading LoRA: {0}")]
    Lora(#[from] slider_lora::LoraError),
    #[error("{count} LoRA module(s) do not fit the checkpoint {checkpoint}:\n{list}", count = misfits.len(), list = list(misfits))]
    DoesNotFit {
        checkpoint: PathBuf,
        misfits: Vec<Misfit>,
    },
    #[error("{0}")]
    InvalidArgument(String),
}
