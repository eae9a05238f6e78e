//! The typed plan a recipe compiles to: plain data, the API boundary between `slider-recipe`
//! and `slider-engine`. Names and paths here are for people and publishing; the engine keys
//! nodes by content only.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use petgraph::graph::DiGraph;
use serde::Serialize;

/// A validated recipe: every reference resolved, every file checked to exist, no cycles.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The recipe file, absolute.
    pub recipe_path: PathBuf,
    /// Directory relative paths in the recipe are resolved against (the recipe's directory).
    pub root: PathBuf,
    /// Nodes after matrix expansion, in a topological order (inputs before consumers).
    pub nodes: Vec<Node>,
    /// Edges point from an input node to the node that consumes it. Node weights are
    /// indices into `nodes`.
    pub graph: DiGraph<usize, ()>,
    /// Where finished outputs are published: node name -> absolute path.
    pub outputs: BTreeMap<String, PathBuf>,
}

impl Plan {
    /// Each node's position in `nodes`, by name.
    pub fn index_by_name(&self) -> HashMap<&str, usize> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect()
    }
}

/// One node of the plan.
#[derive(Debug, Clone)]
pub struct Node {
    /// Name after matrix expansion, e.g. `small_front`.
    pub name: String,
    /// Typed parameters; every kohya default filled in.
    pub params: NodeParams,
    /// Where the node was written in the recipe (for errors raised later, e.g. by executors).
    pub origin: Origin,
}

/// File, line and column (1-based) of a node's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

/// A reference to something a node reads: another node's output or a file on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Input {
    /// The primary output of the named node.
    Node(String),
    /// A file, absolute path. Its content hash (never its path) enters the node key.
    File(PathBuf),
}

/// The kind of a node, with its parameters.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeParams {
    SvdMerge(SvdMergeParams),
    Merge(MergeParams),
    Resize(ResizeParams),
    Command(CommandParams),
    Train(TrainParams),
    XyPlot(XyPlotParams),
    Evaluate(EvaluateParams),
}

/// Floating-point formats kohya's tools accept for `--precision` / `--save_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Float,
    Fp16,
    Bf16,
}

/// `svd_merge_lora.py`.
#[derive(Debug, Clone, Serialize)]
pub struct SvdMergeParams {
    pub models: Vec<Input>,
    pub ratios: Vec<f64>,
    pub new_rank: usize,
    /// Defaults to `new_rank`.
    pub new_conv_rank: usize,
    pub precision: Precision,
    /// Defaults to `precision`.
    pub save_precision: Precision,
    /// The quantile of the clamp applied after the SVD; kohya's is 0.99. `None` = no clamp.
    pub clamp_quantile: Option<f64>,
}

/// Exact rank-concatenating merge: delta = sum ratio_i * delta_i.
#[derive(Debug, Clone, Serialize)]
pub struct MergeParams {
    pub models: Vec<Input>,
    pub ratios: Vec<f64>,
    pub save_precision: Precision,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DynamicMethod {
    SvRatio,
    SvFro,
    SvCumulative,
}

/// `resize_lora.py`.
#[derive(Debug, Clone, Serialize)]
pub struct ResizeParams {
    pub model: Input,
    pub new_rank: usize,
    /// Defaults to `new_rank`.
    pub new_conv_rank: usize,
    pub dynamic_method: Option<DynamicMethod>,
    pub dynamic_param: Option<f64>,
    pub save_precision: Precision,
}

/// Runs an external program. `{name}` placeholders in `run` are replaced by the paths of the
/// declared inputs and outputs; outputs are files the program must create in its work dir.
#[derive(Debug, Clone, Serialize)]
pub struct CommandParams {
    /// argv; the first element is the program.
    pub run: Vec<String>,
    pub inputs: BTreeMap<String, Input>,
    /// Output name -> file name inside the node's output directory. The first declared
    /// output (in recipe order) is the node's primary output.
    pub outputs: Vec<(String, String)>,
}

/// kohya `train_network.py` options (REFERENCE.md "Training").
#[derive(Debug, Clone, Serialize)]
pub struct TrainParams {
    pub base: Input,
    pub images: Vec<Input>,
    pub caption: String,
    pub learning_rate: f64,
    pub unet_lr: Option<f64>,
    pub train_batch_size: usize,
    pub max_train_steps: usize,
    pub network_dim: usize,
    pub network_alpha: f64,
    pub conv_dim: Option<usize>,
    pub conv_alpha: Option<f64>,
    pub network_train_unet_only: bool,
    pub lr_scheduler: String,
    pub lr_warmup_steps: usize,
    pub optimizer_type: String,
    pub optimizer_args: BTreeMap<String, String>,
    pub seed: u64,
    pub resolution: usize,
    pub noise_offset: f64,
    pub min_snr_gamma: Option<f64>,
    pub mixed_precision: String,
    pub gradient_checkpointing: bool,
    pub save_precision: Precision,
    pub checkpoint_every: usize,
}

/// An X/Y grid of samples.
#[derive(Debug, Clone, Serialize)]
pub struct XyPlotParams {
    pub base: Input,
    /// LoRAs applied to every cell (at weight 1 unless an axis varies it).
    pub loras: Vec<Input>,
    pub prompt: String,
    pub negative_prompt: String,
    pub x: Axis,
    pub y: Axis,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: String,
    pub width: usize,
    pub height: usize,
}

/// Slider quality on the toy eye-size world: for each prompt x seed x weight, sample with the
/// LoRA at that weight, measure the eyes with `meter`, and report how measured eye size
/// follows the weight (Spearman) and how much changes outside the eyes.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluateParams {
    pub base: Input,
    /// The slider under test.
    pub lora: Input,
    /// The eye-size meter's weights (a file, or a node that writes one).
    pub meter: Input,
    pub weights: Vec<f64>,
    pub seeds: Vec<u64>,
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: String,
    pub width: usize,
    pub height: usize,
}

/// One axis of an X/Y grid.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "axis", content = "values", rename_all = "snake_case")]
pub enum Axis {
    /// The weight of the first LoRA.
    Weight(Vec<f64>),
    Seed(Vec<u64>),
    Prompt(Vec<String>),
    /// Which LoRA is applied (`None` = the base model alone).
    Lora(Vec<Option<Input>>),
}

impl NodeParams {
    /// Every input the node reads, in a stable order.
    pub fn inputs(&self) -> Vec<&Input> {
        match self {
            NodeParams::SvdMerge(p) => p.models.iter().collect(),
            NodeParams::Merge(p) => p.models.iter().collect(),
            NodeParams::Resize(p) => vec![&p.model],
            NodeParams::Command(p) => p.inputs.values().collect(),
            NodeParams::Train(p) => std::iter::once(&p.base).chain(&p.images).collect(),
            NodeParams::XyPlot(p) => {
                let mut v: Vec<&Input> = std::iter::once(&p.base).chain(&p.loras).collect();
                for axis in [&p.x, &p.y] {
                    if let Axis::Lora(items) = axis {
                        v.extend(items.iter().flatten());
                    }
                }
                v
            }
            NodeParams::Evaluate(p) => vec![&p.base, &p.lora, &p.meter],
        }
    }

    /// The kind's name as written in recipes (`svd_merge`, `train`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            NodeParams::SvdMerge(_) => "svd_merge",
            NodeParams::Merge(_) => "merge",
            NodeParams::Resize(_) => "resize",
            NodeParams::Command(_) => "command",
            NodeParams::Train(_) => "train",
            NodeParams::XyPlot(_) => "xy_plot",
            NodeParams::Evaluate(_) => "evaluate",
        }
    }
}

/// Replaces `{name}` placeholders in one `command` argument with `lookup(name)`.
/// `{{` and `}}` are literal braces; a `{` not followed by `name}` (letters, digits, `_`) is
/// kept as is, so JSON arguments pass through. Returns the unknown name on failure.
///
/// ```
/// use slider_recipe::substitute_placeholders;
/// let arg = substitute_placeholders("--out={lora}", |n| (n == "lora").then(|| "/o/l.safetensors".to_string()));
/// assert_eq!(arg.unwrap(), "--out=/o/l.safetensors");
/// assert_eq!(substitute_placeholders("{{x}}", |_| None).unwrap(), "{x}");
/// assert_eq!(substitute_placeholders("{nope}", |_| None).unwrap_err(), "nope");
/// ```
pub fn substitute_placeholders(
    arg: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if let Some(after) = tail.strip_prefix('{') {
            let name_len = after
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            if let (true, Some(next)) = (name_len > 0, after[name_len..].strip_prefix('}')) {
                let name = &after[..name_len];
                out.push_str(&lookup(name).ok_or_else(|| name.to_owned())?);
                rest = next;
                continue;
            }
        }
        out.push_str(&tail[..1]);
        rest = &tail[1..];
    }
    out.push_str(rest);
    Ok(out)
}
