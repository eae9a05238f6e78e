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
    /// A value the checkpoint's shapes contradict (boxed: the details are large and rare).
    #[error(transparent)]
    Contradicts(Box<Contradiction>),
}

/// A configured value the checkpoint's shapes contradict: the key, and the first tensor whose
/// shape differs under the config.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path}: `{key}` = {value} contradicts the checkpoint ({found}): `{tensor}` would have \
     shape {expected:?} under this config, the checkpoint's has {actual}"
)]
pub struct Contradiction {
    /// The config file.
    pub path: PathBuf,
    /// The config key.
    pub key: String,
    /// The config's value.
    pub value: String,
    /// What the checkpoint shows instead.
    pub found: String,
    /// The first tensor that disagrees.
    pub tensor: String,
    /// Its shape under the config.
    pub expected: Vec<usize>,
    /// Its shape in the checkpoint (`absent` when missing).
    pub actual: String,
}

/// A part's field that the checkpoint's shapes disagree with: the diffusers key that set it,
/// the config's value and the checkpoint's.
pub(crate) type Disagreement = (&'static str, String, String);

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
            // Each part's file, read and checked to describe that part (`_class_name`, when
            // given, must be the one diffusers writes there).
            let part = |name: &str, classes: &[&str]| -> Result<_, ConfigError> {
                let file = path.join(name).join("config.json");
                if !file.is_file() {
                    return Ok(None);
                }
                let json = read_json(&file)?;
                if let Some(class) = class_name(&json, &file)?
                    && !classes.contains(&class)
                {
                    return Err(unsupported(
                        &file,
                        "_class_name",
                        &Value::from(class),
                        &format!(
                            "{name}/config.json must describe a {}",
                            classes.join(" or ")
                        ),
                    ));
                }
                Ok(Some((json, file)))
            };
            if let Some((json, file)) = part("unet", &["UNet2DConditionModel"])? {
                out.unet = Some(Part {
                    config: unet_config(&json, &file)?,
                    path: file,
                });
            }
            if let Some((json, file)) = part("vae", &["AutoencoderKL"])? {
                out.vae = Some(Part {
                    config: vae_config(&json, &file)?,
                    path: file,
                });
            }
            if let Some((json, file)) = part("text_encoder", &["CLIPTextModel"])? {
                out.text_l = Some(Part {
                    config: text_config(&json, &file, false)?,
                    path: file,
                });
            }
            let text_g = ["CLIPTextModelWithProjection", "CLIPTextModel"];
            if let Some((json, file)) = part("text_encoder_2", &text_g)? {
                out.text_g = Some(Part {
                    config: text_config(&json, &file, true)?,
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
        let class = class_name(&json, path)?.unwrap_or("UNet2DConditionModel");
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

/// `_class_name`, when present: a string, else a `Format` error.
fn class_name<'j>(json: &'j Value, path: &Path) -> Result<Option<&'j str>, ConfigError> {
    match json.get("_class_name") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ConfigError::Format {
            path: path.to_path_buf(),
            message: format!("`_class_name`: expected a string, found {other}"),
        }),
    }
}

/// Typed view of a config: a field of the wrong type is a `Format` error naming it.
fn typed<T: for<'de> Deserialize<'de>>(json: &Value, path: &Path) -> Result<T, ConfigError> {
    T::deserialize(json).map_err(|e| {
        // Every field has a default, so an object of one entry fails only on that entry's
        // value: the first that does is the key to name.
        let key = json.as_object().and_then(|map| {
            map.iter()
                .find(|(k, v)| {
                    let one: serde_json::Map<String, Value> =
                        std::iter::once(((*k).clone(), (*v).clone())).collect();
                    T::deserialize(&Value::Object(one)).is_err()
                })
                .map(|(k, _)| k.clone())
        });
        ConfigError::Format {
            path: path.to_path_buf(),
            message: match key {
                Some(k) => format!("`{k}`: {e}"),
                None => e.to_string(),
            },
        }
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
#[serde(
    untagged,
    expecting = "an integer or a list of integers, one per level"
)]
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
    let depth = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
    let tlpb: Option<Vec<usize>> = match &f.transformer_layers_per_block {
        Value::Array(items) => items.iter().map(depth).collect(),
        one => depth(one).map(|n| vec![n; levels]),
    };
    let Some(tlpb) = tlpb else {
        return bad(
            "transformer_layers_per_block",
            f.transformer_layers_per_block.clone(),
            "only an integer or one integer per level",
        );
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
    // What `validate` would refuse, named by the key that set it.
    for (key, n) in [
        ("in_channels", f.in_channels),
        ("out_channels", f.out_channels),
    ] {
        if n == 0 {
            return bad(key, Value::from(n), "must be at least 1");
        }
    }
    if let Err(why) = groups_split(norm_num_groups, boc) {
        return bad("norm_num_groups", Value::from(norm_num_groups), &why);
    }
    if !(f.norm_eps.is_finite() && f.norm_eps > 0.0) {
        return bad("norm_eps", Value::from(f.norm_eps), "must be above 0");
    }
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

/// Whether GroupNorm's `groups` split every level's width.
fn groups_split(groups: usize, widths: &[usize]) -> Result<(), String> {
    if groups == 0 {
        return Err("must be at least 1".into());
    }
    match widths.iter().find(|w| !w.is_multiple_of(groups)) {
        Some(w) => Err(format!(
            "{w} channels (block_out_channels) do not split into {groups} groups"
        )),
        None => Ok(()),
    }
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
    for (key, n) in [
        ("in_channels", f.in_channels),
        ("layers_per_block", f.layers_per_block),
        ("latent_channels", f.latent_channels),
    ] {
        if n == 0 {
            return bad(key, Value::from(n), "must be at least 1");
        }
    }
    if let Err(why) = groups_split(f.norm_num_groups, boc) {
        return bad("norm_num_groups", Value::from(f.norm_num_groups), &why);
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
    let bad = |key: &str, n: usize, why: &str| Err(unsupported(path, key, &Value::from(n), why));
    for (key, n) in [
        ("vocab_size", f.vocab_size),
        ("hidden_size", f.hidden_size),
        ("intermediate_size", f.intermediate_size),
        ("num_hidden_layers", f.num_hidden_layers),
        ("num_attention_heads", f.num_attention_heads),
    ] {
        if n == 0 {
            return bad(key, n, "must be at least 1");
        }
    }
    if !f.hidden_size.is_multiple_of(f.num_attention_heads) {
        return bad(
            "num_attention_heads",
            f.num_attention_heads,
            &format!("hidden_size {} does not split into them", f.hidden_size),
        );
    }
    if f.max_position_embeddings < crate::tokenizer::CONTEXT_LENGTH {
        return bad(
            "max_position_embeddings",
            f.max_position_embeddings,
            &format!(
                "the tokenizer fills {} positions",
                crate::tokenizer::CONTEXT_LENGTH
            ),
        );
    }
    if projected && f.projection_dim == 0 {
        return bad("projection_dim", 0, "must be at least 1");
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
pub(crate) fn unet_disagreements(ours: &UNetConfig, shapes: &UNetConfig) -> Vec<Disagreement> {
    let widths = |c: &UNetConfig| {
        c.channel_mult
            .iter()
            .map(|m| m * c.model_channels)
            .collect::<Vec<_>>()
    };
    let rows: [Disagreement; 8] = [
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
pub(crate) fn vae_disagreements(ours: &VaeConfig, shapes: &VaeConfig) -> Vec<Disagreement> {
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
pub(crate) fn text_disagreements(ours: &TextConfig, shapes: &TextConfig) -> Vec<Disagreement> {
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

#[cfg(test)]
mod tests {
    //! The parsing of each config and the messages users read: one row per value, with the
    //! complete message of a refusal.

    use serde_json::json;

    use super::*;

    /// A small UNet config diffusers accepts (that of `tests/fixtures/config/groups8`).
    fn unet_json() -> Value {
        json!({
            "_class_name": "UNet2DConditionModel",
            "block_out_channels": [24, 48],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 16,
            "attention_head_dim": 3,
            "norm_num_groups": 8,
            "norm_eps": 1e-6,
            "sample_size": 8,
            "dropout": 0.0,
            "a_key_of_a_later_diffusers": [1, 2]
        })
    }

    fn vae_json() -> Value {
        json!({
            "_class_name": "AutoencoderKL",
            "block_out_channels": [32, 64],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "scaling_factor": 0.18215,
            "force_upcast": true
        })
    }

    fn text_json(class: &str) -> Value {
        json!({
            "_class_name": class,
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 16,
            "bos_token_id": 0
        })
    }

    /// `base` with `patch`'s entries set (a `null` sets the key to null).
    fn patched(base: Value, patch: Value) -> String {
        let (Value::Object(mut map), Value::Object(patch)) = (base, patch) else {
            panic!("objects only");
        };
        map.extend(patch);
        Value::Object(map).to_string()
    }

    fn parse(text: &str) -> Result<BaseConfig, ConfigError> {
        BaseConfig::from_json(text, Path::new("config.json"))
    }

    fn unet(patch: Value) -> Result<UNetConfig, String> {
        match parse(&patched(unet_json(), patch)) {
            Ok(c) => Ok(c.unet.expect("a UNet part").config),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn a_unet_config_gives_what_shapes_cannot_tell() {
        let c = unet(json!({})).unwrap();
        assert_eq!(
            (
                c.model_channels,
                c.channel_mult.as_slice(),
                c.num_res_blocks
            ),
            (24, &[1, 2][..], 1)
        );
        assert_eq!(
            (c.transformer_depth.as_slice(), c.transformer_depth_middle),
            (&[1, 0][..], 1)
        );
        assert_eq!((c.heads, c.context_dim), (Heads::Count(3), 16));
        assert_eq!((c.norm_num_groups, c.norm_eps), (8, 1e-6));
        assert_eq!((c.adm_in_channels, c.size_embed_dim), (None, 256));
        assert!(!c.use_linear_projection);
        // Everything unset takes diffusers' defaults: SD1.5's UNet but for the text width
        // (diffusers' default `cross_attention_dim` is 1280).
        let defaults = parse("{}").unwrap().unet.unwrap().config;
        assert_eq!(
            defaults,
            UNetConfig {
                context_dim: 1280,
                ..UNetConfig::sd15()
            }
        );
        // SDXL's added conditioning.
        let xl = unet(json!({
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 80,
            "transformer_layers_per_block": [1, 2],
            "use_linear_projection": true
        }))
        .unwrap();
        assert_eq!((xl.adm_in_channels, xl.size_embed_dim), (Some(80), 8));
        assert_eq!(
            (xl.transformer_depth.as_slice(), xl.transformer_depth_middle),
            (&[1, 0][..], 2)
        );
        assert!(xl.use_linear_projection);
    }

    /// diffusers' historic naming: `attention_head_dim` holds the head count unless
    /// `num_attention_heads` is given; per-level counts become one count or one width.
    #[test]
    fn heads_follow_diffusers_naming_and_levels() {
        let both = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"];
        let both_up = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"];
        let rows: [(Value, Heads); 6] = [
            (json!({"attention_head_dim": 3}), Heads::Count(3)),
            (json!({"attention_head_dim": [3, 3]}), Heads::Count(3)),
            // num_attention_heads wins over attention_head_dim.
            (
                json!({"attention_head_dim": 5, "num_attention_heads": 6}),
                Heads::Count(6),
            ),
            // Per-level counts of one width: 24 / 3 = 48 / 6 = 8 channels a head.
            (json!({"attention_head_dim": [3, 6]}), Heads::Dim(8)),
            (
                json!({"attention_head_dim": 1, "num_attention_heads": [3, 6]}),
                Heads::Dim(8),
            ),
            // Both levels attend (the second through the middle block only when it does not).
            (
                json!({"attention_head_dim": [4, 8], "down_block_types": both,
                       "up_block_types": both_up}),
                Heads::Dim(6),
            ),
        ];
        for (patch, heads) in rows {
            let text = patch.to_string();
            assert_eq!(unet(patch).map(|c| c.heads), Ok(heads), "{text}");
        }
    }

    /// Values of known fields this UNet cannot honour, each refused with its key, its value
    /// and what is accepted.
    #[test]
    fn unet_values_it_cannot_honour_are_refused_by_key() {
        let rows: &[(Value, &str)] = &[
            (
                json!({"down_block_types": ["CrossAttnDownBlock2D", "AttnDownBlock2D"]}),
                r#"config.json: `down_block_types` = ["CrossAttnDownBlock2D","AttnDownBlock2D"]: "AttnDownBlock2D": only CrossAttnDownBlock2D and DownBlock2D"#,
            ),
            (
                json!({"down_block_types": ["DownBlock2D"]}),
                r#"config.json: `down_block_types` = ["DownBlock2D"]: 1 block types for 2 levels of block_out_channels"#,
            ),
            (
                json!({"up_block_types": ["UpBlock2D", "UpBlock2D"]}),
                r#"config.json: `up_block_types` = ["UpBlock2D","UpBlock2D"]: must mirror down_block_types: ["UpBlock2D", "CrossAttnUpBlock2D"]"#,
            ),
            (
                json!({"mid_block_type": "UNetMidBlock2D"}),
                r#"config.json: `mid_block_type` = "UNetMidBlock2D": only "UNetMidBlock2DCrossAttn""#,
            ),
            (
                json!({"freq_shift": 1}),
                "config.json: `freq_shift` = 1.0: only 0",
            ),
            (
                json!({"flip_sin_to_cos": false}),
                "config.json: `flip_sin_to_cos` = false: only true (the LDM embedding is [cos, sin])",
            ),
            (
                json!({"class_embed_type": "timestep"}),
                r#"config.json: `class_embed_type` = "timestep": only null"#,
            ),
            (
                json!({"num_class_embeds": 10}),
                "config.json: `num_class_embeds` = 10: only null",
            ),
            (
                json!({"act_fn": "mish"}),
                r#"config.json: `act_fn` = "mish": only "silu""#,
            ),
            (
                json!({"resnet_time_scale_shift": "scale_shift"}),
                r#"config.json: `resnet_time_scale_shift` = "scale_shift": only "default""#,
            ),
            (
                json!({"only_cross_attention": [true, false]}),
                "config.json: `only_cross_attention` = [true,false]: only false (self-attention in every block)",
            ),
            (
                json!({"time_embedding_dim": 100}),
                "config.json: `time_embedding_dim` = 100: only null or 4 x block_out_channels[0] = 96",
            ),
            (
                json!({"addition_embed_type": "text"}),
                r#"config.json: `addition_embed_type` = "text": only null or "text_time""#,
            ),
            (
                json!({"addition_embed_type": "text_time"}),
                r#"config.json: `addition_embed_type` = "text_time": needs projection_class_embeddings_input_dim and addition_time_embed_dim"#,
            ),
            (
                json!({"layers_per_block": [1, 2]}),
                "config.json: `layers_per_block` = [1,2]: only one non-zero count for every level",
            ),
            (
                json!({"cross_attention_dim": [16, 32]}),
                "config.json: `cross_attention_dim` = [16,32]: only one non-zero width for every level",
            ),
            (
                json!({"transformer_layers_per_block": [1, 0]}),
                "config.json: `transformer_layers_per_block` = [1,0]: expected 2 non-zero depths",
            ),
            (
                json!({"transformer_layers_per_block": 1.5}),
                "config.json: `transformer_layers_per_block` = 1.5: only an integer or one integer per level",
            ),
            (
                json!({"reverse_transformer_layers_per_block": [2, 1]}),
                "config.json: `reverse_transformer_layers_per_block` = [2,1]: only null or the reverse of transformer_layers_per_block, [1, 1]",
            ),
            (
                json!({"block_out_channels": [24, 36]}),
                "config.json: `block_out_channels` = [24,36]: 36 is not a non-zero multiple of the first level's 24 channels",
            ),
            (
                json!({"block_out_channels": []}),
                "config.json: `block_out_channels` = []: must be non-empty and start above 0",
            ),
            (
                json!({"in_channels": 0}),
                "config.json: `in_channels` = 0: must be at least 1",
            ),
            // GroupNorm: required, non-zero, splitting every width; its eps above 0.
            (
                json!({"norm_num_groups": null}),
                "config.json: `norm_num_groups` = null: GroupNorm is required (a group count)",
            ),
            (
                json!({"norm_num_groups": 0}),
                "config.json: `norm_num_groups` = 0: must be at least 1",
            ),
            (
                json!({"norm_num_groups": 16}),
                "config.json: `norm_num_groups` = 16: 24 channels (block_out_channels) do not split into 16 groups",
            ),
            (
                json!({"norm_eps": 0.0}),
                "config.json: `norm_eps` = 0.0: must be above 0",
            ),
            // Heads: the key that gave them is the key named.
            (
                json!({"attention_head_dim": 5}),
                "config.json: `attention_head_dim` = 5: 24 channels do not split into 5 heads",
            ),
            (
                json!({"attention_head_dim": 5, "num_attention_heads": 7}),
                "config.json: `num_attention_heads` = 7: 24 channels do not split into 7 heads",
            ),
            (
                json!({"num_attention_heads": [3]}),
                "config.json: `num_attention_heads` = [3]: expected 2 non-zero head counts",
            ),
            (
                json!({"attention_head_dim": [3, 0]}),
                "config.json: `attention_head_dim` = [3,0]: expected 2 non-zero head counts",
            ),
            (
                json!({"attention_head_dim": [3, 4]}),
                "config.json: `attention_head_dim` = [3,4]: the levels' heads [(24, 3), (48, 4)] (channels, heads) are neither one head count nor one head width; only those two are implemented",
            ),
        ];
        for (patch, want) in rows {
            let got = unet(patch.clone()).map(|_| ()).unwrap_err();
            assert_eq!(got, *want, "{patch}");
        }
    }

    /// Wrong JSON types name the key; malformed JSON has serde_json's line and column.
    #[test]
    fn wrong_types_and_malformed_json_are_format_errors() {
        let rows: &[(String, &str)] = &[
            (
                patched(unet_json(), json!({"in_channels": "4"})),
                r#"config.json: not a diffusers config.json: `in_channels`: invalid type: string "4", expected usize"#,
            ),
            (
                patched(unet_json(), json!({"block_out_channels": "24, 48"})),
                r#"config.json: not a diffusers config.json: `block_out_channels`: invalid type: string "24, 48", expected a sequence"#,
            ),
            (
                patched(unet_json(), json!({"attention_head_dim": "three"})),
                "config.json: not a diffusers config.json: `attention_head_dim`: an integer or a list of integers, one per level",
            ),
            (
                patched(unet_json(), json!({"norm_eps": "1e-6"})),
                r#"config.json: not a diffusers config.json: `norm_eps`: invalid type: string "1e-6", expected f64"#,
            ),
            (
                patched(unet_json(), json!({"layers_per_block": -1})),
                "config.json: not a diffusers config.json: `layers_per_block`: an integer or a list of integers, one per level",
            ),
            (
                patched(vae_json(), json!({"norm_num_groups": 8.5})),
                "config.json: not a diffusers config.json: `norm_num_groups`: invalid type: floating point `8.5`, expected usize",
            ),
            (
                patched(text_json("CLIPTextModel"), json!({"hidden_size": [32]})),
                "config.json: not a diffusers config.json: `hidden_size`: invalid type: sequence, expected usize",
            ),
            (
                patched(unet_json(), json!({"_class_name": 7})),
                "config.json: not a diffusers config.json: `_class_name`: expected a string, found 7",
            ),
            (
                "{\n  \"in_channels\": 4,\n}\n".into(),
                "config.json: not a diffusers config.json: trailing comma at line 3 column 1",
            ),
            (
                "{\n  \"in_channels\": 4\n  \"out_channels\": 4\n}".into(),
                "config.json: not a diffusers config.json: expected `,` or `}` at line 3 column 3",
            ),
            (
                String::new(),
                "config.json: not a diffusers config.json: EOF while parsing a value at line 1 column 0",
            ),
            (
                "[4, 4]".into(),
                "config.json: not a diffusers config.json: expected a JSON object",
            ),
        ];
        for (text, want) in rows {
            let err = parse(text).unwrap_err();
            assert!(matches!(err, ConfigError::Format { .. }), "{text}: {err}");
            assert_eq!(err.to_string(), *want, "{text}");
        }
    }

    #[test]
    fn vae_and_clip_text_configs_are_read_by_their_class() {
        let vae = parse(&vae_json().to_string()).unwrap();
        assert!(vae.unet.is_none() && vae.text_l.is_none() && vae.text_g.is_none());
        assert_eq!(
            vae.vae.unwrap().config,
            VaeConfig {
                in_channels: 3,
                ch: 32,
                ch_mult: vec![1, 2],
                num_res_blocks: 1,
                z_channels: 4,
                norm_num_groups: 8,
            }
        );
        let want = TextConfig {
            vocab_size: 1000,
            hidden: 32,
            layers: 3,
            heads: 2,
            intermediate: 64,
            max_positions: 77,
            activation: Activation::QuickGelu,
            projection_dim: None,
        };
        let l = parse(&text_json("CLIPTextModel").to_string()).unwrap();
        assert!(l.text_g.is_none());
        assert_eq!(l.text_l.unwrap().config, want);
        let g = patched(
            text_json("CLIPTextModelWithProjection"),
            json!({"hidden_act": "gelu"}),
        );
        let g = parse(&g).unwrap();
        assert!(g.text_l.is_none());
        assert_eq!(
            g.text_g.unwrap().config,
            TextConfig {
                activation: Activation::Gelu,
                projection_dim: Some(16),
                ..want
            }
        );
    }

    #[test]
    fn vae_and_text_values_it_cannot_honour_are_refused_by_key() {
        let rows: &[(String, &str)] = &[
            (
                patched(vae_json(), json!({"scaling_factor": 0.5})),
                "config.json: `scaling_factor` = 0.5: only SD1's 0.18215 or SDXL's 0.13025 (the factor follows the model family)",
            ),
            (
                patched(vae_json(), json!({"shift_factor": 0.1159})),
                "config.json: `shift_factor` = 0.1159: only null",
            ),
            (
                patched(vae_json(), json!({"use_quant_conv": false})),
                "config.json: `use_quant_conv` = false: only true",
            ),
            (
                patched(
                    vae_json(),
                    json!({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}),
                ),
                r#"config.json: `down_block_types` = ["DownEncoderBlock2D","AttnDownEncoderBlock2D"]: only DownEncoderBlock2D, one per level (2)"#,
            ),
            (
                patched(vae_json(), json!({"act_fn": "relu"})),
                r#"config.json: `act_fn` = "relu": only "silu""#,
            ),
            (
                patched(vae_json(), json!({"norm_num_groups": 24})),
                "config.json: `norm_num_groups` = 24: 32 channels (block_out_channels) do not split into 24 groups",
            ),
            (
                patched(vae_json(), json!({"latent_channels": 0})),
                "config.json: `latent_channels` = 0: must be at least 1",
            ),
            (
                patched(text_json("CLIPTextModel"), json!({"hidden_act": "relu"})),
                r#"config.json: `hidden_act` = "relu": only "quick_gelu" or "gelu""#,
            ),
            (
                patched(text_json("CLIPTextModel"), json!({"layer_norm_eps": 1e-6})),
                "config.json: `layer_norm_eps` = 1e-6: only 1e-5",
            ),
            (
                patched(
                    text_json("CLIPTextModel"),
                    json!({"num_attention_heads": 5}),
                ),
                "config.json: `num_attention_heads` = 5: hidden_size 32 does not split into them",
            ),
            (
                patched(
                    text_json("CLIPTextModel"),
                    json!({"max_position_embeddings": 64}),
                ),
                "config.json: `max_position_embeddings` = 64: the tokenizer fills 77 positions",
            ),
            (
                patched(
                    text_json("CLIPTextModelWithProjection"),
                    json!({"projection_dim": 0}),
                ),
                "config.json: `projection_dim` = 0: must be at least 1",
            ),
            (
                patched(unet_json(), json!({"_class_name": "SD3Transformer2DModel"})),
                r#"config.json: `_class_name` = "SD3Transformer2DModel": expected UNet2DConditionModel, AutoencoderKL, CLIPTextModel or CLIPTextModelWithProjection"#,
            ),
        ];
        for (text, want) in rows {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(err, ConfigError::Unsupported { .. }),
                "{text}: {err}"
            );
            assert_eq!(err.to_string(), *want, "{text}");
        }
    }

    fn write(dir: &Path, rel: &str, json: &Value) -> PathBuf {
        let file = dir.join(rel);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, serde_json::to_string_pretty(json).unwrap()).unwrap();
        file
    }

    /// A folder laid out like a diffusers repository: each part from its own folder, any of
    /// them optional, and errors naming the file they are in.
    #[test]
    fn a_diffusers_folder_gives_each_part_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let unet = write(root, "unet/config.json", &unet_json());
        let vae = write(root, "vae/config.json", &vae_json());
        let l = write(
            root,
            "text_encoder/config.json",
            &text_json("CLIPTextModel"),
        );
        let g = write(
            root,
            "text_encoder_2/config.json",
            &text_json("CLIPTextModelWithProjection"),
        );
        write(root, "scheduler/scheduler_config.json", &json!({"x": 1}));
        let all = BaseConfig::load(root).unwrap();
        assert_eq!(all.unet.as_ref().unwrap().config.norm_num_groups, 8);
        assert_eq!(all.vae.as_ref().unwrap().config.norm_num_groups, 8);
        assert_eq!(all.text_l.as_ref().unwrap().config.projection_dim, None);
        assert_eq!(all.text_g.as_ref().unwrap().config.projection_dim, Some(16));
        assert_eq!(
            describe(&all).into_iter().collect::<Vec<_>>(),
            [
                ("text_g", g),
                ("text_l", l),
                ("unet", unet),
                ("vae", vae.clone())
            ]
        );
        // One file of the folder alone reads the same.
        assert_eq!(BaseConfig::load(&vae).unwrap().vae, all.vae);

        // Parts are optional.
        std::fs::remove_dir_all(root.join("unet")).unwrap();
        std::fs::remove_dir_all(root.join("text_encoder_2")).unwrap();
        let some = BaseConfig::load(root).unwrap();
        assert!(some.unet.is_none() && some.text_g.is_none());
        assert!(some.vae.is_some() && some.text_l.is_some());

        // An error names the file it is in.
        write(
            root,
            "text_encoder/config.json",
            &patched(text_json("CLIPTextModel"), json!({"hidden_act": "relu"}))
                .parse::<Value>()
                .unwrap(),
        );
        let err = BaseConfig::load(root).unwrap_err().to_string();
        let file = root.join("text_encoder/config.json");
        assert_eq!(
            err,
            format!(
                "{}: `hidden_act` = \"relu\": only \"quick_gelu\" or \"gelu\"",
                file.display()
            )
        );
        std::fs::write(&file, "{\"hidden_size\": 32,").unwrap();
        let err = BaseConfig::load(root).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: not a diffusers config.json: EOF while parsing a value at line 1 column 19",
                file.display()
            )
        );
        // A part's folder holding another part's config.
        write(root, "text_encoder/config.json", &vae_json());
        let err = BaseConfig::load(root).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: `_class_name` = \"AutoencoderKL\": text_encoder/config.json must describe a \
                 CLIPTextModel",
                file.display()
            )
        );

        // A folder with none of them, and a path with nothing.
        let empty = tempfile::tempdir().unwrap();
        write(empty.path(), "model_index.json", &json!({}));
        let err = BaseConfig::load(empty.path()).unwrap_err();
        assert!(matches!(err, ConfigError::EmptyFolder { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "{}: no unet/config.json, vae/config.json, text_encoder/config.json or \
                 text_encoder_2/config.json in this folder",
                empty.path().display()
            )
        );
        let missing = root.join("no/config.json");
        let err = BaseConfig::load(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("{}: ", missing.display()))
        );
    }

    fn sd1_tiny() -> crate::Checkpoint {
        crate::Checkpoint::open(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sd1_tiny.safetensors"),
        )
        .unwrap()
    }

    /// The configs of `tests/fixtures/sd1_tiny.safetensors` (tests/fixtures/make_fixtures.py),
    /// as a diffusers folder would hold them.
    fn sd1_tiny_configs() -> (Value, Value, Value) {
        let unet = json!({
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32,
            "attention_head_dim": 2,
            "norm_num_groups": 32
        });
        let vae = patched(vae_json(), json!({"norm_num_groups": 32}));
        (unet, vae.parse().unwrap(), text_json("CLIPTextModel"))
    }

    fn config_of(unet: Option<Value>, vae: Option<Value>, text: Option<Value>) -> BaseConfig {
        let part = |json: Value| BaseConfig::from_json(&json.to_string(), Path::new("c.json"));
        BaseConfig {
            unet: unet.map(|j| part(j).unwrap().unet.unwrap()),
            vae: vae.map(|j| part(j).unwrap().vae.unwrap()),
            text_l: text.map(|j| part(j).unwrap().text_l.unwrap()),
            text_g: None,
        }
    }

    #[test]
    fn configs_the_shapes_agree_with_replace_the_assumptions() {
        let ckpt = sd1_tiny();
        let guessed = crate::ModelSpec::detect(&ckpt).unwrap();
        let none = BaseConfig::none();
        assert_eq!(
            guessed.assumptions(&ckpt, &none),
            [
                "UNet GroupNorm groups 32 (norm_num_groups) and eps 1e-5 (norm_eps)",
                "VAE GroupNorm groups 32"
            ]
        );
        let (unet, vae, text) = sd1_tiny_configs();
        let config = config_of(Some(unet), Some(vae), Some(text));
        let spec = crate::ModelSpec::detect_with(&ckpt, &config).unwrap();
        assert_eq!(spec, guessed);
        assert!(spec.assumptions(&ckpt, &config).is_empty());
    }

    /// Each part's config that its weights contradict: the key, both values and the first
    /// tensor whose shape differs.
    #[test]
    fn configs_the_shapes_contradict_name_the_key_and_the_tensor() {
        let ckpt = sd1_tiny();
        let (unet, vae, text) = sd1_tiny_configs();
        let rows: [(BaseConfig, &str, &str, &[usize], &str); 4] = [
            (
                config_of(
                    Some(
                        patched(unet.clone(), json!({"cross_attention_dim": 64}))
                            .parse()
                            .unwrap(),
                    ),
                    None,
                    None,
                ),
                "cross_attention_dim",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                &[32, 64],
                "[32, 32]",
            ),
            (
                config_of(
                    Some(
                        patched(unet, json!({"layers_per_block": 2}))
                            .parse()
                            .unwrap(),
                    ),
                    None,
                    None,
                ),
                "layers_per_block",
                "model.diffusion_model.input_blocks.2.0.in_layers.0.weight",
                &[32],
                "absent",
            ),
            (
                config_of(
                    None,
                    Some(patched(vae, json!({"latent_channels": 8})).parse().unwrap()),
                    None,
                ),
                "latent_channels",
                "first_stage_model.encoder.conv_out.weight",
                &[16, 64, 3, 3],
                "[8, 64, 3, 3]",
            ),
            (
                config_of(
                    None,
                    None,
                    Some(patched(text, json!({"hidden_size": 64})).parse().unwrap()),
                ),
                "hidden_size",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                &[1000, 64],
                "[1000, 32]",
            ),
        ];
        for (config, want_key, want_tensor, want_shape, want_actual) in rows {
            let err = crate::ModelSpec::detect_with(&ckpt, &config).unwrap_err();
            let message = err.to_string();
            let crate::CheckpointError::Config(ConfigError::Contradicts(c)) = err else {
                panic!("not a contradiction: {message}");
            };
            let Contradiction {
                path,
                key,
                tensor,
                expected,
                actual,
                ..
            } = *c;
            assert_eq!(path, Path::new("c.json"), "{message}");
            assert_eq!(
                (
                    key.as_str(),
                    tensor.as_str(),
                    expected.as_slice(),
                    actual.as_str()
                ),
                (want_key, want_tensor, want_shape, want_actual),
                "{message}"
            );
        }
        // The message users read.
        let config = config_of(
            None,
            None,
            Some(
                patched(text_json("CLIPTextModel"), json!({"hidden_size": 64}))
                    .parse()
                    .unwrap(),
            ),
        );
        assert_eq!(
            crate::ModelSpec::detect_with(&ckpt, &config)
                .unwrap_err()
                .to_string(),
            "c.json: `hidden_size` = 64 contradicts the checkpoint (which shows 32): \
             `cond_stage_model.transformer.text_model.embeddings.token_embedding.weight` would \
             have shape [1000, 64] under this config, the checkpoint's has [1000, 32]"
        );
    }

    #[test]
    fn disagreements_list_only_what_differs() {
        let a = UNetConfig::sd15();
        assert!(unet_disagreements(&a, &a).is_empty());
        let b = UNetConfig {
            norm_num_groups: 16,
            heads: Heads::Dim(64),
            ..a.clone()
        };
        // What shapes cannot tell is never a disagreement.
        assert!(unet_disagreements(&b, &a).is_empty());
        let c = UNetConfig {
            context_dim: 1024,
            in_channels: 9,
            ..a.clone()
        };
        assert_eq!(
            unet_disagreements(&c, &a),
            [
                ("in_channels", "9".into(), "4".into()),
                ("cross_attention_dim", "1024".into(), "768".into())
            ]
        );
    }
}
