//! diffusers `config.json` files: what a single-file checkpoint's shapes cannot say (GroupNorm
//! group counts, attention heads, epsilons, activations), given the way diffusers'
//! `from_single_file(config=...)` takes it. A config completes and overrides what the shapes
//! give; a value that contradicts the weights is an error naming the config key and the
//! disagreeing tensor.
//!
//! Accepted: one `config.json` (a UNet's, or by its `_class_name` a VAE's or a CLIP text
//! encoder's), or a folder laid out like a diffusers repository (`unet/config.json`,
//! `vae/config.json`, `text_encoder/config.json`, `text_encoder_2/config.json`; each
//! optional, at least one present). Fields that change nothing we compute (`sample_size`,
//! `dropout`, `upcast_attention`, ...) and fields we do not know are ignored; values of known
//! fields we cannot honour (another block type, a shifted timestep embedding, ...) are errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::clip::{Activation, TextConfig};
use crate::unet::{Heads, UNetConfig};
use crate::vae::VaeConfig;

/// Errors of reading a diffusers config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not JSON, or a field of the wrong type (serde_json's message has the line and column).
    #[error("{path}: not a diffusers config.json: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A folder without any of the configs we read.
    #[error(
        "{path}: no unet/config.json, vae/config.json, text_encoder/config.json or \
         text_encoder_2/config.json in this folder"
    )]
    EmptyFolder {
        /// The folder.
        path: PathBuf,
    },
    /// A value this implementation cannot honour.
    #[error("{path}: `{key}` = {value}: {message}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The config key.
        key: String,
        /// Its value, as JSON.
        value: String,
        /// Why, and what is accepted.
        message: String,
    },
    /// A value the checkpoint's shapes contradict.
    #[error(
        "{path}: `{key}` = {value} contradicts the checkpoint ({found}): `{tensor}` would have \
         shape {expected:?} under this config, the checkpoint's has {actual}"
    )]
    Contradicts {
        /// The config file.
        path: PathBuf,
        /// The config key.
        key: String,
        /// The config's value.
        value: String,
        /// What the checkpoint shows instead.
        found: String,
        /// The first tensor that disagrees.
        tensor: String,
        /// Its shape under the config.
        expected: Vec<usize>,
        /// Its shape in the checkpoint (`absent` when missing).
        actual: String,
    },
}

/// The configs given for a checkpoint's parts; an absent part is read from shapes alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BaseConfig {
    /// The UNet (`UNet2DConditionModel`).
    pub unet: Option<Part<UNetConfig>>,
    /// The autoencoder (`AutoencoderKL`).
    pub vae: Option<Part<VaeConfig>>,
    /// The first text encoder (`CLIPTextModel`, Hugging Face layout).
    pub text_l: Option<Part<TextConfig>>,
    /// SDXL's second text encoder (`CLIPTextModelWithProjection`; open_clip layout).
    pub text_g: Option<Part<TextConfig>>,
}

/// One part's configuration and the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Part<T> {
    /// The `config.json`.
    pub path: PathBuf,
    /// The complete configuration it describes.
    pub config: T,
}

impl BaseConfig {
    /// No configs: every part from shapes (and our writer's metadata).
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads a `config.json` or a diffusers-layout folder.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        if path.is_dir() {
            let mut out = Self::default();
            let part = |name: &str| {
                let file = path.join(name).join("config.json");
                file.is_file().then_some(file)
            };
            if let Some(file) = part("unet") {
                out.unet = Some(Part {
                    config: unet_config(&read_json(&file)?, &file)?,
                    path: file,
                });
            }
            if let Some(file) = part("vae") {
                out.vae = Some(Part {
                    config: vae_config(&read_json(&file)?, &file)?,
                    path: file,
                });
            }
            if let Some(file) = part("text_encoder") {
                out.text_l = Some(Part {
                    config: text_config(&read_json(&file)?, &file, false)?,
                    path: file,
                });
            }
            if let Some(file) = part("text_encoder_2") {
                out.text_g = Some(Part {
                    config: text_config(&read_json(&file)?, &file, true)?,
                    path: file,
                });
            }
            if out == Self::default() {
                return Err(ConfigError::EmptyFolder {
                    path: path.to_path_buf(),
                });
            }
            return Ok(out);
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses one `config.json` (`path` is for messages): a UNet's unless its `_class_name`
    /// names an autoencoder or a CLIP text encoder.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let json = parse_json(text, path)?;
        let class = json
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or("UNet2DConditionModel");
        let path_buf = path.to_path_buf();
        let mut out = Self::default();
        match class {
            "UNet2DConditionModel" => {
                out.unet = Some(Part {
                    config: unet_config(&json, path)?,
                    path: path_buf,
                })
            }
            "AutoencoderKL" => {
                out.vae = Some(Part {
                    config: vae_config(&json, path)?,
                    path: path_buf,
                })
            }
            "CLIPTextModel" => {
                out.text_l = Some(Part {
                    config: text_config(&json, path, false)?,
                    path: path_buf,
                })
            }
            "CLIPTextModelWithProjection" => {
                out.text_g = Some(Part {
                    config: text_config(&json, path, true)?,
                    path: path_buf,
                })
            }
            other => {
                return Err(unsupported(
                    path,
                    "_class_name",
                    &Value::String(other.into()),
                    "expected UNet2DConditionModel, AutoencoderKL, CLIPTextModel or \
                     CLIPTextModelWithProjection",
                ));
            }
        }
        Ok(out)
    }

    /// Whether no part is configured.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn read_json(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_json(&text, path)
}

fn parse_json(text: &str, path: &Path) -> Result<Value, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if !value.is_object() {
        return Err(ConfigError::Format {
            path: path.to_path_buf(),
            message: "expected a JSON object".into(),
        });
    }
    Ok(value)
}

/// Typed view of a config: a field of the wrong type is a `Format` error naming it.
fn typed<T: for<'de> Deserialize<'de>>(json: &Value, path: &Path) -> Result<T, ConfigError> {
    T::deserialize(json).map_err(|e| ConfigError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn unsupported(path: &Path, key: &str, value: &Value, message: &str) -> ConfigError {
    ConfigError::Unsupported {
        path: path.to_path_buf(),
        key: key.into(),
        value: value.to_string(),
        message: message.into(),
    }
}

/// An integer, or one per level.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PerLevel {
    One(usize),
    Each(Vec<usize>),
}

impl PerLevel {
    fn expand(&self, levels: usize) -> Vec<usize> {
        match self {
            PerLevel::One(n) => vec![*n; levels],
            PerLevel::Each(v) => v.clone(),
        }
    }

    fn json(&self) -> Value {
        match self {
            PerLevel::One(n) => Value::from(*n),
            PerLevel::Each(v) => Value::from(v.clone()),
        }
    }
}

/// The `UNet2DConditionModel` fields that shape the computation, with diffusers' defaults.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct UNetFields {
    in_channels: usize,
    out_channels: usize,
    center_input_sample: bool,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    down_block_types: Vec<String>,
    mid_block_type: Option<String>,
    up_block_types: Vec<String>,
    only_cross_attention: Value,
    block_out_channels: Vec<usize>,
    layers_per_block: PerLevel,
    downsample_padding: usize,
    mid_block_scale_factor: f64,
    act_fn: String,
    norm_num_groups: Option<usize>,
    norm_eps: f64,
    cross_attention_dim: PerLevel,
    transformer_layers_per_block: Value,
    reverse_transformer_layers_per_block: Value,
    encoder_hid_dim: Value,
    encoder_hid_dim_type: Value,
    attention_head_dim: PerLevel,
    num_attention_heads: Option<PerLevel>,
    dual_cross_attention: bool,
    use_linear_projection: bool,
    class_embed_type: Value,
    addition_embed_type: Option<String>,
    addition_time_embed_dim: Option<usize>,
    num_class_embeds: Value,
    resnet_time_scale_shift: String,
    resnet_skip_time_act: bool,
    resnet_out_scale_factor: f64,
    time_embedding_type: String,
    time_embedding_dim: Option<usize>,
    time_embedding_act_fn: Value,
    timestep_post_act: Value,
    time_cond_proj_dim: Value,
    conv_in_kernel: usize,
    conv_out_kernel: usize,
    projection_class_embeddings_input_dim: Option<usize>,
    attention_type: String,
    class_embeddings_concat: bool,
    mid_block_only_cross_attention: Value,
    cross_attention_norm: Value,
}

impl Default for UNetFields {
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            only_cross_attention: Value::Bool(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerLevel::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerLevel::One(1280),
            transformer_layers_per_block: Value::from(1),
            reverse_transformer_layers_per_block: Value::Null,
            encoder_hid_dim: Value::Null,
            encoder_hid_dim_type: Value::Null,
            attention_head_dim: PerLevel::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: Value::Null,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: Value::Null,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: Value::Null,
            timestep_post_act: Value::Null,
            time_cond_proj_dim: Value::Null,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: Value::Null,
            cross_attention_norm: Value::Null,
        }
    }
}

/// A diffusers `UNet2DConditionModel` config as our [`UNetConfig`], or the first field we
/// cannot honour.
fn unet_config(json: &Value, path: &Path) -> Result<UNetConfig, ConfigError> {
    let f: UNetFields = typed(json, path)?;
    let bad = |key: &str, value: Value, why: &str| Err(unsupported(path, key, &value, why));

    // Values that would change the computation in ways our UNet does not implement.
    let fixed: [(&str, bool, Value, &str); 18] = [
        (
            "center_input_sample",
            !f.center_input_sample,
            Value::Bool(f.center_input_sample),
            "only false",
        ),
        (
            "flip_sin_to_cos",
            f.flip_sin_to_cos,
            Value::Bool(f.flip_sin_to_cos),
            "only true (the LDM embedding is [cos, sin])",
        ),
        (
            "freq_shift",
            f.freq_shift == 0.0,
            Value::from(f.freq_shift),
            "only 0",
        ),
        (
            "downsample_padding",
            f.downsample_padding == 1,
            Value::from(f.downsample_padding),
            "only 1",
        ),
        (
            "mid_block_scale_factor",
            f.mid_block_scale_factor == 1.0,
            Value::from(f.mid_block_scale_factor),
            "only 1",
        ),
        (
            "act_fn",
            f.act_fn == "silu",
            Value::from(f.act_fn.clone()),
            "only \"silu\"",
        ),
        (
            "dual_cross_attention",
            !f.dual_cross_attention,
            Value::Bool(f.dual_cross_attention),
            "only false",
        ),
        (
            "resnet_time_scale_shift",
            f.resnet_time_scale_shift == "default",
            Value::from(f.resnet_time_scale_shift.clone()),
            "only \"default\"",
        ),
        (
            "resnet_skip_time_act",
            !f.resnet_skip_time_act,
            Value::Bool(f.resnet_skip_time_act),
            "only false",
        ),
        (
            "resnet_out_scale_factor",
            f.resnet_out_scale_factor == 1.0,
            Value::from(f.resnet_out_scale_factor),
            "only 1",
        ),
        (
            "time_embedding_type",
            f.time_embedding_type == "positional",
            Value::from(f.time_embedding_type.clone()),
            "only \"positional\"",
        ),
        (
            "conv_in_kernel",
            f.conv_in_kernel == 3,
            Value::from(f.conv_in_kernel),
            "only 3",
        ),
        (
            "conv_out_kernel",
            f.conv_out_kernel == 3,
            Value::from(f.conv_out_kernel),
            "only 3",
        ),
        (
            "attention_type",
            f.attention_type == "default",
            Value::from(f.attention_type.clone()),
            "only \"default\"",
        ),
        (
            "class_embeddings_concat",
            !f.class_embeddings_concat,
            Value::Bool(f.class_embeddings_concat),
            "only false",
        ),
        (
            "mid_block_type",
            f.mid_block_type.as_deref() == Some("UNetMidBlock2DCrossAttn"),
            f.mid_block_type.clone().map_or(Value::Null, Value::from),
            "only \"UNetMidBlock2DCrossAttn\"",
        ),
        (
            "only_cross_attention",
            only_false(&f.only_cross_attention),
            f.only_cross_attention.clone(),
            "only false (self-attention in every block)",
        ),
        (
            "mid_block_only_cross_attention",
            matches!(
                f.mid_block_only_cross_attention,
                Value::Null | Value::Bool(false)
            ),
            f.mid_block_only_cross_attention.clone(),
            "only null or false",
        ),
    ];
    if let Some((key, _, value, why)) = fixed.into_iter().find(|(_, ok, _, _)| !ok) {
        return bad(key, value, why);
    }
    for (key, value) in [
        ("encoder_hid_dim", &f.encoder_hid_dim),
        ("encoder_hid_dim_type", &f.encoder_hid_dim_type),
        ("class_embed_type", &f.class_embed_type),
        ("num_class_embeds", &f.num_class_embeds),
        ("time_embedding_act_fn", &f.time_embedding_act_fn),
        ("timestep_post_act", &f.timestep_post_act),
        ("time_cond_proj_dim", &f.time_cond_proj_dim),
        ("cross_attention_norm", &f.cross_attention_norm),
    ] {
        if !value.is_null() {
            return bad(key, value.clone(), "only null");
        }
    }

    let levels = f.block_out_channels.len();
    let boc = &f.block_out_channels;
    let Some(&mc) = boc.first().filter(|&&c| c > 0) else {
        return bad(
            "block_out_channels",
            Value::from(boc.clone()),
            "must be non-empty and start above 0",
        );
    };
    if let Some(&c) = boc.iter().find(|&&c| c == 0 || !c.is_multiple_of(mc)) {
        return bad(
            "block_out_channels",
            Value::from(boc.clone()),
            &format!("{c} is not a non-zero multiple of the first level's {mc} channels"),
        );
    }
    if let Some(t) = f.time_embedding_dim
        && t != 4 * mc
    {
        return bad(
            "time_embedding_dim",
            Value::from(t),
            &format!("only null or 4 x block_out_channels[0] = {}", 4 * mc),
        );
    }
    let channel_mult: Vec<usize> = boc.iter().map(|c| c / mc).collect();

    // Which levels attend, on the way down and (mirrored) on the way up.
    let mut attends = Vec::with_capacity(levels);
    for t in &f.down_block_types {
        attends.push(match t.as_str() {
            "CrossAttnDownBlock2D" => true,
            "DownBlock2D" => false,
            _ => {
                return bad(
                    "down_block_types",
                    Value::from(f.down_block_types.clone()),
                    &format!("{t:?}: only CrossAttnDownBlock2D and DownBlock2D"),
                );
            }
        });
    }
    if attends.len() != levels {
        return bad(
            "down_block_types",
            Value::from(f.down_block_types.clone()),
            &format!(
                "{} block types for {levels} levels of block_out_channels",
                attends.len()
            ),
        );
    }
    let mirrored: Vec<&str> = attends
        .iter()
        .rev()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    if f.up_block_types != mirrored {
        return bad(
            "up_block_types",
            Value::from(f.up_block_types.clone()),
            &format!("must mirror down_block_types: {mirrored:?}"),
        );
    }

    let lpb = f.layers_per_block.expand(levels);
    let num_res_blocks = match lpb.as_slice() {
        [first, rest @ ..]
            if *first > 0 && rest.iter().all(|n| n == first) && lpb.len() == levels =>
        {
            *first
        }
        _ => {
            return bad(
                "layers_per_block",
                f.layers_per_block.json(),
                "only one non-zero count for every level",
            );
        }
    };
    let cross = f.cross_attention_dim.expand(levels);
    let context_dim = match cross.as_slice() {
        [first, rest @ ..] if *first > 0 && rest.iter().all(|n| n == first) => *first,
        _ => {
            return bad(
                "cross_attention_dim",
                f.cross_attention_dim.json(),
                "only one non-zero width for every level",
            );
        }
    };
    let tlpb: Vec<usize> = match &f.transformer_layers_per_block {
        Value::Number(_) => {
            let n: usize = typed(&f.transformer_layers_per_block, path)?;
            vec![n; levels]
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            typed(&f.transformer_layers_per_block, path)?
        }
        other => {
            return bad(
                "transformer_layers_per_block",
                other.clone(),
                "only an integer or one integer per level",
            );
        }
    };
    if tlpb.len() != levels || tlpb.contains(&0) {
        return bad(
            "transformer_layers_per_block",
            f.transformer_layers_per_block.clone(),
            &format!("expected {levels} non-zero depths"),
        );
    }
    let transformer_depth: Vec<usize> = attends
        .iter()
        .zip(&tlpb)
        .map(|(&a, &d)| if a { d } else { 0 })
        .collect();
    let reversed: Vec<usize> = tlpb.iter().rev().copied().collect();
    if !f.reverse_transformer_layers_per_block.is_null()
        && f.reverse_transformer_layers_per_block != Value::from(reversed.clone())
    {
        return bad(
            "reverse_transformer_layers_per_block",
            f.reverse_transformer_layers_per_block.clone(),
            &format!("only null or the reverse of transformer_layers_per_block, {reversed:?}"),
        );
    }

    // diffusers' historic naming: `attention_head_dim` is the number of heads unless
    // `num_attention_heads` is given.
    let (heads_key, heads_value) = match &f.num_attention_heads {
        Some(h) => ("num_attention_heads", h),
        None => ("attention_head_dim", &f.attention_head_dim),
    };
    let counts = heads_value.expand(levels);
    if counts.len() != levels || counts.contains(&0) {
        return bad(
            heads_key,
            heads_value.json(),
            &format!("expected {levels} non-zero head counts"),
        );
    }
    let heads = heads_of(boc, &counts, &attends)
        .map_err(|why| unsupported(path, heads_key, &heads_value.json(), &why))?;

    let (adm_in_channels, size_embed_dim) = match f.addition_embed_type.as_deref() {
        None => (None, 256),
        Some("text_time") => {
            let (Some(adm), Some(size)) = (
                f.projection_class_embeddings_input_dim,
                f.addition_time_embed_dim,
            ) else {
                return bad(
                    "addition_embed_type",
                    Value::from("text_time"),
                    "needs projection_class_embeddings_input_dim and addition_time_embed_dim",
                );
            };
            (Some(adm), size)
        }
        Some(other) => {
            return bad(
                "addition_embed_type",
                Value::from(other),
                "only null or \"text_time\"",
            );
        }
    };
    let Some(norm_num_groups) = f.norm_num_groups else {
        return bad(
            "norm_num_groups",
            Value::Null,
            "GroupNorm is required (a group count)",
        );
    };
    let config = UNetConfig {
        in_channels: f.in_channels,
        out_channels: f.out_channels,
        model_channels: mc,
        channel_mult,
        num_res_blocks,
        transformer_depth,
        transformer_depth_middle: tlpb[levels - 1],
        heads,
        context_dim,
        use_linear_projection: f.use_linear_projection,
        adm_in_channels,
        size_embed_dim,
        norm_num_groups,
        norm_eps: f.norm_eps,
    };
    config
        .validate()
        .map_err(|why| unsupported(path, "block_out_channels", &Value::from(boc.clone()), &why))?;
    Ok(config)
}

fn only_false(v: &Value) -> bool {
    match v {
        Value::Bool(b) => !b,
        Value::Array(items) => items.iter().all(|i| i == &Value::Bool(false)),
        _ => false,
    }
}

/// Per-level head counts as one head count or one head width over the levels that attend (the
/// last level always does: the middle block), or why they are neither.
fn heads_of(widths: &[usize], counts: &[usize], attends: &[bool]) -> Result<Heads, String> {
    let last = widths.len() - 1;
    let used: Vec<(usize, usize)> = (0..widths.len())
        .filter(|&l| attends[l] || l == last)
        .map(|l| (widths[l], counts[l]))
        .collect();
    if let Some(&(w, n)) = used.iter().find(|(w, n)| !w.is_multiple_of(*n)) {
        return Err(format!("{w} channels do not split into {n} heads"));
    }
    let (w0, n0) = used[0];
    if used.iter().all(|&(_, n)| n == n0) {
        return Ok(Heads::Count(n0));
    }
    if used.iter().all(|&(w, n)| w / n == w0 / n0) {
        return Ok(Heads::Dim(w0 / n0));
    }
    Err(format!(
        "the levels' heads {used:?} (channels, heads) are neither one head count nor one head \
         width; only those two are implemented"
    ))
}

/// The `AutoencoderKL` fields that shape the computation, with diffusers' defaults.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct VaeFields {
    in_channels: usize,
    out_channels: usize,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    act_fn: String,
    latent_channels: usize,
    norm_num_groups: usize,
    scaling_factor: Option<f64>,
    shift_factor: Value,
    use_quant_conv: bool,
    use_post_quant_conv: bool,
    mid_block_add_attention: bool,
}

impl Default for VaeFields {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: None,
            shift_factor: Value::Null,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

/// The latent scaling factors the model families use; a VAE config must name one of them
/// (the factor is the family's, applied by the callers).
const KNOWN_SCALING: [f64; 2] = [0.18215, 0.13025];

fn vae_config(json: &Value, path: &Path) -> Result<VaeConfig, ConfigError> {
    let f: VaeFields = typed(json, path)?;
    let bad = |key: &str, value: Value, why: &str| Err(unsupported(path, key, &value, why));
    let levels = f.block_out_channels.len();
    if f.out_channels != f.in_channels {
        return bad(
            "out_channels",
            Value::from(f.out_channels),
            "only equal to in_channels",
        );
    }
    if f.act_fn != "silu" {
        return bad("act_fn", Value::from(f.act_fn), "only \"silu\"");
    }
    if f.down_block_types.len() != levels
        || f.down_block_types.iter().any(|t| t != "DownEncoderBlock2D")
    {
        return bad(
            "down_block_types",
            Value::from(f.down_block_types),
            &format!("only DownEncoderBlock2D, one per level ({levels})"),
        );
    }
    if f.up_block_types.len() != levels || f.up_block_types.iter().any(|t| t != "UpDecoderBlock2D")
    {
        return bad(
            "up_block_types",
            Value::from(f.up_block_types),
            &format!("only UpDecoderBlock2D, one per level ({levels})"),
        );
    }
    for (key, ok) in [
        ("use_quant_conv", f.use_quant_conv),
        ("use_post_quant_conv", f.use_post_quant_conv),
        ("mid_block_add_attention", f.mid_block_add_attention),
    ] {
        if !ok {
            return bad(key, Value::Bool(false), "only true");
        }
    }
    if !f.shift_factor.is_null() {
        return bad("shift_factor", f.shift_factor, "only null");
    }
    if let Some(s) = f.scaling_factor
        && !KNOWN_SCALING.iter().any(|k| (k - s).abs() < 1e-9)
    {
        return bad(
            "scaling_factor",
            Value::from(s),
            "only SD1's 0.18215 or SDXL's 0.13025 (the factor follows the model family)",
        );
    }
    let boc = &f.block_out_channels;
    let Some(&ch) = boc.first().filter(|&&c| c > 0) else {
        return bad(
            "block_out_channels",
            Value::from(boc.clone()),
            "must be non-empty and start above 0",
        );
    };
    if let Some(&c) = boc.iter().find(|&&c| c == 0 || !c.is_multiple_of(ch)) {
        return bad(
            "block_out_channels",
            Value::from(boc.clone()),
            &format!("{c} is not a non-zero multiple of the first level's {ch} channels"),
        );
    }
    let config = VaeConfig {
        in_channels: f.in_channels,
        ch,
        ch_mult: boc.iter().map(|c| c / ch).collect(),
        num_res_blocks: f.layers_per_block,
        z_channels: f.latent_channels,
        norm_num_groups: f.norm_num_groups,
    };
    config
        .validate()
        .map_err(|why| unsupported(path, "block_out_channels", &Value::from(boc.clone()), &why))?;
    Ok(config)
}

/// The CLIP text fields that shape the computation, with transformers' defaults.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct TextFields {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    projection_dim: usize,
}

impl Default for TextFields {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
        }
    }
}

fn text_config(json: &Value, path: &Path, projected: bool) -> Result<TextConfig, ConfigError> {
    let f: TextFields = typed(json, path)?;
    let activation = match f.hidden_act.as_str() {
        "quick_gelu" => Activation::QuickGelu,
        "gelu" => Activation::Gelu,
        other => {
            return Err(unsupported(
                path,
                "hidden_act",
                &Value::from(other),
                "only \"quick_gelu\" or \"gelu\"",
            ));
        }
    };
    if f.layer_norm_eps != 1e-5 {
        return Err(unsupported(
            path,
            "layer_norm_eps",
            &Value::from(f.layer_norm_eps),
            "only 1e-5",
        ));
    }
    let config = TextConfig {
        vocab_size: f.vocab_size,
        hidden: f.hidden_size,
        layers: f.num_hidden_layers,
        heads: f.num_attention_heads,
        intermediate: f.intermediate_size,
        max_positions: f.max_position_embeddings,
        activation,
        projection_dim: projected.then_some(f.projection_dim),
    };
    config
        .validate()
        .map_err(|why| unsupported(path, "hidden_size", &Value::from(f.hidden_size), &why))?;
    Ok(config)
}

/// For each field of `ours` that `shapes` (read from the checkpoint) disagrees with, the
/// diffusers key that set it, the config's value and the checkpoint's: the fields the shapes
/// can tell. Empty when they agree.
pub(crate) fn unet_disagreements(
    ours: &UNetConfig,
    shapes: &UNetConfig,
) -> Vec<(&'static str, String, String)> {
    let widths = |c: &UNetConfig| {
        c.channel_mult
            .iter()
            .map(|m| m * c.model_channels)
            .collect::<Vec<_>>()
    };
    let rows: [(&str, String, String); 8] = [
        (
            "in_channels",
            ours.in_channels.to_string(),
            shapes.in_channels.to_string(),
        ),
        (
            "out_channels",
            ours.out_channels.to_string(),
            shapes.out_channels.to_string(),
        ),
        (
            "block_out_channels",
            format!("{:?}", widths(ours)),
            format!("{:?}", widths(shapes)),
        ),
        (
            "layers_per_block",
            ours.num_res_blocks.to_string(),
            shapes.num_res_blocks.to_string(),
        ),
        (
            "down_block_types / transformer_layers_per_block",
            format!(
                "depths {:?}, middle {}",
                ours.transformer_depth, ours.transformer_depth_middle
            ),
            format!(
                "depths {:?}, middle {}",
                shapes.transformer_depth, shapes.transformer_depth_middle
            ),
        ),
        (
            "cross_attention_dim",
            ours.context_dim.to_string(),
            shapes.context_dim.to_string(),
        ),
        (
            "use_linear_projection",
            ours.use_linear_projection.to_string(),
            shapes.use_linear_projection.to_string(),
        ),
        (
            "projection_class_embeddings_input_dim",
            format!("{:?}", ours.adm_in_channels),
            format!("{:?}", shapes.adm_in_channels),
        ),
    ];
    rows.into_iter().filter(|(_, a, b)| a != b).collect()
}

/// Same as [`unet_disagreements`] for the autoencoder.
pub(crate) fn vae_disagreements(
    ours: &VaeConfig,
    shapes: &VaeConfig,
) -> Vec<(&'static str, String, String)> {
    let widths = |c: &VaeConfig| c.ch_mult.iter().map(|m| m * c.ch).collect::<Vec<_>>();
    [
        (
            "in_channels",
            ours.in_channels.to_string(),
            shapes.in_channels.to_string(),
        ),
        (
            "block_out_channels",
            format!("{:?}", widths(ours)),
            format!("{:?}", widths(shapes)),
        ),
        (
            "layers_per_block",
            ours.num_res_blocks.to_string(),
            shapes.num_res_blocks.to_string(),
        ),
        (
            "latent_channels",
            ours.z_channels.to_string(),
            shapes.z_channels.to_string(),
        ),
    ]
    .into_iter()
    .filter(|(_, a, b)| a != b)
    .collect()
}

/// Same as [`unet_disagreements`] for a text encoder.
pub(crate) fn text_disagreements(
    ours: &TextConfig,
    shapes: &TextConfig,
) -> Vec<(&'static str, String, String)> {
    [
        ("vocab_size", ours.vocab_size, shapes.vocab_size),
        ("hidden_size", ours.hidden, shapes.hidden),
        ("num_hidden_layers", ours.layers, shapes.layers),
        ("intermediate_size", ours.intermediate, shapes.intermediate),
        (
            "max_position_embeddings",
            ours.max_positions,
            shapes.max_positions,
        ),
    ]
    .into_iter()
    .filter(|(_, a, b)| a != b)
    .map(|(k, a, b)| (k, a.to_string(), b.to_string()))
    .chain(
        (ours.projection_dim.is_some() && ours.projection_dim != shapes.projection_dim).then(
            || {
                (
                    "projection_dim",
                    format!("{:?}", ours.projection_dim),
                    format!("{:?}", shapes.projection_dim),
                )
            },
        ),
    )
    .collect()
}

/// The keys of a part config, for `model inspect`: which file set which part.
pub fn describe(config: &BaseConfig) -> BTreeMap<&'static str, PathBuf> {
    let mut out = BTreeMap::new();
    if let Some(p) = &config.unet {
        out.insert("unet", p.path.clone());
    }
    if let Some(p) = &config.vae {
        out.insert("vae", p.path.clone());
    }
    if let Some(p) = &config.text_l {
        out.insert("text_l", p.path.clone());
    }
    if let Some(p) = &config.text_g {
        out.insert("text_g", p.path.clone());
    }
    out
}
