//! Single-file checkpoints in the original LDM/SGM key layout: memory-mapped reading
//! (f32/f16/bf16 to f32), detection of the architecture from the keys and shapes, loading into
//! our modules with a complete list of missing, unexpected and mis-shaped keys, and writing
//! our own models in the same layout (so one loader serves users' checkpoints and ours).
//!
//! | part | prefix (SD1.x) | prefix (SDXL) |
//! |---|---|---|
//! | UNet | `model.diffusion_model.` | same |
//! | VAE | `first_stage_model.` | same |
//! | CLIP ViT-L/14 (HF layout) | `cond_stage_model.transformer.` | `conditioner.embedders.0.transformer.` |
//! | OpenCLIP ViT-bigG (open_clip layout) | - | `conditioner.embedders.1.model.` |
//!
//! What the weights cannot say (attention heads, GroupNorm group counts) is read from a
//! diffusers `config.json` when one is given ([`ModelSpec::detect_with`]), else from the
//! `slider.*` metadata our writer stores; otherwise users' checkpoints get the SD1/SDXL values
//! and [`ModelSpec::assumptions`] says which.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use burn::tensor::{Device, FloatDType};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::clip::{Activation, ClipTextModel, OpenClipText, TextConfig};
use crate::diffusers_config::{
    BaseConfig, ConfigError, Contradiction, Disagreement, Part, text_disagreements,
    unet_disagreements, vae_disagreements,
};
use crate::layers::GROUP_NORM_GROUPS;
use crate::unet::{DEFAULT_NORM_EPS, Heads, UNet, UNetConfig};
use crate::vae::{SD1_SCALING_FACTOR, SDXL_SCALING_FACTOR, Vae, VaeConfig};
use crate::weights::{FillReport, KeyOf, TensorSource, fill, fill_as, param_keys, param_values};

/// Key prefix of the UNet.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Key prefix of the autoencoder.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Key prefix of SD1's CLIP-L.
pub const SD1_TEXT_PREFIX: &str = "cond_stage_model.transformer.";
/// Key prefix of SDXL's CLIP-L.
pub const SDXL_TEXT_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Key prefix of SDXL's OpenCLIP bigG.
pub const SDXL_TEXT_G_PREFIX: &str = "conditioner.embedders.1.model.";

/// Keys that are stored with a model part but are not parameters of its forward pass.
const BUFFER_SUFFIXES: &[&str] = &["text_model.embeddings.position_ids", "logit_scale"];

/// Errors of reading, detecting, loading and writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened, mapped or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid safetensors.
    #[error("{path}: not a safetensors file: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// No UNet keys: not a Stable Diffusion checkpoint in the original layout.
    #[error(
        "{path}: no `model.diffusion_model.*` keys; expected a single-file SD1.x/SDXL checkpoint in the original (LDM/SGM) layout"
    )]
    NotStableDiffusion {
        /// The file.
        path: PathBuf,
    },
    /// The architecture could not be read from the keys.
    #[error("{path}: cannot read the {part} architecture: {message}")]
    Architecture {
        /// The file.
        path: PathBuf,
        /// Which part.
        part: &'static str,
        /// What was wrong.
        message: String,
    },
    /// A diffusers config that cannot be read, or that the weights contradict.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Keys missing, unexpected or mis-shaped.
    #[error("{path}: the checkpoint does not match the detected architecture ({summary})\n{report}",
        summary = report.summary())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The full list.
        report: KeyReport,
    },
}

/// Everything that keeps a checkpoint from loading cleanly; full keys.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct KeyReport {
    /// Needed by our model, absent from the file.
    pub missing: Vec<String>,
    /// Under a model part's prefix but not consumed by our model.
    pub unexpected: Vec<String>,
    /// (key, expected shape, stored shape).
    pub misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// (key, why it could not be read), e.g. an integer dtype.
    pub unreadable: Vec<(String, String)>,
}

impl KeyReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.misshaped.is_empty()
            && self.unreadable.is_empty()
    }

    fn summary(&self) -> String {
        format!(
            "{} missing, {} unexpected, {} mis-shaped, {} unreadable",
            self.missing.len(),
            self.unexpected.len(),
            self.misshaped.len(),
            self.unreadable.len()
        )
    }

    fn absorb(&mut self, fill: FillReport) {
        self.missing.extend(fill.missing);
        self.misshaped.extend(fill.misshaped);
        self.unreadable.extend(fill.unreadable);
    }
}

impl std::fmt::Display for KeyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for key in &self.missing {
            writeln!(f, "  missing     {key}")?;
        }
        for key in &self.unexpected {
            writeln!(f, "  unexpected  {key}")?;
        }
        for (key, want, found) in &self.misshaped {
            writeln!(f, "  mis-shaped  {key}: expected {want:?}, found {found:?}")?;
        }
        for (key, why) in &self.unreadable {
            writeln!(f, "  unreadable  {key}: {why}")?;
        }
        Ok(())
    }
}

/// Dtype, shape and byte range (relative to the data section) of one stored tensor.
type StoredTensor = (Dtype, Vec<usize>, (usize, usize));

/// A safetensors file: its header read through a memory map, its tensors read one at a time
/// with positioned reads (so loading a model never holds the file's pages in the process's
/// resident set: a half-precision UNet costs its own size, not that plus the file's).
pub struct Checkpoint {
    path: PathBuf,
    file: File,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, StoredTensor>,
    metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Maps `path` and reads its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| CheckpointError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; a file truncated under us by another process is the
        // usual caveat of memory-mapped reading, accepted for multi-gigabyte checkpoints.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header_len, meta) =
            SafeTensors::read_metadata(&mmap).map_err(|e| CheckpointError::Format {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, (info.dtype, info.shape.clone(), info.data_offsets)))
            .collect();
        let metadata = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(Self {
            path,
            file,
            mmap,
            data_start: 8 + header_len,
            tensors,
            metadata,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Dtype name (`F32`, `F16`, `BF16`, ...) of a key.
    pub fn dtype(&self, key: &str) -> Option<String> {
        self.tensors.get(key).map(|(d, _, _)| format!("{d:?}"))
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|(_, s, _)| s.as_slice())
    }
}

impl TensorSource for Checkpoint {
    fn shape_of(&self, key: &str) -> Option<Vec<usize>> {
        self.shape(key).map(<[usize]>::to_vec)
    }

    fn values_f32(&self, key: &str) -> Result<Vec<f32>, String> {
        let (dtype, _, (start, end)) = self
            .tensors
            .get(key)
            .ok_or_else(|| format!("no tensor {key}"))?;
        let range = self.data_start + start..self.data_start + end;
        if range.end > self.mmap.len() {
            return Err("data offsets past the end of the file".to_string());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            let mut bytes = vec![0u8; range.len()];
            self.file
                .read_exact_at(&mut bytes, range.start as u64)
                .map_err(|e| format!("reading {key}: {e}"))?;
            decode_f32(*dtype, &bytes)
        }
        #[cfg(not(unix))]
        {
            let _ = &self.file;
            decode_f32(*dtype, &self.mmap[range])
        }
    }
}

/// Little-endian tensor bytes to f32.
pub fn decode_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, String> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
            .collect(),
        other => return Err(format!("dtype {other:?} is not supported (f32, f16, bf16)")),
    })
}

/// Which text-conditioning scheme the model follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// SD1.x: CLIP-L last layer, no added conditioning.
    Sd1,
    /// SDXL: CLIP-L and bigG penultimate layers, pooled bigG and sizes as added conditioning.
    Sdxl,
}

impl Family {
    /// The latent scaling factor of the family's autoencoder.
    pub fn scaling_factor(self) -> f32 {
        match self {
            Family::Sd1 => SD1_SCALING_FACTOR,
            Family::Sdxl => SDXL_SCALING_FACTOR,
        }
    }

    fn text_l_prefix(self) -> &'static str {
        match self {
            Family::Sd1 => SD1_TEXT_PREFIX,
            Family::Sdxl => SDXL_TEXT_L_PREFIX,
        }
    }
}

/// The architecture of a checkpoint: one configuration per part it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Conditioning scheme.
    pub family: Family,
    /// The UNet.
    pub unet: UNetConfig,
    /// The autoencoder, when the file has one.
    pub vae: Option<VaeConfig>,
    /// CLIP-L (HF layout), when the file has it.
    pub text_l: Option<TextConfig>,
    /// OpenCLIP bigG (open_clip layout), SDXL only.
    pub text_g: Option<TextConfig>,
}

impl ModelSpec {
    /// A full SD1.5 checkpoint.
    pub fn sd15() -> Self {
        Self {
            family: Family::Sd1,
            unet: UNetConfig::sd15(),
            vae: Some(VaeConfig::sd()),
            text_l: Some(TextConfig::clip_l()),
            text_g: None,
        }
    }

    /// A full SDXL checkpoint.
    pub fn sdxl() -> Self {
        Self {
            family: Family::Sdxl,
            unet: UNetConfig::sdxl(),
            vae: Some(VaeConfig::sd()),
            text_l: Some(TextConfig::clip_l()),
            text_g: Some(TextConfig::clip_g()),
        }
    }

    /// Our tiny model: tiny UNet and VAE with SD1.5's CLIP-L.
    pub fn tiny() -> Self {
        Self {
            family: Family::Sd1,
            unet: UNetConfig::tiny(),
            vae: Some(VaeConfig::tiny()),
            text_l: Some(TextConfig::clip_l()),
            text_g: None,
        }
    }

    /// A small SD1-family model for tests and examples (a few hundred thousand parameters):
    /// the tiny UNet narrowed to 32 channels, the tiny VAE and a one-layer, 32-wide CLIP-L with
    /// the real vocabulary, so the real tokenizer works with it. Not meant to draw anything.
    pub fn small_test() -> Self {
        Self {
            family: Family::Sd1,
            unet: UNetConfig {
                model_channels: 32,
                context_dim: 32,
                ..UNetConfig::tiny()
            },
            vae: Some(VaeConfig::tiny()),
            text_l: Some(TextConfig {
                vocab_size: 49408,
                hidden: 32,
                layers: 1,
                heads: 2,
                intermediate: 64,
                max_positions: 77,
                activation: Activation::QuickGelu,
                projection_dim: None,
            }),
            text_g: None,
        }
    }

    /// A short name: `SD1.x`, `SDXL`, `tiny` or `custom SD1-family`/`custom SDXL-family`.
    pub fn name(&self) -> String {
        if self.unet == UNetConfig::sd15() {
            "SD1.x".into()
        } else if self.unet == UNetConfig::sdxl() {
            "SDXL".into()
        } else if self.unet == UNetConfig::tiny() {
            "tiny".into()
        } else {
            format!("custom {:?}-family", self.family)
        }
    }

    /// Reads the architecture from the keys and shapes of `ckpt`.
    pub fn detect(ckpt: &Checkpoint) -> Result<Self, CheckpointError> {
        Self::detect_with(ckpt, &BaseConfig::none())
    }

    /// Reads the architecture from the keys and shapes of `ckpt`, completed and overridden by
    /// `config`'s parts (diffusers' `from_single_file(config=...)`). A configured value that
    /// the shapes contradict is a [`ConfigError::Contradicts`] naming the config key and the
    /// first disagreeing tensor.
    pub fn detect_with(ckpt: &Checkpoint, config: &BaseConfig) -> Result<Self, CheckpointError> {
        if !ckpt.keys().any(|k| k.starts_with(UNET_PREFIX)) {
            return Err(CheckpointError::NotStableDiffusion {
                path: ckpt.path.clone(),
            });
        }
        let device = Device::flex();
        let unet = match &config.unet {
            Some(part) => {
                let keys = || param_keys(&part.config.init(&device));
                configured(
                    ckpt,
                    part,
                    infer_unet(ckpt),
                    unet_disagreements,
                    UNET_PREFIX,
                    keys,
                )?
            }
            None => infer_unet(ckpt)
                .and_then(|c| match c.validate() {
                    Ok(()) => Ok(c),
                    Err(m) => Err(unet_hint(m, &c)),
                })
                .map_err(|message| CheckpointError::Architecture {
                    path: ckpt.path.clone(),
                    part: "UNet",
                    message,
                })?,
        };
        let family = if unet.adm_in_channels.is_some()
            || ckpt.keys().any(|k| k.starts_with(SDXL_TEXT_G_PREFIX))
        {
            Family::Sdxl
        } else {
            Family::Sd1
        };
        let arch = |part: &'static str| {
            move |message| CheckpointError::Architecture {
                path: ckpt.path.clone(),
                part,
                message,
            }
        };
        let has = |prefix: &str| ckpt.keys().any(|k| k.starts_with(prefix));
        let vae = match (&config.vae, has(VAE_PREFIX)) {
            (_, false) => None,
            (Some(part), true) => {
                let keys = || param_keys(&part.config.init(&device));
                Some(configured(
                    ckpt,
                    part,
                    infer_vae(ckpt),
                    vae_disagreements,
                    VAE_PREFIX,
                    keys,
                )?)
            }
            (None, true) => Some(
                infer_vae(ckpt)
                    .and_then(|c| c.validate().map(|()| c).map_err(vae_hint))
                    .map_err(arch("VAE"))?,
            ),
        };
        let text_l_prefix = family.text_l_prefix();
        let text_l = match (&config.text_l, has(text_l_prefix)) {
            (_, false) => None,
            (Some(part), true) => {
                let keys = || param_keys(&part.config.init_hf(&device));
                let shapes = infer_hf_clip(ckpt, text_l_prefix);
                Some(configured(
                    ckpt,
                    part,
                    shapes,
                    text_disagreements,
                    text_l_prefix,
                    keys,
                )?)
            }
            (None, true) => Some(
                infer_hf_clip(ckpt, text_l_prefix)
                    .and_then(|c| c.validate().map(|()| c).map_err(text_hint("text_encoder")))
                    .map_err(arch("CLIP-L"))?,
            ),
        };
        let text_g = match (&config.text_g, has(SDXL_TEXT_G_PREFIX)) {
            (_, false) => None,
            (Some(part), true) => {
                let keys = || param_keys(&part.config.init_open_clip(&device));
                let shapes = infer_open_clip(ckpt);
                Some(configured(
                    ckpt,
                    part,
                    shapes,
                    text_disagreements,
                    SDXL_TEXT_G_PREFIX,
                    keys,
                )?)
            }
            (None, true) => Some(
                infer_open_clip(ckpt)
                    .and_then(|c| {
                        c.validate()
                            .map(|()| c)
                            .map_err(text_hint("text_encoder_2"))
                    })
                    .map_err(arch("OpenCLIP bigG"))?,
            ),
        };
        Ok(Self {
            family,
            unet,
            vae,
            text_l,
            text_g,
        })
    }

    /// Whether every part of this architecture can be built; the part and the reason when not.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        self.unet.validate().map_err(|m| ("UNet", m))?;
        if let Some(vae) = &self.vae {
            vae.validate().map_err(|m| ("VAE", m))?;
        }
        if let Some(t) = &self.text_l {
            t.validate().map_err(|m| ("CLIP-L", m))?;
        }
        if let Some(t) = &self.text_g {
            t.validate().map_err(|m| ("OpenCLIP bigG", m))?;
            if t.projection_dim.is_none() {
                return Err(("OpenCLIP bigG", "no pooled projection width".into()));
            }
        }
        Ok(())
    }

    /// Whether the text encoders take every id of the CLIP tokenizer (a cut-down token
    /// embedding would fail inside the first lookup otherwise).
    pub fn check_tokenizer_fits(&self) -> Result<(), crate::tokenizer::TokenizerError> {
        for (part, text) in [("CLIP-L", &self.text_l), ("OpenCLIP bigG", &self.text_g)] {
            if let Some(t) = text {
                crate::tokenizer::check_vocab(part, t.vocab_size)?;
            }
        }
        Ok(())
    }

    /// What image widths and heights must be multiples of: the VAE's downsampling times the
    /// UNet's (a UNet level halves the latent).
    pub fn pixel_multiple(&self) -> usize {
        let vae_levels = self.vae.as_ref().map_or(1, |v| v.ch_mult.len());
        let unet_levels = self.unet.channel_mult.len();
        1 << (vae_levels.saturating_sub(1) + unet_levels.saturating_sub(1))
    }

    /// The metadata our writer stores: what shapes cannot tell.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let heads = match self.unet.heads {
            Heads::Count(n) => format!("count:{n}"),
            Heads::Dim(d) => format!("dim:{d}"),
        };
        m.insert("slider.unet.heads".into(), heads);
        m.insert(
            "slider.unet.size_embed_dim".into(),
            self.unet.size_embed_dim.to_string(),
        );
        // Stored only when not the default, so the released configurations keep their bytes.
        if self.unet.norm_num_groups != GROUP_NORM_GROUPS {
            m.insert(
                "slider.unet.norm_num_groups".into(),
                self.unet.norm_num_groups.to_string(),
            );
        }
        if self.unet.norm_eps != DEFAULT_NORM_EPS {
            m.insert(
                "slider.unet.norm_eps".into(),
                self.unet.norm_eps.to_string(),
            );
        }
        if let Some(v) = self
            .vae
            .as_ref()
            .filter(|v| v.norm_num_groups != GROUP_NORM_GROUPS)
        {
            m.insert(
                "slider.vae.norm_num_groups".into(),
                v.norm_num_groups.to_string(),
            );
        }
        if let Some(t) = &self.text_l {
            m.insert("slider.text_l.heads".into(), t.heads.to_string());
        }
        if let Some(t) = &self.text_g {
            m.insert("slider.text_g.heads".into(), t.heads.to_string());
        }
        if let Ok(json) = serde_json::to_string(self) {
            m.insert("slider.model_spec".into(), json);
        }
        m
    }

    /// What this spec took on trust for `ckpt`: values that neither `config` nor our writer's
    /// metadata gave and the shapes cannot tell, each with the value assumed. Empty for our
    /// own files and for fully configured parts.
    pub fn assumptions(&self, ckpt: &Checkpoint, config: &BaseConfig) -> Vec<String> {
        let mut out = Vec::new();
        if ckpt.metadata.contains_key("slider.model_spec") {
            return out;
        }
        if config.unet.is_none() {
            if !ckpt.metadata.contains_key("slider.unet.heads") {
                out.push(format!(
                    "UNet attention heads {:?} (the {:?} family's)",
                    self.unet.heads, self.family
                ));
            }
            if !ckpt.metadata.contains_key("slider.unet.norm_num_groups") {
                out.push(format!(
                    "UNet GroupNorm groups {} (norm_num_groups) and eps {:e} (norm_eps)",
                    self.unet.norm_num_groups, self.unet.norm_eps
                ));
            }
        }
        if let (None, Some(vae)) = (&config.vae, &self.vae)
            && !ckpt.metadata.contains_key("slider.vae.norm_num_groups")
        {
            out.push(format!("VAE GroupNorm groups {}", vae.norm_num_groups));
        }
        if let (None, Some(t)) = (&config.text_l, &self.text_l)
            && !ckpt.metadata.contains_key("slider.text_l.heads")
        {
            out.push(format!("CLIP-L attention heads {}", t.heads));
        }
        if let (None, Some(t)) = (&config.text_g, &self.text_g)
            && !ckpt.metadata.contains_key("slider.text_g.heads")
        {
            out.push(format!("OpenCLIP bigG attention heads {}", t.heads));
        }
        out
    }

    /// Every parameter key of this architecture with its stored shape, by part.
    pub fn expected_keys(&self) -> Vec<(&'static str, String, Vec<usize>)> {
        let device = Device::flex();
        let mut out = Vec::new();
        let mut push =
            |part: &'static str, prefix: &str, keys: Vec<(crate::weights::KeyOf, Vec<usize>)>| {
                for (key, shape) in keys {
                    let stored = if key.transposed && shape.len() == 2 {
                        vec![shape[1], shape[0]]
                    } else {
                        shape
                    };
                    out.push((part, format!("{prefix}{}", key.key), stored));
                }
            };
        push("unet", UNET_PREFIX, param_keys(&self.unet.init(&device)));
        if let Some(vae) = &self.vae {
            push("vae", VAE_PREFIX, param_keys(&vae.init(&device)));
        }
        if let Some(t) = &self.text_l {
            push(
                "text_l",
                self.family.text_l_prefix(),
                param_keys(&t.init_hf(&device)),
            );
        }
        if let Some(t) = &self.text_g {
            push(
                "text_g",
                SDXL_TEXT_G_PREFIX,
                param_keys(&t.init_open_clip(&device)),
            );
        }
        out
    }

    /// Prefixes of the parts this spec has.
    pub fn part_prefixes(&self) -> Vec<(&'static str, &'static str)> {
        let mut parts = vec![("unet", UNET_PREFIX)];
        if self.vae.is_some() {
            parts.push(("vae", VAE_PREFIX));
        }
        if self.text_l.is_some() {
            parts.push(("text_l", self.family.text_l_prefix()));
        }
        if self.text_g.is_some() {
            parts.push(("text_g", SDXL_TEXT_G_PREFIX));
        }
        parts
    }
}

/// Compares the keys and shapes of `ckpt` with what `spec` needs, without reading values.
pub fn check_keys(ckpt: &Checkpoint, spec: &ModelSpec) -> KeyReport {
    let mut report = KeyReport::default();
    let expected = spec.expected_keys();
    let wanted: BTreeSet<&str> = expected.iter().map(|(_, k, _)| k.as_str()).collect();
    for (_, key, shape) in &expected {
        match ckpt.shape(key) {
            None => report.missing.push(key.clone()),
            Some(found) if found != shape.as_slice() => {
                report
                    .misshaped
                    .push((key.clone(), shape.clone(), found.to_vec()))
            }
            Some(_) => {
                if let Some(d) = ckpt.tensors.get(key).map(|(d, _, _)| *d)
                    && !matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16)
                {
                    report.unreadable.push((
                        key.clone(),
                        format!("dtype {d:?} (expected f32, f16 or bf16)"),
                    ));
                }
            }
        }
    }
    let prefixes: Vec<&str> = spec.part_prefixes().iter().map(|(_, p)| *p).collect();
    for key in ckpt.keys() {
        if prefixes.iter().any(|p| key.starts_with(p))
            && !wanted.contains(key)
            && !BUFFER_SUFFIXES.iter().any(|s| key.ends_with(s))
        {
            report.unexpected.push(key.to_string());
        }
    }
    report
}

/// Reads the value of every tensor `spec` needs that [`check_keys`] found well-formed, and adds
/// to `report` each one that does not decode or holds a NaN or an infinity. One pass over the
/// file; nothing reaches burn.
pub fn check_values(ckpt: &Checkpoint, spec: &ModelSpec, report: &mut KeyReport) {
    let skip: BTreeSet<&str> = report
        .missing
        .iter()
        .chain(report.misshaped.iter().map(|(k, _, _)| k))
        .chain(report.unreadable.iter().map(|(k, _)| k))
        .map(String::as_str)
        .collect();
    let mut found = Vec::new();
    for (_, key, _) in spec.expected_keys() {
        if skip.contains(key.as_str()) {
            continue;
        }
        match ckpt.values_f32(&key) {
            Err(why) => found.push((key, why)),
            Ok(values) => {
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    let why = format!("non-finite value {} at element {i}", values[i]);
                    found.push((key, why));
                }
            }
        }
    }
    report.unreadable.extend(found);
}

/// A loaded checkpoint: every part the file holds.
#[derive(Debug, Clone)]
pub struct StableDiffusion {
    /// The architecture.
    pub spec: ModelSpec,
    /// The UNet.
    pub unet: UNet,
    /// The autoencoder.
    pub vae: Option<Vae>,
    /// CLIP-L.
    pub text_l: Option<ClipTextModel>,
    /// OpenCLIP bigG.
    pub text_g: Option<OpenClipText>,
}

/// The parts of a model a training run uses once, before its first step: the VAE encodes the
/// images, the text encoders the caption ([`StableDiffusion::load_encoders`]).
pub struct Encoders {
    /// The architecture (the UNet's included).
    pub spec: ModelSpec,
    /// The autoencoder.
    pub vae: Option<Vae>,
    /// CLIP-L.
    pub text_l: Option<ClipTextModel>,
    /// OpenCLIP bigG.
    pub text_g: Option<OpenClipText>,
}

/// The dtypes a model's UNet and VAE are held and computed in (kohya's `mixed_precision` and
/// `no_half_vae`). The text encoders run once per training and stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// The UNet's weights and activations.
    pub unet: FloatDType,
    /// The VAE's.
    pub vae: FloatDType,
}

impl Default for Precision {
    fn default() -> Self {
        Self {
            unet: FloatDType::F32,
            vae: FloatDType::F32,
        }
    }
}

impl StableDiffusion {
    /// Detects the architecture of `ckpt` and loads every part onto `device`. Fails, before
    /// reading any value, with the complete [`KeyReport`] when a key is missing, unexpected,
    /// mis-shaped or of an unsupported dtype.
    pub fn load(ckpt: &Checkpoint, device: &Device) -> Result<Self, CheckpointError> {
        Self::load_with(ckpt, &BaseConfig::none(), device)
    }

    /// [`StableDiffusion::load`] with the architecture completed by diffusers configs (see
    /// [`ModelSpec::detect_with`]).
    pub fn load_with(
        ckpt: &Checkpoint,
        config: &BaseConfig,
        device: &Device,
    ) -> Result<Self, CheckpointError> {
        Self::load_in(ckpt, config, Precision::default(), device)
    }

    /// [`StableDiffusion::load_with`] with the UNet and the VAE held and computed in the dtypes
    /// of `precision` (each tensor converted as it is read; norms stay f32).
    pub fn load_in(
        ckpt: &Checkpoint,
        config: &BaseConfig,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, CheckpointError> {
        let spec = ModelSpec::detect_with(ckpt, config)?;
        Self::load_as(ckpt, spec, precision, device)
    }

    /// Loads `ckpt` as the given architecture.
    pub fn load_as(
        ckpt: &Checkpoint,
        spec: ModelSpec,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, CheckpointError> {
        let Encoders {
            spec,
            vae,
            text_l,
            text_g,
        } = Self::load_encoders(ckpt, spec, precision, device)?;
        let unet = Self::load_unet(ckpt, &spec, precision.unet, device)?;
        Ok(Self {
            spec,
            unet,
            vae,
            text_l,
            text_g,
        })
    }

    /// Checks every key of every part of `ckpt` against `spec` (the UNet's included, so a
    /// checkpoint that cannot load fails here, before any value is read) and loads the parts
    /// a training run needs once: the VAE and the text encoders. The UNet comes after them
    /// ([`StableDiffusion::load_unet`]), so the two never sit in memory together.
    pub fn load_encoders(
        ckpt: &Checkpoint,
        spec: ModelSpec,
        precision: Precision,
        device: &Device,
    ) -> Result<Encoders, CheckpointError> {
        spec.validate()
            .map_err(|(part, message)| CheckpointError::Architecture {
                path: ckpt.path.clone(),
                part,
                message,
            })?;
        let report = check_keys(ckpt, &spec);
        if !report.is_clean() {
            return Err(CheckpointError::Mismatch {
                path: ckpt.path.clone(),
                report,
            });
        }
        let mut report = KeyReport::default();
        let vae = spec.vae.as_ref().map(|c| {
            let (m, r) = fill_as(c.init(device), ckpt, VAE_PREFIX, precision.vae);
            report.absorb(r);
            m
        });
        let text_l = spec.text_l.as_ref().map(|c| {
            let (m, r) = fill(c.init_hf(device), ckpt, spec.family.text_l_prefix());
            report.absorb(r);
            m
        });
        let text_g = spec.text_g.as_ref().map(|c| {
            let (m, r) = fill(c.init_open_clip(device), ckpt, SDXL_TEXT_G_PREFIX);
            report.absorb(r);
            m
        });
        if !report.is_clean() {
            return Err(CheckpointError::Mismatch {
                path: ckpt.path.clone(),
                report,
            });
        }
        Ok(Encoders {
            spec,
            vae,
            text_l,
            text_g,
        })
    }

    /// The UNet of `ckpt` as `spec` describes it, its weights in `dtype` (norms f32).
    pub fn load_unet(
        ckpt: &Checkpoint,
        spec: &ModelSpec,
        dtype: FloatDType,
        device: &Device,
    ) -> Result<UNet, CheckpointError> {
        let mut report = KeyReport::default();
        let (unet, r) = fill_as(spec.unet.init(device), ckpt, UNET_PREFIX, dtype);
        report.absorb(r);
        if !report.is_clean() {
            return Err(CheckpointError::Mismatch {
                path: ckpt.path.clone(),
                report,
            });
        }
        Ok(unet)
    }

    /// Writes every part in the original layout, values stored as `dtype`.
    pub fn save(&self, path: impl AsRef<Path>, dtype: StoreDtype) -> Result<(), CheckpointError> {
        let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
        let mut add = |prefix: &str, values: Vec<(String, Vec<usize>, Vec<f32>)>| {
            for (key, shape, v) in values {
                tensors.insert(format!("{prefix}{key}"), (shape, v));
            }
        };
        add(UNET_PREFIX, param_values(&self.unet));
        if let Some(m) = &self.vae {
            add(VAE_PREFIX, param_values(m));
        }
        if let Some(m) = &self.text_l {
            add(self.spec.family.text_l_prefix(), param_values(m));
        }
        if let Some(m) = &self.text_g {
            add(SDXL_TEXT_G_PREFIX, param_values(m));
        }
        let entries: Vec<(String, Vec<usize>)> = tensors
            .iter()
            .map(|(k, (s, _))| (k.clone(), s.clone()))
            .collect();
        write_safetensors(
            path.as_ref(),
            &entries,
            dtype,
            &self.spec.metadata(),
            |key| tensors.remove(key).map(|(_, v)| v).unwrap_or_default(),
        )
    }
}

/// Element type of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
}

/// Writes a checkpoint of `spec` with random values (deterministic in `seed`) without building
/// the model: linear/conv weights uniform in +-sqrt(3 / fan_in), norm weights 1, biases 0.
/// Used for full-size loading tests and benchmarks.
pub fn write_random_checkpoint(
    path: impl AsRef<Path>,
    spec: &ModelSpec,
    dtype: StoreDtype,
    seed: u64,
) -> Result<(), CheckpointError> {
    let expected = spec.expected_keys();
    let entries: Vec<(String, Vec<usize>)> = expected
        .iter()
        .map(|(_, k, s)| (k.clone(), s.clone()))
        .collect();
    let shapes: BTreeMap<String, Vec<usize>> = entries.iter().cloned().collect();
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    write_safetensors(path.as_ref(), &entries, dtype, &spec.metadata(), |key| {
        let shape = shapes.get(key).cloned().unwrap_or_default();
        let n: usize = shape.iter().product();
        let is_norm = key.contains("norm") || key.contains("ln_");
        if key.ends_with(".bias") || key.ends_with("_bias") {
            return vec![0.0; n];
        }
        if is_norm && shape.len() == 1 {
            return vec![1.0; n];
        }
        let fan_in = if shape.len() >= 2 {
            n / shape[0]
        } else {
            n.max(1)
        };
        let bound = (3.0 / fan_in as f64).sqrt() as f32;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
                (2.0 * unit - 1.0) * bound
            })
            .collect()
    })
}

/// Streams a safetensors file: header first, then each tensor as `values(key)` returns it, so
/// a multi-gigabyte checkpoint never sits in memory whole. Written through
/// [`slider_atomic::AtomicFile`]: a reader sees the old file or the whole new one.
pub fn write_safetensors(
    path: &Path,
    entries: &[(String, Vec<usize>)],
    dtype: StoreDtype,
    metadata: &BTreeMap<String, String>,
    mut values: impl FnMut(&str) -> Vec<f32>,
) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let width = match dtype {
        StoreDtype::F32 => 4,
        StoreDtype::F16 => 2,
    };
    let dtype_name = match dtype {
        StoreDtype::F32 => "F32",
        StoreDtype::F16 => "F16",
    };
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(metadata).unwrap_or_default(),
    );
    let mut offset = 0usize;
    for (key, shape) in entries {
        let len = shape.iter().product::<usize>() * width;
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| io(std::io::Error::other(e)))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }

    let result = (|| -> std::io::Result<()> {
        let mut out = BufWriter::with_capacity(1 << 20, slider_atomic::AtomicFile::create(path)?);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for (key, shape) in entries {
            let v = values(key);
            let n: usize = shape.iter().product();
            if v.len() != n {
                return Err(std::io::Error::other(format!(
                    "{key}: {} values for shape {shape:?}",
                    v.len()
                )));
            }
            match dtype {
                StoreDtype::F32 => {
                    for x in v {
                        out.write_all(&x.to_le_bytes())?;
                    }
                }
                StoreDtype::F16 => {
                    for x in v {
                        out.write_all(&f16::from_f32(x).to_le_bytes())?;
                    }
                }
            }
        }
        // A file dropped before its commit is removed, so an error above leaves nothing.
        out.into_inner().map_err(|e| e.into_error())?.commit()
    })();
    result.map_err(io)
}

/// Axis `axis` of `key`'s shape, which must exist and be non-zero.
fn need_dim(ckpt: &Checkpoint, key: &str, axis: usize) -> Result<usize, String> {
    let shape = need_shape(ckpt, key)?;
    match shape.get(axis) {
        Some(&d) if d > 0 => Ok(d),
        _ => Err(format!(
            "key `{key}` has shape {shape:?}; its dimension {axis} is needed and must be non-zero"
        )),
    }
}

fn need_shape<'a>(ckpt: &'a Checkpoint, key: &str) -> Result<&'a [usize], String> {
    ckpt.shape(key)
        .ok_or_else(|| format!("key `{key}` is missing"))
}

fn count_indexed(ckpt: &Checkpoint, prefix: &str, suffix: &str) -> usize {
    (0..)
        .take_while(|i| ckpt.has(&format!("{prefix}{i}{suffix}")))
        .count()
}

fn metadata_usize(ckpt: &Checkpoint, key: &str) -> Result<Option<usize>, String> {
    ckpt.metadata
        .get(key)
        .map(|v| {
            v.parse::<usize>()
                .map_err(|_| format!("metadata `{key}` = `{v}` is not a number"))
        })
        .transpose()
}

fn infer_unet(ckpt: &Checkpoint) -> Result<UNetConfig, String> {
    let p = UNET_PREFIX;
    let conv_in = need_shape(ckpt, &format!("{p}input_blocks.0.0.weight"))?;
    let (mc, in_channels) = match *conv_in {
        [mc, in_channels, _, _] if mc > 0 && in_channels > 0 => (mc, in_channels),
        _ => {
            return Err(format!(
                "`{p}input_blocks.0.0.weight` has shape {conv_in:?}; expected a 4-d convolution \
                 with non-zero channels"
            ));
        }
    };
    let out_channels = need_dim(ckpt, &format!("{p}out.2.weight"), 0)?;
    let label_emb = format!("{p}label_emb.0.0.weight");
    let adm_in_channels = match ckpt.shape(&label_emb) {
        Some(_) => Some(need_dim(ckpt, &label_emb, 1)?),
        None => None,
    };

    let mut level_channels: Vec<usize> = Vec::new();
    let mut level_res: Vec<usize> = vec![0];
    let mut level_depth: Vec<usize> = vec![0];
    let mut context_dim = None;
    let mut linear_proj = None;
    let mut level = 0;
    let mut i = 1;
    while ckpt
        .keys()
        .any(|k| k.starts_with(&format!("{p}input_blocks.{i}.")))
    {
        if ckpt.has(&format!("{p}input_blocks.{i}.0.op.weight")) {
            level += 1;
            level_res.push(0);
            level_depth.push(0);
        } else {
            let out = need_dim(
                ckpt,
                &format!("{p}input_blocks.{i}.0.out_layers.3.weight"),
                0,
            )?;
            if level_channels.len() == level {
                level_channels.push(out);
            }
            level_res[level] += 1;
            let t = format!("{p}input_blocks.{i}.1.");
            if let Some(proj) = ckpt.shape(&format!("{t}proj_in.weight")) {
                linear_proj = Some(proj.len() == 2);
                level_depth[level] = count_indexed(
                    ckpt,
                    &format!("{t}transformer_blocks."),
                    ".attn1.to_q.weight",
                );
                context_dim = Some(need_dim(
                    ckpt,
                    &format!("{t}transformer_blocks.0.attn2.to_k.weight"),
                    1,
                )?);
            }
        }
        i += 1;
    }
    if level_channels.len() != level_res.len() {
        return Err("a level without res blocks".into());
    }
    let Some(&num_res_blocks) = level_res.first() else {
        return Err("no down-sampling levels".into());
    };
    if level_res.iter().any(|&n| n != num_res_blocks) {
        return Err(format!("res blocks per level differ: {level_res:?}"));
    }
    let channel_mult = level_channels
        .iter()
        .map(|c| {
            if c % mc == 0 {
                Ok(c / mc)
            } else {
                Err(format!("{c} channels is not a multiple of {mc}"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mid = format!("{p}middle_block.1.transformer_blocks.");
    let transformer_depth_middle = count_indexed(ckpt, &mid, ".attn1.to_q.weight");
    if transformer_depth_middle == 0 {
        return Err("the middle block has no transformer".into());
    }
    let context_dim = match context_dim {
        Some(c) => c,
        None => need_dim(ckpt, &format!("{mid}0.attn2.to_k.weight"), 1)?,
    };
    let use_linear_projection = match linear_proj {
        Some(l) => l,
        None => need_shape(ckpt, &format!("{p}middle_block.1.proj_in.weight"))?.len() == 2,
    };
    let heads = match ckpt.metadata.get("slider.unet.heads") {
        Some(v) => parse_heads(v)?,
        None if use_linear_projection => Heads::Dim(64),
        None => Heads::Count(8),
    };
    let size_embed_dim = metadata_usize(ckpt, "slider.unet.size_embed_dim")?.unwrap_or(256);
    let norm_num_groups =
        metadata_usize(ckpt, "slider.unet.norm_num_groups")?.unwrap_or(GROUP_NORM_GROUPS);
    let norm_eps = match ckpt.metadata.get("slider.unet.norm_eps") {
        Some(v) => v
            .parse::<f64>()
            .map_err(|_| format!("metadata `slider.unet.norm_eps` = `{v}` is not a number"))?,
        None => DEFAULT_NORM_EPS,
    };
    Ok(UNetConfig {
        in_channels,
        out_channels,
        model_channels: mc,
        channel_mult,
        num_res_blocks,
        transformer_depth: level_depth,
        transformer_depth_middle,
        heads,
        context_dim,
        use_linear_projection,
        adm_in_channels,
        size_embed_dim,
        norm_num_groups,
        norm_eps,
    })
}

/// A part's configured architecture, checked against what `ckpt`'s shapes show (when they can
/// be read): the first disagreement is an error naming the config key and the first tensor
/// whose shape differs under the config.
fn configured<T: Clone>(
    ckpt: &Checkpoint,
    part: &Part<T>,
    shapes: Result<T, String>,
    disagreements: fn(&T, &T) -> Vec<Disagreement>,
    prefix: &str,
    keys: impl FnOnce() -> Vec<(KeyOf, Vec<usize>)>,
) -> Result<T, CheckpointError> {
    let Ok(shapes) = shapes else {
        // Shapes that say nothing coherent: the key check of the load lists what is wrong.
        return Ok(part.config.clone());
    };
    let Some((key, value, found)) = disagreements(&part.config, &shapes).into_iter().next() else {
        return Ok(part.config.clone());
    };
    let (tensor, expected, actual) = keys()
        .into_iter()
        .map(|(k, shape)| {
            let stored = if k.transposed && shape.len() == 2 {
                vec![shape[1], shape[0]]
            } else {
                shape
            };
            (format!("{prefix}{}", k.key), stored)
        })
        .find_map(|(k, want)| match ckpt.shape(&k) {
            Some(got) if got == want.as_slice() => None,
            Some(got) => Some((k, want, format!("{got:?}"))),
            None => Some((k, want, "absent".to_string())),
        })
        .unwrap_or_else(|| ("(no tensor)".into(), Vec::new(), "-".into()));
    Err(ConfigError::Contradicts(Box::new(Contradiction {
        path: part.path.clone(),
        key: key.into(),
        value,
        found: format!("which shows {found}"),
        tensor,
        expected,
        actual,
    }))
    .into())
}

/// What the UNet's shapes cannot tell, said where a guess of it fails.
fn unet_hint(message: String, guessed: &UNetConfig) -> String {
    if !(message.contains("GroupNorm") || message.contains("heads")) {
        return message;
    }
    format!(
        "{message}. A checkpoint's shapes cannot tell GroupNorm's group count nor the attention \
         heads; assumed norm_num_groups {} and heads {:?}. Give the model's diffusers \
         config.json (`--config`, or `base_config:` in a recipe)",
        guessed.norm_num_groups, guessed.heads
    )
}

/// Same as [`unet_hint`] for the autoencoder's group count.
fn vae_hint(message: String) -> String {
    if !message.contains("GroupNorm") {
        return message;
    }
    format!(
        "{message}. A checkpoint's shapes cannot tell GroupNorm's group count; assumed 32. Give \
         the VAE's diffusers config.json (`--config` with a folder holding vae/config.json, or \
         `base_config:` in a recipe)"
    )
}

/// Same as [`unet_hint`] for a text encoder's heads (guessed as one per 64 channels), the
/// encoder being the one diffusers keeps in `folder`.
fn text_hint(folder: &'static str) -> impl Fn(String) -> String {
    move |message| {
        if !message.contains("heads") {
            return message;
        }
        format!(
            "{message}. A checkpoint's shapes cannot tell a text encoder's attention heads; \
             assumed one per 64 channels. Give its diffusers config.json (`--config` with that \
             file or a folder holding {folder}/config.json, or `base_config:` in a recipe)"
        )
    }
}

fn parse_heads(v: &str) -> Result<Heads, String> {
    let bad = || format!("metadata slider.unet.heads = `{v}`: expected `count:N` or `dim:N`");
    let (kind, n) = v.split_once(':').ok_or_else(bad)?;
    let n: usize = n.parse().map_err(|_| bad())?;
    match kind {
        "count" => Ok(Heads::Count(n)),
        "dim" => Ok(Heads::Dim(n)),
        _ => Err(bad()),
    }
}

fn infer_vae(ckpt: &Checkpoint) -> Result<VaeConfig, String> {
    let p = VAE_PREFIX;
    let conv_in = format!("{p}encoder.conv_in.weight");
    let (ch, in_channels) = (need_dim(ckpt, &conv_in, 0)?, need_dim(ckpt, &conv_in, 1)?);
    let levels = count_indexed(ckpt, &format!("{p}encoder.down."), ".block.0.conv1.weight");
    let ch_mult = (0..levels)
        .map(|l| {
            need_dim(
                ckpt,
                &format!("{p}encoder.down.{l}.block.0.conv2.weight"),
                0,
            )
            .and_then(|c| {
                if c % ch == 0 {
                    Ok(c / ch)
                } else {
                    Err(format!(
                        "VAE level {l} has {c} channels, not a multiple of {ch}"
                    ))
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let num_res_blocks = count_indexed(ckpt, &format!("{p}encoder.down.0.block."), ".conv1.weight");
    let z_channels = need_dim(ckpt, &format!("{p}decoder.conv_in.weight"), 1)?;
    let norm_num_groups =
        metadata_usize(ckpt, "slider.vae.norm_num_groups")?.unwrap_or(GROUP_NORM_GROUPS);
    Ok(VaeConfig {
        in_channels,
        ch,
        ch_mult,
        num_res_blocks,
        z_channels,
        norm_num_groups,
    })
}

fn infer_hf_clip(ckpt: &Checkpoint, prefix: &str) -> Result<TextConfig, String> {
    let p = format!("{prefix}text_model.");
    let tok = format!("{p}embeddings.token_embedding.weight");
    let tok = [need_dim(ckpt, &tok, 0)?, need_dim(ckpt, &tok, 1)?];
    let pos = [need_dim(
        ckpt,
        &format!("{p}embeddings.position_embedding.weight"),
        0,
    )?];
    let layers = count_indexed(ckpt, &format!("{p}encoder.layers."), ".mlp.fc1.weight");
    let intermediate = need_dim(ckpt, &format!("{p}encoder.layers.0.mlp.fc1.weight"), 0)?;
    let hidden = tok[1];
    let heads = metadata_usize(ckpt, "slider.text_l.heads")?.unwrap_or(hidden / 64);
    Ok(TextConfig {
        vocab_size: tok[0],
        hidden,
        layers,
        heads,
        intermediate,
        max_positions: pos[0],
        activation: Activation::QuickGelu,
        projection_dim: None,
    })
}

fn infer_open_clip(ckpt: &Checkpoint) -> Result<TextConfig, String> {
    let p = SDXL_TEXT_G_PREFIX;
    let tok = format!("{p}token_embedding.weight");
    let tok = [need_dim(ckpt, &tok, 0)?, need_dim(ckpt, &tok, 1)?];
    let pos = [need_dim(ckpt, &format!("{p}positional_embedding"), 0)?];
    let layers = count_indexed(
        ckpt,
        &format!("{p}transformer.resblocks."),
        ".mlp.c_fc.weight",
    );
    let intermediate = need_dim(
        ckpt,
        &format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
        0,
    )?;
    let projection = need_dim(ckpt, &format!("{p}text_projection"), 1)?;
    let hidden = tok[1];
    let heads = metadata_usize(ckpt, "slider.text_g.heads")?.unwrap_or(hidden / 64);
    Ok(TextConfig {
        vocab_size: tok[0],
        hidden,
        layers,
        heads,
        intermediate,
        max_positions: pos[0],
        activation: Activation::Gelu,
        projection_dim: Some(projection),
    })
}
